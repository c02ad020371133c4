"""proxy/mysql_frontend.py driven with StringTransport, task.Clock, a fake pool/lease/connection and
a fake secrets store.  Client packets are built with wire/mysql; the fake database connection runs
the real ResponseTracker over scripted server responses, as MySQLBackendConnection._forward does."""

import struct

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.config.load import parse_config
from txrdsproxy.pool.pool import BorrowTimeout, PoolClosed
from txrdsproxy.pool.states import ConnState
from txrdsproxy.proxy import mysql_frontend
from txrdsproxy.proxy import session
from txrdsproxy.proxy import mysql_state as mstate
from txrdsproxy.proxy.mysql_backend import BASE_CAPABILITIES, CAPABILITY_PROFILE, DatabaseError
from txrdsproxy.proxy.mysql_frontend import MySQLFrontend
from txrdsproxy.proxy.session import ProxyContext, SessionState
from txrdsproxy.testing.fakes import ClientTransport, FakePool, FakeSecrets
from txrdsproxy.wire.mysql import auth as myauth
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.statements import ConnStatements
from txrdsproxy.wire.mysql.commands import ResponseTracker

ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"
USER, PASSWORD = "u", "s3cret"
AC = P.SERVER_STATUS_AUTOCOMMIT
INTX = P.SERVER_STATUS_IN_TRANS
MORE = P.SERVER_MORE_RESULTS_EXISTS

# A modern client (libmariadb-like): 4.1, plugin auth, DEPRECATE_EOF, session tracking.
CLIENT_CAPS = (P.CLIENT_LONG_PASSWORD | P.CLIENT_LONG_FLAG | P.CLIENT_PROTOCOL_41
               | P.CLIENT_TRANSACTIONS | P.CLIENT_SECURE_CONNECTION | P.CLIENT_MULTI_STATEMENTS
               | P.CLIENT_MULTI_RESULTS | P.CLIENT_PS_MULTI_RESULTS | P.CLIENT_PLUGIN_AUTH
               | P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | P.CLIENT_SESSION_TRACK
               | P.CLIENT_DEPRECATE_EOF | P.CLIENT_CONNECT_WITH_DB)
# What the database's greeting offers: everything, compression and TLS included.
SERVER_CAPS = hs.DEFAULT_SERVER_CAPABILITIES | P.CLIENT_COMPRESS | P.CLIENT_SSL
KEY = (USER, CLIENT_CAPS & CAPABILITY_PROFILE, False)  # last: TLS to the database
BACKEND_CAPS = (BASE_CAPABILITIES | (KEY[1] & CAPABILITY_PROFILE)) & SERVER_CAPS
BASELINE = {"character_set_client": "utf8mb4", "character_set_connection": "utf8mb4",
            "character_set_results": "utf8mb4", "collation_connection": "utf8mb4_general_ci",
            "time_zone": "SYSTEM", "autocommit": "1", "sql_mode": "STRICT_TRANS_TABLES",
            "session_track_schema": "1"}


# -- fakes -------------------------------------------------------------------------------------------
class FakeConnector:
    """MySQLConnector's face towards sessions: probe() (the greeting) and collations."""

    def __init__(self):
        payload = hs.build_handshake_v10("10.11.6-MariaDB", 99, b"A" * 20, SERVER_CAPS, 45, AC,
                                         hs.NATIVE_PASSWORD)
        self.greeting = hs.parse_handshake_v10(payload)
        self.collations = None

    def probe(self):
        return defer.succeed(self.greeting)


class FakeConn:
    """A lent MySQLBackendConnection: the attributes and methods the session uses."""

    def __init__(self, key, connector):
        self.key = key
        self.connector = connector
        self.handshake = connector.greeting
        self.transport = StringTransport()
        self.state = ConnState.BORROWED
        self.busy = False
        self.session_dirty = False
        self.tracker = ResponseTracker(BACKEND_CAPS, AC)
        self.baseline = dict(BASELINE)
        self.current = dict(BASELINE)
        self.database = None
        self._sink = None
        self.writes = []
        self.synced = []
        self.sync_error = None  # an ERR payload the next sync fails with
        self.statements = ConnStatements()
        self.prepares = []  # (key, sql, Deferred) of each prepare_statement: the test fires it

    def prepare_statement(self, key, sql):
        d = defer.Deferred()
        self.prepares.append((key, bytes(sql), d))
        return d

    def remember_statement(self, key, server_id, params):
        return self.statements.add(key, server_id, params)[0]

    def cancel_inline_sync(self):
        self.inline_cancelled = True

    def attach(self, sink):
        self._sink = sink

    def detach(self):
        self._sink = None

    def write(self, data):
        self.writes.append(bytes(data))
        self.transport.write(data)

    def needs_sync(self, desired, database):
        if database is not None and database != self.database:
            return True
        return bool(mstate.sync_sql(self.current, self.baseline, desired)[0])

    def sync_inline(self, desired, database):
        return None  # every sync a round trip of its own (test_mysql_inline_sync: the other way)

    def sync(self, desired, database):
        self.synced.append((dict(desired), database))
        if self.sync_error is not None:
            return defer.fail(DatabaseError(self.sync_error))
        self.database = database if database is not None else self.database
        self.current.update(mstate.sync_sql(self.current, self.baseline, desired)[1])
        return defer.succeed(None)

    def respond(self, *payloads, seq=1):
        """The database answers: what MySQLBackendConnection.dataReceived does with the bytes."""
        data = wire(payloads, seq)
        buf = bytearray(data)
        end = self.tracker.consume(buf, 0)
        assert end == len(data)
        sink = self._sink
        if self.tracker.idle:  # the response's end: relayed and ended in one call
            sink.response_complete(data)
        else:
            sink.backend_data(data)
        return data


