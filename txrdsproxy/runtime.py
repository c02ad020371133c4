"""One proxy at run time (`ProxyRuntime`: its ProxyContext, pool, connector, monitor, janitor and
listening port), how it is built from its DBProxy config, how it follows a changed config, and
how its sessions are drained; plus the errors of the registry's operations.

The registry of every proxy, and the operations that change them, are in registry.py (the
twistd service, the management API, a reload and the embedding API all go through it).  What
each change does to open sessions is written at `ProxyRuntime.apply` and in
docs/operations.md: sessions a change does not concern are never closed.
"""

import dataclasses
import enum
import re

from twisted.application import strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from txrdsproxy.backend_tls import DatabaseTLS
from txrdsproxy.config import model
from txrdsproxy.failover.checks import HealthChecks
from txrdsproxy.failover.monitor import TargetHealth, WriterMonitor
from txrdsproxy.failover.topology import READ_WRITE, Topology
from txrdsproxy.pool.janitor import PoolJanitor
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy.connector import TargetUnreachable, tune_client_port
from txrdsproxy.proxy.context import ProxyContext
from txrdsproxy.proxy.limits import ConnectionRateLimiter

log = Logger()

_PORT_ZERO = re.compile(r"^(tcp6?):0(?=:|$)")
_ANY_PORT = re.compile(r"^(tcp6?):\d+(?=:|$)")
DEFAULT_DRAIN_TIMEOUT = 30.0


# -- errors (each one RDS fault of the admin API) ------------------------------------------------

class RegistryError(Exception):
    """Base of the registry's refusals; the message is meant for the operator."""


class ProxyNotFound(RegistryError):
    pass


class ProxyAlreadyExists(RegistryError):
    pass


class TargetGroupNotFound(RegistryError):
    pass


class TargetNotFound(RegistryError):
    pass


class TargetAlreadyRegistered(RegistryError):
    pass


class InvalidProxyState(RegistryError):
    pass


class InvalidChange(RegistryError):
    """The change is well formed but cannot be applied (for example a new EngineFamily)."""


class ListenFailed(RegistryError):
    """A listening endpoint could not be bound; the message names the address and the OS error."""


def bind_now(listen, factory, reactor, what):
    """Bind *listen* (an endpoint string) for *factory* synchronously: -> the listening port.

    Raises ListenFailed("<what> cannot listen on <listen>: <OS error>") when the port cannot be
    bound (in use, no permission, unknown interface).  Endpoints that bind synchronously (TCP,
    UNIX, SSL) answer at once; any other is an error too, since the caller must know now.
    """
    endpoint = strports.service(listen, factory, reactor=reactor).endpoint
    outcome = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise ListenFailed(f"{what} cannot listen on {listen}: the endpoint did not bind at once")
    if isinstance(outcome[0], Failure):
        raise ListenFailed(f"{what} cannot listen on {listen}: {outcome[0].getErrorMessage()}")
    return outcome[0]


LISTEN_BACKLOG = 1024  # Twisted's default, 50, drops the SYNs of a burst of client connects


def with_backlog(listen):
    """*listen* with `backlog=LISTEN_BACKLOG` for TCP endpoints that do not set one.

    With Twisted's default of 50 pending connections, a burst of a few hundred clients has its
    SYNs dropped and retried after 1, 3, 7... s (measured: a burst of 1000 MySQL logins at
    8/s).  The kernel caps it further at net.core.somaxconn."""
    kind = listen.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in listen:
        return listen + ":backlog=%d" % LISTEN_BACKLOG
    return listen


class ProxyStatus(enum.Enum):
    """DBProxy.Status values (the RDS API's) that a proxy here goes through."""

    CREATING = "creating"
    AVAILABLE = "available"
    MODIFYING = "modifying"
    DELETING = "deleting"


# -- building one proxy ---------------------------------------------------------------------------

