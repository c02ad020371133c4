"""runtime.ProxyRegistry: proxies added, changed and removed while running (MemoryReactorClock:
no sockets, no real time), and the pool's reconfigure / retire_target."""

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport

from txrdsproxy.config.load import parse_config
from txrdsproxy.config.model import ConnectionPoolConfig, DBProxyTarget
from txrdsproxy.registry import ProxyRegistry
from txrdsproxy.runtime import (
    InvalidChange, ListenFailed, ProxyAlreadyExists, ProxyNotFound, ProxyStatus,
    TargetAlreadyRegistered, TargetGroupNotFound, TargetNotFound)

from test_pool import make
from txrdsproxy.testing.deferreds import result

ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"


def config(*proxies):
    return parse_config({"Secrets": {"Path": "s.json"}, "DBProxies": list(proxies)}, "t.yaml", "/tmp")


def proxy(name="p1", port=6432, engine="POSTGRESQL", targets=(("db-1", 5432),), **extra):
    doc = {"DBProxyName": name, "EngineFamily": engine, "Listen": f"tcp:{port}:interface=127.0.0.1",
           "Auth": [{"SecretArn": ARN}],
           "TargetGroups": [{"Targets": [{"RdsResourceId": r, "Endpoint": "127.0.0.1", "Port": p}
                                         for r, p in targets]}]}
    doc.update(extra)
    return doc


class Reactor(MemoryReactorClock):
    """MemoryReactorClock whose listening ports record stopListening (`.disconnected`)."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        fake = super().listenTCP(port, factory, backlog, interface)
        fake.disconnected = False

        def stop():
            fake.disconnected = True
        fake.stopListening = stop
        return fake


class FakeSecrets:
    def __init__(self):
        self.watched = []

    def get(self, arn):
        return None

    def find_user(self, arns, username):
        return None

    def watch(self, arns):
        self.watched.append(list(arns))


@pytest.fixture
def running():
    reactor = Reactor()
    registry = ProxyRegistry(reactor, FakeSecrets(), drain_timeout=5)
    for p in config(proxy("p1", 6432), proxy("p2", 6433, "MYSQL", (("my-1", 3306),))).proxies:
        registry.add_proxy(p)
    registry.startService()
    return registry, reactor


def fired(d):
    """-> a list that gets the Deferred's result when it fires."""
    out = []
    d.addBoth(out.append)
    return out


def listening_ports(reactor):
    return sorted(port for port, *_ in reactor.tcpServers)


def test_the_registry_provides_its_interface(running):
    from zope.interface.verify import verifyObject
    from txrdsproxy import runtime
    from txrdsproxy.registry import IProxyRegistry
    registry, _ = running
    assert verifyObject(IProxyRegistry, registry)
    assert runtime.ProxyRegistry is ProxyRegistry  # the old import path still works


def test_start_binds_every_proxy_and_status_is_available(running):
    registry, reactor = running
    assert listening_ports(reactor) == [6432, 6433]
    assert [r.name for r in registry] == ["p1", "p2"]
    assert all(r.status is ProxyStatus.AVAILABLE for r in registry)
    assert [c.name for c in registry.contexts()] == ["p1", "p2"]


def test_add_proxy_live_listens_and_refuses_a_duplicate(running):
    registry, reactor = running
    runtime = registry.add_proxy(config(proxy("p3", 6434)).proxies[0])
    assert runtime.port is not None and 6434 in listening_ports(reactor)
    assert runtime.status is ProxyStatus.AVAILABLE
    with pytest.raises(ProxyAlreadyExists):
        registry.add_proxy(config(proxy("p3", 6435)).proxies[0])
    assert "p3" in registry


def test_add_proxy_that_cannot_listen_keeps_nothing():
    class Busy(Reactor):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    registry = ProxyRegistry(Busy(), FakeSecrets())
    registry.startService()
    with pytest.raises(ListenFailed) as e:
        registry.add_proxy(config(proxy("p9", 6500)).proxies[0])
    assert "proxy p9 cannot listen on tcp:6500:interface=127.0.0.1" in str(e.value)
    assert "Address already in use" in str(e.value)
    assert "p9" not in registry and len(registry) == 0


