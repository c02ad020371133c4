"""proxy/pg_frontend.py driven with StringTransport, task.Clock, a fake pool and a fake secrets store."""

import struct

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.config.load import parse_config
from txrdsproxy.pool.pool import BorrowTimeout, PoolClosed
from txrdsproxy.proxy.pg_frontend import PgFrontend
from txrdsproxy.proxy.session import ProxyContext, SessionState
from txrdsproxy.testing.fakes import ClientTransport, FakePgBackendConn, FakePool, FakeSecrets
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.auth import ScramClient, md5_response
from txrdsproxy.wire.pg.framing import split_messages

ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"
USER, PASSWORD = "bob", "s3cret"
KEY = (USER, "app", False)  # last: TLS to the database
SYNC = b"S\0\0\0\x04"
EXECUTE = b"E\0\0\0\x09\0\0\0\0\0"
PARSE = b"P\0\0\0\x10\0SELECT 1\0\0\0"  # unnamed statement: does not pin
BIND = b"B\0\0\0\x0c\0\0\0\0\0\0\0\0"


# -- helpers ------------------------------------------------------------------------------------------
def proxy_config(auth_type="POSTGRES_MD5", **extra):
    proxy = {
        "DBProxyName": "app-pg", "EngineFamily": "POSTGRESQL", "Listen": "tcp:6432",
        "Auth": [{"SecretArn": ARN, "ClientPasswordAuthType": auth_type}],
        "TargetGroups": [{"Targets": [{"RdsResourceId": "pg-1", "Endpoint": "127.0.0.1", "Port": 5432}]}],
    }
    proxy.update(extra)
    return parse_config({"Secrets": {"Path": "/s.json"}, "DBProxies": [proxy]}).proxies[0]


