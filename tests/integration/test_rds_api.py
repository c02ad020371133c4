"""The RDS Query API on the admin listener, driven by boto3 (every operation, every fault we
raise, SigV4 authentication and IAM authorisation) against an in-process proxy over real
PostgreSQL.  Every response is parsed by botocore's own RDS model (boto3 does that)."""


import psycopg
import pytest

try:
    from rdsapi_util import ACCOUNT, REGION, client, start, fault, listening
    from proxyutil import HOST
except ImportError:
    from tests.integration.rdsapi_util import ACCOUNT, REGION, client, start, fault, listening
    from tests.integration.proxyutil import HOST


@pytest.fixture(scope="module")
def api(pg_server, tmp_path_factory):
    proxy, endpoint, path = start(tmp_path_factory.mktemp("rdsapi"), pg_server)
    yield proxy, endpoint, path
    proxy.stop()


def scram_auth(pg_server):
    from proxyutil import SCRAM_ARN
    return [{"AuthScheme": "SECRETS", "SecretArn": SCRAM_ARN, "IAMAuth": "DISABLED",
             "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256", "Description": "app"}]


def test_every_operation_with_boto3(api, pg_server):
    proxy, endpoint, path = api
    rds = client(endpoint)

    # -- CreateDBProxy: the new proxy listens at once ----------------------------------------------
    created = rds.create_db_proxy(
        DBProxyName="api-pg", EngineFamily="POSTGRESQL", Auth=scram_auth(pg_server),
        RoleArn=f"arn:aws:iam::{ACCOUNT}:role/proxy", VpcSubnetIds=["subnet-1", "subnet-2"],
        RequireTLS=False, IdleClientTimeout=900, DebugLogging=False)["DBProxy"]
    assert created["DBProxyName"] == "api-pg" and created["Status"] == "available"
    assert created["DBProxyArn"].startswith(f"arn:aws:rds:{REGION}:{ACCOUNT}:db-proxy:prx-")
    assert created["IdleClientTimeout"] == 900 and created["VpcSubnetIds"] == ["subnet-1", "subnet-2"]
    assert created["Auth"][0]["ClientPasswordAuthType"] == "POSTGRES_SCRAM_SHA_256"
    assert created["CreatedDate"].year >= 2024  # a timestamp botocore parsed
    port = proxy.call(lambda: proxy.service.registry.get("api-pg").port.getHost().port)
    assert listening(port)
    assert fault(rds.create_db_proxy, DBProxyName="api-pg", EngineFamily="POSTGRESQL",
                 Auth=scram_auth(pg_server), RoleArn=f"arn:aws:iam::{ACCOUNT}:role/proxy", VpcSubnetIds=["s"]) == (
        "DBProxyAlreadyExistsFault", 400)

    # -- DescribeDBProxies: filters and names --------------------------------------------------------
    names = sorted(p["DBProxyName"] for p in rds.describe_db_proxies()["DBProxies"])
    assert names == ["api-pg", "test-pg"]
    found = rds.describe_db_proxies(Filters=[{"Name": "db-proxy-name", "Values": ["api-*"]}])
    assert [p["DBProxyName"] for p in found["DBProxies"]] == ["api-pg"]
    assert rds.describe_db_proxies(Filters=[{"Name": "engine-family", "Values": ["MYSQL"]}])["DBProxies"] == []
    assert fault(rds.describe_db_proxies, Filters=[{"Name": "colour", "Values": ["x"]}]) == (
        "InvalidParameterValue", 400)
    assert fault(rds.describe_db_proxies, DBProxyName="nope") == ("DBProxyNotFoundFault", 404)
    unchecked = client(endpoint, parameter_validation=False)  # what botocore would refuse itself
    assert fault(unchecked.describe_db_proxies, MaxRecords=5) == ("InvalidParameterValue", 400)

    # an empty target group: a login is refused with a clear reason
    empty = f"host={HOST} port={port} user=app_scram password={pg_server.users['app_scram']} dbname=appdb"
    with pytest.raises(psycopg.OperationalError, match="target group has no registered targets"):
        psycopg.connect(empty).close()

    # -- RegisterDBProxyTargets: probed and joins; the proxy serves ------------------------------------
    (target,) = rds.register_db_proxy_targets(DBProxyName="api-pg", TargetGroupName="default",
                                              DBInstanceIdentifiers=["pg-2"])["DBProxyTargets"]
    assert (target["RdsResourceId"], target["Port"], target["Type"]) == ("pg-2", pg_server.port, "RDS_INSTANCE")
    assert fault(rds.register_db_proxy_targets, DBProxyName="api-pg",
                 DBInstanceIdentifiers=["pg-2"]) == ("DBProxyTargetAlreadyRegisteredFault", 400)
    assert fault(rds.register_db_proxy_targets, DBProxyName="api-pg",
                 DBInstanceIdentifiers=["nope"]) == ("DBInstanceNotFound", 404)
    dsn = f"host={HOST} port={port} user=app_scram password={pg_server.users['app_scram']} dbname=appdb"
    try:
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 41 + 1").fetchone() == (42,)
    except Exception:
        print(proxy.logs.text()[-5000:])
        raise
    (target,) = rds.describe_db_proxy_targets(DBProxyName="api-pg")["Targets"]
    assert target["TargetHealth"]["State"] == "AVAILABLE" and target["Role"] == "READ_WRITE"
    assert rds.describe_db_proxy_targets(
        DBProxyName="api-pg", Filters=[{"Name": "state", "Values": ["UNAVAILABLE"]}])["Targets"] == []

    # -- DescribeDBProxyTargetGroups / ModifyDBProxyTargetGroup --------------------------------------
    (group,) = rds.describe_db_proxy_target_groups(DBProxyName="api-pg")["TargetGroups"]
    assert group["TargetGroupName"] == "default" and group["IsDefault"] is True
    assert fault(rds.describe_db_proxy_target_groups, DBProxyName="api-pg",
                 TargetGroupName="other") == ("DBProxyTargetGroupNotFoundFault", 404)
    group = rds.modify_db_proxy_target_group(
        DBProxyName="api-pg", TargetGroupName="default",
        ConnectionPoolConfig={"MaxConnectionsPercent": 50, "MaxIdleConnectionsPercent": 10,
                              "ConnectionBorrowTimeout": 15,
                              "SessionPinningFilters": ["EXCLUDE_VARIABLE_SETS"]})["DBProxyTargetGroup"]
    pool = group["ConnectionPoolConfig"]
    assert (pool["MaxConnectionsPercent"], pool["MaxIdleConnectionsPercent"], pool["ConnectionBorrowTimeout"]) == (
        50, 10, 15)
    assert pool["SessionPinningFilters"] == ["EXCLUDE_VARIABLE_SETS"]
    assert proxy.call(lambda: proxy.service.registry.get("api-pg").ctx.pool.config.max_connections_percent) == 50
    assert fault(rds.modify_db_proxy_target_group, DBProxyName="api-pg", TargetGroupName="default",
                 ConnectionPoolConfig={"MaxConnectionsPercent": 10, "MaxIdleConnectionsPercent": 50}) == (
        "InvalidParameterValue", 400)  # idle above max: the loader's own rule

    # -- ModifyDBProxy: settings and a new name, same listener --------------------------------------
    modified = rds.modify_db_proxy(DBProxyName="api-pg", NewDBProxyName="api-pg2", IdleClientTimeout=60,
                                   DebugLogging=True, RequireTLS=False)["DBProxy"]
    assert modified["DBProxyName"] == "api-pg2" and modified["IdleClientTimeout"] == 60
    assert modified["DebugLogging"] is True
    assert modified["DBProxyArn"] == created["DBProxyArn"]  # the ARN survives the rename
    assert listening(port)
    assert fault(rds.modify_db_proxy, DBProxyName="api-pg2", NewDBProxyName="test-pg") == (
        "DBProxyAlreadyExistsFault", 400)
    assert fault(rds.modify_db_proxy, DBProxyName="api-pg", IdleClientTimeout=60) == ("DBProxyNotFoundFault", 404)
    assert fault(unchecked.modify_db_proxy, DBProxyName="api-pg2", IdleClientTimeout=0) == (
        "InvalidParameterValue", 400)

    # -- DeregisterDBProxyTargets -------------------------------------------------------------------
    assert fault(rds.deregister_db_proxy_targets, DBProxyName="api-pg2",
                 DBInstanceIdentifiers=["pg-9"]) == ("DBProxyTargetNotFoundFault", 404)
    rds.deregister_db_proxy_targets(DBProxyName="api-pg2", TargetGroupName="default",
                                    DBInstanceIdentifiers=["pg-2"])
    assert rds.describe_db_proxy_targets(DBProxyName="api-pg2")["Targets"] == []

    # -- DeleteDBProxy: stops listening -------------------------------------------------------------
    deleted = rds.delete_db_proxy(DBProxyName="api-pg2")["DBProxy"]
    assert deleted["Status"] == "deleting"
    proxy.wait_for(lambda: not listening(port), what="the deleted proxy's port to close")
    assert fault(rds.delete_db_proxy, DBProxyName="api-pg2") == ("DBProxyNotFoundFault", 404)
    assert [p["DBProxyName"] for p in rds.describe_db_proxies()["DBProxies"]] == ["test-pg"]