def test_privileged_start_raises_listen_failed_for_a_busy_port():
    class Busy(Reactor):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    registry = ProxyRegistry(Busy(), FakeSecrets())
    registry.add_proxy(config(proxy()).proxies[0])
    with pytest.raises(ListenFailed):
        registry.privilegedStartService()


class FakeSession:
    """Stands for a client session: `lease` set = inside a transaction."""

    def __init__(self, ctx, in_transaction=False):
        self.ctx = ctx
        self.transport = StringTransport()
        self.lease = object() if in_transaction else None
        self.busy = False
        ctx.sessions.add(self)

    def drained(self):
        return self.transport.disconnecting


def test_remove_proxy_stops_listening_and_drains_sessions(running):
    registry, reactor = running
    runtime = registry.get("p1")
    port = runtime.port
    ctx = runtime.ctx
    idle, busy = FakeSession(ctx), FakeSession(ctx, in_transaction=True)
    d = fired(registry.remove_proxy("p1", drain_timeout=5))
    assert "p1" not in registry and runtime.status is ProxyStatus.DELETING
    assert port.disconnected  # stopListening was called: new clients are refused
    assert idle.drained() and not busy.drained()  # idle now, the transaction may finish
    with pytest.raises(ProxyAlreadyExists):  # the name is held until the drain ends
        registry.add_proxy(config(proxy("p1", 6440)).proxies[0])
    ctx.sessions.discard(idle)
    reactor.advance(1)
    assert not d and not busy.drained()
    busy.lease = None  # the transaction ended
    reactor.advance(0.1)
    assert busy.drained()
    ctx.sessions.discard(busy)
    reactor.advance(0.1)
    assert d == [None]
    assert ctx.pool._closed
    registry.add_proxy(config(proxy("p1", 6440)).proxies[0])  # the name is free again


def test_drain_timeout_aborts_what_is_left(running):
    registry, reactor = running
    ctx = registry.get("p1").ctx
    busy = FakeSession(ctx, in_transaction=True)
    d = fired(registry.remove_proxy("p1", drain_timeout=2))
    reactor.advance(1.9)
    assert not busy.drained()
    reactor.advance(0.2)
    assert busy.drained()
    ctx.sessions.discard(busy)
    reactor.advance(0.1)
    assert d == [None]


def test_remove_unknown_proxy():
    registry = ProxyRegistry(MemoryReactorClock(), FakeSecrets())
    with pytest.raises(ProxyNotFound):
        registry.remove_proxy("nope")


def test_modify_proxy_renames_and_changes_settings_in_place(running):
    registry, reactor = running
    runtime = registry.get("p1")
    ctx, port = runtime.ctx, runtime.port
    session = FakeSession(ctx)
    registry.modify_proxy("p1", name="renamed", idle_client_timeout=60.0, require_tls=False,
                          debug_logging=True)
    assert registry.get("renamed") is runtime and "p1" not in registry
    assert [r.name for r in registry] == ["renamed", "p2"]  # order kept
    assert ctx.name == ctx.pool.name == ctx.connector.proxy_name == "renamed"
    assert ctx.config.idle_client_timeout == 60.0 and ctx.debug_until > 0
    assert runtime.port is port and not session.drained()  # same listener, session untouched
    with pytest.raises(ProxyAlreadyExists):
        registry.modify_proxy("renamed", name="p2")
    with pytest.raises(InvalidChange):
        registry.modify_proxy("renamed", engine_family="MYSQL")


def test_modify_listen_binds_the_new_address_before_closing_the_old(running):
    registry, reactor = running
    runtime = registry.get("p1")
    old = runtime.port
    session = FakeSession(runtime.ctx)
    registry.modify_proxy("p1", listen="tcp:7000:interface=127.0.0.1")
    assert old.disconnected and runtime.port is not old
    assert 7000 in listening_ports(reactor) and not session.drained()


