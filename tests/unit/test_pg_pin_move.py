"""Moving a pinned PostgreSQL session off a former writer: what is recorded (wire/pg/replay.py,
the ClientStream's recorder, split at every byte), what the capture decides, and the session's
flow (proxy/pin_move.py, proxy/pg_move.py) with fake connections and task.Clock."""

import json

import pytest

from tests.unit.test_pg_frontend import Harness, fatal
from txrdsproxy.proxy.pg_backend import DatabaseError
from txrdsproxy.proxy.session import SessionState
from txrdsproxy.wire.pg import errors
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import message
from txrdsproxy.wire.pg.frontend import ClientStream
from txrdsproxy.wire.pg.pinning import PinReason
from txrdsproxy.wire.pg.replay import CAPTURE_SQL, MOVABLE_REASONS, NotMovable, ReplayLog, quote_e

SYNC = message(b"S")


def parse(name, sql, types=()):
    body = name + b"\0" + sql + b"\0" + len(types).to_bytes(2, "big") + b"".join(
        t.to_bytes(4, "big") for t in types)
    return message(b"P", body), body


def capture(settings=(), statements=(), **counts):
    state = {"temp": 0, "cursors": 0, "locks": 0, "listen": 0,
             "settings": [list(s) for s in settings] or None,
             "statements": [list(s) for s in statements] or None}
    state.update(counts)
    return json.dumps(state)


def pinned_log(sql=b"SET work_mem = '8MB'", limit=65536):
    log = ReplayLog(limit)
    assert log.first(PinReason.SET_VARIABLE, sql, None, True)
    return log


# -- the replay log ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reason", list(PinReason))
def test_only_replayable_reasons_start_a_movable_log(reason):
    log = ReplayLog(65536)
    sql = {PinReason.SET_VARIABLE: b"SET a = 1", PinReason.RESET: b"RESET a",
           PinReason.PREPARED_STATEMENT: b"PREPARE p AS SELECT 1"}.get(reason, b"SELECT 1")
    assert log.first(reason, sql, None, True) is (reason in MOVABLE_REASONS)
    assert (log.why_not is None) is (reason in MOVABLE_REASONS)


@pytest.mark.parametrize("sql", [
    b"SET a = 1; CREATE TEMP TABLE t (x int)",  # a later statement of the same text
    b"SELECT set_config('a', 'b', false), nextval('s')",  # a later reason in the same statement
    b"SELECT pg_advisory_lock(1)", b"LISTEN ch", b"DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    b"DISCARD ALL", b"LOAD 'x'", b"DO $$ BEGIN END $$", b"UPDATE pg_settings SET setting = 1",
    b"PREPARE p AS SELECT 1; SELECT 2",  # the PREPARE could not be replayed alone
    b"PREPARE p AS SELECT nextval('s')",  # what EXECUTE p would do pins
    b"EXECUTE txrds_1_0",  # the proxy's own statements
    b"SELECT '" + b"x" * 16385 + b"'",
])
def test_a_statement_that_cannot_be_replayed_makes_the_log_refuse_for_good(sql):
    log = pinned_log()
    assert log.record(sql, None, True) is False
    assert not log.movable and log.kept == {}
    assert log.record(b"SELECT 1", None, True) is False


def test_sets_are_not_kept_prepares_and_named_parses_are():
    log = pinned_log()
    assert log.record(b"SELECT set_config('a', 'b', false); RESET b; SELECT 1", None, True)
    assert log.kept == {}
    assert log.record(b"  PREPARE \"Q\" (int) AS SELECT $1;", None, True)
    _, body = parse(b"s1", b"SELECT $1", [23])
    assert log.record(b"SELECT $1", body, True)
    assert log.kept == {(b"Q", b"Q"): b"  PREPARE \"Q\" (int) AS SELECT $1;", (b"P", b"s1"): body}


def test_a_named_parse_whose_statement_pins_is_refused():
    _, body = parse(b"s1", b"SELECT pg_advisory_lock(1)")
    assert pinned_log().record(b"SELECT pg_advisory_lock(1)", body, True) is False
    _, body = parse(b"txrds_1_0", b"SELECT 1")
    assert pinned_log().record(b"SELECT 1", body, True) is False