def build_proxy(proxy, secrets, reactor, cancel_registry, metrics=None):
    """-> ProxyContext for one configured proxy (its pool, connector and shared state)."""
    topology = Topology(proxy.target_group.targets)
    health = TargetHealth(reactor)
    pool_config = proxy.target_group.connection_pool_config
    holder = {}

    def credentials_for(user):
        return holder["ctx"].credentials_for(user)

    database_tls = DatabaseTLS(proxy.database_tls)
    timeouts = dict(connect_timeout=proxy.database_connect_timeout,
                    operation_timeout=proxy.database_operation_timeout,
                    database_tls=database_tls)
    if proxy.engine_family == model.ENGINE_POSTGRESQL:
        from txrdsproxy.proxy.pg_backend import PgConnector
        connector = PgConnector(reactor, topology, credentials_for, pool_config.init_query,
                                proxy.max_message_size, metrics=metrics, proxy_name=proxy.name,
                                health=health, **timeouts)
    else:
        from txrdsproxy.proxy.mysql_backend import MySQLConnector
        connector = MySQLConnector(reactor, topology, credentials_for, pool_config.init_query,
                                   proxy.max_message_size, metrics=metrics, proxy_name=proxy.name,
                                   health=health, **timeouts)
    pool = BackendPool(proxy.name, connector, pool_config, reactor, metrics)
    ctx = ProxyContext(proxy, pool, secrets, reactor, metrics, cancel_registry, connector)
    ctx.database_tls = database_tls
    ctx.topology = topology
    if proxy.tls is not None:
        from txrdsproxy.tls import ServerTLS
        ctx.tls = ServerTLS(proxy.tls.certificate_file, proxy.tls.private_key_file, clock=reactor)
    ctx.health = health
    holder["ctx"] = ctx
    from txrdsproxy.endpoints import wire_readers
    wire_readers(ctx, reactor, metrics)
    ctx.monitor = build_monitor(ctx)
    return ctx


def build_monitor(ctx):
    """-> the WriterMonitor of a target group of several targets, wired to its pool; None for
    one target (nothing to fail over to: its connection attempts alone decide its health).

    The checks choose their credentials when they run (failover/checks.py: HealthCheck, else the
    Auth secrets in turn), so a changed Auth or HealthCheck is followed.  When the writer moves
    off a target, the pinned sessions whose connection is there are ended (see
    `end_pinned_sessions_on`)."""
    if len(ctx.topology.targets) < 2:
        return None
    connector = ctx.connector
    worker = ctx.worker
    if worker is not None and worker.shared_monitor:
        # `Workers: N`: the supervisor's monitor decides for every worker (workers/monitor.py)
        from txrdsproxy.failover.follower import FollowerMonitor
        from txrdsproxy.workers.hub import ask_monitor, tell_unfence
        monitor = FollowerMonitor(ctx.clock, ctx.name, ctx.topology, ctx.health,
                                  ctx.config.health_check_interval, pool=ctx.pool,
                                  database_errors=connector.database_error,
                                  ask=lambda name: ask_monitor(worker, name, ctx.clock),
                                  tell_unfence=lambda name, ident: tell_unfence(worker, name, ident,
                                                                                ctx.clock))
        monitor.checks = HealthChecks(ctx)  # the reader set's own re-checks after trouble
        monitor.writer_listeners.append(lambda old, new, why: end_pinned_sessions_on(ctx, old, why))
        ctx.pool.failover = monitor
        return monitor
    checks = HealthChecks(ctx)
    fences = ctx.fence_store.for_proxy(ctx.name) if ctx.fence_store is not None else None
    monitor = WriterMonitor(ctx.clock, ctx.topology, ctx.health, checks.probe,
                            ctx.config.health_check_interval, pool=ctx.pool,
                            database_errors=connector.database_error,
                            failure_reason=checks.failure_reason,
                            retries=ctx.config.health_check.retries,
                            unreachable=(TargetUnreachable,), fences=fences)
    monitor.checks = checks
    monitor.writer_listeners.append(lambda old, new, why: end_pinned_sessions_on(ctx, old, why))
    ctx.pool.failover = monitor
    return monitor


FORMER_WRITER_DRAIN = 30.0  # seconds a pinned session's transaction on a former writer may still take


def end_pinned_sessions_on(ctx, target, why):
    """The writer moved off *target* (failover, or it was made read-only): a pinned session keeps
    its database connection for its whole life, so it must not go on there.  At its next
    transaction boundary (now when it stands between two) each one is moved to the new writer
    when what pinned it can be replayed there (proxy/pin_move.py), else ended with the engine's
    "writer changed" error (docs/errors.md); one still inside a transaction after
    FORMER_WRITER_DRAIN seconds is closed.  Sessions that are not pinned are not touched: their
    next transaction borrows a connection to the new writer.
    -> the Deferred of drain_sessions, or None when no session was pinned there."""
    if target is None:
        return None
    pinned = [s for s in ctx.sessions if getattr(s, "pin_reason", None) is not None
              and getattr(getattr(s, "lease", None), "conn", None) is not None
              and getattr(s.lease.conn, "target", None) is target]
    if not pinned:
        return None
    log.warn("proxy {name}: {n} pinned session(s) on former writer {t} ({why}): each moves to the "
             "new writer at its next transaction boundary if its state can be replayed there, else "
             "ends", name=ctx.name, n=len(pinned), t=target.rds_resource_id, why=why)
    return drain_sessions(ctx, FORMER_WRITER_DRAIN, ctx.clock, pinned, why="writer changed",
                          moved=lambda s: _left_target(s, target))


