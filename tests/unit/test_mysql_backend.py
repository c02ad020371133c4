"""proxy/mysql_backend.py against a scripted server over StringTransport: the login as a client,
the internal commands that follow it, and the forwarding of responses to a session."""

import random
import struct
from collections import namedtuple

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.pool.states import ConnState
from txrdsproxy.proxy import mysql_state as mstate
from txrdsproxy.proxy.mysql_backend import (
    BASE_CAPABILITIES, CAPABILITY_PROFILE, COLLATIONS_QUERY, BackendGone, DatabaseError,
    MySQLBackendConnection)
from txrdsproxy.wire.mysql import auth as myauth
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P

DB_USER, DB_PASSWORD = "dbuser", "dbp4ss"
SCRAMBLE = bytes(range(65, 85))  # 20 bytes, no NUL
AC = P.SERVER_STATUS_AUTOCOMMIT
INTX = P.SERVER_STATUS_IN_TRANS
MORE = P.SERVER_MORE_RESULTS_EXISTS

PROFILE_NOEOF = (P.CLIENT_MULTI_STATEMENTS | P.CLIENT_MULTI_RESULTS | P.CLIENT_PS_MULTI_RESULTS
                 | P.CLIENT_SESSION_TRACK | P.CLIENT_DEPRECATE_EOF)
PROFILE_EOF = P.CLIENT_MULTI_STATEMENTS | P.CLIENT_MULTI_RESULTS | P.CLIENT_PS_MULTI_RESULTS
# A MariaDB-like greeting: offers everything, TLS and compression included.
SERVER_CAPS = hs.DEFAULT_SERVER_CAPABILITIES | P.CLIENT_SSL | P.CLIENT_COMPRESS
STATE_ROW = ["151", None, "utf8mb4", "utf8mb4", "utf8mb4", "utf8mb4_general_ci", "SYSTEM", "ON",
             "STRICT_TRANS_TABLES", "OFF"]

Target = namedtuple("Target", "rds_resource_id endpoint port")


# -- fakes -------------------------------------------------------------------------------------------
class FakeConnector:
    def __init__(self, collations=None):
        self.collations = collations
        self.greetings = []

    def note_greeting(self, greeting):
        self.greetings.append(greeting)


class FakeSink:
    """A session (MySQLFrontend) as the connection sees it while lent."""

    def __init__(self, conn):
        self.conn = conn
        self.data = bytearray()
        self.events = []  # ("complete", bytes received so far) / ("infile", ...) / ("lost", why)

    def backend_data(self, data):
        assert isinstance(data, bytes)
        self.data += data

    def response_complete(self, data=None):
        if data is not None:  # the response's last bytes, relayed with its end
            self.backend_data(data)
        self.events.append(("complete", len(self.data)))

    def infile_requested(self):
        self.events.append(("infile", len(self.data)))

    def write_queued(self, conn):
        pass

    def backend_lost(self, conn, why):
        assert conn is self.conn
        self.events.append(("lost", why))

    @property
    def completes(self):
        return [n for kind, n in self.events if kind == "complete"]


# -- packet builders ----------------------------------------------------------------------------------
def wire(payloads, seq=1):
    return b"".join(P.encode_packet(p, (seq + i) & 0xFF) for i, p in enumerate(payloads))


def ok(status=AC, affected=0, header=b"\x00"):
    return header + P.encode_lenenc_int(affected) + b"\x00" + struct.pack("<HH", status, 0)


def coldef(name=b"c"):
    return (b"\x03def" + b"\x00" + b"\x01t" + b"\x01t" + P.encode_lenenc_str(name)
            + P.encode_lenenc_str(name) + b"\x0c" + b"\x21\x00" + b"\x0b\x00\x00\x00"
            + b"\x03" + b"\x00\x00" + b"\x00" + b"\x00\x00")


def text_row(values):
    return b"".join(b"\xfb" if v is None else P.encode_lenenc_str(v.encode()) for v in values)


