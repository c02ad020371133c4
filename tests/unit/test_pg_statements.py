"""StatementTracker: named prepared statements that follow a session across connections."""

import pytest

from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import ProtocolViolation, message, split_messages
from txrdsproxy.wire.pg.statements import PIN, StatementTracker


class Conn:
    def __init__(self):
        self.prepared, self.pending = set(), set()


def parse(name, sql, types=b"\0\0"):
    return message(b"P", name + b"\0" + sql + b"\0" + types)


def bind(stmt, portal=b"", rest=b"\0\0\0\0\0\0"):
    return message(b"B", portal + b"\0" + stmt + b"\0" + rest)


def describe(kind, name):
    return message(b"D", kind + name + b"\0")


def close(kind, name):
    return message(b"C", kind + name + b"\0")


EXECUTE = message(b"E", b"\0\0\0\0\0")
SYNC = message(b"S")
FLUSH = message(b"H")


def messages(data):
    out, used = split_messages(bytearray(data), 1 << 20)
    assert used == len(data)
    return [(bytes(k), p) for k, p in out]


def test_named_parse_gets_a_session_unique_server_name():
    t, conn = StatementTracker(7), Conn()
    out = t.rewrite(conn, parse(b"s1", b"select 1") + bind(b"s1") + EXECUTE + SYNC)
    assert messages(out) == [
        (b"P", b"txrds_7_0\0select 1\0\0\0"),
        (b"B", b"\0txrds_7_0\0\0\0\0\0\0\0"),
        (b"E", b"\0\0\0\0\0"),
        (b"S", b""),
    ]
    assert conn.pending == {b"txrds_7_0"}
    # ParseComplete for the client's own Parse is forwarded, not swallowed.
    assert t.parse_completed(conn) is False
    assert conn.prepared == {b"txrds_7_0"} and conn.pending == set()
    t.ready()


def test_unnamed_statements_pass_through_unchanged():
    t, conn = StatementTracker(1), Conn()
    data = parse(b"", b"select $1", b"\0\1\0\0\0\x17") + bind(b"") + EXECUTE + SYNC
    assert t.rewrite(conn, data) == data
    assert t.parse_completed(conn) is False  # still counted, so later ones line up
    t.ready()


def test_bind_on_another_connection_injects_a_parse_and_its_completion_is_swallowed():
    t, first, second = StatementTracker(3), Conn(), Conn()
    t.rewrite(first, parse(b"q", b"select $1::int", b"\0\1\0\0\0\x17") + SYNC)
    t.parse_completed(first)
    t.ready()
    out = t.rewrite(second, bind(b"q") + EXECUTE + SYNC)
    assert messages(out)[:2] == [
        (b"P", b"txrds_3_0\0select $1::int\0\0\1\0\0\0\x17"),
        (b"B", b"\0txrds_3_0\0\0\0\0\0\0\0"),
    ]
    assert t.parse_completed(second) is True
    assert second.prepared == {b"txrds_3_0"}
    t.ready()
    # Now prepared there: no second injection.
    assert t.rewrite(second, bind(b"q") + EXECUTE + SYNC)[:1] == b"B"


def test_describe_statement_is_rewritten_and_ensured():
    t, a, b = StatementTracker(2), Conn(), Conn()
    t.rewrite(a, parse(b"d", b"select 1") + SYNC)
    t.parse_completed(a)
    t.ready()
    out = messages(t.rewrite(b, describe(b"S", b"d") + SYNC))
    assert out[0][0] == b"P" and out[1] == (b"D", b"Stxrds_2_0\0")
    # Describe of a portal is left alone.
    portal = describe(b"P", b"d")
    assert t.rewrite(b, portal) == portal


def test_close_forgets_the_statement_and_closes_the_server_name():
    t, conn = StatementTracker(4), Conn()
    t.rewrite(conn, parse(b"c", b"select 1") + SYNC)
    t.parse_completed(conn)
    t.ready()
    out = t.rewrite(conn, close(b"S", b"c") + SYNC)
    assert messages(out)[0] == (b"C", b"Stxrds_4_0\0")
    assert b"txrds_4_0" not in conn.prepared and b"c" not in t.statements
    # Unknown names go through as sent: the server answers as PostgreSQL does.
    assert t.rewrite(conn, bind(b"c")) == bind(b"c")


def test_an_error_drops_the_rest_of_the_batch():
    t, conn = StatementTracker(5), Conn()
    t.rewrite(conn, parse(b"bad", b"selec oops") + parse(b"ok", b"select 1") + SYNC)
    t.error(conn)  # the first Parse failed: the second is skipped by the server
    assert conn.pending == set() and conn.prepared == set()
    t.ready()
    # A later ParseComplete belongs to a later batch, not to the dropped one.
    t.rewrite(conn, parse(b"", b"select 2") + SYNC)
    assert t.parse_completed(conn) is False


