"""A proxy's extra endpoints (`Endpoints`, the RDS API's DBProxyEndpoint) at run time.

The proxy's own `Listen` is its default endpoint (READ_WRITE, not listed here).  Each entry of
`Endpoints` listens on an address of its own with the proxy's frontend; a session accepted there
carries its `EndpointRuntime` (`session.endpoint`) and, for a READ_ONLY endpoint, the endpoint's
ReaderRouter as `session.route`: its borrows go to the replicas of the reader set
(failover/readers.py) instead of the writer's pool.

The reader set and the replica pools are per proxy (`ctx.readers`, `ctx.replica_pools`), shared
by its READ_ONLY endpoints; `wire_readers` builds them and `EndpointSet` follows config changes
(an added endpoint listens at once, a removed one stops listening and its sessions end at their
next transaction boundary, a changed one is replaced the same way; the others are untouched).
"""

import dataclasses
import re

from twisted.internet import protocol
from twisted.logger import Logger

from txrdsproxy.config import model
from txrdsproxy.failover.checks import HealthChecks
from txrdsproxy.failover.readers import ReaderRouter, ReaderSet
from txrdsproxy.pool.janitor import PoolJanitor
from txrdsproxy.pool.targets import TargetPools

log = Logger()

_PORT_ZERO = re.compile(r"^(tcp6?):0(?=:|$)")


class EndpointFactory(protocol.Factory):
    """The proxy's frontend factory, marking each session with the endpoint it came in by."""

    noisy = False

    def __init__(self, inner, endpoint):
        self.inner = inner
        self.endpoint = endpoint

    def buildProtocol(self, addr):
        proto = self.inner.buildProtocol(addr)
        if proto is not None:
            proto.endpoint = self.endpoint
            proto.route = self.endpoint.router
        return proto


class EndpointRuntime:
    """One running DBProxyEndpoint: its config, listening port and (READ_ONLY) router."""

    def __init__(self, config, ctx, router, clock):
        self.config = config
        self.ctx = ctx
        self.router = router  # None for READ_WRITE: sessions use the proxy's pool
        self.port = None
        self.created = clock.seconds()
        self.status = "creating"

    @property
    def name(self):
        return self.config.name

    def sessions(self):
        return [s for s in self.ctx.sessions if getattr(s, "endpoint", None) is self]

    def bind(self, frontend_factory, reactor, bind_now, with_backlog):
        if self.port is not None:
            return
        self.port = bind_now(with_backlog(self.config.listen),
                             EndpointFactory(frontend_factory(self.ctx), self), reactor,
                             f"proxy {self.ctx.name} endpoint {self.name}")
        number = getattr(self.port.getHost(), "port", None)
        match = _PORT_ZERO.match(self.config.listen)
        if match and number:  # "any free port": from now on the one it got
            listen = self.config.listen
            self.config = dataclasses.replace(
                self.config, listen=f"{match.group(1)}:{number}{listen[match.end():]}")
        self.status = "available"
        log.info("proxy {name} endpoint {endpoint} ({role}) listening on {addr}", name=self.ctx.name,
                 endpoint=self.name, role=self.config.target_role, addr=self.port.getHost())

    def stop_listening(self):
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def wire_readers(ctx, clock, metrics=None):
    """Give *ctx* its reader set and replica pools (used by its READ_ONLY endpoints)."""
    pools = TargetPools(ctx.name, ctx.connector, ctx.config.target_group.connection_pool_config,
                        clock, metrics)

    def probe(target):
        # the monitor's checks (their credentials, HealthCheck), or the same kind without one
        checks = (ctx.monitor.checks if ctx.monitor is not None else None) or HealthChecks(ctx)
        return checks.probe(target)

    def on_left(target, why):
        pools.retire(target, f"left the reader set ({why})")
        end_pinned_on(ctx, target)

    readers = ReaderSet(ctx.topology, ctx.health, clock, ctx.config.max_replica_lag, probe=probe,
                        interval=ctx.config.health_check_interval, on_left=on_left,
                        on_vanished=pools.abandon)
    pools.on_trouble = readers.trouble
    ctx.readers = readers
    ctx.replica_pools = pools
    ctx.replica_janitor = PoolJanitor(pools, clock)
    return readers


def end_pinned_on(ctx, target):
    """Reader sessions pinned to a connection of *target* cannot move: they end (the engine's
    shutdown error) once their transaction is over; unpinned ones move by themselves."""
    pinned = [s for s in ctx.sessions if getattr(s, "route", None) is not None
              and getattr(s, "pin_reason", None) is not None
              and getattr(getattr(s, "lease", None), "conn", None) is not None
              and getattr(s.lease.conn, "target", None) is target]
    if pinned:
        from txrdsproxy.runtime import DEFAULT_DRAIN_TIMEOUT, drain_sessions
        log.info("proxy {name}: ending {n} pinned reader session(s) on {t} after their transactions",
                 name=ctx.name, n=len(pinned), t=target.rds_resource_id)
        drain_sessions(ctx, DEFAULT_DRAIN_TIMEOUT, ctx.clock, pinned)