def fake_pool(connector):
    """A FakePool whose leases carry FakeConn over *connector*; new_lease() defaults to KEY."""
    pool = FakePool(lambda key: FakeConn(key, connector), default_key=KEY)
    pool.connector = connector
    return pool


def fake_secrets():
    return FakeSecrets({ARN: Credentials(USER, PASSWORD, ARN)})


# -- helpers ------------------------------------------------------------------------------------------
def proxy_config(**extra):
    proxy = {
        "DBProxyName": "app-my", "EngineFamily": "MYSQL", "Listen": "tcp:3307",
        "Auth": [{"SecretArn": ARN}],
        "TargetGroups": [{"Targets": [{"RdsResourceId": "my-1", "Endpoint": "127.0.0.1", "Port": 3306}]}],
    }
    proxy.update(extra)
    return parse_config({"Secrets": {"Path": "/s.json"}, "DBProxies": [proxy]}).proxies[0]


def wire(payloads, seq=1):
    return b"".join(P.encode_packet(p, (seq + i) & 0xFF) for i, p in enumerate(payloads))


def ok(status=AC, affected=0, header=b"\x00"):
    return header + P.encode_lenenc_int(affected) + b"\x00" + struct.pack("<HH", status, 0)


def coldef(name=b"c"):
    return (b"\x03def" + b"\x00" + b"\x01t" + b"\x01t" + P.encode_lenenc_str(name)
            + P.encode_lenenc_str(name) + b"\x0c" + b"\x21\x00" + b"\x0b\x00\x00\x00"
            + b"\x03" + b"\x00\x00" + b"\x00" + b"\x00\x00")


def resultset(rows, status=AC):
    """A one-column text result set for a DEPRECATE_EOF client."""
    return ([b"\x01", coldef()] + [P.encode_lenenc_str(r) for r in rows]
            + [ok(status, header=b"\xfe")])


def command(cmd, arg=b"", seq=0):
    return P.encode_packet(bytes((cmd,)) + arg, seq)


def query(sql, seq=0):
    return command(P.COM_QUERY, sql.encode() if isinstance(sql, str) else sql, seq)


def prepare_ok(stmt_id=1, columns=0, params=0):
    return b"\x00" + struct.pack("<IHHBH", stmt_id, columns, params, 0, 0)


class Harness:
    def __init__(self, ctx=None, **extra):
        if ctx is None:
            self.clock = Clock()
            self.connector = FakeConnector()
            self.pool = fake_pool(self.connector)
            ctx = ProxyContext(proxy_config(**extra), self.pool, fake_secrets(), self.clock,
                               connector=self.connector)
        else:
            self.clock, self.pool, self.connector = ctx.clock, ctx.pool, ctx.connector
        self.ctx = ctx
        self.frontend = MySQLFrontend(ctx)
        self.transport = ClientTransport()
        self.frontend.makeConnection(self.transport)

    def send(self, data):
        self.frontend.dataReceived(data)

    def sent(self):
        data = self.transport.value()
        self.transport.clear()
        return data

    def packets(self):
        """[(seq, payload)] the proxy wrote to the client since the last call."""
        reader = P.PacketReader()
        out = reader.feed(self.sent())
        assert reader.buffered == 0
        return out

    def greeting(self):
        [(seq, payload)] = self.packets()
        assert seq == 0
        return hs.parse_handshake_v10(payload)

    def handshake(self, user=USER, password=PASSWORD, plugin=hs.NATIVE_PASSWORD, database=None,
                  caps=None, auth_response=None):
        greeting = self.greeting()
        if auth_response is None:
            auth_response = myauth.auth_response_for(plugin, password, greeting.scramble)
        if caps is None:
            caps = CLIENT_CAPS & greeting.capabilities
        packet = hs.build_handshake_response41(caps, user, auth_response,
                                               database=database, auth_plugin=plugin)
        self.send(P.encode_packet(packet, 1))
        return greeting

    def login(self, **kw):
        self.handshake(**kw)
        assert self.packets() == [(2, P.ok_packet(status=AC))]
        assert self.frontend.state is SessionState.IDLE

    @property
    def closed(self):
        return self.transport.disconnecting

    def lose(self):
        self.frontend.connectionLost(Failure(ConnectionError("gone")))


def err(payload):
    e = P.parse_err(payload)
    return e.code, e.sqlstate, e.message


@pytest.fixture(autouse=True)
def no_logged_failures():
    """No test may make the frontend log a traceback (log.failure)."""
    failures = []

    def observer(event):
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    yield failures
    globalLogPublisher.removeObserver(observer)
    assert failures == []


@pytest.fixture
def h():
    return Harness()


@pytest.fixture
def s():
    """A logged-in session without a database connection."""
    harness = Harness()
    harness.login()
    return harness


# -- greeting and connection limits -----------------------------------------------------------------
def test_greeting_is_handshake_v10_without_compress_or_ssl(h):
    g = h.greeting()
    assert g.protocol_version == 10
    assert g.server_version == "10.11.6-MariaDB"
    assert g.connection_id == h.frontend.id
    assert g.auth_plugin == hs.NATIVE_PASSWORD
    assert len(g.scramble) == 20 and g.scramble == h.frontend._auth.scramble
    assert not g.capabilities & P.CLIENT_COMPRESS
    assert not g.capabilities & P.CLIENT_SSL
    assert g.capabilities & P.CLIENT_PROTOCOL_41 and g.capabilities & P.CLIENT_PLUGIN_AUTH
    assert h.frontend.state is SessionState.AUTHENTICATING
    assert not h.closed