def test_modify_target_group_reconfigures_the_pool(running):
    registry, _ = running
    ctx = registry.get("p1").ctx
    new = ConnectionPoolConfig(max_connections_percent=40, max_idle_connections_percent=10,
                               connection_borrow_timeout=5.0, init_query="SET x = 1")
    registry.modify_target_group("p1", "default", connection_pool_config=new)
    assert ctx.pool.config is new
    assert ctx.connector.init_query == "SET x = 1"
    assert ctx.config.target_group.connection_pool_config is new
    with pytest.raises(TargetGroupNotFound):
        registry.modify_target_group("p1", "other", connection_pool_config=new)


def test_register_and_deregister_targets(running):
    registry, _ = running
    runtime = registry.get("p1")
    ctx = runtime.ctx
    first = ctx.topology.targets[0]
    assert ctx.monitor is None
    new = DBProxyTarget("db-2", "127.0.0.1", 5433)
    registry.register_targets("p1", [new])
    assert [t.rds_resource_id for t in ctx.topology.targets] == ["db-1", "db-2"]
    assert ctx.topology.targets[0] is first  # unchanged targets keep their identity
    assert ctx.config.target_group.targets == ctx.topology.targets
    assert ctx.monitor is not None and ctx.pool.failover is ctx.monitor  # two targets: health checks
    with pytest.raises(TargetAlreadyRegistered):
        registry.register_targets("p1", [DBProxyTarget("db-2", "127.0.0.1", 5434)])
    with pytest.raises(TargetNotFound):
        registry.deregister_targets("p1", ["db-9"])
    registry.deregister_targets("p1", ["db-1"])
    assert [t.rds_resource_id for t in ctx.topology.targets] == ["db-2"]
    # (the health checks here fail at once: no writer until the next round finds db-2)
    assert ctx.topology.current_writer() in (None, ctx.topology.targets[0])
    with pytest.raises(InvalidChange):
        registry.deregister_targets("p1", ["db-2"])


def test_deregistering_the_writer_moves_it_to_a_remaining_target():
    reactor = Reactor()
    registry = ProxyRegistry(reactor, FakeSecrets())
    registry.add_proxy(config(proxy(targets=(("db-1", 5432), ("db-2", 5433)))).proxies[0])
    ctx = registry.get("p1").ctx  # not started: no health checks ran
    assert ctx.topology.current_writer().rds_resource_id == "db-1"
    registry.deregister_targets("p1", ["db-1"])
    assert ctx.topology.current_writer() is ctx.topology.targets[0]
    assert ctx.topology.targets[0].rds_resource_id == "db-2"
    assert ctx.monitor.last_writer is ctx.topology.targets[0]


def test_apply_config_adds_removes_and_changes(running):
    registry, reactor = running
    p2_ctx = registry.get("p2").ctx
    keep = FakeSession(p2_ctx)
    new = config(proxy("p2", 6433, "MYSQL", (("my-1", 3306),), IdleClientTimeout=99),
                 proxy("p4", 6444))
    lines = result(registry.apply_config(new, drain_timeout=0))
    assert lines == ["removed proxy p1", "changed proxy p2: idle_client_timeout", "added proxy p4"]
    assert [r.name for r in registry] == ["p2", "p4"]
    assert registry.get("p2").ctx is p2_ctx and not keep.drained()
    assert 6444 in listening_ports(reactor)
    assert result(registry.apply_config(new)) == []  # nothing left to do


