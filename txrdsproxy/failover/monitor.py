"""Health of a proxy's targets (TargetHealth) and the WriterMonitor that moves the writer.

Engine-neutral.  TargetHealth is what `describe-db-proxy-targets` reports: a target nobody has
tried yet is REGISTERING, the last evidence decides AVAILABLE or UNAVAILABLE.  The evidence is the
outcome of the connectors' own connection attempts (`record_success` / `record_failure`) and, for
a target group of several targets, the WriterMonitor's health checks.
"""

from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from txrdsproxy.failover.topology import READ_WRITE, NoWriter

REGISTERING = "REGISTERING"
AVAILABLE = "AVAILABLE"
UNAVAILABLE = "UNAVAILABLE"

# TargetHealth.Reason values (the RDS API's vocabulary) that we produce.
CONNECTION_FAILED = "CONNECTION_FAILED"
AUTH_FAILURE = "AUTH_FAILURE"


@dataclass(frozen=True)
class HealthRecord:
    """One target's health: State, and for UNAVAILABLE the Reason and Description."""

    state: str
    reason: Optional[str] = None
    description: Optional[str] = None
    since: Optional[float] = None  # clock time of the attempt that set it


_REGISTERING = HealthRecord(REGISTERING)


class TargetHealth:
    """The last known health of each target of one proxy (keyed by the target object)."""

    def __init__(self, clock=None):
        self.clock = clock
        self._records = {}
        self.listeners = []  # callables(target, HealthRecord) told of every new record (metrics)

    def _now(self):
        return self.clock.seconds() if self.clock is not None else None

    def health_of(self, target):
        """-> HealthRecord; REGISTERING until a connection to *target* has been tried."""
        return self._records.get(target, _REGISTERING)

    def record_success(self, target):
        """A connection to *target* was opened and logged in."""
        self._set(target, HealthRecord(AVAILABLE, since=self._now()))

    def record_failure(self, target, reason, description):
        """A connection attempt to *target* failed; *reason* is CONNECTION_FAILED or AUTH_FAILURE."""
        self._set(target, HealthRecord(UNAVAILABLE, reason, description, self._now()))

    def _set(self, target, record):
        self._records[target] = record
        for listener in list(self.listeners):
            listener(target, record)


class ProbeTimeout(Exception):
    """A health check got no answer in time."""