def test_phases_are_named_enum_members(h):
    """DESIGN rule 3: the session's phase is a `Phase` member at every step, never a string."""
    assert h.frontend._phase is session.Phase.HANDSHAKE  # the greeting went out
    h.handshake()
    assert h.frontend._phase is session.Phase.COMMAND
    h.send(command(P.COM_QUIT))
    assert h.frontend._phase is session.Phase.CLOSING


def test_max_client_connections():
    first = Harness(MaxClientConnections=2)
    Harness(first.ctx).greeting()
    third = Harness(first.ctx)
    [(seq, payload)] = third.packets()
    assert seq == 0
    assert err(payload) == (1040, "HY000", "Number simultaneous connections exceeded (2)")
    assert third.closed
    third.lose()
    assert len(first.ctx.sessions) == 2


def test_max_connection_rate():
    first = Harness(MaxConnectionRate=1)
    first.greeting()
    second = Harness(first.ctx)
    [(seq, payload)] = second.packets()
    assert seq == 0
    assert err(payload) == (1040, "HY000", "Connections rate limit exceeded (1)")
    assert second.closed
    first.clock.advance(1)
    Harness(first.ctx).greeting()  # a second later there is room again


def test_ssl_request_is_refused_with_the_documented_error(h):
    h.greeting()
    h.send(P.encode_packet(hs.build_ssl_request(CLIENT_CAPS, 45), 1))
    [(seq, payload)] = h.packets()
    assert seq == 2
    assert err(payload) == (2026, "HY000", "TLS is not enabled on this proxy")
    assert h.closed


def test_client_insisting_on_compression_is_refused(h):
    h.handshake(caps=CLIENT_CAPS | P.CLIENT_COMPRESS)
    [(seq, payload)] = h.packets()
    assert seq == 2
    assert err(payload) == (1235, "42000", "This RDS Proxy doesn't yet support 'compressed protocol'")
    assert h.closed


def test_probe_failure_is_unknown_error():
    h = Harness.__new__(Harness)
    h.clock = Clock()
    h.connector = FakeConnector()
    h.connector.probe = lambda: defer.fail(ConnectionRefusedError("nope"))
    h.pool = fake_pool(h.connector)
    h.ctx = ProxyContext(proxy_config(), h.pool, fake_secrets(), h.clock, connector=h.connector)
    h.frontend = MySQLFrontend(h.ctx)
    h.transport = ClientTransport()
    h.frontend.makeConnection(h.transport)
    [(seq, payload)] = h.packets()
    assert err(payload) == (1105, "HY000", "Unknown error")
    assert h.closed


# -- authentication ------------------------------------------------------------------------------------
def test_native_password_login(h):
    h.handshake()
    assert h.packets() == [(2, P.ok_packet(status=AC))]
    assert h.frontend.state is SessionState.IDLE
    assert h.frontend.user == USER and h.frontend.key == KEY
    assert h.pool.requests == [] and h.pool.try_borrows == 0
    assert not h.closed


def test_wrong_password(h):
    h.handshake(password="wrong")
    [(seq, payload)] = h.packets()
    assert seq == 2
    assert err(payload) == (1045, "28000", "Access denied for user 'u'@'%' (using password: YES)")
    assert h.closed
    assert h.pool.requests == []


def test_unknown_user(h):
    h.handshake(user="mallory")
    [(seq, payload)] = h.packets()
    assert seq == 2
    assert err(payload) == (1045, "28000", "Access denied for user 'mallory'@'%' (using password: YES)")
    assert h.closed


def test_empty_password_says_using_password_no(h):
    h.handshake(auth_response=b"")
    [(seq, payload)] = h.packets()
    assert err(payload) == (1045, "28000", "Access denied for user 'u'@'%' (using password: NO)")
    assert h.closed


def test_auth_switch_when_the_client_answers_with_another_plugin(h):
    h.handshake(plugin=hs.CACHING_SHA2_PASSWORD)
    [(seq, payload)] = h.packets()
    assert seq == 2
    switch = hs.parse_auth_switch_request(payload)
    assert switch.plugin == hs.NATIVE_PASSWORD and len(switch.data) == 20
    h.send(P.encode_packet(myauth.native_password_scramble(PASSWORD, switch.data), 3))
    assert h.packets() == [(4, P.ok_packet(status=AC))]
    assert h.frontend.state is SessionState.IDLE


def test_auth_switch_wrong_password(h):
    h.handshake(plugin=hs.CACHING_SHA2_PASSWORD)
    [(_, payload)] = h.packets()
    switch = hs.parse_auth_switch_request(payload)
    h.send(P.encode_packet(myauth.native_password_scramble("nope", switch.data), 3))
    [(seq, payload)] = h.packets()
    assert seq == 4 and err(payload)[0] == 1045
    assert h.closed


def test_login_with_a_database_checks_it_once(h):
    h.handshake(database="app")
    assert h.packets() == []
    [(key, _)] = h.pool.requests
    assert key == KEY
    lease = h.pool.give()
    assert lease.conn.synced == [({}, "app")]
    assert lease.released and lease.release_args["clean"] is True
    assert h.packets() == [(2, P.ok_packet(status=AC))]
    assert h.frontend.database == "app"
    # A second login to the same database does not borrow.
    again = Harness(h.ctx)
    again.handshake(database="app")
    assert again.packets() == [(2, P.ok_packet(status=AC))]
    assert h.pool.requests == []


def test_login_with_an_unknown_database(h):
    h.handshake(database="nope")
    unknown = P.err_packet(1049, "42000", "Unknown database 'nope'")
    lease = h.pool.give(sync_error=unknown)
    assert h.packets() == [(2, unknown)]
    assert h.closed
    assert lease.released and lease.release_args["clean"] is True
    assert ("u", "nope") not in h.ctx.mysql_known_databases


