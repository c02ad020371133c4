"""Every wait on a database has an end (issue 6 item 9), on task.Clock.

Connector.open bounds TCP connect + login + InitQuery as one deadline; BackendConnection.bounded
bounds each internal operation (parameter sync, reset, health-check query); send_oob bounds a
CancelRequest.  On expiry the connection is closed with a reason, the waiting Deferred fails with
BackendGone saying what timed out, and the pool is told (its slot is freed).
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.config.model import ConnectionPoolConfig
from txrdsproxy.failover.topology import Topology
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy import mysql_backend, pg_backend
from txrdsproxy.proxy.connector import BackendGone, enable_keepalive
from txrdsproxy.wire.pg import messages as msg

from tests.unit.test_failover import W
from tests.unit.test_pg_backend import LOGIN_OK, show_result, take_startup

CREDS = Credentials("app", "pw")



class KeepAliveTransport(StringTransport):
    keepalive = None

    def setTcpKeepAlive(self, on):
        self.keepalive = on


def pg_connector(clock, init_query="", connect_timeout=30.0, operation_timeout=20.0):
    return pg_backend.PgConnector(clock, Topology([W]), lambda user: CREDS, init_query, 1 << 20,
                                  connect_timeout=connect_timeout, operation_timeout=operation_timeout)


def outcome(d):
    box = []
    d.addBoth(box.append)
    return box


def connect(endpoints, conn_):
    """Start a connect; -> (Deferred, backend connection, its transport) once TCP is up."""
    d = conn_.connect(("app", "db"))
    _, factory, connected = endpoints[-1]
    conn = factory.proto
    transport = KeepAliveTransport()
    conn.makeConnection(transport)
    connected.callback(conn)
    return d, conn, transport


def logged_in(endpoints, clock):
    conn_ = pg_connector(clock)
    d, conn, t = connect(endpoints, conn_)
    take_startup(t)
    conn.dataReceived(LOGIN_OK)
    conn.dataReceived(show_result())
    box = outcome(d)
    assert box == [conn]
    t.clear()
    return conn_, conn, t


def test_tcp_connect_that_never_completes_fails_after_the_connect_timeout(endpoints):
    clock = Clock()
    d = pg_connector(clock, connect_timeout=7).connect(("app", "db"))
    box = outcome(d)
    _, _, connecting = endpoints[0]
    clock.advance(6.9)
    assert box == []
    clock.advance(0.2)
    assert box[0].check(BackendGone)
    assert "timed out after 7 s" in box[0].getErrorMessage()
    assert not clock.getDelayedCalls()


def test_login_that_gets_no_answer_closes_the_connection_with_a_reason(endpoints):
    clock = Clock()
    d, conn, t = connect(endpoints, pg_connector(clock, connect_timeout=5))
    box = outcome(d)
    assert t.keepalive == 1  # TCP keepalive on the database socket
    clock.advance(5)
    assert box[0].check(BackendGone)
    assert "database login to 10.0.0.1:5432 timed out after 5 s" in box[0].getErrorMessage()
    assert conn.state == "closed"
    assert t.disconnecting  # aborted: StringTransport records both as disconnecting
    assert not clock.getDelayedCalls()


def test_init_query_that_hangs_is_bounded_by_the_same_deadline(endpoints):
    clock = Clock()
    d, conn, t = connect(endpoints, pg_connector(clock, init_query="SELECT pg_sleep(1000)",
                                                 connect_timeout=10, operation_timeout=100))
    box = outcome(d)
    take_startup(t)
    conn.dataReceived(LOGIN_OK)
    conn.dataReceived(show_result())  # SHOW max_connections answered; InitQuery now waits
    assert conn.state == "initialising" and box == []
    clock.advance(10)
    assert box[0].check(BackendGone) and "timed out" in box[0].getErrorMessage()
    assert conn.state == "closed"


def test_a_login_that_completes_cancels_its_deadline(endpoints):
    clock = Clock()
    logged_in(endpoints, clock)
    assert not clock.getDelayedCalls()


def test_internal_operation_without_answer_closes_the_connection_and_tells_the_pool(endpoints):
    clock = Clock()
    _, conn, t = logged_in(endpoints, clock)
    lost = []
    conn.pool_listener = lambda c, why: lost.append((c, why))
    d = conn.sync_params({"TimeZone": "UTC"})
    box = outcome(d)
    clock.advance(19.9)
    assert box == [] and conn.state != "closed"
    clock.advance(0.1)
    assert box[0].check(BackendGone)
    assert box[0].getErrorMessage() == "internal query timed out after 20 s"
    assert lost == [(conn, "internal query timed out after 20 s")]
    assert conn.state == "closed"
    assert not clock.getDelayedCalls()


def test_an_answered_internal_operation_leaves_no_timer(endpoints):
    clock = Clock()
    _, conn, t = logged_in(endpoints, clock)
    d = conn.run_internal(b"SELECT 1")
    assert clock.getDelayedCalls()
    conn.dataReceived(msg.message(b"C", b"SELECT 1\0") + msg.ready_for_query())
    assert outcome(d) == [[]]
    assert not clock.getDelayedCalls()


def test_reset_of_a_stalled_connection_frees_the_pool_slot(endpoints):
    """The pool lends a connection, the session leaves it dirty, the reset hangs: after
    DatabaseOperationTimeout the connection is closed and the next borrow opens a new one."""
    clock = Clock()
    conn_ = pg_connector(clock, operation_timeout=15)
    pool = BackendPool("p", conn_, ConnectionPoolConfig(connection_borrow_timeout=0), clock)
    d = pool.borrow(("app", "db"))
    _, factory, connected = endpoints[0]
    conn = factory.proto
    t = KeepAliveTransport()
    conn.makeConnection(t)
    connected.callback(conn)
    take_startup(t)
    conn.dataReceived(LOGIN_OK)
    conn.dataReceived(show_result())
    lease = outcome(d)[0]
    conn.txn_status = b"T"
    lease.release(clean=True, needs_reset=True)
    assert conn.state == "resetting" and b"ROLLBACK" in t.value()
    clock.advance(15)
    assert conn.state == "closed"
    assert pool.connections() == []  # the slot is free
    d2 = pool.borrow(("app", "db"))
    assert len(endpoints) == 2 and not d2.called  # a new connection is being opened for it


def test_health_check_query_without_answer_fails_and_closes(endpoints):
    clock = Clock()
    conn_ = pg_connector(clock)
    d = conn_.probe_role(W, CREDS)
    box = outcome(d)
    _, factory, connected = endpoints[0]
    conn = factory.proto
    t = KeepAliveTransport()
    conn.makeConnection(t)
    connected.callback(conn)
    take_startup(t)
    conn.dataReceived(LOGIN_OK)
    conn.dataReceived(show_result())  # logged in; pg_is_in_recovery() now waits
    assert box == []
    clock.advance(conn_.PROBE_TIMEOUT)
    assert box[0].check(BackendGone) and "health check timed out" in box[0].getErrorMessage()
    assert conn.state == "closed"


def test_cancel_request_to_a_database_that_never_closes_gives_up(endpoints):
    clock = Clock()
    conn_, conn, _ = logged_in(endpoints, clock)
    d = conn_.send_cancel(conn)
    box = outcome(d)
    _, factory, connected = endpoints[-1]
    proto = factory.proto
    t = StringTransport()
    proto.makeConnection(t)
    connected.callback(proto)
    assert t.value() == msg.cancel_request(conn.backend_pid, conn.backend_secret)
    clock.advance(29)
    assert box == []
    clock.advance(1)
    assert box == [None] and t.disconnecting
    assert not clock.getDelayedCalls()


def test_cancel_request_answered_by_a_close_stops_its_timer(endpoints):
    clock = Clock()
    conn_, conn, _ = logged_in(endpoints, clock)
    d = conn_.send_cancel(conn)
    _, factory, connected = endpoints[-1]
    factory.proto.makeConnection(StringTransport())
    connected.callback(factory.proto)
    factory.proto.connectionLost(None)
    assert outcome(d) == [None]
    assert not clock.getDelayedCalls()


def test_mysql_internal_command_is_bounded():
    clock = Clock()
    conn = mysql_backend.MySQLBackendConnection(("app", 0), W, CREDS, "", 1 << 20, None)
    conn.makeConnection(StringTransport())
    conn.state = "idle"
    conn.clock, conn.operation_timeout = clock, 3
    box = outcome(conn.query(b"SELECT 1"))
    clock.advance(3)
    assert box[0].check(BackendGone)
    assert box[0].getErrorMessage() == "internal command timed out after 3 s"
    assert conn.state == "closed"


def test_keepalive_sets_short_timers_on_real_sockets():
    import socket

    class Handle:
        def __init__(self):
            self.options = {}

        def setsockopt(self, level, option, value):
            self.options[option] = value

    class TCP(KeepAliveTransport):
        handle = Handle()

        def getHandle(self):
            return self.handle

    t = TCP()
    assert enable_keepalive(t, idle=60, interval=10, count=6)
    assert t.keepalive == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert t.handle.options[socket.TCP_KEEPIDLE] == 60
        assert t.handle.options[socket.TCP_KEEPCNT] == 6
    assert not enable_keepalive(StringTransport())  # not a TCP transport: left alone


def test_close_fails_a_waiting_login_at_once():
    conn = pg_backend.PgBackendConnection(("a", "b"), W, CREDS, "", 1 << 20)
    conn.makeConnection(StringTransport())
    box = outcome(conn.ready)
    conn.close("pool closed")
    assert box[0].check(BackendGone) and box[0].getErrorMessage() == "pool closed"
    d = defer.Deferred()
    assert conn.bounded(d, "x") is d  # no clock (not opened by a connector): nothing armed
