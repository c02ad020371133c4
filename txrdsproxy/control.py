"""Every change to the proxies goes through `ProxyControl`: the management API, a reload (SIGHUP,
`rdsproxy reload`) and `rdsproxy deploy` alike.

A change is an edit of the configuration *document* (the YAML file's content, RDS key names).
The edited document is validated as a whole by the same loader as at start, the running
registry is made to match it (`ProxyRegistry.apply_config`: add, change in place, remove), and
only then is it written to the file (config/store.py: atomic, comments kept, journalled).  When
the file cannot be written the running proxies are put back as they were and the change fails:
what runs and what the file says never part.
"""

import copy
import re

from twisted.internet import defer
from twisted.logger import Logger

from txrdsproxy.config.load import ConfigError, parse_config
from txrdsproxy.config.store import ConfigConflict, plain
from txrdsproxy.runtime import ProxyNotFound, RegistryError, TargetGroupNotFound

log = Logger()


def proxy_path(name, key=None):
    """The journal's key path of a proxy (or one of its keys): stable when items move."""
    base = f"DBProxies[DBProxyName={name}]"
    return base if key is None else f"{base}.{key}"


class ProxyControl:
    """Applies document edits to the registry and the file (see the module docstring).

    *registry*: the runtime.ProxyRegistry; *config*: the Config it runs; *store*: the
    config.store.ConfigStore of the file (None: changes live in memory only, for embedding);
    *document*: the document when there is no store.
    """

    def __init__(self, registry, config, store=None, document=None):
        self.registry = registry
        self.config = config
        self.store = store
        if store is not None and store.document is None:
            store.load()
        self._document = document if document is not None else {}
        self._busy = None  # the Deferred of a change under way (changes are applied one at a time)

    @property
    def document(self):
        return self.store.document if self.store is not None else self._document

    # -- reading ------------------------------------------------------------------------------------
    def db_instance(self, identifier):
        """-> the DBInstance of the catalog (config DBInstances) or of a target some proxy has."""
        for inst in self.config.db_instances:
            if inst.identifier == identifier:
                return inst
        for proxy in self.registry.proxies():
            for target in proxy.target_group.targets:
                if target.rds_resource_id == identifier:
                    from txrdsproxy.config.model import DBInstance
                    return DBInstance(identifier, target.endpoint, target.port)
        return None

    # -- changing -----------------------------------------------------------------------------------
    def change(self, operation, edit, paths=None):
        """Apply *edit* (document -> None, may raise RegistryError/ConfigError) as *operation*.

        -> the new Config (synchronously: the listeners are bound, the pools reconfigured; a
        removed proxy's sessions drain in the background).  Raises ConfigConflict, ConfigError
        (the result is not valid), RegistryError (cannot be applied: nothing changed) or
        OSError (the file cannot be written: nothing changed)."""
        if self.store is not None:
            document, config = self.store.prepare(edit)
        else:
            document = copy.deepcopy(self._document)
            edit(document)
            config = parse_config(plain(document), self.config.source, ".")
        before = self.config
        old = {p.name: p for p in before.proxies}
        new = {p.name: p for p in config.proxies}
        affected = {n for n in set(old) | set(new) if old.get(n) != new.get(n)}
        self._apply(config, strict=affected)
        self._record_bound_ports(document)
        try:
            if self.store is not None:
                self.store.commit(document, operation, paths(document) if callable(paths) else (paths or {}))
            else:
                self._document = document
        except OSError as e:
            log.error("cannot write {path}: {error}; undoing {operation}",
                      path=self.store.source, error=e.strerror or str(e), operation=operation)
            self._apply(before, strict=False)
            raise
        self.config = config
        return config

    def _apply(self, config, strict):
        self.registry.drain_timeout = config.drain_timeout
        for runtime in self.registry:
            runtime.drain_timeout = config.drain_timeout
        lines = []
        d = self.registry.apply_config(config, strict=strict)
        d.addCallback(lines.extend)
        return lines

    def _record_bound_ports(self, document):
        """A proxy told to listen on port 0 got a free port: write that port into the document,
        so a restart listens where clients were told to connect."""
        for item in document.get("DBProxies") or []:
            name = item.get("DBProxyName")
            if name in self.registry and item.get("Listen") != self.registry.get(name).config.listen:
                item["Listen"] = self.registry.get(name).config.listen
            if name in self.registry:
                running = {e.name: e.listen for e in self.registry.get(name).config.endpoints}
                for endpoint in item.get("Endpoints") or []:
                    listen = running.get(endpoint.get("DBProxyEndpointName"))
                    if listen is not None and endpoint.get("Listen") != listen:
                        endpoint["Listen"] = listen

    def reload(self):
        """Re-read the file and apply the difference (SIGHUP, `rdsproxy reload`).

        -> Deferred[[str]]: what changed, what failed, and the API changes the file undid.  An
        invalid file changes nothing: the Deferred fails with ConfigError (file and key path)."""
        if self.store is None:
            return defer.succeed(["no configuration file: nothing to reload"])
        try:
            document, config, digest = self.store.read()
        except ConfigError as e:
            log.error("reload: {error}; nothing changed", error=str(e))
            return defer.fail(e)
        problems = self._check_secrets(config)
        if problems:
            log.error("reload: {error}; nothing changed", error=problems[0])
            return defer.fail(ConfigError(problems[0]))
        undone = self.store.contradictions(document)
        for line in undone:
            log.warn("reload: {line}", line=line)
        self.registry.drain_timeout = config.drain_timeout
        self._reload_secrets(config)
        d = self._watch_secrets(config)
        d.addCallback(lambda _: self.registry.apply_config(config))

        def applied(lines):
            for runtime in self.registry:
                runtime.drain_timeout = config.drain_timeout
            self._record_bound_ports(document)
            self.store.adopt(document, digest)
            self.config = config
            out = lines + [f"the file undoes an API change: {line}" for line in undone]
            log.info("reload: {n} change(s){lines}", n=len(lines),
                     lines="".join(f"\n  {line}" for line in out))
            return out

        return d.addCallback(applied)

    def _check_secrets(self, config):
        try:
            from txrdsproxy.auth.secrets import check_secrets
        except ImportError:
            return []
        return check_secrets(config)

    def _reload_secrets(self, config):
        """A changed `Secrets` section takes effect for every proxy: a new store replaces the
        old one (an unchanged section keeps the store, which re-reads its file by itself)."""
        if config.secrets == self.config.secrets:
            return
        from txrdsproxy.auth.secrets import build_secrets_store
        new = build_secrets_store(config.secrets, self.registry.reactor)
        self.registry.secrets = new
        for ctx in self.registry.contexts():
            ctx.secrets = new
        log.info("reload: secrets store replaced ({backend})", backend=config.secrets.backend)

    def _watch_secrets(self, config):
        """Tell the secrets store which secrets the configuration names now (a remote store
        fetches the new ones before the change is applied).  -> Deferred."""
        watch = getattr(self.registry.secrets, "watch", None)
        if watch is None:
            return defer.succeed(None)
        arns = {a.secret_arn for p in config.proxies for a in p.auth}
        for principal in getattr(getattr(config, "iam", None), "principals", ()):
            arns.update(k.secret_arn for k in principal.access_keys)
        return defer.maybeDeferred(watch, sorted(arns))


# -- document edits (RDS key names) ------------------------------------------------------------------

def find_proxy(document, name):
    for item in document.get("DBProxies") or []:
        if item.get("DBProxyName") == name:
            return item
    raise ProxyNotFound(f"DBProxy {name} not found.")


def find_group(document, name, group_name=None):
    proxy = find_proxy(document, name)
    groups = proxy.get("TargetGroups") or []
    if not groups:
        raise TargetGroupNotFound(f"DBProxy {name} has no target group.")
    group = groups[0]
    if group_name is not None and group_name != group.get("TargetGroupName", "default"):
        raise TargetGroupNotFound(f"DBProxy {name} has no target group {group_name}.")
    return group


PORT_ZERO = re.compile(r"^(tcp6?):0(?=:|$)")


__all__ = ["ProxyControl", "ConfigConflict", "ConfigError", "RegistryError", "find_proxy",
           "find_group", "proxy_path"]
