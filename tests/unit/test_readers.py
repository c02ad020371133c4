"""Reader endpoints' routing (failover/readers.py, pool/targets.py) on task.Clock with fake
connections: the reader set, least-outstanding routing over per-replica pools, never the writer
unless FallbackToWriter, replicas that fail, are promoted or lag."""

from collections import Counter
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from txrdsproxy.config.model import ConnectionPoolConfig, DBProxyTarget
from txrdsproxy.endpoints import attach_monitor
from txrdsproxy.failover.monitor import AVAILABLE, UNAVAILABLE, TargetHealth, WriterMonitor
from txrdsproxy.failover.readers import NoReaderAvailable, ReaderRouter, ReaderSet
from txrdsproxy.failover.topology import NoWriter, ProbeResult, Topology
from txrdsproxy.pool.pool import BackendPool, BorrowTimeout
from txrdsproxy.pool.targets import TargetPools
from txrdsproxy.proxy.connector import BackendGone
from txrdsproxy.testing.deferreds import failure_of, result
from txrdsproxy.testing.fakes import FakePooledConn

W = DBProxyTarget("db-w", "10.0.0.1", 5432)
R1 = DBProxyTarget("db-r1", "10.0.0.2", 5432)
R2 = DBProxyTarget("db-r2", "10.0.0.3", 5432)
RW, RO = "READ_WRITE", "READ_ONLY"
KEY = ("app", "appdb")
INTERVAL = 5.0


def Answer(role, lag=None):
    """A health check's answer with replay lag."""
    return ProbeResult(role, lag=lag, replica=role == RO)


class Refused(Exception):
    """Stands for the engine's DatabaseError."""


def FakeConn(key, target, max_connections):
    return FakePooledConn(key, target, max_connections)


class FakeConnector:
    """connect (to the writer) and connect_to (a given target) like the real Connector; each
    target's connections open at once unless the target is in `down` (refused)."""

    def __init__(self, topology, max_connections=None):
        self.topology = topology
        self.down = set()
        self.opened = Counter()  # target -> connections opened
        self.max_connections = max_connections or {}

    def connect(self, key):
        try:
            target = self.topology.writer()
        except NoWriter:
            return defer.fail()
        return self.connect_to(target, key)

    def connect_to(self, target, key):
        if target in self.down:
            return defer.fail(BackendGone(f"cannot connect to {target.endpoint}: refused"))
        self.opened[target] += 1
        return defer.succeed(FakeConn(key, target, self.max_connections.get(target, 100)))


class World:
    def __init__(self, answers=None, fallback=False, max_lag=0.0, timeout=30.0, max_connections=None,
                 percent=100):
        self.clock = Clock()
        self.topology = Topology((W, R1, R2))
        self.health = TargetHealth(self.clock)
        self.connector = FakeConnector(self.topology, max_connections)
        self.config = ConnectionPoolConfig(connection_borrow_timeout=timeout,
                                           max_connections_percent=percent)
        self.pool = BackendPool("p", self.connector, self.config, self.clock)
        self.answers = {t: Answer(a) if isinstance(a, str) else a
                        for t, a in (answers or {W: RW, R1: RO, R2: RO}).items()}
        self.left = []
        self.pools = TargetPools("p", self.connector, self.config, self.clock)
        self.readers = ReaderSet(self.topology, self.health, self.clock, max_lag, probe=self.probe,
                                 interval=INTERVAL, on_left=self.on_left)
        self.pools.on_trouble = self.readers.trouble
        self.monitor = WriterMonitor(self.clock, self.topology, self.health, self.probe, INTERVAL,
                                     pool=self.pool, database_errors=(Refused,))
        self.pool.failover = self.monitor
        self.router = ReaderRouter("reader", self.readers, self.pools, self.pool, self.clock,
                                   fallback_to_writer=fallback, borrow_timeout=lambda: timeout)

    def probe(self, target):
        if target in self.connector.down:
            return defer.fail(BackendGone("refused"))
        answer = self.answers[target]
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def on_left(self, target, why):
        self.left.append((target, why))
        self.pools.retire(target, why)

    def round(self):
        """One monitor round (with the writer re-checks it may do), which tells the reader set."""
        rounds = self.monitor.rounds
        if not self.monitor._running:
            attach_monitor(self.readers, self.monitor)
            self.monitor.start()
        else:
            self.monitor.probe_now()
        while self.monitor.rounds == rounds:
            self.clock.advance(0.25)

    def lend(self):
        return result(self.router.borrow(KEY))


