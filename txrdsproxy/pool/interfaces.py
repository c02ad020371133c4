"""The seam between sessions and what lends them database connections.

`BackendPool` provides `ILeaseSource`; so may anything a session borrows from instead (a reader
endpoint's router over replica pools, a test's fake).  Sessions use only these names
(`ClientSession.borrow`), and tests check every provider with `verifyObject`.
"""

from zope.interface import Attribute, Interface


class ILease(Interface):
    """One session's hold on one database connection, from borrow to release."""

    conn = Attribute("The lent connection (provides proxy.interfaces.IBackendConnection).")
    borrowed_at = Attribute("Clock time it was lent (latency metrics).")
    released = Attribute("True once `release` was called.")
    retired = Attribute("True when the connection closes once given back (no longer lent: a former"
                        " writer, a replica out of the reader set): send it nothing more than the"
                        " transaction in progress needs.")

    def release(clean=True, needs_reset=False, reason=None):
        """Give the connection back; idempotent.  *clean* False: its state is unknown, it is
        closed (with *reason*); *needs_reset*: the session left state there (reset first)."""


class ILeaseSource(Interface):
    """Lends connections by pool key."""

    def try_borrow(key):
        """-> an ILease on an idle connection of *key* right now, or None (then `borrow`).
        Never waits, never opens a connection."""

    def borrow(key):
        """-> Deferred[ILease], bounded by ConnectionBorrowTimeout (fails with BorrowTimeout,
        PoolClosed, or the connector's error).  Cancelling it removes the waiter; a connection
        that arrives later is never lost."""
