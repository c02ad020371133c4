"""The composition root: every object is built here from the configuration.

This is the only module that imports the global reactor (through `make_service`'s default);
library classes receive the clock and reactor they use.
"""

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from txrdsproxy.admin.resources import admin_root

from txrdsproxy.auth.secrets import FileSecretsStore
from txrdsproxy.config import model
from txrdsproxy.failover.monitor import TargetHealth, WriterMonitor
from txrdsproxy.failover.topology import Topology
from txrdsproxy.metrics import Metrics
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy.pg_backend import PgConnector
from txrdsproxy.proxy.pg_frontend import PgFrontendFactory
from txrdsproxy.proxy.session import ProxyContext
from txrdsproxy.tls import ServerTLS

log = Logger()

JANITOR_INTERVAL = 10.0


class ListenFailed(Exception):
    """A listening endpoint could not be bound; the message names the address and the OS error."""


def bind_now(listen, factory, reactor, what):
    """Bind *listen* (an endpoint string) for *factory* synchronously: -> the listening port.

    Raises ListenFailed("<what> cannot listen on <listen>: <OS error>") when the port cannot be
    bound (in use, no permission, unknown interface).  Endpoints that bind synchronously (TCP,
    UNIX, SSL) answer at once; any other is an error too, since start-up must know now.
    """
    endpoint = strports.service(listen, factory, reactor=reactor).endpoint
    outcome = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise ListenFailed(f"{what} cannot listen on {listen}: the endpoint did not bind at once")
    if isinstance(outcome[0], Failure):
        raise ListenFailed(f"{what} cannot listen on {listen}: {outcome[0].getErrorMessage()}")
    return outcome[0]


class ProxyService(service.Service):
    """One proxy: its listener, its pool and the janitor that trims idle connections.

    The port is bound in privilegedStartService (twistd calls it before dropping privileges, so
    a port below 1024 works with --uid) and a failure raises ListenFailed there: twistd stops
    and exits non-zero with the address and the OS error (see tap.py), instead of running a
    process that serves nothing.  Started directly (tests, a proxy added at run time),
    startService binds and raises the same way.
    """

    def __init__(self, ctx, listen, reactor):
        self.ctx = ctx
        self.listen = listen
        self.reactor = reactor
        self.port = None
        self._janitor = None

    def _bind(self):
        if self.port is None:
            self.port = bind_now(self.listen, self._factory(), self.reactor,
                                 f"proxy {self.ctx.name}")
            log.info("proxy {name} ({engine}) listening on {addr}", name=self.ctx.name,
                     engine=self.ctx.config.engine_family, addr=self.port.getHost())

    def privilegedStartService(self):
        super().privilegedStartService()
        self._bind()

    def startService(self):
        self._bind()
        super().startService()
        self._janitor = self.reactor.callLater(JANITOR_INTERVAL, self._tidy)
        if self.ctx.monitor is not None:
            self.ctx.monitor.start()

    def _factory(self):
        if self.ctx.config.engine_family == model.ENGINE_POSTGRESQL:
            return PgFrontendFactory(self.ctx)
        from txrdsproxy.proxy.mysql_frontend import MySQLFrontendFactory
        return MySQLFrontendFactory(self.ctx)

    def _tidy(self):
        self.ctx.pool.trim_idle()
        self._janitor = self.reactor.callLater(JANITOR_INTERVAL, self._tidy)

    def stopService(self):
        super().stopService()
        if self._janitor is not None and self._janitor.active():
            self._janitor.cancel()
        if self.ctx.monitor is not None:
            self.ctx.monitor.stop()
        self.ctx.pool.shutdown()
        for session in list(self.ctx.sessions):
            session.transport.loseConnection()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class AdminService(service.Service):
    """The admin listener (management API, /metrics, /healthz); `.port` once listening.

    Under twistd it binds in privilegedStartService and raises there when it cannot, so a busy
    admin port stops the start-up (as strports.service does); started directly, it binds in
    startService and logs a failure.
    """

    def __init__(self, site, listen, reactor):
        self.site, self.listen, self.reactor = site, listen, reactor
        self.port = None
        self._bound = None  # the Deferred of the listen() call, once made

    def _bind(self):
        endpoint = strports.service(self.listen, self.site, reactor=self.reactor).endpoint
        self._bound = endpoint.listen(self.site)

        def listening(port):
            self.port = port
            log.info("admin API listening on {addr}", addr=port.getHost())

        return self._bound.addCallback(listening)

    def privilegedStartService(self):
        super().privilegedStartService()
        failures = []
        self._bind().addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    def startService(self):
        super().startService()
        if self._bound is None:
            self._bind().addErrback(lambda f: log.failure("admin listener {listen} failed", f,
                                                          listen=self.listen))

    def stopService(self):
        super().stopService()
        self._bound = None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def build_proxy(proxy, secrets, reactor, cancel_registry, metrics=None):
    """-> ProxyContext for one configured proxy (its pool, connector and shared state)."""
    topology = Topology(proxy.target_group.targets)
    health = TargetHealth(reactor)
    pool_config = proxy.target_group.connection_pool_config
    holder = {}

    def credentials_for(user):
        return holder["ctx"].credentials_for(user)

    timeouts = dict(connect_timeout=proxy.database_connect_timeout,
                    operation_timeout=proxy.database_operation_timeout)
    if proxy.engine_family == model.ENGINE_POSTGRESQL:
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
    ctx.topology = topology
    if proxy.tls is not None:
        ctx.tls = ServerTLS(proxy.tls.certificate_file, proxy.tls.private_key_file, clock=reactor)
    ctx.health = health
    ctx.monitor = build_monitor(proxy, secrets, reactor, topology, health, connector, pool)
    holder["ctx"] = ctx
    return ctx


def build_monitor(proxy, secrets, reactor, topology, health, connector, pool):
    """-> the WriterMonitor of a target group of several targets, wired to its pool; None for
    one target (nothing to fail over to: its connection attempts alone decide its health, as
    before)."""
    if len(topology.targets) < 2:
        return None
    arn = proxy.auth[0].secret_arn

    def probe(target):
        return connector.probe_role(target, secrets.get(arn))

    monitor = WriterMonitor(reactor, topology, health, probe, proxy.health_check_interval,
                            pool=pool, database_errors=connector.database_error,
                            failure_reason=connector.failure_reason)
    pool.failover = monitor
    return monitor


def make_service(config, reactor=None):
    """-> (MultiService, [ProxyContext]) for a validated Config."""
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    secrets = FileSecretsStore(config.secrets.path)
    metrics = Metrics()
    cancel_registry = {}
    contexts = []
    services = []
    for proxy in config.proxies:
        ctx = build_proxy(proxy, secrets, reactor, cancel_registry, metrics)
        contexts.append(ctx)
        svc = ProxyService(ctx, proxy.listen, reactor)
        svc.setServiceParent(top)
        services.append(svc)
    top.admin = None
    if config.admin.listen:
        site = server.Site(admin_root(metrics, services))
        site.noisy = False
        top.admin = AdminService(site, config.admin.listen, reactor)
        top.admin.setServiceParent(top)
    top.contexts = contexts
    top.metrics = metrics
    return top, contexts