# -- the reader set -------------------------------------------------------------------------------------
def test_the_reader_set_is_the_targets_answering_read_only_that_are_not_the_writer():
    w = World()
    assert w.readers.eligible() == ()  # nothing checked yet
    w.round()
    assert w.readers.eligible() == (R1, R2)
    assert w.readers.why_not(W) == "it is the writer"


def test_a_borrow_before_the_first_round_waits_for_it_then_goes_to_a_replica():
    w = World()
    d = w.router.borrow(KEY)
    assert not d.called and w.connector.opened == Counter()
    w.round()
    lease = result(d)
    assert lease.conn.target in (R1, R2)


def test_a_borrow_waiting_for_the_first_round_times_out_after_connection_borrow_timeout():
    w = World(timeout=3.0)
    d = w.router.borrow(KEY)
    w.clock.advance(3.0)
    assert failure_of(d).check(BorrowTimeout)
    w.round()  # a late round serves nobody and opens nothing
    assert w.connector.opened == Counter()


# -- routing -------------------------------------------------------------------------------------------------
def test_transactions_go_to_the_replica_with_the_fewest_outstanding():
    w = World()
    w.round()
    leases = [w.lend() for _ in range(6)]
    per_target = Counter(lease.conn.target for lease in leases)
    assert per_target == Counter({R1: 3, R2: 3})
    assert W not in per_target and w.connector.opened[W] == 0
    # R1's transactions end: the next three go there, where nothing is outstanding
    for lease in [le for le in leases if le.conn.target is R1]:
        lease.release()
    again = [w.lend() for _ in range(3)]
    assert {le.conn.target for le in again} == {R1}
    # reused, not new: R1's pool lends its idle connections
    assert w.connector.opened[R1] == 3


def test_try_borrow_takes_an_idle_connection_of_the_least_loaded_replica():
    w = World()
    w.round()
    first = w.lend()
    first.release()
    other = w.lend()  # R1 has an idle connection, the other replica nothing outstanding either
    assert other.conn.target is not None
    other.release()
    lease = w.router.try_borrow(KEY)
    assert lease is not None and lease.conn.target in (R1, R2)


def test_without_a_replica_a_read_only_endpoint_fails_and_never_uses_the_writer():
    w = World(answers={W: RW, R1: BackendGone("down"), R2: BackendGone("down")})
    w.round()
    f = failure_of(w.router.borrow(KEY))
    assert f.check(NoReaderAvailable)
    assert "No healthy read replica is available for proxy endpoint reader" in f.getErrorMessage()
    assert w.router.try_borrow(KEY) is None
    assert w.connector.opened[W] == 0


def test_fallback_to_writer_lends_the_writers_connections_only_when_no_replica_is_left():
    w = World(answers={W: RW, R1: BackendGone("down"), R2: BackendGone("down")}, fallback=True)
    w.round()
    lease = w.lend()
    assert lease.conn.target is W and lease._pool is w.pool
    lease.release()
    w.answers.update({R1: Answer(RO)})
    w.round()
    assert w.lend().conn.target is R1


def test_a_replica_that_refuses_is_left_out_and_the_borrow_goes_to_another():
    w = World()
    w.round()
    w.connector.down.add(R1)
    leases = [w.lend() for _ in range(4)]
    assert {le.conn.target for le in leases} == {R2}
    assert R1 not in w.readers.eligible()
    assert "connection trouble" in w.readers.why_not(R1)
    # it is checked again on its own every interval, and comes back once it answers
    w.clock.advance(INTERVAL)
    assert R1 not in w.readers.eligible()
    w.connector.down.discard(R1)
    w.clock.advance(INTERVAL)
    assert w.readers.eligible() == (R1, R2)


def test_a_lost_replica_connection_takes_the_replica_out_at_once():
    w = World()
    w.round()
    lease = w.lend()
    target = lease.conn.target
    w.answers[target] = BackendGone("gone")  # its own check fails too
    lease.conn.lose()
    assert target not in w.readers.eligible()
    assert all(w.lend().conn.target is not target for _ in range(3))


def test_the_database_refusal_of_a_replica_is_the_clients_answer_not_a_retry():
    w = World()
    w.round()

    def refuse(target, key):
        return defer.fail(Refused("database \"nope\" does not exist"))

    w.connector.connect_to = refuse
    f = failure_of(w.router.borrow(KEY))
    assert f.check(Refused)