def test_the_log_is_bounded_and_a_name_prepared_again_replaces_its_entry():
    log = pinned_log(limit=100)
    _, body = parse(b"s1", b"SELECT 1")
    for _ in range(50):
        assert log.record(b"SELECT 1", body, True)
    assert log.size == len(body) + 2
    _, big = parse(b"s2", b"SELECT '" + b"x" * 100 + b"'")
    assert log.record(b"SELECT 'x...'", big, True) is False
    assert "MaxSessionReplaySize (100 bytes)" in log.why_not


def test_a_backslash_while_standard_conforming_strings_is_unknown_refuses():
    assert pinned_log().record(b"SELECT 'a\\'", None, None) is False
    assert pinned_log().record(b"SELECT 'a'", None, None) is True


# -- the capture ------------------------------------------------------------------------------------
@pytest.mark.parametrize("held", ["temp", "cursors", "locks", "listen"])
def test_state_the_server_reports_that_cannot_move_is_refused(held):
    with pytest.raises(NotMovable):
        pinned_log().plan(capture(**{held: 1}))


@pytest.mark.parametrize("captured", [
    capture(settings=[("role", "admin")]), capture(settings=[("session_authorization", "x")]),
    capture(statements=[("s9", "SELECT 9", False)]),  # not one the proxy saw
    capture(statements=[("p", "PREPARE p AS SELECT 2", True)]),  # another text than recorded
    "{\"settings\": [[\"a\", \"\ufffd\"]]}", "not json", "[]",
])
def test_a_capture_that_does_not_match_the_log_is_refused(captured):
    log = pinned_log()
    assert log.record(b"PREPARE p AS SELECT 1", None, True)
    with pytest.raises(NotMovable):
        log.plan(captured)


def test_the_plan_replays_settings_prepares_and_parses_and_checks_them():
    log = pinned_log()
    assert log.record(b"PREPARE p AS SELECT 1", None, True)
    raw, body = parse(b"s1", b"SELECT $1", [23])
    assert log.record(b"SELECT $1", body, True)
    settings = [("search_path", "\"$user\", it's\\here"), ("work_mem", "8192")]
    statements = [("p", "PREPARE p AS SELECT 1", True), ("s1", "SELECT $1", False),
                  ("txrds_5_1", "SELECT 2", False)]  # the statement tracker's: left alone
    plan = log.plan(capture(settings, statements))
    assert plan.settings_sql == (
        b"RESET ALL; SELECT pg_catalog.set_config(E'search_path', E'\"$user\", it\\'s\\\\here', false),"
        b" pg_catalog.set_config(E'work_mem', E'8192', false)")
    assert plan.prepare_queries == [b"PREPARE p AS SELECT 1"]
    assert plan.parse_messages == raw + SYNC
    plan.check(capture(settings, statements))
    with pytest.raises(NotMovable):
        plan.check(capture(settings[:1], statements))
    with pytest.raises(NotMovable):
        plan.check(capture(settings, statements[:1]))
    for changed in (("p", "PREPARE p AS SELECT 1 ", True), ("s1", "SELECT $1::text", False)):
        # the same names, a text the server read otherwise (e.g. in another client_encoding)
        with pytest.raises(NotMovable, match="prepared statements differ"):
            plan.check(capture(settings, [changed] + [s for s in statements if s[0] != changed[0]]))


def test_quote_e_reads_the_same_under_either_standard_conforming_strings():
    assert quote_e("a'b\\c") == "E'a\\'b\\\\c'"


# -- the stream records a pinned session's messages, split at every byte ------------------------------
class Conn:
    def __init__(self):
        self.prepared, self.pending = set(), set()
        self.server_params = {"standard_conforming_strings": "on"}


def recorded(chunks, limit=65536):
    s = ClientStream(1 << 20)
    s.replay_limit = limit
    s.attach(Conn(), lambda data: None)
    for chunk in chunks:
        s.feed(chunk)
    return s


PINNED_STREAM = (msg.query("SET work_mem = '8MB'") + parse(b"s1", b"SELECT $1", [23])[0]
                 + message(b"B", b"p1\0s1\0\0\0\0\0\0\0") + message(b"E", b"p1\0\0\0\0\0") + SYNC
                 + msg.query("PREPARE p AS SELECT 1"))


def test_a_pinned_session_is_recorded_the_same_whatever_the_split():
    whole = recorded([PINNED_STREAM])
    assert whole.pin_reason is PinReason.SET_VARIABLE
    assert set(whole.recorder.kept) == {(b"P", b"s1"), (b"Q", b"p")}
    for i in range(1, len(PINNED_STREAM)):
        s = recorded([PINNED_STREAM[:i], PINNED_STREAM[i:]])
        assert s.recorder.kept == whole.recorder.kept, i
        s = recorded([PINNED_STREAM[j:j + 1] for j in range(len(PINNED_STREAM))][:i] + [PINNED_STREAM[i:]])
        assert s.recorder.kept == whole.recorder.kept, i


