"""BackendPool: the database connections of one proxy's target group, handed out per transaction.

Engine-neutral.  A connector (one per engine family) opens authenticated connections for a key
(user, database); the pool decides how many may exist, who gets one, and what happens on return.

Limits (RDS Proxy's ConnectionPoolConfiguration):
- all connections of the pool, over every key, stay within MaxConnectionsPercent of the database's
  `max_connections`, which each new connection reports (so a change on the server is followed);
- idle connections above MaxIdleConnectionsPercent of `max_connections` are closed by the janitor
  (`pool/janitor.py`) once they have been idle for IdleConnectionTimeout, oldest first; never on
  return, so a pool under load keeps the connections it is using;
- a borrow that cannot be served waits in one FIFO queue for up to ConnectionBorrowTimeout.
Until the first connection has reported `max_connections`, one connection may be opening.

Failover (a target group of several targets): `failover` is the WriterMonitor.  A connection
attempt that fails because there is no writer, or the writer is unreachable, does not fail the
waiter: the pool *stalls* (opens nothing new, still lends idle connections) and the waiters stay
queued until the monitor calls `writer_changed` or `retry`, or their borrow timeout ends.  After
`writer_changed` the connections to the old writer are closed when idle and are never lent again.
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from txrdsproxy.pool.interfaces import ILeaseSource
from txrdsproxy.pool.lease import Lease
from txrdsproxy.pool.policy import Disposition, on_release
from txrdsproxy.pool.states import ConnState


class BorrowTimeout(Exception):
    """No database connection became available within ConnectionBorrowTimeout."""


class PoolClosed(Exception):
    """The pool was shut down while the borrow waited."""


class _Waiter:
    __slots__ = ("key", "deferred", "since", "deadline", "served")

    def __init__(self, key, since, deadline):
        self.key, self.since, self.deadline = key, since, deadline
        self.deferred = None
        self.served = False  # a lease is on its way (see BackendPool._serve)


@implementer(ILeaseSource)
class BackendPool:
    log = Logger()

    def __init__(self, name, connector, pool_config, clock, metrics=None):
        self.name = name
        self.connector = connector
        self.config = pool_config
        self.clock = clock
        self.metrics = metrics
        self.db_max_connections = None
        self._all = set()
        self._idle = collections.defaultdict(list)  # key -> [conn], most recently used last
        self._connecting = collections.Counter()  # key -> connections being opened
        self._waiters = collections.deque()
        self._handing = collections.deque()  # (Deferred, Lease) to fire, in order (see _serve)
        self._handing_out = False
        self._timer = None  # fires at the oldest waiter's deadline
        self._closed = False
        self.failover = None  # the WriterMonitor (connection_failed / connection_lost hooks)
        self._stalled = False  # no writer reachable: waiters wait, nothing new is opened
        self._retired = {}  # conn -> reason: made under what no longer holds (a former writer,
        # older DatabaseTLS, a deregistered target): closed when returned
        self._retired_targets = set()  # deregistered targets: connections to them are not kept
        self._zero_borrows = None  # this pool's borrow latency series (try_borrow), once looked up

    # -- limits -----------------------------------------------------------------------------
    # `Workers: N`: (this worker's index, N).  The caps below are this worker's share of the
    # proxy's: floor(cap / N), plus one for the first cap % N workers (workers.share_of), so
    # the workers together never hold more than MaxConnectionsPercent allows.
    share = (0, 1)

    @property
    def max_connections(self):
        """The cap over every key, or None before the database has told its max_connections."""
        if self.db_max_connections is None:
            return None
        total = max(1, self.db_max_connections * self.config.max_connections_percent // 100)
        index, count = self.share
        if count == 1:
            return total
        return total // count + (1 if index < total % count else 0)

    @property
    def max_idle_connections(self):
        if self.db_max_connections is None:
            return 0
        total = self.db_max_connections * self.config.max_idle_connections_percent // 100
        index, count = self.share
        if count == 1:
            return total
        return total // count + (1 if index < total % count else 0)

    def connections(self):
        """Every connection the pool holds, in any state (for metrics and the admin API)."""
        return list(self._all)

    @property
    def waiting(self):
        return len(self._waiters)

    @property
    def outstanding(self):
        """Connections lent, being reset or being opened, plus borrows waiting: the work this
        pool is doing or about to (the reader endpoints' "least outstanding" measure)."""
        return len(self._all) - self._idle_total() + len(self._waiters)

    def can_lend_now(self, key):
        """Would a borrow of *key* be served without waiting: an idle connection of *key*, or
        room under the cap for a new one, and nobody queued before it?"""
        if self._waiters or self._stalled or self._closed:
            return False
        return bool(self._idle.get(key)) or self._room_for_one()

    @property
    def oldest_wait_since(self):
        """Clock time the longest-waiting borrow started, or None when nobody waits (metrics)."""
        return self._waiters[0].since if self._waiters else None

    # -- borrowing -----------------------------------------------------------------------------
    def borrow(self, key):
        """Deferred[Lease] for a connection of *key*.

        Fails with BorrowTimeout after ConnectionBorrowTimeout, with the connector's error when
        the database refuses a new connection, or PoolClosed.  Cancelling removes the waiter; a
        connection that arrives later goes to the next waiter or back to idle, never lost.
        """
        if self._closed:
            return defer.fail(PoolClosed(self.name))
        idle = self._idle.get(key)
        if idle and not self._waiters:
            conn = idle.pop()
            return defer.succeed(self._lend(conn, self.clock.seconds()))
        now = self.clock.seconds()
        timeout = self.config.connection_borrow_timeout
        # 0 means wait without limit, as in the RDS API.
        waiter = _Waiter(key, now, now + timeout if timeout > 0 else None)

        def cancel(d):
            self._drop_waiter(waiter)

        waiter.deferred = defer.Deferred(cancel)
        self._waiters.append(waiter)
        self._arm_timer()
        self._dispatch()
        return waiter.deferred

    def try_borrow(self, key):
        """A Lease on an idle connection of *key* right now, or None (then use `borrow`)."""
        if self._waiters or self._closed:
            return None
        idle = self._idle.get(key)
        if not idle:
            return None
        conn = idle.pop()
        conn.state = ConnState.BORROWED
        if self.metrics is not None:
            # DatabaseConnectionsBorrowLatency 0 s: the histogram's first bucket (every bound
            # is above 0), counted on the series looked up once, as its observe(0.0) would.
            zero = self._zero_borrows
            if zero is None:
                zero = self._zero_borrows = self.metrics.borrow_latency.series(self.name)
            zero.counts[0] += 1
        return Lease(self, conn, self.clock.seconds())

    def _drop_waiter(self, waiter):
        waiters = self._waiters
        if waiters and waiters[0] is waiter:  # the usual case: FIFO
            waiters.popleft()
            return
        try:
            waiters.remove(waiter)
        except ValueError:
            pass

    def _arm_timer(self):
        """One timer for the whole queue: every waiter has the same timeout, so the oldest
        waiter's deadline is the earliest.  No timer per borrow to schedule and cancel."""
        if self._timer is not None or not self._waiters:
            return
        deadline = self._waiters[0].deadline
        if deadline is not None:
            self._timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), self._expire)

    def _expire(self):
        self._timer = None
        now = self.clock.seconds()
        waiters = self._waiters
        while waiters and waiters[0].deadline is not None and waiters[0].deadline <= now:
            waiter = waiters.popleft()
            if self.metrics is not None:
                self.metrics.borrow_timeouts.inc(self.name)
            waiter.deferred.errback(BorrowTimeout("Timed-out waiting to acquire database connection"))
        self._arm_timer()

    def _lend(self, conn, since):
        conn.state = ConnState.BORROWED
        now = self.clock.seconds()
        if self.metrics is not None:
            self.metrics.borrow_latency.observe(self.name, now - since)  # seconds
        return Lease(self, conn, now)

    def _serve(self, waiter, conn):
        """Lend *conn* to *waiter* now; fire its Deferred from one loop, not recursively.

        A waiter's callback may release at once (a login check that needs nothing from the
        connection), which serves the next waiter from inside this call: with hundreds of
        waiters that recursion would exhaust the stack.  The connection is lent (and the waiter
        dropped) right away, so nothing else can take it; only the callbacks are queued.  A
        waiter cancelled while its lease was queued gives the lease back.
        """
        self._drop_waiter(waiter)
        waiter.served = True
        self._handing.append((waiter.deferred, self._lend(conn, waiter.since)))
        if self._handing_out:
            return
        self._handing_out = True
        try:
            handing = self._handing
            while handing:
                d, lease = handing.popleft()
                if d.called:  # cancelled meanwhile
                    lease.release()
                else:
                    d.callback(lease)
        finally:
            self._handing_out = False

    def _dispatch(self):
        """Serve waiters in FIFO order: idle connections first, then new ones within the cap."""
        if self._closed or not self._waiters:
            return
        coming = collections.Counter(self._connecting)
        for waiter in list(self._waiters):
            if waiter.served or waiter.deferred.called:  # served re-entrantly meanwhile
                continue
            key = waiter.key
            idle = self._idle.get(key)
            if idle:
                self._serve(waiter, idle.pop())
                continue
            if coming[key] > 0:  # a connection being opened will serve this waiter
                coming[key] -= 1
                continue
            if self._stalled:  # waiting for a writer (failover)
                continue
            if not self._room_for_one():
                if not self._evict_idle_other_than(key):
                    if not self._idle_total():
                        # No idle connection to lend or evict and no room to open one: no later
                        # waiter can be served either (without this, every release walked the
                        # whole queue: O(waiters) per release under contention).
                        break
                    continue
            self._open(key)

    def _room_for_one(self):
        limit = self.max_connections
        if limit is None:
            return not self._all  # learn max_connections from the first connection
        return len(self._all) < limit

    def _evict_idle_other_than(self, key):
        """At the cap with waiters for *key*: close the longest-idle connection of another key."""
        oldest = None
        for other, conns in self._idle.items():
            if other != key and conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        self._close(oldest, "evicted for a waiter of another user/database")
        return True

    def _open(self, key):
        placeholder = _Opening(key)
        self._all.add(placeholder)
        self._connecting[key] += 1
        try:
            d = self.connector.connect(key)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(placeholder,), errbackArgs=(placeholder,))

    def _opened(self, conn, placeholder):
        self._all.discard(placeholder)
        self._connecting[placeholder.key] -= 1
        if conn.server_max_connections:
            self.db_max_connections = conn.server_max_connections
        self._all.add(conn)
        conn.pool_listener = self._lost
        if self._closed:
            self._close(conn, "pool closed")
            return
        if placeholder.retired or getattr(conn, "target", None) in self._retired_targets:
            # opened to the writer of before a failover, under settings changed meanwhile, or
            # to a target deregistered meanwhile
            self._close(conn, placeholder.retired or "failover")
            self._dispatch()
            return
        self._make_idle(conn)
        # The first connection has just told max_connections: open for the other waiters too.
        self._dispatch()

    def _open_failed(self, failure, placeholder):
        self._all.discard(placeholder)
        key = placeholder.key
        self._connecting[key] -= 1
        if self.failover is not None and not self._closed and self.failover.connection_failed(failure):
            if not self._stalled:
                self.log.warn("pool {pool}: no writer reachable ({error}); {n} borrow(s) wait"
                              " for the failover", pool=self.name, error=failure.getErrorMessage(),
                              n=len(self._waiters))
            self._stalled = True
            return
        self.log.warn("pool {pool}: cannot open a database connection for {key}: {error}",
                      pool=self.name, key=key, error=failure.getErrorMessage())
        for waiter in self._waiters:
            if waiter.key == key:
                self._drop_waiter(waiter)
                waiter.deferred.errback(failure)
                break
        self._dispatch()

    # -- return -------------------------------------------------------------------------------
    def _release(self, conn, clean, needs_reset, reason):
        if (clean and not needs_reset and not self._waiters and conn.state == ConnState.BORROWED
                and not self._closed and not self._retired):
            # The common case, once per transaction: straight back to idle (what on_release
            # and _make_idle decide for it, without their general checks).
            limit = self.max_connections
            if limit is None or len(self._all) <= limit:
                conn.state = ConnState.IDLE
                conn.idle_since = self.clock.seconds()
                self._idle[conn.key].append(conn)
                return
        decision, why = on_release(conn.state, clean, needs_reset, len(self._all), self.max_connections)
        if conn in self._retired:
            self._close(conn, self._retired[conn])
        elif decision is Disposition.CLOSE or self._closed:
            self._close(conn, reason or why or "pool closed")
        elif decision is Disposition.RESET:
            conn.state = ConnState.RESETTING
            d = conn.reset()
            d.addCallbacks(self._reset_done, self._reset_failed, callbackArgs=(conn,), errbackArgs=(conn,))
        else:
            self._make_idle(conn)
        self._dispatch()

    def _reset_done(self, _, conn):
        if conn.state != ConnState.RESETTING:
            return
        if self._closed:
            self._close(conn, "pool closed")
        elif conn in self._retired:
            self._close(conn, self._retired[conn])
            self._dispatch()
        else:
            self._make_idle(conn)

    def _reset_failed(self, failure, conn):
        self._close(conn, f"reset failed: {failure.getErrorMessage()}")
        self._dispatch()  # the closed connection made room under the cap

    def _make_idle(self, conn):
        conn.state = ConnState.IDLE
        conn.idle_since = self.clock.seconds()
        for waiter in self._waiters:
            if waiter.key == conn.key:
                self._serve(waiter, conn)
                return
        if self._waiters and not self._room_for_one():
            self._close(conn, "making room for a waiter of another user/database")
            self._dispatch()
            return
        self._idle[conn.key].append(conn)
        if self._waiters:
            self._dispatch()

    def _idle_total(self):
        return sum(len(c) for c in self._idle.values())

    def _close(self, conn, reason):
        self._forget(conn)
        if conn.state != ConnState.CLOSED:
            self.log.info("pool {pool}: closing database connection {conn}: {reason}",
                          pool=self.name, conn=conn, reason=reason)
            if self.metrics is not None:
                self.metrics.connection_closed(self.name, conn, reason)
            conn.close(reason)

    def _forget(self, conn):
        self._all.discard(conn)
        self._retired.pop(conn, None)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _lost(self, conn, reason):
        """The connection went away on its own (server closed it, network error)."""
        was_tracked = conn in self._all
        self._forget(conn)
        if was_tracked:
            self.log.info("pool {pool}: database connection {conn} lost: {reason}",
                          pool=self.name, conn=conn, reason=reason)
            if self.metrics is not None:
                self.metrics.connection_closed(self.name, conn, reason)
            if self.failover is not None:
                self.failover.connection_lost()
            self._dispatch()

    # -- failover -------------------------------------------------------------------------------
    def writer_changed(self, reason="failover"):
        """The writer moved to another target (called by the WriterMonitor).

        Idle connections (to the old writer) are closed with *reason*; borrowed and resetting
        ones are closed when they come back instead of being reused; ones being opened are
        closed once open.  Sessions that hold no connection are not touched: their next
        transaction borrows a new connection, to the new writer.  Waiters are served now.
        """
        self.retire("writer changed", reason)

    def retire(self, what, reason):
        """Lend none of the connections held now again (see `retire_all`), and log *what*
        happened: the writer changed, or (a replica pool) its target left the reader set."""
        self.log.warn("pool {pool}: {what} ({reason}); retiring {n} connection(s)",
                      pool=self.name, what=what, reason=reason, n=len(self._all))
        self._stalled = False
        self.retire_all(reason)

    def retire_all(self, reason):
        """Every connection the pool holds now was made under what no longer holds (another
        writer, older DatabaseTLS settings): none is lent again.  Idle ones close now with
        *reason*; borrowed and resetting ones close when they come back (their transaction
        finishes first); ones being opened close once open.  Waiters get new connections."""
        for conn in list(self._all):
            if isinstance(conn, _Opening):
                conn.retired = reason
            elif conn.state == ConnState.IDLE:
                self._close(conn, reason)
            else:
                self._retired[conn] = reason
        self._dispatch()

    def is_retired(self, conn):
        """*conn* closes when it comes back (retired, or its pool is closing or gone)."""
        return conn in self._retired or conn not in self._all

    def abandon_target(self, target, reason):
        """*target* vanished (called by the WriterMonitor when the writer's health check got no
        answer or no connection): every connection to it closes now, lent ones included, by
        aborting the socket.  A stopped or cut-off server never answers, and TCP may take hours
        to give up (forever for a SIGSTOPped process, whose kernel still answers keepalives):
        the session holding a connection hears of it through backend_lost at once, so a
        statement in flight gets an error within a health-check round instead.  Connections
        being opened to it are left to DatabaseConnectTimeout.  -> the number closed."""
        closed = 0
        for conn in list(self._all):
            if isinstance(conn, _Opening) or getattr(conn, "target", None) is not target:
                continue
            self._forget(conn)
            if conn.state == ConnState.CLOSED:
                continue
            self.log.warn("pool {pool}: closing database connection {conn}: {reason}",
                          pool=self.name, conn=conn, reason=reason)
            if self.metrics is not None:
                self.metrics.connection_closed(self.name, conn, reason)
            conn.close(reason, abort=True)
            closed += 1
        self._dispatch()
        return closed

    def retire_target(self, target, reason="target deregistered"):
        """*target* left the target group (deregistered): its idle connections close now, the
        borrowed and resetting ones when their session gives them back (so a transaction on
        it finishes first), ones being opened to it once open.  Sessions that hold none of
        its connections are not touched."""
        self._retired_targets.add(target)
        for conn in list(self._all):
            if isinstance(conn, _Opening) or getattr(conn, "target", None) != target:
                continue
            if conn.state == ConnState.IDLE:
                self._close(conn, reason)
            else:
                self._retired[conn] = reason
        self._dispatch()

    def readmit_target(self, target):
        """*target* was registered (again): connections to it may be kept."""
        self._retired_targets.discard(target)

    def reconfigure(self, pool_config):
        """Use *pool_config* (a ConnectionPoolConfig) from the next borrow on.

        A lower MaxConnectionsPercent closes idle connections above the new cap now and the
        borrowed ones above it as they come back (the release rule); under a lower idle cap the
        janitor closes the idle connections above it once idle for IdleConnectionTimeout (those
        already idle that long now); a higher cap serves waiting borrows at once.  The new
        ConnectionBorrowTimeout applies to borrows made from now on."""
        self.config = pool_config
        limit = self.max_connections
        if limit is not None:
            idle = sorted((c for conns in self._idle.values() for c in conns),
                          key=lambda c: c.idle_since)
            for conn in idle:
                if len(self._all) <= limit:
                    break
                self._close(conn, "above MaxConnectionsPercent")
        self.trim_idle()
        self._dispatch()

    def retry(self):
        """A writer is reachable again: open connections for the waiters that were held back."""
        if self._stalled:
            self._stalled = False
            self._dispatch()

    @property
    def stalled(self):
        """Waiting for a writer (failover in progress)."""
        return self._stalled

    # -- maintenance ----------------------------------------------------------------------------
    def idle_count(self):
        return self._idle_total()

    def trim_idle(self):
        """Close idle connections above the idle cap that have been idle for the pool's
        IdleConnectionTimeout, oldest first (the janitor's job; never done on release, so a
        pool under load keeps the connections it is using).

        -> the time at which the next idle connection above the cap will have been idle long
        enough, or None when the idle count is within the cap.
        """
        cap = self.max_idle_connections
        if self._idle_total() <= cap:
            return None
        now = self.clock.seconds()
        lifetime = self.config.idle_connection_timeout
        idle = sorted((c for conns in self._idle.values() for c in conns), key=_idle_since)
        excess = len(idle) - cap
        for conn in idle[:excess]:
            if now - conn.idle_since < lifetime:
                return conn.idle_since + lifetime
            self._close(conn, "above MaxIdleConnectionsPercent")
        return None

    def close_all(self, reason):
        """Close every idle connection now; borrowed ones close when they are returned."""
        for conns in list(self._idle.values()):
            for conn in list(conns):
                self._close(conn, reason)

    def shutdown(self):
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for waiter in list(self._waiters):
            self._drop_waiter(waiter)
            waiter.deferred.errback(PoolClosed(self.name))
        self.close_all("proxy stopping")


def _idle_since(conn):
    return conn.idle_since


class _Opening:
    """Stands for a connection being opened, so it counts against the cap."""

    state = ConnState.CONNECTING
    idle_since = 0.0

    def __init__(self, key):
        self.key = key
        self.retired = None  # why it closes once open (the writer changed meanwhile, ...)

