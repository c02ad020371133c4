"""The pool does not churn at the RDS defaults (issue 7 items 1-2), on both engines.

Steady load: 20 clients on a pool of 20 (MaxConnectionsPercent 20 of max_connections 100), no
MaxIdleConnectionsPercent in the file (so the RDS default, half: an idle cap of 10).  The
database counts the sessions it accepted (PostgreSQL `pg_stat_database.sessions` of a database
only this test uses; MariaDB's `Connections` status counter): they stay within the pool size
plus a small margin.  Once the load stops, IdleConnectionTimeout is lowered (as
ModifyDBProxyTargetGroup does) and the idle connections fall to the idle cap, oldest first.
Counts, never timings: during the load the idle lifetime is long, so a client thread that the
machine's load stalls for a while cannot make its connection look idle long enough to be closed
(which is the janitor's job, not churn).
"""

import dataclasses

import subprocess
import threading

import pymysql  # test extras: a missing driver must fail, not skip

try:
    from proxyutil import PGBENCH, client_env
    from mysql_harness import start_mysql_proxy
except ImportError:
    from tests.integration.proxyutil import PGBENCH, client_env
    from tests.integration.mysql_harness import start_mysql_proxy

CLIENTS = 20
POOL = 20          # MaxConnectionsPercent 20 of max_connections 100
IDLE_CAP = 10      # the RDS default: half of MaxConnectionsPercent
MARGIN = 3         # the greeting probe (MySQL) and a replaced connection or two
RDS_DEFAULTS = dict(MaxConnectionsPercent=20, MaxIdleConnectionsPercent=None,
                    IdleConnectionTimeout=600, ConnectionBorrowTimeout=60)
AFTER_LOAD_IDLE_TIMEOUT = 0.5


def lower_idle_timeout(proxy):
    """The load is over: IdleConnectionTimeout becomes AFTER_LOAD_IDLE_TIMEOUT, applied to the
    running proxy as an API change or a reload applies it (ProxyRuntime.apply)."""
    def change():
        runtime = next(r for r in proxy.service.registry if r.ctx is proxy.ctx)
        config = runtime.config
        group = config.target_group
        pool = dataclasses.replace(group.connection_pool_config,
                                   idle_connection_timeout=AFTER_LOAD_IDLE_TIMEOUT)
        runtime.apply(dataclasses.replace(
            config, target_group=dataclasses.replace(group, connection_pool_config=pool)))
    proxy.call(change)
CHURN_DB = "churn_test"


def _pg_sessions(server):
    return int(server.psql("select sessions from pg_stat_database where datname = '%s'"
                           % CHURN_DB).strip())


def test_pg_steady_load_opens_no_more_than_the_pool_then_idles_down_to_the_cap(
        pg_server, pg_proxy_factory, tmp_path):
    pg_server.create_database(CHURN_DB, owner="appdb_owner")
    before = _pg_sessions(pg_server)
    proxy = pg_proxy_factory(**RDS_DEFAULTS)
    assert proxy.ctx.config.target_group.connection_pool_config.max_idle_connections_percent == 10
    script = tmp_path / "select1.sql"
    script.write_text("SELECT 1;\n")
    per_client = 150
    run = subprocess.run(
        [PGBENCH, "-n", "-f", str(script), "-c", str(CLIENTS), "-j", "2", "-t", str(per_client),
         "-h", proxy.host, "-p", str(proxy.port), "-U", "app_scram", CHURN_DB],
        capture_output=True, text=True, timeout=300,
        env=client_env(pg_server.users["app_scram"]))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "number of transactions actually processed: %d/%d" % (
        CLIENTS * per_client, CLIENTS * per_client) in run.stdout, run.stdout

    # Load stopped: after IdleConnectionTimeout the idle connections fall to the idle cap.
    lower_idle_timeout(proxy)
    state = proxy.wait_for(lambda: (lambda s: s if s == {"idle": IDLE_CAP} else None)(
        proxy.pool_state()), what="idle connections down to the idle cap")
    assert state == {"idle": IDLE_CAP}
    assert "above MaxIdleConnectionsPercent" in proxy.logs.text()
    # The server agrees: IDLE_CAP backends of the proxy's user are left on the database.
    live = lambda: int(pg_server.psql(  # noqa: E731
        "select count(*) from pg_stat_activity where datname = '%s'" % CHURN_DB).strip())
    proxy.wait_for(lambda: live() == IDLE_CAP, what="trimmed backends gone")

    proxy.stop()  # the backends exit and flush their statistics
    proxy.wait_for(lambda: live() == 0, what="proxy's backends gone")
    opened = _pg_sessions(pg_server) - before
    assert IDLE_CAP <= opened <= POOL + MARGIN, (
        f"{opened} database sessions for {CLIENTS} clients on a pool of {POOL}")


def test_mysql_steady_load_opens_no_more_than_the_pool_then_idles_down_to_the_cap(
        mariadb_server, tmp_path):
    admin = pymysql.connect(host=mariadb_server.host, port=mariadb_server.port, user="root",
                            password=mariadb_server.root_password, autocommit=True)

    def connections():
        with admin.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
            return int(cur.fetchone()[1])

    def live():
        with admin.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'app_native'")
            return cur.fetchone()[0]

    proxy = start_mysql_proxy(tmp_path / "proxy", mariadb_server, **RDS_DEFAULTS)
    try:
        before = connections()
        per_client, errors = 100, []
        clients = [pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                                   password=mariadb_server.users["app_native"], database="appdb",
                                   autocommit=True) for _ in range(CLIENTS)]
        start = threading.Barrier(CLIENTS)

        def work(conn, n):
            try:
                start.wait(60)
                with conn.cursor() as cur:
                    for i in range(per_client):
                        cur.execute("SELECT %s", (n * 1000 + i,))
                        assert cur.fetchone() == (n * 1000 + i,)
            except Exception as e:  # reported below
                errors.append(f"client {n}: {e!r}")

        threads = [threading.Thread(target=work, args=(c, n)) for n, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for c in clients:
            c.close()
        assert not errors, errors[:5]
        opened = connections() - before
        assert IDLE_CAP <= opened <= POOL + MARGIN, (
            f"{opened} database connections for {CLIENTS} clients on a pool of {POOL}")

        lower_idle_timeout(proxy)
        state = proxy.wait_for(lambda: (lambda s: s if s == {"idle": IDLE_CAP} else None)(
            proxy.pool_state()), what="idle connections down to the idle cap")
        assert state == {"idle": IDLE_CAP}
        proxy.wait_for(lambda: live() == IDLE_CAP, what="trimmed connections gone from the server")
        assert connections() - before == opened, "trimming opened nothing"
    finally:
        proxy.stop()
        admin.close()