def test_batches_follow_ready_for_query_order():
    t, conn = StatementTracker(6), Conn()
    other = Conn()
    t.rewrite(other, parse(b"x", b"select 1") + SYNC)
    t.parse_completed(other)
    t.ready()
    # Two pipelined batches: the second injects a Parse.
    t.rewrite(conn, parse(b"", b"select 1") + SYNC + bind(b"x") + EXECUTE + SYNC)
    assert t.parse_completed(conn) is False  # batch 1's own Parse
    t.ready()
    assert t.parse_completed(conn) is True  # batch 2's injected Parse
    t.ready()


def test_parse_complete_without_a_parse_is_a_protocol_violation():
    t, conn = StatementTracker(1), Conn()
    with pytest.raises(ProtocolViolation):
        t.parse_completed(conn)


def test_sql_deallocate_of_a_tracked_name_is_rewritten():
    t, conn = StatementTracker(8), Conn()
    t.rewrite(conn, parse(b"_pg3_0", b"select 1") + SYNC)
    t.parse_completed(conn)
    t.ready()
    out = t.rewrite(conn, msg.query("DEALLOCATE _pg3_0"))
    assert messages(out) == [(b"Q", b"DEALLOCATE txrds_8_0\0")]
    assert t.statements == {} and conn.prepared == set()
    # Quoted names keep their case; a name the session does not own is not rewritten, and
    # the session must pin (it may be another session's statement on this connection).
    assert t.rewrite(conn, msg.query('DEALLOCATE "Nope"')) == msg.query('DEALLOCATE "Nope"')
    assert t.message(conn, ord("Q"), b'DEALLOCATE "Nope"\0') is PIN


def test_deallocate_all_and_discard_all_forget_everything():
    for sql in ("DEALLOCATE ALL", "deallocate prepare all;", "DISCARD ALL"):
        t, conn = StatementTracker(9), Conn()
        t.rewrite(conn, parse(b"a", b"select 1") + SYNC)
        t.parse_completed(conn)
        t.ready()
        assert t.rewrite(conn, msg.query(sql)) == msg.query(sql)
        assert t.statements == {} and conn.prepared == set()


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_messages_split_anywhere_give_the_same_bytes(step):
    data = parse(b"s", b"select 1") + bind(b"s") + EXECUTE + SYNC + bind(b"s") + EXECUTE + SYNC
    whole = StatementTracker(1).rewrite(Conn(), data)
    t, conn = StatementTracker(1), Conn()
    pieces = [t.rewrite(conn, data[i:i + step]) for i in range(0, len(data), step)]
    assert b"".join(pieces) == whole


def test_large_copy_data_passes_through_in_pieces():
    t, conn = StatementTracker(1), Conn()
    copy = message(b"d", b"x" * 100000)
    got = t.rewrite(conn, copy[:1000]) + t.rewrite(conn, copy[1000:50000]) + t.rewrite(conn, copy[50000:])
    assert got == copy


def test_sql_execute_of_a_protocol_statement_is_rewritten_and_ensured():
    t, first, second = StatementTracker(11), Conn(), Conn()
    t.rewrite(first, parse(b"foobar", b"select $1::int", b"\0\1\0\0\0\x17") + SYNC)
    t.parse_completed(first)
    t.ready()
    # On another connection: the statement is prepared first, and the EXECUTE names it.
    out = messages(t.rewrite(second, msg.query("EXECUTE foobar(42)")))
    assert out == [(b"P", b"txrds_11_0\0select $1::int\0\0\1\0\0\0\x17"),
                   (b"Q", b"EXECUTE txrds_11_0(42)\0")]
    assert t.parse_completed(second) is True  # swallowed, before the Query's ReadyForQuery
    t.ready()
    # Quoted names keep their case; names the session doesn't track are left alone.
    assert t.rewrite(second, msg.query('execute "FooBar"(1)')) == msg.query('execute "FooBar"(1)')


def test_a_statement_that_executes_another_brings_it_along():
    # asyncpg caches "EXECUTE foobar(1)" as a named statement of its own: moved to a new
    # connection, foobar must be prepared there first.
    t, first, second = StatementTracker(12), Conn(), Conn()
    t.rewrite(first, parse(b"foobar", b"select 1") + parse(b"wrap", b"EXECUTE foobar") + SYNC)
    t.parse_completed(first)
    t.parse_completed(first)
    t.ready()
    out = messages(t.rewrite(second, bind(b"wrap") + EXECUTE + SYNC))
    assert [k for k, _ in out] == [b"P", b"P", b"B", b"E", b"S"]
    assert out[0][1].startswith(b"txrds_12_0\0select 1")
    assert out[1][1].startswith(b"txrds_12_1\0EXECUTE txrds_12_0\0")
    assert t.parse_completed(second) is True and t.parse_completed(second) is True


