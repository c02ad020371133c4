"""admin/api.py: the read-only /v1/ describe operations, rendered with DummyRequest (no sockets)."""

import json

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from txrdsproxy.admin.api import proxy_arn, target_arn
from txrdsproxy.admin.resources import admin_root
from txrdsproxy.config.load import parse_config
from txrdsproxy.failover.monitor import TargetHealth
from txrdsproxy.failover.topology import Topology
from txrdsproxy.metrics import Metrics
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy.session import ProxyContext, SessionState
from txrdsproxy.service import build_proxy
from txrdsproxy.wire.pg.pinning import PinReason

SCRAM_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"
MD5_ARN = "arn:aws:secretsmanager:local:000000000000:secret:other"
CONFIG = {
    "Secrets": {"Path": "secrets.json"},
    "DBProxies": [{
        "DBProxyName": "app-pg",
        "EngineFamily": "POSTGRESQL",
        "Listen": "tcp:6432:interface=127.0.0.1",
        "IdleClientTimeout": 900,
        "DebugLogging": True,
        "Auth": [{"SecretArn": SCRAM_ARN, "Description": "app user"},
                 {"SecretArn": MD5_ARN, "ClientPasswordAuthType": "POSTGRES_MD5"}],
        "TargetGroups": [{
            "TargetGroupName": "default",
            "ConnectionPoolConfig": {"MaxConnectionsPercent": 50, "MaxIdleConnectionsPercent": 10,
                                     "ConnectionBorrowTimeout": 30,
                                     "SessionPinningFilters": ["EXCLUDE_VARIABLE_SETS"],
                                     "InitQuery": "SET x = 1"},
            "Targets": [{"RdsResourceId": "pg-1", "Endpoint": "10.0.0.1", "Port": 5432},
                        {"RdsResourceId": "pg-2", "Endpoint": "10.0.0.2", "Port": 5433}],
        }],
    }, {
        "DBProxyName": "app-my",
        "EngineFamily": "MYSQL",
        "Listen": "tcp:3307",
        "Auth": [{"SecretArn": SCRAM_ARN}],
        "TargetGroups": [{"Targets": [
            {"RdsResourceId": "my-1", "Endpoint": "10.0.0.3", "Port": 3306},
            {"RdsResourceId": "my-2", "Endpoint": "10.0.0.4", "Port": 3306, "Role": "READ_WRITE"}]}],
    }],
}


class FakeConn:
    def __init__(self, key, target):
        self.key, self.target = key, target
        self.state = "connecting"
        self.idle_since = 0.0
        self.server_max_connections = 100
        self.pool_listener = None

    def close(self, reason):
        self.state = "closed"


class FakeConnector:
    def __init__(self, topology):
        self.topology = topology
        self.pending = []

    def connect(self, key):
        d = defer.Deferred()
        self.pending.append((key, d))
        return d

    def complete(self):
        key, d = self.pending.pop(0)
        d.callback(FakeConn(key, self.topology.writer()))


class FakeSession:
    def __init__(self, state, pin_reason=None):
        self.state, self.pin_reason = state, pin_reason


class FakePort:
    def __init__(self, host, port):
        self.address = IPv4Address("TCP", host, port)

    def getHost(self):
        return self.address


class FakeService:
    def __init__(self, ctx, port=None):
        self.ctx, self.port = ctx, port


def context(proxy, clock):
    topology = Topology(proxy.target_group.targets)
    connector = FakeConnector(topology)
    pool = BackendPool(proxy.name, connector, proxy.target_group.connection_pool_config, clock)
    ctx = ProxyContext(proxy, pool, secrets=None, clock=clock)
    ctx.topology = topology
    ctx.health = TargetHealth(clock)
    return ctx


@pytest.fixture
def setup():
    config = parse_config(CONFIG, "test.yaml", "/etc")
    clock = Clock()
    pg, my = (context(p, clock) for p in config.proxies)
    services = [FakeService(pg, FakePort("127.0.0.1", 6432)), FakeService(my)]
    return services, admin_root(Metrics(), services)


def get(root, path, **params):
    """-> (status, decoded JSON) of GET *path* with query *params* (a list value repeats it)."""
    request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
    request.args = {k.encode(): [v.encode() for v in (vals if isinstance(vals, list) else [vals])]
                    for k, vals in params.items()}
    body = getChildForRequest(root, request).render(request)
    assert body is not NOT_DONE_YET
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    return request.responseCode or 200, json.loads(body)


