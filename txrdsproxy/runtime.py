"""The running proxies of one process, and the operations that change them while they run.

`ProxyRegistry` holds one `ProxyRuntime` per proxy (its ProxyContext, pool, connector, monitor and
listening port) and is the only way anything changes them: the twistd service, the management API,
a reload (SIGHUP) and the embedding API (embed.py) all call the same methods, so a change means
the same thing whoever asks for it.

The internal API (every method runs in the reactor thread):

    registry.add_proxy(db_proxy)                -> ProxyRuntime (listening once running)
    registry.remove_proxy(name, drain_timeout)  -> Deferred[None] (fires when its sessions are gone)
    registry.modify_proxy(name, **changes)      -> ProxyRuntime (DBProxy field names: name=, auth=,
                                                   require_tls=, idle_client_timeout=, ...)
    registry.modify_target_group(name, connection_pool_config=None, new_name=None)
    registry.register_targets(name, [DBProxyTarget])
    registry.deregister_targets(name, [rds_resource_id])
    registry.replace_proxy(name, db_proxy)      -> ProxyRuntime (the general form of the above)
    registry.apply_config(config)               -> Deferred[[str]]: the difference, as one reload

Errors are the exceptions below (the admin API maps each to its RDS fault).  What each change does
to open sessions is written at `ProxyRuntime.apply` and in docs/operations.md: sessions a change
does not concern are never closed.
"""

import dataclasses
import enum
import re

from zope.interface import Attribute, Interface, implementer

from twisted.application import service, strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from txrdsproxy.auth.secrets import config_secret_arns
from txrdsproxy.backend_tls import DatabaseTLS
from txrdsproxy.config import model
from txrdsproxy.failover.monitor import TargetHealth, WriterMonitor
from txrdsproxy.failover.topology import READ_WRITE, Topology
from txrdsproxy.pool.janitor import PoolJanitor
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy.session import ProxyContext
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
    ctx.monitor = build_monitor(ctx)
    return ctx