# -- the proxy's own namespace (issue 6 item 8) -------------------------------------------------------
@pytest.mark.parametrize("name", [b"txrds_1_0", b"TXRDS_1_0", b"txrds_"])
def test_client_names_in_the_proxy_namespace_never_reach_the_server(name):
    """Another session's statement txrds_1_0 may be prepared on this connection: a session that
    never prepared that name must not bind, describe or close it."""
    t, conn = StatementTracker(2), Conn()
    conn.prepared.add(b"txrds_1_0")  # session 1's, on the shared connection
    for data in (bind(name), describe(b"S", name), close(b"S", name)):
        out = messages(t.rewrite(conn, data))
        assert len(out) == 1
        kind, body = out[0]
        assert b"txrds_1_0" not in body.lower() and b"txrds-" in body
    assert conn.prepared == {b"txrds_1_0"}


def test_a_parse_named_like_the_proxy_is_renamed_into_the_sessions_namespace():
    t, conn = StatementTracker(2), Conn()
    out = messages(t.rewrite(conn, parse(b"txrds_1_0", b"select 1") + bind(b"txrds_1_0")))
    assert out[0] == (b"P", b"txrds_2_0\0select 1\0\0\0")
    assert out[1][1].split(b"\0")[1] == b"txrds_2_0"


def test_deallocate_of_a_name_the_session_does_not_own_pins():
    t, conn = StatementTracker(2), Conn()
    for sql in (b"DEALLOCATE txrds_1_0", b"deallocate prepare other", b'DEALLOCATE "X"'):
        assert t.message(conn, ord("Q"), sql + b"\0") is PIN


def test_large_bind_is_renamed_on_its_prefix_and_the_rest_streams():
    t, conn = StatementTracker(3), Conn()
    t.rewrite(conn, parse(b"big", b"select $1::bytea", b"\0\1\0\0\0\x11") + SYNC)
    t.parse_completed(conn)
    t.ready()
    value = b"v" * 200000
    data = bind(b"big", rest=b"\0\0\0\1" + len(value).to_bytes(4, "big") + value + b"\0\0")
    out = b"".join(t.rewrite(conn, data[i:i + 8192]) for i in range(0, len(data), 8192))
    [(kind, body)] = messages(out)
    assert kind == b"B" and body.split(b"\0")[1] == b"txrds_3_0" and body.endswith(value + b"\0\0")


def test_a_parse_reusing_the_name_of_an_existing_statement_is_refused_by_the_server():
    # Directly, PostgreSQL answers 42P05 "prepared statement ... already exists" and the first
    # statement stays; the tracker must not quietly map the name to a new server statement (the
    # old one would stay prepared on its connections with nothing left to close it).
    t, a, b = StatementTracker(8), Conn(), Conn()
    t.rewrite(a, parse(b"foobar", b"select 1") + SYNC)
    assert t.parse_completed(a) is False
    t.ready()
    out = messages(t.rewrite(a, parse(b"foobar", b"select 2") + SYNC))
    assert out[0] == (b"P", b"txrds_8_0\0select 2\0\0\0")  # the same server name: the server refuses it
    t.error(a)
    t.ready()
    assert t.statements[b"foobar"] == (b"txrds_8_0", b"select 1\0\0\0") and a.prepared == {b"txrds_8_0"}
    # On a connection without the statement, it is prepared there first (swallowed), so the
    # client's Parse fails there too.
    out = messages(t.rewrite(b, parse(b"foobar", b"select 3") + SYNC))
    assert out[:2] == [(b"P", b"txrds_8_0\0select 1\0\0\0"), (b"P", b"txrds_8_0\0select 3\0\0\0")]
    assert t.parse_completed(b) is True
    t.error(b)
    t.ready()
    assert b.prepared == {b"txrds_8_0"} and b.pending == set()


def test_a_name_whose_parse_failed_or_was_closed_can_be_parsed_again():
    t, conn = StatementTracker(9), Conn()
    t.rewrite(conn, parse(b"s", b"selec oops") + SYNC)
    t.error(conn)  # the server refused it: the name is free, as directly
    t.ready()
    out = messages(t.rewrite(conn, parse(b"s", b"select 1") + SYNC))
    assert out[0] == (b"P", b"txrds_9_1\0select 1\0\0\0")
    assert t.parse_completed(conn) is False
    t.ready()
    t.rewrite(conn, close(b"S", b"s") + SYNC)
    t.ready()
    out = messages(t.rewrite(conn, parse(b"s", b"select 2") + SYNC))
    assert out[0] == (b"P", b"txrds_9_2\0select 2\0\0\0")


def test_an_error_naming_a_server_statement_names_the_clients():
    t, conn = StatementTracker(8), Conn()
    t.rewrite(conn, parse(b"foobar", b"select 1") + SYNC)
    t.parse_completed(conn)
    t.ready()
    body = b'SERROR\0C42P05\0Mprepared statement "txrds_8_0" already exists\0\0'
    assert t.client_error(body) == b'SERROR\0C42P05\0Mprepared statement "foobar" already exists\0\0'
    # Another session's names, and errors naming none, are left as they are.
    assert t.client_error(body.replace(b"txrds_8_0", b"txrds_81_0")) is None
    assert t.client_error(b"SERROR\0C42601\0Msyntax error\0\0") is None
