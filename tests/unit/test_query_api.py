"""The RDS Query API (admin/query.py, operations.py, querycodec.py, shapes.py) without sockets:
requests are made by botocore's own query serializer (and signer), rendered with DummyRequest
over a real ProxyRegistry on MemoryReactorClock, and every answer is parsed by botocore's own
query parser against the RDS model."""

import copy
import time
import urllib.parse

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.parsers import create_parser
from botocore.serialize import create_serializer
from twisted.internet.address import IPv4Address
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from txrdsproxy.admin.operations import RdsApi
from txrdsproxy.admin.query import ApiAuthenticator, QueryResource
from txrdsproxy.admin.querycodec import encode_response, operation, rds_model
from txrdsproxy.admin.resources import admin_root
from txrdsproxy.config.load import parse_config
from txrdsproxy.control import ProxyControl
from txrdsproxy.metrics import Metrics
from txrdsproxy.registry import ProxyRegistry

from test_runtime import FakeSecrets, Reactor

SCRAM_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"
MD5_ARN = "arn:aws:secretsmanager:local:000000000000:secret:other"
KEY_ARN = "arn:aws:secretsmanager:local:000000000000:secret:key"
AKID, SECRET = "AKIATESTTESTTEST0001", "test-secret-access-key"
DOC = {
    "Secrets": {"Path": "secrets.json"},
    "DBInstances": [{"DBInstanceIdentifier": "pg-9", "Endpoint": "10.0.0.9", "Port": 5439}],
    "DBProxies": [{
        "DBProxyName": "app-pg", "EngineFamily": "POSTGRESQL", "Listen": "tcp:6432:interface=127.0.0.1",
        "IdleClientTimeout": 900, "DebugLogging": True,
        "Auth": [{"SecretArn": SCRAM_ARN, "Description": "app user"},
                 {"SecretArn": MD5_ARN, "ClientPasswordAuthType": "POSTGRES_MD5"}],
        "TargetGroups": [{
            "TargetGroupName": "default",
            "ConnectionPoolConfig": {"MaxConnectionsPercent": 50, "MaxIdleConnectionsPercent": 10,
                                     "ConnectionBorrowTimeout": 30,
                                     "SessionPinningFilters": ["EXCLUDE_VARIABLE_SETS"],
                                     "InitQuery": "SET x = 1"},
            "Targets": [{"RdsResourceId": "pg-1", "Endpoint": "10.0.0.1", "Port": 5432},
                        {"RdsResourceId": "pg-2", "Endpoint": "10.0.0.2", "Port": 5433}]}],
    }, {
        "DBProxyName": "app-my", "EngineFamily": "MYSQL", "Listen": "tcp:3307",
        "Auth": [{"SecretArn": SCRAM_ARN}],
        "TargetGroups": [{"Targets": [
            {"RdsResourceId": "my-1", "Endpoint": "10.0.0.3", "Port": 3306},
            {"RdsResourceId": "my-2", "Endpoint": "10.0.0.4", "Port": 3306, "Role": "READ_WRITE"}]}],
    }],
}


class Principal:
    arn = "arn:aws:iam::000000000000:user/tester"


class Decision:
    def __init__(self, allowed):
        self.allowed = allowed
        self.value = "allow" if allowed else "implicit-deny"


class FakePrincipals:
    """Verifies with auth/sigv4 (botocore's signer) for the one key; allows what `allowed` says."""

    def __init__(self):
        self.allowed = lambda action, arn: True
        self.asked = []

    def verify_request(self, method, url, headers, body, now):
        from txrdsproxy.auth.iam import AuthenticationFailed
        from txrdsproxy.auth.sigv4 import SignatureError, SigningKey, verify_authorization
        try:
            verify_authorization(method, url, headers, body,
                                 lambda akid: SigningKey(AKID, SECRET, None) if akid == AKID else None, now)
        except SignatureError as e:
            raise AuthenticationFailed(e.reason) from None
        return Principal(), None

    def authorize(self, principal, action, arn):
        self.asked.append((action, arn))
        return Decision(self.allowed(action, arn))


@pytest.fixture
def api():
    reactor = Reactor()
    reactor.advance(time.time())  # SigV4 dates are checked against this clock
    config = parse_config(copy.deepcopy(DOC), "test.yaml", "/tmp")
    registry = ProxyRegistry(reactor, FakeSecrets())
    for proxy in config.proxies:
        registry.add_proxy(proxy)
    registry.startService()
    control = ProxyControl(registry, config, document=copy.deepcopy(DOC))
    principals = FakePrincipals()
    query = QueryResource(RdsApi(control), ApiAuthenticator(lambda: principals, lambda: control.config, reactor))
    return registry, admin_root(Metrics(), registry, query), principals, control