def test_a_later_unmovable_statement_stops_the_recording_whatever_the_split():
    stream = PINNED_STREAM + msg.query("CREATE TEMP TABLE t (x int)")
    for i in range(1, len(stream)):
        s = recorded([stream[:i], stream[i:]])
        assert s.recorder is None and s.pin_reason is PinReason.SET_VARIABLE, i


def test_no_recording_without_a_limit_or_for_an_unmovable_first_pin():
    assert recorded([PINNED_STREAM], limit=0).recorder is None
    assert recorded([msg.query("LISTEN ch") + PINNED_STREAM]).recorder is None
    assert recorded([msg.query("SELECT 1")]).recorder is None  # not pinned: nothing at all


def test_fast_paths_record_too():
    s = recorded([msg.query("SET a = 1")])
    assert s.take_query(msg.query("PREPARE p AS SELECT 1"))
    assert set(s.recorder.kept) == {(b"Q", b"p")}
    batch = parse(b"s2", b"SELECT 2")[0] + message(b"B", b"\0s2\0\0\0\0\0\0\0") + SYNC
    assert s.take_batch(batch)
    assert set(s.recorder.kept) == {(b"Q", b"p"), (b"P", b"s2")}
    assert s.take_query(msg.query("SELECT pg_advisory_lock(1)"))
    assert s.recorder is None


def test_a_fast_path_pin_by_a_named_parse_starts_the_recording():
    s = recorded([])
    assert s.take_batch(parse(b"s1", b"SELECT 1")[0] + SYNC)
    assert s.pin_reason is PinReason.PREPARED_STATEMENT and set(s.recorder.kept) == {(b"P", b"s1")}


# -- the session's move --------------------------------------------------------------------------------
def pinned_session(**extra):
    """A logged-in session pinned by a SET and a named statement, between transactions."""
    h = Harness(**extra)
    h.login()
    h.send(msg.query("SET work_mem = '8MB'"))
    lease = h.pool.give()
    h.frontend.ready_for_query(b"I")
    h.send(parse(b"s1", b"SELECT 1")[0] + SYNC)
    h.frontend.ready_for_query(b"I")
    assert h.frontend.state is SessionState.PINNED
    h.sent()
    lease.conn.transport.clear()
    lease.conn.client_params = {"application_name": "x"}  # what the proxy set there
    return h, lease


CAPTURED = capture([("work_mem", "8192")], [("s1", "SELECT 1", False)])


def moved(h, lease):
    """drain -> the capture on the old connection, answered: the session waits, IDLE."""
    assert h.frontend.drain("writer changed") is True
    [(sent, d)] = lease.conn.internal
    assert sent == msg.query(CAPTURE_SQL)
    assert h.frontend.state is SessionState.PINNED  # holds the old connection while reading it
    assert h.frontend.drain("writer changed") is True  # asked again meanwhile: nothing more
    d.callback([[CAPTURED]])
    assert lease.released and lease.release_args["clean"] is False


def test_a_movable_session_is_read_on_the_old_writer_and_replayed_before_its_next_request():
    h, lease = pinned_session()
    moved(h, lease)
    assert h.frontend.state is SessionState.IDLE and not h.closed and h.sent() == b""
    h.send(msg.query("SHOW work_mem"))
    new = h.pool.give()
    ops = new.conn.internal
    assert [op[0] for op in ops] == [msg.query(b"RESET ALL; SELECT pg_catalog.set_config("
                                               b"E'work_mem', E'8192', false)")]
    ops[0][1].callback([])
    assert ops[1][0] == parse(b"s1", b"SELECT 1")[0] + SYNC
    ops[1][1].callback([])
    assert ops[2][0] == msg.query(CAPTURE_SQL)
    assert new.conn.transport.value() == b""  # nothing of the client yet
    ops[2][1].callback([[CAPTURED]])
    assert new.conn.synced  # then the session's parameters
    assert h.frontend.state is SessionState.PINNED and h.frontend.lease is new
    assert new.conn.transport.value() == msg.query("SHOW work_mem")
    assert h.sent() == b""  # the replay's answers never reach the client