def build_monitor(ctx):
    """-> the WriterMonitor of a target group of several targets, wired to its pool; None for
    one target (nothing to fail over to: its connection attempts alone decide its health).

    The probe reads the proxy's first Auth entry when it runs, so a changed Auth is followed."""
    if len(ctx.topology.targets) < 2:
        return None
    connector = ctx.connector

    def probe(target):
        return connector.probe_role(target, ctx.secrets.get(ctx.config.auth[0].secret_arn))

    monitor = WriterMonitor(ctx.clock, ctx.topology, ctx.health, probe,
                            ctx.config.health_check_interval, pool=ctx.pool,
                            database_errors=connector.database_error,
                            failure_reason=connector.failure_reason)
    ctx.pool.failover = monitor
    return monitor


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
        self._running = False

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
            self.port = bind_now(with_backlog(self.config.listen), _frontend_factory(self.ctx),
                                 self.reactor, f"proxy {self.name}")
            self._pin_port(self.port)
            log.info("proxy {name} ({engine}) listening on {addr}", name=self.name,
                     engine=self.config.engine_family, addr=self.port.getHost())

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
        if self.ctx.monitor is not None:
            self.ctx.monitor.start()
        self.status = ProxyStatus.AVAILABLE

    def stop_listening(self):
        """-> Deferred that fires once the port is closed (new clients are refused)."""
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
        if self.ctx.monitor is not None:
            self.ctx.monitor.stop()
        d = self.stop_listening()
        d.addCallback(lambda _: drain_sessions(self.ctx, drain_timeout, self.reactor))
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result):
        self.ctx.pool.shutdown()
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
        if "debug_logging" in changes:
            from txrdsproxy.proxy.session import DEBUG_LOGGING_SECONDS
            ctx.debug_until = ctx.clock.seconds() + DEBUG_LOGGING_SECONDS if new.debug_logging else 0.0
        if "tls" in changes:
            ctx.tls = None
            if new.tls is not None:
                from txrdsproxy.tls import ServerTLS
                ctx.tls = ServerTLS(new.tls.certificate_file, new.tls.private_key_file, clock=ctx.clock)
        if "health_check_interval" in changes and ctx.monitor is not None:
            ctx.monitor.interval = new.health_check_interval
        if "target_group" in changes:
            self._apply_target_group(old.target_group, new.target_group)
        self.updated = self.reactor.seconds()
        log.info("proxy {name}: changed {changes}", name=new.name, changes=", ".join(changes))
        return changes

    def bind_with(self, new):
        self.port = bind_now(new.listen, _frontend_factory(self.ctx), self.reactor,
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
        if old.targets == new.targets:
            return
        topology = ctx.topology
        added = [t for t in new.targets if t not in old.targets]
        removed = [t for t in old.targets if t not in new.targets]
        writer = topology.current_writer()
        topology.targets = tuple(new.targets)
        for target in added:
            pool.readmit_target(target)
        for target in removed:
            topology.forget_role(target)
            pool.retire_target(target, "target deregistered")
        # A pinned session keeps its connection for as long as it lives: one on a removed
        # target is ended (the server's shutdown error) once its transaction is over.
        pinned = [s for s in ctx.sessions if getattr(s, "pin_reason", None) is not None
                  and getattr(getattr(s, "lease", None), "conn", None) is not None
                  and getattr(s.lease.conn, "target", None) in removed]
        if pinned:
            log.info("proxy {name}: ending {n} pinned session(s) on deregistered targets after "
                     "their transactions", name=ctx.name, n=len(pinned))
            drain_sessions(ctx, self.drain_timeout, self.reactor, pinned)
        if writer is not None and writer in removed:
            writers = [t for t in new.targets if topology.probed_role(t) == READ_WRITE
                       or t.role == READ_WRITE]
            topology.set_writer((writers or list(new.targets) or [None])[0])
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
                ctx.monitor.start()
        elif ctx.monitor is not None:
            ctx.monitor.last_writer = topology.current_writer()
            ctx.monitor.probe_now()


def drain_sessions(ctx, timeout, clock, sessions=None):
    """End every session of *ctx* (or only *sessions*): between transactions now, inside one
    when it ends or after *timeout* seconds.  -> Deferred[None] once they are all gone.

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
        return [s for s in ctx.sessions if s in sessions]

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
            _drain_one(s)
        if state["poll"] is None or not state["poll"].active():
            state["poll"] = clock.callLater(0.05, check)

    if timeout and timeout > 0:
        state["timer"] = clock.callLater(timeout, force)
        check()
    else:
        force()
    return done


def _strict(strict, name):
    return strict is True or (not isinstance(strict, bool) and name in strict)


def _drain_one(session):
    """Ask one session to end at its next transaction boundary (now if it is between two):
    ClientSession.drain (the engine's shutdown error); a session object without it is closed
    when it holds no connection."""
    drain = getattr(session, "drain", None)
    if drain is not None:
        drain()
        return
    if not getattr(session, "lease", None) and not getattr(session, "busy", False):
        session.transport.loseConnection()


# -- the registry ---------------------------------------------------------------------------------

class IProxyRegistry(Interface):
    """The running proxies of a process and the operations that change them live (the seam the
    management API, reload, deploy and the embedding API use).  Reactor thread only."""

    drain_timeout = Attribute("seconds a removed proxy's open transactions may run on")

    def get(name):
        """-> the ProxyRuntime named *name*; raises ProxyNotFound."""

    def name_taken(name):
        """Is *name* used by a running proxy or one still draining?"""

    def contexts():
        """-> [ProxyContext] of the running proxies."""

    def proxies():
        """-> tuple of the DBProxy configs the proxies run with."""

    def add_proxy(proxy):
        """Build and (when running) start a DBProxy -> ProxyRuntime; ProxyAlreadyExists, ListenFailed."""

    def remove_proxy(name, drain_timeout=None):
        """Stop listening now, drain, close -> Deferred[None]; ProxyNotFound."""

    def replace_proxy(name, new):
        """Run proxy *name* with the DBProxy *new* (which may rename it) -> ProxyRuntime."""

    def modify_proxy(proxy_name, **changes):
        """replace_proxy with some DBProxy fields changed -> ProxyRuntime."""

    def modify_target_group(name, group_name=None, connection_pool_config=None, new_name=None):
        """Change the target group's ConnectionPoolConfig and/or name -> ProxyRuntime."""

    def register_targets(name, targets, group_name=None):
        """Add DBProxyTargets -> ProxyRuntime; TargetAlreadyRegistered."""

    def deregister_targets(name, rds_resource_ids, group_name=None):
        """Remove targets by RdsResourceId -> ProxyRuntime; TargetNotFound, InvalidChange."""

    def apply_config(config, drain_timeout=None, strict=False):
        """Run exactly the proxies of *config* -> Deferred[[str]] (one line per change)."""


@implementer(IProxyRegistry)
class ProxyRegistry(service.Service):
    """Every proxy of the process, by name (see the module docstring for the API).

    As a twistd service it binds every proxy's port in privilegedStartService (before twistd
    drops privileges; a failure raises ListenFailed, which stops the start-up) and drains them
    in stopService.
    """

    def __init__(self, reactor, secrets, metrics=None, cancel_registry=None,
                 drain_timeout=DEFAULT_DRAIN_TIMEOUT):
        self.reactor = reactor
        self.secrets = secrets
        self.metrics = metrics
        self.cancel_registry = cancel_registry if cancel_registry is not None else {}
        self.drain_timeout = drain_timeout
        self.iam = None  # auth.iam.DbTokenVerifier shared by every proxy (set by make_service)
        self._runtimes = {}  # name -> ProxyRuntime, in creation order
        self._deleting = {}  # name -> ProxyRuntime being removed
        self.observers = []  # callables(event, name) after each change: persistence, logs

    # -- reading --------------------------------------------------------------------------------------
    def __iter__(self):
        return iter(list(self._runtimes.values()))

    def __len__(self):
        return len(self._runtimes)

    def __contains__(self, name):
        return name in self._runtimes

    def get(self, name):
        """-> the ProxyRuntime named *name*; raises ProxyNotFound."""
        try:
            return self._runtimes[name]
        except KeyError:
            raise ProxyNotFound(f"DBProxy {name} not found.") from None

    def name_taken(self, name):
        """Is *name* used by a running proxy or one still draining after its deletion?"""
        return name in self._runtimes or name in self._deleting

    def contexts(self):
        """The ProxyContexts of the running proxies (metrics read these at scrape time)."""
        return [r.ctx for r in self._runtimes.values()]

    def proxies(self):
        """-> tuple of the DBProxy configs the proxies run with now."""
        return tuple(r.config for r in self._runtimes.values())

    # -- twistd ----------------------------------------------------------------------------------------
    def privilegedStartService(self):
        super().privilegedStartService()
        for runtime in self._runtimes.values():
            runtime.bind()

    def startService(self):
        for runtime in self._runtimes.values():
            runtime.bind()
        super().startService()
        for runtime in self._runtimes.values():
            runtime.start()

    def stopService(self):
        super().stopService()
        runtimes = list(self._runtimes.values())
        return defer.DeferredList([r.stop(self.drain_timeout) for r in runtimes]).addCallback(
            lambda _: None)

    # -- changes ---------------------------------------------------------------------------------------
    def _notify(self, event, name):
        for observer in list(self.observers):
            try:
                observer(event, name)
            except Exception:
                log.failure("registry observer failed on {event} {name}", event=event, name=name)

    def add_proxy(self, proxy):
        """Build a proxy from *proxy* (a validated DBProxy) and, when the registry is running,
        start it listening.  -> its ProxyRuntime.

        Raises ProxyAlreadyExists, or ListenFailed (nothing is kept then)."""
        if proxy.name in self._runtimes or proxy.name in self._deleting:
            raise ProxyAlreadyExists(f"DBProxy {proxy.name} already exists.")
        runtime = ProxyRuntime(proxy, self.secrets, self.reactor, self.cancel_registry, self.metrics)
        runtime.drain_timeout = self.drain_timeout
        runtime.ctx.iam = self.iam
        if self.running:
            try:
                runtime.start()
            except ListenFailed:
                runtime.ctx.pool.shutdown()
                raise
        self._runtimes[proxy.name] = runtime
        self._notify("add", proxy.name)
        return runtime

    def remove_proxy(self, name, drain_timeout=None):
        """Stop listening at once, then end the proxy's sessions (see ProxyRuntime.stop) and close
        its pool.  -> Deferred[None] when its sessions are gone.  Raises ProxyNotFound.

        The name is free for a new proxy once the Deferred has fired."""
        runtime = self.get(name)
        del self._runtimes[name]
        self._deleting[name] = runtime
        self._notify("remove", name)
        d = runtime.stop(self.drain_timeout if drain_timeout is None else drain_timeout)
        d.addBoth(lambda r: self._deleting.pop(name, None) and r)
        return d

    def replace_proxy(self, name, new):
        """Make proxy *name* run with the DBProxy *new* (which may carry a new name).

        -> the ProxyRuntime.  Raises ProxyNotFound, ProxyAlreadyExists (the new name is taken),
        InvalidChange (EngineFamily), ListenFailed (a new Listen could not be bound; nothing
        changed)."""
        runtime = self.get(name)
        if new.name != name and (new.name in self._runtimes or new.name in self._deleting):
            raise ProxyAlreadyExists(f"DBProxy {new.name} already exists.")
        changes = runtime.apply(new)
        if new.name != name:
            self._runtimes = {(new.name if k == name else k): v for k, v in self._runtimes.items()}
        if changes:
            self._notify("modify", new.name)
        return runtime

    def modify_proxy(self, proxy_name, /, **changes):
        """replace_proxy with some DBProxy fields changed (model field names: name= renames,
        auth=, require_tls=, idle_client_timeout=, debug_logging=, ...)."""
        return self.replace_proxy(proxy_name,
                                  dataclasses.replace(self.get(proxy_name).config, **changes))

    def _group(self, name, group_name):
        runtime = self.get(name)
        group = runtime.config.target_group
        if group_name is not None and group_name != group.name:
            raise TargetGroupNotFound(f"DBProxy {name} has no target group {group_name}.")
        return runtime, group

    def modify_target_group(self, name, group_name=None, connection_pool_config=None, new_name=None):
        """Change the target group's ConnectionPoolConfig and/or name.  -> ProxyRuntime."""
        runtime, group = self._group(name, group_name)
        changes = {}
        if connection_pool_config is not None:
            changes["connection_pool_config"] = connection_pool_config
        if new_name is not None:
            changes["name"] = new_name
        new_group = dataclasses.replace(group, **changes)
        return self.replace_proxy(name, dataclasses.replace(runtime.config, target_group=new_group))

    def register_targets(self, name, targets, group_name=None):
        """Add *targets* (DBProxyTarget) to the proxy's target group; each is probed and joins.
        Raises TargetAlreadyRegistered when one (by RdsResourceId) is there already."""
        runtime, group = self._group(name, group_name)
        ids = {t.rds_resource_id for t in group.targets}
        for target in targets:
            if target.rds_resource_id in ids:
                raise TargetAlreadyRegistered(
                    f"DBProxy {name} target {target.rds_resource_id} is already registered.")
            ids.add(target.rds_resource_id)
        new_group = dataclasses.replace(group, targets=group.targets + tuple(targets))
        return self.replace_proxy(name, dataclasses.replace(runtime.config, target_group=new_group))

    def deregister_targets(self, name, rds_resource_ids, group_name=None):
        """Remove targets by RdsResourceId.  Raises TargetNotFound for an unknown one and
        InvalidChange when no target would remain."""
        runtime, group = self._group(name, group_name)
        known = {t.rds_resource_id for t in group.targets}
        for rid in rds_resource_ids:
            if rid not in known:
                raise TargetNotFound(f"DBProxy {name} has no registered target {rid}.")
        left = tuple(t for t in group.targets if t.rds_resource_id not in set(rds_resource_ids))
        if not left:
            raise InvalidChange(f"DBProxy {name}: a target group must keep at least one target.")
        new_group = dataclasses.replace(group, targets=left)
        return self.replace_proxy(name, dataclasses.replace(runtime.config, target_group=new_group))

    def reload_security(self, config):
        """The security part of a reload (security's hook): new IAM principals and policies, and
        the secrets store told every SecretArn the config names, so a remote store loads a new
        Auth entry's secret before its first login (`ISecretsStore.watch`)."""
        if self.iam is not None:
            self.iam.update(config.iam)
        self.secrets.watch(config_secret_arns(config))

    def apply_config(self, config, drain_timeout=None, strict=False):
        """Make the registry run exactly the proxies of *config* (a validated Config): proxies
        only in *config* are added, proxies not in it removed, the others changed in place
        (an EngineFamily change replaces the proxy).  -> Deferred[[str]], one line per change.

        Add and change failures (a port that cannot be bound) do not stop the others; they
        are in the lines and logged.  *strict* (True, or the names of the proxies a change is
        about) raises such a failure instead: for a change of one proxy that means nothing
        changed, and a proxy of the file that cannot start does not block changes to others.  Removed proxies' drains are waited
        for."""
        lines, removals = [], []
        self.reload_security(config)
        wanted = {p.name: p for p in config.proxies}
        # A proxy under a new name with the resource id of a running one is that proxy renamed
        # (ModifyDBProxy NewDBProxyName writes DBProxyResourceId, so the ARN stays).
        by_resource = {getattr(r.config, "resource_id", ""): name for name, r in self._runtimes.items()}
        for proxy in config.proxies:
            old = by_resource.get(getattr(proxy, "resource_id", "") or None)
            if (old is not None and proxy.name not in self._runtimes and old not in wanted
                    and self._runtimes[old].config.engine_family == proxy.engine_family):
                try:
                    self.replace_proxy(old, proxy)
                    lines.append(f"renamed proxy {old} to {proxy.name}")
                except RegistryError as e:
                    if _strict(strict, proxy.name):
                        raise
                    lines.append(f"FAILED proxy {proxy.name}: {e}")
        for name in list(self._runtimes):
            if name not in wanted:
                removals.append(self.remove_proxy(name, drain_timeout))
                lines.append(f"removed proxy {name}")
        for proxy in config.proxies:
            try:
                if proxy.name not in self._runtimes:
                    self.add_proxy(proxy)
                    lines.append(f"added proxy {proxy.name}")
                    continue
                runtime = self._runtimes[proxy.name]
                if runtime.config.engine_family != proxy.engine_family:
                    lines.append(f"replaced proxy {proxy.name} (EngineFamily changed)")
                    d = self.remove_proxy(proxy.name, drain_timeout)
                    removals.append(d)
                    # the name is free once the old one is gone
                    d.addCallback(lambda _, p=proxy: self.add_proxy(p))
                    continue
                before = runtime.config
                self.replace_proxy(proxy.name, proxy)
                changed = [f.name for f in dataclasses.fields(model.DBProxy)
                           if getattr(before, f.name) != getattr(runtime.config, f.name)]
                if changed:
                    lines.append(f"changed proxy {proxy.name}: {', '.join(changed)}")
            except RegistryError as e:
                if _strict(strict, proxy.name):
                    raise
                log.error("cannot apply proxy {name}: {error}", name=proxy.name, error=str(e))
                lines.append(f"FAILED proxy {proxy.name}: {e}")
        d = defer.DeferredList(removals, consumeErrors=True)
        d.addCallback(lambda _: lines)
        return d