def _left_target(session, target):
    """A pinned session holds no connection to *target* any more (it moved)."""
    lease = getattr(session, "lease", None)
    return lease is None or getattr(lease.conn, "target", None) is not target


def _frontend_factory(ctx):
    if ctx.config.engine_family == model.ENGINE_POSTGRESQL:
        from txrdsproxy.proxy.pg_frontend import PgFrontendFactory
        return PgFrontendFactory(ctx)
    from txrdsproxy.proxy.mysql_frontend import MySQLFrontendFactory
    return MySQLFrontendFactory(ctx)


class ProxyRuntime:
    """One running proxy: its ProxyContext (`ctx`: pool, connector, topology, health, monitor),
    its listening port (`port`, None until bound) and its RDS status."""

    def __init__(self, config, secrets, reactor, cancel_registry, metrics=None):
        self.reactor = reactor
        self.ctx = build_proxy(config, secrets, reactor, cancel_registry, metrics)
        self.port = None
        self.status = ProxyStatus.CREATING
        self.created = reactor.seconds()
        self.updated = self.created
        self._janitor = PoolJanitor(self.ctx.pool, reactor)
        self.drain_timeout = DEFAULT_DRAIN_TIMEOUT  # the registry sets its own
        # How listeners are bound: bind_now; a worker of several binds with SO_REUSEPORT
        # (workers/listen.py).  Every listener of the proxy goes through it.
        self._binder = bind_now
        self._running = False
        from txrdsproxy.endpoints import EndpointSet
        self.endpoints = EndpointSet(self)  # the extra DBProxyEndpoints (reader endpoints)
        for endpoint in config.endpoints:
            self.endpoints.build(endpoint)

    @property
    def binder(self):
        """How the proxy's client listeners are bound: bind_now, or what the registry set (a
        worker's SO_REUSEPORT binder); every port bound through it gets the client socket
        options on its listening socket (connector.tune_client_port), which accepted sockets
        inherit."""
        raw = self._binder

        def bind(*args, **kwargs):
            port = raw(*args, **kwargs)
            tune_client_port(port)
            return port

        return bind

    @binder.setter
    def binder(self, binder):
        self._binder = binder

    @property
    def config(self):
        return self.ctx.config

    @property
    def name(self):
        return self.ctx.config.name

    def __repr__(self):
        return f"<ProxyRuntime {self.name} {self.status.value}>"

    # -- lifecycle ---------------------------------------------------------------------------------
    def bind(self):
        """Listen on the proxy's endpoint now; raises ListenFailed (address and OS error)."""
        if self.port is None:
            self.port = self.binder(with_backlog(self.config.listen), _frontend_factory(self.ctx),
                                    self.reactor, f"proxy {self.name}")
            self._pin_port(self.port)
            log.info("proxy {name} ({engine}) listening on {addr}", name=self.name,
                     engine=self.config.engine_family, addr=self.port.getHost())
            try:
                self._bind_endpoints()
            except ListenFailed:
                port, self.port = self.port, None
                port.stopListening()
                self.endpoints.stop_listening()
                raise

    def _bind_endpoints(self):
        self.endpoints.bind_all(_frontend_factory, self.binder, with_backlog)
        self.ctx.config = dataclasses.replace(self.ctx.config, endpoints=self.endpoints.configs())

    def _pin_port(self, port):
        """Listen "tcp:0:..." asked for any free port: from now on the config names the port
        it got, so a later change or a restart (the file is written with it) keeps it."""
        listen = self.ctx.config.listen
        match = _PORT_ZERO.match(listen)
        number = getattr(port.getHost(), "port", None)
        if match and number:
            self.ctx.config = dataclasses.replace(
                self.ctx.config, listen=f"{match.group(1)}:{number}{listen[match.end():]}")

    def start(self):
        """Bind (if not yet), start the janitor and the health checks: the proxy is available."""
        self.bind()
        if self._running:
            return
        self._running = True
        self._janitor.start()
        self.ctx.replica_janitor.start()
        from txrdsproxy.endpoints import attach_monitor
        attach_monitor(self.ctx.readers, self.ctx.monitor)
        if self.ctx.monitor is not None:
            self.ctx.monitor.start()
        self.status = ProxyStatus.AVAILABLE

    def stop_listening(self):
        """-> Deferred that fires once the port is closed (new clients are refused)."""
        self.endpoints.stop_listening()
        if self.port is None:
            return defer.succeed(None)
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)

    def stop(self, drain_timeout=0.0):
        """Stop the proxy: refuse new clients, end its sessions, close its pool.

        -> Deferred[None] that fires when every session is gone.  *drain_timeout* > 0: sessions
        inside a transaction may finish it for up to that many seconds (sessions between
        transactions are ended at once); 0: every session is closed now.  Never fails.
        """
        self.status = ProxyStatus.DELETING
        self._running = False
        self._janitor.stop()
        self.ctx.replica_janitor.stop()
        self.ctx.readers.stop()
        if self.ctx.monitor is not None:
            self.ctx.monitor.stop()
        d = self.stop_listening()
        d.addCallback(lambda _: drain_sessions(self.ctx, drain_timeout, self.reactor))
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result):
        self.ctx.pool.shutdown()
        self.ctx.replica_pools.shutdown()
        if isinstance(result, Failure):
            log.failure("proxy {name}: error while stopping", result, name=self.name)
        return None

    # -- changes -----------------------------------------------------------------------------------
    def apply(self, new):
        """Make the running proxy follow *new* (a DBProxy of the same EngineFamily).

        -> [str], what changed.  What each change does to open sessions:
        - DBProxyName, Auth, RequireTLS, MaxClientConnections, MaxConnectionRate, TLS, DebugLogging:
          new logins and new connections see them; logged-in sessions are not touched;
        - IdleClientTimeout: every session's next idle check uses it;
        - ConnectionPoolConfig: the next borrow (a lower cap closes idle connections above it now
          and borrowed ones as they come back; SessionPinningFilters apply to new sessions);
          InitQuery applies to connections opened from now on;
        - HealthCheck, HealthCheckInterval: the next health check;
        - Targets: a new target is probed (health checks) and joins; a removed target's idle
          connections close now and its borrowed ones when their session gives them back (after
          the transaction); the writer moves to another target when it was removed;
        - Listen: the new address listens before the old one closes; sessions stay.
        """
        old = self.config
        if new.engine_family != old.engine_family:
            raise InvalidChange(f"proxy {old.name}: EngineFamily cannot change "
                                f"({old.engine_family} -> {new.engine_family}); delete and create it")
        match = _PORT_ZERO.match(new.listen)
        if match and _ANY_PORT.sub(r"\1:0", old.listen) == new.listen:
            new = dataclasses.replace(new, listen=old.listen)  # "any port": the one it has
        new = _keep_endpoint_ports(old, new)
        changes = [f.name for f in dataclasses.fields(model.DBProxy)
                   if getattr(old, f.name) != getattr(new, f.name)]
        if not changes:
            return []
        ctx = self.ctx
        new = self._adopt_targets(new)
        if "listen" in changes and self.port is not None:
            old_port, self.port = self.port, None
            try:
                self.bind_with(new)
            except ListenFailed:
                self.port = old_port
                raise
            old_port.stopListening()
        if "endpoints" in changes:
            # first, so that a new endpoint that cannot listen leaves everything unchanged
            self.endpoints.apply(old.endpoints, new.endpoints, _frontend_factory, self.binder,
                                 with_backlog, self._drain_endpoint_sessions)
            new = dataclasses.replace(new, endpoints=self.endpoints.configs())
        ctx.config = new
        if "listen" in changes and self.port is not None:
            self._pin_port(self.port)
        ctx.name = new.name
        ctx.arns = [a.secret_arn for a in new.auth]
        ctx.pool.name = new.name
        ctx.connector.proxy_name = new.name
        ctx.connector.max_message_size = new.max_message_size
        ctx.connector.connect_timeout = new.database_connect_timeout
        if hasattr(ctx.connector, "operation_timeout"):
            ctx.connector.operation_timeout = new.database_operation_timeout
        admission = ctx.admission  # pre-authentication limits: counts kept, limits renewed
        admission.max_client_connections = new.max_client_connections
        if "max_connection_rate" in changes:
            admission.connection_rate = ConnectionRateLimiter(new.max_connection_rate, ctx.clock)
        if "max_cancel_rate" in changes:
            admission.cancel_rate = ConnectionRateLimiter(new.max_cancel_rate, ctx.clock)
        if "idle_client_timeout" in changes:
            ctx.idle_sweep.reschedule()  # a shorter timeout applies now, not at the old sweep time
        if "debug_logging" in changes:
            from txrdsproxy.proxy.context import DEBUG_LOGGING_SECONDS
            ctx.debug_until = ctx.clock.seconds() + DEBUG_LOGGING_SECONDS if new.debug_logging else 0.0
        if "tls" in changes:
            ctx.tls = None
            if new.tls is not None:
                from txrdsproxy.tls import ServerTLS
                ctx.tls = ServerTLS(new.tls.certificate_file, new.tls.private_key_file, clock=ctx.clock)
        if "database_tls" in changes:
            # New connections follow the new DatabaseTLS at once.  None made under the old
            # settings is lent again, even where the pool key stays the same (prefer ->
            # require, another CAFile, verify-ca -> verify-full): idle ones close now, borrowed
            # ones when their session gives them back, ones being opened once open.
            ctx.database_tls = DatabaseTLS(new.database_tls)
            ctx.connector.database_tls = ctx.database_tls
            ctx.pool.retire_all("DatabaseTLS changed")
        if "health_check_interval" in changes and ctx.monitor is not None:
            ctx.monitor.interval = new.health_check_interval
        if "health_check" in changes and ctx.monitor is not None:
            # the checks read HealthCheck when they run; a login that worked before may not now
            ctx.monitor.retries = new.health_check.retries
            ctx.monitor.checks.working.clear()
        ctx.readers.interval = new.health_check_interval
        ctx.readers.max_lag = new.max_replica_lag
        if "target_group" in changes:
            self._apply_target_group(old.target_group, new.target_group)
        self.updated = self.reactor.seconds()
        log.info("proxy {name}: changed {changes}", name=new.name, changes=", ".join(changes))
        return changes

    def _drain_endpoint_sessions(self, sessions):
        drain_sessions(self.ctx, self.drain_timeout, self.reactor, sessions)

    def bind_with(self, new):
        self.port = self.binder(with_backlog(new.listen), _frontend_factory(self.ctx), self.reactor,
                                f"proxy {new.name}")
        log.info("proxy {name} now listening on {addr}", name=new.name, addr=self.port.getHost())

    def _adopt_targets(self, new):
        """Targets equal to running ones keep their objects (the topology knows the writer by
        identity), so an unchanged target is the same target after any change."""
        running = {t: t for t in self.ctx.topology.targets}
        targets = tuple(running.get(t, t) for t in new.target_group.targets)
        group = dataclasses.replace(new.target_group, targets=targets)
        return dataclasses.replace(new, target_group=group)

    def _apply_target_group(self, old, new):
        ctx = self.ctx
        pool = ctx.pool
        if old.connection_pool_config != new.connection_pool_config:
            ctx.connector.init_query = new.connection_pool_config.init_query or ""
            pool.reconfigure(new.connection_pool_config)
            ctx.replica_pools.reconfigure(new.connection_pool_config)
            self._janitor.wake()  # a shorter IdleConnectionTimeout applies now, not after a sleep
            ctx.replica_janitor.wake()
        if old.targets == new.targets:
            return
        topology = ctx.topology
        added = [t for t in new.targets if t not in old.targets]
        removed = [t for t in old.targets if t not in new.targets]
        writer = topology.current_writer()
        topology.targets = tuple(new.targets)
        for target in added + removed:
            if ctx.monitor is not None:
                ctx.monitor.unfence(target)  # registered again: trusted like any other target
        for target in added:
            pool.readmit_target(target)
        for target in removed:
            topology.forget_role(target)
            pool.retire_target(target, "target deregistered")
            ctx.replica_pools.drop(target, "target deregistered")
            ctx.readers.forget(target)
        # A pinned session keeps its connection for as long as it lives: one on a removed
        # target is ended (the server's shutdown error) once its transaction is over.
        pinned = [s for s in ctx.sessions if getattr(s, "pin_reason", None) is not None
                  and getattr(getattr(s, "lease", None), "conn", None) is not None
                  and getattr(s.lease.conn, "target", None) in removed]
        if pinned:
            log.info("proxy {name}: ending {n} pinned session(s) on deregistered targets after "
                     "their transactions", name=ctx.name, n=len(pinned))
            drain_sessions(ctx, self.drain_timeout, self.reactor, pinned)
        follower = ctx.monitor is not None and ctx.monitor.follows  # Workers: N: the supervisor decides
        if follower and len(topology.targets) < 2:
            # The supervisor's monitor checks proxies of several targets only: with one left, its
            # connections decide its health here, as for any proxy of one target.
            ctx.monitor.stop()
            ctx.monitor, ctx.pool.failover, follower = None, None, False
            ctx.health.remote = False
            if writer is not None and writer not in removed:
                topology.set_writer(writer)
        if writer is not None and writer in removed:
            writers = [t for t in new.targets if topology.probed_role(t) == READ_WRITE
                       or t.role == READ_WRITE]
            topology.set_writer(None if follower else (writers or list(new.targets) or [None])[0])
            log.warn("proxy {name}: the writer {old} was deregistered; writer now {new}",
                     name=new.name if hasattr(new, "name") else ctx.name,
                     old=writer.rds_resource_id, new=getattr(topology.current_writer(),
                                                             "rds_resource_id", None))
        if topology.current_writer() is None and ctx.monitor is None and new.targets:
            # the first target of an empty group (one target: its connections decide its health)
            writers = [t for t in new.targets if t.role == READ_WRITE]
            topology.set_writer((writers or list(new.targets))[0])
        if ctx.monitor is None and len(topology.targets) >= 2:
            ctx.monitor = build_monitor(ctx)
            if self._running:
                from txrdsproxy.endpoints import attach_monitor
                ctx.readers.known = False  # wait for the new monitor's first round
                attach_monitor(ctx.readers, ctx.monitor)
                ctx.monitor.start()
        elif ctx.monitor is not None:
            if not follower:
                ctx.monitor.last_writer = topology.current_writer()
            ctx.monitor.probe_now()