def test_sync_failure_fails_the_command_only(s):
    s.frontend.desired["time_zone"] = "Mars/Olympus"
    s.send(query("SELECT 1"))
    bad = P.err_packet(1298, "HY000", "Unknown or incorrect time zone: 'Mars/Olympus'")
    lease = s.pool.give(sync_error=bad)
    assert s.packets() == [(1, bad)]
    assert lease.released and lease.release_args["clean"] is True
    assert lease.conn.writes == []
    assert not s.closed and s.frontend.state is SessionState.IDLE


def test_login_borrow_timeout_is_fatal(h):
    h.handshake(database="app")
    h.pool.refuse(BorrowTimeout("x"))
    [(seq, payload)] = h.packets()
    assert seq == 2
    assert err(payload) == (9501, "HY000", "Timed-out waiting to acquire database connection")
    assert h.closed


def test_auth_timeout(h):
    """A client that starts the handshake but never finishes authentication (here: never
    answers the auth switch to caching_sha2_password's full exchange) is closed at
    ClientAuthTimeout, counted from accept."""
    h.handshake(plugin="caching_sha2_password", auth_response=b"\x01" * 32)
    h.sent()
    h.clock.advance(session.AUTH_TIMEOUT - 1)
    assert not h.closed
    h.clock.advance(1)
    assert h.closed
    assert h.sent() == b""


def test_silent_client_is_closed_at_the_first_packet_deadline(h):
    h.greeting()
    h.clock.advance(4.9)  # ClientFirstPacketTimeout: 5 s by default, from the greeting
    assert not h.closed
    h.clock.advance(0.1)
    assert h.closed and h.sent() == b""


def test_pipelined_command_after_the_handshake_is_kept(h):
    greeting = h.greeting()
    packet = hs.build_handshake_response41(
        CLIENT_CAPS & greeting.capabilities, USER,
        myauth.native_password_scramble(PASSWORD, greeting.scramble))
    q = query("SELECT 1")
    h.send(P.encode_packet(packet, 1) + command(P.COM_PING) + q + q[:5])
    assert h.packets() == [(2, P.ok_packet(status=AC)), (1, P.ok_packet(status=AC))]
    assert not h.closed
    lease = h.pool.give()
    assert lease.conn.writes == [q]
    lease.conn.respond(*resultset([b"1"]))
    h.send(q[5:])
    assert h.pool.give().conn.writes == [q]


def test_pipelined_command_after_a_login_with_a_database(h):
    greeting = h.greeting()
    packet = hs.build_handshake_response41(
        CLIENT_CAPS & greeting.capabilities, USER,
        myauth.native_password_scramble(PASSWORD, greeting.scramble), database="app")
    h.send(P.encode_packet(packet, 1) + command(P.COM_PING)[:3])
    h.send(command(P.COM_PING)[3:] + command(P.COM_PING, seq=5))
    assert h.packets() == []
    h.pool.give()
    assert h.packets() == [(2, P.ok_packet(status=AC)), (1, P.ok_packet(status=AC)),
                           (6, P.ok_packet(status=AC))]
    assert not h.closed


# -- local commands ------------------------------------------------------------------------------------
def test_ping_is_answered_locally(s):
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))]
    assert s.pool.requests == [] and s.pool.try_borrows == 0
    assert s.frontend.state is SessionState.IDLE


def test_quit_closes_without_forwarding(s):
    s.send(command(P.COM_QUIT))
    assert s.closed
    assert s.sent() == b""
    assert s.pool.requests == [] and s.pool.try_borrows == 0


def test_quit_with_a_lease_is_not_forwarded(s):
    s.send(query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(ok(AC | INTX))
    s.send(command(P.COM_QUIT))
    assert lease.conn.writes == [query("BEGIN")]
    assert s.closed
    s.lose()
    assert lease.release_args == dict(clean=True, needs_reset=True, reason=None)


def test_unsupported_command_is_refused(s):
    s.send(command(P.COM_BINLOG_DUMP, b"\0" * 10))
    [(seq, payload)] = s.packets()
    assert seq == 1 and err(payload) == (1047, "08S01", "Unknown command")
    assert not s.closed
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))]


def change_user(user, auth=b"x" * 20, database=b"", charset=45):
    payload = (user.encode() + b"\0" + bytes((len(auth),)) + auth + database + b"\0"
               + struct.pack("<H", charset) + hs.NATIVE_PASSWORD.encode() + b"\0")
    return command(P.COM_CHANGE_USER, payload)


def test_change_user_switches_auth_and_unpins(s):
    s.send(query("SET @x = 1"))
    lease = s.pool.give()
    lease.conn.respond(ok())
    s.sent()
    s.send(change_user(USER))
    [(seq, payload)] = s.packets()
    assert seq == 1
    switch = hs.parse_auth_switch_request(payload)
    assert switch.plugin == hs.NATIVE_PASSWORD
    assert lease.release_args == dict(clean=True, needs_reset=True, reason=None)
    s.send(P.encode_packet(myauth.native_password_scramble(PASSWORD, switch.data), 2))
    assert s.packets() == [(3, P.ok_packet(status=AC))]
    assert s.frontend.pin_reason is None and s.frontend.state is SessionState.IDLE


def test_change_user_wrong_password_closes(s):
    s.send(change_user(USER))
    [(_, payload)] = s.packets()
    switch = hs.parse_auth_switch_request(payload)
    s.send(P.encode_packet(myauth.native_password_scramble("nope", switch.data), 2))
    [(seq, payload)] = s.packets()
    assert seq == 3 and err(payload)[0] == 1045
    assert s.closed