def attach_monitor(readers, monitor):
    """Feed *readers* from the WriterMonitor's rounds (`round_listeners`); without a monitor
    (one target) the set is what the topology says from the start."""
    if monitor is None:
        readers.mark_known()
        return
    if readers.round_done not in monitor.round_listeners:
        monitor.round_listeners.append(readers.round_done)
    if readers.verdict not in monitor.verdicts:
        monitor.verdicts.append(readers.verdict)
    if readers.vanished not in monitor.vanished_listeners:
        monitor.vanished_listeners.append(readers.vanished)


class EndpointSet:
    """The extra endpoints of one ProxyRuntime, by name."""

    def __init__(self, runtime):
        self.runtime = runtime
        self._endpoints = {}

    def __iter__(self):
        return iter(list(self._endpoints.values()))

    def get(self, name):
        return self._endpoints.get(name)

    def _router(self, config):
        """-> the ReaderRouter of a READ_ONLY endpoint, None for READ_WRITE."""
        if config.target_role != model.READ_ONLY:
            return None
        ctx = self.runtime.ctx
        return ReaderRouter(config.name, ctx.readers, ctx.replica_pools, ctx.pool, ctx.clock,
                            fallback_to_writer=config.fallback_to_writer,
                            borrow_timeout=lambda: ctx.config.target_group
                            .connection_pool_config.connection_borrow_timeout)

    def build(self, config):
        endpoint = EndpointRuntime(config, self.runtime.ctx, self._router(config), self.runtime.ctx.clock)
        self._endpoints[config.name] = endpoint
        return endpoint

    def bind_all(self, frontend_factory, bind_now, with_backlog):
        for endpoint in self._endpoints.values():
            endpoint.bind(frontend_factory, self.runtime.reactor, bind_now, with_backlog)

    def stop_listening(self):
        for endpoint in self._endpoints.values():
            endpoint.stop_listening()

    def configs(self):
        """-> the DBProxyEndpoint configs as running (Listen with the port it got)."""
        return tuple(e.config for e in self._endpoints.values())

    def apply(self, old, new, frontend_factory, bind_now, with_backlog, drain):
        """Follow a change of `Endpoints` from *old* to *new* (tuples of DBProxyEndpoint).

        An endpoint whose address, TargetRole and FallbackToWriter stay is kept as it runs (a
        new name or VPC ids only relabel it: its port and sessions stay).  Others: new ones
        listen now (ListenFailed: nothing changed), removed ones stop listening and their
        sessions end at their next transaction boundary (*drain*), changed ones both."""
        def behaviour(config):
            return (config.listen, config.target_role, config.fallback_to_writer)

        running = {behaviour(e.config): e for e in self._endpoints.values()}
        kept, fresh = {}, []
        for config in new:
            endpoint = running.pop(behaviour(config), None)
            if endpoint is not None:
                kept[config.name] = (endpoint, config)
            else:
                fresh.append(config)
        retired = list(running.values())  # nothing in *new* behaves like them
        taken = {e.config.listen for e in retired}
        bound = self.runtime.port is not None
        for endpoint in retired:  # an address a new endpoint takes over must be free first
            if any(c.listen in taken for c in fresh):
                endpoint.stop_listening()
        built = []
        try:
            for config in fresh:
                endpoint = EndpointRuntime(config, self.runtime.ctx, self._router(config),
                                           self.runtime.ctx.clock)
                built.append(endpoint)
                if bound:
                    endpoint.bind(frontend_factory, self.runtime.reactor, bind_now, with_backlog)
        except Exception:
            for endpoint in built:
                endpoint.stop_listening()
            for endpoint in retired:
                if endpoint.port is None and bound:
                    endpoint.bind(frontend_factory, self.runtime.reactor, bind_now, with_backlog)
            raise
        endpoints = {}
        for config in new:
            if config.name in kept:
                endpoint, config = kept[config.name]
                endpoint.config = dataclasses.replace(config, listen=endpoint.config.listen)
                if endpoint.router is not None:
                    endpoint.router.name = config.name
                endpoints[config.name] = endpoint
            else:
                endpoints[config.name] = next(e for e in built if e.config.name == config.name)
        self._endpoints = endpoints
        for endpoint in retired:
            endpoint.stop_listening()
            endpoint.status = "deleting"
            sessions = endpoint.sessions()
            if sessions:
                drain(sessions)
        return bool(retired or built)
