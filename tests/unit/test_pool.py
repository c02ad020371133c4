"""pool/pool.py and pool/lease.py with a hand-driven fake connector and task.Clock."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from txrdsproxy.config.model import ConnectionPoolConfig
from txrdsproxy.pool.lease import Lease
from txrdsproxy.pool.pool import BackendPool, BorrowTimeout, PoolClosed
from txrdsproxy.testing.deferreds import failure_of, pending, result
from txrdsproxy.testing.fakes import FakePooledConn

A, B, C = ("u", "a"), ("u", "b"), ("u", "c")


def FakeConn(key, server_max_connections):
    """The pool's tests fire each reset themselves (`conn.resets`)."""
    return FakePooledConn(key, None, server_max_connections, manual_reset=True)


class FakeConnector:
    def __init__(self, server_max_connections=10):
        self.max = server_max_connections
        self.pending = []  # [(key, Deferred)]
        self.made = []

    def connect(self, key):
        d = defer.Deferred()
        self.pending.append((key, d))
        return d

    def keys(self):
        return [k for k, _ in self.pending]

    def complete(self, index=0, server_max_connections="default"):
        key, d = self.pending.pop(index)
        conn = FakeConn(key, self.max if server_max_connections == "default" else server_max_connections)
        self.made.append(conn)
        d.callback(conn)
        return conn

    def fail(self, index=0, error=None):
        key, d = self.pending.pop(index)
        d.errback(error or ConnectionRefusedError("refused"))


def make(max_pct=100, idle_pct=50, timeout=120.0, server_max=10):
    clock = Clock()
    connector = FakeConnector(server_max)
    cfg = ConnectionPoolConfig(max_connections_percent=max_pct, max_idle_connections_percent=idle_pct,
                               connection_borrow_timeout=timeout)
    return BackendPool("p", connector, cfg, clock), connector, clock


def idle_conns(pool):
    return [c for c in pool.connections() if c.state == "idle"]


def borrow_now(pool, connector, key=A):
    """Borrow, completing one connect if the pool asks for one; -> Lease."""
    d = pool.borrow(key)
    if pending(d) and connector.pending:
        connector.complete(connector.keys().index(key))
    return result(d)


# -- limits -------------------------------------------------------------------------------------
def test_first_connection_learns_max_connections_and_cap():
    pool, connector, _ = make(max_pct=55, server_max=7)
    assert pool.max_connections is None
    d1, d2 = pool.borrow(A), pool.borrow(A)
    assert len(connector.pending) == 1, "only one connection opens before max_connections is known"
    conn = connector.complete()
    assert pool.db_max_connections == 7
    assert pool.max_connections == 3  # floor(7 * 55 / 100)
    assert result(d1).conn is conn
    assert conn.state == "borrowed"
    # Now the cap is known, the second waiter must not wait for the first one to release.
    assert len(connector.pending) == 1
    conn2 = connector.complete()
    assert result(d2).conn is conn2


@pytest.mark.parametrize("server_max,pct,cap", [(100, 100, 100), (100, 1, 1), (5, 10, 1), (9, 50, 4), (1, 1, 1)])
def test_cap_is_floor_of_percentage_with_a_minimum_of_one(server_max, pct, cap):
    pool, connector, _ = make(max_pct=pct, idle_pct=min(pct, 50), server_max=server_max)
    borrow_now(pool, connector)
    assert pool.max_connections == cap


def test_a_later_connection_reporting_another_max_moves_the_cap():
    pool, connector, _ = make(max_pct=50, server_max=10)
    borrow_now(pool, connector)
    assert pool.max_connections == 5
    d = pool.borrow(B)
    connector.complete(server_max_connections=20)
    result(d)
    assert pool.max_connections == 10


def test_cap_holds_over_several_keys():
    pool, connector, _ = make(max_pct=30, idle_pct=0, server_max=10)  # cap 3
    first = borrow_now(pool, connector, A)
    ds = [pool.borrow(k) for k in (A, B, C, A, B, C)]
    while connector.pending:
        assert len(pool.connections()) <= 3
        connector.complete()
    assert len(pool.connections()) == 3
    assert len(connector.made) == 3
    served = [d for d in ds if not pending(d)]
    assert len(served) == 2
    assert pool.waiting == 4
    first.release()
    assert len(pool.connections()) <= 3


