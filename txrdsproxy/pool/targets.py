"""One BackendPool per replica target, for the reader endpoints (failover/readers.py).

The writer's pool (`ProxyContext.pool`) opens its connections to whichever target is the writer
now.  A reader endpoint needs connections to one particular replica, so each replica it uses gets
a pool of its own, opened through `TargetConnector` (the proxy's connector pinned to that target).
Each such pool follows the same rules as the writer's (pool/pool.py), on its own: its cap is
MaxConnectionsPercent of *that replica's* `max_connections` (each database has its own
connection slots), its idle cap and ConnectionBorrowTimeout are the target group's.

Failures are not failovers here: a replica that cannot be reached fails the borrow at once (the
router tries another replica) and its lost or refused connections are reported to the reader set
(`on_trouble(target, why)`), which takes the replica out until the next health check says it
is back.
"""

from twisted.logger import Logger

from txrdsproxy.pool.pool import BackendPool


class TargetConnector:
    """The proxy's connector, opening every connection to one *target* (any role)."""

    def __init__(self, connector, target):
        self.connector = connector
        self.target = target

    def connect(self, key):
        return self.connector.connect_to(self.target, key)


class _TroubleReporter:
    """What a replica pool tells the reader set instead of the WriterMonitor (the pool's
    `failover` hook): a refused or lost connection takes the replica out of the reader set at
    once; the waiter's borrow fails (no stalling: another replica may serve it)."""

    def __init__(self, target, on_trouble):
        self.target = target
        self.on_trouble = on_trouble

    def connection_failed(self, failure):
        self.on_trouble(self.target, failure.getErrorMessage())
        return False  # fail the waiter now

    def connection_lost(self):
        self.on_trouble(self.target, "a database connection to it was lost")


class TargetPools:
    """The replica pools of one proxy: target -> BackendPool, made on first use."""

    log = Logger()

    def __init__(self, name, connector, pool_config, clock, metrics=None, on_trouble=None):
        self.name = name
        self.connector = connector
        self.config = pool_config
        self.clock = clock
        self.metrics = metrics
        self.on_trouble = on_trouble or (lambda target, why: None)
        self._pools = {}  # target -> BackendPool
        self._share = (0, 1)  # `Workers: N`: this worker's share of each replica's cap

    @property
    def share(self):
        return self._share

    @share.setter
    def share(self, share):
        """This worker's (index, N) share of each replica pool's caps (as BackendPool.share)."""
        self._share = share
        for pool in self._pools.values():
            pool.share = share

    def __iter__(self):
        return iter(list(self._pools.values()))

    def get(self, target):
        """-> the pool of *target*, made now if it has none."""
        pool = self._pools.get(target)
        if pool is None:
            pool = BackendPool(self.name, TargetConnector(self.connector, target), self.config,
                               self.clock, self.metrics)
            pool.failover = _TroubleReporter(target, self._trouble)
            pool.share = self._share
            self._pools[target] = pool
        return pool

    def existing(self, target):
        """-> the pool of *target*, or None when it has none."""
        return self._pools.get(target)

    def _trouble(self, target, why):
        self.on_trouble(target, why)

    def connections(self):
        """Every connection of every replica pool (metrics, the admin API)."""
        return [c for pool in self._pools.values() for c in pool.connections()]

    def retire(self, target, reason):
        """*target* must get nothing more from a reader endpoint (promoted, failed, removed):
        its idle connections close now, borrowed ones when their session gives them back (after
        the transaction), ones being opened once open."""
        pool = self._pools.get(target)
        if pool is not None:
            pool.retire("replica pool retired", reason)

    def abandon(self, target, reason):
        """*target* vanished (the WriterMonitor's rule, failover/monitor.py): every connection
        of its pool closes now, lent ones included (their sessions hear of it at once and
        answer the request in flight with the engine's "lost during the request" error when
        nothing else was lost), and the pool is retired so nothing more is lent from it.
        -> the number of connections closed."""
        pool = self._pools.get(target)
        if pool is None:
            return 0
        closed = pool.abandon_target(target, reason)
        pool.retire("replica pool cut", reason)
        return closed

    def drop(self, target, reason):
        """*target* left the target group: close its pool (borrowed connections close on
        return) and forget it."""
        pool = self._pools.pop(target, None)
        if pool is not None:
            pool.retire("replica pool closed", reason)
            pool.shutdown()

    def reconfigure(self, pool_config):
        self.config = pool_config
        for pool in self._pools.values():
            pool.reconfigure(pool_config)

    def trim_idle(self):
        """The janitor's pass over every replica pool -> the earliest next deadline or None."""
        times = [t for t in (pool.trim_idle() for pool in list(self._pools.values())) if t is not None]
        return min(times) if times else None

    def shutdown(self):
        for pool in self._pools.values():
            pool.shutdown()

