"""What opening a database connection means for every engine.

An engine's connector builds an unconnected protocol (its backend connection, with a `ready`
Deferred that fires once logged in and initialised) and says how to read a failure; this base
class does the rest the same way for all: connect to the current writer, count the attempt in
the metrics, turn transport errors into BackendGone, and record the outcome in TargetHealth.

`probe_role(target, creds)` is the failover monitor's health check: a short-lived connection
opened the same way (login, InitQuery) to any target, one engine query saying whether it is the
writer, then closed.

Every wait on a database has an end (DESIGN rule 10), on the injected clock:
- `open` runs TCP connect + login + InitQuery under one deadline (`connect_timeout`,
  DatabaseConnectTimeout); on expiry the connect is cancelled or the connection closed, and the
  Deferred fails with BackendGone("... timed out ...");
- every internal operation of a connection (parameter sync, reset, health-check query, the
  login's own queries) goes through `BackendConnection.bounded`, which closes the connection with a
  logged reason when the operation has not finished within `operation_timeout`
  (DatabaseOperationTimeout).  Closing fails the operation with BackendGone and tells the pool,
  which frees the slot;
- `send_oob` (PostgreSQL CancelRequest) gives up after `connect_timeout` too.
TCP keepalive is switched on for every database socket (see `enable_keepalive`).

TLS to the database (`backend_tls`): each connection gets a `tls_plan` from the proxy's
`DatabaseTLS` (by the pool key's third element, "this key's connections use TLS").  An engine
whose TLS upgrade comes before its protocol starts (PostgreSQL's SSLRequest) names a
`tls_negotiation` protocol that the endpoint connects first and that hands the transport over;
an engine that upgrades inside its handshake (MySQL) reads `conn.tls_plan` itself.
"""

import socket
import sys

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txrdsproxy.backend_tls import NO_TLS, tls_failure_text
from txrdsproxy.failover.topology import NoWriter
from txrdsproxy.pool.states import ConnState


class BackendGone(Exception):
    """The database connection could not be made, or closed or broke."""


class TargetUnreachable(BackendGone):
    """No TCP connection to the target could be made (refused, no route, DNS, connect timed out):
    TargetHealth reason UNREACHABLE rather than CONNECTION_FAILED."""


class DatabaseRefused(Exception):
    """Base of each engine's DatabaseError: the database answered a request of the proxy (a
    login, a parameter sync) with an error of its own, so the connection, if it is still open,
    stands at a known point (sessions tell the client the database's error, not a proxy one)."""


# TCP keepalive: a peer that vanished without a FIN/RST (host down, cable cut, NAT expiry) is
# noticed after about KEEPIDLE + KEEPINTVL * KEEPCNT seconds instead of the kernel's 2 hours.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6


def enable_keepalive(transport, idle=KEEPALIVE_IDLE, interval=KEEPALIVE_INTERVAL, count=KEEPALIVE_COUNT):
    """Switch TCP keepalive on for *transport* (client or database socket), with short timers
    where the platform lets us set them.  Transports that are not TCP sockets are left alone.
    Returns True when keepalive was switched on."""
    if not hasattr(transport, "setTcpKeepAlive"):
        return False
    transport.setTcpKeepAlive(1)
    handle = transport.getHandle() if hasattr(transport, "getHandle") else None
    if handle is not None and hasattr(handle, "setsockopt"):
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
            option = getattr(socket, name, None)
            if option is not None:
                try:
                    handle.setsockopt(socket.IPPROTO_TCP, option, value)
                except OSError:
                    pass
    return True


# Linux copies a listening socket's options to every socket it accepts (TCP_NODELAY, SO_KEEPALIVE
# and the keepalive timers included; tests/unit/test_client_socket_options.py checks it on the
# running kernel).  Elsewhere each accepted socket is set up on its own.
INHERITS_SOCKET_OPTIONS = sys.platform.startswith("linux")


def tune_client_port(port):
    """Set on *port*'s listening socket what every client socket of the proxy gets (TCP_NODELAY,
    keepalive with short timers), so that accepted sockets inherit it instead of paying five
    setsockopt calls each (a login's work, for clients that connect per transaction).  Marks
    the port `client_options_inherited` when done (sessions then skip their own setup; see
    `client_socket_ready`).  A port without a TCP socket, or a platform that does not copy
    options on accept, is left alone.  -> True when the port was tuned."""
    handle = getattr(port, "socket", None)
    if not INHERITS_SOCKET_OPTIONS or handle is None or handle.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
            handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except (OSError, AttributeError):
        return False
    port.client_options_inherited = True
    return True


