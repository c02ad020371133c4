"""Failover on real PostgreSQL: a primary and a streaming standby behind one proxy.

The primary stops, the standby is promoted: an idle client's next query waits in the proxy and
then runs on the new writer over the SAME client connection; a client that was mid-transaction
gets an error and reconnects; the pool ends up holding connections to the new writer only.
Prints the time from the promotion to the first write through the proxy and the share of idle
sessions kept (issue 11 item 1).
"""

import threading
import time

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from failover_util import health_states, pg_replicated, wait_replicated, writer_id
except ImportError:
    from tests.integration.failover_util import health_states, pg_replicated, wait_replicated, writer_id


IDLE_SESSIONS = 20








def test_pg_failover_keeps_idle_clients(pg_server_factory, pg_proxy_factory, tmp_path):
    with pg_replicated(pg_server_factory, tmp_path, "failover-pass", max_connections=20) as (primary, [standby]):
        _run(primary, standby, pg_proxy_factory)


def _run(primary, standby, pg_proxy_factory):
    proxy = pg_proxy_factory(server=primary, targets=[primary, standby], HealthCheckInterval=1,
                             ConnectionBorrowTimeout=30)
    ctx = proxy.ctx
    proxy.wait_for(lambda: proxy.call(health_states, ctx) == {"pg-1": "AVAILABLE", "pg-2": "AVAILABLE"},
                   what="the first health checks")
    assert proxy.call(writer_id, ctx) == "pg-1"
    assert proxy.call(lambda: ctx.topology.probed_role(ctx.topology.targets[1])) == "READ_ONLY"

    idle = psycopg.connect(proxy.dsn(primary), autocommit=True)
    busy = psycopg.connect(proxy.dsn(primary))  # not autocommit: holds a connection mid-transaction
    others = []
    try:
        for _ in range(IDLE_SESSIONS):
            other = psycopg.connect(proxy.dsn(primary), autocommit=True)
            others.append(other)
            assert other.execute("SELECT inet_server_port()").fetchone()[0] == primary.port
        idle.execute("CREATE TABLE kept (x int)")
        idle.execute("INSERT INTO kept VALUES (42)")
        assert idle.execute("SELECT inet_server_port()").fetchone()[0] == primary.port
        busy.execute("SELECT 1")
        assert "borrowed" in proxy.session_states()
        wait_replicated(standby, "SELECT count(*) FROM kept", "1")

        primary.stop()
        # The primary is gone and nothing is promoted yet: the proxy has no writer.
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) is None, what="the writer to be lost")

        # The idle client's next query waits in the proxy (no writer) ...
        answers, errors, answered_at = [], [], []

        def query():  # a write: the first one through the proxy after the promotion
            try:
                answers.append(idle.execute(
                    "WITH w AS (INSERT INTO kept VALUES (44) RETURNING x)"
                    " SELECT pg_is_in_recovery(), (SELECT count(*) FROM kept WHERE x = 42),"
                    " inet_server_port() FROM w").fetchone())
                answered_at.append(time.monotonic())
            except Exception as e:  # reported below
                errors.append(e)

        waiting = threading.Thread(target=query, daemon=True)
        waiting.start()
        proxy.wait_for(lambda: proxy.call(lambda: ctx.pool.waiting) == 1, what="the borrow to wait")
        assert not answers and not errors

        # ... and runs on the new writer once the standby is promoted.
        standby.promote()
        promoted_at = time.monotonic()  # pg_promote(wait => true) returned: it takes writes
        waiting.join(20)
        assert not waiting.is_alive() and not errors, errors
        assert answers == [(False, 1, standby.port)]
        assert time.monotonic() - promoted_at < 10
        assert proxy.call(writer_id, ctx) == "pg-2"
        assert proxy.call(lambda: ctx.topology.role_of(ctx.topology.targets[1])) == "READ_WRITE"

        # Same client connection, writes go to the new writer.
        idle.execute("INSERT INTO kept VALUES (43)")
        assert idle.execute("SELECT count(*) FROM kept").fetchone()[0] == 3
        kept = 0
        for other in others:
            try:
                if other.execute("SELECT inet_server_port()").fetchone()[0] == standby.port:
                    kept += 1
            except psycopg.Error:
                pass
        print(f"\nPostgreSQL failover: first write through the proxy"
              f" {answered_at[0] - promoted_at:.2f} s after the promotion (HealthCheckInterval 1 s);"
              f" idle sessions kept {kept} of {len(others)}")
        assert kept == len(others)

        # The client that was mid-transaction lost it; a new connection works.
        try:
            busy.execute("SELECT 1")
            busy.commit()
        except psycopg.Error:
            pass
        else:
            raise AssertionError("a transaction on the old writer survived the failover")
        with psycopg.connect(proxy.dsn(primary), autocommit=True) as again:
            assert again.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone() == (
                False, standby.port)

        targets = proxy.call(lambda: [c.target.rds_resource_id for c in ctx.pool.connections()])
        assert targets and set(targets) == {"pg-2"}
        assert proxy.call(health_states, ctx) == {"pg-1": "UNAVAILABLE", "pg-2": "AVAILABLE"}
    finally:
        idle.close()
        busy.close()
        for other in others:
            other.close()
