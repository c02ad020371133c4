"""Run txrdsproxy proxies inside an application: the embedding API.

    from txrdsproxy.embed import EmbeddedProxies

    proxies = EmbeddedProxies({"DBProxies": [{...}]}, secrets={"arn:...": {"username": "app",
                                                                         "password": "..."}})
    await proxies.start()          # or proxies.start().addCallback(...) under Twisted
    host, port = proxies.address("app-pg")
    ...
    await proxies.stop()           # drains: open transactions finish, then every socket closes

What it builds is exactly what `twistd rdsproxy` runs (service.make_service: the runtime
registry of proxies, their pools, monitors and metrics); the twistd plugin is a user of this
module too.  See docs/embedding.md for both worlds (Twisted and asyncio) in full.

- *config*: a dict in the configuration file's shape (`DBProxies`, optional `Secrets`, `Admin`,
  `IAM`, ...), a `config.model.Config`, one `config.model.DBProxy` or a list of them.
- *secrets*: where the proxies' SecretArns are looked up.  None: the configuration's
  `Secrets` section (a file); a path (str / os.PathLike): a secrets file; a mapping
  {SecretArn: {"username": ..., "password": ...}}: held in memory; or any object providing
  `auth.secrets.ISecretsStore` (zope.interface), so an application can plug in its own vault.
  Anything else is refused with TypeError.
- *admin*: no admin listener unless asked (even when the configuration has `Admin`): True for
  the configuration's `Admin.Listen`, or an endpoint string ("tcp:0:interface=127.0.0.1").
- *reactor*: default the global one.  Under Twisted's asyncio reactor (`asyncioreactor.install()`
  before anything imports the reactor), `start()` and `stop()` return asyncio futures (made by
  txaio, the design's bridge), which an `async def` awaits; under any other reactor, Deferreds.

`start()` fires once every proxy listens (with this object); it fails with
`runtime.ListenFailed` naming the address and the OS error when a port cannot be bound.
`stop()` fires once every proxy has drained and closed (DrainTimeout bounds the wait).
Listening addresses are known after start: `addresses()` -> {name: (host, port)}, so a
`Listen: "tcp:0:interface=127.0.0.1"` (port 0) works.
"""

import dataclasses
import os
from collections.abc import Mapping

from twisted.internet import defer

from txrdsproxy.auth.secrets import FileSecretsStore, ISecretsStore, StaticSecretsStore
from txrdsproxy.config import model
from txrdsproxy.config.load import parse_config

__all__ = ["EmbeddedProxies", "build_config", "secrets_store"]


def build_config(config, source="<embedded>", own_secrets=False):
    """-> a validated `model.Config` from any of the forms *config* may take (see the module
    docstring).  Raises config.load.ConfigError naming the key of a bad value.  *own_secrets*:
    the caller brings its secrets store, so a dict needs no `Secrets` section."""
    if isinstance(config, model.Config):
        return config
    if isinstance(config, model.DBProxy):
        config = [config]
    if isinstance(config, (list, tuple)) and all(isinstance(p, model.DBProxy) for p in config):
        return model.Config(secrets=model.SecretsConfig(), proxies=tuple(config), source=source)
    if isinstance(config, Mapping):
        data = dict(config)
        if own_secrets and "Secrets" not in data:
            data["Secrets"] = {"Path": source}  # satisfies validation; never read
            parsed = parse_config(data, source=source)
            return dataclasses.replace(parsed, secrets=model.SecretsConfig())
        return parse_config(data, source=source)
    raise TypeError("config must be a dict in the configuration file's shape, a Config, "
                    f"or DBProxy objects (got {type(config).__name__})")


def secrets_store(secrets, config):
    """-> the ISecretsStore for *secrets* (see the module docstring); None: the configuration's."""
    if secrets is None:
        return None  # service.make_service builds the configuration's own store
    if ISecretsStore.providedBy(secrets):
        return secrets
    if isinstance(secrets, (str, os.PathLike)):
        return FileSecretsStore(os.fspath(secrets))
    if isinstance(secrets, Mapping):
        return StaticSecretsStore(secrets)
    raise TypeError("secrets must be a file path, a mapping {SecretArn: {username, password}} or "
                    f"an object providing ISecretsStore (got {type(secrets).__name__})")


