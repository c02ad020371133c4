"""The composition root: every object is built here from the configuration.

This is the only module that imports the global reactor (through `make_service`'s default);
library classes receive the clock and reactor they use.  The proxies themselves live in a
`runtime.ProxyRegistry`, which can add, change and remove them while the process runs.
"""

import os

from twisted.application import service
from twisted.logger import Logger
from twisted.web import server

from txrdsproxy.admin.operations import RdsApi
from txrdsproxy.admin.query import ApiAuthenticator, QueryResource
from txrdsproxy.admin.reload import ReloadResource
from txrdsproxy.admin.resources import admin_root
from txrdsproxy.config.store import ConfigStore
from txrdsproxy.control import ProxyControl
from txrdsproxy.auth.iam import DbTokenVerifier, PrincipalStore
from txrdsproxy.auth.secrets import build_secrets_store, config_secret_arns
from txrdsproxy.metrics import Metrics
from txrdsproxy.registry import ProxyRegistry
from txrdsproxy.runtime import (  # noqa: F401  (re-exported: older imports use service.*)
    ListenFailed, bind_now, build_monitor, build_proxy)

log = Logger()


class AdminService(service.Service):
    """The admin listener (management API, /metrics, /healthz); `.port` once listening.

    Under twistd it binds in privilegedStartService and raises there when it cannot, so a busy
    admin port stops the start-up (as strports.service does); started directly, it binds in
    startService and logs a failure.
    """

    def __init__(self, site, listen, reactor):
        self.site, self.listen, self.reactor = site, listen, reactor
        self.port = None

    def _bind(self):
        if self.port is None:
            self.port = bind_now(self.listen, self.site, self.reactor, "admin API")
            log.info("admin API listening on {addr}", addr=self.port.getHost())

    def privilegedStartService(self):
        super().privilegedStartService()
        self._bind()

    def startService(self):
        super().startService()
        try:
            self._bind()
        except ListenFailed as e:
            log.error("{error}", error=str(e))

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def state_directory(config, config_path=None):
    """-> the folder of the fencing state file (failover/fencing.py): StateDirectory, else the
    configuration file's folder; None when there is neither (an embedded configuration: the
    fencing is kept in memory only)."""
    if config.state_directory:
        return config.state_directory
    path = config_path or (config.source if os.path.isfile(config.source) else None)
    return os.path.dirname(os.path.abspath(path)) if path else None


def fence_store(config, config_path=None):
    """-> the FenceStore of this configuration, or None (see state_directory)."""
    from txrdsproxy.failover.fencing import FenceStore
    directory = state_directory(config, config_path)
    return FenceStore.in_directory(directory) if directory else None


def make_service(config, reactor=None, config_path=None, secrets=None, worker=None):
    """-> (MultiService, [ProxyContext]) for a validated Config.

    The MultiService has `.registry` (the ProxyRegistry of the proxies), `.control` (the
    ProxyControl every change goes through), `.admin` (the AdminService or None), `.secrets`,
    `.principals` and `.metrics`.  *config_path* (default: the file the Config was read from,
    when it exists) is the file API changes are written to; without one they live in memory.
    The contexts list is the proxies' at start.

    *worker*: a workers.WorkerIdentity when this process is one of `Workers: N` (worker.py):
    listeners are bound with SO_REUSEPORT, session ids and pool caps are the worker's, and the
    admin site (the parent's private view of this worker) reads the client address the parent
    forwards."""
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    if secrets is None:  # embed.py passes the application's own ISecretsStore
        secrets = build_secrets_store(config.secrets, reactor)
    if isinstance(secrets, service.Service):  # the aws store's background refresh
        secrets.setServiceParent(top)
    metrics = Metrics()
    registry = ProxyRegistry(reactor, secrets, metrics, drain_timeout=config.drain_timeout)
    if worker is not None:
        from txrdsproxy.workers.listen import worker_binder
        registry.worker, registry.binder = worker, worker_binder(worker)
    registry.fence_store = fence_store(config, config_path)
    registry.iam = DbTokenVerifier(PrincipalStore(config.iam, secrets), reactor,
                                   config.iam.max_concurrent_authentications)
    secrets.watch(config_secret_arns(config))
    for proxy in config.proxies:
        registry.add_proxy(proxy)
    registry.setServiceParent(top)
    top.registry = registry
    path = config_path or (config.source if os.path.isfile(config.source) else None)
    store = ConfigStore(path) if path else None
    if store is not None:
        store.load()
        for line in store.contradictions(store.document):
            log.warn("start: the file undoes an API change: {line}", line=line)
    control = ProxyControl(registry, config, store)
    top.control = control
    top.secrets = secrets  # ISecretsStore
    top.principals = PrincipalStore(config.iam, secrets)  # IAM: tokens and management API SigV4

    def principals():
        if top.principals_config is not control.config.iam:  # reloaded: new principals
            top.principals = PrincipalStore(control.config.iam, registry.secrets)
            top.principals_config = control.config.iam
        return top.principals

    top.principals_config = config.iam
    top.admin = None
    if config.admin.listen:
        authenticator = ApiAuthenticator(principals, lambda: control.config, reactor)
        query = QueryResource(RdsApi(control), authenticator)
        root = admin_root(metrics, registry, query)
        root.putChild(b"reload", ReloadResource(control, authenticator))
        from txrdsproxy.admin.console import ConsolePage
        root.putChild(b"console", ConsolePage(registry, metrics, reactor))
        site = server.Site(root)
        site.noisy = False
        if worker is not None:
            from txrdsproxy.workers.admin import ForwardedRequest
            site.requestFactory = ForwardedRequest
            site.log = lambda request: None  # the supervisor logs the client's request
        top.admin = AdminService(site, config.admin.listen, reactor)
        top.admin.setServiceParent(top)
    top.metrics = metrics
    return top, registry.contexts()
