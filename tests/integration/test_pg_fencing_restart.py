"""The fencing of a former writer survives a restart of a single-process proxy (real PostgreSQL
primary and streaming standby): the primary stops, the standby is promoted, the proxy is stopped;
the former primary comes back read-write (a split brain) and a new proxy on the same
configuration file still refuses it, from the state file (failover/fencing.py).  The Workers: 2
variant is in test_workers_monitor.py."""

import json
from pathlib import Path

import psycopg

try:
    from failover_util import health_with_reasons, pg_replicated, writer_id
    from proxyutil import InProcessProxy, write_proxy_config
except ImportError:
    from tests.integration.failover_util import health_with_reasons, pg_replicated, writer_id
    from tests.integration.proxyutil import InProcessProxy, write_proxy_config


def test_a_restarted_proxy_keeps_refusing_a_fenced_former_writer(pg_server_factory, tmp_path):
    with pg_replicated(pg_server_factory, tmp_path, "fence-pass") as (primary, [standby]):
        config = write_proxy_config(tmp_path / "proxy", primary, targets=[primary, standby],
                                    HealthCheckInterval=1, ConnectionBorrowTimeout=30)
        state = Path(config).parent / "rdsproxy-state.json"
        proxy = InProcessProxy(config)
        try:
            ctx = proxy.ctx
            proxy.wait_for(lambda: proxy.call(health_with_reasons, ctx) == {
                "pg-1": ("AVAILABLE", None), "pg-2": ("AVAILABLE", None)}, what="the first round")
            assert proxy.call(writer_id, ctx) == "pg-1"
            primary.stop()
            standby.promote()
            proxy.wait_for(lambda: proxy.call(writer_id, ctx) == "pg-2", timeout=30, what="the failover")
            saved = json.loads(state.read_text())["proxies"]["test-pg"]
            assert saved == {"writer": "pg-2", "fenced": {"pg-1": "pg-2"}}
        finally:
            proxy.stop()

        primary.start()  # back as a primary of its own, read-write
        assert primary.psql("SELECT pg_is_in_recovery()").strip() == "f"
        again = InProcessProxy(config)
        try:
            ctx = again.ctx
            again.wait_for(lambda: again.call(health_with_reasons, ctx) == {
                "pg-1": ("UNAVAILABLE", "INVALID_REPLICATION_STATE"), "pg-2": ("AVAILABLE", None)},
                timeout=30, what="pg-1 fenced")
            assert again.call(writer_id, ctx) == "pg-2"
            with psycopg.connect(again.dsn(primary), autocommit=True) as conn:
                assert conn.execute("SELECT inet_server_port()").fetchone()[0] == standby.port
            assert "fenced (remembered in the state file)" in again.logs.text()
        finally:
            again.stop()

        # Without the file the configuration's first target would be the writer again: the
        # state file is what keeps the fence (the operator's way to clear it, documented).
        state.unlink()
        fresh = InProcessProxy(config)
        try:
            fresh.wait_for(lambda: fresh.call(health_with_reasons, fresh.ctx)["pg-1"] == ("AVAILABLE", None),
                           timeout=30, what="pg-1 trusted")
            assert fresh.call(writer_id, fresh.ctx) == "pg-1"
        finally:
            fresh.stop()
