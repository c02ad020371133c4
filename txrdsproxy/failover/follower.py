"""One monitor for all workers: the verdict of a WriterMonitor's round, and the FollowerMonitor
that applies it in a process that does not probe.

With `Workers: N` the supervisor runs the only WriterMonitor of each proxy (workers/hub.py): it
probes every target once per round, decides the writer, fences, and records TargetHealth.  After
each round it sends every worker the round's *verdict* (`verdict_of`, a JSON-able dict):

    {"proxy": name, "seq": n,                       seq grows by one per verdict of that proxy
     "writer": id | None, "why": text | None,       the writer now; why it last moved
     "moves": [[old, new, why]],                    writer moves made in this round
     "vanished": [[id, why]],                       targets cut this round (VANISHED_AFTER)
     "fenced": {id: promoted id}, "promoted": {id: former id},
     "targets": {id: {"state", "reason", "description", "since",     its TargetHealth
                      "probe": {"role", "lag", "detail", "replica"} | None,
                      "error": text | None}}}       the check's answer, or why it failed

Targets are named by RdsResourceId.  A worker's FollowerMonitor stands where the WriterMonitor
stands in a single process (the pool's `failover`, `ctx.monitor`) and applies a verdict as that
monitor's own decision would be applied: the topology learns each probe and the writer, the
pool moves off a former writer (`writer_changed("failover")`, or "writer demoted" when the
writer went read-only), waiters are retried, vanished targets are cut (the pool and the
`vanished_listeners`), `writer_listeners` end pinned sessions on a former writer, and
`round_listeners` (the reader set) see the round.  TargetHealth is the monitor's: the worker's
own connection attempts do not write it (`TargetHealth.remote`), so every worker, and
describe-db-proxy-targets whichever worker answers it, shows one view.

Every wait has an end:
- until its first verdict a follower has no writer (borrows wait, up to ConnectionBorrowTimeout):
  a worker started or restarted in the middle of a failover never sends a write to the writer
  its configuration names before the monitor said which one it is;
- `probe_now` (a lost connection, a failed connect, the start) asks the monitor for a round now
  and for its last verdict (`ask`, bounded by the caller), at most one request at a time;
- a follower that has had no verdict for `stale_after` seconds keeps its last one, says so in
  the log (once, and again when verdicts come back) and asks again every `stale_after`.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txrdsproxy.failover.interfaces import IWriterMonitor
from txrdsproxy.failover.monitor import HealthRecord
from txrdsproxy.failover.topology import ProbeResult

__all__ = ["verdict_of", "FollowerMonitor", "RemoteCheckFailed"]

DEMOTING = ("writer demoted", "writer fenced")  # moves to no writer that retire the old one's pool


class RemoteCheckFailed(Exception):
    """A health check the monitor made failed (its description is the message)."""


def _id(target):
    return None if target is None else getattr(target, "rds_resource_id", target)


def verdict_of(monitor, results, seq, moves=(), vanished=(), why=None):
    """-> the verdict (see the module docstring) of *monitor*'s round with *results*
    ({target: ProbeResult | Failure}); *moves* [(old, new, why)] and *vanished* [(target, why)]
    are what the round did, *why* the reason of the writer's last move."""
    targets = {}
    for target in monitor.topology.targets:
        record = monitor.health.health_of(target)
        answer = results.get(target)
        probe = error = None
        if isinstance(answer, ProbeResult):
            probe = {"role": answer.role, "lag": answer.lag, "detail": answer.detail,
                     "replica": answer.replica}
        elif isinstance(answer, Failure):
            error = answer.getErrorMessage()
        elif answer is None:
            error = "not checked in this round"
        targets[target.rds_resource_id] = {
            "state": record.state, "reason": record.reason, "description": record.description,
            "since": record.since, "probe": probe, "error": error}
    return {"proxy": monitor_name(monitor), "seq": seq,
            "writer": _id(monitor.topology.current_writer()), "why": why,
            "moves": [[_id(old), _id(new), text] for old, new, text in moves],
            "vanished": [[_id(t), text] for t, text in vanished],
            "fenced": {_id(t): _id(p) for t, p in monitor.fenced.items()},
            "promoted": {_id(t): _id(p) for t, p in monitor.promoted.items()},
            "targets": targets}


def monitor_name(monitor):
    return getattr(monitor, "proxy_name", None)