def test_a_request_sent_while_the_old_writer_is_read_is_held_for_the_new_one():
    h, lease = pinned_session()
    assert h.frontend.drain("writer changed") is True
    h.send(msg.query("SELECT 1"))
    assert lease.conn.transport.value() == b""
    [(_, d)] = lease.conn.internal
    d.callback([[CAPTURED]])
    new = h.pool.give()  # borrowed at once for the held request
    for op in new.conn.internal:
        op[1].callback([[CAPTURED]] if op[0] == msg.query(CAPTURE_SQL) else [])
    assert new.conn.transport.value() == msg.query("SELECT 1")
    assert lease.conn.transport.value() == b""


@pytest.mark.parametrize("answer", [[[capture(temp=1)]], DatabaseError({"C": "25006", "M": "read-only"})])
def test_a_capture_that_refuses_or_fails_ends_the_session_as_before(answer):
    h, lease = pinned_session()
    assert h.frontend.drain("writer changed") is True
    [(_, d)] = lease.conn.internal
    d.errback(answer) if isinstance(answer, Exception) else d.callback(answer)
    assert h.closed and h.sent() == errors.WRITER_CHANGED
    assert lease.released


def test_a_replay_that_fails_ends_the_session_with_its_reason():
    h, lease = pinned_session()
    moved(h, lease)
    h.send(msg.query("SELECT 1"))
    new = h.pool.give()
    new.conn.internal[0][1].errback(DatabaseError({"C": "22023", "M": "invalid value for parameter"}))
    assert h.closed
    fields = fatal(h.sent())
    assert fields["C"] == "08006" and "replaying its session state on the new writer failed" in fields["M"]
    assert "invalid value for parameter" in fields["M"]
    assert new.released and new.release_args["clean"] is False
    assert new.conn.transport.value() == b""  # the request never went anywhere


def test_a_borrow_timeout_after_the_move_keeps_the_plan_for_the_next_request():
    from txrdsproxy.pool.pool import BorrowTimeout
    h, lease = pinned_session()
    moved(h, lease)
    h.send(msg.query("SELECT 1"))
    h.pool.refuse(BorrowTimeout())
    assert not h.closed and b"Timed-out waiting" in h.sent()
    h.send(msg.query("SELECT 1"))
    new = h.pool.give()
    assert new.conn.internal  # replayed on this one


def test_unmovable_or_moving_off_ends_at_once():
    h, lease = pinned_session(MaxSessionReplaySize=0)
    assert h.frontend.drain("writer changed") is True
    assert h.closed and h.sent() == errors.WRITER_CHANGED and not lease.conn.internal


def test_the_client_leaving_while_the_old_writer_is_read():
    h, lease = pinned_session()
    assert h.frontend.drain("writer changed") is True
    h.lose()
    [(_, d)] = lease.conn.internal
    d.callback([[CAPTURED]])
    assert lease.released and not h.pool.requests


def test_the_proxy_stopping_while_the_old_writer_is_read_ends_the_session_after():
    h, lease = pinned_session()
    assert h.frontend.drain("writer changed") is True
    assert h.frontend.drain() is False  # a move is under way: it ends after it
    [(_, d)] = lease.conn.internal
    d.callback([[CAPTURED]])
    assert h.frontend.drain() is True and h.closed
    assert h.sent() == errors.ADMIN_SHUTDOWN


# -- real backend connections: COMMIT and a request pipelined behind it, split at every byte -----------
def data_row(text):
    value = text.encode()
    return message(b"D", b"\0\1" + len(value).to_bytes(4, "big") + value)


class MoveServer:
    """A scripted PostgreSQL keeping a transaction status and the session's state the capture
    reports (a SET work_mem, named statements); `ran` lists what it executed."""

    def __new__(cls, conn, transport):
        from tests.unit import test_pg_pipelined_boundary as pb

        class Server(pb.TxnServer):
            def __init__(self, conn, transport):
                super().__init__(conn, transport)
                self.settings, self.statements = [], []

            def _run(self, sql):
                if sql == CAPTURE_SQL:
                    self.ran.append(b"<capture>")
                    return data_row(capture(self.settings, self.statements)) + message(b"C", b"SELECT 1\0")
                if sql.startswith(b"RESET ALL"):
                    self.ran.append(b"<replay>")
                    self.settings = [("work_mem", "8192")] if b"work_mem" in sql else []
                    return message(b"C", b"SELECT 1\0")
                if sql.startswith(b"SET work_mem"):
                    self.settings = [("work_mem", "8192")]
                return super()._run(sql)

            def reply(self, kind, body):
                if kind == b"P" and body[:1] != b"\0":
                    name, sql = body.split(b"\0")[:2]
                    self.statements.append((name.decode(), sql.decode(), False))
                return super().reply(kind, body)

        return Server(conn, transport)