def test_a_promoted_replica_leaves_the_set_and_its_connections_are_retired():
    w = World()
    w.round()
    held = [w.lend() for _ in range(4)]
    on_r1 = [le for le in held if le.conn.target is R1]
    idle_r1 = on_r1.pop()
    idle_r1.release()  # idle in R1's pool
    # W dies, R1 is promoted
    w.answers.update({W: BackendGone("down"), R1: Answer(RW)})
    w.round()
    assert w.topology.current_writer() is R1
    assert [t for t, _ in w.left] == [R1]
    assert idle_r1.conn.state == "closed"  # idle: closed at once
    busy = on_r1[0]
    assert busy.conn.state == "borrowed"  # its transaction goes on...
    busy.release()
    assert busy.conn.state == "closed"  # ...and the connection is not reused
    assert all(w.lend().conn.target is R2 for _ in range(3))


def test_a_lagging_replica_is_out_with_the_reason_in_target_health_until_it_catches_up():
    w = World(max_lag=10.0, answers={W: RW, R1: Answer(RO, 42.5), R2: Answer(RO, 0.0)})
    w.round()
    assert w.readers.eligible() == (R1, R2)  # one check above the bound: not yet
    assert w.health.health_of(R1).state == AVAILABLE
    # the next check finds the same lag: confirmed
    w.round()
    assert w.readers.eligible() == (R2,)
    record = w.health.health_of(R1)
    assert (record.state, record.reason) == (UNAVAILABLE, "INVALID_REPLICATION_STATE")
    assert record.description == "replica lag 42.5 s exceeds MaxReplicaLag 10 s"
    assert all(w.lend().conn.target is R2 for _ in range(3))
    w.answers[R1] = Answer(RO, 2.0)
    w.round()
    assert w.readers.eligible() == (R1, R2)
    assert w.health.health_of(R1).state == AVAILABLE


def test_lag_is_not_judged_without_a_bound():
    w = World(answers={W: RW, R1: Answer(RO, 3600.0), R2: Answer(RO, None)})
    w.round()
    assert w.readers.eligible() == (R1, R2)


def test_each_replica_pool_caps_at_max_connections_percent_of_that_replicas_max_connections():
    w = World(max_connections={R1: 4, R2: 10}, percent=50)
    w.round()
    leases = [w.lend() for _ in range(7)]  # caps: R1 2, R2 5
    assert Counter(le.conn.target for le in leases) == Counter({R1: 2, R2: 5})
    assert w.pools.get(R1).max_connections == 2 and w.pools.get(R2).max_connections == 5
    d = w.router.borrow(KEY)  # every replica at its cap: waits in the least loaded one's queue
    assert not d.called
    leases[0].release()
    assert result(d).conn.target is leases[0].conn.target


def test_cancelling_a_routed_borrow_leaves_nothing_waiting():
    w = World(max_connections={R1: 1, R2: 1})
    w.round()
    w.lend(), w.lend()
    d = w.router.borrow(KEY)
    d.cancel()
    assert sum(p.waiting for p in w.pools) == 0
    assert failure_of(d).check(defer.CancelledError)


@pytest.mark.parametrize("why", ["left", "forget"])
def test_a_deregistered_replica_is_forgotten(why):
    w = World()
    w.round()
    w.topology.targets = (W, R2)
    w.pools.drop(R1, "target deregistered")
    w.readers.forget(R1)
    assert w.readers.eligible() == (R2,)


# -- pinned reader sessions on a replica that leaves ------------------------------------------------
class FakeSession:
    def __init__(self, target, pinned=True, routed=True):
        from types import SimpleNamespace
        self.route = object() if routed else None
        self.pin_reason = "set_variable" if pinned else None
        self.lease = SimpleNamespace(conn=SimpleNamespace(target=target))
        self.drained = 0

    def drain(self):
        self.drained += 1
        return False  # mid-transaction: ends at its boundary (a later call)


def test_pinned_reader_sessions_on_a_replica_that_left_are_ended_at_their_boundary():
    from types import SimpleNamespace
    from txrdsproxy.endpoints import end_pinned_on
    clock = Clock()
    on_r1, elsewhere, unpinned, writer_session = (FakeSession(R1), FakeSession(R2),
                                                  FakeSession(R1, pinned=False),
                                                  FakeSession(R1, routed=False))
    ctx = SimpleNamespace(name="p", clock=clock,
                          sessions={on_r1, elsewhere, unpinned, writer_session})
    end_pinned_on(ctx, R1)
    assert on_r1.drained == 1
    assert elsewhere.drained == unpinned.drained == writer_session.drained == 0