# -- relaying -------------------------------------------------------------------------------------------------
def test_query_is_written_unchanged_in_one_write(s):
    q = query("SELECT 1")
    s.send(q)
    assert s.frontend.state is SessionState.BORROWING
    assert [k for k, _ in s.pool.requests] == [KEY + (mysql_frontend.NO_DATABASE,)]
    lease = s.pool.give()
    assert lease.conn.writes == [q]
    assert lease.conn._sink is s.frontend
    assert s.frontend.state is SessionState.BORROWED
    assert s.sent() == b""
    reply = lease.conn.respond(*resultset([b"1"]))
    assert s.sent() == reply
    assert lease.released and lease.release_args == dict(clean=True, needs_reset=False, reason=None)
    assert lease.conn._sink is None
    assert s.frontend.lease is None and s.frontend.state is SessionState.IDLE


def test_query_from_an_idle_connection_needs_no_deferred(s):
    lease = s.pool.new_lease()
    s.pool.idle.append(lease)
    q = query("SELECT 1")
    s.send(q)
    assert s.pool.requests == []
    assert lease.conn.writes == [q]


def test_small_query_is_read_whole_before_borrowing(s):
    q = query("SELECT " + "x" * 100)
    s.send(q[:3])
    s.send(q[3:50])
    assert s.pool.requests == [] and s.pool.try_borrows == 0  # classified on the whole text
    s.send(q[50:])
    lease = s.pool.give()
    assert lease.conn.writes == [q]


def test_query_over_16kb_pins_and_is_read_whole_up_to_64kb(s):
    q = query("SELECT '" + "x" * (20 * 1024) + "'")
    s.send(q[:1000])
    assert s.pool.requests == []  # up to WHOLE_LIMIT a command is read whole first
    s.send(q[1000:])
    lease = s.pool.give()
    assert s.frontend.pin_reason.value == "statement_too_large"
    assert lease.conn.writes == [q]


def test_large_query_pins_and_is_relayed_as_it_arrives(s):
    q = query("SELECT '" + "x" * (100 * 1024) + "'")
    s.send(q[:1000])
    lease = s.pool.give()
    assert s.frontend.pin_reason is not None and s.frontend.pin_reason.value == "statement_too_large"
    assert lease.conn.writes == [q[:1000]]
    s.send(q[1000:5000])
    s.send(q[5000:])
    assert b"".join(lease.conn.writes) == q
    lease.conn.respond(*resultset([b"x"]))
    assert not lease.released and s.frontend.state is SessionState.PINNED


def test_pipelined_commands_are_served_in_order(s):
    q1, q2 = query("SELECT 1"), query("SELECT 2")
    s.send(q1 + q2)
    lease = s.pool.give()
    assert lease.conn.writes == [q1]
    lease.conn.respond(*resultset([b"1"]))
    assert lease.released
    # The second command borrows again.
    lease2 = s.pool.give()
    assert lease2.conn.writes == [q2]
    lease2.conn.respond(*resultset([b"2"]))
    assert s.frontend.state is SessionState.IDLE


def test_multi_result_response_releases_at_its_end(s):
    s.send(query("CALL p()"))
    lease = s.pool.give()
    first = lease.conn.respond(*resultset([b"1"], status=AC | MORE))
    assert not lease.released and s.frontend.state is SessionState.BORROWED
    rest = lease.conn.respond(ok(AC), seq=4)
    assert s.sent() == first + rest
    assert lease.released and lease.release_args["clean"] is True


def test_transaction_keeps_the_lease(s):
    s.send(query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(ok(AC | INTX))
    assert not lease.released and s.frontend.state is SessionState.BORROWED
    s.send(query("SELECT 1"))
    assert s.pool.requests == []
    lease.conn.respond(*resultset([b"1"], status=AC | INTX))
    assert not lease.released
    s.send(query("COMMIT"))
    assert lease.conn.writes == [query("BEGIN"), query("SELECT 1"), query("COMMIT")]
    lease.conn.respond(ok(AC))
    assert lease.released and lease.release_args["clean"] is True


def test_borrow_timeout_answers_and_keeps_the_session(s):
    s.send(query("SELECT 1"))
    s.pool.refuse(BorrowTimeout("Timed-out waiting to acquire database connection"))
    [(seq, payload)] = s.packets()
    assert seq == 1
    assert err(payload) == (9501, "HY000", "Timed-out waiting to acquire database connection")
    assert not s.closed
    assert s.frontend.state is SessionState.IDLE
    q = query("SELECT 2")
    s.send(q)
    lease = s.pool.give()
    assert lease.conn.writes == [q]
    lease.conn.respond(*resultset([b"2"]))
    assert lease.released


def test_borrow_timeout_of_a_pipelined_command_serves_the_next(s):
    q2 = query("SELECT 2")
    s.send(query("SELECT 1") + q2)
    s.pool.refuse(BorrowTimeout("x"))
    [(_, payload)] = s.packets()
    assert err(payload)[0] == 9501
    lease = s.pool.give()
    assert lease.conn.writes == [q2]


def test_pool_closed_answers_shutting_down(s):
    s.send(query("SELECT 1"))
    s.pool.refuse(PoolClosed("app-my"))
    [(_, payload)] = s.packets()
    assert err(payload) == (1053, "08S01", "Server shutdown in progress")


def test_bad_charset_client_is_refused_without_borrowing(s):
    s.send(query("SET character_set_client = ucs2"))
    [(seq, payload)] = s.packets()
    assert seq == 1
    assert err(payload) == (1231, "42000",
                            "Variable 'character_set_client' can't be set to the value of 'ucs2'")
    assert s.pool.requests == [] and s.pool.try_borrows == 0
    assert not s.closed
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))]