class Harness:
    def __init__(self, auth_type="POSTGRES_MD5", **extra):
        self.clock = Clock()
        self.pool = FakePool(FakePgBackendConn)
        self.ctx = ProxyContext(proxy_config(auth_type, **extra), self.pool, FakeSecrets({ARN: Credentials(USER, PASSWORD, ARN)}), self.clock)
        self.frontend = PgFrontend(self.ctx)
        self.transport = ClientTransport()
        self.frontend.makeConnection(self.transport)

    def send(self, data):
        self.frontend.dataReceived(data)

    def sent(self):
        """What the proxy wrote to the client since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def messages(self):
        out, used = split_messages(self.sent(), 1 << 30)
        return out

    def startup(self, **params):
        params = params or {"user": USER, "database": "app"}
        self.send(msg.startup_message(params))

    def md5_login(self):
        self.startup()
        [(kind, payload)] = self.messages()
        assert kind == b"R" and payload[:4] == b"\0\0\0\x05"
        self.send(msg.password_message(md5_response(USER, PASSWORD, payload[4:8])))

    def login(self):
        """Log in with MD5 and answer the login borrow: the session ends up idle."""
        self.md5_login()
        self.pool.give()
        out = self.messages()
        assert out[-1] == (b"Z", b"I")
        assert self.frontend.state is SessionState.IDLE
        return out

    @property
    def closed(self):
        return self.transport.disconnecting

    def lose(self):
        self.frontend.connectionLost(Failure(ConnectionError("gone")))


def fatal(data):
    """-> the fields of the single ErrorResponse in *data*."""
    [(kind, payload)] = split_messages(data, 1 << 20)[0]
    assert kind == b"E"
    return msg.parse_error_fields(payload)


@pytest.fixture
def h():
    return Harness()


@pytest.fixture
def s():
    """A logged-in session whose login borrow has been answered."""
    harness = Harness()
    harness.login()
    return harness


# -- startup --------------------------------------------------------------------------------------------
def test_ssl_request_is_refused_with_n(h):
    h.send(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
    assert h.sent() == b"N"
    assert not h.closed
    h.startup()
    assert h.messages()[0][0] == b"R"


def test_gssenc_request_is_refused_with_n(h):
    h.send(b"\x00\x00\x00\x08\x04\xd2\x16\x30")
    assert h.sent() == b"N"


def test_ssl_request_split_over_several_reads(h):
    for b in b"\x00\x00\x00\x08\x04\xd2\x16":
        h.send(bytes([b]))
        assert h.sent() == b""
    h.send(b"\x2f")
    assert h.sent() == b"N"


def test_protocol_2_is_refused_with_the_rds_text(h):
    h.send(struct.pack("!II", 8 + 4, 2 << 16) + b"\0\0\0\0")
    f = fatal(h.sent())
    assert f["S"] == "FATAL" and f["C"] == "0A000"
    assert f["M"] == "Feature not supported: RDS Proxy supports only version 3.0 of the PostgreSQL messaging protocol."
    assert h.closed


def test_missing_user(h):
    h.startup(database="app")
    f = fatal(h.sent())
    assert (f["C"], f["M"]) == (
        "28000", "A user name is missing from the connection startup packet. Provide a user name for this connection.")
    assert h.closed


def test_replication_is_refused(h):
    h.startup(user=USER, replication="database")
    f = fatal(h.sent())
    assert f["M"] == "Feature not supported: RDS Proxy currently doesn't support streaming replication mode."
    assert h.closed


def test_replication_false_is_accepted(h):
    h.startup(user=USER, database="app", replication="false")
    assert h.messages()[0][0] == b"R"


def test_unsupported_option(h):
    h.startup(user=USER, options="-c search_path=x")
    f = fatal(h.sent())
    assert (f["C"], f["M"]) == ("0A000", "Feature not supported: RDS Proxy currently doesn't support the option options.")
    assert h.closed


def test_unknown_user_has_no_credentials(h):
    h.startup(user="mallory")
    f = fatal(h.sent())
    assert (f["C"], f["M"]) == ("28000", "This RDS proxy has no credentials for the role mallory. "
                                         "Check the credentials for this role and try again.")


def test_non_utf8_startup_is_a_protocol_violation(h):
    body = struct.pack("!I", 3 << 16) + b"user\0b\xffb\0\0"
    h.send(struct.pack("!I", len(body) + 4) + body)
    assert fatal(h.sent())["C"] == "08P01"
    assert h.closed


def test_startup_with_a_lying_length(h):
    h.send(b"\x00\x00\x00\x04")
    f = fatal(h.sent())
    assert f["C"] == "08P01" and f["M"] == "Invalid message from the client: protocol violation."
    assert h.closed


# -- authentication -----------------------------------------------------------------------------------------
def test_md5_success(h):
    h.md5_login()
    out = h.messages()
    assert out == [(b"R", b"\0\0\0\0")]
    assert h.pool.requests and h.pool.requests[0][0] == KEY
    lease = h.pool.give()
    out = h.messages()
    assert lease.released and lease.release_args["clean"]
    kinds = [k for k, _ in out]
    assert kinds[-2:] == [b"K", b"Z"] and set(kinds[:-2]) == {b"S"}
    params = dict(msg.parse_parameter_status(p) for k, p in out if k == b"S")
    assert params == {"server_version": "15.4", "client_encoding": "UTF8", "TimeZone": "UTC"}
    assert out[-1] == (b"Z", b"I")
    assert h.frontend.state is SessionState.IDLE
    assert h.frontend.key == KEY


def test_second_login_uses_the_cached_welcome():
    first = Harness()
    first.login()
    second = Harness()
    second.ctx = first.ctx
    second.frontend = PgFrontend(first.ctx)
    second.frontend.makeConnection(second.transport)
    second.md5_login()
    out = second.messages()
    assert out[0] == (b"R", b"\0\0\0\0") and out[-1] == (b"Z", b"I")
    assert first.pool.requests == []


def test_md5_wrong_password(h):
    h.startup()
    [(_, payload)] = h.messages()
    h.send(msg.password_message(md5_response(USER, "wrong", payload[4:8])))
    f = fatal(h.sent())
    assert (f["S"], f["C"], f["M"]) == ("FATAL", "28P01", f"The password that was provided for the role {USER} is wrong.")
    assert h.closed
    assert h.pool.requests == []


def test_auth_requires_a_password_message(h):
    h.startup()
    h.sent()
    h.send(msg.query("SELECT 1"))
    assert fatal(h.sent())["C"] == "08P01"


def test_auth_timeout(h):
    h.startup()
    h.sent()
    h.clock.advance(59)
    assert not h.closed
    h.clock.advance(1)
    assert fatal(h.sent())["M"] == "Authentication timed out."
    assert h.closed


def test_scram_happy_path():
    h = Harness("POSTGRES_SCRAM_SHA_256")
    h.startup()
    [(kind, payload)] = h.messages()
    assert kind == b"R" and payload == b"\0\0\0\x0aSCRAM-SHA-256\0\0"
    client = ScramClient(USER, PASSWORD)
    h.send(msg.sasl_initial("SCRAM-SHA-256", client.client_first()))
    [(kind, payload)] = h.messages()
    assert kind == b"R" and payload[:4] == b"\0\0\0\x0b"
    h.send(msg.message(b"p", client.server_first(payload[4:])))
    out = h.messages()
    assert out[0][0] == b"R" and out[0][1][:4] == b"\0\0\0\x0c"
    client.server_final(out[0][1][4:])  # raises if the server's signature is wrong
    assert out[1] == (b"R", b"\0\0\0\0")
    h.pool.give()
    assert h.messages()[-1] == (b"Z", b"I")


def test_scram_wrong_password():
    h = Harness("POSTGRES_SCRAM_SHA_256")
    h.startup()
    h.sent()
    client = ScramClient(USER, "wrong")
    h.send(msg.sasl_initial("SCRAM-SHA-256", client.client_first()))
    [(_, payload)] = h.messages()
    h.send(msg.message(b"p", client.server_first(payload[4:])))
    assert fatal(h.sent())["C"] == "28P01"
    assert h.closed


def test_login_borrow_timeout_is_fatal(h):
    h.md5_login()
    h.sent()
    h.pool.refuse(BorrowTimeout("x"))
    f = fatal(h.sent())
    assert (f["S"], f["C"], f["M"]) == ("FATAL", "53300", "Timed-out waiting to acquire database connection.")
    assert h.closed


# -- the session ------------------------------------------------------------------------------------------------
def test_query_waits_for_the_borrow_then_goes_to_the_database(s):
    q = msg.query("SELECT 1")
    s.send(q)
    assert s.frontend.state is SessionState.BORROWING
    assert [k for k, _ in s.pool.requests] == [KEY]
    s.send(msg.query("SELECT 2"))  # still waiting: buffered, no second borrow
    assert len(s.pool.requests) == 1
    lease = s.pool.give()
    assert lease.conn.transport.value() == q + msg.query("SELECT 2")
    assert lease.conn.sink is s.frontend
    assert s.frontend.state is SessionState.BORROWED
    assert s.sent() == b""


def test_ready_for_query_idle_releases_the_lease(s):
    s.send(msg.query("SELECT 1"))
    lease = s.pool.give()
    reply = b"T\0\0\0\x06\0\0" + b"C\0\0\0\x0dSELECT 1\0" + msg.ready_for_query(b"I")
    s.frontend.backend_data(reply)
    s.frontend.ready_for_query(b"I")
    assert s.sent() == reply
    assert lease.released and lease.release_args == dict(clean=True, needs_reset=False, reason=None)
    assert lease.conn.sink is None
    assert s.frontend.state is SessionState.IDLE
    assert s.frontend.lease is None
    # The next query borrows again.
    s.send(msg.query("SELECT 3"))
    assert len(s.pool.requests) == 1


def test_ready_for_query_in_transaction_keeps_the_lease(s):
    s.send(msg.query("BEGIN"))
    lease = s.pool.give()
    s.frontend.ready_for_query(b"T")
    assert not lease.released
    s.send(msg.query("SELECT 1"))
    assert lease.conn.transport.value() == msg.query("BEGIN") + msg.query("SELECT 1")
    assert s.pool.requests == []
    s.frontend.ready_for_query(b"T")
    s.send(msg.query("COMMIT"))
    s.frontend.ready_for_query(b"I")
    assert lease.released


def test_failed_transaction_keeps_the_lease(s):
    s.send(msg.query("BEGIN; SELECT 1/0"))
    lease = s.pool.give()
    s.frontend.ready_for_query(b"E")
    assert not lease.released


def test_extended_protocol_pipeline_counts_syncs(s):
    batch = PARSE + BIND + EXECUTE + SYNC
    s.send(batch + batch)
    lease = s.pool.give()
    assert lease.conn.transport.value() == batch + batch
    assert s.frontend.outstanding == 2
    s.frontend.ready_for_query(b"I")
    assert not lease.released
    s.frontend.ready_for_query(b"I")
    assert lease.released


def test_messages_after_the_last_sync_keep_the_lease(s):
    s.send(PARSE + BIND + EXECUTE + SYNC + PARSE + BIND)
    lease = s.pool.give()
    s.frontend.ready_for_query(b"I")
    assert not lease.released
    s.send(EXECUTE + SYNC)
    s.frontend.ready_for_query(b"I")
    assert lease.released


def test_pipeline_split_one_byte_at_a_time(s):
    data = msg.query("SELECT 1") + PARSE + BIND + EXECUTE + SYNC
    for b in data[:-1]:
        s.send(bytes([b]))
    assert len(s.pool.requests) == 1
    lease = s.pool.give()
    s.send(data[-1:])
    assert lease.conn.transport.value() == data
    assert s.frontend.outstanding == 2
    s.frontend.ready_for_query(b"I")
    s.frontend.ready_for_query(b"I")
    assert lease.released


def test_set_pins_the_session(s):
    s.send(msg.query("SET x = 1"))
    lease = s.pool.give()
    assert s.frontend.state is SessionState.PINNED
    assert lease.conn.session_dirty
    s.frontend.ready_for_query(b"I")
    assert not lease.released
    assert s.frontend.lease is lease
    s.send(msg.query("SELECT 1"))
    s.frontend.ready_for_query(b"I")
    assert not lease.released
    assert s.pool.requests == []
    assert s.ctx.pin_counts == {"set_variable": 1}
    # At the end the pinned connection goes back to be reset.
    s.lose()
    assert lease.release_args == dict(clean=True, needs_reset=True, reason=None)


def test_set_pins_while_the_lease_is_held(s):
    s.send(msg.query("BEGIN"))
    lease = s.pool.give()
    s.frontend.ready_for_query(b"T")
    s.send(msg.query("SET x = 1"))
    assert s.frontend.state is SessionState.PINNED
    assert lease.conn.session_dirty
    s.frontend.ready_for_query(b"I")
    assert not lease.released


def test_set_does_not_pin_with_exclude_variable_sets():
    h = Harness(TargetGroups=[{
        "ConnectionPoolConfig": {"SessionPinningFilters": ["EXCLUDE_VARIABLE_SETS"]},
        "Targets": [{"RdsResourceId": "pg-1", "Endpoint": "127.0.0.1", "Port": 5432}]}])
    h.login()
    h.send(msg.query("SET x = 1"))
    lease = h.pool.give()
    h.frontend.ready_for_query(b"I")
    assert lease.released
    assert h.frontend.pin_reason is None


def test_borrow_timeout_answers_and_keeps_the_session(s):
    s.send(msg.query("SELECT 1"))
    s.pool.refuse(BorrowTimeout("Timed-out waiting to acquire database connection"))
    out = s.messages()
    assert [k for k, _ in out] == [b"E", b"Z"]
    f = msg.parse_error_fields(out[0][1])
    assert (f["S"], f["C"], f["M"]) == ("ERROR", "53300", "Timed-out waiting to acquire database connection.")
    assert out[1] == (b"Z", b"I")
    assert not s.closed
    assert s.frontend.state is SessionState.IDLE
    # Still usable.
    s.send(msg.query("SELECT 2"))
    lease = s.pool.give()
    assert lease.conn.transport.value() == msg.query("SELECT 2")
    s.frontend.ready_for_query(b"I")
    assert lease.released


def test_borrow_timeout_mid_batch_discards_until_sync(s):
    s.send(PARSE + BIND)
    s.pool.refuse(BorrowTimeout("x"))
    out = s.messages()
    assert [k for k, _ in out] == [b"E"]
    s.send(EXECUTE + SYNC)
    assert s.messages() == [(b"Z", b"I")]
    assert s.pool.requests == []
    s.send(msg.query("SELECT 1"))
    assert len(s.pool.requests) == 1


def test_pool_closed_answers_shutting_down(s):
    s.send(msg.query("SELECT 1"))
    s.pool.refuse(PoolClosed("app-pg"))
    out = s.messages()
    assert msg.parse_error_fields(out[0][1])["C"] == "57P01"


def test_terminate_closes_without_forwarding(s):
    s.send(msg.TERMINATE)
    assert s.closed
    assert s.pool.requests == []


def test_terminate_with_a_lease_is_not_forwarded(s):
    s.send(msg.query("BEGIN"))
    lease = s.pool.give()
    s.frontend.ready_for_query(b"T")
    s.send(msg.query("COMMIT") + msg.TERMINATE)
    assert lease.conn.transport.value() == msg.query("BEGIN") + msg.query("COMMIT")
    assert s.closed
    s.frontend.ready_for_query(b"I")
    s.lose()
    assert lease.released and lease.release_args["clean"]


def test_malformed_length_is_fatal(s):
    s.send(b"Q\0\0\0\x02")
    f = fatal(s.sent())
    assert (f["S"], f["C"]) == ("FATAL", "08P01")
    assert s.closed


def test_length_above_max_message_size_is_fatal():
    h = Harness(MaxMessageSize=1024)
    h.login()
    h.send(b"Q\0\0\x04\x01")
    assert fatal(h.sent())["C"] == "08P01"
    assert h.closed


def test_client_disconnect_mid_request_releases_unclean(s):
    s.send(msg.query("SELECT pg_sleep(10)"))
    lease = s.pool.give()
    s.lose()
    assert lease.released
    assert lease.release_args["clean"] is False
    assert lease.release_args["reason"] == "client disconnected mid-request"
    assert s.frontend.state is SessionState.CLOSED
    assert s.frontend not in s.ctx.sessions


def test_client_disconnect_in_transaction_asks_for_a_reset(s):
    s.send(msg.query("BEGIN"))
    lease = s.pool.give()
    lease.conn.txn_status = b"T"
    s.frontend.ready_for_query(b"T")
    s.lose()
    assert lease.release_args == dict(clean=True, needs_reset=True, reason=None)


def test_client_disconnect_while_borrowing_cancels_the_borrow(s):
    s.send(msg.query("SELECT 1"))
    assert len(s.pool.requests) == 1
    s.lose()
    assert s.pool.requests == []


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
    h.send(msg.query("SELECT 1"))
    lease = h.pool.give()
    h.frontend.ready_for_query(b"I")
    h.clock.advance(99)
    assert not h.closed
    h.clock.advance(1)
    assert h.closed
    assert lease.released


def test_idle_client_timeout_leaves_a_busy_session_alone():
    h = Harness(IdleClientTimeout=100)
    h.login()
    h.send(msg.query("SELECT pg_sleep(1000)"))
    h.pool.give()
    h.clock.advance(500)
    assert not h.closed
    h.frontend.ready_for_query(b"I")
    # Idle time counts from the end of the previous request (RDS Proxy user guide).
    h.clock.advance(99)
    assert not h.closed
    h.clock.advance(1)
    assert h.closed


def test_connection_lost_cancels_timers(s):
    s.lose()
    assert s.clock.getDelayedCalls() == []


def test_connection_with_a_cancel_in_flight_is_held_until_the_server_took_it(s):
    """A cancel still travelling must not reach the next borrower's query."""
    s.send(msg.query("SELECT pg_sleep(10)"))
    lease = s.pool.give()
    cancelling = defer.Deferred()
    lease.conn.cancel_in_flight = cancelling
    s.frontend.ready_for_query(b"I")
    assert s.frontend.lease is None and s.frontend.state is SessionState.IDLE
    assert not lease.released
    cancelling.callback(None)
    assert lease.released and lease.release_args["clean"] is True