def real_session():
    from tests.unit import test_pg_pipelined_boundary as pb
    from tests.unit import test_pg_release_boundary as rb

    class Pool(rb.Pool):
        server_class = MoveServer

    h = rb.fe.Harness()
    h.pool = h.ctx.pool = Pool()
    h.login()
    rb.run(h, [msg.query("SET work_mem = '8MB'")])  # pins; movable
    rb.run(h, [parse(b"s1", b"SELECT 1")[0] + SYNC])
    rb.run(h, [msg.query("BEGIN")])
    [old] = h.ctx.pool.servers
    h.messages()
    return h, old, pb


@pytest.mark.parametrize("stream", ["simple", "extended"])
def test_a_request_pipelined_behind_commit_reaches_the_new_writer_after_the_replay(stream):
    from tests.unit import test_pg_release_boundary as rb
    tail = msg.query("INSERT INTO t VALUES (2)") if stream == "simple" else (
        message(b"B", b"\0s1\0\0\0\0\0\0\0") + message(b"E", b"\0\0\0\0\0") + SYNC)
    data = msg.query("COMMIT") + tail
    for cut in range(len(data) + 1):
        h, old, pb = real_session()
        h.ctx.pool.retired.add(old)
        assert h.frontend.drain("writer changed") is False  # in a transaction: at its boundary
        rb.run(h, [data] if cut in (0, len(data)) else [data[:cut], data[cut:]])
        for _ in range(6):  # the round trips of the capture and the replay
            h.ctx.pool.step()
        servers = h.ctx.pool.servers
        assert servers[old].ran[-2:] == [b"COMMIT", b"<capture>"], cut
        [new] = [c for c in servers if c is not old]
        ran = servers[new].ran
        assert ran[:2] == [b"<replay>", b"<capture>"], (cut, ran)
        assert ran[2:] == ([b"INSERT INTO t VALUES (2)"] if stream == "simple" else [b"SELECT 1"]), (cut, ran)
        assert old.state == "closed" and not h.closed
        assert h.frontend.state is SessionState.PINNED and h.frontend.lease.conn is new
        kinds = rb.replies(h)
        assert kinds.count(b"Z") == 2 and b"E" not in kinds and b"D" not in kinds, (cut, kinds)


def test_max_session_replay_size_in_the_configuration():
    from txrdsproxy.config.load import ConfigError
    from tests.unit.test_pg_frontend import proxy_config
    assert proxy_config().max_session_replay_size == 65536
    assert proxy_config(MaxSessionReplaySize=0).max_session_replay_size == 0
    with pytest.raises(ConfigError, match="MaxSessionReplaySize: must be between 0 and 16777216"):
        proxy_config(MaxSessionReplaySize=-1)


def test_a_pinned_session_s_ordinary_statements_go_through_the_classifier_cache():
    from unittest import mock
    from txrdsproxy.wire.pg import replay
    log = pinned_log()
    with mock.patch.object(replay, "statement_reasons", side_effect=AssertionError("lexed")):
        assert log.record(b"SELECT * FROM t WHERE x = 1", None, True)
        assert log.record(b"UPDATE t SET x = 2", None, True)
    assert log.record(b"PREPARE p AS SELECT 1", None, True)  # a candidate: read statement by statement


def test_a_moved_session_can_move_again_at_the_next_switchover():
    h, lease = pinned_session()
    moved(h, lease)
    h.send(msg.query("SELECT 1"))
    new = h.pool.give()
    new.conn.client_params = {"application_name": "x"}
    for op in new.conn.internal:
        op[1].callback([[CAPTURED]] if op[0] == msg.query(CAPTURE_SQL) else [])
    new.conn.internal.clear()
    h.frontend.ready_for_query(b"I")  # the SELECT's answer
    assert h.frontend.drain("writer changed") is True  # the writer changes back
    [(sent, d)] = new.conn.internal
    assert sent == msg.query(CAPTURE_SQL)
    d.callback([[CAPTURED]])
    assert new.released and h.frontend.state is SessionState.IDLE and not h.closed
    h.send(msg.query("SELECT 2"))
    third = h.pool.give()
    assert third.conn.internal  # replayed there too, from what was recorded from the start