def test_describe_db_proxies_lists_every_proxy_in_rds_shape(setup):
    services, root = setup
    status, body = get(root, "v1/db-proxies")
    assert status == 200
    pg, my = body["DBProxies"]
    assert {k: v for k, v in pg.items() if k != "txrdsproxy"} == {
        "DBProxyName": "app-pg",
        "DBProxyArn": "arn:aws:rds:local:000000000000:db-proxy:app-pg",
        "Status": "available",
        "EngineFamily": "POSTGRESQL",
        "Auth": [
            {"Description": "app user", "AuthScheme": "SECRETS", "SecretArn": SCRAM_ARN,
             "IAMAuth": "DISABLED", "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256"},
            {"Description": "", "AuthScheme": "SECRETS", "SecretArn": MD5_ARN,
             "IAMAuth": "DISABLED", "ClientPasswordAuthType": "POSTGRES_MD5"},
        ],
        "Endpoint": "127.0.0.1",
        "Port": 6432,
        "RequireTLS": False,
        "IdleClientTimeout": 900,
        "DebugLogging": True,
    }
    assert isinstance(pg["IdleClientTimeout"], int)
    # Not listening yet: "creating", no endpoint.
    assert my["DBProxyName"] == "app-my" and my["Status"] == "creating"
    assert my["Endpoint"] is None and my["Port"] is None
    assert my["EngineFamily"] == "MYSQL"
    assert my["Auth"][0]["ClientPasswordAuthType"] == "MYSQL_NATIVE_PASSWORD"
    assert my["DBProxyArn"] == proxy_arn("app-my")


def test_describe_db_proxies_by_name(setup):
    _, root = setup
    status, body = get(root, "v1/db-proxies", DBProxyName="app-my")
    assert status == 200
    assert [p["DBProxyName"] for p in body["DBProxies"]] == ["app-my"]


def test_unknown_proxy_is_404_db_proxy_not_found(setup):
    _, root = setup
    for path in ("v1/db-proxies", "v1/db-proxy-target-groups", "v1/db-proxy-targets"):
        status, body = get(root, path, DBProxyName="nope")
        assert status == 404
        assert body["Error"]["Code"] == "DBProxyNotFoundFault"
        assert "nope" in body["Error"]["Message"]


@pytest.mark.parametrize("path,params,code", [
    ("v1/db-proxies", {"Bogus": "x"}, "InvalidParameterValue"),
    ("v1/db-proxies", {"DBProxyName": ["app-pg", "app-my"]}, "InvalidParameterValue"),
    ("v1/db-proxies", {"DBProxyName": ""}, "InvalidParameterValue"),
    ("v1/db-proxy-target-groups", {}, "MissingParameter"),
    ("v1/db-proxy-targets", {}, "MissingParameter"),
    ("v1/db-proxy-targets", {"DBProxyName": "app-pg", "MaxRecords": "20"}, "InvalidParameterValue"),
])
def test_bad_parameters_are_400(setup, path, params, code):
    _, root = setup
    status, body = get(root, path, **params)
    assert status == 400
    assert body["Error"]["Code"] == code and body["Error"]["Type"] == "Sender"


def test_non_utf8_parameter_is_400(setup):
    _, root = setup
    request = DummyRequest([b"v1", b"db-proxies"])
    request.args = {b"DBProxyName": [b"\xff"]}
    body = json.loads(getChildForRequest(root, request).render(request))
    assert request.responseCode == 400 and body["Error"]["Code"] == "InvalidParameterValue"


def test_unknown_operation_is_404(setup):
    _, root = setup
    for path in ("v1/describe-everything", "v1", "v1/db-proxies/extra"):
        status, body = get(root, path)
        assert status == 404 and body["Error"]["Code"] == "UnknownOperation", path


def test_api_is_read_only(setup):
    from twisted.web.server import UnsupportedMethod
    _, root = setup
    request = DummyRequest([b"v1", b"db-proxies"])
    request.method = b"POST"
    with pytest.raises(UnsupportedMethod):
        getChildForRequest(root, request).render(request)