# -- waiting ------------------------------------------------------------------------------------
def test_waiters_of_a_key_are_served_in_fifo_order():
    pool, connector, _ = make(max_pct=10, server_max=10)  # cap 1
    lease = borrow_now(pool, connector)
    order = []
    ds = [pool.borrow(A) for _ in range(3)]
    for i, d in enumerate(ds):
        d.addCallback(lambda l, i=i: order.append(i) or l)
    assert connector.pending == []
    lease.release()
    assert order == [0]
    result(ds[0]).release()
    assert order == [0, 1]
    result(ds[1]).release()
    assert order == [0, 1, 2]
    assert len(connector.made) == 1


def test_borrow_timeout_fails_with_borrow_timeout_and_removes_the_waiter():
    pool, connector, clock = make(max_pct=10, timeout=30)
    lease = borrow_now(pool, connector)
    d = pool.borrow(A)
    clock.advance(29.9)
    assert pending(d)
    clock.advance(0.1)
    f = failure_of(d)
    assert f.check(BorrowTimeout)
    assert pool.waiting == 0
    lease.release()
    assert lease.conn.state == "idle"
    assert clock.getDelayedCalls() == []


def test_served_waiter_is_not_timed_out_later():
    # One queue timer, armed for the oldest waiter: once it fires with nobody waiting it is
    # not armed again, and the served waiter's lease is untouched.
    pool, connector, clock = make(timeout=30)
    d = pool.borrow(A)
    connector.complete()
    lease = result(d)
    clock.advance(30)
    assert not lease.released and lease.conn.state == "borrowed"
    assert clock.getDelayedCalls() == []


def test_one_timer_serves_the_whole_queue_in_order():
    pool, connector, clock = make(timeout=10)
    first = pool.borrow(A)  # opens the only connection allowed before max_connections is known
    clock.advance(4)
    second = pool.borrow(A)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(6)  # the first waiter's deadline
    assert failure_of(first).check(BorrowTimeout)
    assert not second.called and len(clock.getDelayedCalls()) == 1
    clock.advance(4)  # the second waiter's deadline
    assert failure_of(second).check(BorrowTimeout)
    assert clock.getDelayedCalls() == []


def test_cancelled_borrow_does_not_swallow_the_connection_it_was_opening():
    pool, connector, clock = make()
    d = pool.borrow(A)
    d.cancel()
    assert failure_of(d).check(defer.CancelledError)
    assert pool.waiting == 0
    clock.advance(pool.config.connection_borrow_timeout)  # the queue timer finds nobody
    assert clock.getDelayedCalls() == []
    conn = connector.complete()
    assert conn.state == "idle"
    assert result(pool.borrow(A)).conn is conn
    assert connector.pending == []


def test_connection_for_a_cancelled_waiter_goes_to_the_next_waiter():
    pool, connector, _ = make()
    d1, d2 = pool.borrow(A), pool.borrow(A)
    d1.cancel()
    conn = connector.complete()
    assert result(d2).conn is conn


def test_timed_out_waiter_does_not_swallow_a_late_connection():
    pool, connector, clock = make(timeout=5)
    d = pool.borrow(A)
    clock.advance(5)
    assert failure_of(d).check(BorrowTimeout)
    conn = connector.complete()
    assert conn.state == "idle"
    assert result(pool.borrow(A)).conn is conn


def test_cancelled_waiter_at_the_cap_does_not_get_the_released_connection():
    pool, connector, _ = make(max_pct=10)
    lease = borrow_now(pool, connector)
    d1, d2 = pool.borrow(A), pool.borrow(A)
    d1.cancel()
    lease.release()
    assert result(d2).conn is lease.conn


# -- release --------------------------------------------------------------------------------------
def test_lease_records_borrow_time_and_release_is_idempotent():
    pool, connector, clock = make()
    clock.advance(42)
    lease = borrow_now(pool, connector)
    assert isinstance(lease, Lease)
    assert lease.borrowed_at == 42
    assert not lease.released
    lease.release()
    assert lease.released
    lease.release()
    lease.release(clean=False)  # ignored: already released
    assert lease.conn.state == "idle"
    assert idle_conns(pool) == [lease.conn]
    assert result(pool.borrow(A)).conn is lease.conn
    assert pending(pool.borrow(A))  # the one connection is lent again: nothing idle is left
    assert len(connector.pending) == 1


def test_clean_release_reuses_the_connection():
    pool, connector, clock = make()
    lease = borrow_now(pool, connector)
    clock.advance(3)
    lease.release()
    assert lease.conn.idle_since == 3
    again = result(pool.borrow(A))
    assert again.conn is lease.conn and again is not lease
    assert len(connector.made) == 1


def test_needs_reset_resets_then_idles():
    pool, connector, _ = make()
    lease = borrow_now(pool, connector)
    conn = lease.conn
    lease.release(needs_reset=True)
    assert conn.state == "resetting"
    assert len(conn.resets) == 1
    assert idle_conns(pool) == []
    conn.resets[0].callback(None)
    assert conn.state == "idle"
    assert result(pool.borrow(A)).conn is conn


