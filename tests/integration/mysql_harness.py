"""MySQL proxies for the integration tests, on `proxyutil.InProcessProxy` (the reactor thread).

`write_mysql_config(dir, mariadb_server, **overrides)` writes secrets.json and proxy.yaml for an
EngineFamily MYSQL proxy in front of the fixture server; `start_mysql_proxy(...)` starts it.
"""

from pathlib import Path

try:
    from proxyutil import InProcessProxy, write_config
except ImportError:  # tests/ became a package
    from tests.integration.proxyutil import InProcessProxy, write_config

NATIVE_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_native"
SHA2_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_sha2"


def write_mysql_config(dir, server, secrets=None, name="test-mysql", targets=None, **overrides):
    """-> path of proxy.yaml.  *secrets*: {arn: (user, password, ClientPasswordAuthType)}.
    *targets*: the servers of the target group, in order (mariadb-1, mariadb-2, ...; default
    [server])."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    entries = {NATIVE_ARN: ("app_native", server.users["app_native"], "MYSQL_NATIVE_PASSWORD")}
    entries.update(secrets or {})
    rows = [{"RdsResourceId": f"mariadb-{i}", "Endpoint": t.host, "Port": t.port}
            for i, t in enumerate(targets or [server], 1)]
    return write_config(dir, "MYSQL", name, "tcp:0:interface=127.0.0.1", entries, rows, overrides)


def start_mysql_proxy(dir, server, **kwargs):
    return InProcessProxy(write_mysql_config(dir, server, **kwargs))


def kill_connection_ends_only_the_victim(killer, victim):
    """`KILL <victim's id>` from *killer* (PyMySQL connections through the proxy): the victim's
    session ends (its next statement fails), the killer's goes on."""
    import pymysql
    import pytest
    with killer.cursor() as cur:
        cur.execute("KILL %d" % victim.thread_id())
    with pytest.raises(pymysql.err.OperationalError):
        with victim.cursor() as cur:
            cur.execute("SELECT 1")
    with killer.cursor() as cur:
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
