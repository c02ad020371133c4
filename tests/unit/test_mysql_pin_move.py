"""Moving a pinned MySQL/MariaDB session off a former writer: which statements keep it movable
(wire/mysql/replay.py), what the capture reads and the replay sets, and the session's flow
(proxy/pin_move.py, proxy/mysql_move.py) with fake connections and task.Clock."""

import pytest
from twisted.internet import defer

from tests.unit import test_mysql_frontend as mf
from txrdsproxy.proxy.mysql_backend import DatabaseError
from txrdsproxy.proxy.session import SessionState
from txrdsproxy.wire.mysql import errors
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.replay import USER_QUERY, NotMovable, Plan, ReplayLog, system_query, value_query

LEXING = {"ansi_quotes": False, "no_backslash_escapes": False, "oracle": False,
          "server_version": 101106}


def log_after(*texts, limit=65536):
    log = ReplayLog(limit)
    for text in texts:
        if not log.record(text.encode() if isinstance(text, str) else text, LEXING):
            break
    return log


# -- which statements keep a session movable ----------------------------------------------------------
@pytest.mark.parametrize("sql", [
    "SET @x = 1", "SELECT @x := 1", "SELECT 1 INTO @y", "SET SESSION div_precision_increment = 7",
    "SET @@session.sql_select_limit = 10, @a = 'x'", "SET NAMES utf8mb4, @a = 1",
    "SET GLOBAL max_connections = 10, @a = 1", "SET STATEMENT max_statement_time=1 FOR SELECT @a",
])
def test_variables_keep_the_session_movable(sql):
    assert log_after(sql).movable


@pytest.mark.parametrize("sql", [
    "SET @x = 1; CREATE TEMPORARY TABLE t (x int)", "SELECT GET_LOCK('l', 1), @x := 1",
    "SELECT LAST_INSERT_ID(), @x := 1", "SELECT SQL_CALC_FOUND_ROWS @x := 1", "PREPARE s FROM 'SELECT 1'",
    "LOCK TABLES t READ", "XA START 'x'", "BINLOG 'abc'", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET SESSION TRANSACTION READ ONLY", "SET ROLE admin", "SET timestamp = 1", "SET @@session.insert_id = 5",
    "SET @@last_insert_id = 5, @a = 1", "SET SESSION sql_log_bin = 0", "SET @x = 1; HANDLER t OPEN",
    "SELECT @x := 1 /* " + "x" * 17000 + " */",
])
def test_anything_else_makes_the_log_refuse_for_good(sql):
    log = log_after("SET @a = 1", sql, "SET @b = 2")
    assert not log.movable and log.names == set()


def test_the_session_variables_it_set_are_kept_by_name_within_the_limit():
    log = log_after("SET SESSION a_b = 1, @@c = 2, @@global.d = 3, LOCAL e = 4, @@session.F = 5, @u = 6")
    assert log.names == {"a_b", "c", "e", "f"}
    assert not log_after("SET SESSION aaaa = 1, bbbb = 2", limit=10).movable
    assert b"'A_B'" in log.system_query() and b"'F'" in log.system_query()


# -- the capture and the replay ---------------------------------------------------------------------
SYSTEM = [["CHARACTER_SET_CLIENT", "75746638", "ENUM"], ["DIV_PRECISION_INCREMENT", "37", "BIGINT UNSIGNED"],
          ["OPTIMIZER_SWITCH", "613D6F6666", "FLAGSET"], ["SQL_SELECT_LIMIT", None, "BIGINT UNSIGNED"]]
USERS = [["62", "VARCHAR", "binary"], ["64", "DECIMAL", "latin1"], ["69", "INT", "latin1"],
         ["6E", "VARCHAR", "binary"], ["73", "VARCHAR", "utf8mb4"]]  # names as HEX(VARIABLE_NAME)
VALUES = [["00FF", "binary", "\x00\xff", "0", "312E3530", "binary", "1.50", "0", "2D3432", "binary", "-42", "0",
           None, "binary", None, "1", "C3A9", "utf8mb4_bin", "\u00e9", "0"]]


