"""Reader endpoints: which replicas may serve reads now (`ReaderSet`) and which one serves the
next transaction of a READ_ONLY endpoint's session (`ReaderRouter`).

Engine-neutral.  A target is in the reader set when all of these hold:
- it is not the current writer (a replica that is promoted leaves at once);
- its last health check answered READ_ONLY (the WriterMonitor's probes; a target never checked,
  or unreachable at the last check, is out) and it replicates (a read-only server that follows
  no writer, such as a demoted writer not yet pointed at the new one, would serve stale data);
- no connection to it was refused or lost since (`trouble`; it is checked again on its own,
  every HealthCheckInterval, until it answers READ_ONLY);
- its replay lag, when measured, is within MaxReplicaLag (when that is set): a replica whose
  lag is above the bound in two checks in a row is UNAVAILABLE in TargetHealth with Reason
  INVALID_REPLICATION_STATE and the lag in its Description, until a check finds it within.
  One check is not enough: PostgreSQL's lag (failover/lag.py) is the age of the last replayed
  transaction while WAL received is not replayed yet, so on a standby of a primary idle for
  N s the first record to arrive (an INSERT, a checkpoint) reads N s for the few milliseconds
  until it is replayed; a replica that really lags still does at the next check.

A target that leaves the set has its replica pool retired (idle connections close now, lent
ones when their transaction is over) and the pinned sessions holding one of its connections are
told (`on_left`), so they end at their transaction boundary.  Unpinned sessions hold a
connection only for a transaction: their next one is routed anew, to a replica still in the set.

Routing (ReaderRouter): least outstanding transactions first (connections lent, being reset or
opened, plus waiting borrows, per replica pool), ties taken in turn.  Each replica pool keeps
the target group's cap rules on its own: MaxConnectionsPercent of that replica's
max_connections.  With no replica in the set a READ_ONLY endpoint lends the writer's connections
only when its FallbackToWriter is true; otherwise the borrow fails with NoReaderAvailable
(docs/errors.md).  Until the first health check round has ended, borrows wait for it (bounded by
ConnectionBorrowTimeout).
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txrdsproxy.failover.topology import READ_ONLY
from txrdsproxy.pool.interfaces import ILeaseSource
from txrdsproxy.pool.pool import BorrowTimeout
from txrdsproxy.proxy.connector import BackendGone

INVALID_REPLICATION_STATE = "INVALID_REPLICATION_STATE"


class NoReaderAvailable(BackendGone):
    """A READ_ONLY endpoint has no healthy replica and does not fall back to the writer."""


def _replicating_reader(probe):
    """A health check answer (ProbeResult or None) of a target fit to serve reads: read-only and
    not known to replicate from nobody (PostgreSQL: in recovery; MySQL: SHOW SLAVE STATUS has a
    row, or could not be read)."""
    return probe is not None and probe.role == READ_ONLY and probe.replica is not False


def probe_role(result):
    """The role in a health check's answer: a ProbeResult (`.role`) or a bare role string."""
    return getattr(result, "role", result)


def probe_lag(result):
    """The replay lag (seconds) in a health check's answer, or None when not measured."""
    return getattr(result, "lag", None)