def test_with_several_workers_each_replica_pool_takes_this_workers_share_of_its_cap():
    w = World(max_connections={R1: 10, R2: 10}, percent=50)  # each replica's cap: 5
    w.round()
    w.lend().release()  # one replica pool exists before the share is set
    w.pools.share = (1, 2)  # the second of two workers: floor(5 / 2) = 2 per replica
    for target in (R1, R2):
        w.pools.get(target)
    assert {p.share for p in w.pools} == {(1, 2)}
    leases = [w.lend() for _ in range(4)]
    assert Counter(le.conn.target for le in leases) == Counter({R1: 2, R2: 2})
    assert not w.router.borrow(KEY).called  # both at this worker's share: it waits


def test_the_router_and_the_pool_are_lenders():
    from zope.interface.verify import verifyObject
    from txrdsproxy.pool.interfaces import ILeaseSource
    w = World()
    assert verifyObject(ILeaseSource, w.router)
    assert verifyObject(ILeaseSource, w.pool)


def test_a_read_only_server_that_replicates_from_nobody_is_not_a_reader():
    w = World(answers={W: RW, R1: ProbeResult(RO, replica=False), R2: ProbeResult(RO, replica=None)})
    w.round()
    assert w.readers.eligible() == (R2,)  # None: unknown (the check may not ask), kept
    assert "replicates from no writer" in w.readers.why_not(R1)


# -- a replica that vanishes (stopped, cut off): the writer's rule, for replica pools ------------------
class Silent:
    """A health check answer that never comes (a SIGSTOPped server, a cut network)."""


def silent_world(**kwargs):
    w = World(**kwargs)
    probe = w.probe

    def silent_probe(target):
        if isinstance(w.answers.get(target), Silent):
            return defer.Deferred()  # never fires: the monitor's ProbeTimeout ends the wait
        return probe(target)

    w.readers.probe = w.monitor.probe = silent_probe
    w.readers.on_vanished = w.pools.abandon  # as endpoints.wire_readers does
    return w


def lend_on(w, target):
    """A lease on *target* (others are given back)."""
    others = []
    for _ in range(6):
        lease = w.lend()
        if lease.conn.target is target:
            for other in others:
                other.release()
            return lease
        others.append(lease)
    raise AssertionError(f"no lease landed on {target.rds_resource_id}")


def test_a_vanished_replica_has_its_lent_connections_cut_after_two_silent_rounds():
    w = silent_world()
    w.round()
    lease = lend_on(w, R1)  # a reader session mid-statement on R1
    w.answers[R1] = Silent()
    w.round()
    assert R1 not in w.readers.eligible()  # out after one silent round: nothing new goes there...
    assert lease.conn.state == "borrowed"  # ...but one round is no proof: the statement runs on
    assert all(w.lend().conn.target is R2 for _ in range(3))
    w.round()
    assert lease.conn.state == "closed"  # cut (aborted) after VANISHED_AFTER silent rounds
    assert "vanished" in lease.conn.closed_reason
    assert w.pools.existing(R1).connections() == []
    # the session's next transaction goes to the other replica
    assert all(w.lend().conn.target is R2 for _ in range(3))


def test_a_vanished_replica_comes_back_once_it_answers_and_a_blip_cuts_nothing():
    w = silent_world()
    w.round()
    lease = lend_on(w, R1)
    w.answers[R1] = Silent()
    w.round()
    w.answers[R1] = Answer(RO)  # answers again before the second round: a blip
    w.round()
    assert lease.conn.state == "borrowed"  # never cut
    assert R1 in w.readers.eligible()
    w.answers[R1] = Silent()
    w.round()
    w.round()
    assert lease.conn.state == "closed"
    w.answers[R1] = Answer(RO)  # SIGCONT
    # the reader set's own re-check under way when it stopped answering times out (bounded),
    # the next one (an interval later) finds it back
    for _ in range(4):
        w.clock.advance(INTERVAL / 2)
    assert R1 in w.readers.eligible()
    assert w.health.health_of(R1).state == AVAILABLE