def test_tracked_set_does_not_pin_and_is_synced_on_the_next_connection(s):
    s.send(query("SET time_zone = '+00:00'"))
    lease = s.pool.give()
    lease.conn.respond(ok())
    assert lease.released and s.frontend.pin_reason is None
    assert s.frontend.desired["time_zone"] == "+00:00"
    s.send(query("SELECT NOW()"))
    lease2 = s.pool.give()
    assert lease2.conn.synced and lease2.conn.synced[0][0]["time_zone"] == "+00:00"
    assert lease2.conn.writes == [query("SELECT NOW()")]


def _give_left_at(s, **values):
    """Lend a connection another session left with *values* (tracked) to the waiting borrow."""
    status = 0 if values.get("autocommit") == "0" else AC  # of that session's last OK
    return s.pool.give(current=dict(BASELINE, **values), tracker=ResponseTracker(BACKEND_CAPS, status))


@pytest.mark.parametrize("sql, values", [
    ("SET AUTOCOMMIT = 0", {"autocommit": "0"}),       # what PyMySQL sends on every connect
    ("SET autocommit=1", {"autocommit": "0"}),
    ("SET time_zone = '+01:00'", {"time_zone": "+05:00"}),
    ("set @@session.autocommit = OFF, time_zone='UTC'", {"autocommit": "1", "time_zone": "+05:00"}),
])
def test_a_set_of_autocommit_or_time_zone_is_not_synced_first(s, sql, values):
    s.send(query(sql))
    lease = _give_left_at(s, **values)
    conn = lease.conn
    assert conn.synced == []  # the SET itself establishes the value: no round trip before it
    assert conn.writes == [query(sql)]


def test_variables_the_set_does_not_assign_are_still_synced(s):
    s.send(query("SET autocommit = 0"))
    lease = _give_left_at(s, autocommit="0", time_zone="+05:00", sql_mode="ANSI")
    conn = lease.conn
    assert conn.current["time_zone"] == "SYSTEM" and conn.current["sql_mode"] == "STRICT_TRANS_TABLES"
    assert conn.current["autocommit"] == "0"  # left as it was: the SET sets it
    conn.respond(ok(0))
    assert s.frontend.desired["autocommit"] == "0" and conn.current["autocommit"] == "0"


@pytest.mark.parametrize("sql, values", [
    ("SET sql_mode = 'ANSI_QUOTES'", {"sql_mode": "ANSI"}),  # changes how the SET itself is read
    ("SET NAMES latin1", {"character_set_client": "latin1"}),
    ("SET autocommit = 0; SELECT @@autocommit", {"autocommit": "0"}),  # multi: later ones read it
    ("SELECT 1", {"autocommit": "0"}),
])
def test_other_commands_are_synced_first(s, sql, values):
    s.send(query(sql))
    lease = _give_left_at(s, **values)
    assert len(lease.conn.synced) == 1


def test_a_failed_set_leaves_the_connection_known_and_the_session_synced_next_time(s):
    s.send(query("SET autocommit = 0"))
    lease = _give_left_at(s, autocommit="0")
    lease.conn.respond(P.err_packet(1064, "42000", "boom"))  # ERR carries no server status
    assert lease.released
    assert lease.conn.current["autocommit"] == "0"  # what the connection really holds
    assert s.frontend.desired.get("autocommit", "1") == "1"  # not the other session's value
    s.send(query("SELECT 1"))
    lease2 = _give_left_at(s, autocommit="0")
    assert lease2.conn.synced and lease2.conn.synced[-1][0].get("autocommit", "1") == "1"


NBE = P.SERVER_STATUS_NO_BACKSLASH_ESCAPES


def test_local_ok_carries_no_backslash_escapes_of_the_sessions_sql_mode(s):
    # Clients (libmysqlclient's mysql_real_escape_string) escape by this flag of the last OK.
    s.send(query("SET @@session.sql_mode = 'NO_BACKSLASH_ESCAPES'"))
    lease = s.pool.give()
    lease.conn.respond(ok(AC | NBE))
    assert lease.released
    s.sent()
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC | NBE))]
    s.send(query("SET sql_mode = 'STRICT_TRANS_TABLES,no_backslash_escapes'"))
    s.pool.give().conn.respond(ok(AC | NBE))
    s.sent()
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC | NBE))]
    s.send(command(P.COM_RESET_CONNECTION))  # back to the connections' baseline
    assert s.packets() == [(1, P.ok_packet(status=AC))]


def test_local_ok_carries_no_backslash_escapes_of_the_baseline(s):
    s.connector.baseline = dict(BASELINE, sql_mode="NO_BACKSLASH_ESCAPES")
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC | NBE))]
    s.send(query("SET sql_mode = ''"))
    s.pool.give().conn.respond(ok(AC))
    s.sent()
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))]


def test_local_ok_carries_autocommit_of_the_baseline(s):
    s.connector.baseline = dict(BASELINE, autocommit="0")  # InitQuery: SET autocommit=0
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=0))]
    s.send(query("SET autocommit = 1"))
    s.pool.give().conn.respond(ok(AC))
    s.sent()
    s.send(command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))]