def test_apply_config_reports_a_port_it_cannot_bind_and_goes_on(running):
    registry, reactor = running
    original = reactor.listenTCP

    def listen(port, factory, backlog=50, interface=""):
        if port == 6555:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return original(port, factory, backlog, interface)

    reactor.listenTCP = listen
    new = config(proxy("p1", 6432), proxy("p2", 6433, "MYSQL", (("my-1", 3306),)),
                 proxy("p5", 6555), proxy("p6", 6556))
    lines = result(registry.apply_config(new))
    assert lines[0].startswith("FAILED proxy p5: proxy p5 cannot listen on tcp:6555")
    assert lines[1] == "added proxy p6"
    assert "p5" not in registry and "p6" in registry


def test_stop_service_drains_everything(running):
    registry, reactor = running
    sessions = [FakeSession(r.ctx) for r in registry]
    d = fired(registry.stopService())
    assert all(s.drained() for s in sessions)
    for s in sessions:
        s.ctx.sessions.discard(s)
    reactor.advance(0.1)
    assert d == [None] and listening_ports(reactor) == [6432, 6433]  # (records of what was bound)
    assert all(r.port is None for r in registry)


# -- the pool's side ----------------------------------------------------------------------------

class Target:
    def __init__(self, name):
        self.rds_resource_id = name


def _with_target(connector, target):
    """Connections the fake connector completes from now on are to *target*."""
    from test_pool import FakeConn

    def complete_with_target(index=0):
        key, d = connector.pending.pop(index)
        conn = FakeConn(key, connector.max)
        conn.target = target
        connector.made.append(conn)
        d.callback(conn)
        return conn

    connector.complete = complete_with_target


def test_pool_reconfigure_lower_cap_closes_idle_now_and_borrowed_on_return():
    pool, connector, clock = make(max_pct=100, idle_pct=100, server_max=10)
    _with_target(connector, Target("t"))
    leases = []
    for _ in range(6):
        d = pool.borrow(("u", "a"))
        if connector.pending:
            connector.complete()
        while connector.pending:
            connector.complete()
        leases.append(result(d))
    for lease in leases[:3]:
        lease.release(clean=True)
    assert len(pool.connections()) == 6
    pool.reconfigure(ConnectionPoolConfig(max_connections_percent=20, max_idle_connections_percent=10))
    assert len(pool.connections()) == 3  # the 3 idle ones are above the new cap of 2
    leases[3].release(clean=True)  # above the cap: closed on return
    assert len(pool.connections()) == 2
    leases[4].release(clean=True)
    leases[5].release(clean=True)
    assert len(pool.connections()) <= 2


def test_pool_reconfigure_higher_cap_serves_waiters():
    pool, connector, clock = make(max_pct=10, idle_pct=10, server_max=10)
    first = pool.borrow(("u", "a"))
    connector.complete()
    lease = result(first)
    waiting = pool.borrow(("u", "a"))
    assert not waiting.called and not connector.pending  # at the cap of 1
    pool.reconfigure(ConnectionPoolConfig(max_connections_percent=50, max_idle_connections_percent=10))
    assert connector.pending  # a new connection is being opened for the waiter
    connector.complete()
    assert waiting.called
    lease.release(clean=True)


def test_pool_retire_target_closes_idle_now_and_borrowed_on_return():
    pool, connector, clock = make(max_pct=100, idle_pct=100, server_max=10)
    old, new = Target("old"), Target("new")
    _with_target(connector, old)
    a, b = pool.borrow(("u", "a")), pool.borrow(("u", "a"))
    while connector.pending:
        connector.complete()
    la, lb = result(a), result(b)
    la.release(clean=True)
    idle_conn, busy_conn = la.conn, lb.conn
    pool.retire_target(old)
    assert idle_conn.closed_reason == "target deregistered"
    assert busy_conn.state == "borrowed" and busy_conn.closed_reason is None  # its transaction goes on
    lb.release(clean=True)
    assert busy_conn.state == "closed"
    # a connection that was being opened to the retired target is closed once open
    c = fired(pool.borrow(("u", "a")))
    opened = connector.complete()
    assert opened.state == "closed" and not c
    _with_target(connector, new)
    connector.complete()  # the pool opened another one for the waiter
    assert c[0].conn.target is new
    pool.readmit_target(old)  # registered again: its connections are kept
    _with_target(connector, old)
    d = fired(pool.borrow(("u", "b")))
    connector.complete()
    assert d[0].conn.target is old and d[0].conn.state == "borrowed"


