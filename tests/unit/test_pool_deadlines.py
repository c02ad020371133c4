"""The pool's own waits end on the injected clock (issue 6 item 9, pool side): a connection
whose login never completes is closed after DatabaseConnectTimeout, the borrow that asked for
it fails with BackendGone, its slot is freed and the next waiter gets a new attempt.  (The reset
case is in test_deadlines.py.)  Real PgConnector and backend protocol, fake endpoint/transport."""

from twisted.internet.task import Clock

from txrdsproxy.config.model import ConnectionPoolConfig
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy.connector import BackendGone

from tests.unit.test_deadlines import KeepAliveTransport, outcome, pg_connector
from tests.unit.test_pg_backend import LOGIN_OK, show_result, take_startup

KEY = ("app", "db")


def tcp_up(endpoints, index):
    _, factory, connected = endpoints[index]
    conn = factory.proto
    t = KeepAliveTransport()
    conn.makeConnection(t)
    connected.callback(conn)
    return conn, t


def test_a_login_that_hangs_frees_its_slot_and_fails_only_its_borrow(endpoints):  # noqa: F811
    clock = Clock()
    pool = BackendPool("p", pg_connector(clock, connect_timeout=9),
                       ConnectionPoolConfig(connection_borrow_timeout=0), clock)
    first, second = outcome(pool.borrow(KEY)), outcome(pool.borrow(KEY))
    assert len(endpoints) == 1  # max_connections unknown: one connection opens
    conn, t = tcp_up(endpoints, 0)
    take_startup(t)  # ... and the database never answers the startup
    clock.advance(8.9)
    assert first == [] and conn.state != "closed"
    clock.advance(0.1)
    assert first[0].check(BackendGone) and "timed out" in first[0].getErrorMessage()
    assert conn.state == "closed" and t.disconnecting
    assert second == [] and pool.waiting == 1
    assert len(endpoints) == 2, "the slot was freed: the next waiter gets a new attempt"
    conn2, t2 = tcp_up(endpoints, 1)
    take_startup(t2)
    conn2.dataReceived(LOGIN_OK)
    conn2.dataReceived(show_result())
    assert second[0].conn is conn2
    assert pool.connections() == [conn2]
    second[0].release()
    assert conn2.state == "idle"
