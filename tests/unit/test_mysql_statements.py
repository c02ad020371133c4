"""Multiplexed prepared statements (SessionPinningFilters EXCLUDE_PREPARED_STATEMENTS, MySQL):
the packet rewriting (wire/mysql/statements.py) and the session's id map over fake connections
(proxy/mysql_statements.py).  Real drivers: tests/integration/test_mysql_statements_live.py."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit import test_mysql_frontend as my
from txrdsproxy.proxy.mysql_backend import DatabaseError
from txrdsproxy.proxy.session import SessionState
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql import statements as S
from txrdsproxy.wire.mysql.pinning import PinReason

AC = P.SERVER_STATUS_AUTOCOMMIT
FILTER = {"TargetGroups": [{
    "Targets": [{"RdsResourceId": "my-1", "Endpoint": "127.0.0.1", "Port": 3306}],
    "ConnectionPoolConfig": {"SessionPinningFilters": ["EXCLUDE_PREPARED_STATEMENTS"]}}]}
LONGLONG = b"\x08\x00"


def execute_arg(stmt_id, params=0, types=None, values=b"", flags=0, null_bitmap=None):
    arg = struct.pack("<IBI", stmt_id, flags, 1)
    if params:
        arg += null_bitmap if null_bitmap is not None else bytes((params + 7) // 8)
        arg += (b"\x01" + types) if types is not None else b"\x00"
        arg += values
    return arg


def execute(stmt_id, **kw):
    return my.command(P.COM_STMT_EXECUTE, execute_arg(stmt_id, **kw))


# -- wire: the packets ---------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.data())
def test_types_added_to_an_execute_are_what_a_driver_binding_them_sends(params, data):
    types = data.draw(st.binary(min_size=2 * params, max_size=2 * params))
    values = data.draw(st.binary(max_size=300))
    bitmap = data.draw(st.binary(min_size=(params + 7) // 8, max_size=(params + 7) // 8))
    seq = data.draw(st.integers(0, 255))
    bound = P.encode_packet(bytes((P.COM_STMT_EXECUTE,)) + execute_arg(
        9, params, types, values, null_bitmap=bitmap), seq)
    unbound = P.encode_packet(bytes((P.COM_STMT_EXECUTE,)) + execute_arg(
        9, params, None, values, null_bitmap=bitmap), seq)
    assert S.bound_types(bound, params) == (1, types)
    assert S.bound_types(unbound, params) == (0, None)
    assert S.with_types(unbound, params, types) == bound
    assert S.with_statement_id(bound, 0x01020304)[5:9] == b"\x04\x03\x02\x01"
    assert S.statement_id(S.with_statement_id(bound, 77)) == 77


def test_short_executes_say_nothing_about_types():
    packet = execute(1, params=9)[:12]
    assert S.bound_types(packet, 9) is None
    assert S.bound_types(execute(1), 0) == (0, None)


def test_a_connection_keeps_a_bounded_number_of_statements_oldest_first_but_never_kept_ones():
    cache = S.ConnStatements(limit=3)
    first, closed = cache.add("a", 1, 0)
    assert closed == []
    first.keep = True  # a cursor is open on it
    cache.add("b", 2, 0)
    cache.add("c", 3, 0)
    _, closed = cache.add("d", 4, 0)
    assert closed == [2] and len(cache) == 3 and cache.get("a") is first
    _, closed = cache.add("c", 5, 1)  # prepared again: the old one is closed
    assert closed == [3] and cache.get("c").server_id == 5


def test_the_key_holds_what_parsing_depends_on():
    current = {"sql_mode": "ANSI", "time_zone": "+01:00", "character_set_client": "utf8mb4"}
    key = S.prepare_key(b"SELECT ?", "appdb", current)
    assert key == S.prepare_key(b"SELECT ?", "appdb", dict(current, time_zone="UTC"))
    assert key != S.prepare_key(b"SELECT ?", "other", current)
    assert key != S.prepare_key(b"SELECT ?", "appdb", dict(current, sql_mode=""))


# -- the session's id map ---------------------------------------------------------------------------------
@pytest.fixture
def s():
    h = my.Harness(**FILTER)
    h.login()
    return h


def prepared(s, sql=b"SELECT ?", server_id=41, params=1):
    """PREPARE through the proxy on a new connection (given back after): -> (client id, lease)."""
    s.send(my.command(P.COM_STMT_PREPARE, sql))
    lease = s.pool.give()
    assert lease.conn.writes[-1] == my.command(P.COM_STMT_PREPARE, sql)
    lease.conn.respond(my.prepare_ok(stmt_id=server_id, params=params), *([my.coldef()] * params),
                       seq=1)
    [(seq, first)] = s.packets()[:1]
    assert seq == 1 and first[0] == 0
    assert s.frontend.pin_reason is None and lease.released  # not pinned: given back
    return struct.unpack("<I", first[1:5])[0], lease


def test_prepare_answers_with_an_id_of_the_proxy_and_does_not_pin(s):
    stmt_id, lease = prepared(s)
    assert stmt_id == 1
    key = S.prepare_key(b"SELECT ?", lease.conn.database, lease.conn.current)
    assert lease.conn.statements.get(key).server_id == 41
    second, _ = prepared(s, b"SELECT ?, ?", server_id=41, params=2)  # same server id elsewhere
    assert second == 2


def test_execute_on_a_connection_without_the_statement_prepares_it_there_first(s):
    stmt_id, first = prepared(s)
    s.send(execute(stmt_id, params=1, types=LONGLONG, values=struct.pack("<q", 5)))
    lease = s.pool.give()
    [(key, sql, d)] = lease.conn.prepares
    assert sql == b"SELECT ?" and lease.conn.writes == []  # nothing before it is prepared
    assert s.frontend.busy and s.frontend.state is SessionState.BORROWED
    d.callback(lease.conn.remember_statement(key, 77, 1))
    sent = execute(77, params=1, types=LONGLONG, values=struct.pack("<q", 5))
    assert lease.conn.writes == [sent]
    lease.conn.respond(my.ok())
    assert s.packets() == [(1, my.ok())] and lease.released
    # flag 0 on yet another connection: the types this session bound go with it
    s.send(execute(stmt_id, params=1, values=struct.pack("<q", 6)))
    other = s.pool.give()
    [(key, _, d)] = other.conn.prepares
    d.callback(other.conn.remember_statement(key, 78, 1))
    assert other.conn.writes == [execute(78, params=1, types=LONGLONG, values=struct.pack("<q", 6))]
    other.conn.respond(my.ok())
    # back on that connection, whose statement holds those types: sent as it came
    s.pool.idle.append(s.pool.new_lease())
    s.pool.idle[0].conn = other.conn
    other.conn.writes.clear()
    s.send(execute(stmt_id, params=1, values=struct.pack("<q", 7)))
    assert other.conn.prepares[1:] == []
    assert other.conn.writes == [execute(78, params=1, values=struct.pack("<q", 7))]


def test_another_sessions_types_on_the_connection_are_replaced_by_this_sessions(s):
    stmt_id, lease = prepared(s)
    conn = lease.conn
    key = S.prepare_key(b"SELECT ?", conn.database, conn.current)
    conn.statements.get(key).types = b"\xfd\x00"  # bound with a string by another session
    s.frontend._ps.by_id[stmt_id].types = LONGLONG  # this session bound a number before
    reuse = s.pool.new_lease()
    reuse.conn = conn
    s.pool.idle.append(reuse)
    s.send(execute(stmt_id, params=1, values=struct.pack("<q", 8)))
    assert conn.writes[-1] == execute(41, params=1, types=LONGLONG, values=struct.pack("<q", 8))
    assert conn.statements.get(key).types == LONGLONG


def test_a_statement_the_database_no_longer_accepts_answers_the_execute(s):
    stmt_id, _ = prepared(s)
    s.send(execute(stmt_id, params=1, types=LONGLONG, values=struct.pack("<q", 5)))
    lease = s.pool.give()
    err = P.err_packet(1146, "42S02", "Table 'appdb.t' doesn't exist")
    lease.conn.prepares[0][2].errback(DatabaseError(err))
    assert s.packets() == [(1, err)]
    assert lease.released and lease.release_args["clean"] and not s.closed
    assert lease.conn.writes == []
    s.send(my.command(P.COM_PING))  # the session goes on
    assert s.packets() == [(1, P.ok_packet(status=AC))]


def test_a_statement_answered_by_the_proxy_leaves_no_set_behind(s, monkeypatch):
    """The SET autocommit that was to go ahead of the execute (sync_inline) is dropped with it
    when the proxy answers the execute itself: never sent later with another command."""
    stmt_id, _ = prepared(s)
    s.send(my.query("SET autocommit = 0"))
    s.pool.give().conn.respond(my.ok(status=0))
    assert s.packets() == [(1, my.ok(status=0))] and s.frontend.desired["autocommit"] == "0"
    monkeypatch.setattr(my.FakeConn, "sync_inline",
                        lambda self, desired, database: my.query("SET autocommit=0"))
    s.send(execute(stmt_id, params=1, types=LONGLONG, values=bytes(8)))
    lease = s.pool.give()
    assert s.frontend._inline_sync is not None
    err = P.err_packet(1146, "42S02", "Table 'appdb.t' doesn't exist")
    lease.conn.prepares[0][2].errback(DatabaseError(err))
    assert s.packets() == [(1, err)]
    assert s.frontend._inline_sync is None and lease.conn.inline_cancelled
    assert lease.conn.writes == []


def test_a_statement_is_not_prepared_again_in_another_context(s):
    stmt_id, _ = prepared(s)
    s.send(my.query("SET sql_mode = 'ANSI_QUOTES'"))
    lease = s.pool.give()
    lease.conn.respond(my.ok())
    s.packets()
    s.send(execute(stmt_id, params=1, types=LONGLONG, values=struct.pack("<q", 5)))
    other = s.pool.give()
    assert other.conn.prepares == []
    [(seq, payload)] = s.packets()
    assert seq == 1 and my.err(payload)[:2] == (1615, "HY000")


def test_a_prepare_lost_with_its_connection_leaves_the_next_answer_alone(s):
    """The id rewriting of a prepare's answer ends with that command, answered or not."""
    s.send(my.command(P.COM_STMT_PREPARE, b"SELECT ?"))
    lease = s.pool.give()
    s.frontend.backend_lost(lease.conn, "the database went away")
    [(_, payload)] = s.packets()
    assert my.err(payload)[0] == 2013 and not s.closed
    s.send(my.query("UPDATE t SET v = 1"))
    other = s.pool.give()
    answer = b"\x00\x03\x00" + struct.pack("<HH", AC, 0) + P.encode_lenenc_str(b"Rows matched: 3")
    other.conn.respond(answer)
    assert s.packets() == [(1, answer)]


