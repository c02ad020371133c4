"""What opening a database connection means for every engine.

An engine's connector builds an unconnected protocol (its backend connection, with a `ready`
Deferred that fires once logged in and initialised) and says how to read a failure; this base
class does the rest the same way for all: connect to the current writer, count the attempt in
the metrics, turn transport errors into BackendGone, and record the outcome in TargetHealth.
"""

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure


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

    def open(self, target, conn):
        """Connect *conn* (an unconnected backend protocol) to *target*.

        Deferred[conn] once its `ready` fired; fails with the engine's DatabaseError or with
        BackendGone.
        """
        name = target.rds_resource_id
        if self.metrics is not None:
            self.metrics.db_connection_requests.inc(self.proxy_name, name)
        d = self.endpoint(target).connect(SingleUseFactory(conn))

        def failed(f):
            if self.metrics is not None:
                self.metrics.db_connections_setup_failed.inc(self.proxy_name, name)
            if not f.check(BackendGone, *self.database_error):
                f = Failure(BackendGone(
                    f"cannot connect to {target.endpoint}:{target.port}: {f.getErrorMessage()}"))
            self.record_failure(target, f)
            return f

        def succeeded(c):
            if self.metrics is not None:
                self.metrics.db_connections_setup_succeeded.inc(self.proxy_name, name)
            if self.health is not None:
                self.health.record_success(target)
            return c

        return d.addCallback(lambda _: conn.ready).addCallbacks(succeeded, failed)

    def no_credentials(self, user):
        """Fails a connect for a user the store has no secret for (engine supplies the error)."""
        raise NotImplementedError

    def connect(self, key):
        target = self.topology.writer()
        creds = self.credentials_for(key[0])
        if creds is None:
            return defer.fail(self.no_credentials(key[0]))
        return self.open(target, self.make_connection(key, target, creds))
