"""The management API and the `rdsproxy` command against an in-process proxy over real PostgreSQL.

One config with two proxies and an Admin listener: `test-pg` in front of the pg_server fixture,
and `dead-pg` whose only target is a port nobody listens on.
"""

import json
import os
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import psycopg
import yaml

try:
    from proxyutil import HOST, InProcessProxy, find_free_port, run_psql, write_proxy_config
except ImportError:
    from tests.integration.proxyutil import (HOST, InProcessProxy, find_free_port, run_psql,
                                             write_proxy_config)


def start_proxies(tmp_path, pg_server):
    """-> (InProcessProxy running test-pg and dead-pg, admin base URL, the closed port)."""
    path = write_proxy_config(tmp_path, pg_server, name="test-pg")
    config = yaml.safe_load(Path(path).read_text())
    dead = json.loads(json.dumps(config["DBProxies"][0]))
    closed_port = find_free_port()  # bound then released: nothing listens there
    dead["DBProxyName"] = "dead-pg"
    dead["TargetGroups"][0]["Targets"] = [
        {"RdsResourceId": "pg-dead", "Endpoint": HOST, "Port": closed_port}]
    config["DBProxies"].append(dead)
    config["Admin"] = {"Listen": f"tcp:0:interface={HOST}"}
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    proxy = InProcessProxy(path)
    try:
        port = proxy.wait_for(lambda: proxy.call(lambda: proxy.service.admin.port), what="admin port")
    except BaseException:
        proxy.stop()
        raise
    return proxy, f"http://{HOST}:{port.getHost().port}", closed_port


def rdsproxy(endpoint, *args):
    """Run the installed `rdsproxy` command (or `python -m txrdsproxy.cli`) -> CompletedProcess."""
    script = os.path.join(os.path.dirname(sys.executable), "rdsproxy")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "txrdsproxy.cli"]
    env = {k: v for k, v in os.environ.items() if k != "RDSPROXY_ENDPOINT"}
    return subprocess.run(cmd + ["--endpoint", endpoint] + list(args), capture_output=True,
                          text=True, timeout=60, env=env)