def test_ids_are_the_sessions_own(s):
    stmt_id, _ = prepared(s)
    s.send(execute(stmt_id + 1))
    [(_, payload)] = s.packets()
    assert my.err(payload)[0] == 1243 and s.pool.requests == []
    # closing forgets the id; the server is not asked (the statement stays for others)
    s.send(my.command(P.COM_STMT_CLOSE, struct.pack("<I", stmt_id)) + my.command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))] and s.pool.requests == []
    s.send(execute(stmt_id))
    assert my.err(s.packets()[0][1])[0] == 1243


def test_a_session_holds_a_bounded_number_of_statements(s, monkeypatch):
    from txrdsproxy.proxy import mysql_statements
    monkeypatch.setattr(mysql_statements, "MAX_PER_SESSION", 2)
    prepared(s)
    prepared(s, b"SELECT ?, ?", params=2)
    s.send(my.command(P.COM_STMT_PREPARE, b"SELECT 3"))
    [(seq, payload)] = s.packets()
    assert seq == 1 and my.err(payload)[:2] == (1461, "42000") and s.pool.requests == []
    s.send(my.command(P.COM_STMT_CLOSE, struct.pack("<I", 1)))
    prepared(s, b"SELECT ?, ?, ?", params=3)  # one closed: room again


def test_a_session_keeps_a_bounded_number_of_text_bytes_then_pins(s, monkeypatch):
    """Texts kept to prepare elsewhere are bounded per session (not 16382 x 64 KiB): past the
    budget the prepare goes to the connection and pins there, as a text too long to keep."""
    from txrdsproxy.proxy import mysql_statements
    monkeypatch.setattr(mysql_statements, "MAX_TEXT_BYTES", 20)
    prepared(s, b"SELECT ?, 1")  # 11 bytes kept
    s.send(my.command(P.COM_STMT_PREPARE, b"SELECT ?, 2"))  # 22 > 20: not kept, pins
    lease = s.pool.give()
    lease.conn.respond(my.prepare_ok(stmt_id=42, params=1), my.coldef(), seq=1)
    [(seq, first)] = s.packets()[:1]
    assert seq == 1 and first[0] == 0 and struct.unpack("<I", first[1:5])[0] == 2
    assert s.frontend.pin_reason is PinReason.PREPARED_STATEMENT and not lease.released
    assert s.frontend._ps.text_bytes == 11