@implementer(IWriterMonitor)
class FollowerMonitor:
    """A worker's stand-in for the WriterMonitor: applies the verdicts of the one monitor.

    *ask*(proxy name) -> Deferred[verdict or None]: asks the monitor for a round now and for its
    last verdict; it must end (fire or fail) within a bounded time.  The other arguments are
    the WriterMonitor's.  The hooks the pool, the runtime and the reader set use are the
    WriterMonitor's too (`connection_failed`, `connection_lost`, `probe_now`, `unfence`, the
    listener lists, `last_writer`, `fenced`, `promoted`, `interval`, `retries`)."""

    log = Logger()
    follows = True
    checks = None  # failover.checks.HealthChecks, set by runtime.build_monitor

    def __init__(self, clock, proxy_name, topology, health, interval=5.0, pool=None,
                 database_errors=(), ask=None, stale_after=None, tell_unfence=None):
        self.clock = clock
        self.proxy_name = proxy_name
        self.topology = topology
        self.health = health
        self.interval = interval
        self.pool = pool
        self.database_errors = tuple(database_errors)
        self.ask = ask
        self.tell_unfence = tell_unfence  # callable(proxy name, target id): registered again
        self._stale_after = stale_after
        self.retries = 0
        self.last_writer = None
        self.fenced = {}
        self.promoted = {}
        self.writer_listeners = []
        self.round_listeners = []
        self.vanished_listeners = []
        self.verdicts = []  # the monitor judged the rounds; kept for the reader set's wiring
        self.rounds = 0  # verdicts applied
        self.seq = 0  # of the last verdict applied
        self.stale = False  # no verdict for stale_after seconds (logged)
        self.asked = 0  # requests sent to the monitor (tests, logs)
        self._running = False
        self._asking = None  # the Deferred of the request under way
        self._timer = None  # the IDelayedCall of the staleness check

    @property
    def stale_after(self):
        """Seconds without a verdict before the follower says it keeps its last one: two rounds
        and the longest check a round may wait for."""
        if self._stale_after is not None:
            return self._stale_after
        return 2 * self.interval + 10.0

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self):
        """No writer until the monitor's first verdict; ask for it now."""
        if self._running:
            return
        self._running = True
        health = self.health
        health.remote = True
        if self.seq == 0:
            self.topology.set_writer(None)
        self._arm()
        self.probe_now()

    def stop(self):
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        asking, self._asking = self._asking, None
        if asking is not None and not asking.called:
            asking.cancel()

    def unfence(self, target):
        """*target* was registered again (in this worker: the API, or its reload of the file):
        the monitor is told, which trusts it again (its own reload may not see the change when
        it came with a deregistration between two of its reloads)."""
        self.fenced.pop(target, None)
        if self.tell_unfence is not None:
            try:
                self.tell_unfence(self.proxy_name, target.rds_resource_id)
            except Exception:
                self.log.failure("telling the health monitor about {t} failed", t=target.rds_resource_id)

    def _arm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(self.stale_after, self._no_verdict) if self._running else None

    def _no_verdict(self):
        self._timer = None
        if not self._running:
            return
        if not self.stale:
            self.stale = True
            self.log.warn("proxy {name}: no verdict from the health monitor for {s:g} s; keeping the "
                          "last one (writer {w})", name=self.proxy_name, s=self.stale_after,
                          w=_id(self.topology.current_writer()))
        self._arm()
        self.probe_now()

    # -- hooks for the pool (as WriterMonitor's) ----------------------------------------------------------------
    def connection_failed(self, failure):
        if self.database_errors and failure.check(*self.database_errors):
            from txrdsproxy.failover.topology import NoWriter
            if not failure.check(NoWriter):
                return False
        self.probe_now()
        return True

    def connection_lost(self):
        self.probe_now()

    def probe_now(self):
        """Ask the monitor for a round now and apply the verdict it answers (one request at a
        time; the monitor's next push is applied whatever happens to it)."""
        if not self._running or self.ask is None or self._asking is not None:
            return
        self.asked += 1
        try:
            d = self.ask(self.proxy_name)
        except Exception:
            d = defer.fail()
        self._asking = d

        def done(verdict):
            if self._asking is d:
                self._asking = None
            if isinstance(verdict, Failure):
                if not verdict.check(defer.CancelledError):
                    self.log.info("proxy {name}: the health monitor cannot be asked ({why}); "
                                  "keeping the last verdict", name=self.proxy_name,
                                  why=verdict.getErrorMessage())
                return None
            if verdict:
                self.apply(verdict)
            return None

        d.addBoth(done)

    # -- verdicts ---------------------------------------------------------------------------------------------
    def apply(self, verdict):
        """Apply one verdict of the monitor (see the module docstring).  An older or repeated
        one (seq not above the last applied) is ignored.  -> True when applied."""
        if not self._running:
            return False
        seq = verdict.get("seq", 0)
        if seq <= self.seq:
            return False
        self.seq = seq
        self.rounds += 1
        self._arm()
        if self.stale:
            self.stale = False
            self.log.info("proxy {name}: verdicts from the health monitor again", name=self.proxy_name)
        by_id = {t.rds_resource_id: t for t in self.topology.targets}
        results = {}
        for ident, info in (verdict.get("targets") or {}).items():
            target = by_id.get(ident)
            if target is None:
                continue  # a target this worker does not have (yet): its reload follows
            probe = info.get("probe")
            if probe is not None:
                result = ProbeResult(probe["role"], probe.get("lag"), probe.get("detail"),
                                     probe.get("replica"))
                self.topology.record_probe(target, result)
            else:
                result = Failure(RemoteCheckFailed(info.get("error") or "health check failed"))
                self.topology.forget_role(target)
            results[target] = result
            self.health.apply(target, HealthRecord(info["state"], info.get("reason"),
                                                   info.get("description"), info.get("since")))
        self.fenced = {by_id[f]: by_id.get(p, p) for f, p in (verdict.get("fenced") or {}).items()
                       if f in by_id}
        self.promoted = {by_id[t]: by_id.get(p, p) for t, p in (verdict.get("promoted") or {}).items()
                         if t in by_id}
        self._follow_writer(by_id, verdict)
        for ident, why in verdict.get("vanished") or ():
            target = by_id.get(ident)
            if target is None:
                continue
            if self.pool is not None:
                self.pool.abandon_target(target, why)
            self._tell(self.vanished_listeners, "vanished listener", target, why)
        for listener in list(self.round_listeners):
            try:
                listener(dict(results))
            except Exception:
                self.log.failure("round listener failed")
        return True

    def _follow_writer(self, by_id, verdict):
        moves = verdict.get("moves") or []
        why = moves[-1][2] if moves else verdict.get("why")
        named = verdict.get("writer")
        new = by_id.get(named) if named is not None else None
        current = self.topology.current_writer()
        if new is not None:
            self.topology.set_writer(new)
            if new is self.last_writer or self.last_writer is None:
                if new is not self.last_writer:
                    self.log.info("proxy {name}: writer {t} (the health monitor's verdict)",
                                  name=self.proxy_name, t=new.rds_resource_id)
                self.last_writer = new
                self._retry_pool()
                return
            old, self.last_writer = self.last_writer, new
            self.log.warn("proxy {name}: failover: writer {old} -> {new} (the health monitor's "
                          "verdict)", name=self.proxy_name, old=old.rds_resource_id, new=new.rds_resource_id)
            self._move_pool(old, new, why if why and why not in DEMOTING else "failover")
            return
        if named is not None:
            self.log.info("proxy {name}: the health monitor names writer {w}, which this worker does "
                          "not have (yet): no writer until it does", name=self.proxy_name, w=named)
        if current is None:
            return
        self.topology.set_writer(None)
        if why in DEMOTING:
            self.log.warn("proxy {name}: writer {t} {why} (the health monitor's verdict)",
                          name=self.proxy_name, t=current.rds_resource_id, why=why.split(" ", 1)[1])
            self._move_pool(current, None, why)
        else:
            self.log.warn("proxy {name}: writer {t} lost (the health monitor's verdict)",
                          name=self.proxy_name, t=current.rds_resource_id)

    def _move_pool(self, old, new, why):
        if self.pool is not None:
            self.pool.writer_changed(why)
        self._tell(self.writer_listeners, "writer listener", old, new, why)

    def _retry_pool(self):
        if self.pool is not None:
            self.pool.retry()

    def _tell(self, listeners, what, *args):
        for listener in list(listeners):
            try:
                listener(*args)
            except Exception:
                self.log.failure(what + " failed")
