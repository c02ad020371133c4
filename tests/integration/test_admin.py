"""The `aws rds ... --endpoint-url` command line and `rdsproxy` against the admin listener of an
in-process proxy over real PostgreSQL: every DB proxy operation, output formats, exit statuses,
the demo's unsigned loopback reads, and /metrics and /healthz on the same listener."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

try:
    from rdsapi_util import ACCOUNT, aws_env, start
    from proxyutil import HOST, SCRAM_ARN, find_free_port, run_psql
except ImportError:
    from tests.integration.rdsapi_util import ACCOUNT, aws_env, start
    from tests.integration.proxyutil import HOST, SCRAM_ARN, find_free_port, run_psql


def _script(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return [path]
    found = shutil.which(name)
    if found:
        return [found]
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
    pytest.skip(f"{name} is not installed")


def aws(endpoint, *args, who="admin"):
    """`aws rds ARGS --endpoint-url ENDPOINT --output json` -> parsed JSON (asserting success)."""
    proc = subprocess.run(_script("aws") + ["rds"] + list(args) + ["--endpoint-url", endpoint, "--output", "json"],
                          capture_output=True, text=True, timeout=120, env=aws_env(who))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def rdsproxy(endpoint, *args, who="admin", env=None):
    cmd = _script("rdsproxy")
    environment = env if env is not None else aws_env(who)
    environment = {k: v for k, v in environment.items() if k != "RDSPROXY_ENDPOINT"}
    return subprocess.run(cmd + ["--endpoint-url", endpoint] + list(args), capture_output=True,
                          text=True, timeout=120, env=environment)


@pytest.fixture(scope="module")
def admin(pg_server, tmp_path_factory):
    proxy, endpoint, path = start(tmp_path_factory.mktemp("admin"), pg_server, anonymous_reads=True)
    yield proxy, endpoint, path
    proxy.stop()


def test_every_operation_with_the_aws_command_line(admin, pg_server):
    proxy, endpoint, path = admin
    auth = f"AuthScheme=SECRETS,SecretArn={SCRAM_ARN},IAMAuth=DISABLED,ClientPasswordAuthType=POSTGRES_SCRAM_SHA_256"
    created = aws(endpoint, "create-db-proxy", "--db-proxy-name", "cli-pg", "--engine-family", "POSTGRESQL",
                  "--role-arn", f"arn:aws:iam::{ACCOUNT}:role/proxy", "--vpc-subnet-ids", "subnet-1",
                  "--auth", auth)["DBProxy"]
    assert created["Status"] == "available"
    assert [p["DBProxyName"] for p in aws(endpoint, "describe-db-proxies")["DBProxies"]] == ["test-pg", "cli-pg"]
    aws(endpoint, "register-db-proxy-targets", "--db-proxy-name", "cli-pg", "--db-instance-identifiers", "pg-2")
    (target,) = aws(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "cli-pg")["Targets"]
    assert target["RdsResourceId"] == "pg-2" and target["TargetHealth"]["State"] == "REGISTERING"
    group = aws(endpoint, "modify-db-proxy-target-group", "--db-proxy-name", "cli-pg", "--target-group-name",
                "default", "--connection-pool-config",
                "MaxConnectionsPercent=50,MaxIdleConnectionsPercent=10")["DBProxyTargetGroup"]
    assert group["ConnectionPoolConfig"]["MaxConnectionsPercent"] == 50
    (group,) = aws(endpoint, "describe-db-proxy-target-groups", "--db-proxy-name", "cli-pg")["TargetGroups"]
    assert group["ConnectionPoolConfig"]["MaxIdleConnectionsPercent"] == 10
    modified = aws(endpoint, "modify-db-proxy", "--db-proxy-name", "cli-pg", "--idle-client-timeout", "120",
                   "--debug-logging")["DBProxy"]
    assert modified["IdleClientTimeout"] == 120 and modified["DebugLogging"] is True
    aws(endpoint, "deregister-db-proxy-targets", "--db-proxy-name", "cli-pg", "--db-instance-identifiers", "pg-2")
    assert aws(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "cli-pg")["Targets"] == []
    assert aws(endpoint, "delete-db-proxy", "--db-proxy-name", "cli-pg")["DBProxy"]["Status"] == "deleting"
    proc = subprocess.run(_script("aws") + ["rds", "describe-db-proxies", "--db-proxy-name", "cli-pg",
                                            "--endpoint-url", endpoint], capture_output=True, text=True,
                          timeout=120, env=aws_env())
    # (aws v1 exits 255 for an API error; v2 and rdsproxy 254)
    assert proc.returncode in (254, 255) and "(DBProxyNotFoundFault) when calling" in proc.stderr


def test_rdsproxy_command(admin, pg_server):
    proxy, endpoint, path = admin
    # describe, in the three output formats
    proc = rdsproxy(endpoint, "describe-db-proxies")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('{\n    "DBProxies": [\n')
    assert [p["DBProxyName"] for p in json.loads(proc.stdout)["DBProxies"]] == ["test-pg"]
    assert pg_server.users["app_scram"] not in proc.stdout  # secrets never in API output
    proc = rdsproxy(endpoint, "--output", "text", "describe-db-proxy-targets", "--db-proxy-name", "test-pg")
    assert proc.returncode == 0 and proc.stdout.startswith("TARGETS\t"), proc.stderr
    proc = rdsproxy(endpoint, "--output", "table", "describe-db-proxy-target-groups", "--db-proxy-name", "test-pg")
    assert proc.returncode == 0 and "DescribeDBProxyTargetGroups" in proc.stdout
    # a change, with the aws command's flag names
    proc = rdsproxy(endpoint, "modify-db-proxy-target-group", "--db-proxy-name", "test-pg",
                    "--target-group-name", "default", "--connection-pool-config",
                    "MaxConnectionsPercent=90,MaxIdleConnectionsPercent=45,ConnectionBorrowTimeout=30")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["DBProxyTargetGroup"]["ConnectionPoolConfig"]["MaxConnectionsPercent"] == 90
    # targets: REGISTERING, then AVAILABLE after a login
    result = run_psql(proxy, pg_server, ["-tAc", "select 1"])
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr
    (target,) = json.loads(rdsproxy(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "test-pg").stdout)["Targets"]
    assert target["TargetHealth"] == {"State": "AVAILABLE"} and target["Role"] == "READ_WRITE"
    # errors: 254 from the API, 255 unreachable, 252 usage
    proc = rdsproxy(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "nope")
    assert proc.returncode == 254 and proc.stdout == ""
    assert "(DBProxyNotFoundFault) when calling the DescribeDBProxyTargets operation" in proc.stderr
    proc = rdsproxy(endpoint, "modify-db-proxy", "--db-proxy-name", "test-pg", "--debug-logging", who="reader")
    assert proc.returncode == 254 and "(AccessDenied)" in proc.stderr
    proc = rdsproxy(f"http://{HOST}:{find_free_port()}", "describe-db-proxies")
    assert proc.returncode == 255 and "Could not connect to the endpoint URL" in proc.stderr
    # the demo's switch: no credentials at all, reads from loopback work, writes do not
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    proc = rdsproxy(endpoint, "describe-db-proxies", env=bare)
    assert proc.returncode == 0, proc.stderr
    proc = rdsproxy(endpoint, "delete-db-proxy", "--db-proxy-name", "test-pg", env=bare)
    assert proc.returncode == 254 and "MissingAuthenticationToken" in proc.stderr
    # rdsproxy reload: applies the edited file; an invalid one changes nothing and names the key
    from pathlib import Path
    import yaml
    good = Path(path).read_text()
    data = yaml.safe_load(good)
    data["DBProxies"][0]["IdleClientTimeout"] = 700
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    proc = rdsproxy(endpoint, "reload")
    assert proc.returncode == 0 and "changed proxy test-pg: idle_client_timeout" in proc.stdout, proc.stderr
    assert proxy.call(lambda: proxy.service.registry.get("test-pg").config.idle_client_timeout) == 700
    data["DBProxies"][0]["IdleClientTimeout"] = "soon"
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    proc = rdsproxy(endpoint, "reload")
    assert proc.returncode == 254 and "(InvalidConfiguration)" in proc.stderr
    assert "DBProxies[0].IdleClientTimeout: must be a number" in proc.stderr
    assert proxy.call(lambda: proxy.service.registry.get("test-pg").config.idle_client_timeout) == 700
    proc = rdsproxy(endpoint, "reload", who="reader")
    assert proc.returncode == 254 and "(AccessDenied)" in proc.stderr
    data["DBProxies"][0]["IdleClientTimeout"] = 700
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    assert rdsproxy(endpoint, "reload").returncode == 0
    # /metrics and /healthz on the same listener
    with urllib.request.urlopen(endpoint + "/healthz", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(endpoint + "/metrics", timeout=10) as r:
        assert b'proxy_name="test-pg"' in r.read()