def call(root, action, params=None, sign=True, secret=SECRET, raw=None):
    """-> (HTTP status, parsed response dict) of *action* as botocore would send and read it."""
    op = rds_model().operation_model(action)
    serialized = create_serializer("query").serialize_to_request(params or {}, op)
    body = raw if raw is not None else urllib.parse.urlencode(serialized["body"]).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "Host": "127.0.0.1:8089"}
    if sign:
        aws = AWSRequest(method="POST", url="http://127.0.0.1:8089/", data=body, headers=headers)
        SigV4Auth(Credentials(AKID, secret), "rds", "us-east-1").add_auth(aws)
        headers = dict(aws.headers.items())
    request = DummyRequest([b""])
    request.isSecure = lambda: False
    request.method = b"POST"
    request.uri = b"/"
    request.client = IPv4Address("TCP", "127.0.0.1", 40000)
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.encode(), [value.encode() if isinstance(value, str) else value])
    import io
    request.content = io.BytesIO(body)
    out = getChildForRequest(root, request).render(request)
    status = request.responseCode or 200
    parser = create_parser("query")
    parsed = parser.parse({"body": out, "status_code": status, "headers": {}}, op.output_shape)
    return status, parsed


def test_describe_db_proxies_in_rds_shape(api):
    registry, root, principals, _ = api
    status, body = call(root, "DescribeDBProxies")
    assert status == 200 and body["ResponseMetadata"]["RequestId"]
    pg, my = body["DBProxies"]
    assert pg["DBProxyName"] == "app-pg" and pg["Status"] == "available"
    assert pg["DBProxyArn"].startswith("arn:aws:rds:us-east-1:000000000000:db-proxy:prx-")
    assert pg["Endpoint"] == "0.0.0.0:6432"  # what MemoryReactor's port says it is bound to
    assert pg["IdleClientTimeout"] == 900 and pg["DebugLogging"] is True
    assert pg["Auth"] == [
        {"Description": "app user", "AuthScheme": "SECRETS", "SecretArn": SCRAM_ARN,
         "IAMAuth": "DISABLED", "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256"},
        {"AuthScheme": "SECRETS", "SecretArn": MD5_ARN, "IAMAuth": "DISABLED",
         "ClientPasswordAuthType": "POSTGRES_MD5"}]
    assert my["EngineFamily"] == "MYSQL" and my["Auth"][0]["ClientPasswordAuthType"] == "MYSQL_NATIVE_PASSWORD"
    assert principals.asked == [("rds:DescribeDBProxies", "arn:aws:rds:us-east-1:000000000000:db-proxy:*")]
    status, body = call(root, "DescribeDBProxies", {"DBProxyName": "app-my"})
    assert [p["DBProxyName"] for p in body["DBProxies"]] == ["app-my"]


def test_target_groups_and_targets(api):
    registry, root, _, _ = api
    status, body = call(root, "DescribeDBProxyTargetGroups", {"DBProxyName": "app-pg"})
    (group,) = body["TargetGroups"]
    assert group["ConnectionPoolConfig"] == {
        "MaxConnectionsPercent": 50, "MaxIdleConnectionsPercent": 10, "ConnectionBorrowTimeout": 30,
        "SessionPinningFilters": ["EXCLUDE_VARIABLE_SETS"], "InitQuery": "SET x = 1"}
    assert group["IsDefault"] is True and group["TargetGroupArn"].split(":")[5] == "target-group"
    ctx = registry.get("app-pg").ctx
    pg1, pg2 = ctx.config.target_group.targets
    ctx.monitor.stop()  # (its probes fail at once here: no database)
    ctx.topology.set_writer(pg1)
    ctx.health.record_failure(pg1, "CONNECTION_FAILED", "cannot connect to 10.0.0.1:5432: refused")
    status, body = call(root, "DescribeDBProxyTargets", {"DBProxyName": "app-pg"})
    first, second = body["Targets"]
    assert (first["RdsResourceId"], first["Role"], first["Port"]) == ("pg-1", "READ_WRITE", 5432)
    assert first["TargetHealth"] == {"State": "UNAVAILABLE", "Reason": "CONNECTION_FAILED",
                                     "Description": "cannot connect to 10.0.0.1:5432: refused"}
    assert second["Role"] == "READ_ONLY"
    assert second["TargetHealth"] == {"State": "UNAVAILABLE", "Reason": "AUTH_FAILURE",
                                      "Description": "no Auth secret can be read for health checks"}
    ctx.topology.set_writer(pg2)
    first, second = call(root, "DescribeDBProxyTargets", {"DBProxyName": "app-pg"})[1]["Targets"]
    assert (first["Role"], second["Role"]) == ("READ_ONLY", "READ_WRITE")
    my = registry.get("app-my").ctx
    my.monitor.stop()
    my.topology.set_writer(my.topology.targets[1])  # the configured READ_WRITE, as at start
    targets = call(root, "DescribeDBProxyTargets", {"DBProxyName": "app-my"})[1]["Targets"]
    assert [(t["RdsResourceId"], t["Role"]) for t in targets] == [("my-1", "READ_ONLY"), ("my-2", "READ_WRITE")]


