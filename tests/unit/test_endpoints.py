"""Endpoints (DBProxyEndpoint) in the configuration and at run time: validation with key paths,
listening, sessions marked with their endpoint and router, live changes (add, rename in place,
remove, a port that cannot be bound), on MemoryReactorClock."""

import pytest
from twisted.internet.error import CannotListenError

from txrdsproxy.config.load import ConfigError
from txrdsproxy.failover.readers import ReaderRouter
from txrdsproxy.runtime import ListenFailed

from test_runtime import Reactor, FakeSecrets, config, listening_ports, proxy  # noqa: F401
from txrdsproxy.registry import ProxyRegistry


def reader(name="p1-ro", port=7432, role="READ_ONLY", **extra):
    return dict({"DBProxyEndpointName": name, "TargetRole": role,
                 "Listen": f"tcp:{port}:interface=127.0.0.1"}, **extra)


TARGETS = (("db-1", 5432), ("db-2", 5433))


def test_endpoints_load_in_the_rds_shape():
    (p,) = config(proxy(targets=TARGETS, MaxReplicaLag=30,
                        Endpoints=[reader(FallbackToWriter=True, VpcSubnetIds=["s-1"]),
                                   reader("p1-rw", 7433, "READ_WRITE")])).proxies
    ro, rw = p.endpoints
    assert (ro.name, ro.target_role, ro.fallback_to_writer, ro.vpc_subnet_ids) == (
        "p1-ro", "READ_ONLY", True, ("s-1",))
    assert (rw.name, rw.target_role, rw.listen) == ("p1-rw", "READ_WRITE", "tcp:7433:interface=127.0.0.1")
    assert p.max_replica_lag == 30.0
    (plain,) = config(proxy()).proxies
    assert plain.endpoints == () and plain.max_replica_lag == 0.0


@pytest.mark.parametrize("endpoints, where, message", [
    ([reader("9bad")], "Endpoints[0].DBProxyEndpointName", "must start with a letter"),
    ([reader("a--b")], "Endpoints[0].DBProxyEndpointName", "single hyphens"),
    ([reader("default")], "Endpoints[0].DBProxyEndpointName", "default endpoint"),
    ([reader(), reader(port=7433)], "Endpoints[1].DBProxyEndpointName", "duplicate"),
    ([reader(), reader("b", 7432)], "Endpoints[1].Listen", "already the Listen"),
    ([reader(port=6432)], "Endpoints[0].Listen", "already the Listen"),
    ([reader(role="WRITER")], "Endpoints[0].TargetRole", "must be one of"),
    ([reader(role="READ_WRITE", FallbackToWriter=True)], "Endpoints[0].FallbackToWriter",
     "READ_ONLY only"),
    ([{"DBProxyEndpointName": "x", "TargetRole": "READ_ONLY"}], "Endpoints[0].Listen", "is required"),
    ([dict(reader(), Colour="red")], "Endpoints[0].Colour", "unknown key"),
])
def test_bad_endpoints_are_refused_with_their_key_path(endpoints, where, message):
    with pytest.raises(ConfigError) as e:
        config(proxy(Endpoints=endpoints))
    assert f"DBProxies[0].{where}:" in str(e.value) and message in str(e.value)


def test_endpoint_names_are_unique_over_every_proxy():
    with pytest.raises(ConfigError, match="taken by another proxy or endpoint"):
        config(proxy("p1", Endpoints=[reader("ro")]), proxy("p2", 6433, Endpoints=[reader("ro", 7433)]))
    with pytest.raises(ConfigError, match="taken by another proxy or endpoint"):
        config(proxy("p1", Endpoints=[reader("p2")]), proxy("p2", 6433))


def test_max_replica_lag_is_bounded():
    with pytest.raises(ConfigError, match="MaxReplicaLag: must be between 0 and 86400"):
        config(proxy(MaxReplicaLag=-1))


@pytest.fixture
def registry():
    reactor = Reactor()
    registry = ProxyRegistry(reactor, FakeSecrets(), drain_timeout=5)
    (p,) = config(proxy(targets=TARGETS, Endpoints=[reader(), reader("p1-rw", 7433, "READ_WRITE")])).proxies
    registry.add_proxy(p)
    registry.startService()
    return registry, reactor


def test_every_endpoint_listens_and_marks_its_sessions(registry):
    registry, reactor = registry
    assert listening_ports(reactor) == [6432, 7432, 7433]
    runtime = registry.get("p1")
    factories = {port: factory for port, factory, *_ in reactor.tcpServers}
    ro = factories[7432].buildProtocol(None)
    rw = factories[7433].buildProtocol(None)
    default = factories[6432].buildProtocol(None)
    assert ro.endpoint is runtime.endpoints.get("p1-ro") and isinstance(ro.route, ReaderRouter)
    assert ro.pool_for(("u", "d")) is ro.route
    assert rw.endpoint is runtime.endpoints.get("p1-rw") and rw.route is None
    assert rw.pool_for(("u", "d")) is runtime.ctx.pool
    assert default.endpoint is None and default.pool_for(("u", "d")) is runtime.ctx.pool


def test_an_endpoint_added_listens_a_removed_one_stops_a_renamed_one_stays(registry):
    registry, reactor = registry
    runtime = registry.get("p1")
    kept = runtime.endpoints.get("p1-ro")
    kept_port = kept.port
    removed_port = runtime.endpoints.get("p1-rw").port
    registry.modify_proxy("p1", endpoints=config(proxy(targets=TARGETS, Endpoints=[
        reader("p1-reader"), reader("p1-new", 7434)])).proxies[0].endpoints)
    assert runtime.endpoints.get("p1-reader") is kept and kept.port is kept_port  # renamed in place
    assert kept.router.name == "p1-reader"
    assert runtime.endpoints.get("p1-rw") is None
    assert removed_port.disconnected and not kept_port.disconnected
    assert 7434 in listening_ports(reactor)
    assert [e.name for e in runtime.config.endpoints] == ["p1-reader", "p1-new"]


def test_an_endpoint_that_cannot_listen_changes_nothing(registry, monkeypatch):
    registry, reactor = registry
    runtime = registry.get("p1")
    before = runtime.config

    def refuse(port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    monkeypatch.setattr(reactor, "listenTCP", refuse)
    with pytest.raises(ListenFailed, match="endpoint p1-more cannot listen on tcp:7439"):
        registry.modify_proxy("p1", endpoints=before.endpoints + config(proxy(
            Endpoints=[reader("p1-more", 7439)])).proxies[0].endpoints)
    assert runtime.config == before
    assert runtime.endpoints.get("p1-more") is None and runtime.endpoints.get("p1-ro").port is not None