class WriterMonitor:
    """Finds the writer among several targets and moves the pool to it (failover).

    Every *interval* seconds (on the injected *clock*) it runs one round: `probe(target)` for
    every target at once -> Deferred["READ_WRITE" | "READ_ONLY"], failing when the target cannot
    be reached (engine-specific: the connectors' `probe_role`).  Each answer goes to TargetHealth
    and `topology.record_role`.  Then:

    - the current writer answered READ_WRITE: nothing changes (waiters the pool held back are
      retried);
    - otherwise the first target (in config order) answering READ_WRITE becomes the writer; when
      it is not the last known writer, `pool.writer_changed("failover")` closes idle connections
      to the old one and retires borrowed ones when they are returned;
    - no target answers READ_WRITE: the writer is lost (`topology.writer()` raises NoWriter) and
      borrows wait in the pool, up to ConnectionBorrowTimeout, for a writer to appear.

    The pool reports failed connection attempts and lost connections through
    `connection_failed` / `connection_lost`: a round starts at once instead of at the next tick.
    *database_errors*: failure classes that are the database's own answer (bad password, unknown
    database); they go to the client as before and say nothing about a failover.
    *failure_reason*: failure -> TargetHealth reason (default CONNECTION_FAILED).
    """

    log = Logger()

    def __init__(self, clock, topology, health, probe, interval=5.0, pool=None,
                 database_errors=(), failure_reason=None, probe_timeout=None):
        self.clock = clock
        self.topology = topology
        self.health = health
        self.probe = probe
        self.interval = interval
        self.pool = pool
        self.database_errors = tuple(database_errors)
        self.failure_reason = failure_reason
        self.probe_timeout = probe_timeout if probe_timeout is not None else min(max(2.0, interval), 10.0)
        self.last_writer = topology.current_writer()  # the last target known as the writer
        self.rounds = 0
        self._running = False
        self._round_active = False
        self._tick = None  # the IDelayedCall of the next round
        self._soon = None  # a round asked for by the pool, scheduled for "now"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self):
        """Run a round now and then every `interval` seconds."""
        if self._running:
            return
        self._running = True
        self._run_round()

    def stop(self):
        """No further rounds; answers of a round under way are ignored."""
        self._running = False
        for call in (self._tick, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._tick = self._soon = None

    # -- hooks for the pool --------------------------------------------------------------------
    def connection_failed(self, failure):
        """The pool could not open a connection to the writer.

        -> True when this may be a failover (no writer, or the writer unreachable): the pool keeps
        its waiters queued until `writer_changed` / `retry`, and a round runs at once.  False for
        the database's own refusals (*database_errors*), which fail the waiter as before.
        """
        if self.database_errors and failure.check(*self.database_errors) and not failure.check(NoWriter):
            return False
        self.probe_now()
        return True

    def connection_lost(self):
        """A pooled connection went away on its own: check the writer now."""
        self.probe_now()

    def probe_now(self):
        """Run a round as soon as possible (not re-entrantly: from the clock, after 0 s)."""
        if not self._running or self._round_active or (self._soon is not None and self._soon.active()):
            return
        self._soon = self.clock.callLater(0, self._run_round)

    # -- one round -------------------------------------------------------------------------------
    def _run_round(self):
        if not self._running or self._round_active:
            return
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        self._round_active = True
        targets = self.topology.targets
        d = defer.DeferredList([self._probe_one(t) for t in targets], consumeErrors=True)
        # each result is (True, role) or (False, Failure)
        d.addCallback(lambda results: self._decide(
            {t: value for t, (_, value) in zip(targets, results)}))
        d.addErrback(lambda f: self.log.failure("health check round failed", f))
        d.addBoth(self._round_done)

    def _round_done(self, _):
        self._round_active = False
        self.rounds += 1
        if self._running:
            self._tick = self.clock.callLater(self.interval, self._run_round)

    def _probe_one(self, target):
        """Deferred[role] of one health check, failing with ProbeTimeout after probe_timeout."""
        out = defer.Deferred()

        def timed_out():
            if not out.called:
                out.errback(ProbeTimeout(f"no answer within {self.probe_timeout:g}s"))

        timer = self.clock.callLater(self.probe_timeout, timed_out)

        def answered(result):
            if timer.active():
                timer.cancel()
            if out.called:
                return None  # timed out already: the late answer is dropped
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
            return None

        try:
            d = self.probe(target)
        except Exception:
            d = defer.fail()
        d.addBoth(answered)
        return out

    def _record(self, target, result):
        if isinstance(result, Failure):
            reason = self.failure_reason(result) if self.failure_reason is not None else None
            self.health.record_failure(target, reason or CONNECTION_FAILED, result.getErrorMessage())
            self.topology.forget_role(target)
            return None
        self.health.record_success(target)
        self.topology.record_role(target, result)
        return result

    def _decide(self, results):
        if not self._running:
            return
        roles = {t: self._record(t, r) for t, r in results.items()}
        current = self.topology.current_writer()
        if current is not None and roles.get(current) == READ_WRITE:
            self._retry_pool()
            return
        candidates = [t for t in self.topology.targets if roles.get(t) == READ_WRITE]
        if not candidates:
            if current is not None:
                self.log.warn("writer {t} lost ({why}); no target answers as a writer yet",
                              t=current.rds_resource_id, why=_why(results.get(current)))
                self.topology.set_writer(None)
            return
        new = candidates[0]
        self.topology.set_writer(new)
        if new is self.last_writer:
            self.log.info("writer {t} is back", t=new.rds_resource_id)
            self._retry_pool()
            return
        old, self.last_writer = self.last_writer, new
        self.log.warn("failover: writer {old} -> {new}",
                      old=old.rds_resource_id if old is not None else None, new=new.rds_resource_id)
        if self.pool is not None:
            self.pool.writer_changed("failover")

    def _retry_pool(self):
        if self.pool is not None:
            self.pool.retry()


def _why(result):
    if isinstance(result, Failure):
        return result.getErrorMessage()
    return f"answers {result}"
