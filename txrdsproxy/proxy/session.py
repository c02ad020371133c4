"""Engine-neutral parts of a client session: its named states and the
flows both engines share (timers, borrowing and attaching a database connection, pinning,
draining, ending).

A session is in exactly one state, changed only through `ClientSession.set_state`; metrics and the
admin API read these states instead of keeping parallel counters.
"""

import enum

from OpenSSL.SSL import Error as TLSError
from twisted.internet import defer, protocol
from twisted.logger import Logger

from txrdsproxy.pool.pool import BorrowTimeout, PoolClosed
from txrdsproxy.proxy.connector import BackendGone, DatabaseRefused, client_socket_ready
from txrdsproxy.proxy.relay import couple, uncouple
from txrdsproxy.pool.states import ConnState
from txrdsproxy.proxy.context import DEBUG_LOGGING_SECONDS, ProxyContext  # noqa: F401 (moved; old imports keep working)
from txrdsproxy.proxy.pin_move import MOVING, PinMove, ReplayFailed

READ_ONLY_KEY = "READ_ONLY"  # last element of a READ_ONLY endpoint's session keys (engines that need it)
AUTH_TIMEOUT = 60.0  # default ClientAuthTimeout: seconds from connecting to the end of authentication


class Phase(str, enum.Enum):
    """Where a client connection is in its protocol (both engines).  Members are `str` too and
    equal to their value, so engine code may still compare by name while it moves over."""

    GREETING = "greeting"    # MySQL: the server greeting is being prepared
    STARTUP = "startup"      # PostgreSQL: SSLRequest / StartupMessage / CancelRequest
    HANDSHAKE = "handshake"  # MySQL: waiting for the handshake response
    AUTH = "auth"            # the client proves who it is
    IAM = "iam"              # an IAM token is being verified (reading held)
    SECRETS = "secrets"      # the secrets store's first read has not ended yet (reading held)
    LOGIN = "login"          # authenticated; the proxy learns the server's parameters
    SESSION = "session"      # PostgreSQL: relaying
    COMMAND = "command"      # MySQL: relaying
    CLOSING = "closing"      # the session is ending: input is ignored

    def __str__(self):
        return self.value

    __format__ = str.__format__


class BorrowFailure(enum.Enum):
    """Why a session could not get a usable database connection: what the client is told,
    in its engine's words (`ClientSession.client_error`, docs/errors.md)."""

    TIMEOUT = "timeout"              # no connection within ConnectionBorrowTimeout (pool.BorrowTimeout)
    DATABASE_ERROR = "database"      # the database refused (a login, a parameter sync): its own error
    UNREACHABLE = "unreachable"      # no connection could be made, or it broke (BackendGone)
    SHUTTING_DOWN = "shutting-down"  # the pool closed while the borrow waited (PoolClosed)
    UNKNOWN = "unknown"              # anything else: a bug, logged with its traceback


def borrow_failure(failure):
    """-> the BorrowFailure for a failed borrow or sync (a twisted Failure)."""
    if failure.check(BorrowTimeout):
        return BorrowFailure.TIMEOUT
    if failure.check(DatabaseRefused):
        return BorrowFailure.DATABASE_ERROR
    if failure.check(BackendGone):
        return BorrowFailure.UNREACHABLE
    if failure.check(PoolClosed):
        return BorrowFailure.SHUTTING_DOWN
    return BorrowFailure.UNKNOWN


class SessionState(enum.Enum):
    AUTHENTICATING = "authenticating"
    IDLE = "idle"          # no database connection held
    BORROWING = "borrowing"  # waiting for the pool
    BORROWED = "borrowed"  # holding a connection for the current transaction
    PINNED = "pinned"      # holding a connection until the session ends
    CLOSED = "closed"