def resultset(caps, rows, ncols=1, status=AC):
    """Payloads of a text result set; *rows* are lists of str/None."""
    deprecate = caps & P.CLIENT_DEPRECATE_EOF
    out = [P.encode_lenenc_int(ncols)] + [coldef() for _ in range(ncols)]
    if not deprecate:
        out.append(P.eof_packet(status))
    out += [text_row(r) for r in rows]
    out.append(ok(status, header=b"\xfe") if deprecate else P.eof_packet(status))
    return out


def err(code=1045, state="28000", message="Access denied for user 'dbuser'@'localhost'"):
    return P.err_packet(code, state, message)


# -- harness --------------------------------------------------------------------------------------------
class Server:
    """Plays the database on the other end of one MySQLBackendConnection."""

    def __init__(self, profile=PROFILE_NOEOF, init_query="", collations=None, server_caps=SERVER_CAPS):
        self.connector = FakeConnector(collations if collations is not None else mstate.Collations([]))
        self.creds = Credentials(DB_USER, DB_PASSWORD)
        self.conn = MySQLBackendConnection((DB_USER, profile), Target("my-1", "127.0.0.1", 3306),
                                           self.creds, init_query, 1 << 24, self.connector)
        self.server_caps = server_caps
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)
        self.lost = []
        self.conn.pool_listener = lambda conn, reason: self.lost.append(reason)
        self.ready = []
        self.failed = []
        self.conn.ready.addCallbacks(self.ready.append, self.failed.append)

    @property
    def caps(self):
        return self.conn.capabilities

    def send(self, *payloads, seq):
        self.conn.dataReceived(wire(payloads, seq))

    def received(self):
        """[(seq, payload)] the connection wrote since the last call."""
        reader = P.PacketReader()
        out = reader.feed(self.transport.value())
        assert reader.buffered == 0
        self.transport.clear()
        return out

    def greet(self, plugin=hs.NATIVE_PASSWORD):
        greeting = hs.build_handshake_v10("10.11.6-MariaDB", 42, SCRAMBLE, self.server_caps, 45,
                                          AC, plugin)
        self.send(greeting, seq=0)
        [(seq, payload)] = self.received()
        assert seq == 1
        return hs.parse_handshake_response41(payload, self.server_caps)

    def expect_query(self, sql):
        [(seq, payload)] = self.received()
        assert (seq, payload) == (0, bytes((P.COM_QUERY,)) + sql)

    def answer_state(self, row=STATE_ROW):
        self.expect_query(mstate.STATE_QUERY)
        self.send(*resultset(self.caps, [row], ncols=len(row)), seq=1)

    def login(self):
        self.greet()
        self.send(ok(), seq=2)
        self.answer_state()
        assert self.ready == [self.conn]
        assert self.conn.state is ConnState.IDLE
        return self.conn

    def lend(self):
        """Log in, then lend the connection to a FakeSink as the pool and a session would."""
        conn = self.login()
        conn.state = ConnState.BORROWED
        sink = FakeSink(conn)
        conn.attach(sink)
        return sink

    @property
    def closed(self):
        return self.transport.disconnecting


# -- login ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [PROFILE_NOEOF, PROFILE_EOF])
def test_login_with_native_password(profile):
    s = Server(profile)
    response = s.greet()
    assert s.conn.handshake.connection_id == 42
    assert s.connector.greetings == [s.conn.handshake]
    assert response.user == DB_USER
    assert response.auth_plugin == hs.NATIVE_PASSWORD
    assert response.auth_response == myauth.native_password_scramble(DB_PASSWORD, SCRAMBLE)
    caps = response.capabilities
    assert caps & BASE_CAPABILITIES == BASE_CAPABILITIES
    assert caps & CAPABILITY_PROFILE == profile
    assert not caps & (P.CLIENT_SSL | P.CLIENT_COMPRESS | P.CLIENT_CONNECT_WITH_DB)
    assert s.conn.state is ConnState.CONNECTING and s.ready == []
    s.send(ok(), seq=2)
    assert s.conn.state is ConnState.INITIALISING
    s.answer_state()
    assert s.ready == [s.conn] and s.conn.state is ConnState.IDLE and s.conn.ready is None
    assert s.conn.server_max_connections == 151
    assert s.conn.database is None
    assert s.conn.current["autocommit"] == "1" and s.conn.current["session_track_schema"] == "0"
    assert s.conn.current["time_zone"] == "SYSTEM"
    assert s.conn.baseline == s.conn.current
    assert s.conn.tracker is not None and not s.conn.tracker.in_transaction
    assert s.received() == []


