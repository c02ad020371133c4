"""The targets of a proxy and which one is the writer.

At start the writer is the first target with Role READ_WRITE, or else the first target.  For a
target group of several targets the WriterMonitor (failover/monitor.py) probes every target and
moves the writer with `set_writer` — to another target, or to None while no target answers as a
writer (a failover in progress: `writer()` raises NoWriter).  Connections are always opened to
`writer()`.

What each target's last health check answered is kept here as a ProbeResult (`last_probe`), so
the parts that choose among targets (the writer, the reader endpoints) read one place.
"""

from dataclasses import dataclass
from typing import Optional

READ_WRITE = "READ_WRITE"
READ_ONLY = "READ_ONLY"


class NoWriter(Exception):
    """No target is currently the writer (failover in progress)."""


@dataclass(frozen=True)
class ProbeResult:
    """What one health check of a target found.

    role: READ_WRITE (accepts writes) or READ_ONLY (a standby/replica, or a writer made read-only);
    replica: True when the target replays a writer's changes (PostgreSQL in recovery), False when
    it is known not to (a primary, perhaps made read-only), None when the engine cannot tell;
    lag: replay lag in seconds when the engine's probe measured it (replicas), else None;
    detail: a short text for logs and TargetHealth descriptions (never secrets), or None.
    """

    role: str
    lag: Optional[float] = None
    detail: Optional[str] = None
    replica: Optional[bool] = None

    @property
    def follows_a_writer(self):
        """Read-only and not known to be a primary of its own: it may have rejoined as a standby."""
        return self.role == READ_ONLY and self.replica is not False

    @classmethod
    def of(cls, answer):
        """-> ProbeResult for a probe's answer: a ProbeResult, or a bare role string."""
        if isinstance(answer, ProbeResult):
            return answer
        if answer in (READ_WRITE, READ_ONLY):
            return cls(answer)
        raise ValueError(f"a health check answered {answer!r}, not a role")


class Topology:
    def __init__(self, targets):
        self.targets = tuple(targets)
        writers = [t for t in self.targets if t.role == READ_WRITE]
        self._writer = (writers or list(self.targets))[0] if self.targets else None
        self._probed = {}  # target -> ProbeResult of its last health check

    def writer(self):
        """The current writer target; raises NoWriter while there is none."""
        if self._writer is None:
            raise NoWriter("no writer target is available")
        return self._writer

    def current_writer(self):
        """The current writer target, or None (no exception)."""
        return self._writer

    def set_writer(self, target):
        """Make *target* the writer; None: no writer is known until the next change."""
        self._writer = target

    def record_probe(self, target, result):
        """*target*'s last health check found *result* (a ProbeResult or a role string)."""
        self._probed[target] = ProbeResult.of(result)

    record_role = record_probe  # older name: a bare role is accepted as well

    def last_probe(self, target):
        """-> the ProbeResult of *target*'s last health check, or None when it was never
        checked or its last check failed."""
        return self._probed.get(target)

    def probed_role(self, target):
        """The role *target* last answered, or None when never checked (or unreachable since)."""
        result = self._probed.get(target)
        return None if result is None else result.role

    def forget_role(self, target):
        self._probed.pop(target, None)

    def role_of(self, target):
        """The Role `describe-db-proxy-targets` shows: READ_WRITE for the writer, READ_ONLY for
        the others.  While there is no writer, a target's own last answer."""
        if self._writer is None:
            return self.probed_role(target) or READ_ONLY
        return READ_WRITE if target is self._writer else READ_ONLY