def test_the_reader_sets_own_recheck_of_a_silent_replica_is_bounded():
    w = silent_world()
    w.round()
    w.answers[R1] = Silent()
    w.readers.trouble(R1, "a database connection to it was lost")
    for _ in range(5):  # the first re-check times out, the next one is due an interval later
        w.clock.advance(INTERVAL / 2)
    w.answers[R1] = Answer(RO)
    for _ in range(5):
        w.clock.advance(INTERVAL / 2)
    assert R1 in w.readers.eligible()
    w.answers[R1] = Silent()
    w.readers.trouble(R1, "lost again")
    assert [c for c in w.clock.getDelayedCalls() if c.func.__name__ == "expired"]
    w.readers.stop()  # a re-check under way: its bound is cancelled with it
    assert [c for c in w.clock.getDelayedCalls() if c.func.__name__ == "expired"] == []


# -- TargetHealth of a lagging replica: one owner, stable across rounds -------------------------------
def test_one_check_above_the_bound_is_not_lag():
    # PostgreSQL after an idle primary: the first WAL record to arrive reads the idle time as
    # lag until it is replayed (milliseconds).  Only two checks in a row take a replica out.
    w = World(max_lag=1.0, answers={W: RW, R1: Answer(RO, 0.0), R2: Answer(RO, 0.0)})
    seen = []
    w.health.listeners.append(lambda target, record: seen.append((target, record)))
    for lag in (0.0, 30.0, 0.0, 31.0, 0.0, 0.0):
        w.answers[R1] = Answer(RO, lag)
        w.round()
        assert w.readers.eligible() == (R1, R2), lag
    assert {(r.state, r.reason) for t, r in seen if t is R1} == {(AVAILABLE, None)}
    assert not w.left
    w.answers[R1] = Answer(RO, 30.0)
    w.round()
    w.answers[R1] = Answer(RO, 30.5)
    w.round()
    assert w.readers.eligible() == (R2,) and [t for t, _ in w.left] == [R1]


def test_a_lagging_replicas_target_health_never_flips_between_rounds():
    w = World(max_lag=10.0, answers={W: RW, R1: Answer(RO, 42.5), R2: Answer(RO, 0.0)})
    w.round()  # the first check above the bound; the next ones confirm it
    seen = []
    w.health.listeners.append(lambda target, record: seen.append((target, record)))
    for _ in range(4):
        w.answers[R1] = Answer(RO, 42.5)
        w.round()
        record = w.health.health_of(R1)
        assert (record.state, record.reason) == (UNAVAILABLE, "INVALID_REPLICATION_STATE")
    r1 = [(r.state, r.reason) for t, r in seen if t is R1]
    assert r1 and set(r1) == {(UNAVAILABLE, "INVALID_REPLICATION_STATE")}  # never AVAILABLE between
    w.answers[R1] = Answer(RO, 1.0)
    seen.clear()
    w.round()
    w.round()
    assert [(r.state, r.reason) for t, r in seen if t is R1] == [(AVAILABLE, None)]  # once, then kept
    assert w.readers.eligible() == (R1, R2)


# -- PROMOTED: a replica made the writer, for the transition -----------------------------------------
def test_a_promoted_replica_is_available_with_reason_promoted_until_sessions_left_the_former_writer():
    from txrdsproxy.admin.shapes import target_health
    from types import SimpleNamespace

    w = World()
    w.round()
    on_old = result(w.pool.borrow(KEY))  # a session's transaction on the writer W
    assert on_old.conn.target is W
    w.answers.update({W: BackendGone("down"), R1: Answer(RW)})
    w.round()
    assert w.topology.current_writer() is R1
    ctx = SimpleNamespace(health=w.health)
    assert target_health(ctx, R1) == {"State": "AVAILABLE", "Reason": "PROMOTED"}
    w.health.record_success(R1)  # a connection opened to the new writer: still the transition
    w.round()
    assert target_health(ctx, R1) == {"State": "AVAILABLE", "Reason": "PROMOTED"}  # W still has a session
    on_old.release()  # its transaction ended: the retired connection closes
    assert on_old.conn.state == "closed"
    w.round()
    assert target_health(ctx, R1) == {"State": "AVAILABLE"}
    w.round()
    assert target_health(ctx, R1) == {"State": "AVAILABLE"}
    assert target_health(ctx, R2) == {"State": "AVAILABLE"}  # never promoted


def test_the_first_writer_and_a_writer_that_comes_back_are_not_promoted():
    w = World()
    w.round()
    assert w.health.health_of(W).reason is None
    w.answers[W] = BackendGone("down")
    w.round()
    w.answers[W] = Answer(RW)  # back before anyone else answered read-write: no move
    w.round()
    assert w.topology.current_writer() is W
    assert w.health.health_of(W).reason is None
    assert w.monitor.promoted == {}
