"""A Lease: one session's hold on one database connection, from borrow to release."""

from zope.interface import implementer

from txrdsproxy.pool.interfaces import ILease


@implementer(ILease)
class Lease:
    """Given out by `BackendPool.borrow`; `release` is idempotent so every exit path may call it."""

    __slots__ = ("conn", "_pool", "borrowed_at", "_released")

    def __init__(self, pool, conn, now):
        self.conn = conn
        self._pool = pool
        self.borrowed_at = now
        self._released = False

    @property
    def released(self):
        return self._released

    @property
    def retired(self):
        """True when the connection will not be lent again once given back (its target is no
        longer the writer or a reader, it vanished, ...): the session must not send it more
        than the transaction in progress needs."""
        return self._pool.is_retired(self.conn)

    def release(self, clean=True, needs_reset=False, reason=None):
        """Give the connection back.

        *clean*=False means its state is unknown: it is closed.  *needs_reset*: the session left
        state behind (pinned, or an open transaction); the connection is reset before reuse.
        """
        if self._released:
            return
        self._released = True
        self._pool._release(self.conn, clean, needs_reset, reason)