def test_a_parse_body_in_a_bytearray_or_memoryview_is_kept_as_bytes():
    _, body = parse(b"s1", b"SELECT 1")
    for view in (bytearray(body), memoryview(body)):
        log = pinned_log()
        assert log.record(b"SELECT 1", view, True)
        assert log.kept == {(b"P", b"s1"): body}


def test_statement_text_in_a_memoryview_is_read_as_bytes():
    assert pinned_log().record(memoryview(b"SELECT 'a\\'"), None, None) is False  # the backslash seen
    log = pinned_log()
    assert log.record(memoryview(b"PREPARE p AS SELECT 1"), None, True)
    assert log.kept == {(b"Q", b"p"): b"PREPARE p AS SELECT 1"}


@pytest.mark.parametrize("later", [b"SET search_path TO other", b"RESET ALL", b"SELECT set_config('DateStyle', 'SQL', false)"])
def test_a_setting_changed_after_a_statement_was_prepared_refuses(later):
    log = pinned_log()
    assert log.record(b"SET search_path TO app", None, True)  # before any statement: fine
    assert log.record(b"PREPARE p AS SELECT * FROM t", None, True)
    assert log.record(b"SET LOCAL work_mem = '1MB'", None, True)  # the transaction's only
    assert log.record(later, None, True) is False
    _, body = parse(b"s1", b"SET search_path TO other")
    assert pinned_log().record(b"SET search_path TO other", body, True) is False


def test_each_kept_prepare_is_replayed_as_a_query_of_its_own():
    """pg_prepared_statements.statement is the whole query string a PREPARE came in: two texts
    joined in one Query would each read as both, and the check (texts compared) would refuse."""
    log = pinned_log()
    assert log.record(b"PREPARE a AS SELECT 1", None, True)
    assert log.record(b"PREPARE b AS SELECT 2 -- trailing", None, True)
    statements = [("a", "PREPARE a AS SELECT 1", True), ("b", "PREPARE b AS SELECT 2 -- trailing", True)]
    plan = log.plan(capture([("work_mem", "8192")], statements))
    assert plan.prepare_queries == [b"PREPARE a AS SELECT 1", b"PREPARE b AS SELECT 2 -- trailing"]
    plan.check(capture([("work_mem", "8192")], statements))
    joined = "PREPARE a AS SELECT 1\n;\nPREPARE b AS SELECT 2 -- trailing"
    with pytest.raises(NotMovable):
        plan.check(capture([("work_mem", "8192")], [("a", joined, True), ("b", joined, True)]))


def test_the_client_leaving_while_its_state_is_replayed_leaves_no_state_to_the_next_session():
    """The replay made the session's settings and statements on the new connection: a client
    that left meanwhile must not hand them (search_path...) to whoever borrows it next."""
    h, lease = pinned_session()
    moved(h, lease)
    h.send(msg.query("SHOW work_mem"))
    new = h.pool.give()
    h.lose()
    ops = new.conn.internal
    ops[0][1].callback([])
    ops[1][1].callback([])
    ops[2][1].callback([[CAPTURED]])
    assert new.released
    assert new.release_args["clean"] is False or (new.release_args["needs_reset"] and new.conn.session_dirty)


@pytest.mark.parametrize("sql", [
    b"SET app.tenant = '42'", b"SET SESSION \"App\".x TO 1", b"SET LOCAL app . t = 1", b"RESET app.tenant",
    b"SELECT set_config('app.tenant', '42', false)", b"SELECT pg_catalog.set_config($1, '1', false)",
    b"SELECT pg_catalog.SET_CONFIG(name, 'x', false) FROM t",
])
def test_a_custom_setting_makes_the_log_refuse(sql):
    """Placeholders of custom parameters are not in pg_settings: the capture would not see them
    and the session would move without its app.tenant (row-level security often reads one)."""
    log = pinned_log()
    assert not log.record(sql, None, True) and "custom setting" in log.why_not


@pytest.mark.parametrize("sql", [
    b"SELECT set_config('search_path', 'a.b', false)", b"SET search_path = 'a.b'", b"SET work_mem = 1.5",
    b"SELECT t.x FROM t",
])
def test_dots_elsewhere_keep_the_session_movable(sql):
    assert pinned_log().record(sql, None, True)