def test_closed_statements_give_their_text_bytes_back(s, monkeypatch):
    from txrdsproxy.proxy import mysql_statements
    monkeypatch.setattr(mysql_statements, "MAX_TEXT_BYTES", 20)
    for n in range(4):
        stmt_id, _ = prepared(s, b"SELECT ?, %d" % n)  # 11 bytes each, one held at a time
        s.send(my.command(P.COM_STMT_CLOSE, struct.pack("<I", stmt_id)))
    assert s.frontend.pin_reason is None and s.frontend._ps.text_bytes == 0


def test_the_last_prepared_statement_id_names_the_sessions_last(s):
    prepared(s)
    second, _ = prepared(s, b"SELECT ?, ?", server_id=42, params=2)
    s.send(execute(0xFFFFFFFF, params=2, types=LONGLONG * 2, values=bytes(16)))
    lease = s.pool.give()
    [(_, sql, d)] = lease.conn.prepares
    assert sql == b"SELECT ?, ?"
    d.errback(DatabaseError(P.err_packet(1146, "42S02", "gone")))
    s.packets()
    # a failed prepare (MariaDB's prepare-and-execute pipelines it with id -1): -1 names nothing
    s.send(my.command(P.COM_STMT_PREPARE, b"SELECT nope"))
    s.pool.give().conn.respond(P.err_packet(1054, "42S22", "Unknown column 'nope'"))
    s.packets()
    s.send(execute(0xFFFFFFFF))
    assert my.err(s.packets()[0][1])[0] == 1243