def test_describe_db_proxy_target_groups(setup):
    _, root = setup
    status, body = get(root, "v1/db-proxy-target-groups", DBProxyName="app-pg")
    assert status == 200
    assert body == {"TargetGroups": [{
        "DBProxyName": "app-pg",
        "TargetGroupName": "default",
        "TargetGroupArn": "arn:aws:rds:local:000000000000:target-group:app-pg-default",
        "IsDefault": True,
        "Status": "available",
        "ConnectionPoolConfig": {
            "MaxConnectionsPercent": 50,
            "MaxIdleConnectionsPercent": 10,
            "ConnectionBorrowTimeout": 30,
            "SessionPinningFilters": ["EXCLUDE_VARIABLE_SETS"],
            "InitQuery": "SET x = 1",
        },
    }]}
    status, body = get(root, "v1/db-proxy-target-groups", DBProxyName="app-my",
                       TargetGroupName="default")
    assert status == 200 and body["TargetGroups"][0]["Status"] == "creating"
    pool = body["TargetGroups"][0]["ConnectionPoolConfig"]
    assert pool == {"MaxConnectionsPercent": 100, "MaxIdleConnectionsPercent": 50,
                    "ConnectionBorrowTimeout": 120, "SessionPinningFilters": [], "InitQuery": ""}


def test_unknown_target_group_is_404(setup):
    _, root = setup
    for path in ("v1/db-proxy-target-groups", "v1/db-proxy-targets"):
        status, body = get(root, path, DBProxyName="app-pg", TargetGroupName="other")
        assert status == 404 and body["Error"]["Code"] == "DBProxyTargetGroupNotFoundFault"


def test_targets_roles_and_health(setup):
    services, root = setup
    ctx = services[0].ctx
    pg1, pg2 = ctx.config.target_group.targets
    status, body = get(root, "v1/db-proxy-targets", DBProxyName="app-pg")
    assert status == 200
    first, second = body["Targets"]
    assert first == {
        "TargetArn": "arn:aws:rds:local:000000000000:db:pg-1",
        "Endpoint": "10.0.0.1",
        "RdsResourceId": "pg-1",
        "Port": 5432,
        "Type": "RDS_INSTANCE",
        "Role": "READ_WRITE",
        "TargetHealth": {"State": "REGISTERING"},
        "txrdsproxy": {"DatabaseConnections": 0},
    }
    assert second["RdsResourceId"] == "pg-2" and second["Role"] == "READ_ONLY"
    assert second["TargetArn"] == target_arn(pg2)

    ctx.health.record_failure(pg1, "CONNECTION_FAILED", "cannot connect to 10.0.0.1:5432: refused")
    ctx.health.record_failure(pg2, "AUTH_FAILURE", "password authentication failed")
    first, second = get(root, "v1/db-proxy-targets", DBProxyName="app-pg")[1]["Targets"]
    assert first["TargetHealth"] == {"State": "UNAVAILABLE", "Reason": "CONNECTION_FAILED",
                                     "Description": "cannot connect to 10.0.0.1:5432: refused"}
    assert second["TargetHealth"]["Reason"] == "AUTH_FAILURE"

    ctx.health.record_success(pg1)
    first = get(root, "v1/db-proxy-targets", DBProxyName="app-pg")[1]["Targets"][0]
    assert first["TargetHealth"] == {"State": "AVAILABLE"}

    # The writer moves: the roles follow the topology.
    ctx.topology.set_writer(pg2)
    first, second = get(root, "v1/db-proxy-targets", DBProxyName="app-pg")[1]["Targets"]
    assert (first["Role"], second["Role"]) == ("READ_ONLY", "READ_WRITE")


def test_configured_role_picks_the_writer(setup):
    _, root = setup
    targets = get(root, "v1/db-proxy-targets", DBProxyName="app-my")[1]["Targets"]
    assert [(t["RdsResourceId"], t["Role"]) for t in targets] == [
        ("my-1", "READ_ONLY"), ("my-2", "READ_WRITE")]