def test_login_reads_the_collations_once():
    s = Server()
    s.connector.collations = None
    s.greet()
    s.send(ok(), seq=2)
    s.answer_state()
    assert s.ready == []
    s.expect_query(COLLATIONS_QUERY)
    rows = [["45", "utf8mb4_general_ci", "utf8mb4", "Yes"], ["8", "latin1_swedish_ci", "latin1", "Yes"],
            ["224", "utf8mb4_unicode_ci", "utf8mb4", ""]]
    s.send(*resultset(s.caps, rows, ncols=4), seq=1)
    assert s.ready == [s.conn]
    collations = s.connector.collations
    assert collations.by_id[224] == ("utf8mb4_unicode_ci", "utf8mb4")
    assert collations.default_collation("latin1") == "latin1_swedish_ci"


def test_login_runs_the_init_query_first():
    s = Server(init_query="SET time_zone = '+00:00'")
    s.greet()
    s.send(ok(), seq=2)
    s.expect_query(b"SET time_zone = '+00:00'")
    s.send(ok(), seq=1)
    row = list(STATE_ROW)
    row[6] = "+00:00"
    s.answer_state(row)
    assert s.ready == [s.conn]
    assert s.conn.baseline["time_zone"] == "+00:00"


def test_state_query_with_a_database():
    s = Server()
    s.greet()
    s.send(ok(), seq=2)
    row = list(STATE_ROW)
    row[0], row[1] = "500", "app"
    s.answer_state(row)
    assert s.conn.server_max_connections == 500
    assert s.conn.database == "app"


def test_auth_switch_request():
    s = Server()
    s.greet()
    nonce = bytes(range(100, 120))
    s.send(hs.auth_switch_request(hs.NATIVE_PASSWORD, nonce), seq=2)
    [(seq, payload)] = s.received()
    assert seq == 3
    assert payload == myauth.native_password_scramble(DB_PASSWORD, nonce)
    s.send(ok(), seq=4)
    s.answer_state()
    assert s.ready == [s.conn]


def test_auth_switch_to_caching_sha2_fast_path():
    s = Server()
    s.greet()
    nonce = bytes(range(100, 120))
    s.send(hs.auth_switch_request(hs.CACHING_SHA2_PASSWORD, nonce), seq=2)
    [(seq, payload)] = s.received()
    assert seq == 3
    assert payload == myauth.caching_sha2_scramble(DB_PASSWORD, nonce)
    s.send(b"\x01\x03", seq=4)  # fast auth success
    assert s.received() == []
    s.send(ok(), seq=5)
    s.answer_state()
    assert s.ready == [s.conn]


def test_auth_switch_to_an_unsupported_plugin_fails_the_login():
    s = Server()
    s.greet()
    s.send(hs.auth_switch_request("client_ed25519", b"x" * 32), seq=2)
    [failure] = s.failed
    assert failure.check(myauth.UnsupportedAuthPlugin)
    assert s.closed and s.conn.state is ConnState.CLOSED
    assert s.lost and s.lost[0].startswith("login failed")


def test_err_during_login_fails_ready_and_closes():
    s = Server()
    s.greet()
    s.send(err(), seq=2)
    [failure] = s.failed
    assert failure.check(DatabaseError)
    assert failure.value.err.code == 1045
    assert s.ready == []
    assert s.closed and s.conn.state is ConnState.CLOSED
    assert s.received() == []  # no COM_QUIT on a connection that never logged in
    assert len(s.lost) == 1 and "1045" in s.lost[0]
    s.conn.connectionLost(Failure(ConnectionDone()))
    assert len(s.failed) == 1  # not failed twice


def test_err_instead_of_a_greeting():
    s = Server()
    s.send(err(1040, "HY000", "Too many connections"), seq=0)
    [failure] = s.failed
    assert failure.check(DatabaseError) and failure.value.err.code == 1040
    assert s.closed


