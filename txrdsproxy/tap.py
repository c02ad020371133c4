"""twistd plugin glue: `twistd -n rdsproxy --config FILE [--check-config]`."""

import sys

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from txrdsproxy.auth.secrets import check_secrets
from txrdsproxy.config.load import ConfigError, load_config


class Options(usage.Options):
    optParameters = [["config", "c", "etc/rdsproxy.yaml", "The proxy configuration file (YAML)."]]
    optFlags = [["check-config", None, "Validate the configuration and exit (status 0 or 1)."]]

    def postOptions(self):
        try:
            self.loaded = load_config(self["config"])
        except ConfigError as e:
            sys.stderr.write(f"rdsproxy: configuration error: {e}\n")
            raise SystemExit(1)
        problems = check_secrets(self.loaded)
        if problems:
            for problem in problems:
                sys.stderr.write(f"rdsproxy: configuration error: {problem}\n")
            raise SystemExit(1)
        if self["check-config"]:
            names = ", ".join(p.name for p in self.loaded.proxies)
            sys.stdout.write(f"{self['config']}: OK ({len(self.loaded.proxies)} proxies: {names})\n")
            raise SystemExit(0)


log = Logger()


class StartupGuard(service.MultiService):
    """Makes a failed start loud: twistd binds every port in privilegedStartService (before
    dropping privileges); when one cannot be bound, the address and the OS error are logged as
    critical and twistd exits with status 1 (before: an unhandled Deferred error and a process
    that served nothing).

    In the foreground (`-n`) the exit is a plain SystemExit(1), without a traceback; as a daemon
    the error is re-raised so that twistd removes its PID file and its waiting parent prints
    the message and exits 1.
    """

    def __init__(self, foreground=True):
        super().__init__()
        self.foreground = foreground

    def privilegedStartService(self):
        from txrdsproxy.service import ListenFailed
        try:
            super().privilegedStartService()
        except (ListenFailed, CannotListenError) as e:
            log.critical("rdsproxy: cannot start: {error}", error=str(e))
            if self.foreground:
                raise SystemExit(1)
            raise


class SignalHandlers(service.Service):
    """SIGHUP reloads; SIGTERM drains and exits 0.

    - SIGHUP: re-read the configuration file and the secrets and apply the difference, as
      `rdsproxy reload` does (control.ProxyControl.reload); an invalid file changes nothing and
      is logged with its key path.
    - SIGTERM: stop the reactor ourselves instead of through Twisted's handler, which would make
      twistd re-raise the signal after the orderly stop (exit status -15).  The stop is the
      same: every service stops, and the proxies drain (runtime.ProxyRegistry.stopService:
      stop accepting, open transactions finish within DrainTimeout, idle clients get the
      server's shutdown error) before the process exits 0.

    The handlers are installed once the reactor runs (after its own)."""

    def __init__(self, control, reactor):
        self.control, self.reactor = control, reactor

    def startService(self):
        super().startService()
        self.reactor.callLater(0, self._install)

    def _install(self):
        import signal
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        signal.signal(signal.SIGTERM, lambda *_: self.reactor.callFromThread(self.terminate))

    def reload(self):
        log.info("Received SIGHUP, reloading the configuration.")
        d = self.control.reload()
        d.addErrback(lambda f: log.error("reload refused, nothing changed: {error}",
                                         error=f.getErrorMessage()))
        return d

    def terminate(self):
        log.info("Received SIGTERM, draining and shutting down.")
        if self.reactor.running:
            self.reactor.stop()


def makeService(options):
    from twisted.internet import reactor

    from txrdsproxy import fastpoll
    fastpoll.install(reactor)  # socket events without the legacy log context (fastpoll's doc)
    parent = getattr(options, "parent", None)  # twistd's ServerOptions, when run by twistd
    guard = StartupGuard(foreground=bool(parent["nodaemon"]) if parent is not None else True)
    if options.loaded.workers > 1:
        return _workers_service(options, reactor, guard)
    from txrdsproxy.embed import EmbeddedProxies
    # The same construction an application embedding the proxy uses; twistd starts and stops
    # the service itself (privileges, daemonizing, signals).
    proxies = EmbeddedProxies(options.loaded, admin=bool(options.loaded.admin.listen),
                              config_path=options["config"], reactor=reactor)
    top = proxies.service
    top.setServiceParent(guard)
    SignalHandlers(top.control, reactor).setServiceParent(guard)
    return guard


def _workers_service(options, reactor, guard):
    """`Workers: N` > 1: this process supervises N worker processes (txrdsproxy/workers/) and
    serves the admin endpoint for all of them; it holds no pool and no client itself."""
    from txrdsproxy.service import AdminService
    from txrdsproxy.workers.admin import parent_admin_site
    from txrdsproxy.workers.supervisor import WorkerSupervisor
    config = options.loaded
    supervisor = WorkerSupervisor(config, options["config"], reactor)
    supervisor.setServiceParent(guard)
    if config.admin.listen:
        AdminService(parent_admin_site(supervisor), config.admin.listen, reactor).setServiceParent(guard)
    SignalHandlers(supervisor, reactor).setServiceParent(guard)
    return guard
