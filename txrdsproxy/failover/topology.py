"""The targets of a proxy and which one is the writer.

The writer is the first target with Role READ_WRITE, or else the first target.  The failover
monitor (a later part) moves the writer by calling `set_writer`; connections are always opened
to `writer()`.
"""


class NoWriter(Exception):
    """No target is currently the writer (failover in progress)."""


class Topology:
    def __init__(self, targets):
        self.targets = tuple(targets)
        writers = [t for t in self.targets if t.role == "READ_WRITE"]
        self._writer = (writers or list(self.targets))[0] if self.targets else None

    def writer(self):
        if self._writer is None:
            raise NoWriter("no writer target is available")
        return self._writer

    def set_writer(self, target):
        self._writer = target

    def role_of(self, target):
        return "READ_WRITE" if target is self._writer else "READ_ONLY"