@pytest.mark.parametrize("action,params,code,status", [
    ("DescribeDBProxies", {"DBProxyName": "nope"}, "DBProxyNotFoundFault", 404),
    ("DescribeDBProxyTargets", {"DBProxyName": "nope"}, "DBProxyNotFoundFault", 404),
    ("DescribeDBProxyTargetGroups", {"DBProxyName": "app-pg", "TargetGroupName": "x"},
     "DBProxyTargetGroupNotFoundFault", 404),
    ("DescribeDBProxyTargets", {"DBProxyName": "app-pg", "MaxRecords": 101}, "InvalidParameterValue", 400),
    ("DescribeDBProxies", {"Filters": [{"Name": "colour", "Values": ["x"]}]}, "InvalidParameterValue", 400),
    ("ModifyDBProxy", {"DBProxyName": "app-pg", "NewDBProxyName": "app-my"}, "DBProxyAlreadyExistsFault", 400),
    ("ModifyDBProxy", {"DBProxyName": "app-pg", "IdleClientTimeout": 0}, "InvalidParameterValue", 400),
    ("RegisterDBProxyTargets", {"DBProxyName": "app-pg", "DBInstanceIdentifiers": ["pg-1"]},
     "DBProxyTargetAlreadyRegisteredFault", 400),
    ("RegisterDBProxyTargets", {"DBProxyName": "app-pg", "DBInstanceIdentifiers": ["x"]}, "DBInstanceNotFound", 404),
    ("RegisterDBProxyTargets", {"DBProxyName": "app-pg", "DBClusterIdentifiers": ["c"]}, "DBClusterNotFoundFault", 404),
    ("DeregisterDBProxyTargets", {"DBProxyName": "app-pg", "DBInstanceIdentifiers": ["x"]},
     "DBProxyTargetNotFoundFault", 404),
    ("DeleteDBProxy", {"DBProxyName": "nope"}, "DBProxyNotFoundFault", 404),
    ("CreateDBProxy", {"DBProxyName": "app-pg", "EngineFamily": "POSTGRESQL", "RoleArn": "r" * 20,
                       "VpcSubnetIds": ["s"], "Auth": [{"SecretArn": SCRAM_ARN}]}, "DBProxyAlreadyExistsFault", 400),
    ("CreateDBProxy", {"DBProxyName": "sql", "EngineFamily": "SQLSERVER", "RoleArn": "r" * 20,
                       "VpcSubnetIds": ["s"], "Auth": [{"SecretArn": SCRAM_ARN}]}, "InvalidParameterValue", 400),
])
def test_faults_have_the_models_codes_and_statuses(api, action, params, code, status):
    _, root, _, _ = api
    got_status, body = call(root, action, params)
    assert (body["Error"]["Code"], got_status) == (code, status), body["Error"].get("Message")
    assert body["ResponseMetadata"]["RequestId"]


@pytest.mark.parametrize("raw,code", [
    (b"Version=2014-10-31", "MissingAction"),
    (b"Action=DescribeEverything&Version=2014-10-31", "InvalidAction"),
    (b"Action=DescribeDBProxies&Version=2012-01-01", "InvalidParameterValue"),
    (b"Action=DescribeDBProxies&Version=2014-10-31&Bogus=1", "InvalidParameterValue"),
    (b"Action=DescribeDBProxies&Version=2014-10-31&MaxRecords=x", "InvalidParameterValue"),
    (b"Action=DescribeDBProxies&Version=2014-10-31&DBProxyName=a&DBProxyName=b", "InvalidParameterValue"),
    (b"Action=DescribeDBProxies&Version=2014-10-31&DBProxyName=%ff", "MalformedQueryString"),
    (b"Action=DescribeDBProxyTargets&Version=2014-10-31", "MissingParameter"),
    (b"Action=DescribeDBProxies&Version=2014-10-31&Filters.Filter.2.Name=x", "InvalidParameterValue"),
])
def test_malformed_requests(api, raw, code):
    _, root, _, _ = api
    status, body = call(root, "DescribeDBProxies", raw=raw)
    assert status == 400 and body["Error"]["Code"] == code


