"""Health of a proxy's targets (TargetHealth) and the WriterMonitor that moves the writer.

Engine-neutral.  TargetHealth is what `describe-db-proxy-targets` reports: a target nobody has
tried yet is REGISTERING, the last evidence decides AVAILABLE or UNAVAILABLE.  The evidence is the
outcome of the connectors' own connection attempts (`record_success` / `record_failure`) and, for
a target group of several targets, the WriterMonitor's health checks.

Reasons (the RDS API's TargetHealthReason values) for UNAVAILABLE:
- UNREACHABLE: no TCP connection (refused, no route, DNS, connect timed out);
- CONNECTION_FAILED: connected, then the login, TLS or the health-check query failed;
- AUTH_FAILURE: the database refused the credentials;
- PENDING_PROXY_CAPACITY: the database refused a connection for lack of connection slots
  (PostgreSQL 53300, MySQL 1040): try again once the proxy's connections are given back;
- INVALID_REPLICATION_STATE: a former writer answers read-write after another target was promoted
  in its place (see WriterMonitor: never two writers), or a replica lags more than MaxReplicaLag
  (the reader set's verdict, failover/readers.py).

PROMOTED is the one reason that goes with State AVAILABLE: a target the WriterMonitor made the
writer in place of another one is AVAILABLE with Reason PROMOTED (no Description, as the API
has none for AVAILABLE) for the transition: from the round that promoted it until a round finds
it still the writer and the writer's pool holding no connection to the former writer any more
(every session moved off it; pinned ones ended, FORMER_WRITER_DRAIN at most).  Then plain
AVAILABLE.  A connection opened to it meanwhile does not end the transition (a success keeps an
AVAILABLE record as it is).

Each target's TargetHealth has one writer per round: the monitor records the check's outcome,
asking its *verdicts* first (the reader set's lag rule), so a lagging replica is UNAVAILABLE in
every round, never AVAILABLE then UNAVAILABLE within one.
"""

from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txrdsproxy.failover.interfaces import IWriterMonitor

from txrdsproxy.failover.topology import READ_ONLY, READ_WRITE, NoWriter, ProbeResult

REGISTERING = "REGISTERING"
AVAILABLE = "AVAILABLE"
UNAVAILABLE = "UNAVAILABLE"

# TargetHealth.Reason values (the RDS API's vocabulary) that we produce.
UNREACHABLE = "UNREACHABLE"
CONNECTION_FAILED = "CONNECTION_FAILED"
AUTH_FAILURE = "AUTH_FAILURE"
PENDING_PROXY_CAPACITY = "PENDING_PROXY_CAPACITY"
INVALID_REPLICATION_STATE = "INVALID_REPLICATION_STATE"
PROMOTED = "PROMOTED"

# A writer whose check failed with one of these answered: it is up, only the check could not ask
# it (the health-check user's password, no free connection slot).  Alone, it stays the writer.
ANSWERED_REASONS = (AUTH_FAILURE, PENDING_PROXY_CAPACITY)


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
        # True in a worker of `Workers: N`: the supervisor's monitor writes every record
        # (`apply`, failover/follower.py); this process's own evidence does not.
        self.remote = False

    def _now(self):
        return self.clock.seconds() if self.clock is not None else None

    def health_of(self, target):
        """-> HealthRecord; REGISTERING until a connection to *target* has been tried."""
        return self._records.get(target, _REGISTERING)

    def record_success(self, target):
        """A connection to *target* was opened and logged in, or its check answered well.  An
        AVAILABLE record stays as it is (its `since`, and Reason PROMOTED during a promotion's
        transition: only the WriterMonitor ends that, `end_promotion`)."""
        if self.remote or self._records.get(target, _REGISTERING).state == AVAILABLE:
            return
        self._set(target, HealthRecord(AVAILABLE, since=self._now()))

    def record_promoted(self, target):
        """*target* was made the writer in place of another target: AVAILABLE, Reason PROMOTED."""
        if self.remote:
            return
        self._set(target, HealthRecord(AVAILABLE, PROMOTED, None, self._now()))

    def end_promotion(self, target):
        """The transition after *target*'s promotion is over: plain AVAILABLE."""
        record = self._records.get(target)
        if self.remote:
            return
        if record is not None and record.state == AVAILABLE and record.reason == PROMOTED:
            self._set(target, HealthRecord(AVAILABLE, since=self._now()))

    def record_failure(self, target, reason, description):
        """A connection attempt to *target* failed, or the target is not usable (*reason*: one
        of the TargetHealthReason values above)."""
        if self.remote:
            return
        self._set(target, HealthRecord(UNAVAILABLE, reason, description, self._now()))

    def apply(self, target, record):
        """The record the one monitor of the proxy decided (a worker of `Workers: N`)."""
        if self._records.get(target) != record:
            self._set(target, record)

    record_unavailable = record_failure  # for verdicts that are not a failed attempt (lag, fencing)

    def _set(self, target, record):
        self._records[target] = record
        for listener in list(self.listeners):
            listener(target, record)