@pytest.mark.parametrize("sql, reason", [
    ("SET @x = 1", "user_variable"),
    ("LOCK TABLES t READ", "lock_tables"),
])
def test_pinning_statement_keeps_the_lease(s, sql, reason):
    s.send(query(sql))
    lease = s.pool.give()
    assert s.frontend.state is SessionState.PINNED
    assert lease.conn.session_dirty
    lease.conn.respond(ok())
    assert not lease.released and s.frontend.lease is lease
    assert s.frontend.state is SessionState.PINNED
    s.send(query("SELECT 1"))
    assert s.pool.requests == []
    lease.conn.respond(*resultset([b"1"]))
    assert not lease.released
    assert s.ctx.pin_counts == {reason: 1}
    s.lose()
    assert lease.release_args == dict(clean=True, needs_reset=True, reason=None)


def test_com_stmt_prepare_pins(s):
    packet = command(P.COM_STMT_PREPARE, b"SELECT 1")
    s.send(packet)
    lease = s.pool.give()
    assert lease.conn.writes == [packet]
    lease.conn.respond(prepare_ok(stmt_id=7, columns=1), coldef())
    assert not lease.released
    assert s.frontend.state is SessionState.PINNED
    assert s.ctx.pin_counts == {"prepared_statement": 1}


def test_pin_while_in_a_transaction(s):
    s.send(query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(ok(AC | INTX))
    s.send(query("SET @x = 1"))
    assert s.frontend.state is SessionState.PINNED and lease.conn.session_dirty
    lease.conn.respond(ok(AC | INTX))
    s.send(query("COMMIT"))
    lease.conn.respond(ok(AC))
    assert not lease.released


def test_stmt_close_without_a_connection_is_dropped(s):
    s.send(command(P.COM_STMT_CLOSE, struct.pack("<I", 1)) + command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))]
    assert s.pool.requests == []


def test_reset_connection_unpins(s):
    s.send(query("SET @x = 1"))
    lease = s.pool.give()
    lease.conn.respond(ok())
    s.sent()
    s.send(command(P.COM_RESET_CONNECTION))
    assert s.packets() == [(1, P.ok_packet(status=AC))]
    assert lease.release_args == dict(clean=True, needs_reset=True, reason=None)
    assert s.frontend.pin_reason is None and s.frontend.state is SessionState.IDLE


# -- disconnects --------------------------------------------------------------------------------------------
def test_client_disconnect_mid_command_releases_unclean(s):
    s.send(query("SELECT SLEEP(10)"))
    lease = s.pool.give()
    s.lose()
    assert lease.released
    assert lease.release_args == dict(clean=False, needs_reset=False,
                                      reason="client disconnected mid-request")
    assert lease.conn._sink is None
    assert s.frontend.state is SessionState.CLOSED
    assert s.frontend not in s.ctx.sessions


def test_client_disconnect_mid_packet_releases_unclean(s):
    q = query("SELECT '" + "x" * (100 * 1024) + "'")
    s.send(q[:20])
    lease = s.pool.give()
    s.lose()
    assert lease.release_args["clean"] is False


