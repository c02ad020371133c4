"""The pieces `make demo`'s failover path uses (scripts/demo.py), on real servers.

Starting the whole demo (four servers and a twistd) takes well over a minute on a loaded
machine, so the demo's parts are tested here one by one, each as the demo uses it:

- the configuration the demo writes loads with the proxy's own loader (both proxies, their
  READ_ONLY endpoints, the target groups of writer + standby/replica);
- `demo.py failover postgresql` (`failover_postgresql`, working from the state the demo writes
  to .state/demo/current.json): the primary stops and the standby is promoted; a session opened
  through a proxy configured like the demo's answers from the promoted standby afterwards, over
  the same client connection; a second call refuses (PostgreSQL fails over once per demo).

`demo.py failover mysql` (`failover_mysql`, a switchover back and forth) is exercised at the end
of test_mysql_readers.py, on the replication that test already runs.
"""

import importlib.util
import json
import os
import types
from pathlib import Path

import psycopg  # test extras: a missing driver must fail, not skip
import pytest

from txrdsproxy.config.load import load_config

REPO = Path(__file__).resolve().parents[2]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_the_demo_writes_loads(tmp_path):
    demo = load_demo()
    args = types.SimpleNamespace(password="pw", pg_port=0, mysql_port=0, no_mysql=False, keep=False)
    d = demo.Demo(args)
    d.state_dir = str(tmp_path)
    d.pg, d.pg_standby = types.SimpleNamespace(port=15432), types.SimpleNamespace(port=15433)
    d.maria, d.maria_replica = types.SimpleNamespace(port=13306), types.SimpleNamespace(port=13307)
    path = d.write_config()
    assert os.stat(tmp_path / "secrets.json").st_mode & 0o077 == 0  # passwords: owner only
    config = load_config(path)
    proxies = {p.name: p for p in config.proxies}
    assert set(proxies) == {"demo-pg", "demo-mysql"}
    for name, ports in (("demo-pg", [15432, 15433]), ("demo-mysql", [13306, 13307])):
        proxy = proxies[name]
        assert [t.port for t in proxy.target_group.targets] == ports  # writer first
        assert proxy.health_check_interval == demo.HEALTH_CHECK_INTERVAL
        [endpoint] = proxy.endpoints
        assert (endpoint.name, endpoint.target_role) == (name + "-ro", "READ_ONLY")
    assert json.loads((tmp_path / "secrets.json").read_text())[demo.PG_ARN]["username"] == demo.USER


def test_demo_failover_postgresql_promotes_the_standby_under_a_running_proxy(
        pg_server_factory, pg_proxy_factory, tmp_path):
    demo = load_demo()
    primary = pg_server_factory(max_connections=20)
    primary.create_user("app_scram", "demo-pass", method="scram-sha-256")
    primary.create_database("appdb", owner="app_scram")
    standby = primary.start_standby(tmp_path / "standby")
    try:
        proxy = pg_proxy_factory(server=primary, targets=[primary, standby],
                                 HealthCheckInterval=1, ConnectionBorrowTimeout=60)
        state = {"postgresql": {"primary": demo._pg_state(primary), "standby": demo._pg_state(standby)}}
        with psycopg.connect(proxy.dsn(primary), autocommit=True) as session:
            assert session.execute("SELECT inet_server_port()").fetchone()[0] == primary.port
            demo.failover_postgresql(state)
            assert not (primary.data_dir / "postmaster.pid").exists()  # the primary is down
            # the same client connection, on the promoted standby (the query waits in the
            # proxy until the health checks have found it: ConnectionBorrowTimeout)
            assert session.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone() == (
                standby.port, False)
        with pytest.raises(SystemExit, match="promoted already"):
            demo.failover_postgresql(state)
    finally:
        standby.stop()
