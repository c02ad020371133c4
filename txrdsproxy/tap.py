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


def makeService(options):
    from txrdsproxy.service import make_service
    top, _ = make_service(options.loaded)
    parent = getattr(options, "parent", None)  # twistd's ServerOptions, when run by twistd
    guard = StartupGuard(foreground=bool(parent["nodaemon"]) if parent is not None else True)
    top.setServiceParent(guard)
    return guard