def test_err_from_the_state_query_fails_the_login():
    s = Server()
    s.greet()
    s.send(ok(), seq=2)
    s.received()
    s.send(err(1142, "42000", "SELECT command denied"), seq=1)
    [failure] = s.failed
    assert failure.check(DatabaseError) and failure.value.err.code == 1142
    assert s.closed
    # Logged in: the connection says goodbye.
    assert s.received() == [(0, bytes((P.COM_QUIT,)))]


def test_garbage_during_login_fails_the_login():
    s = Server()
    s.greet()
    s.send(b"\x07garbage", seq=2)
    [failure] = s.failed
    assert failure.check(P.ProtocolError)
    assert s.closed


def test_connection_lost_during_login():
    s = Server()
    s.greet()
    s.conn.connectionLost(Failure(ConnectionDone()))
    [failure] = s.failed
    assert failure.check(BackendGone)
    assert s.conn.state is ConnState.CLOSED
    assert len(s.lost) == 1


# -- internal commands ------------------------------------------------------------------------------------
def test_sync_sends_init_db_and_one_set():
    s = Server()
    conn = s.login()
    d = conn.sync({"time_zone": "+02:00"}, "app")
    [(seq, payload)] = s.received()
    assert payload == bytes((P.COM_INIT_DB,)) + b"app"
    s.send(ok(), seq=1)
    s.expect_query(b"SET time_zone='+02:00'")
    assert not d.called
    s.send(ok(), seq=1)
    assert d.called
    assert conn.database == "app" and conn.current["time_zone"] == "+02:00"
    assert not conn.needs_sync({"time_zone": "+02:00"}, "app")
    assert conn.needs_sync({}, "app")  # back to the baseline


def test_sync_failure_forgets_the_current_values():
    s = Server()
    conn = s.login()
    failed = []
    conn.sync({"time_zone": "Mars/Olympus"}, None).addErrback(failed.append)
    s.received()
    s.send(err(1298, "HY000", "Unknown or incorrect time zone: 'Mars/Olympus'"), seq=1)
    assert failed[0].check(DatabaseError)
    assert conn.current == {}
    assert conn.state is ConnState.IDLE and not conn.busy


def test_reset_of_a_dirty_connection():
    s = Server()
    conn = s.login()
    conn.session_dirty = True
    done = []
    conn.reset().addCallback(done.append)
    [(_, payload)] = s.received()
    assert payload == bytes((P.COM_RESET_CONNECTION,))
    s.send(ok(), seq=1)
    s.answer_state()
    assert done and not conn.session_dirty


def test_reset_in_a_transaction_rolls_back():
    s = Server()
    conn = s.login()
    conn.tracker.status = AC | INTX
    conn.reset()
    s.expect_query(b"ROLLBACK")
    s.send(ok(AC), seq=1)
    assert not conn.tracker.in_transaction


def test_one_internal_command_at_a_time():
    s = Server()
    conn = s.login()
    conn.query(b"SELECT 1")
    failed = []
    conn.query(b"SELECT 2").addErrback(failed.append)
    assert failed[0].check(RuntimeError)


def test_unsolicited_packet_on_an_idle_connection_closes():
    s = Server()
    conn = s.login()
    s.send(ok(), seq=1)
    assert conn.state is ConnState.CLOSED and s.closed
    assert s.lost and "protocol violation" in s.lost[0]


def test_lost_connection_fails_the_internal_command():
    s = Server()
    conn = s.login()
    failed = []
    conn.query(b"SELECT 1").addErrback(failed.append)
    conn.connectionLost(Failure(ConnectionDone()))
    assert failed[0].check(BackendGone)
    assert len(s.lost) == 1


# -- forwarding -----------------------------------------------------------------------------------------------
def forward_response(profile, payloads, command=P.COM_QUERY):
    s = Server(profile)
    sink = s.lend()
    s.conn.tracker.expect(command)
    s.conn.write(P.encode_packet(bytes((command,)) + b"SELECT 1", 0))
    assert s.received() == [(0, bytes((command,)) + b"SELECT 1")]
    return s, sink, wire(payloads)