def _keep_endpoint_ports(old, new):
    """An endpoint whose new Listen asks for any port (tcp:0) keeps the port it has."""
    ports = {e.name: e.listen for e in old.endpoints}
    endpoints = []
    for e in new.endpoints:
        had = ports.get(e.name)
        if had is not None and _PORT_ZERO.match(e.listen) and _ANY_PORT.sub(r"\1:0", had) == e.listen:
            e = dataclasses.replace(e, listen=had)
        endpoints.append(e)
    return dataclasses.replace(new, endpoints=tuple(endpoints))


def drain_sessions(ctx, timeout, clock, sessions=None, why=None, moved=None):
    """End every session of *ctx* (or only *sessions*): between transactions now, inside one
    when it ends or after *timeout* seconds.  -> Deferred[None] once they are all gone (or
    `moved(session)` is true for the rest: pinned sessions that moved off a former writer).

    A session's engine frontend may offer `drain()` (tell the client the server is shutting down
    with the engine's error, between transactions) and `busy_in_transaction()`; without them the
    session's transport is closed.
    """
    sessions = list(ctx.sessions if sessions is None else sessions)
    if not sessions:
        return defer.succeed(None)
    done = defer.Deferred()
    state = {"timer": None, "poll": None}

    def remaining():
        return [s for s in ctx.sessions if s in sessions and not (moved is not None and moved(s))]

    def force():
        for s in remaining():
            log.info("{s}: closed by the drain timeout", s=s)
            s.transport.abortConnection() if hasattr(s.transport, "abortConnection") \
                else s.transport.loseConnection()
        check()

    def check():
        left = remaining()
        if not left:
            for key in ("timer", "poll"):
                call = state[key]
                if call is not None and call.active():
                    call.cancel()
            if not done.called:
                done.callback(None)
            return
        for s in left:
            _drain_one(s, why)
        if state["poll"] is None or not state["poll"].active():
            state["poll"] = clock.callLater(0.05, check)

    if timeout and timeout > 0:
        state["timer"] = clock.callLater(timeout, force)
        check()
    else:
        force()
    return done


def _drain_one(session, why=None):
    """Ask one session to end at its next transaction boundary (now if it is between two):
    ClientSession.drain (the engine's shutdown error, or with *why* "writer changed" its
    former-writer error); a session object without it is closed when it holds no connection."""
    drain = getattr(session, "drain", None)
    if drain is not None:
        drain(why) if why is not None else drain()
        return
    if not getattr(session, "lease", None) and not getattr(session, "busy", False):
        session.transport.loseConnection()


def __getattr__(name):
    """`runtime.ProxyRegistry` / `runtime.IProxyRegistry` still work: they live in registry.py."""
    if name in ("ProxyRegistry", "IProxyRegistry"):
        from txrdsproxy import registry
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