def test_paging_with_marker_and_max_records(api, pg_server):
    proxy, endpoint, path = api
    rds = client(endpoint)
    names = [f"page-{i:02d}" for i in range(21)]
    for name in names:
        rds.create_db_proxy(DBProxyName=name, EngineFamily="POSTGRESQL", Auth=scram_auth(pg_server),
                            RoleArn="arn:aws:iam::123456789012:role/r", VpcSubnetIds=["s"])
    try:
        first = rds.describe_db_proxies(MaxRecords=20)
        assert len(first["DBProxies"]) == 20 and first["Marker"]
        second = rds.describe_db_proxies(MaxRecords=20, Marker=first["Marker"])
        assert "Marker" not in second
        seen = [p["DBProxyName"] for p in first["DBProxies"] + second["DBProxies"]]
        assert sorted(seen) == sorted(names + ["test-pg"])
        paginator = rds.get_paginator("describe_db_proxies")
        pages = list(paginator.paginate(PaginationConfig={"PageSize": 20}))
        assert sum(len(p["DBProxies"]) for p in pages) == 22 and len(pages) == 2
        assert fault(rds.describe_db_proxies, Marker="not-a-marker") == ("InvalidParameterValue", 400)
    finally:
        for name in names:
            rds.delete_db_proxy(DBProxyName=name)


