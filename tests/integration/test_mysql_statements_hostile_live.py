"""A hostile client against multiplexed MySQL prepared statements (EXCLUDE_PREPARED_STATEMENTS)
on the real MariaDB, with a raw protocol client: one pool connection, so that every session's
statement of one text is the same statement on the server."""

import pytest

try:
    from mysql_harness import start_mysql_proxy
    from mysql_raw import RawMySQL
    from test_mysql_statements_live import ARN, LONGLONG, PASSWORD, USER, VAR_STRING, exchange, execute, prepare
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy
    from tests.integration.mysql_raw import RawMySQL
    from tests.integration.test_mysql_statements_live import (ARN, LONGLONG, PASSWORD, USER, VAR_STRING, exchange,
                                                              execute, prepare)

from txrdsproxy.wire.mysql import packets as P


@pytest.fixture
def one_conn_proxy(mariadb_server, tmp_path):
    if USER not in mariadb_server.users:
        mariadb_server.create_user(USER, PASSWORD)
    proxy = start_mysql_proxy(tmp_path / "p", mariadb_server,
                              secrets={ARN: (USER, PASSWORD, "MYSQL_NATIVE_PASSWORD")},
                              name="ps1", MaxConnectionsPercent=1, ConnectionBorrowTimeout=20,
                              SessionPinningFilters=["EXCLUDE_PREPARED_STATEMENTS"])
    yield proxy
    proxy.stop()


def _execute_arg(stmt_id, flag, types, data):
    return stmt_id.to_bytes(4, "little") + b"\x00\x01\x00\x00\x00" + b"\x00" + bytes((flag,)) + types + data


def test_types_the_server_refuses_to_bind_leave_another_sessions_execute_alone(one_conn_proxy):
    """A session's execute with a new-params-bound byte other than 0/1 (refused by MariaDB, 1835)
    does not change the types the shared statement holds for the next session relying on its
    own (flag 0): its 8-byte integer is read as one."""
    connect = lambda: RawMySQL(one_conn_proxy.host, one_conn_proxy.port, USER, PASSWORD, "appdb")  # noqa: E731
    a, b = connect(), connect()
    sql = b"SELECT ? AS v, CONNECTION_ID()"
    sb = prepare(b, sql)
    sa = prepare(a, sql)
    value, conn_a = execute(a, sa, 5, types=bytes((LONGLONG, 0)))
    assert value == (5).to_bytes(8, "little")
    for flag in (2, 0x81):
        payloads = exchange(b, P.COM_STMT_EXECUTE, _execute_arg(sb, flag, bytes((VAR_STRING, 0)),
                                                                 P.encode_lenenc_str(b"abc")))
        assert P.parse_err(payloads[0]).code == 1835  # as MariaDB answers it directly
    value, conn_a2 = execute(a, sa, 7)  # flag 0: a's own integer type
    assert conn_a2 == conn_a  # the one connection
    assert value == (7).to_bytes(8, "little")
    a.close()
    b.close()


def test_statement_ids_name_only_the_sessions_own_statements(one_conn_proxy):
    """Ids are per session: b's id 1 is not a's id 1; ids b never got (guessed, 0, the 'last
    prepared' id before any prepare, a closed one) are refused as the server refuses them, for
    each command; closing or resetting b's id 1 leaves a's statement working."""
    connect = lambda: RawMySQL(one_conn_proxy.host, one_conn_proxy.port, USER, PASSWORD, "appdb")  # noqa: E731
    a, b = connect(), connect()
    sa = prepare(a, b"SELECT ? AS v, CONNECTION_ID()")
    value, _ = execute(a, sa, 3, types=bytes((LONGLONG, 0)))
    for stmt_id in (sa, sa + 1, 0, 0xFFFFFFFF, 0x7FFFFFFF):
        for cmd, arg in ((P.COM_STMT_EXECUTE, _execute_arg(stmt_id, 1, bytes((LONGLONG, 0)), bytes(8))),
                         (P.COM_STMT_RESET, stmt_id.to_bytes(4, "little")),
                         (P.COM_STMT_FETCH, stmt_id.to_bytes(4, "little") + (1).to_bytes(4, "little"))):
            payloads = exchange(b, cmd, arg)
            assert P.parse_err(payloads[0]).code == 1243, (stmt_id, cmd)
        # no answer to these (as from the server); the session goes on
        b.send(P.encode_packet(bytes((P.COM_STMT_SEND_LONG_DATA,)) + stmt_id.to_bytes(4, "little") + b"\0\0xyz", 0))
        b.send(P.encode_packet(bytes((P.COM_STMT_CLOSE,)) + stmt_id.to_bytes(4, "little"), 0))
    assert b.query("SELECT 1") == [["1"]]
    sb = prepare(b, b"SELECT ? AS v, CONNECTION_ID()")
    assert sb == sa  # the same number, another session's statement
    exchange(b, P.COM_STMT_RESET, sb.to_bytes(4, "little"))
    b.send(P.encode_packet(bytes((P.COM_STMT_CLOSE,)) + sb.to_bytes(4, "little"), 0))
    payloads = exchange(b, P.COM_STMT_EXECUTE, _execute_arg(sb, 1, bytes((LONGLONG, 0)), bytes(8)))
    assert P.parse_err(payloads[0]).code == 1243  # closed for b
    value, _ = execute(a, sa, 11)  # a's, with a's types, unchanged
    assert value == (11).to_bytes(8, "little")
    a.close()
    b.close()


def _two_ints(raw, stmt_id, a, b, types=True):
    """EXECUTE `SELECT ? AS v, ? AS w` with two 8-byte integers (types sent or not)."""
    bound = b"\x01" + bytes((LONGLONG, 0)) * 2 if types else b"\x00"
    arg = stmt_id.to_bytes(4, "little") + b"\x00\x01\x00\x00\x00" + b"\x00" + bound \
        + a.to_bytes(8, "little") + b.to_bytes(8, "little")
    payloads = exchange(raw, P.COM_STMT_EXECUTE, arg)
    assert payloads[0][0] != 0xFF, P.parse_err(payloads[0])
    row = payloads[-2]
    return row[2:10], row[10:18]


def test_types_cut_short_leave_another_sessions_execute_alone(one_conn_proxy):
    """An execute whose types stop after the first parameter: MariaDB binds that one and then
    refuses the packet.  The statement the next session relies on (flag 0) must not keep it:
    the proxy sends that session's types again."""
    connect = lambda: RawMySQL(one_conn_proxy.host, one_conn_proxy.port, USER, PASSWORD, "appdb")  # noqa: E731
    a, b = connect(), connect()
    sql = b"SELECT ? AS v, ? AS w"
    sb = prepare(b, sql)
    sa = prepare(a, sql)
    assert _two_ints(a, sa, 5, 6) == ((5).to_bytes(8, "little"), (6).to_bytes(8, "little"))
    cut = sb.to_bytes(4, "little") + b"\x00\x01\x00\x00\x00" + b"\x00" + b"\x01" + bytes((VAR_STRING, 0))
    payloads = exchange(b, P.COM_STMT_EXECUTE, cut)
    assert payloads[0][0] == 0xFF
    assert _two_ints(a, sa, 7, 8, types=False) == ((7).to_bytes(8, "little"), (8).to_bytes(8, "little"))
    a.close()
    b.close()