def test_reset_failure_closes():
    pool, connector, _ = make()
    lease = borrow_now(pool, connector)
    conn = lease.conn
    lease.release(needs_reset=True)
    conn.resets[0].errback(RuntimeError("DISCARD ALL failed"))
    assert conn.state == "closed"
    assert conn.closed_reason == "reset failed: DISCARD ALL failed"
    assert pool.connections() == []


def test_reset_failure_at_the_cap_lets_a_waiter_open_a_new_connection():
    pool, connector, _ = make(max_pct=10)  # cap 1
    lease = borrow_now(pool, connector)
    d = pool.borrow(A)
    lease.release(needs_reset=True)
    assert connector.pending == []  # the resetting connection still counts
    lease.conn.resets[0].errback(RuntimeError("boom"))
    assert connector.keys() == [A]
    conn = connector.complete()
    assert result(d).conn is conn


def test_reset_done_serves_a_waiter_of_the_same_key():
    pool, connector, _ = make(max_pct=10)
    lease = borrow_now(pool, connector)
    d = pool.borrow(A)
    lease.release(needs_reset=True)
    lease.conn.resets[0].callback(None)
    assert result(d).conn is lease.conn


def test_unclean_release_closes_with_its_reason():
    pool, connector, _ = make()
    lease = borrow_now(pool, connector)
    lease.release(clean=False, reason="client disconnected mid-request")
    assert lease.conn.state == "closed"
    assert lease.conn.closed_reason == "client disconnected mid-request"
    assert pool.connections() == []


def test_unclean_release_without_reason_uses_the_policy_reason():
    pool, connector, _ = make()
    lease = borrow_now(pool, connector)
    lease.release(clean=False)
    assert lease.conn.closed_reason == "returned in an unknown state"


def test_unclean_release_at_the_cap_opens_for_a_waiter():
    pool, connector, _ = make(max_pct=10)
    lease = borrow_now(pool, connector)
    d = pool.borrow(A)
    lease.release(clean=False)
    assert connector.keys() == [A]
    assert result_after(connector, d).conn is not lease.conn


def result_after(connector, d):
    connector.complete()
    return result(d)


def test_release_of_a_connection_lost_while_borrowed_does_not_close_it_again():
    pool, connector, _ = make()
    lease = borrow_now(pool, connector)
    lease.conn.lose()
    assert pool.connections() == []
    lease.release()  # FakeConn.close asserts it is not closed twice
    assert pool.connections() == []


def test_release_never_closes_for_the_idle_cap():
    # The regression of issue 7: with the idle cap at 2, the third connection returned used to
    # be closed at once, and the next borrow opened a new one (a login per transaction).
    pool, connector, _ = make(max_pct=100, idle_pct=20, server_max=10)  # 2 idle at most
    leases = [borrow_now(pool, connector) for _ in range(3)]
    assert pool.max_idle_connections == 2
    for lease in leases:
        lease.release()
    assert [lease.conn.state for lease in leases] == ["idle", "idle", "idle"]
    again = [borrow_now(pool, connector) for _ in range(3)]
    assert {l.conn for l in again} == {l.conn for l in leases}
    assert len(connector.made) == 3


def test_zero_idle_percent_still_reuses_under_load():
    pool, connector, _ = make(idle_pct=0)
    lease = borrow_now(pool, connector)
    lease.release()
    assert lease.conn.state == "idle"
    assert borrow_now(pool, connector).conn is lease.conn
    assert len(connector.made) == 1


def test_steady_load_opens_no_more_than_the_pool_size():
    # 20 clients on a pool of 20 with the RDS defaults (idle cap half the pool), each doing
    # transactions in turn: 20 connections, then reuse only.
    pool, connector, clock = make(max_pct=20, idle_pct=10, server_max=100)
    leases = [None] * 20
    for rnd in range(50):
        for i in range(20):
            if leases[i] is not None:
                leases[i].release()
            leases[i] = borrow_now(pool, connector, A)
            clock.advance(0.001)
    assert len(connector.made) == 20
    assert all(c.state != "closed" for c in connector.made)