class ProbeTimeout(Exception):
    """A health check got no answer in time."""


@implementer(IWriterMonitor)
class WriterMonitor:
    """Finds the writer among several targets and moves the pool to it (failover).

    Every *interval* seconds (on the injected *clock*) it runs one round: `probe(target)` for
    every target at once -> Deferred[ProbeResult | "READ_WRITE" | "READ_ONLY"], failing when the
    target cannot be reached or logged in to (engine-specific: the connectors' `probe_role`).
    Each answer goes to TargetHealth and `topology.record_probe`.  Then:

    - the current writer answered READ_WRITE: nothing changes (waiters the pool held back are
      retried);
    - otherwise a target answering READ_WRITE that is not fenced (below) becomes the writer: the
      last known writer when it is one of them (no move), else the first in config order; when
      it is not the last known writer, `pool.writer_changed("failover")` closes idle
      connections to the old one and retires borrowed ones when they are returned;
    - no target answers READ_WRITE:
      * the writer's check failed quickly (refused, reset; not a timeout): it is checked again
        after *retry_backoff* s, doubling, at most *retries* times and never past the next round,
        so one lost packet does not leave the proxy writer-less for a whole interval;
      * the writer's check failed with a reason in ANSWERED_REASONS (it answered, but refused the
        health-check login or had no free slot): it stays the writer;
      * the writer answered READ_ONLY (made read-only while up, a switchover): the pool retires
        its connections at once ("writer demoted") so none is lent again, and the proxy has no
        writer until one appears;
      * otherwise the writer is lost (`topology.writer()` raises NoWriter) and borrows wait in the
        pool, up to ConnectionBorrowTimeout, for a writer to appear.

    Never two writers: when a failover moves the writer away from a target that was not seen as a
    standby at that moment (it was unreachable, could not be checked, or was made read-only but is
    still a primary of its own: ProbeResult.replica False), that target is *fenced*: the promoted
    target is the writer, and the fenced one is never made the writer again, even if it comes
    back read-write (its TargetHealth: UNAVAILABLE, INVALID_REPLICATION_STATE), until it answers
    as a standby (READ_ONLY, replica not False: it rejoined and follows the new writer) or is
    registered again (`unfence`).  While the current writer answers READ_WRITE, other targets
    answering READ_WRITE are never used.

    *writer_listeners*: callables(old, new, why) told after the pool was moved off *old* (new may
    be None): the runtime ends the pinned sessions whose connection is on *old*.
    *round_listeners*: callables({target: ProbeResult | Failure}) told after each round.
    *verdicts*: callables(target, ProbeResult) -> (reason, description) or None, asked before a
    check that answered is recorded as AVAILABLE (the reader set's lag rule): a verdict records
    UNAVAILABLE with it instead, so each target's health has one writer per round.
    *vanished_listeners*: callables(target, why) told when a target has vanished (see
    `_count_vanished`): the replica pools of the reader endpoints cut their connections to it.

    The pool reports failed connection attempts and lost connections through
    `connection_failed` / `connection_lost`: a round starts at once instead of at the next tick.
    *database_errors*: failure classes that are the database's own answer (bad password, unknown
    database); they go to the client as before and say nothing about a failover.
    *failure_reason*: failure -> TargetHealth reason (default CONNECTION_FAILED).
    *fences*: where the fencing decision survives a restart (failover/fencing.py ProxyFences:
    `read()` -> (writer id, {fenced id: promoted id}), `save(writer id, fenced)`), or None (in
    memory only).  Read at `start`: a remembered writer that is still a target and not fenced is
    the writer until the first round says otherwise, a remembered fence holds again (a fenced
    target is never kept as the writer, even when the configuration names it first); written
    whenever the writer decided on or the fenced set changes.
    *former_held*: callable(former writer) -> True while some pool still holds a connection to
    it (ends the PROMOTED transition, below); default: this monitor's *pool*.
    """

    log = Logger()
    follows = False  # it decides (IWriterMonitor)
    checks = None  # failover.checks.HealthChecks, set by runtime.build_monitor
    VANISHED_AFTER = 2  # rounds in a row without an answer before a target's connections are cut

    def __init__(self, clock, topology, health, probe, interval=5.0, pool=None,
                 database_errors=(), failure_reason=None, probe_timeout=None,
                 retries=2, retry_backoff=0.5, unreachable=(), fences=None):
        self.clock = clock
        self.topology = topology
        self.health = health
        self.probe = probe
        self.interval = interval
        self.pool = pool
        self.database_errors = tuple(database_errors)
        self.unreachable = (ProbeTimeout,) + tuple(unreachable)  # "nothing answered" failures
        self.failure_reason = failure_reason
        self.probe_timeout = probe_timeout if probe_timeout is not None else min(max(2.0, interval), 10.0)
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.last_writer = topology.current_writer()  # the last target known as the writer
        self.fenced = {}  # former writer -> the target promoted in its place
        self.fences = fences
        self.former_held = None
        self.writer_listeners = []
        self.round_listeners = []
        self.vanished_listeners = []
        self.verdicts = []
        self.promoted = {}  # promoted writer -> the former writer, during the transition (PROMOTED)
        self.rounds = 0
        self.retried = 0  # checks of the writer repeated after a quick failure (tests, logs)
        self._vanished_rounds = {}  # target -> rounds in a row its check got no answer
        self._running = False
        self._round_active = False
        self._tick = None  # the IDelayedCall of the next round
        self._soon = None  # a round asked for by the pool, scheduled for "now"
        self._retry_call = None  # the IDelayedCall of a writer re-check under way

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self):
        """Run a round now and then every `interval` seconds."""
        if self._running:
            return
        self._running = True
        self.restore()
        self._run_round()

    def stop(self):
        """No further rounds; answers of a round under way are ignored."""
        self._running = False
        for call in (self._tick, self._soon, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._tick = self._soon = self._retry_call = None

    def unfence(self, target):
        """*target* was registered again: it may become the writer like any other."""
        if self.fenced.pop(target, None) is not None:
            self.log.info("former writer {t} registered again: no longer fenced", t=target.rds_resource_id)
        self._persist()

    # -- the decision on disk (failover/fencing.py) ----------------------------------------------------
    def restore(self):
        """Take back the writer and fences remembered by *fences* (see the class docstring)."""
        if self.fences is None:
            return
        writer_id, fenced = self.fences.read()
        by_id = {t.rds_resource_id: t for t in self.topology.targets}
        for former, promoted in fenced.items():
            if former in by_id:
                self.fenced[by_id[former]] = by_id.get(promoted, promoted)
        if self.fenced:
            self.log.warn("former writer(s) {ids} fenced (remembered in the state file): not used as "
                          "the writer until they answer as a standby or are registered again",
                          ids=sorted(t.rds_resource_id for t in self.fenced))
        writer = by_id.get(writer_id)
        if writer is not None and writer not in self.fenced:
            if writer is not self.topology.current_writer():
                self.log.info("writer {t} (remembered in the state file)", t=writer.rds_resource_id)
            self.topology.set_writer(writer)
            self.last_writer = writer
        elif self.topology.current_writer() in self.fenced:
            self.topology.set_writer(None)  # the first round finds the writer
            self.last_writer = None

    def _persist(self):
        if self.fences is None:
            return
        writer = self.last_writer.rds_resource_id if self.last_writer is not None else None
        self.fences.save(writer, {t.rds_resource_id: getattr(p, "rds_resource_id", p)
                                  for t, p in self.fenced.items()})

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
        started = self.clock.seconds()
        targets = self.topology.targets
        d = defer.DeferredList([self._probe_one(t) for t in targets], consumeErrors=True)
        # each result is (True, answer) or (False, Failure)
        d.addCallback(lambda results: {t: value for t, (_, value) in zip(targets, results)})
        d.addCallback(self._settle, started, 0)
        d.addCallback(self._decide_and_tell)
        d.addErrback(lambda f: self.log.failure("health check round failed", f))
        d.addBoth(self._round_done)

    def _round_done(self, _):
        self._round_active = False
        self.rounds += 1
        if self._running:
            self._tick = self.clock.callLater(self.interval, self._run_round)

    def _settle(self, results, started, attempt):
        """-> Deferred[results] once the writer's quick failure was checked again (or not)."""
        if not self._running:
            return results
        writer = self.topology.current_writer()
        answer = results.get(writer)
        if (writer is None or not isinstance(answer, Failure) or answer.check(ProbeTimeout)
                or attempt >= self.retries
                or self._reason(answer) in ANSWERED_REASONS
                or any(self._answers_writer(t, r) for t, r in results.items() if t is not writer)):
            return results
        delay = self.retry_backoff * (2 ** attempt)
        if self.clock.seconds() + delay - started >= self.interval:
            return results  # never past the next round
        self.retried += 1
        self.log.info("writer {t} check failed ({why}); checking again in {delay:g} s",
                      t=writer.rds_resource_id, why=answer.getErrorMessage(), delay=delay)
        waited = defer.Deferred()
        self._retry_call = self.clock.callLater(delay, waited.callback, None)
        waited.addCallback(lambda _: self._probe_one(writer))

        def again(answer):
            self._retry_call = None
            results[writer] = answer
            return self._settle(results, started, attempt + 1)

        waited.addBoth(again)
        return waited

    def _answers_writer(self, target, answer):
        return (not isinstance(answer, Failure) and ProbeResult.of(answer).role == READ_WRITE
                and target not in self.fenced)

    def _probe_one(self, target):
        """Deferred[ProbeResult] of one health check, failing with ProbeTimeout after probe_timeout."""
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
            if not isinstance(result, Failure):
                try:
                    result = ProbeResult.of(result)
                except ValueError:
                    result = Failure()
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

    def _reason(self, failure):
        reason = self.failure_reason(failure) if self.failure_reason is not None else None
        return reason or CONNECTION_FAILED

    def _record(self, target, result):
        """TargetHealth and the topology learn *result*; -> its role, or None for a failure."""
        if isinstance(result, Failure):
            self.health.record_failure(target, self._reason(result), result.getErrorMessage())
            self.topology.forget_role(target)
            return None
        self.topology.record_probe(target, result)
        if result.role == READ_WRITE and target in self.fenced:
            promoted = self.fenced[target]
            promoted = getattr(promoted, "rds_resource_id", promoted)
            self.health.record_unavailable(
                target, INVALID_REPLICATION_STATE,
                f"former writer answers read-write after {promoted} was promoted in"
                f" its place; not used until it answers read-only or is registered again")
        else:
            verdict = self._verdict(target, result)
            if verdict is not None:
                self.health.record_unavailable(target, *verdict)
            else:
                self.health.record_success(target)
        return result.role

    def _verdict(self, target, result):
        for verdict in self.verdicts:
            try:
                found = verdict(target, result)
            except Exception:
                self.log.failure("health verdict failed")
                continue
            if found is not None:
                return found
        return None

    def _follow_promotions(self, roles):
        """End the PROMOTED transition of writers whose sessions have all moved (see the
        module docstring); forget promotions of targets that are no longer the writer."""
        current = self.topology.current_writer()
        for target, former in list(self.promoted.items()):
            if target is not current:
                del self.promoted[target]
                continue
            if roles.get(target) != READ_WRITE:
                continue
            if self._former_held(former):
                continue  # sessions still on the former writer
            del self.promoted[target]
            self.health.end_promotion(target)

    def _former_held(self, former):
        if self.former_held is not None:
            return self.former_held(former)
        return self.pool is not None and any(getattr(c, "target", None) is former
                                             for c in self.pool.connections())

    def _decide_and_tell(self, results):
        if not self._running:
            return
        self._decide(results)
        self._persist()
        for listener in list(self.round_listeners):
            try:
                listener(dict(results))
            except Exception:
                self.log.failure("round listener failed")

    def _decide(self, results):
        roles = {t: self._record(t, r) for t, r in results.items()}
        self._follow_promotions(roles)
        for target in [t for t in self.fenced if _follows(results.get(t))]:
            self.log.info("former writer {t} answers as a standby: it may be the writer again",
                          t=target.rds_resource_id)
            del self.fenced[target]
        for target, result in results.items():
            self._count_vanished(target, result)
        current = self.topology.current_writer()
        if current is not None and roles.get(current) == READ_WRITE and current not in self.fenced:
            others = [t.rds_resource_id for t, r in roles.items() if r == READ_WRITE and t is not current]
            if others:
                self.log.warn("targets {others} answer read-write too; {t} stays the only writer",
                              others=others, t=current.rds_resource_id)
            self._retry_pool()
            return
        candidates = [t for t in self.topology.targets
                      if roles.get(t) == READ_WRITE and t not in self.fenced]
        if not candidates:
            if current is None:
                return
            answer = results.get(current)
            if isinstance(answer, Failure) and self._reason(answer) in ANSWERED_REASONS:
                self.log.warn("writer {t} cannot be checked ({why}); it stays the writer",
                              t=current.rds_resource_id, why=answer.getErrorMessage())
                return
            self.log.warn("writer {t} lost ({why}); no target answers as a writer yet",
                          t=current.rds_resource_id, why=_why(answer))
            self.topology.set_writer(None)
            if roles.get(current) == READ_ONLY:
                # made read-only while up: no transaction may start on it again
                self._move_pool(current, None, "writer demoted")
            elif current in self.fenced:
                self._move_pool(current, None, "writer fenced")
            return
        # the last writer, when it answers read-write again, before any other (no move)
        new = self.last_writer if self.last_writer in candidates else candidates[0]
        self.topology.set_writer(new)
        if new is self.last_writer:
            self.log.info("writer {t} is back", t=new.rds_resource_id)
            self._retry_pool()
            return
        old, self.last_writer = self.last_writer, new
        self.log.warn("failover: writer {old} -> {new}",
                      old=old.rds_resource_id if old is not None else None, new=new.rds_resource_id)
        if old is not None and not _follows(results.get(old)):
            self.fenced[old] = new
            self.log.warn("former writer {old} is fenced: it will not be the writer again until it "
                          "answers as a standby or is registered again", old=old.rds_resource_id)
            if roles.get(old) == READ_WRITE:
                self._record(old, results[old])  # its answer this round: INVALID_REPLICATION_STATE
        if old is not None:
            self.promoted[new] = old
            self.health.record_promoted(new)
        self._move_pool(old, new, "failover")

    def _move_pool(self, old, new, why):
        if self.pool is not None:
            self.pool.writer_changed(why)
        for listener in list(self.writer_listeners):
            try:
                listener(old, new, why)
            except Exception:
                self.log.failure("writer listener failed")

    def _count_vanished(self, target, result):
        """A target whose checks fail VANISHED_AFTER rounds in a row without an answer from the
        database (*unreachable*: no connection, no reply within probe_timeout: stopped, cut
        off, crashed without a RST) has vanished: the pool closes its connections, lent ones
        too, so that statements in flight there end with an error within about VANISHED_AFTER
        rounds instead of hanging until TCP gives up (forever for a SIGSTOPped server, whose
        kernel answers keepalives).  One failed round is not enough (a blip must not cut
        running statements).  Any other outcome restarts the count: an answer, even a refusal
        by the database itself (bad password, too many connections) or READ_ONLY, says the
        server is there, and a check that could not be made (no credentials) says nothing
        against it.  The writer's pool holds connections only to the writer (and, until they
        are given back, to former writers); the replica pools of the reader endpoints hold
        connections to replicas: both are told (`vanished_listeners` for the latter), the
        same rule for every target."""
        if not isinstance(result, Failure) or not result.check(*self.unreachable):
            self._vanished_rounds.pop(target, None)
            return
        rounds = self._vanished_rounds[target] = self._vanished_rounds.get(target, 0) + 1
        if rounds != self.VANISHED_AFTER:
            return
        why = f"target {target.rds_resource_id} vanished: {result.getErrorMessage()}"
        if self.pool is not None:
            self.pool.abandon_target(target, why)
        for listener in list(self.vanished_listeners):
            try:
                listener(target, why)
            except Exception:
                self.log.failure("vanished listener failed")

    def _retry_pool(self):
        if self.pool is not None:
            self.pool.retry()


def _follows(result):
    """The check found a read-only target that may follow a writer (not a primary of its own)."""
    return isinstance(result, ProbeResult) and result.follows_a_writer


def _why(result):
    if isinstance(result, Failure):
        return result.getErrorMessage()
    if isinstance(result, ProbeResult):
        return f"answers {result.role}"
    return f"answers {result}"
