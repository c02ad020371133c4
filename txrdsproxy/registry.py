"""`ProxyRegistry`: every proxy of the process by name, and the operations that change them live.

The internal API (reactor thread only; see IProxyRegistry and docs/operations.md):

    registry.add_proxy(db_proxy)                -> ProxyRuntime (listening once running)
    registry.remove_proxy(name, drain_timeout)  -> Deferred[None] (fires when its sessions are gone)
    registry.modify_proxy(name, **changes)      -> ProxyRuntime (DBProxy field names)
    registry.modify_target_group(name, connection_pool_config=None, new_name=None)
    registry.register_targets(name, [DBProxyTarget]) / deregister_targets(name, [rds_resource_id])
    registry.replace_proxy(name, db_proxy)      -> ProxyRuntime (the general form of the above)
    registry.apply_config(config)               -> Deferred[[str]]: the difference, as one reload

One proxy at run time is a runtime.ProxyRuntime; the errors are runtime's RegistryError subclasses.
"""

import dataclasses

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from txrdsproxy.auth.secrets import config_secret_arns
from txrdsproxy.config import model
from txrdsproxy.runtime import (
    DEFAULT_DRAIN_TIMEOUT, InvalidChange, ListenFailed, ProxyAlreadyExists, ProxyNotFound,
    ProxyRuntime, RegistryError, TargetAlreadyRegistered, TargetGroupNotFound, TargetNotFound,
    build_monitor)

log = Logger()


def _strict(strict, name):
    return strict is True or (not isinstance(strict, bool) and name in strict)


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
        # `Workers: N` > 1: this process is one worker (workers.WorkerIdentity) and binds its
        # listeners with SO_REUSEPORT (workers/listen.py).  None / bind_now: the only process.
        self.worker = None
        self.binder = None
        self.fence_store = None  # failover.fencing.FenceStore: fencing that survives a restart

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
        if self.worker is not None:
            runtime.ctx.join_worker(self.worker)
        runtime.ctx.fence_store = self.fence_store
        if runtime.ctx.monitor is not None:  # built again, knowing the two above
            runtime.ctx.monitor = build_monitor(runtime.ctx)
        if self.binder is not None:
            runtime.binder = self.binder
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
