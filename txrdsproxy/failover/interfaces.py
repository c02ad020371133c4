"""The seam between a proxy's writer decisions and the parts that use them (DESIGN rule 11).

A proxy of several targets has one `IWriterMonitor` as `ctx.monitor` and as its pool's
`failover`: the WriterMonitor that probes and decides (failover/monitor.py), or, in a worker of
`Workers: N`, the FollowerMonitor that applies the supervisor's decisions (failover/follower.py).
The pool, the runtime (changes, start/stop), the reader set's wiring (endpoints.attach_monitor)
and the pinned-session drain use only what is declared here.
"""

from zope.interface import Attribute, Interface

__all__ = ["IWriterMonitor"]


class IWriterMonitor(Interface):
    follows = Attribute("True when the decisions are another process's (a worker of Workers: N)")
    interval = Attribute("seconds between rounds (HealthCheckInterval); changeable")
    retries = Attribute("quick re-checks of the writer (HealthCheck.Retries); changeable")
    checks = Attribute("failover.checks.HealthChecks: who a check logs in as (the reader set's re-checks)")
    last_writer = Attribute("the last target known as the writer, or None")
    fenced = Attribute("{former writer: the target promoted in its place}")
    promoted = Attribute("{promoted writer: former writer} during the PROMOTED transition")
    writer_listeners = Attribute("callables(old, new, why) told after the pool moved off old")
    round_listeners = Attribute("callables({target: ProbeResult | Failure}) told after each round")
    vanished_listeners = Attribute("callables(target, why) told when a target is cut as vanished")
    verdicts = Attribute("callables(target, ProbeResult) -> (reason, description) or None")

    def start():
        """Begin (rounds, or following the decisions); idempotent."""

    def stop():
        """No further rounds or decisions applied; pending timers cancelled."""

    def unfence(target):
        """*target* was registered again: it may be the writer like any other."""

    def connection_failed(failure):
        """The pool could not open a connection to the writer -> True when this may be a
        failover (the pool keeps its waiters queued), False for the database's own refusals."""

    def connection_lost():
        """A pooled connection went away on its own: check (or ask for a check) now."""

    def probe_now():
        """A round as soon as possible (not re-entrant)."""
