"""Query cancellation reaches the database connection serving the session, and nothing else.

`cancel_safe()`, not `cancel()`: psycopg's `cancel()` calls libpq's blocking PQcancel without
releasing the GIL, which would starve the in-process proxy's reactor thread.
"""

import asyncio
import threading

import pytest

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from proxyutil import asyncpg, needs_asyncpg, pg_running, wait_pg_running
except ImportError:
    from tests.integration.proxyutil import asyncpg, needs_asyncpg, pg_running, wait_pg_running


def _holding_lock(pg_server, key):
    """A direct superuser connection to appdb holding transaction-level advisory lock *key* until
    it is closed: a query through the proxy that takes the same lock keeps running, on any
    machine, until the test lets it go (where a pg_sleep would race with a slow machine)."""
    holder = psycopg.connect(pg_server.dsn(dbname="appdb"))
    holder.execute("select pg_advisory_xact_lock(%s)", (key,))
    return holder


def _run(results, name, conn, sql):
    def run():
        try:
            results[name] = conn.execute(sql).fetchone()[0]
        except Exception as e:
            results[name] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_cancel_only_its_own_query(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=3)
    victim = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    bystander = psycopg.connect(proxy.dsn(pg_server, user="app_md5"), autocommit=True)
    victim_sql = "select pg_sleep(60)::text"
    bystander_sql = "select pg_advisory_xact_lock(7301)::text || 'done'"
    results = {}
    holder = _holding_lock(pg_server, 7301)
    try:
        threads = [_run(results, "victim", victim, victim_sql),
                   _run(results, "bystander", bystander, bystander_sql)]
        # Both queries run on the database when the cancel is sent.
        wait_pg_running(pg_server, victim_sql, "PgSleep")
        wait_pg_running(pg_server, bystander_sql, "advisory")
        victim.cancel_safe(timeout=10)  # returns once the proxy has delivered it
        threads[0].join(30)
        assert isinstance(results.get("victim"), psycopg.errors.QueryCanceled), results
        # The bystander's query still waits on the lock: the cancel did not reach it.
        assert "bystander" not in results and pg_running(pg_server, bystander_sql, "advisory")
        holder.close()  # lets it finish
        threads[1].join(30)
        assert results.get("bystander") == "done", results
        # both sessions go on
        assert victim.execute("select 'after'").fetchone() == ("after",)
        assert bystander.execute("select 'after'").fetchone() == ("after",)
    finally:
        holder.close()
        victim.close()
        bystander.close()


def test_cancel_of_an_idle_session_does_nothing(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2)
    idle = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    busy = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    busy_sql = "select pg_advisory_xact_lock(7302)::text || 'not cancelled'"
    results = {}
    holder = _holding_lock(pg_server, 7302)
    try:
        thread = _run(results, "busy", busy, busy_sql)
        wait_pg_running(pg_server, busy_sql, "advisory")
        idle.cancel_safe(timeout=10)  # no query of its own: must not hit the busy session's connection
        holder.close()
        thread.join(30)
        assert results.get("busy") == "not cancelled", results
        assert busy.execute("select 1").fetchone() == (1,)
        assert idle.execute("select 2").fetchone() == (2,)
    finally:
        holder.close()
        idle.close()
        busy.close()


@needs_asyncpg
def test_asyncpg_timeout_cancels(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=5)

    async def main():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="app_scram",
                                     password=pg_server.users["app_scram"], database="appdb")
        try:
            # The timeout must outlast the query's way to the database (a cancel that arrives
            # before it is ignored, by PostgreSQL too): 2 s is ample on a loaded machine.
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(600)", timeout=2)
            # Only a cancel that reached the sleep lets the next query run within the bound (the
            # bound guards against a hang; the sleep would last ten minutes).
            assert await asyncio.wait_for(conn.fetchval("select 5"), 60) == 5
            assert not pg_running(pg_server, "select pg_sleep(600)")
        finally:
            await conn.close()

    asyncio.run(main())