class ClientSession(PinMove, protocol.Protocol):
    """What every client session does the same way, whatever the engine.

    An engine's frontend subclasses this and supplies the wire: how it greets, authenticates and
    relays, and answers four questions the shared parts ask:

    - `in_session`: past authentication and login;
    - `busy`: a request is on the wire (the idle timeout must not end it);
    - `left_cleanly(conn)`: the client left between requests, so its connection's state is known;
    - `needs_reset(conn)`: the session left state behind there (pinned, open transaction).

    and three actions: `auth_timed_out()`, `lost_database(conn, why)` (tell the client its
    database connection broke) and `on_closed()` (engine bookkeeping at the end).

    Getting a database connection for a request is written once, here (`borrow`, below); the
    engine supplies `pool_key()`, `prepare_lease(conn)`, `attach_connection(conn, waited)`,
    `refuse_request(error)` and `error_bytes(kind, failure)`; `pool_for(key)` picks the pool.
    """

    log = Logger()
    SESSION_PHASE = Phase.SESSION  # the phase name in which `in_session` is true
    tls = False  # True once the client's transport was switched to TLS (read by metrics)
    # One object per client: slots instead of an instance dict (with ~40 attributes each session
    # had its own 1.6 KB dict, a third of an idle session).  An attribute missing here still works
    # (it goes to a __dict__: Protocol has no slots), but tests/unit/test_session_memory.py fails
    # when an idle session keeps one outside the slots.  Engines declare theirs on their class.
    __slots__ = ("ctx", "clock", "state", "id", "user", "database", "key", "lease", "pin_reason",
                 "pin_statement", "queries", "request_started", "_setup_failure_counted",
                 "_latency_series", "_db_latency_series", "last_active", "connected_at", "_phase",
                 "refusal", "_timer", "_first_timer", "_borrow_d", "_attaching", "_paused",
                 "_coupled", "_draining", "_drain_why", "_move", "broken", "transport", "connected",
                 "endpoint", "route")

    def __init__(self, ctx, first_phase):
        self.transport, self.connected = None, 0  # Protocol's class defaults, now slots
        self.endpoint = None  # endpoints.EndpointRuntime it came in by; None: the proxy's own Listen
        self.route = None  # a READ_ONLY endpoint's ReaderRouter (failover/readers.py); None: ctx.pool
        self.ctx = ctx
        self.clock = ctx.clock
        self.state = SessionState.AUTHENTICATING
        self.id = ctx.next_id()
        self.user = self.database = None
        self.key = None
        self.lease = None
        self.pin_reason = None
        self.pin_statement = None  # the start of the statement that pinned (bytes), when known
        self.queries = 0  # QueryRequests (read by metrics)
        self.request_started = None  # clock time the request being answered arrived (latencies)
        self._setup_failure_counted = False
        self._latency_series = None  # this proxy's QueryResponseLatency series, once looked up
        self._db_latency_series = None  # (target, its QueryDatabaseResponseLatency series)
        self.last_active = self.connected_at = self.clock.seconds()
        self._phase = Phase(first_phase)
        self.refusal = None  # limits.Refusal decided at accept: the engine tells the client
        self._timer = None
        self._first_timer = None  # ClientFirstPacketTimeout, until `first_packet_seen`
        self._borrow_d = None  # the pool's Deferred while the session waits in its queue
        self._attaching = None  # a lease whose connection `prepare_lease` is bringing in line
        self._paused = False  # client reading paused while its data waits for a connection
        self._coupled = False  # transports coupled for backpressure (see relay.couple)
        self._draining = False  # drain() was asked: end at the next transaction boundary
        self._drain_why = None  # None: the proxy stops; "writer changed": pinned to a former writer
        # A pinned session moving off a former writer: MOVING while its state is read there,
        # then the engine's replay plan until a connection to the new writer is prepared with it.
        self._move = None
        self.broken = False  # an unexpected error ended the session: its connection is not reused

    def __repr__(self):
        return f"<session {self.ctx.name}#{self.id} {self.user}@{self.database} {self.state.value}>"

    def set_state(self, state):
        self.state = state
        if self._draining and state is SessionState.IDLE:
            # a transaction just ended while the proxy drains: end the session at once, after
            # the engine has finished handing the connection back
            self.clock.callLater(0, self.drain)

    @property
    def in_session(self):
        return self._phase == self.SESSION_PHASE

    # -- opening and idling -------------------------------------------------------------------------
    def connectionMade(self):
        ctx = self.ctx
        ctx.sessions.add(self)
        client_socket_ready(self.transport)  # TCP_NODELAY, keepalive (inherited from the port on Linux)
        if ctx.metrics is not None:
            ctx.metrics.client_connections_received.inc(ctx.name)
        self.refusal = ctx.admission.admit(len(ctx.sessions))
        if self.refusal is not None:
            self.log.info("{s}: refused at accept ({limit})", s=self, limit=self.refusal.value)
        self._timer = self.clock.callLater(ctx.config.client_auth_timeout, self._auth_timer_fired)
        self.arm_first_packet_timer()

    def arm_first_packet_timer(self):
        """(Re)start ClientFirstPacketTimeout: from accept, or for MySQL from the greeting (the
        client cannot speak before it)."""
        self.first_packet_seen()
        self._first_timer = self.clock.callLater(self.ctx.config.client_first_packet_timeout,
                                                 self._first_packet_missing)

    def first_packet_seen(self):
        """The engine read the client's first whole packet: ClientFirstPacketTimeout is over."""
        if self._first_timer is not None:
            if self._first_timer.active():
                self._first_timer.cancel()
            self._first_timer = None

    def _first_packet_missing(self):
        self._first_timer = None
        if self.state is SessionState.CLOSED:
            return
        self.log.info("{s}: no first packet within ClientFirstPacketTimeout; closing", s=self)
        self._phase = Phase.CLOSING
        if hasattr(self.transport, "abortConnection"):
            self.transport.abortConnection()  # nothing to flush to a silent client
        else:
            self.transport.loseConnection()

    def start_idle_timer(self):
        """Logged in: from now on IdleClientTimeout applies instead of the auth timeout, through
        the proxy's one IdleSweep (idle_sweep.py), not a timer of this session's own."""
        self.last_active = self.clock.seconds()
        self.stop_auth_timer()
        self.ctx.idle_sweep.track(self)

    def stop_auth_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _auth_timer_fired(self):
        self._timer = None
        if self.state is SessionState.CLOSED or self.in_session:
            return
        self.log.info("{s}: authentication timed out", s=self)
        self.auth_timed_out()

    def idle_timed_out(self, timeout):
        """The IdleSweep found this session idle for *timeout* seconds (and not busy)."""
        if self.state is SessionState.CLOSED:
            return
        self.log.info("{s}: closing after IdleClientTimeout ({t:.0f} s)", s=self, t=timeout)
        self._close_client()

    # -- pinning and the lent connection -------------------------------------------------------------
    def _pin(self, reason):
        if self.pin_reason is not None:
            return
        self.pin_reason = reason
        self.ctx.count_pin(reason.value)
        self.log.info("{s}: pinned, reason={reason}", s=self, reason=reason.value)
        if self.ctx.metrics is not None:
            self.ctx.metrics.pins.inc(self.ctx.name, reason.value)
        if self.lease is not None:
            self.lease.conn.session_dirty = True
            self.set_state(SessionState.PINNED)

    def write_queued(self, conn):
        """A write had to be queued: from now on a full side pauses the other (backpressure)."""
        if not self._coupled:
            self._coupled = True
            couple(self.transport, conn.transport)

    def _detach(self, conn, client_gone=False):
        conn.detach()
        if self._coupled:
            self._coupled = False
            uncouple(None if client_gone else self.transport, conn.transport)

    def backend_lost(self, conn, why):
        """The database connection broke under this session: the session cannot go on."""
        if self.lease is not None and self.lease.conn is conn:
            lease, self.lease = self.lease, None
            lease.release(clean=False, reason=why)
        self.log.info("{s}: database connection lost: {why}", s=self, why=why)
        self.lost_database(conn, why)

    # -- getting a database connection: borrow, prepare, attach, or tell the client why not ----------
    #
    # One flow for both engines.  borrow() -> the pool's idle connection at once (try_borrow, no
    # Deferred), else the pool's queue (a cancellable Deferred: connectionLost cancels it) ->
    # prepare_lease (the engine brings the connection to the session's settings; None when
    # nothing is to do, the common case) -> attach_connection (the engine starts relaying).
    # A failure at any step is answered with the engine's error for its BorrowFailure, and the
    # session goes on (refuse_request); a connection whose preparation failed is reset when the
    # database answered with an error, else closed.  No closure and no Deferred of ours per
    # borrow: the fast path is three method calls.

    def pool_key(self):
        """Engine hook: the pool key of the next borrow (user, database or profile, TLS, ...)."""
        return self.key

    def pool_for(self, key):
        """Which pool serves this session's borrows of *key*: the proxy's (the writer's) pool,
        or for a session of a READ_ONLY endpoint its ReaderRouter (endpoints.py: a replica's
        pool, chosen per transaction)."""
        route = self.route
        return self.ctx.pool if route is None else route

    @property
    def borrowing(self):
        """A connection is on its way: queued at the pool, or being prepared."""
        return self._borrow_d is not None or self._attaching is not None

    def borrow(self):
        """Get the session a usable connection for the request at the head of its input: the
        one it holds (pinned, in a transaction), else an idle one now, else wait in the pool's
        queue (state BORROWING; bounded by ConnectionBorrowTimeout).  Ends in
        `attach_connection(conn, waited)` or, on failure, `refuse_request(error)`; either may
        happen before this returns."""
        lease = self.lease
        if lease is not None:
            self._use_lease(lease, False)
            return
        key = self.pool_key()
        pool = self.pool_for(key)
        lease = pool.try_borrow(key)
        if lease is not None:  # the common case: an idle connection, no Deferred
            self._use_lease(lease, False)
            return
        self.set_state(SessionState.BORROWING)
        self._borrow_d = d = pool.borrow(key)
        d.addCallbacks(self._got_lease, self._borrow_failed).addErrback(self.unexpected, "borrowing")

    def borrow_if_idle(self):
        """The fast path alone: -> True when an idle connection was taken (attached now, or
        being prepared), False when none is idle (nothing started; call `borrow` later)."""
        key = self.pool_key()
        lease = self.pool_for(key).try_borrow(key)
        if lease is None:
            return False
        self._use_lease(lease, False)
        return True

    def _got_lease(self, lease):
        self._borrow_d = None
        self._use_lease(lease, True)

    def _use_lease(self, lease, waited):
        if self.state is SessionState.CLOSED:  # the client left while the pool served us
            if lease is not self.lease:
                lease.release(clean=True)
            return
        try:
            d = self.prepare_lease(lease.conn)
        except Exception:
            if lease is not self.lease:  # held by nobody: never leak a pool slot
                lease.release(clean=False, reason="session ended by an unexpected error")
            raise
        if d is None:
            self._attach_lease(lease, waited)
            return
        self._attaching = lease
        d.addCallbacks(self._lease_prepared, self._prepare_failed,
                       callbackArgs=(lease,), errbackArgs=(lease,)).addErrback(self.unexpected, "attaching")

    def _lease_prepared(self, _, lease):
        if self._attaching is lease:
            self._attaching = None
        if lease.released:  # a held lease, given back when the client left
            return
        if self.state is SessionState.CLOSED:
            # The client left while its connection was being prepared: the preparation ended
            # cleanly, so the connection is fit for another session (after a reset when it was
            # a moved pinned session's replay: its settings and statements are on it).
            if lease is not self.lease:
                conn = lease.conn
                lease.release(clean=True, needs_reset=self.transaction_open(conn) or conn.session_dirty)
            return
        self._attach_lease(lease, True)

    def _attach_lease(self, lease, waited):
        """The connection is ready: it becomes the session's, and the engine relays on it."""
        self.lease = lease
        conn = lease.conn
        if self.pin_reason is not None:
            conn.session_dirty = True
            self.set_state(SessionState.PINNED)
        else:
            self.set_state(SessionState.BORROWED)
        self.attach_connection(conn, waited)

    def _prepare_failed(self, failure, lease):
        if self._attaching is lease:
            self._attaching = None
        conn = lease.conn
        if self.lease is lease:
            self.lease = None
            if conn.state != ConnState.CLOSED:
                self._detach(conn)
        if failure.check(ReplayFailed):  # a moved pinned session: it cannot go on
            lease.release(clean=False, reason="replaying a moved pinned session failed")
            if self.state is not SessionState.CLOSED:
                self.log.warn("{s}: replaying the pinned session on the new writer failed ({e}); ending it",
                              s=self, e=failure.getErrorMessage())
                self.replay_failed(failure.getErrorMessage())
            return
        if failure.check(DatabaseRefused) and conn.state == ConnState.BORROWED:
            lease.release(clean=True, needs_reset=True)  # it answered: reset, then reuse
        else:
            lease.release(clean=False, reason=f"sync failed: {failure.getErrorMessage()}")
        if self.state is SessionState.CLOSED:
            return
        self.log.info("{s}: preparing a connection failed: {e}", s=self, e=failure.getErrorMessage())
        self._request_failed(failure)

    def _borrow_failed(self, failure):
        self._borrow_d = None
        if self.state is SessionState.CLOSED or failure.check(defer.CancelledError):
            return
        self.log.info("{s}: borrow failed: {e}", s=self, e=failure.getErrorMessage())
        self._request_failed(failure)

    def _request_failed(self, failure):
        error = self.client_error(failure)
        self.set_state(SessionState.IDLE)
        self.request_started = None  # answered by the proxy: no latency to record
        self.refuse_request(error)

    def client_error(self, failure):
        """The engine's error (bytes for the client) for a failed borrow, sync or login check;
        an unforeseen failure is logged with its traceback."""
        kind = borrow_failure(failure)
        if kind is BorrowFailure.UNKNOWN:
            self.log.failure("{s}: unexpected borrow failure", failure, s=self)
        return self.error_bytes(kind, failure)

    def prepare_lease(self, conn):
        """Engine hook: bring *conn* to this session's settings before it relays there.
        -> None when nothing is to do (no Deferred on the hot path), else a Deferred that fires
        when done or fails (with the engine's DatabaseError when the database refused)."""
        return None

    def attach_connection(self, conn, waited):
        """Engine hook: relay on *conn* now (`self.lease` holds it; the state is BORROWED or
        PINNED); *waited*: the connection came later than the input that asked for it (from the
        pool's queue or after a sync), so the engine goes on with what the client sent since."""
        raise NotImplementedError

    def refuse_request(self, error):
        """Engine hook: answer the request(s) waiting for a connection with *error* (bytes from
        `error_bytes`); the session goes on (its state is IDLE)."""
        raise NotImplementedError

    def error_bytes(self, kind, failure):
        """Engine hook: what the client is sent for a BorrowFailure *kind* (docs/errors.md)."""
        raise NotImplementedError

    # -- draining (the proxy or this proxy is stopping) ---------------------------------------------------
    def drain(self, why=None):
        """End this session with the engine's server-shutdown error as soon as it stands between
        transactions: now when it does (or is still logging in), else at a later call (the
        registry calls again until it has ended or the drain timeout closes it).  *why*
        "writer changed": its pinned connection is on a former writer, and the error says so
        (`writer_changed_now`).

        -> True once the session has ended (or was already ending).  A request on the wire or
        an open transaction on its database connection keeps it going; a pinned session
        between transactions is ended (its connection is reset or closed by the pool)."""
        if self.state is SessionState.CLOSED or self._phase == Phase.CLOSING:
            return True
        if self._move is MOVING:  # it ends in a move or in the end of the session
            return why is not None
        self._draining = True
        if why is not None:
            self._drain_why = why
        if self.in_session:
            if self.busy:
                return False
            lease = self.lease
            if lease is not None and self.transaction_open(lease.conn):
                return False
        if self._drain_why is not None:
            if self.lease is not None and self.pin_reason is not None and self._begin_move():
                return True
            self.log.info("{s}: ending the session: {why}", s=self, why=self._drain_why)
            self.writer_changed_now()
            return True
        self.log.info("{s}: ending the session: the proxy is stopping", s=self)
        self.shutdown_now()
        return True

    def writer_changed_now(self):
        """Engine action: tell the client its pinned session cannot go on because the writer
        changed (docs/errors.md), and close."""
        self.shutdown_now()

    def transaction_open(self, conn):
        """Engine question: is a transaction open on *conn* (the session's database connection)?"""
        return True

    def shutdown_now(self):
        """Engine action: tell the client the server is shutting down, and close."""
        self._close_client()

    # -- metrics ---------------------------------------------------------------------------------------
    def request_done(self, now):
        """The response to the request that arrived at `request_started` ended at *now* (a clock
        reading the engine already made): QueryResponseLatency, and QueryDatabaseResponseLatency
        from when the request could go to the database (its arrival, or the lease's start when
        it had to wait for a connection).  Once per request, never per message."""
        started, self.request_started = self.request_started, None
        metrics = self.ctx.metrics
        if started is None or metrics is None:
            return
        series = self._latency_series
        if series is None:  # looked up once per session
            series = self._latency_series = metrics.query_response_latency.series(self.ctx.name)
        lease = self.lease
        if lease is None:
            series.observe(now - started)
            return
        target = lease.conn.target
        cached = self._db_latency_series
        if cached is None or cached[0] is not target:
            cached = self._db_latency_series = (target, metrics.query_database_response_latency
                                                .series(self.ctx.name, target.rds_resource_id))
        if lease.borrowed_at > started:  # it waited for the connection
            series.observe(now - started)
            cached[1].observe(now - lease.borrowed_at)
        else:  # (same buckets: metrics.QUERY_BUCKETS)
            series.observe_pair(cached[1], now - started)

    def setup_failed(self, why):
        """The connection will not become a session because of authentication or TLS (wrong
        password, unknown user, TLS required, TLS handshake failed): ClientConnectionsSetupFailedAuth,
        counted once per connection."""
        if self._setup_failure_counted:
            return
        self._setup_failure_counted = True
        self.log.info("{s}: connection setup failed: {why}", s=self, why=why)
        if self.ctx.metrics is not None:
            self.ctx.metrics.client_connections_setup_failed_auth.inc(self.ctx.name)

    # -- ending -----------------------------------------------------------------------------------------
    def _close_client(self):
        self._phase = Phase.CLOSING
        self.transport.loseConnection()

    def connectionLost(self, reason):
        ctx = self.ctx
        self.set_state(SessionState.CLOSED)
        self._phase = Phase.CLOSING
        ctx.sessions.discard(self)
        ctx.idle_sweep.forget(self)
        ctx.queries_closed += self.queries
        if self.tls:
            ctx.queries_closed_tls += self.queries
            if not self.in_session and _is_tls_failure(reason):
                self.setup_failed(f"TLS handshake failed: {reason.getErrorMessage()}")
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.first_packet_seen()
        if self._borrow_d is not None:
            d, self._borrow_d = self._borrow_d, None
            d.cancel()
        lease, self.lease = self.lease, None
        if lease is not None and not lease.released:
            conn = lease.conn
            if conn.state != ConnState.CLOSED:
                self._detach(conn, client_gone=True)
            if self.broken:
                lease.release(clean=False, reason="session ended by an unexpected error")
            elif self.left_cleanly(conn):
                lease.release(clean=True, needs_reset=self.needs_reset(conn))
            else:
                self.log.info("{s}: client left mid-request; closing its database connection", s=self)
                lease.release(clean=False, reason="client disconnected mid-request")
        self.on_closed()
        if ctx.metrics is not None:
            ctx.metrics.client_connections_closed.inc(ctx.name)

    def on_closed(self):
        """Engine bookkeeping when the client is gone (after the lease was given back)."""

    # -- the unexpected -----------------------------------------------------------------------------
    def unexpected(self, failure=None, where="a callback"):
        """Something the code did not foresee was raised in a protocol or Deferred callback: end
        this one session (never another, never the process) with the reason logged.  Its
        database connection, whose state is then unknown, is closed rather than reused.  Usable
        as an errback (returns None: the failure is handled); *failure* None means the exception
        being handled."""
        self.log.failure("{s}: unexpected error in {where}; closing this session", failure,
                         s=self, where=where)
        self.broken = True
        if self.state is not SessionState.CLOSED:
            try:
                self.internal_error()
            except Exception:
                self.log.failure("{s}: could not report the error; aborting", s=self)
                self.transport.abortConnection()

    def internal_error(self):
        """Tell the client the proxy failed (the engine's "unknown error") and close."""
        self._close_client()


def _is_tls_failure(reason):
    """The connection ended with a TLS error (a failed handshake, a bad record)."""
    return reason is not None and reason.check(TLSError) is not None