def test_database_connection_lost_mid_query_fails_the_query_and_keeps_the_session(s):
    """The writer vanished (or crashed) while a query outside a transaction waited for its
    answer: an ERROR and ReadyForQuery in the server's place; the next query borrows anew."""
    s.send(msg.query("SELECT pg_sleep(10)"))
    lease = s.pool.give()
    s.frontend.backend_lost(lease.conn, "database closed the connection (reset by peer)")
    assert lease.released and lease.release_args["clean"] is False
    (kind, payload), ready = s.messages()
    error = msg.parse_error_fields(payload)
    assert (kind, error["S"], error["C"]) == (b"E", "ERROR", "08006")
    assert "reset by peer" in error["M"] and "outcome is unknown" in error["M"]
    assert ready == (b"Z", b"I")
    assert not s.closed and s.frontend.state is SessionState.IDLE
    s.send(msg.query("SELECT 1"))
    again = s.pool.give()
    assert again is not lease and not again.released


def test_database_connection_lost_answers_each_pipelined_query(s):
    s.send(msg.query("SELECT 1") + msg.query("SELECT 2"))
    lease = s.pool.give()
    s.frontend.backend_lost(lease.conn, "gone")
    kinds = [k for k, _ in s.messages()]
    assert kinds == [b"E", b"Z", b"E", b"Z"] and not s.closed