def response_cases(caps):
    many = [[str(i), None if i % 7 == 0 else "v" * (i % 300)] for i in range(5000)]
    return {
        "ok": [ok()],
        "err": [err(1146, "42S02", "Table 't' doesn't exist")],
        "resultset": resultset(caps, [["1"]]),
        "many_rows": resultset(caps, many, ncols=2),
        "multi": (resultset(caps, [["1"]], status=AC | MORE) + [ok(AC | MORE)]
                  + resultset(caps, [["2"], ["3"]], status=AC | MORE) + [ok(AC)]),
        "multi_then_err": resultset(caps, [["1"]], status=AC | MORE) + [err()],
    }


CASES = [(profile, name) for profile in (PROFILE_NOEOF, PROFILE_EOF)
         for name in ("ok", "err", "resultset", "many_rows", "multi", "multi_then_err")]
CASE_IDS = [f"{'noeof' if p == PROFILE_NOEOF else 'eof'}-{n}" for p, n in CASES]


def caps_for(profile):
    return (BASE_CAPABILITIES | profile) & SERVER_CAPS


@pytest.mark.parametrize("profile, name", CASES, ids=CASE_IDS)
def test_forward_whole(profile, name):
    s, sink, data = forward_response(profile, response_cases(caps_for(profile))[name])
    s.conn.dataReceived(data)
    assert bytes(sink.data) == data
    assert sink.events == [("complete", len(data))]
    assert not s.closed


@pytest.mark.parametrize("profile, name", CASES, ids=CASE_IDS)
def test_forward_byte_by_byte(profile, name):
    payloads = response_cases(caps_for(profile))[name]
    if name == "many_rows":
        payloads = payloads[:200] + payloads[-1:]  # keep it quick
    s, sink, data = forward_response(profile, payloads)
    for i in range(len(data)):
        assert sink.events == []
        s.conn.dataReceived(data[i:i + 1])
    assert bytes(sink.data) == data
    assert sink.events == [("complete", len(data))]


