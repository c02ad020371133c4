"""What opening a database connection means for every engine.

An engine's connector builds an unconnected protocol (its backend connection, with a `ready`
Deferred that fires once logged in and initialised) and says how to read a failure; this base
class does the rest the same way for all: connect to the current writer, count the attempt in
the metrics, turn transport errors into BackendGone, and record the outcome in TargetHealth.

`probe_role(target, creds)` is the failover monitor's health check: a short-lived connection
opened the same way (login, InitQuery) to any target, one engine query saying whether it is the
writer, then closed.
"""

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txrdsproxy.failover.topology import NoWriter


class BackendGone(Exception):
    """The database connection could not be made, or closed or broke."""


class SingleUseFactory(protocol.ClientFactory):
    """Hands the endpoint the protocol instance we already built."""

    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class Connector:
    """Base of PgConnector and MySQLConnector (see the module docstring)."""

    log = Logger()
    database_error = ()  # the engine's DatabaseError class: passed through, not wrapped

    def __init__(self, reactor, topology, credentials_for, init_query, max_message_size,
                 connect_timeout=30.0, metrics=None, proxy_name="", health=None):
        self.reactor = reactor
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
        target (the client asked for a database that doesn't exist).  Engines refine this."""
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
        """
        name = target.rds_resource_id
        metrics = self.metrics if metered else None
        if metrics is not None:
            metrics.db_connection_requests.inc(self.proxy_name, name)
        d = self.endpoint(target, timeout).connect(SingleUseFactory(conn))

        def failed(f):
            if metrics is not None:
                metrics.db_connections_setup_failed.inc(self.proxy_name, name)
            if not f.check(BackendGone, *self.database_error):
                f = Failure(BackendGone(
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

        return d.addCallback(lambda _: conn.ready).addCallbacks(succeeded, failed)

    def no_credentials(self, user):
        """Fails a connect for a user the store has no secret for (engine supplies the error)."""
        raise NotImplementedError

    def connect(self, key):
        """Deferred[connection] to the current writer for *key*; fails with NoWriter while a
        failover has no writer, BackendGone, or the engine's DatabaseError."""
        try:
            target = self.topology.writer()
        except NoWriter:
            return defer.fail()
        creds = self.credentials_for(key[0])
        if creds is None:
            return defer.fail(self.no_credentials(key[0]))
        return self.open(target, self.make_connection(key, target, creds))

    # -- health checks (failover) ---------------------------------------------------------------
    def probe_key(self, creds):
        """The pool-style key a health-check connection logs in with (engine supplies it)."""
        raise NotImplementedError

    def query_role(self, conn):
        """Deferred["READ_WRITE" | "READ_ONLY"]: ask the logged-in *conn* (engine supplies it)."""
        raise NotImplementedError

    def probe_role(self, target, creds):
        """Health check of *target*: Deferred["READ_WRITE" | "READ_ONLY"].

        Logs in as *creds* (the proxy's first Auth secret) on a connection of its own, runs the
        engine's role query and closes the connection.  Fails with BackendGone (unreachable,
        closed, or no answer within PROBE_TIMEOUT) or the engine's DatabaseError.
        """
        if creds is None:
            return defer.fail(BackendGone("no credentials for health checks (first Auth secret)"))
        conn = self.make_connection(self.probe_key(creds), target, creds)
        timer = self.reactor.callLater(self.PROBE_TIMEOUT, conn.close, "health check timed out")
        d = self.open(target, conn, metered=False, timeout=self.PROBE_TIMEOUT)
        d.addCallback(self.query_role)

        def done(result):
            if timer.active():
                timer.cancel()
            conn.close("health check done")
            return result

        return d.addBoth(done)


class BackendConnection(protocol.Protocol):
    """The closing rules every engine's database connection shares.

    Subclasses define `goodbye()` (the bytes that end a session politely: Terminate,
    COM_QUIT, or b"") and `fail_pending(error)` (their running internal operation), and
    may override `lost_reason(reason)`.  Closing is reported once to the pool (`pool_listener`)
    and, if lent, to the session (`backend_lost`), with the reason.
    """

    state = "connecting"
    pool_listener = None
    ready = None  # Deferred until logged in and initialised
    _sink = None
    _closing_reason = None

    def goodbye(self):
        return b""

    def fail_pending(self, error):
        """Fail the internal operation in progress, if any."""

    def lost_reason(self, reason):
        return f"database closed the connection ({reason.getErrorMessage()})"

    def close(self, reason):
        if self.state == "closed":
            return
        self._closing_reason = reason
        self.state = "closed"
        if self.transport is not None:
            bye = self.goodbye()
            if bye and getattr(self.transport, "connected", True):
                self.transport.write(bye)
            self.transport.loseConnection()
        self._notify_lost(reason)

    def connectionLost(self, reason):
        why = self._closing_reason or self.lost_reason(reason)
        self.state = "closed"
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