@pytest.mark.parametrize("command", ["cursor", "long data", "pinning text"])
def test_what_keeps_state_on_one_connection_pins(s, command):
    sql = b"SET @a = ?" if command == "pinning text" else b"SELECT ?"
    stmt_id, _ = prepared(s, sql)
    assert s.frontend.pin_reason is None
    if command == "cursor":
        s.send(execute(stmt_id, params=1, types=LONGLONG, values=bytes(8), flags=1))
    elif command == "long data":
        s.send(my.command(P.COM_STMT_SEND_LONG_DATA, struct.pack("<IH", stmt_id, 0) + b"blob"))
    else:
        s.send(execute(stmt_id, params=1, types=LONGLONG, values=bytes(8)))
    lease = s.pool.give()
    [(key, _, d)] = lease.conn.prepares
    d.callback(lease.conn.remember_statement(key, 90, 1))
    expected = {"cursor": PinReason.PREPARED_STATEMENT, "long data": PinReason.PREPARED_STATEMENT,
                "pinning text": PinReason.USER_VARIABLE}[command]
    assert s.frontend.pin_reason is expected and s.frontend.state is SessionState.PINNED
    assert S.statement_id(lease.conn.writes[-1]) == 90
    if command != "pinning text":
        assert lease.conn.statements.get(key).keep  # never evicted while the session needs it


def test_a_pinned_sessions_execute_still_goes_under_the_connections_id(s):
    stmt_id, _ = prepared(s)
    s.send(my.query("SET @x = 1"))  # pins
    lease = s.pool.give()
    lease.conn.respond(my.ok())
    s.packets()
    s.send(execute(stmt_id, params=1, types=LONGLONG, values=bytes(8)))
    [(key, _, d)] = lease.conn.prepares
    d.callback(lease.conn.remember_statement(key, 55, 1))
    assert lease.conn.writes[-1] == execute(55, params=1, types=LONGLONG, values=bytes(8))
    lease.conn.respond(my.ok())
    s.packets()
    s.send(execute(stmt_id, params=1, values=bytes(8)))  # held connection, statement there
    assert lease.conn.writes[-1] == execute(55, params=1, values=bytes(8))


def test_the_client_leaving_while_a_statement_is_prepared_gives_no_connection_back_clean(s):
    stmt_id, _ = prepared(s)
    s.send(execute(stmt_id, params=1, types=LONGLONG, values=bytes(8)))
    lease = s.pool.give()
    lease.conn.busy = True  # the internal prepare runs
    s.frontend.connectionLost(None)
    assert lease.released and not lease.release_args["clean"]
    key, _, d = lease.conn.prepares[0]
    d.callback(lease.conn.remember_statement(key, 3, 1))  # nothing is sent for a gone session
    assert lease.conn.writes == []