class ReaderSet:
    """The replicas of one proxy that its reader endpoints may use (see the module docstring).

    *probe*(target) -> Deferred[answer]: a health check of one target (the connector's
    `probe_role`), used to check a target again after trouble.  *on_left*(target, why): the
    target left the set (its pool is to be retired and pinned sessions on it ended).
    """

    log = Logger()

    def __init__(self, topology, health, clock, max_lag=0.0, probe=None, interval=5.0, on_left=None,
                 on_vanished=None):
        self.topology = topology
        self.health = health
        self.clock = clock
        self.max_lag = max_lag
        self.probe = probe
        self.interval = interval
        self.on_left = on_left
        self.on_vanished = on_vanished  # callable(target, why): cut its replica pool's connections
        self.known = False  # a health check round has ended (or there is no monitor)
        self._suspect = {}  # target -> why: a connection to it failed since its last good check
        self._lagging = {}  # target -> lag (seconds) above max_lag at its last two checks or more
        self._over = {}  # target -> lag above max_lag at its last check only (not confirmed yet)
        self._judged = set()  # targets whose answer this round the monitor's verdict judged
        self._rechecks = {}  # target -> IDelayedCall or Deferred of its own check
        self._timers = set()  # IDelayedCalls bounding those checks
        self._members = ()  # the set as last computed by `refresh` (to see who left)
        self._waiting = []  # Deferreds of borrows waiting for the first round
        self._running = True

    # -- the set -------------------------------------------------------------------------------------
    def eligible(self):
        """-> tuple of the targets in the reader set now, in config order."""
        writer = self.topology.current_writer()
        suspect, lagging = self._suspect, self._lagging
        return tuple(t for t in self.topology.targets
                     if t is not writer and t not in suspect and t not in lagging
                     and _replicating_reader(self.topology.last_probe(t)))

    def why_not(self, target):
        """-> why *target* is not in the reader set (text), or None when it is."""
        if target is self.topology.current_writer():
            return "it is the writer"
        if target in self._suspect:
            return self._suspect[target]
        if target in self._lagging:
            return f"replica lag {self._lagging[target]:.1f} s exceeds MaxReplicaLag {self.max_lag:g} s"
        probe = self.topology.last_probe(target)
        if probe is None or probe.role != READ_ONLY:
            return "its last health check did not answer as a read-only replica"
        if probe.replica is False:
            return "it is read-only but replicates from no writer (its data may be stale)"
        return None

    # -- evidence --------------------------------------------------------------------------------------
    def round_done(self, results):
        """A health check round ended (`WriterMonitor.round_listeners`): *results* maps each
        target to its answer (ProbeResult or role) or a Failure.  The lag was judged while the
        monitor recorded each answer (`verdict`, one writer of TargetHealth); here the set is
        recomputed."""
        for target, result in results.items():
            if isinstance(result, Failure):
                self._lagging.pop(target, None)
                self._over.pop(target, None)
            elif target not in self._judged:
                self._judge_lag(target, result)  # a follower's round: no verdict was asked
        self._judged.clear()
        self.known = True
        self.refresh()

    def verdict(self, target, result):
        """`WriterMonitor.verdicts`: -> (INVALID_REPLICATION_STATE, why) for a replica whose
        replay lag exceeds MaxReplicaLag, recorded by the monitor as its TargetHealth instead of
        AVAILABLE; None otherwise.  Judged against the writer as it stands before the round's
        decision (a replica promoted this round answers READ_WRITE: never lagging).  Each
        answer is judged once: `round_done` does not judge it again."""
        self._judged.add(target)
        return self._judge_lag(target, result)

    def _judge_lag(self, target, result):
        """-> the TargetHealth verdict (reason, description) for *result*, one check more, or
        None; notes whether *target* lags (state only: TargetHealth is written by the caller)."""
        lag = probe_lag(result)
        if (self.max_lag and lag is not None and probe_role(result) == READ_ONLY
                and target is not self.topology.current_writer() and lag > self.max_lag):
            if target not in self._lagging and self._over.pop(target, None) is None:
                self._over[target] = lag  # the first check above the bound: confirmed by the next
                self.log.info("replica {t} lag {lag:.1f} s above MaxReplicaLag {max:g} s at one check;"
                              " out of the reader set if the next one says so too",
                              t=target.rds_resource_id, lag=lag, max=self.max_lag)
                return None
            if target not in self._lagging:
                self.log.warn("replica {t} lags {lag:.1f} s (MaxReplicaLag {max:g} s): out of the"
                              " reader set until it catches up", t=target.rds_resource_id, lag=lag,
                              max=self.max_lag)
            self._lagging[target] = lag
            return (INVALID_REPLICATION_STATE,
                    f"replica lag {lag:.1f} s exceeds MaxReplicaLag {self.max_lag:g} s")
        self._over.pop(target, None)
        if self._lagging.pop(target, None) is not None:
            self.log.info("replica {t} caught up (lag {lag}): back in the reader set",
                          t=target.rds_resource_id, lag=lag)
        return None

    def trouble(self, target, why):
        """A connection to *target* was refused or lost: out of the set until it answers a
        health check as a read-only replica again (checked now, then every interval)."""
        if target not in self.topology.targets:
            return
        if target not in self._suspect:
            # Not "replica": the target may be a former writer, and a proxy without a READ_ONLY
            # endpoint keeps the set too (an endpoint may be added while it runs).
            self.log.warn("target {t} not used by reader endpoints until it answers a health check"
                          " as a replica: {why}", t=target.rds_resource_id, why=why)
            self._suspect[target] = f"connection trouble: {why}"
            self.refresh()
        if target not in self._rechecks:
            self._recheck(target)

    def vanished(self, target, why):
        """*target* got no answer to its health checks for WriterMonitor.VANISHED_AFTER rounds
        (stopped, cut off: `WriterMonitor.vanished_listeners`): out of the set like any trouble,
        and every connection its replica pool holds is cut now (`on_vanished`), lent ones too,
        so a reader session's statement in flight there ends with the engine's "lost during the
        request" error instead of waiting for TCP; the session's next transaction is routed to
        another replica."""
        if target not in self.topology.targets or target is self.topology.current_writer():
            return
        self.trouble(target, why)
        if self.on_vanished is not None:
            self.on_vanished(target, why)

    def _recheck(self, target):
        if not self._running or self.probe is None or target not in self.topology.targets:
            self._rechecks.pop(target, None)
            return
        try:
            d = self.probe(target)
        except Exception:
            d = defer.fail()
        # Bounded like the monitor's checks: a stopped replica never answers, and a check that
        # waits forever would keep it out of the set after it is back.
        answered = defer.Deferred()
        bound = max(self.interval, 2.0)

        def expired():
            if not answered.called:
                answered.errback(Failure(TimeoutError(f"no answer within {bound:g}s")))

        timer = self.clock.callLater(bound, expired)
        self._timers.add(timer)

        def settle(result):
            self._timers.discard(timer)
            if timer.active():
                timer.cancel()
            if not answered.called:
                answered.callback(result)
            return None

        d.addBoth(settle)
        self._rechecks[target] = answered
        answered.addBoth(self._rechecked, target)

    def _rechecked(self, result, target):
        self._rechecks.pop(target, None)
        if not self._running or target not in self.topology.targets:
            return None
        if not isinstance(result, Failure) and probe_role(result) == READ_ONLY:
            self.topology.record_probe(target, result)
            verdict = self._judge_lag(target, result)
            if verdict is not None:
                self.health.record_unavailable(target, *verdict)
            else:
                self.health.record_success(target)
            if self._suspect.pop(target, None) is not None:
                self.log.info("replica {t} answers again: back in the reader set", t=target.rds_resource_id)
            self.refresh()
            return None
        self._rechecks[target] = self.clock.callLater(self.interval, self._recheck, target)
        return None

    def refresh(self):
        """Recompute the set; targets that left it go to `on_left`; waiting borrows go on."""
        members = self.eligible()
        left = [t for t in self._members if t not in members]
        self._members = members
        for target in left:
            why = self.why_not(target) or "left the reader set"
            if self.on_left is not None:
                try:
                    self.on_left(target, why)
                except Exception:
                    self.log.failure("reader set: handling {t} leaving failed", t=target.rds_resource_id)
        if self.known and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def forget(self, target):
        """*target* left the target group."""
        self._suspect.pop(target, None)
        self._lagging.pop(target, None)
        self._over.pop(target, None)
        pending = self._rechecks.pop(target, None)
        if pending is not None and hasattr(pending, "active") and pending.active():
            pending.cancel()
        self.refresh()

    def mark_known(self):
        """There will be no health check rounds (no monitor): the set is what the topology says."""
        self.known = True
        self.refresh()

    def when_known(self):
        """Deferred[None] once the first health check round has ended (now if it has); cancelling
        stops the wait."""
        if self.known:
            return defer.succeed(None)

        def cancel(d):
            if d in self._waiting:
                self._waiting.remove(d)

        d = defer.Deferred(cancel)
        self._waiting.append(d)
        return d

    def stop(self):
        self._running = False
        for pending in list(self._rechecks.values()):
            if hasattr(pending, "active") and pending.active():
                pending.cancel()
        self._rechecks.clear()
        for timer in list(self._timers):
            if timer.active():
                timer.cancel()
        self._timers.clear()


