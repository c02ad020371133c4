"""DB proxy endpoints through the RDS Query API, driven by boto3 and the real `aws` CLI against an
in-process proxy over real PostgreSQL: DescribeDBProxyEndpoints, CreateDBProxyEndpoint (the new
endpoint listens at once), ModifyDBProxyEndpoint, DeleteDBProxyEndpoint (it stops listening), the
faults, the file keeping the change, and DescribeDBProxies' Endpoint with its port."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

try:
    from rdsapi_util import ACCOUNT, REGION, aws_env, client, start, fault, listening
    from proxyutil import HOST
except ImportError:
    from tests.integration.rdsapi_util import ACCOUNT, REGION, aws_env, client, start, fault, listening
    from tests.integration.proxyutil import HOST


def aws(endpoint, *args):
    """`aws rds ARGS --endpoint-url ENDPOINT --output json` -> parsed JSON (asserting success)."""
    path = os.path.join(os.path.dirname(sys.executable), "aws")
    command = [path] if os.path.exists(path) else [shutil.which("aws")]
    if command[0] is None:
        if os.environ.get("CI") == "true":
            pytest.fail("aws is not installed (pip install -e '.[test]')")
        pytest.skip("aws is not installed")
    proc = subprocess.run(command + ["rds"] + list(args) + ["--endpoint-url", endpoint, "--output", "json"],
                          capture_output=True, text=True, timeout=120, env=aws_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def _free_port():
    from txrdsproxy.testing.servers import find_free_port  # outside the ephemeral range
    return find_free_port(HOST)


@pytest.fixture(scope="module")
def api(pg_server, tmp_path_factory):
    proxy, endpoint, path = start(tmp_path_factory.mktemp("rdsapi-endpoints"), pg_server)
    yield proxy, endpoint, path
    proxy.stop()


def test_proxy_endpoints_with_boto3_and_the_aws_cli(api, pg_server):
    proxy, endpoint, path = api
    rds = client(endpoint)
    proxy_port = proxy.port

    # DescribeDBProxies' Endpoint names the address clients connect to, port included.
    (described,) = rds.describe_db_proxies(DBProxyName="test-pg")["DBProxies"]
    assert described["Endpoint"] == f"{HOST}:{proxy_port}"

    # The default endpoint is listed (IsDefault, READ_WRITE).
    (default,) = rds.describe_db_proxy_endpoints(DBProxyName="test-pg")["DBProxyEndpoints"]
    assert (default["DBProxyEndpointName"], default["IsDefault"], default["TargetRole"]) == (
        "default", True, "READ_WRITE")
    assert default["Endpoint"] == f"{HOST}:{proxy_port}" and default["Status"] == "available"

    # CreateDBProxyEndpoint: a READ_ONLY endpoint listens at once, where its tag says.
    port = _free_port()
    created = rds.create_db_proxy_endpoint(
        DBProxyName="test-pg", DBProxyEndpointName="test-pg-ro", VpcSubnetIds=["subnet-1"],
        TargetRole="READ_ONLY", Tags=[{"Key": "txrdsproxy:Listen",
                                       "Value": f"tcp:{port}:interface={HOST}"}])["DBProxyEndpoint"]
    assert created["DBProxyEndpointName"] == "test-pg-ro" and created["TargetRole"] == "READ_ONLY"
    assert created["IsDefault"] is False and created["Endpoint"] == f"{HOST}:{port}"
    assert created["DBProxyEndpointArn"].startswith(
        f"arn:aws:rds:{REGION}:{ACCOUNT}:db-proxy-endpoint:prx-endpoint-")
    assert created["VpcSubnetIds"] == ["subnet-1"]
    assert listening(port)
    assert fault(rds.create_db_proxy_endpoint, DBProxyName="test-pg", DBProxyEndpointName="test-pg-ro",
                 VpcSubnetIds=["s"]) == ("DBProxyEndpointAlreadyExistsFault", 400)
    assert fault(rds.create_db_proxy_endpoint, DBProxyName="nope", DBProxyEndpointName="x",
                 VpcSubnetIds=["s"]) == ("DBProxyNotFoundFault", 404)
    saved = yaml.safe_load(Path(path).read_text())["DBProxies"][0]["Endpoints"]
    assert saved == [{"DBProxyEndpointName": "test-pg-ro", "TargetRole": "READ_ONLY",
                      "Listen": f"tcp:{port}:interface={HOST}", "VpcSubnetIds": ["subnet-1"]}]

    # The proxy's only target is its writer: the reader endpoint has no replica and says so
    # (it never sends the session to the writer).
    dsn = (f"host={HOST} port={port} user=app_scram password={pg_server.users['app_scram']}"
           " dbname=appdb")
    with pytest.raises(psycopg.OperationalError, match="No healthy read replica is available for "
                                                        "proxy endpoint test-pg-ro"):
        psycopg.connect(dsn).close()

    # The aws CLI reads the same, and the filter/name forms work.
    out = aws(endpoint, "describe-db-proxy-endpoints", "--db-proxy-name", "test-pg")
    assert [e["DBProxyEndpointName"] for e in out["DBProxyEndpoints"]] == ["default", "test-pg-ro"]
    out = aws(endpoint, "describe-db-proxy-endpoints", "--db-proxy-endpoint-name", "test-pg-ro")
    assert [e["Endpoint"] for e in out["DBProxyEndpoints"]] == [f"{HOST}:{port}"]
    assert fault(rds.describe_db_proxy_endpoints, DBProxyEndpointName="nope") == (
        "DBProxyEndpointNotFoundFault", 404)

    # ModifyDBProxyEndpoint: a new name and security groups; same listener.
    modified = aws(endpoint, "modify-db-proxy-endpoint", "--db-proxy-endpoint-name", "test-pg-ro",
                   "--new-db-proxy-endpoint-name", "test-pg-reader",
                   "--vpc-security-group-ids", "sg-1")["DBProxyEndpoint"]
    assert modified["DBProxyEndpointName"] == "test-pg-reader"
    assert modified["VpcSecurityGroupIds"] == ["sg-1"]
    assert listening(port)
    assert fault(rds.modify_db_proxy_endpoint, DBProxyEndpointName="test-pg-ro",
                 NewDBProxyEndpointName="x") == ("DBProxyEndpointNotFoundFault", 404)
    assert fault(rds.modify_db_proxy_endpoint, DBProxyEndpointName="default",
                 NewDBProxyEndpointName="x") == ("InvalidDBProxyEndpointStateFault", 400)

    # DeleteDBProxyEndpoint: it stops listening; the default endpoint is untouched.
    deleted = rds.delete_db_proxy_endpoint(DBProxyEndpointName="test-pg-reader")["DBProxyEndpoint"]
    assert deleted["Status"] == "deleting"
    proxy.wait_for(lambda: not listening(port), what="the deleted endpoint's port to close")
    assert listening(proxy_port)
    assert fault(rds.delete_db_proxy_endpoint, DBProxyEndpointName="test-pg-reader") == (
        "DBProxyEndpointNotFoundFault", 404)
    assert [e["DBProxyEndpointName"] for e in
            rds.describe_db_proxy_endpoints()["DBProxyEndpoints"]] == ["default"]
    assert "Endpoints" not in yaml.safe_load(Path(path).read_text())["DBProxies"][0]


def test_a_reader_endpoint_with_fallback_uses_the_writer_when_there_is_no_replica(api, pg_server):
    proxy, endpoint, path = api
    rds = client(endpoint)
    created = rds.create_db_proxy_endpoint(
        DBProxyName="test-pg", DBProxyEndpointName="test-pg-fallback", VpcSubnetIds=["subnet-1"],
        TargetRole="READ_ONLY", Tags=[{"Key": "txrdsproxy:FallbackToWriter", "Value": "true"}])
    try:
        host, port = created["DBProxyEndpoint"]["Endpoint"].rsplit(":", 1)
        saved = yaml.safe_load(Path(path).read_text())["DBProxies"][0]["Endpoints"]
        assert saved[0]["Listen"] == f"tcp:{port}:interface={HOST}"  # the free port it got
        assert saved[0]["FallbackToWriter"] is True
        with psycopg.connect(host=host, port=int(port), user="app_scram", dbname="appdb",
                             password=pg_server.users["app_scram"]) as conn:
            assert conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone() == (
                False, pg_server.port)
    finally:
        rds.delete_db_proxy_endpoint(DBProxyEndpointName="test-pg-fallback")