def test_authentication_and_authorisation(api):
    proxy, endpoint, path = api
    from botocore import UNSIGNED
    unsigned = client(endpoint, who=None, signature_version=UNSIGNED)
    assert fault(unsigned.describe_db_proxies) == ("MissingAuthenticationToken", 403)
    assert fault(client(endpoint, secret="wrong-secret").describe_db_proxies) == ("SignatureDoesNotMatch", 403)
    import boto3
    stranger = boto3.client("rds", endpoint_url=endpoint, region_name=REGION,
                            aws_access_key_id="AKIAUNKNOWN00000001", aws_secret_access_key="x")
    assert fault(stranger.describe_db_proxies) == ("InvalidClientTokenId", 403)
    reader = client(endpoint, who="reader")
    assert [p["DBProxyName"] for p in reader.describe_db_proxies()["DBProxies"]] == ["test-pg"]
    assert fault(reader.modify_db_proxy, DBProxyName="test-pg", IdleClientTimeout=60) == ("AccessDenied", 403)
    denied = client(endpoint, who="nomodify")
    assert fault(denied.modify_db_proxy, DBProxyName="test-pg", IdleClientTimeout=60) == ("AccessDenied", 403)
    # an explicit Deny on ModifyDBProxy leaves the other actions allowed
    denied.modify_db_proxy_target_group(DBProxyName="test-pg", TargetGroupName="default",
                                        ConnectionPoolConfig={"ConnectionBorrowTimeout": 31})
    assert proxy.call(lambda: proxy.service.registry.get("test-pg").config.idle_client_timeout) == 1800