@implementer(ILeaseSource)
class ReaderRouter:
    """The pool of a READ_ONLY endpoint's sessions: BackendPool's `try_borrow` / `borrow`, each
    borrow served by the replica of the reader set with the fewest outstanding transactions.

    *pools*: pool.targets.TargetPools; *writer_pool*: the proxy's pool (used only when
    *fallback_to_writer* and no replica is in the set).  *borrow_timeout*() -> seconds a borrow
    may wait for the first health check round (ConnectionBorrowTimeout).
    """

    log = Logger()

    def __init__(self, name, readers, pools, writer_pool, clock, fallback_to_writer=False,
                 borrow_timeout=lambda: 120.0):
        self.name = name
        self.readers = readers
        self.pools = pools
        self.writer_pool = writer_pool
        self.clock = clock
        self.fallback_to_writer = fallback_to_writer
        self.borrow_timeout = borrow_timeout
        self._turn = 0  # ties are taken in turn; moves on each lease handed out

    def choose(self, key=None, exclude=()):
        """-> the replica target for the next transaction, or None when the set is empty.

        Least outstanding first, among the replicas that can lend a connection of *key* at once
        (an idle one, or room under their cap); when none can, among all (the borrow waits in
        that replica's queue).  Ties are taken in turn."""
        targets = [t for t in self.readers.eligible() if t not in exclude]
        if not targets:
            return None
        if len(targets) == 1:
            return targets[0]
        pools = self.pools
        scored = []
        for t in targets:
            pool = pools.existing(t)
            if pool is None:
                scored.append((0, 0, t))
            else:
                scored.append((0 if pool.can_lend_now(key) else 1, pool.outstanding, t))
        low = min(s[:2] for s in scored)
        best = [s[2] for s in scored if s[:2] == low]
        return best[self._turn % len(best)]

    def _no_reader(self):
        return NoReaderAvailable(f"No healthy read replica is available for proxy endpoint {self.name}")

    def try_borrow(self, key):
        """A Lease on an idle connection of the chosen replica now, or None (use `borrow`)."""
        if not self.readers.known:
            return None
        target = self.choose(key)
        if target is None:
            return self.writer_pool.try_borrow(key) if self.fallback_to_writer else None
        lease = self.pools.get(target).try_borrow(key)
        if lease is not None:
            self._turn += 1
        return lease

    def borrow(self, key):
        """Deferred[Lease] on a connection of a replica in the reader set.

        Fails with NoReaderAvailable (no replica, no fallback), BorrowTimeout, or the replica
        pool's error; a replica that cannot be reached is left out and the next one tried.
        Cancelling cancels the wait in whichever pool it is."""
        state = {"inner": None, "tried": set(), "timer": None}

        def cancel(_):
            inner = state["inner"]
            if inner is not None and not inner.called:
                inner.cancel()
            stop_timer()

        out = defer.Deferred(cancel)

        def stop_timer():
            timer = state["timer"]
            if timer is not None and timer.active():
                timer.cancel()

        def fail(failure):
            stop_timer()
            if not out.called:
                out.errback(failure)

        def lend(lease):
            self._turn += 1
            stop_timer()
            if out.called:  # cancelled meanwhile: the pool would have dropped us; give it back
                lease.release()
            else:
                out.callback(lease)

        def route(_=None):
            if out.called:
                return
            target = self.choose(key, exclude=state["tried"])
            if target is None:
                if self.fallback_to_writer and "writer" not in state:
                    state["writer"] = True
                    inner = state["inner"] = self.writer_pool.borrow(key)
                    inner.addCallbacks(lend, fail)
                    return
                fail(Failure(self._no_reader()))
                return
            state["tried"].add(target)
            inner = state["inner"] = self.pools.get(target).borrow(key)
            inner.addCallbacks(lend, retry)

        def retry(failure):
            if out.called or failure.check(defer.CancelledError):
                return
            if failure.check(NoReaderAvailable, BorrowTimeout) or not failure.check(BackendGone):
                fail(failure)  # the database's own answer, or the pool's timeout
                return
            route()

        if self.readers.known:
            route()
            return out
        # Before the first health check round: wait for it (bounded like any borrow).
        waited = state["inner"] = self.readers.when_known()
        timeout = self.borrow_timeout()
        if timeout and timeout > 0:
            def expired():
                if not waited.called:
                    waited.cancel()
                fail(Failure(BorrowTimeout("Timed-out waiting to acquire database connection")))
            state["timer"] = self.clock.callLater(timeout, expired)
        waited.addCallbacks(route, lambda f: None)
        return out