def test_clean_disconnect_in_a_transaction_needs_reset(s):
    s.send(query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(ok(AC | INTX))
    s.lose()
    assert lease.release_args == dict(clean=True, needs_reset=True, reason=None)


def test_disconnect_while_borrowing_cancels_the_borrow(s):
    s.send(query("SELECT 1"))
    assert len(s.pool.requests) == 1
    s.lose()
    assert s.pool.requests == []


def test_backend_lost_before_any_answer_fails_the_command_and_keeps_the_session(s):
    """The writer vanished (or crashed) while a command outside a transaction waited for its
    answer: ERR 2013 in the database's place, and the next command goes to a new connection."""
    s.send(query("SELECT SLEEP(10)", seq=0) + query("SELECT 2"))  # the second waits its turn
    lease = s.pool.give()
    assert lease.conn.writes == [query("SELECT SLEEP(10)")]
    s.frontend.backend_lost(lease.conn, "database closed the connection")
    assert lease.release_args["clean"] is False
    [(seq, payload)] = s.packets()
    assert seq == 1
    assert err(payload) == (2013, "HY000", "Lost connection to the database during the command")
    assert not s.closed
    again = s.pool.give()  # the pipelined command borrowed anew
    assert again.conn is not lease.conn and again.conn.writes == [query("SELECT 2")]
    again.conn.respond(*resultset([b"2"]))
    assert again.released and s.frontend.state is SessionState.IDLE


def test_backend_lost_answer_uses_the_sequence_after_the_command(s):
    s.send(query("SELECT 1", seq=7))  # sequence ids restart per command; be exact anyway
    lease = s.pool.give()
    s.frontend.backend_lost(lease.conn, "gone")
    [(seq, _)] = s.packets()
    assert seq == 8


def test_backend_lost_after_part_of_the_answer_closes_the_client(s):
    s.send(query("SELECT 1"))
    lease = s.pool.give()
    lease.conn.tracker.consume(bytearray(wire([b"\x01", coldef()], 1)), 0)
    s.frontend.backend_data(wire([b"\x01", coldef()], 1))  # the result set began
    s.sent()
    s.frontend.backend_lost(lease.conn, "database closed the connection")
    assert lease.release_args["clean"] is False
    assert s.closed and s.sent() == b""  # no error packet in the middle of a result set


def test_backend_lost_in_a_transaction_closes_the_client(s):
    s.send(query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(ok(AC | INTX))
    s.sent()
    s.send(query("INSERT INTO t VALUES (1)"))
    s.frontend.backend_lost(lease.conn, "database closed the connection")
    assert s.closed and s.sent() == b""  # its transaction is gone: as a crashed server would


def test_backend_lost_of_a_pinned_session_closes_the_client(s):
    s.send(query("SET @x = 1"))  # a user variable pins
    lease = s.pool.give()
    lease.conn.respond(ok(AC))
    assert s.frontend.pin_reason is not None
    s.sent()
    s.send(query("SELECT @x"))
    s.frontend.backend_lost(lease.conn, "database closed the connection")
    assert s.closed


def test_backend_lost_between_commands_closes_the_client(s):
    s.send(query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(ok(AC | INTX))
    s.sent()
    s.frontend.backend_lost(lease.conn, "database closed the connection")
    assert s.closed


def test_connection_lost_cancels_timers(s):
    s.lose()
    assert s.clock.getDelayedCalls() == []


# -- malformed input ----------------------------------------------------------------------------------------
def test_truncated_handshake_response_closes_without_error_packet(h):
    h.greeting()
    h.send(P.encode_packet(b"\x00\x02", 1))
    assert h.closed and h.sent() == b""


def test_handshake_response_with_a_lying_auth_length_closes(h):
    g = h.greeting()
    good = hs.build_handshake_response41(CLIENT_CAPS & g.capabilities, USER,
                                         myauth.native_password_scramble(PASSWORD, g.scramble))
    at = good.index(b"u\x00") + 2
    assert good[at] == 20
    bad = good[:at] + b"\x30" + good[at + 1:]  # says 48 bytes, 20 follow
    h.send(P.encode_packet(bad, 1))
    assert h.closed and h.sent() == b""


def test_handshake_packet_above_the_limit_closes(h):
    h.greeting()
    h.send(struct.pack("<I", mysql_frontend.MAX_LOCAL_COMMAND + 1)[:3] + b"\x01")
    assert h.closed and h.sent() == b""


def test_empty_command_closes(s):
    s.send(b"\x00\x00\x00\x00")
    assert s.closed and s.sent() == b""
    assert s.pool.requests == [] and s.pool.try_borrows == 0


def test_empty_command_followed_by_more_data_closes(s):
    # The next packet's first header byte (0x01) must not be read as a command (COM_QUIT).
    s.send(b"\x00\x00\x00\x00" + command(P.COM_PING))
    assert s.closed and s.sent() == b""


def test_empty_command_followed_by_a_query_is_not_forwarded(s):
    q = query("SELECT 1234")  # length 12: its first byte would read as COM_PROCESS_KILL
    s.send(b"\x00\x00\x00\x00" + q)
    assert s.closed and s.sent() == b""
    assert s.pool.requests == [] and s.pool.try_borrows == 0


def test_local_command_longer_than_the_limit_closes(s):
    length = mysql_frontend.MAX_LOCAL_COMMAND + 10
    s.send(struct.pack("<I", length)[:3] + b"\x00" + bytes((P.COM_PING,)))
    assert s.closed and s.sent() == b""


# -- idle timeout ----------------------------------------------------------------------------------------
def test_idle_client_timeout(s):
    timeout = s.ctx.config.idle_client_timeout
    assert timeout == 1800
    s.clock.advance(timeout - 1)
    assert not s.closed
    s.clock.advance(1)
    assert s.closed
    assert s.sent() == b""


def test_idle_client_timeout_counts_from_the_last_activity():
    h = Harness(IdleClientTimeout=100)
    h.login()
    h.clock.advance(60)
    h.send(command(P.COM_PING))
    h.clock.advance(99)
    assert not h.closed
    h.clock.advance(1)
    assert h.closed


def test_idle_client_timeout_leaves_a_busy_session_alone():
    h = Harness(IdleClientTimeout=100)
    h.login()
    h.send(query("SELECT SLEEP(1000)"))
    lease = h.pool.give()
    h.clock.advance(500)
    assert not h.closed
    lease.conn.respond(ok())
    assert lease.released
    assert not h.closed


# -- KILL by the session id from the greeting ----------------------------------------------------------
def test_kill_of_another_users_session_is_refused(s):
    other = Harness(ctx=s.ctx)
    other.login()
    other.frontend.user = "someone_else"
    s.send(query(b"KILL QUERY %d" % other.frontend.id))
    [(seq, payload)] = s.packets()
    assert seq == 1 and err(payload) == (1095, "HY000", f"You are not owner of thread {other.frontend.id}")
    assert not other.closed and s.pool.requests == []


def test_kill_connection_ends_that_session_only(s):
    other = Harness(ctx=s.ctx)
    other.login()
    s.send(query(b"KILL %d" % other.frontend.id))
    assert s.packets() == [(1, P.ok_packet(status=AC))]
    assert other.closed and not s.closed


def test_kill_query_of_an_idle_session_is_ok_without_a_database(s):
    other = Harness(ctx=s.ctx)
    other.login()
    s.send(query(b"kill query %d;" % other.frontend.id))
    assert s.packets() == [(1, P.ok_packet(status=AC))]
    assert s.pool.requests == [] and not other.closed


def test_kill_of_an_unknown_id_goes_to_the_server(s):
    s.send(query(b"KILL QUERY 999999"))
    lease = s.pool.give()
    assert lease.conn.writes == [query(b"KILL QUERY 999999")]


def test_kill_query_is_translated_to_the_serving_connections_thread_id(s):
    victim = Harness(ctx=s.ctx)
    victim.login()
    victim.send(query(b"SELECT SLEEP(10)"))
    busy = s.pool.give()  # the victim's connection
    assert busy.conn.writes == [query(b"SELECT SLEEP(10)")]
    thread = busy.conn.handshake.connection_id
    s.send(query(b"KILL QUERY %d" % victim.frontend.id))
    mine = s.pool.give()
    assert mine.conn.writes == [query(b"KILL QUERY %d" % thread)]


def test_queries_are_counted_for_query_requests(s):
    s.send(query(b"SELECT 1"))
    lease = s.pool.give()
    lease.conn.respond(*resultset([b"1"]))
    s.send(query(b"SELECT 2"))
    assert s.frontend.queries == 2