def test_live_figures_are_read_from_states(setup):
    services, root = setup
    ctx = services[0].ctx
    figures = get(root, "v1/db-proxies", DBProxyName="app-pg")[1]["DBProxies"][0]["txrdsproxy"]
    assert figures == {
        "ClientConnections": 0, "DatabaseConnections": 0, "DatabaseConnectionStates": {},
        "Borrowed": 0, "Pinned": 0, "PinReasons": {}, "Waiting": 0,
        "MaxDatabaseConnectionsAllowed": None, "DatabaseMaxConnections": None,
    }
    pool, connector = ctx.pool, ctx.pool.connector
    key = ("app", "appdb")
    leases = []
    first = pool.borrow(key)
    first.addCallback(leases.append)
    connector.complete()  # max_connections=100, 50% -> 50 allowed
    second = pool.borrow(key)
    second.addCallback(leases.append)
    # second is being opened: one connection borrowed, one connecting, nobody queued yet...
    ctx.sessions.update({FakeSession(SessionState.PINNED, PinReason.SET_VARIABLE),
                         FakeSession(SessionState.PINNED, PinReason.SET_VARIABLE),
                         FakeSession(SessionState.PINNED, PinReason.TEMPORARY_OBJECT),
                         FakeSession(SessionState.IDLE), FakeSession(SessionState.BORROWED)})
    figures = get(root, "v1/db-proxies", DBProxyName="app-pg")[1]["DBProxies"][0]["txrdsproxy"]
    assert figures["ClientConnections"] == 5
    assert figures["DatabaseConnections"] == 2
    assert figures["DatabaseConnectionStates"] == {"borrowed": 1, "connecting": 1}
    assert figures["Borrowed"] == 1
    assert figures["Pinned"] == 3
    assert figures["PinReasons"] == {"set_variable": 2, "temporary_object": 1}
    assert figures["Waiting"] == 1
    assert figures["MaxDatabaseConnectionsAllowed"] == 50
    assert figures["DatabaseMaxConnections"] == 100
    targets = get(root, "v1/db-proxy-targets", DBProxyName="app-pg")[1]["Targets"]
    assert targets[0]["txrdsproxy"] == {"DatabaseConnections": 1}  # the one still opening has no target
    connector.complete()
    assert len(leases) == 2
    figures = get(root, "v1/db-proxies", DBProxyName="app-pg")[1]["DBProxies"][0]["txrdsproxy"]
    assert figures["DatabaseConnectionStates"] == {"borrowed": 2} and figures["Waiting"] == 0


def test_no_secret_values_in_output(tmp_path):
    from txrdsproxy.auth.secrets import FileSecretsStore
    (tmp_path / "secrets.json").write_text(json.dumps(
        {SCRAM_ARN: {"username": "app", "password": "s3cr3t-Pa55"}}))
    config = parse_config(CONFIG, "test.yaml", str(tmp_path))
    secrets = FileSecretsStore(config.secrets.path)
    ctx = build_proxy(config.proxies[0], secrets, Clock(), {}, Metrics())
    assert ctx.credentials_for("app").password == "s3cr3t-Pa55"  # the store is live
    root = admin_root(Metrics(), [FakeService(ctx, FakePort("127.0.0.1", 6432))])
    text = json.dumps([get(root, p, DBProxyName="app-pg")[1] for p in
                       ("v1/db-proxies", "v1/db-proxy-target-groups", "v1/db-proxy-targets")])
    assert "s3cr3t" not in text


def test_metrics_and_healthz_still_served(setup):
    _, root = setup
    request = DummyRequest([b"metrics"])
    assert b"rdsproxy_ClientConnections" in getChildForRequest(root, request).render(request)
    request = DummyRequest([b"healthz"])
    body = json.loads(getChildForRequest(root, request).render(request))
    assert request.responseCode == 503 and body["status"] == "starting"


def test_build_proxy_gives_each_proxy_a_target_health_shared_with_its_connector():
    config = parse_config(CONFIG, "test.yaml", "/etc")
    clock = Clock()
    contexts = [build_proxy(p, None, clock, {}, Metrics()) for p in config.proxies]
    for ctx in contexts:
        assert isinstance(ctx.health, TargetHealth)
        assert ctx.connector.health is ctx.health
    assert contexts[0].health is not contexts[1].health


def test_admin_service_binds_and_exposes_its_port():
    from twisted.internet.testing import MemoryReactor
    from twisted.web.server import Site
    from txrdsproxy.service import AdminService
    reactor = MemoryReactor()
    svc = AdminService(Site(admin_root(Metrics(), [])), "tcp:0:interface=127.0.0.1", reactor)
    svc.startService()
    assert svc.port is not None
    assert reactor.tcpServers[0][0] == 0 and reactor.tcpServers[0][3] == "127.0.0.1"
    svc.stopService()
    assert svc.port is None


def test_admin_service_raises_when_it_cannot_bind_under_twistd():
    from twisted.internet.error import CannotListenError
    from twisted.internet.testing import MemoryReactor
    from twisted.web.server import Site
    from txrdsproxy.service import AdminService, ListenFailed

    class Busy(MemoryReactor):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    svc = AdminService(Site(admin_root(Metrics(), [])), "tcp:8089:interface=127.0.0.1", Busy())
    with pytest.raises(ListenFailed) as e:
        svc.privilegedStartService()
    assert "tcp:8089:interface=127.0.0.1" in str(e.value) and "Address already in use" in str(e.value)
    assert svc.port is None