def test_the_plan_sets_what_was_read_and_leaves_tracked_variables_to_the_sync():
    plan = log_after("SET @s = 1").plan(SYSTEM, USERS, VALUES)
    assert plan.replay_sql == (
        b"SET SESSION `div_precision_increment` = 7,"
        b" SESSION `optimizer_switch` = CONVERT(X'613D6F6666' USING utf8mb4), SESSION `sql_select_limit` = NULL,"
        b" @`b` = X'00FF', @`d` = 1.50, @`i` = -42, @`n` = NULL,"
        b" @`s` = CONVERT(X'C3A9' USING utf8mb4) COLLATE utf8mb4_bin")
    plan.check(SYSTEM, USERS, VALUES)
    with pytest.raises(NotMovable):
        plan.check(SYSTEM[1:], USERS, VALUES)  # a tracked value differs after the sync
    with pytest.raises(NotMovable):
        plan.check(SYSTEM, USERS[:-1], [VALUES[0][:-4]])


@pytest.mark.parametrize("name", ["\u20ac`) AS a, 'x', 'y', (@pwn := 1) #", "\u00e9", "a\x00b", "tab\t"])
def test_a_user_variable_name_that_is_not_printable_ascii_is_not_read(name):
    """Sent as UTF-8 in the session's character_set_client (gbk: 0xAC swallows a backtick;
    latin1: another variable), such a name is never put in a query: the session does not move."""
    with pytest.raises(NotMovable):
        value_query([[name.encode().hex(), "INT", "latin1"]])


@pytest.mark.parametrize("system, users, values", [
    ([["TIMESTAMP", "31", "DOUBLE"]], [], []),  # a session-only variable
    ([], [["72", "DOUBLE", "binary"]], [["40", "binary", "1.5", "0"]]),  # REAL: its text is not exact
    ([], [["73", "VARCHAR", "utf8mb4"]], [["41", "x; DROP", "A", "0"]]),  # an odd collation name
    ([], [["73", "VARCHAR", "utf8mb4"]], []),  # no values
    ([], [["69", "INT", "latin1"]], [["31", "binary", "1 OR 1", "0"]]),
    # names that are not printable ASCII: UTF-8 (read otherwise in latin1/gbk), control, not hex
    ([], [["E282AC60", "INT", "latin1"]], [["31", "binary", "1", "0"]]),
    ([], [["C3A9", "INT", "latin1"]], [["31", "binary", "1", "0"]]),
    ([], [["610A", "INT", "latin1"]], [["31", "binary", "1", "0"]]),
    ([], [["00", "INT", "latin1"]], [["31", "binary", "1", "0"]]),
    ([], [["", "INT", "latin1"]], [["31", "binary", "1", "0"]]),
    ([], [[None, "INT", "latin1"]], [["31", "binary", "1", "0"]]),
    ([], [["s", "INT", "latin1"]], [["31", "binary", "1", "0"]]),
])
def test_a_capture_that_cannot_be_replayed_exactly_is_refused(system, users, values):
    with pytest.raises(NotMovable):
        log_after("SET @s = 1").plan(system, users, values)


def test_user_variable_names_are_quoted():
    assert value_query([[b"we`ird".hex(), "INT", "latin1"]]) == (
        b"SELECT HEX(@`we``ird`), COLLATION(@`we``ird`), CAST(@`we``ird` AS CHAR), @`we``ird` IS NULL")
    assert Plan([], [("we`ird", "INT", "latin1", "31", "binary", "1")]).replay_sql == b"SET @`we``ird` = 1"


# -- the session's move ---------------------------------------------------------------------------------
class Conn(mf.FakeConn):
    """FakeConn with internal queries: each recorded with its Deferred, fired by the test."""

    def __init__(self, key, connector):
        super().__init__(key, connector)
        self.internal = []

    def query(self, sql):
        d = defer.Deferred()
        self.internal.append((bytes(sql), d))
        return d


class Harness(mf.Harness):
    def __init__(self, **extra):
        super().__init__(**extra)
        self.pool.make_conn = lambda key: Conn(key, self.connector)


def answer_capture(conn, system=SYSTEM[:2], users=USERS[2:3], values=[VALUES[0][8:12]]):
    """Answer the three capture queries, in order."""
    for expected, rows in ((system_query(set()), system), (USER_QUERY, users), (None, values)):
        sql, d = conn.internal.pop(0)
        if expected is not None:
            assert sql.startswith(expected[:60])
        d.callback(rows)