def client_socket_ready(transport):
    """A client connection was accepted: TCP_NODELAY and keepalive on its socket, unless it
    inherited them from a port `tune_client_port` set up (the usual case on Linux)."""
    if getattr(getattr(transport, "server", None), "client_options_inherited", False):
        return
    if hasattr(transport, "setTcpNoDelay"):
        transport.setTcpNoDelay(True)
    enable_keepalive(transport)


class SingleUseFactory(protocol.ClientFactory):
    """Hands the endpoint the protocol instance we already built."""

    noisy = False  # no "Starting factory" log line per database connection

    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class Connector:
    """Base of PgConnector and MySQLConnector (see the module docstring)."""

    log = Logger()
    database_error = ()  # the engine's DatabaseError class: passed through, not wrapped
    tls_negotiation = None  # protocol class(conn, plan, clock) run before conn (PostgreSQL)

    def __init__(self, reactor, topology, credentials_for, init_query, max_message_size,
                 connect_timeout=30.0, metrics=None, proxy_name="", health=None,
                 operation_timeout=30.0, database_tls=None):
        self.reactor = reactor
        self.database_tls = database_tls  # backend_tls.DatabaseTLS, or None: never TLS
        self.operation_timeout = operation_timeout
        self.topology = topology
        self.credentials_for = credentials_for
        self.init_query = init_query or ""
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self.metrics = metrics
        self.proxy_name = proxy_name
        self.health = health  # failover.monitor.TargetHealth: outcome of each attempt

    PROBE_TIMEOUT = 10.0  # seconds a health check may take before its connection is closed

    def endpoint(self, target, timeout=None):
        return HostnameEndpoint(self.reactor, target.endpoint, target.port,
                                timeout=timeout or self.connect_timeout)

    def failure_reason(self, failure):
        """TargetHealth reason for a failed attempt, or None when it says nothing about the
        target (the client asked for a database that doesn't exist).  Engines refine this
        for the database's own errors and fall back to this one."""
        if failure.check(TargetUnreachable):
            return "UNREACHABLE"
        return "CONNECTION_FAILED"

    def record_failure(self, target, failure):
        reason = self.failure_reason(failure)
        if self.health is not None and reason is not None:
            self.health.record_failure(target, reason, failure.getErrorMessage())

    def open(self, target, conn, metered=True, timeout=None):
        """Connect *conn* (an unconnected backend protocol) to *target*.

        Deferred[conn] once its `ready` fired; fails with the engine's DatabaseError or with
        BackendGone.  *metered*=False (health checks): not counted in the metrics and not
        recorded in TargetHealth (the monitor records its own verdict).

        The whole open (TCP connect, login, InitQuery) must finish within *timeout* (default
        `connect_timeout`): otherwise the connect is cancelled, or the connection closed (its
        reason logged), and the Deferred fails with BackendGone saying what timed out.
        """
        name = target.rds_resource_id
        metrics = self.metrics if metered else None
        if metrics is not None:
            metrics.db_connection_requests.inc(self.proxy_name, name)
        limit = timeout or self.connect_timeout
        conn.clock = self.reactor
        conn.operation_timeout = self.operation_timeout
        plan = conn.tls_plan
        if plan.use_tls and self.tls_negotiation is not None:
            proto = self.tls_negotiation(conn, plan, self.reactor)
        else:
            proto = conn
        if plan.use_tls and metrics is not None:
            metrics.db_connection_requests_tls.inc(self.proxy_name, name)
        connecting = self.endpoint(target, limit).connect(SingleUseFactory(proto))
        where = f"{target.endpoint}:{target.port}"

        def expired():
            if proto is not conn and proto.pending:  # TLS negotiation under way
                proto.fail(f"TLS negotiation with {where} timed out after {limit:g} s")
            elif conn.transport is None:  # TCP connect still under way
                connecting.cancel()
            else:
                reason = f"database login to {where} timed out after {limit:g} s"
                self.log.warn("closing database connection {conn}: {reason}", conn=conn, reason=reason)
                conn.close(reason, abort=True)

        deadline = self.reactor.callLater(limit, expired)
        tcp = []  # [True] once the TCP connection is up

        def connected(proto):
            tcp.append(True)
            enable_keepalive(proto.transport)
            if conn.ready is not None:
                return conn.ready
            if conn.state == ConnState.CLOSED:
                raise BackendGone(conn._closing_reason or "closed during login")
            return conn

        def stop_deadline(result):
            if deadline.active():
                deadline.cancel()
            return result

        d = connecting.addCallback(connected).addBoth(stop_deadline)

        def failed(f):
            gone = BackendGone if tcp else TargetUnreachable
            if f.check(defer.CancelledError):
                f = Failure(gone(f"cannot connect to {where}: timed out after {limit:g} s"))
            if metrics is not None:
                metrics.db_connections_setup_failed.inc(self.proxy_name, name)
            if not f.check(BackendGone, *self.database_error):
                f = Failure(gone(
                    f"cannot connect to {target.endpoint}:{target.port}: {f.getErrorMessage()}"))
            if metered:
                self.record_failure(target, f)
            return f

        def succeeded(c):
            if metrics is not None:
                metrics.db_connections_setup_succeeded.inc(self.proxy_name, name)
            if metered and self.health is not None:
                self.health.record_success(target)
            return c

        return d.addCallbacks(succeeded, failed)

    def no_credentials(self, user):
        """Fails a connect for a user the store has no secret for (engine supplies the error)."""
        raise NotImplementedError

    def connect(self, key):
        """Deferred[connection] to the current writer for *key*; fails with NoWriter while a
        failover has no writer, BackendGone, or the engine's DatabaseError."""
        try:
            target = self.topology.writer()
        except NoWriter:
            if not self.topology.targets:  # a proxy created through the API, before its targets
                return defer.fail(BackendGone("the proxy's target group has no registered targets"))
            return defer.fail()
        return self.connect_to(target, key)

    def connect_to(self, target, key):
        """Deferred[connection] to *target* (whatever its role: a replica's pool) for *key*;
        fails with BackendGone or the engine's DatabaseError."""
        creds = self.credentials_for(key[0])
        if creds is None:
            return defer.fail(self.no_credentials(key[0]))
        conn = self.make_connection(key, target, creds)
        conn.tls_plan = self.tls_plan(key, target)
        return self.open(target, conn)

    def tls_plan(self, key, target, probe=False):
        """-> backend_tls.TLSPlan for a connection of *key* (its third element: TLS wanted)."""
        if self.database_tls is None:
            return NO_TLS
        return self.database_tls.plan(len(key) > 2 and key[2] is True, target, probe=probe)

    # -- health checks (failover) ---------------------------------------------------------------
    def probe_key(self, creds, database=None):
        """The pool-style key a health-check connection logs in with (engine supplies it);
        *database*: HealthCheck's Database, None for the engine's default."""
        raise NotImplementedError

    def query_role(self, conn):
        """Deferred[ProbeResult | "READ_WRITE" | "READ_ONLY"]: ask the logged-in *conn* (engine
        supplies it; failover.topology.ProbeResult carries replay lag where measured)."""
        raise NotImplementedError

    def probe_role(self, target, creds, database=None):
        """Health check of *target*: Deferred[what `query_role` answers].

        Logs in as *creds* (the target's health-check credentials, see runtime.build_monitor)
        to *database* (None: the engine's default) on a connection of its own, runs the engine's
        role query and closes the connection.  Fails with TargetUnreachable (no TCP),
        BackendGone (closed, or no answer within PROBE_TIMEOUT) or the engine's DatabaseError.
        """
        if creds is None:
            return defer.fail(BackendGone("no credentials for health checks"))
        conn = self.make_connection(self.probe_key(creds, database), target, creds)
        conn.tls_plan = self.tls_plan((), target, probe=True)
        d = self.open(target, conn, metered=False, timeout=self.PROBE_TIMEOUT)
        # The role query is an internal operation: bounded by PROBE_TIMEOUT as well.
        d.addCallback(lambda c: c.bounded(self.query_role(c), "health check", self.PROBE_TIMEOUT))

        def done(result):
            # Not connected (refused, unreachable): nothing to close, and closing would fail
            # its `ready`, which nothing waits on yet (an unhandled error in the log).
            if not (isinstance(result, Failure) and conn.transport is None):
                conn.close("health check done")
            return result

        return d.addBoth(done)

    def send_oob(self, target, packet, what="cancel request"):
        """Send *packet* on a new socket to *target* and wait for the server to close it (how a
        PostgreSQL CancelRequest is delivered).  Deferred[None] firing once the server closed
        the socket, or after `connect_timeout` (the socket is aborted and a warning logged);
        it never fails."""
        done = defer.Deferred()
        limit = self.connect_timeout
        log = self.log

        class _OutOfBand(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(packet)

            def connectionLost(self, reason):
                if not done.called:
                    done.callback(None)

        proto = _OutOfBand()
        connecting = self.endpoint(target, limit).connect(SingleUseFactory(proto))

        def expired():
            log.warn("{what} to {t}:{p} got no answer within {s:g} s; gave up", what=what,
                     t=target.endpoint, p=target.port, s=limit)
            if proto.transport is None:
                connecting.cancel()
            else:
                proto.transport.abortConnection()
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(limit, expired)

        def failed(f):
            if not f.check(defer.CancelledError):
                log.warn("{what} to {t} failed: {e}", what=what, t=target.endpoint, e=f.getErrorMessage())
            if not done.called:
                done.callback(None)

        def stop(result):
            if timer.active():
                timer.cancel()
            return result

        connecting.addErrback(failed)
        done.addBoth(stop)
        return done


class BackendConnection(protocol.Protocol):
    """The closing rules every engine's database connection shares.

    Subclasses define `goodbye()` (the bytes that end a session politely: Terminate,
    COM_QUIT, or b"") and `fail_pending(error)` (their running internal operation), and
    may override `lost_reason(reason)`.  Closing is reported once to the pool (`pool_listener`)
    and, if lent, to the session (`backend_lost`), with the reason.
    """

    state = ConnState.CONNECTING
    pool_listener = None
    ready = None  # Deferred until logged in and initialised
    clock = None  # set by Connector.open: the clock that bounds internal operations
    tls_plan = NO_TLS  # backend_tls.TLSPlan, set by the Connector before `open`
    tls = False  # True once the connection to the database is TLS
    operation_timeout = None  # seconds an internal operation may take (None: unbounded)
    _sink = None
    _closing_reason = None

    def bounded(self, d, what, timeout=None):
        """Bound the internal operation *d* (a Deferred this connection will fire): if it has not
        fired within *timeout* (default `operation_timeout`), the connection is closed with the
        reason "<what> timed out after N s" (logged), which fails *d* with BackendGone and frees
        the connection's pool slot.  Returns *d*.  Without a clock (a connection not opened by a
        Connector, as in some unit tests) nothing is armed."""
        limit = timeout or self.operation_timeout
        if self.clock is None or not limit or d.called:
            return d

        def expired():
            if self.state == ConnState.CLOSED:
                return
            reason = f"{what} timed out after {limit:g} s"
            self.log.warn("closing database connection {conn}: {reason}", conn=self, reason=reason)
            self.close(reason, abort=True)

        timer = self.clock.callLater(limit, expired)

        def stop(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(stop)

    def goodbye(self):
        return b""

    def fail_pending(self, error):
        """Fail the internal operation in progress, if any."""

    def lost_reason(self, reason):
        tls_failure = tls_failure_text(reason)
        if tls_failure is not None:
            return tls_failure
        return f"database closed the connection ({reason.getErrorMessage()})"

    def close(self, reason, abort=False):
        """Close with *reason* (logged by the caller, told to the pool).  A login or internal
        operation still waiting fails now with BackendGone(reason).  *abort*: drop the socket
        at once (a stalled database would never read our goodbye)."""
        if self.state == ConnState.CLOSED:
            return
        self._closing_reason = reason
        self.state = ConnState.CLOSED
        if self.transport is not None:
            if abort and hasattr(self.transport, "abortConnection"):
                self.transport.abortConnection()
            else:
                bye = self.goodbye()
                if bye and getattr(self.transport, "connected", True):
                    self.transport.write(bye)
                self.transport.loseConnection()
        if self.ready is not None:
            d, self.ready = self.ready, None
            d.errback(BackendGone(reason))
        self.fail_pending(BackendGone(reason))
        self._notify_lost(reason)

    def connectionLost(self, reason):
        why = self._closing_reason or self.lost_reason(reason)
        self.state = ConnState.CLOSED
        if self.ready is not None:
            d, self.ready = self.ready, None
            d.errback(BackendGone(why))
        self.fail_pending(BackendGone(why))
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.backend_lost(self, why)
        self._notify_lost(why)

    def _notify_lost(self, reason):
        listener, self.pool_listener = self.pool_listener, None
        if listener is not None:
            listener(self, reason)
