"""/metrics of a real proxy under load: every CloudWatch metric and our pool figures, read over HTTP
from the admin listener while real clients (pgbench, psql over TLS, psycopg, PyMySQL) use it."""

import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pymysql
import yaml
from prometheus_client.parser import text_string_to_metric_families

try:
    from mysql_harness import write_mysql_config
    from proxyutil import HOST, PGBENCH, InProcessProxy, client_env, run_psql, write_proxy_config
except ImportError:
    from tests.integration.mysql_harness import write_mysql_config
    from tests.integration.proxyutil import (HOST, PGBENCH, InProcessProxy, client_env, run_psql,
                                             write_proxy_config)

from txrdsproxy.testing.certs import write_self_signed


class Scraper:
    """GET /metrics of one in-process proxy's admin listener, parsed by prometheus_client."""

    def __init__(self, proxy):
        port = proxy.wait_for(lambda: proxy.call(lambda: proxy.service.admin.port), what="admin port")
        self.url = f"http://{HOST}:{port.getHost().port}/metrics"

    def text(self):
        with urllib.request.urlopen(self.url, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.read().decode()

    def samples(self):
        """-> {(sample name, ((label, value), ...)): value} of one scrape."""
        out = {}
        for family in text_string_to_metric_families(self.text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name, **labels):
        return self.samples().get((name, tuple(sorted(labels.items()))))


def start_with_admin(config_path):
    config = yaml.safe_load(Path(config_path).read_text())
    config["Admin"] = {"Listen": f"tcp:0:interface={HOST}"}
    Path(config_path).write_text(yaml.safe_dump(config, sort_keys=False))
    return InProcessProxy(config_path)


def test_postgresql_metrics_under_load(pg_server, tmp_path):
    cert = write_self_signed(str(tmp_path))
    path = write_proxy_config(tmp_path, pg_server, name="m-pg",
                              TLS={"CertificateFile": cert[0], "PrivateKeyFile": cert[1]},
                              DatabaseTLS={"Mode": "disable"},  # the fixture server has no TLS
                              MaxConnectionsPercent=10, MaxIdleConnectionsPercent=10)
    proxy = start_with_admin(path)
    try:
        scrape = Scraper(proxy)
        P = {"proxy_name": "m-pg"}
        T = dict(P, target_group="default", target="pg-1")
        script = tmp_path / "select.sql"
        script.write_text("SELECT 1;\n")
        # -- load: pgbench, 4 clients x 150 transactions, while we look ----------------------------
        bench = subprocess.Popen(
            [PGBENCH, "-n", "-h", HOST, "-p", str(proxy.port), "-U", "app_scram", "-c", "4",
             "-t", "150", "-f", str(script), "appdb"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=client_env(pg_server.users["app_scram"]))
        # A pinned session and a session inside a transaction, held through the load.
        pinned = psycopg.connect(proxy.dsn(pg_server, sslmode="disable"), autocommit=True)
        pinned.execute("SET work_mem = '8MB'")
        in_txn = psycopg.connect(proxy.dsn(pg_server, sslmode="disable"))  # opens a transaction
        in_txn.execute("SELECT 1")
        during = scrape.samples()
        out, _ = bench.communicate(timeout=120)
        assert bench.returncode == 0, out
        # -- TLS and a failed login ----------------------------------------------------------
        for _ in range(3):
            r = run_psql(proxy, pg_server, ["-tAc", "select 1"], PGSSLMODE="require")
            assert r.returncode == 0, r.stderr
        bad = run_psql(proxy, pg_server, ["-tAc", "select 1"], PGPASSWORD="wrong")
        assert bad.returncode != 0
        s = scrape.samples()

        def v(name, **labels):
            return s.get((name, tuple(sorted(labels.items()))))

        # Consistency under load: what was open is within the cap.
        assert during[("rdsproxy_database_connections", tuple(sorted(T.items())))] <= 10
        # Current figures: the pinned session and the open transaction.
        assert v("rdsproxy_client_connections", **P) == 2
        assert v("rdsproxy_client_connections_no_tls", **P) == 2
        assert v("rdsproxy_client_connections_tls", **P) == 0
        assert v("rdsproxy_database_connections_currently_session_pinned", **T) == 1
        assert v("rdsproxy_database_connections_currently_in_transaction", **T) == 1
        assert v("rdsproxy_database_connections_currently_borrowed", **T) == 2
        assert v("rdsproxy_sessions_pinned", reason="set_variable", **P) == 1
        assert v("rdsproxy_client_sessions", state="pinned", **P) == 1
        assert v("rdsproxy_client_sessions", state="borrowed", **P) == 1
        assert v("rdsproxy_database_connections", **T) >= 2
        assert v("rdsproxy_database_connections_with_tls", **T) == 0  # no database TLS here
        assert v("rdsproxy_max_database_connections_allowed", **T) == 10  # 10% of 100
        assert v("rdsproxy_availability_percentage", target_group="default",
                 target_role="READ_WRITE", **P) == 100.0
        assert v("rdsproxy_target_available", target_group="default", target="pg-1",
                 target_role="READ_WRITE", **P) == 1
        assert v("rdsproxy_client_connections_waiting", target_group="default", **P) == 0
        # Counters: 4 pgbench clients (pgbench adds one connection of its own), 2 held, 3 TLS
        # logins, 1 refused; everything but the 2 held sessions has closed.
        received = v("rdsproxy_client_connections_received_total", **P)
        assert received in (10, 11)
        assert v("rdsproxy_client_connections_setup_failed_auth_total", **P) == 1
        assert v("rdsproxy_client_connections_setup_succeeded_total", **P) == received - 1
        assert v("rdsproxy_client_connections_closed_total", **P) == received - 2
        queries = v("rdsproxy_query_requests_total", **P)
        assert queries >= 4 * 150 + 3 + 2
        assert v("rdsproxy_query_requests_tls_total", **P) == 3
        assert v("rdsproxy_query_requests_no_tls_total", **P) == queries - 3
        requests = v("rdsproxy_database_connection_requests_total", **T)
        assert requests >= 2 and requests == v("rdsproxy_database_connections_setup_succeeded_total", **T)
        assert v("rdsproxy_database_connections_setup_failed_total", **T) is None  # none failed
        assert v("rdsproxy_database_connection_requests_with_tls_total", **T) is None
        assert v("rdsproxy_session_pins_total", reason="set_variable", **P) == 1
        # Latencies: one observation per request (each of the 600 pgbench transactions is one).
        assert v("rdsproxy_query_response_latency_seconds_count", **P) >= 4 * 150
        assert v("rdsproxy_query_database_response_latency_seconds_count", **T) >= 4 * 150
        assert v("rdsproxy_query_response_latency_seconds_sum", **P) >= \
            v("rdsproxy_query_database_response_latency_seconds_sum", **T) > 0
        assert v("rdsproxy_query_response_latency_seconds_bucket", le="+Inf", **P) == \
            v("rdsproxy_query_response_latency_seconds_count", **P)
        assert v("rdsproxy_database_connections_borrow_latency_seconds_count", **P) >= 4 * 150
        pinned.close()
        in_txn.close()
        # The database ends the pool's idle connections: closes counted by reason.
        proxy.wait_for(lambda: scrape.value("rdsproxy_client_connections", **P) == 0,
                       what="held sessions to end")
        pool_size = scrape.value("rdsproxy_database_connections", **T)
        assert pool_size >= 1
        pg_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE usename = 'app_scram' AND pid <> pg_backend_pid()")
        proxy.wait_for(lambda: scrape.value("rdsproxy_database_connections_closed_total",
                                            reason="database_closed", **T) == pool_size,
                       what="closes counted")
        assert scrape.value("rdsproxy_database_connections", **T) == 0
        # Factories are quiet: no "Starting factory" line per client or database connection.
        assert "Starting factory" not in proxy.logs.text()
    finally:
        proxy.stop()


def test_waiters_longest_wait_and_borrow_timeouts(pg_server, tmp_path):
    """One connection allowed (1% of 100): while a pinned session holds it, the next client waits,
    shows in the waiting figures, then times out (ConnectionBorrowTimeout)."""
    path = write_proxy_config(tmp_path, pg_server, name="m-wait", MaxConnectionsPercent=1,
                              MaxIdleConnectionsPercent=1, ConnectionBorrowTimeout=3)
    proxy = start_with_admin(path)
    try:
        scrape = Scraper(proxy)
        P = {"proxy_name": "m-wait", "target_group": "default"}
        holder = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
        holder.execute("SET work_mem = '8MB'")  # pinned: the only connection is taken
        result = {}
        waiter = threading.Thread(target=lambda: result.update(
            r=run_psql(proxy, pg_server, ["-tAc", "select 1"])))
        waiter.start()
        proxy.wait_for(lambda: scrape.value("rdsproxy_client_connections_waiting", **P) == 1,
                       what="a waiting client")
        time.sleep(0.2)
        assert scrape.value("rdsproxy_client_longest_wait_seconds", **P) > 0
        waiter.join(30)
        assert result["r"].returncode != 0
        assert "Timed-out waiting to acquire database connection" in result["r"].stderr
        assert scrape.value("rdsproxy_connection_borrow_timeouts_total", **P) == 1
        assert scrape.value("rdsproxy_client_connections_waiting", **P) == 0
        assert scrape.value("rdsproxy_client_longest_wait_seconds", **P) == 0
        holder.close()
    finally:
        proxy.stop()


def test_mysql_metrics_in_transaction_and_latencies(mariadb_server, tmp_path):
    proxy = start_with_admin(write_mysql_config(tmp_path, mariadb_server, name="m-my"))
    try:
        scrape = Scraper(proxy)
        P = {"proxy_name": "m-my"}
        T = dict(P, target_group="default", target="mariadb-1")
        conns = [pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                                 password=mariadb_server.users["app_native"], database="appdb",
                                 autocommit=True) for _ in range(3)]
        for c in conns:
            for _ in range(20):
                with c.cursor() as cur:
                    cur.execute("SELECT 1")
        busy = conns[0]
        busy.begin()
        with busy.cursor() as cur:
            cur.execute("SELECT 2")
        s = scrape.samples()

        def v(name, **labels):
            return s.get((name, tuple(sorted(labels.items()))))

        # The bug the IBackendConnection seam fixes: this read 0 for MySQL.
        assert v("rdsproxy_database_connections_currently_in_transaction", **T) == 1
        assert v("rdsproxy_database_connections_currently_borrowed", **T) == 1
        assert v("rdsproxy_client_connections", **P) == 3
        # 60 SELECT 1, the BEGIN and SELECT 2, and PyMySQL's SET AUTOCOMMIT at each connect:
        # every one is a request with a QueryResponseLatency observation; the SET AUTOCOMMITs
        # are answered by the proxy itself (no connection held), so they have no database latency.
        queries = v("rdsproxy_query_requests_total", **P)
        assert queries == 3 * 20 + 2 + 3
        assert v("rdsproxy_query_response_latency_seconds_count", **P) == queries
        assert v("rdsproxy_query_database_response_latency_seconds_count", **T) == queries - 3
        assert v("rdsproxy_client_connections_setup_succeeded_total", **P) == 3
        busy.commit()
        assert scrape.value("rdsproxy_database_connections_currently_in_transaction", **T) == 0
        for c in conns:
            c.close()
    finally:
        proxy.stop()
