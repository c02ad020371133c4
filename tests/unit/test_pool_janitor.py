"""pool/janitor.py on task.Clock: idle connections above the idle cap close after the idle
lifetime (IdleConnectionTimeout), oldest first; steady load never loses a connection."""

from twisted.internet.task import Clock

from txrdsproxy.config.model import ConnectionPoolConfig
from txrdsproxy.pool.janitor import PoolJanitor
from txrdsproxy.pool.pool import BackendPool

from test_pool import A, B, FakeConnector, borrow_now


def make(idle_pct=10, max_pct=20, lifetime=30.0, server_max=100):
    clock = Clock()
    connector = FakeConnector(server_max)
    cfg = ConnectionPoolConfig(max_connections_percent=max_pct, max_idle_connections_percent=idle_pct,
                               idle_connection_timeout=lifetime)
    pool = BackendPool("p", connector, cfg, clock)
    janitor = PoolJanitor(pool, clock)
    janitor.start()
    return pool, connector, clock, janitor


def states(conns):
    return [c.state for c in conns]


def spike(pool, connector, clock, n, key=A):
    """n sessions borrow at once, then return one after the other 1 s apart; -> connections."""
    leases = [borrow_now(pool, connector, key) for _ in range(n)]
    for lease in leases:
        lease.release()
        clock.advance(1)
    return [lease.conn for lease in leases]


def test_after_a_spike_the_pool_falls_back_to_the_idle_cap_oldest_first():
    pool, connector, clock, _ = make(idle_pct=10, max_pct=20, lifetime=30)  # cap 20, idle 10
    conns = spike(pool, connector, clock, 20)  # idle since 0..19; now 20
    assert pool.idle_count() == 20
    clock.advance(9.9)  # 29.9: nothing is due yet
    assert pool.idle_count() == 20
    clock.advance(0.1)  # 30: the oldest is due
    assert states(conns[:1]) == ["closed"] and pool.idle_count() == 19
    for _ in range(20):
        clock.advance(1)
    assert pool.idle_count() == 10 == pool.max_idle_connections
    assert states(conns) == ["closed"] * 10 + ["idle"] * 10, "oldest first; the newest stay"
    assert {c.closed_reason for c in conns[:10]} == {"above MaxIdleConnectionsPercent"}
    clock.advance(3600)
    assert pool.idle_count() == 10, "the idle cap itself stays open"


def test_steady_load_keeps_every_connection():
    # 20 clients on a pool of 20, each borrowing for 0.2 s in turn, for far longer than the
    # lifetime: every connection is borrowed again long before it could be due.
    pool, connector, clock, _ = make(idle_pct=10, max_pct=20, lifetime=5)
    leases = [borrow_now(pool, connector) for _ in range(20)]
    for _ in range(600):
        for i in range(20):
            leases[i].release()
            clock.advance(0.01)
            leases[i] = borrow_now(pool, connector)
    assert len(connector.made) == 20
    assert all(c.state == "borrowed" for c in connector.made)


def test_a_connection_borrowed_again_is_not_closed_and_the_clock_restarts():
    pool, connector, clock, _ = make(idle_pct=0, max_pct=20, lifetime=10)
    lease = borrow_now(pool, connector)
    conn = lease.conn
    lease.release()
    clock.advance(9)
    lease = borrow_now(pool, connector)
    assert lease.conn is conn
    clock.advance(5)
    lease.release()  # idle since 14: due at 24
    clock.advance(9.5)
    assert conn.state == "idle"
    clock.advance(0.5)
    assert conn.state == "closed"
    assert pool.connections() == []


def test_idle_cap_counts_every_key_together():
    pool, connector, clock, _ = make(idle_pct=2, max_pct=20, lifetime=10)  # idle cap 2
    a = spike(pool, connector, clock, 2, A)
    b = spike(pool, connector, clock, 2, B)
    clock.advance(60)
    assert states(a) == ["closed", "closed"] and states(b) == ["idle", "idle"]


def test_waking_up_is_bounded_and_nothing_runs_after_stop():
    pool, connector, clock, janitor = make(lifetime=3600)
    calls = clock.getDelayedCalls()
    assert len(calls) == 1 and calls[0].getTime() == PoolJanitor.MAX_SLEEP
    janitor.stop()
    assert clock.getDelayedCalls() == [] and not janitor.running
    janitor.stop()  # twice is fine
    janitor.start()
    janitor.start()  # once only
    assert len(clock.getDelayedCalls()) == 1


def test_a_failing_pass_does_not_stop_the_janitor():
    pool, connector, clock, janitor = make(lifetime=1)

    def broken():
        raise RuntimeError("bug")

    pool.trim_idle = broken
    clock.advance(1)
    assert janitor.running and len(clock.getDelayedCalls()) == 1
    del pool.trim_idle
    conns = spike(pool, connector, clock, 12)
    clock.advance(5)
    assert pool.idle_count() == pool.max_idle_connections == 10
    assert states(conns[:2]) == ["closed", "closed"]


def test_a_shorter_idle_lifetime_applies_at_once_when_the_janitor_is_woken():
    import dataclasses
    pool, connector, clock, janitor = make(idle_pct=0, max_pct=20, lifetime=3600)
    leases = [borrow_now(pool, connector) for _ in range(3)]
    for lease in leases:
        lease.release()
    clock.advance(1)  # the janitor sleeps MAX_SLEEP under the old lifetime
    pool.reconfigure(dataclasses.replace(pool.config, idle_connection_timeout=2))
    assert [c.state for c in connector.made] == ["idle"] * 3  # idle 1 s: not due yet
    janitor.wake()
    ticks = [c for c in clock.getDelayedCalls() if c.func == janitor._tick]
    assert len(ticks) == 1 and ticks[0].getTime() == 2  # one pass, when they are due (not two)
    clock.advance(1)  # idle 2 s: due under the new lifetime, long before MAX_SLEEP
    assert [c.state for c in connector.made] == ["closed"] * 3
    janitor.stop()
    janitor.wake()  # stopped: stays stopped
    assert not janitor.running and not [c for c in clock.getDelayedCalls() if c.func == janitor._tick]