@pytest.mark.parametrize("profile, name", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_forward_random_chunks(profile, name, seed):
    rng = random.Random(seed)
    s, sink, data = forward_response(profile, response_cases(caps_for(profile))[name])
    pos = 0
    while pos < len(data):
        assert sink.events == []
        n = rng.randint(1, 3000)
        s.conn.dataReceived(data[pos:pos + n])
        pos += n
    assert bytes(sink.data) == data
    assert sink.events == [("complete", len(data))]


def test_forward_status_tracks_the_transaction():
    s, sink, data = forward_response(PROFILE_NOEOF, [ok(AC | INTX)])
    s.conn.dataReceived(data)
    assert sink.completes == [len(data)]
    assert s.conn.tracker.in_transaction


def test_forward_two_responses_on_one_lease():
    s, sink, first = forward_response(PROFILE_NOEOF, resultset(caps_for(PROFILE_NOEOF), [["1"]]))
    s.conn.dataReceived(first)
    s.conn.tracker.expect(P.COM_QUERY)
    second = wire([ok(AC, affected=3)])
    s.conn.dataReceived(second)
    assert bytes(sink.data) == first + second
    assert sink.completes == [len(first), len(first + second)]


def test_forward_local_infile():
    s, sink, _ = forward_response(PROFILE_NOEOF, [])
    s.conn.dataReceived(wire([b"\xfbdata.csv"]))
    assert sink.events == [("infile", len(sink.data))]
    tracker = s.conn.tracker
    assert tracker.awaiting_client_data
    tracker.client_packet(10)
    tracker.client_packet(0)
    s.conn.dataReceived(wire([ok(AC, affected=2)], seq=4))
    assert sink.events[-1] == ("complete", len(sink.data))


def test_forward_after_detach_goes_to_the_internal_reader():
    s, sink, data = forward_response(PROFILE_NOEOF, [ok()])
    s.conn.dataReceived(data)
    s.conn.detach()
    d = s.conn.query(b"SELECT 2")
    s.received()
    s.send(*resultset(s.caps, [["2"]]), seq=1)
    assert d.result == [["2"]]
    assert bytes(sink.data) == data


# -- bad input from the server while forwarding ----------------------------------------------------------
def test_bogus_prepare_response_closes_with_a_reason():
    s, sink, data = forward_response(PROFILE_NOEOF, [b"\x05bogus"], command=P.COM_STMT_PREPARE)
    s.conn.dataReceived(data)
    assert s.conn.state is ConnState.CLOSED and s.closed
    assert sink.completes == []
    assert len(s.lost) == 1
    assert s.lost[0].startswith("protocol violation from the database")
    assert s.received() == [(0, bytes((P.COM_QUIT,)))]
    # The transport then reports the close: the session hears why.
    s.conn.connectionLost(Failure(ConnectionDone()))
    assert sink.events == [("lost", s.lost[0])]
    assert len(s.lost) == 1


def test_bogus_column_count_closes():
    s, sink, data = forward_response(PROFILE_NOEOF, [b"\xfe" + b"\x00" * 20])
    s.conn.dataReceived(data)
    assert s.conn.state is ConnState.CLOSED
    assert "protocol violation" in s.lost[0]


def test_missing_eof_after_definitions_closes():
    payloads = [b"\x01", coldef(), text_row(["1"])]  # legacy EOF expected after the defs
    s, sink, data = forward_response(PROFILE_EOF, payloads)
    s.conn.dataReceived(data)
    assert s.conn.state is ConnState.CLOSED
    assert "protocol violation" in s.lost[0]


def test_data_after_the_response_closes():
    s, sink, data = forward_response(PROFILE_NOEOF, [ok()])
    s.conn.dataReceived(data + wire([ok()], seq=2))
    assert bytes(sink.data) == data  # the response itself was relayed
    assert sink.completes == []
    assert s.conn.state is ConnState.CLOSED
    assert s.lost == ["the database sent data nobody asked for"]


def test_data_while_nothing_is_expected_closes():
    s = Server()
    sink = s.lend()
    s.conn.dataReceived(wire([ok()]))
    assert sink.data == b"" and sink.completes == []
    assert s.conn.state is ConnState.CLOSED
    assert "protocol violation" in s.lost[0]


def test_database_closing_mid_response_tells_the_session():
    s, sink, data = forward_response(PROFILE_NOEOF, resultset(caps_for(PROFILE_NOEOF), [["1"]]))
    s.conn.dataReceived(data[:10])
    s.conn.connectionLost(Failure(ConnectionDone("bye")))
    assert sink.completes == []
    [(kind, why)] = sink.events
    assert kind == "lost" and why.startswith("database closed the connection")
    assert len(s.lost) == 1


# --- needs_sync's memo: always the answer of sync_sql ------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VALUES = {"autocommit": ["0", "1"], "time_zone": ["SYSTEM", "+01:00"],
           "character_set_client": ["utf8mb4", "latin1"], "sql_mode": ["", "ANSI_QUOTES"]}
_STEP = st.tuples(st.sampled_from(["desired", "current"]), st.sampled_from(sorted(_VALUES)),
                  st.integers(0, 2))


@settings(max_examples=200, deadline=None)
@given(st.lists(_STEP, max_size=30))
def test_needs_sync_always_agrees_with_sync_sql(steps):
    """Sessions' values and the connection's change in place between borrows (SETs, learned
    statuses, syncs); the memo never answers "in step" when sync_sql has something to set."""
    conn = MySQLBackendConnection((DB_USER, 0), Target("my-1", "127.0.0.1", 3306),
                                  Credentials(DB_USER, "pw"), "", 1 << 20, None)
    conn.baseline = {"autocommit": "1", "time_zone": "SYSTEM", "character_set_client": "utf8mb4",
                     "sql_mode": ""}
    conn.current = dict(conn.baseline)
    desired = {}
    for where, name, choice in steps:
        target = desired if where == "desired" else conn.current
        if choice == 2:
            target.pop(name, None)
        else:
            target[name] = _VALUES[name][choice]
        expected = bool(mstate.sync_sql(conn.current, conn.baseline, desired)[0])
        assert conn.needs_sync(desired, None) is expected
        assert conn.needs_sync(desired, None) is expected  # asked again: same answer
    conn.database = "a"
    assert conn.needs_sync(desired, "b") is True
