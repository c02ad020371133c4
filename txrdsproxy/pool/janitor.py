"""The pool's janitor: closes idle database connections above MaxIdleConnectionsPercent.

Why not on release: under load every returned connection is borrowed again a moment later, so
closing the one that comes back while the idle count is at the cap only makes the next borrow
open a new connection (a database login per transaction).  Instead, connections above the cap are
closed once they have stayed idle for IdleConnectionTimeout (PgBouncer's server_idle_timeout),
oldest first: after a load spike the pool shrinks back to the idle cap, while steady load, which
keeps every connection busy, never loses one.

The janitor wakes when the oldest idle connection above the cap is due (the pool tells it), or
else after one IdleConnectionTimeout: a connection that becomes idle after this run cannot be due
before then.  Runs on the injected clock.
"""

from twisted.logger import Logger


class PoolJanitor:
    """Trims one BackendPool on *clock* (`start()`, `stop()`; `run()` does one pass now)."""

    log = Logger()
    MAX_SLEEP = 60.0  # wake at least this often (db max_connections may move the cap)

    def __init__(self, pool, clock):
        self.pool = pool
        self.clock = clock
        self._call = None

    @property
    def running(self):
        return self._call is not None

    def start(self):
        if self._call is None:
            self._schedule(self._sleep())

    def stop(self):
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def wake(self):
        """Run a pass now and schedule the next one from it: the pool's settings changed (a
        shorter IdleConnectionTimeout or a lower idle cap must not wait for the sleep the old
        settings gave, up to MAX_SLEEP).  Does nothing while stopped."""
        if self._call is None:
            return
        self.stop()
        self._schedule(self.run())

    def run(self):
        """One pass: close what is due; -> seconds until the next pass."""
        try:
            due = self.pool.trim_idle()
        except Exception:  # a bug here must not stop the janitor for good
            self.log.failure("pool {pool}: janitor pass failed", pool=self.pool.name)
            due = None
        if due is None:
            return self._sleep()
        return max(0.0, due - self.clock.seconds())

    def _sleep(self):
        return min(self.pool.config.idle_connection_timeout, self.MAX_SLEEP)

    def _tick(self):
        self._call = None
        self._schedule(self.run())

    def _schedule(self, delay):
        self._call = self.clock.callLater(delay, self._tick)
