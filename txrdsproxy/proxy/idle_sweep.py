"""IdleClientTimeout for every logged-in session of one proxy, with one timer.

Why not one timer per session: a Twisted DelayedCall (with its bound method) is ~0.5 KB, and while
10,000 idle sessions each kept one in the reactor's heap, Twisted's purge of *cancelled* calls
(which waits until they are more than half the heap) let every session's cancelled
ClientAuthTimeout and ClientFirstPacketTimeout calls stay there too, and kept sessions that had
ended reachable through them.  With one sweep per proxy an idle session costs one set entry here.

How it stays bounded: the sweep walks the logged-in sessions, closes those idle for
IdleClientTimeout (counted from the end of their last request: `last_active`) that are not
`busy`, and runs again at the earliest deadline it saw, but never sooner than MIN_INTERVAL
(so many sessions with spread deadlines cost at most one walk a second) and never later than
`interval()` (min(MAX_INTERVAL, IdleClientTimeout)), so that a session that stops being busy, or
a reload that shortens IdleClientTimeout, is looked at again soon.  A session idle since `t` is
therefore closed between `t + IdleClientTimeout` and `t + IdleClientTimeout + MIN_INTERVAL`, and
after a reload that shortened the timeout, at most `interval()` later than that.

Runs on the reactor thread only; no timer is left once no session is logged in.
"""

from twisted.python.failure import Failure

MIN_INTERVAL = 1.0   # seconds between two walks, at least
MAX_INTERVAL = 30.0  # seconds between two walks while a session is logged in, at most


class IdleSweep:
    """The logged-in sessions of one ProxyContext and the one call that closes the idle ones."""

    __slots__ = ("_ctx", "sessions", "_call")

    def __init__(self, ctx):
        self._ctx = ctx  # read for its clock and its current config (a reload replaces it)
        self.sessions = set()
        self._call = None

    def interval(self):
        """-> the longest time between two walks while a session is logged in."""
        return min(MAX_INTERVAL, max(MIN_INTERVAL, self._ctx.config.idle_client_timeout))

    def track(self, session):
        """*session* logged in (or was let in again): IdleClientTimeout applies to it from now on,
        counted from its `last_active`."""
        self.sessions.add(session)
        if self._call is None:
            self._schedule(session.last_active + self._ctx.config.idle_client_timeout)

    def forget(self, session):
        """*session* ended.  The last one to leave takes the timer with it."""
        self.sessions.discard(session)
        if not self.sessions and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def reschedule(self):
        """IdleClientTimeout changed (a reload): walk at once instead of at the time the old
        value gave."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if self.sessions:
            self._call = self._ctx.clock.callLater(0, self._sweep)

    def _schedule(self, deadline):
        now = self._ctx.clock.seconds()
        delay = min(max(deadline - now, MIN_INTERVAL), self.interval())
        self._call = self._ctx.clock.callLater(delay, self._sweep)

    def _sweep(self):
        self._call = None
        now = self._ctx.clock.seconds()
        timeout = self._ctx.config.idle_client_timeout
        earliest = now + self.interval()
        expired = []
        broken = []
        try:
            for session in self.sessions:
                try:
                    if session.busy:  # its idle time starts again at its request's end
                        continue
                except Exception:
                    broken.append((session, Failure()))
                    continue
                deadline = session.last_active + timeout
                if deadline <= now:
                    expired.append(session)
                elif deadline < earliest:
                    earliest = deadline
            for session in expired:
                self.sessions.discard(session)
                try:
                    session.idle_timed_out(timeout)
                except Exception:
                    broken.append((session, Failure()))
            for session, failure in broken:  # one session's bug ends that session, never the sweep
                self.sessions.discard(session)
                session.unexpected(failure, "the idle sweep")  # logs it, closes that session
        finally:  # whatever happened to one session, the others keep their timeout
            if self.sessions and self._call is None:
                self._schedule(earliest)