@pytest.mark.parametrize("case", ["transaction", "pinned", "mid_message", "open_batch"])
def test_database_connection_lost_closes_a_session_that_loses_more(s, case):
    """In a transaction, pinned, with a server message half passed on, or inside an extended
    batch not yet synced: its state is gone, so FATAL and close, as a crashed server does."""
    if case == "pinned":
        s.send(msg.query("SET work_mem = '8MB'"))
        lease = s.pool.give()
        assert s.frontend.pin_reason is not None
    else:
        parse = b"P" + struct.pack("!I", 4 + 12) + b"\0SELECT 1\0\0\0"  # unnamed, no Sync yet
        s.send(msg.query("SELECT 1") if case != "open_batch" else parse)
        lease = s.pool.give()
        if case == "transaction":
            lease.conn.txn_status = b"T"
        elif case == "mid_message":
            lease.conn.mid_message = True
    s.sent()
    s.frontend.backend_lost(lease.conn, "database closed the connection (reset by peer)")
    error = fatal(s.sent())
    assert error["C"] == "08006" and "reset by peer" in error["M"]
    assert s.closed
    assert lease.released and lease.release_args["clean"] is False


def test_database_fatal_error_is_the_last_word_the_client_gets(s):
    """The server forwarded a FATAL (pg_terminate_backend, idle_session_timeout...) then closed:
    the client must see that reason, as it would directly, not an error of the proxy's after it."""
    s.send(msg.query("SELECT pg_sleep(10)"))
    lease = s.pool.give()
    fatal_error = msg.error_response("57P01", "terminating connection due to administrator command")
    s.frontend.backend_data(fatal_error)
    lease.conn.fatal_error = msg.parse_error_fields(fatal_error[5:])
    s.frontend.backend_lost(lease.conn, "database ended the session: terminating connection")
    assert s.sent() == fatal_error
    assert s.closed
    assert lease.released and lease.release_args["clean"] is False