def test_authentication_errors(api):
    _, root, principals, control = api
    assert call(root, "DescribeDBProxies", sign=False)[1]["Error"]["Code"] == "MissingAuthenticationToken"
    assert call(root, "DescribeDBProxies", secret="wrong")[1]["Error"]["Code"] == "SignatureDoesNotMatch"
    principals.allowed = lambda action, arn: action != "rds:ModifyDBProxy"
    status, body = call(root, "ModifyDBProxy", {"DBProxyName": "app-pg", "DebugLogging": False})
    assert (status, body["Error"]["Code"]) == (403, "AccessDenied")
    assert "rds:ModifyDBProxy" in body["Error"]["Message"]
    # the demo's switch: unsigned reads from loopback, never writes
    import dataclasses
    control.config = dataclasses.replace(control.config, admin=dataclasses.replace(
        control.config.admin, allow_unauthenticated_loopback_reads=True))
    assert call(root, "DescribeDBProxies", sign=False)[0] == 200
    assert call(root, "DescribeDBProxies", secret="someone-elses")[0] == 200  # read as unsigned
    status, body = call(root, "DeleteDBProxy", {"DBProxyName": "app-pg"}, sign=False)
    assert (status, body["Error"]["Code"]) == (403, "MissingAuthenticationToken")


def test_changes_through_the_api_edit_the_document_and_the_registry(api):
    registry, root, _, control = api
    status, body = call(root, "ModifyDBProxyTargetGroup", {
        "DBProxyName": "app-pg", "TargetGroupName": "default",
        "ConnectionPoolConfig": {"MaxConnectionsPercent": 80, "MaxIdleConnectionsPercent": 20}})
    assert status == 200 and body["DBProxyTargetGroup"]["ConnectionPoolConfig"]["MaxConnectionsPercent"] == 80
    assert registry.get("app-pg").ctx.pool.config.max_connections_percent == 80
    pool_doc = control.document["DBProxies"][0]["TargetGroups"][0]["ConnectionPoolConfig"]
    assert pool_doc["MaxConnectionsPercent"] == 80 and pool_doc["InitQuery"] == "SET x = 1"  # merged
    status, body = call(root, "RegisterDBProxyTargets", {"DBProxyName": "app-pg", "DBInstanceIdentifiers": ["pg-9"]})
    assert [t["RdsResourceId"] for t in body["DBProxyTargets"]] == ["pg-9"]
    assert [t.rds_resource_id for t in registry.get("app-pg").ctx.topology.targets] == ["pg-1", "pg-2", "pg-9"]
    status, body = call(root, "CreateDBProxy", {
        "DBProxyName": "new-pg", "EngineFamily": "POSTGRESQL", "RoleArn": "arn:aws:iam::000000000000:role/r",
        "VpcSubnetIds": ["s-1"], "Auth": [{"SecretArn": SCRAM_ARN}],
        "Tags": [{"Key": "txrdsproxy:Listen", "Value": "tcp:7777:interface=127.0.0.1"}]})
    assert status == 200 and body["DBProxy"]["Status"] == "available"
    assert registry.get("new-pg").config.listen == "tcp:7777:interface=127.0.0.1"
    status, body = call(root, "ModifyDBProxyTargetGroup", {
        "DBProxyName": "new-pg", "TargetGroupName": "default", "NewName": "primary"})
    group = body["DBProxyTargetGroup"]
    assert (group["TargetGroupName"], group["IsDefault"]) == ("primary", False)
    assert call(root, "DescribeDBProxyTargetGroups", {"DBProxyName": "new-pg", "TargetGroupName": "default"})[
        1]["Error"]["Code"] == "DBProxyTargetGroupNotFoundFault"
    status, body = call(root, "DeleteDBProxy", {"DBProxyName": "new-pg"})
    assert status == 200 and body["DBProxy"]["Status"] == "deleting" and "new-pg" not in registry
    assert [p["DBProxyName"] for p in control.document["DBProxies"]] == ["app-pg", "app-my"]


def test_every_output_shape_we_build_is_the_models():
    """The encoder refuses a member the model does not have: the shapes cannot drift."""
    op = operation("DescribeDBProxies")
    with pytest.raises(KeyError):
        encode_response(op, {"DBProxies": [{"DBProxyName": "x", "Port": 1}]}, "id")


def test_metrics_and_healthz_still_served(api):
    _, root, _, _ = api
    request = DummyRequest([b"metrics"])
    assert b"\nrdsproxy_client_connections{proxy_name=" in getChildForRequest(root, request).render(request)
    request = DummyRequest([b"healthz"])
    assert b'"status": "ok"' in getChildForRequest(root, request).render(request)


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