def test_waiter_of_another_key_at_the_cap_evicts_an_idle_connection():
    pool, connector, clock = make(max_pct=20, server_max=10)  # cap 2
    l1 = borrow_now(pool, connector, A)
    l2 = borrow_now(pool, connector, C)
    l1.release()
    clock.advance(1)
    l2.release()
    d = pool.borrow(B)
    assert l1.conn.state == "closed", "the longest idle connection of another key is evicted"
    assert l1.conn.closed_reason == "evicted for a waiter of another user/database"
    assert l2.conn.state == "idle"
    assert connector.keys() == [B]
    conn = connector.complete()
    assert result(d).conn is conn
    assert len(pool.connections()) == 2


def test_release_at_the_cap_with_a_waiter_of_another_key_makes_room():
    pool, connector, _ = make(max_pct=10)  # cap 1
    lease = borrow_now(pool, connector, A)
    d = pool.borrow(B)
    assert connector.pending == []
    lease.release()
    assert lease.conn.state == "closed"
    assert connector.keys() == [B]
    assert result_after(connector, d).conn.key == B


# -- failures ------------------------------------------------------------------------------------
def test_connect_failure_fails_only_the_oldest_waiter_of_that_key():
    pool, connector, _ = make()
    borrow_now(pool, connector, A)  # learn max_connections
    d1, d2 = pool.borrow(B), pool.borrow(B)
    d3 = pool.borrow(C)
    assert connector.keys() == [B, B, C]
    connector.fail(0, ConnectionRefusedError("no"))
    assert failure_of(d1).check(ConnectionRefusedError)
    assert pending(d2) and pending(d3)
    assert pool.waiting == 2
    connector.complete(connector.keys().index(B))
    assert result(d2).conn.key == B
    connector.complete()
    assert result(d3).conn.key == C


def test_first_connect_failure_then_pool_keeps_working():
    pool, connector, _ = make()
    d1, d2 = pool.borrow(A), pool.borrow(A)
    connector.fail()
    assert failure_of(d1).check(ConnectionRefusedError)
    assert pool.waiting == 1
    assert connector.keys() == [A], "the next waiter gets a new attempt"
    conn = connector.complete()
    assert result(d2).conn is conn
    assert result(borrow_and_release(pool, connector)) is None


def borrow_and_release(pool, connector):
    lease = borrow_now(pool, connector)
    lease.release()
    return defer.succeed(None)


def test_connection_lost_while_idle_is_forgotten():
    pool, connector, _ = make()
    lease = borrow_now(pool, connector)
    lease.release()
    lease.conn.lose()
    assert pool.connections() == []
    d = pool.borrow(A)
    assert pending(d)
    assert connector.keys() == [A]


def test_connection_lost_at_the_cap_serves_a_waiter():
    pool, connector, _ = make(max_pct=10)
    lease = borrow_now(pool, connector)
    d = pool.borrow(A)
    lease.conn.lose()
    assert connector.keys() == [A]
    assert result_after(connector, d).conn is not lease.conn
    lease.release()  # late release of the lost connection: nothing happens


# -- shutdown and maintenance ---------------------------------------------------------------------
def test_shutdown_fails_waiters_with_pool_closed():
    pool, connector, clock = make(max_pct=10)  # cap 1
    borrowed = borrow_now(pool, connector, A)
    d1, d2 = pool.borrow(A), pool.borrow(B)
    pool.shutdown()
    assert failure_of(d1).check(PoolClosed)
    assert failure_of(d2).check(PoolClosed)
    assert pool.waiting == 0
    assert clock.getDelayedCalls() == []
    borrowed.release()
    assert borrowed.conn.state == "closed"
    assert failure_of(pool.borrow(A)).check(PoolClosed)
    assert pool.connections() == []


def test_shutdown_closes_idle_connections():
    pool, connector, _ = make()
    idle = borrow_now(pool, connector, A)
    idle.release()
    pool.shutdown()
    assert idle.conn.state == "closed" and idle.conn.closed_reason == "proxy stopping"
    assert pool.connections() == []


def test_connection_arriving_after_shutdown_is_closed():
    pool, connector, _ = make()
    d = pool.borrow(A)
    pool.shutdown()
    assert failure_of(d).check(PoolClosed)
    conn = connector.complete()
    assert conn.state == "closed" and conn.closed_reason == "pool closed"
    assert pool.connections() == []


def test_reset_finishing_after_shutdown_closes_the_connection():
    pool, connector, _ = make()
    lease = borrow_now(pool, connector)
    pool.shutdown()
    lease.release(needs_reset=True)
    # The pool closed: the connection is not reset for reuse but closed.
    assert lease.conn.state == "closed"
    assert pool.connections() == []