class FakeConnector:
    def __init__(self):
        self.cancels = []  # [(backend conn, Deferred the test fires when the server took it)]

    def send_cancel(self, conn):
        d = defer.Deferred()
        self.cancels.append((conn, d))
        return d


def _cancel_request(s, pid=None, secret=None):
    """A second connection to the same proxy sending a CancelRequest for session *s*."""
    key_pid, key_secret = s.frontend._cancel_key
    other = PgFrontend(s.ctx)
    transport = ClientTransport()
    other.makeConnection(transport)
    other.dataReceived(msg.cancel_request(key_pid if pid is None else pid,
                                          key_secret if secret is None else secret))
    return transport


def test_cancel_socket_closes_only_once_the_database_took_the_cancel(s):
    """As PostgreSQL does: the client may send its next query as soon as it sees the close."""
    s.ctx.connector = FakeConnector()
    s.send(msg.query("SELECT pg_sleep(10)"))
    lease = s.pool.give()
    cancel_transport = _cancel_request(s)
    [(conn, done)] = s.ctx.connector.cancels
    assert conn is lease.conn
    assert not cancel_transport.disconnecting
    done.callback(None)
    assert cancel_transport.disconnecting
    assert cancel_transport.value() == b""


def test_cancel_of_an_idle_session_or_a_wrong_key_closes_at_once(s):
    s.ctx.connector = FakeConnector()
    assert _cancel_request(s).disconnecting  # no query running: nothing to send
    s.send(msg.query("SELECT pg_sleep(10)"))
    s.pool.give()
    pid, secret = s.frontend._cancel_key
    assert _cancel_request(s, secret=secret ^ 1).disconnecting
    assert s.ctx.connector.cancels == []


def test_debug_logging_logs_statement_text_and_stops_after_24_hours():
    from twisted.logger import globalLogPublisher
    lines = []

    def observer(event):
        if "sql" in event:
            lines.append(event["sql"])

    globalLogPublisher.addObserver(observer)
    try:
        harness = Harness(DebugLogging=True)
        harness.login()
        harness.send(msg.query("SELECT 'visible', 42 FROM t"))
        harness.pool.give()  # statements are logged as they go to the database
        assert lines == ["SELECT ?, ? FROM t"]  # literals masked by default
        harness.clock.advance(24 * 3600 + 1)
        harness.send(msg.query("SELECT 'hidden'"))
        assert lines == ["SELECT ?, ? FROM t"]
    finally:
        globalLogPublisher.removeObserver(observer)