def describe(endpoint, *args):
    proc = rdsproxy(endpoint, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def figures(endpoint, name="test-pg"):
    return describe(endpoint, "describe-db-proxies", "--db-proxy-name", name)["DBProxies"][0]["txrdsproxy"]


def test_describe_commands_over_a_running_proxy(pg_server, tmp_path):
    proxy, endpoint, closed_port = start_proxies(tmp_path, pg_server)
    try:
        # -- describe-db-proxies: both proxies, listening, in RDS shape ----------------------
        proc = rdsproxy(endpoint, "describe-db-proxies")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith('{\n    "DBProxies": [\n')  # aws --output json layout
        proxies = {p["DBProxyName"]: p for p in json.loads(proc.stdout)["DBProxies"]}
        assert sorted(proxies) == ["dead-pg", "test-pg"]
        live = proxies["test-pg"]
        assert live["Status"] == "available"
        assert live["DBProxyArn"] == "arn:aws:rds:local:000000000000:db-proxy:test-pg"
        assert live["EngineFamily"] == "POSTGRESQL"
        assert (live["Endpoint"], live["Port"]) == (HOST, proxy.ports[0])
        assert proxies["dead-pg"]["Port"] == proxy.ports[1]
        assert {a["ClientPasswordAuthType"] for a in live["Auth"]} == {
            "POSTGRES_SCRAM_SHA_256", "POSTGRES_MD5"}
        assert pg_server.users["app_scram"] not in proc.stdout

        # -- describe-db-proxy-target-groups ----------------------------------------------
        groups = describe(endpoint, "describe-db-proxy-target-groups", "--db-proxy-name", "test-pg",
                          "--target-group-name", "default")["TargetGroups"]
        assert len(groups) == 1
        assert groups[0]["TargetGroupName"] == "default" and groups[0]["IsDefault"] is True
        assert groups[0]["Status"] == "available"
        assert groups[0]["ConnectionPoolConfig"]["MaxConnectionsPercent"] == 100
        assert groups[0]["ConnectionPoolConfig"]["ConnectionBorrowTimeout"] == 30

        # -- targets: REGISTERING before any attempt, AVAILABLE after a successful login --------
        (target,) = describe(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "test-pg")["Targets"]
        assert target["TargetHealth"] == {"State": "REGISTERING"}
        result = run_psql(proxy, pg_server, ["-tAc", "select 1"])
        assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr
        (target,) = describe(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "test-pg")["Targets"]
        assert target["TargetHealth"] == {"State": "AVAILABLE"}
        assert target["Role"] == "READ_WRITE"
        assert (target["RdsResourceId"], target["Endpoint"], target["Port"], target["Type"]) == (
            "pg-1", pg_server.host, pg_server.port, "RDS_INSTANCE")

        # -- live figures: a pinned session inside a transaction ------------------------------
        with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as conn:
            conn.execute("SET work_mem = '8MB'")  # pins (set_variable)
            now = figures(endpoint)
            assert now["ClientConnections"] == 1
            assert now["Pinned"] == 1 and now["PinReasons"] == {"set_variable": 1}
            assert now["Borrowed"] == 1 and now["DatabaseConnections"] >= 1
            assert now["MaxDatabaseConnectionsAllowed"] == 100  # 100% of the fixture's 100
            assert now["Waiting"] == 0
        proxy.wait_for(lambda: figures(endpoint)["ClientConnections"] == 0, what="session end")
        assert figures(endpoint)["Pinned"] == 0

        # -- a target on a closed port: UNAVAILABLE after the failed borrow ---------------------
        (dead,) = describe(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "dead-pg")["Targets"]
        assert dead["TargetHealth"]["State"] == "REGISTERING"
        failed = run_psql(types.SimpleNamespace(host=HOST, port=proxy.ports[1]), pg_server,
                          ["-tAc", "select 1"])
        assert failed.returncode != 0
        (dead,) = describe(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "dead-pg")["Targets"]
        health = dead["TargetHealth"]
        assert health["State"] == "UNAVAILABLE" and health["Reason"] == "CONNECTION_FAILED"
        assert f"{HOST}:{closed_port}" in health["Description"]
        assert dead["Role"] == "READ_WRITE"  # the only target is still the writer
        # The live proxy is unaffected.
        (target,) = describe(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "test-pg")["Targets"]
        assert target["TargetHealth"]["State"] == "AVAILABLE"

        # -- errors: API error 254, unreachable endpoint 255 ---------------------------------
        proc = rdsproxy(endpoint, "describe-db-proxy-targets", "--db-proxy-name", "nope")
        assert proc.returncode == 254 and proc.stdout == ""
        assert "(DBProxyNotFoundFault) when calling the DescribeDBProxyTargets operation" in proc.stderr
        proc = rdsproxy(endpoint, "describe-db-proxy-target-groups", "--db-proxy-name", "test-pg",
                        "--target-group-name", "other")
        assert proc.returncode == 254 and "DBProxyTargetGroupNotFoundFault" in proc.stderr
        proc = rdsproxy(f"http://{HOST}:{closed_port}", "describe-db-proxies")
        assert proc.returncode == 255 and "Could not connect to the endpoint URL" in proc.stderr

        # /metrics and /healthz still answer on the same listener.
        with urllib.request.urlopen(endpoint + "/healthz", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(endpoint + "/metrics", timeout=10) as r:
            assert b'rdsproxy_DatabaseConnectionsSetupFailed{ProxyName="dead-pg"' in r.read()
    finally:
        proxy.stop()
    # Stopped: the admin port is released.
    assert proxy.call(lambda: proxy.service.admin.port) is None
