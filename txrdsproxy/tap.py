"""twistd plugin glue: `twistd -n rdsproxy --config FILE [--check-config]`."""

import sys

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


def makeService(options):
    from txrdsproxy.service import make_service
    top, _ = make_service(options.loaded)
    return top