def test_modify_database_tls_takes_effect_for_new_connections(running):
    from txrdsproxy.config.model import DatabaseTLSConfig
    registry, reactor = running
    ctx = registry.get("p1").ctx
    assert ctx.database_tls.mode == "follow-client" and ctx.database_tls_for(False) is False
    registry.modify_proxy("p1", database_tls=DatabaseTLSConfig(mode="require"))
    assert ctx.database_tls.mode == "require" and ctx.connector.database_tls is ctx.database_tls
    assert ctx.database_tls_for(False) is True  # new sessions' pool keys ask for TLS
    target = ctx.topology.targets[0]
    assert ctx.connector.tls_plan(("u", "db", True), target).required


def test_connections_made_under_the_old_database_tls_are_never_lent_again(running):
    """A DatabaseTLS change whose pool keys stay the same (prefer -> require: both ask for TLS)
    retires every connection made before it: the idle one closes now, the borrowed one when
    its session gives it back, the one being opened once open (it would have been lent)."""
    from test_pool import FakeConnector
    from txrdsproxy.config.model import DatabaseTLSConfig
    registry, reactor = running
    registry.modify_proxy("p1", database_tls=DatabaseTLSConfig(mode="prefer"))
    ctx = registry.get("p1").ctx
    pool = ctx.pool
    pool.connector = connector = FakeConnector()
    _with_target(connector, ctx.topology.targets[0])  # as real connections: to the target
    key = ("u", "db", ctx.database_tls_for(False))
    borrowed = fired(pool.borrow(key))
    first = connector.complete()
    idle = fired(pool.borrow(("v", "db", key[2])))  # another user's, idle at the change
    connector.complete()
    idle[0].release()
    opening = fired(pool.borrow(key))  # its connection is being opened at the change
    assert len(connector.pending) == 1

    registry.modify_proxy("p1", database_tls=DatabaseTLSConfig(mode="require"))
    assert ctx.database_tls_for(False) == key[2]  # the same pool key as before
    assert idle[0].conn.closed_reason == "DatabaseTLS changed"
    late = connector.complete()  # opened with the old settings
    assert late.closed_reason == "DatabaseTLS changed" and opening == []
    fresh = connector.complete()  # the waiter gets a connection made under the new settings
    assert opening[0].conn is fresh
    borrowed[0].release()
    assert first.closed_reason == "DatabaseTLS changed"
    assert pool.try_borrow(key) is None  # nothing of before is idle


@pytest.mark.parametrize("removed", ["db-1", "db-2"])
def test_a_worker_whose_proxy_drops_to_one_target_stops_following_the_supervisors_monitor(removed):
    # Workers: N: the supervisor runs no monitor for a proxy of one target, so the worker's
    # FollowerMonitor would wait for verdicts that never come (and, its writer removed, have no
    # writer for ever): the worker goes back to what a proxy of one target does.
    from txrdsproxy.workers import WorkerIdentity
    reactor = Reactor()
    registry = ProxyRegistry(reactor, FakeSecrets())
    registry.worker = WorkerIdentity(0, 2, "/nowhere", shared_monitor=True)
    registry.add_proxy(config(proxy(targets=(("db-1", 5432), ("db-2", 5433)))).proxies[0])
    ctx = registry.get("p1").ctx
    assert getattr(ctx.monitor, "follows", False) and ctx.pool.failover is ctx.monitor
    ctx.health.remote = True  # as FollowerMonitor.start sets it
    registry.deregister_targets("p1", [removed])
    assert ctx.monitor is None and ctx.pool.failover is None and not ctx.health.remote
    [left] = ctx.topology.targets
    assert ctx.topology.current_writer() is left
