"""The composition root: every object is built here from the configuration.

This is the only module that imports the global reactor (through `make_service`'s default);
library classes receive the clock and reactor they use.  The proxies themselves live in a
`runtime.ProxyRegistry`, which can add, change and remove them while the process runs.
"""

from twisted.application import service
from twisted.logger import Logger
from twisted.web import server

from txrdsproxy.admin.resources import admin_root
from txrdsproxy.auth.iam import PrincipalStore
from txrdsproxy.auth.secrets import build_secrets_store
from txrdsproxy.metrics import Metrics
from txrdsproxy.runtime import (  # noqa: F401  (re-exported: older imports use service.*)
    ListenFailed, ProxyRegistry, bind_now, build_monitor, build_proxy)

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


def make_service(config, reactor=None):
    """-> (MultiService, [ProxyContext]) for a validated Config.

    The MultiService has `.registry` (the ProxyRegistry of the proxies), `.admin` (the
    AdminService or None) and `.metrics`.  The contexts list is the proxies' at start."""
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    secrets = build_secrets_store(config.secrets, reactor)
    metrics = Metrics()
    registry = ProxyRegistry(reactor, secrets, metrics)
    for proxy in config.proxies:
        registry.add_proxy(proxy)
    registry.setServiceParent(top)
    top.registry = registry
    top.admin = None
    if config.admin.listen:
        site = server.Site(admin_root(metrics, registry))
        site.noisy = False
        top.admin = AdminService(site, config.admin.listen, reactor)
        top.admin.setServiceParent(top)
    top.secrets = secrets  # ISecretsStore
    top.principals = PrincipalStore(config.iam, secrets)  # IAM: tokens and management API SigV4
    top.metrics = metrics
    return top, registry.contexts()
