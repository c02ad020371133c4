"""The targets of a proxy and which one is the writer.

At start the writer is the first target with Role READ_WRITE, or else the first target.  For a
target group of several targets the WriterMonitor (failover/monitor.py) probes every target and
moves the writer with `set_writer` — to another target, or to None while no target answers as a
writer (a failover in progress: `writer()` raises NoWriter).  Connections are always opened to
`writer()`.
"""

READ_WRITE = "READ_WRITE"
READ_ONLY = "READ_ONLY"


class NoWriter(Exception):
    """No target is currently the writer (failover in progress)."""


class Topology:
    def __init__(self, targets):
        self.targets = tuple(targets)
        writers = [t for t in self.targets if t.role == READ_WRITE]
        self._writer = (writers or list(self.targets))[0] if self.targets else None
        self._probed = {}  # target -> role its last health check answered

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

    def record_role(self, target, role):
        """What *target*'s last health check answered (READ_WRITE or READ_ONLY)."""
        self._probed[target] = role

    def probed_role(self, target):
        """The role *target* last answered, or None when never checked (or unreachable since)."""
        return self._probed.get(target)

    def forget_role(self, target):
        self._probed.pop(target, None)

    def role_of(self, target):
        """The Role `describe-db-proxy-targets` shows: READ_WRITE for the writer, READ_ONLY for
        the others.  While there is no writer, a target's own last answer."""
        if self._writer is None:
            return self._probed.get(target, READ_ONLY)
        return READ_WRITE if target is self._writer else READ_ONLY