def test_trim_idle_closes_only_the_oldest_above_the_cap_once_idle_long_enough():
    pool, connector, clock = make(idle_pct=20, server_max=10)  # idle cap 2; lifetime 60 s
    assert pool.config.idle_connection_timeout == 60
    leases = [borrow_now(pool, connector) for _ in range(4)]
    for lease in leases:  # idle since 0, 10, 20, 30
        lease.release()
        clock.advance(10)
    clock.advance(59 - clock.seconds())
    assert pool.trim_idle() == 60  # the oldest is due at 60
    assert all(l.conn.state == "idle" for l in leases)
    clock.advance(65 - clock.seconds())
    assert pool.trim_idle() == 70  # the second oldest is due at 70
    assert [l.conn.state for l in leases] == ["closed", "idle", "idle", "idle"]
    assert leases[0].conn.closed_reason == "above MaxIdleConnectionsPercent"
    clock.advance(1000 - clock.seconds())
    assert pool.trim_idle() is None
    assert [l.conn.state for l in leases] == ["closed", "closed", "idle", "idle"]
    assert pool.idle_count() == 2 == pool.max_idle_connections


def test_trim_idle_follows_a_lower_max_connections():
    pool, connector, clock = make(idle_pct=50, server_max=10)  # 5 idle
    leases = [borrow_now(pool, connector) for _ in range(4)]
    for lease in leases:
        clock.advance(1)
        lease.release()
    clock.advance(60)
    assert pool.trim_idle() is None
    pool.db_max_connections = 4  # as a later connection would report: idle cap now 2
    pool.trim_idle()
    assert [l.conn.state for l in leases] == ["closed", "closed", "idle", "idle"]


def test_close_all_closes_idle_but_not_borrowed():
    pool, connector, _ = make()
    kept = borrow_now(pool, connector)
    idle = borrow_now(pool, connector)
    idle.release()
    pool.close_all("failover")
    assert idle.conn.closed_reason == "failover"
    assert kept.conn.state == "borrowed"


def test_reset_completing_after_shutdown_does_not_make_the_connection_idle():
    pool, connector, _ = make()
    lease = borrow_now(pool, connector)
    lease.release(needs_reset=True)
    pool.shutdown()
    lease.conn.resets[0].callback(None)
    assert lease.conn.state == "closed" and lease.conn.closed_reason == "pool closed"
    assert pool.connections() == []


# -- many waiters served by releases made inside their own callbacks ----------------------------
def test_waiters_released_in_their_callbacks_are_served_in_a_loop_not_recursively():
    # A login check that needs nothing from the connection releases it in the borrow's own
    # callback; each release serves the next waiter.  3000 of them must not exhaust the stack.
    pool, connector, _ = make(max_pct=10, server_max=10)  # cap 1
    lease = borrow_now(pool, connector)
    order = []

    def use(l, i):
        order.append(i)
        l.release()

    ds = [pool.borrow(A) for _ in range(3000)]
    for i, d in enumerate(ds):
        d.addCallback(use, i)
    lease.release()
    assert order == list(range(3000))
    assert all(d.called for d in ds)
    assert pool.waiting == 0
    assert idle_conns(pool) == [lease.conn] and len(connector.made) == 1


def test_a_release_looks_at_the_waiters_it_can_serve_not_the_whole_queue():
    # At the cap with N waiters, each release serves the first one; the others cannot be served
    # (no idle connection, no room) and are not walked: O(1) per release, not O(N) (the 3000
    # waiters above took 45 s of a loaded CI run when each release walked the whole queue).
    pool, connector, _ = make(max_pct=10, server_max=10)  # cap 1
    lease = borrow_now(pool, connector)
    looked = []
    evict = pool._evict_idle_other_than
    pool._evict_idle_other_than = lambda key: looked.append(key) or evict(key)
    leases = []
    ds = [pool.borrow(A) for _ in range(200)]
    for d in ds:
        d.addCallback(leases.append)
    looked.clear()
    for i in range(200):
        (leases[-1] if leases else lease).release()
        assert len(leases) == i + 1
    assert len(looked) <= 2 * 200, len(looked)  # walking the queue: ~200 * 200 / 2
    assert pool.waiting == 0


def test_a_waiter_cancelled_while_its_lease_is_queued_gives_it_back():
    pool, connector, _ = make(max_pct=10, server_max=10)  # cap 1
    lease = borrow_now(pool, connector)
    first, second = pool.borrow(A), pool.borrow(A)

    def use(l):
        l.release()  # serves `second`: its lease is queued behind this callback
        second.cancel()  # ... and cancelled before it fires

    first.addCallback(use)
    lease.release()
    assert failure_of(second).check(defer.CancelledError)
    assert lease.conn.state == "idle" and idle_conns(pool) == [lease.conn]
    assert result(pool.borrow(A)).conn is lease.conn