def _async_api(reactor):
    """txaio's API for the world *reactor* lives in: asyncio futures on the asyncio reactor's
    loop, Deferreds otherwise."""
    loop = getattr(reactor, "_asyncioEventloop", None)
    if loop is not None:
        from txaio import aio
        return aio.with_config(loop=loop)
    from txaio import tx
    return tx.with_config()


class EmbeddedProxies:
    """The proxies of one configuration, run inside the caller's process (see the module)."""

    def __init__(self, config, secrets=None, admin=False, reactor=None, config_path=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = build_config(config, own_secrets=secrets is not None)
        listen = None
        if admin is True:
            listen = self.config.admin.listen
            if not listen:
                raise ValueError("admin=True but the configuration has no Admin.Listen")
        elif isinstance(admin, str):
            listen = admin
        elif admin not in (False, None):
            raise TypeError("admin must be False, True or an endpoint string")
        self.config = dataclasses.replace(
            self.config, admin=dataclasses.replace(self.config.admin, listen=listen or ""))
        self.secrets = secrets_store(secrets, self.config)
        from txrdsproxy.service import make_service
        # *config_path*: the file API changes are written to (twistd's --config); embedded
        # proxies without one keep API changes in memory.
        self.service, _ = make_service(self.config, reactor, config_path=config_path,
                                       secrets=self.secrets)
        self.secrets = self.service.secrets  # the ISecretsStore in use
        self._api = _async_api(reactor)
        self._asyncio = getattr(reactor, "_asyncioEventloop", None) is not None
        self._running = False
        self._started_reactor = False

    # -- what the application reads ----------------------------------------------------------------
    @property
    def registry(self):
        """The runtime.ProxyRegistry: add, modify and remove proxies while they run."""
        return self.service.registry

    @property
    def metrics(self):
        return self.service.metrics

    def addresses(self):
        """-> {proxy name: (host, port)} of the listening proxies (after start)."""
        out = {}
        for runtime in self.registry:
            if runtime.port is not None:
                addr = runtime.port.getHost()
                out[runtime.name] = (getattr(addr, "host", None), getattr(addr, "port", None))
        return out

    def address(self, name):
        """-> (host, port) proxy *name* listens on; KeyError when it does not (yet)."""
        return self.addresses()[name]

    @property
    def admin_address(self):
        """(host, port) of the admin listener, or None."""
        admin = self.service.admin
        if admin is None or admin.port is None:
            return None
        addr = admin.port.getHost()
        return addr.host, addr.port

    # -- life ----------------------------------------------------------------------------------------
    def start(self):
        """Bind every proxy's port and start them.  -> Deferred / future firing with self once
        they listen; failing with runtime.ListenFailed (nothing is left listening then)."""
        return self._wrap(self._call(self._start))

    def _start(self):
        if not self._running:
            if self._asyncio and not self.reactor.running:
                # An asyncio application runs the loop itself (run_until_complete, asyncio.run),
                # never reactor.run(): mark the reactor running so its startup work happens,
                # among it the thread pool that resolves database host names.
                self.reactor.startRunning(installSignalHandlers=False)
                self._started_reactor = True
            self._running = True
            try:
                self.service.privilegedStartService()
                self.service.startService()
            except BaseException:
                self._running = False
                self.service.stopService()
                raise
        return self

    def stop(self):
        """Stop accepting, drain (open transactions finish, within DrainTimeout) and close every
        socket.  -> Deferred / future firing with None when done; stopping twice is harmless."""
        return self._wrap(self._call(self._stop))

    def _stop(self):
        if not self._running:
            return None
        self._running = False
        d = defer.maybeDeferred(self.service.stopService)

        def stopped(_):
            if self._started_reactor:
                # Its worker threads would keep the application's process alive at exit.
                self.reactor.getThreadPool().stop()
            return None

        return d.addCallback(stopped)

    def _call(self, fn):
        """Run *fn* in the reactor's thread... which is the caller's in both worlds (asyncio's
        loop is the reactor); -> Deferred of its result."""
        return defer.maybeDeferred(fn)

    def _wrap(self, d):
        api = self._api
        future = api.create_future()
        d.addCallbacks(lambda result: api.resolve(future, result),
                       lambda failure: api.reject(future, failure.value))
        return future