def pinned(split=False):
    s = Harness()
    s.login()
    data = mf.query("SET @i = -42")
    if split:
        for i in range(len(data)):
            s.send(data[i:i + 1])
    else:
        s.send(data)
    lease = s.pool.give()
    lease.conn.respond(mf.ok(mf.AC))
    s.packets()
    assert s.frontend.state is SessionState.PINNED and s.frontend.replay_log() is not None
    return s, lease


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_a_session_pinned_by_variables_moves_before_its_next_command(split):
    s, lease = pinned(split)
    assert s.frontend.drain("writer changed") is True
    s.send(mf.query("SELECT @i"))  # held while the old connection is read
    answer_capture(lease.conn)
    assert lease.released and lease.release_args["clean"] is False
    assert lease.conn.writes == [mf.query("SET @i = -42")]  # nothing more reached the old writer
    new = s.pool.give()
    sql, d = new.conn.internal.pop(0)
    assert sql == b"SET SESSION `div_precision_increment` = 7, @`i` = -42"
    d.callback([])
    answer_capture(new.conn)
    assert new.conn.writes == [mf.query("SELECT @i")]
    assert s.frontend.state is SessionState.PINNED and s.frontend.lease is new
    assert s.packets() == []  # none of the replay's answers


def test_a_capture_the_server_cannot_answer_ends_the_session_as_before():
    s, lease = pinned()
    assert s.frontend.drain("writer changed") is True
    lease.conn.internal.pop(0)[1].errback(DatabaseError(P.err_packet(1109, "42S02", "Unknown table")))
    [(seq, payload)] = s.packets()
    assert seq == 0 and payload == errors.writer_changed() and s.closed


def test_a_replay_that_fails_ends_the_session_with_its_reason():
    s, lease = pinned()
    assert s.frontend.drain("writer changed") is True
    answer_capture(lease.conn)
    s.send(mf.query("SELECT 1"))
    new = s.pool.give()
    new.conn.internal.pop(0)[1].errback(DatabaseError(P.err_packet(1227, "42000", "Access denied")))
    [(seq, payload)] = s.packets()
    code, state, message = mf.err(payload)
    assert (seq, code, state) == (0, 1053, "08S01") and "replaying its session state" in message
    assert "Access denied" in message and s.closed
    assert new.released and new.release_args["clean"] is False and new.conn.writes == []


def test_a_later_pin_that_is_not_a_query_stops_the_recording():
    s = Harness()
    s.login()
    s.send(mf.query("SET @i = 1"))
    lease = s.pool.give()
    lease.conn.respond(mf.ok(mf.AC))
    s.send(mf.command(P.COM_STMT_PREPARE, b"SELECT 1"))  # a later pin that cannot move
    assert s.frontend.replay_log() is None
    s.packets()


def test_a_command_pipelined_behind_commit_reaches_only_the_new_writer():
    data = mf.query("COMMIT") + mf.query("SELECT @i")
    for cut in range(len(data) + 1):
        s, lease = pinned()
        s.send(mf.query("BEGIN"))
        lease.conn.respond(mf.ok(mf.AC | mf.INTX))
        s.packets()
        assert s.frontend.drain("writer changed") is False  # in a transaction: at its boundary
        for piece in (data[:cut], data[cut:]):
            if piece:
                s.send(piece)
        lease.conn.respond(mf.ok(mf.AC))  # COMMIT's answer: the boundary
        answer_capture(lease.conn)
        assert lease.conn.writes[-1] == mf.query("COMMIT"), cut  # nothing after it went there
        new = s.pool.give()
        new.conn.internal.pop(0)[1].callback([])
        answer_capture(new.conn)
        assert new.conn.writes == [mf.query("SELECT @i")], cut
        assert [seq for seq, _ in s.packets()] == [1], cut  # COMMIT's OK only


def test_the_client_leaving_while_its_variables_are_replayed_leaves_none_to_the_next_session():
    """The replay SET the session's variables on the new connection: a client that left
    meanwhile must not hand them (user variables, foreign_key_checks...) to the next borrower."""
    s, lease = pinned()
    assert s.frontend.drain("writer changed") is True
    answer_capture(lease.conn)
    s.send(mf.query("SELECT @i"))
    new = s.pool.give()
    s.lose()
    new.conn.internal.pop(0)[1].callback([])
    answer_capture(new.conn)
    assert new.released and new.conn.writes == []
    assert new.release_args["clean"] is False or (new.release_args["needs_reset"] and new.conn.session_dirty)
