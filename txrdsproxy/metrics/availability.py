"""AvailabilityPercentage: the share of the last minute a target group was available in a role.

RDS Proxy reports it per ProxyName, TargetGroup and TargetRole every minute.  Here a tracker per
proxy remembers when each role became available or unavailable; the collector asks for the
percentage over the last `WINDOW` seconds at scrape time.

A role is available when a target in that role is AVAILABLE in TargetHealth: for READ_WRITE the
current writer (none during a failover: unavailable), for READ_ONLY any other target whose last
health check answered READ_ONLY (only for target groups of several targets).  The tracker looks
again at every health record (TargetHealth tells its listeners) and at every scrape, so a change
is seen at the latest at the next health check.  Time before the first evidence (targets still
REGISTERING) is not counted: no series until then, as CloudWatch shows none before the first
connection.
"""

import collections

from txrdsproxy.failover.monitor import AVAILABLE
from txrdsproxy.failover.topology import READ_ONLY, READ_WRITE

WINDOW = 60.0


class RoleAvailability:
    """Transitions of one role: [(clock time, available)], the oldest at most one before the window."""

    __slots__ = ("changes",)

    def __init__(self):
        self.changes = collections.deque()

    def note(self, now, available):
        if not self.changes or self.changes[-1][1] != available:
            self.changes.append((now, available))

    def percentage(self, now, window=WINDOW):
        """Percent of [now - window, now] (from the first evidence) spent available; None before
        any evidence."""
        changes = self.changes
        start = now - window
        while len(changes) > 1 and changes[1][0] <= start:
            changes.popleft()
        if not changes:
            return None
        begin = max(start, changes[0][0])
        if now <= begin:
            return 100.0 if changes[-1][1] else 0.0
        up = 0.0
        for i, (t, available) in enumerate(changes):
            end = changes[i + 1][0] if i + 1 < len(changes) else now
            if available:
                up += max(0.0, end - max(t, begin))
        return 100.0 * up / (now - begin)

    @property
    def available(self):
        return bool(self.changes) and self.changes[-1][1]


class AvailabilityTracker:
    """Per proxy: READ_WRITE and READ_ONLY availability over time (see the module docstring)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.roles = {READ_WRITE: RoleAvailability(), READ_ONLY: RoleAvailability()}
        health = getattr(ctx, "health", None)
        listeners = getattr(health, "listeners", None)
        if listeners is not None:
            listeners.append(self._health_changed)

    def _health_changed(self, target, record):
        self.update()

    def update(self):
        """Look at the targets' health now and note any change of each role's availability."""
        ctx = self.ctx
        health, topology = getattr(ctx, "health", None), getattr(ctx, "topology", None)
        if health is None or topology is None:
            return
        now = ctx.clock.seconds()
        records = {t: health.health_of(t) for t in topology.targets}
        if all(r.state not in (AVAILABLE, "UNAVAILABLE") for r in records.values()):
            return  # nothing tried yet
        writer = topology.current_writer()
        self.roles[READ_WRITE].note(now, writer is not None and records.get(writer) is not None
                                    and records[writer].state == AVAILABLE)
        if len(topology.targets) > 1:
            readers = [t for t in topology.targets
                       if t is not writer and topology.probed_role(t) == READ_ONLY]
            self.roles[READ_ONLY].note(now, any(records[t].state == AVAILABLE for t in readers))

    def percentages(self):
        """-> {role: percent} for the roles with evidence, after looking at the health now."""
        self.update()
        now = self.ctx.clock.seconds()
        out = {}
        for role, tracker in self.roles.items():
            value = tracker.percentage(now)
            if value is not None:
                out[role] = value
        return out
