"""Query cancellation reaches the database connection serving the session, and nothing else.

`cancel_safe()`, not `cancel()`: psycopg's `cancel()` calls libpq's blocking PQcancel without
releasing the GIL, which would starve the in-process proxy's reactor thread.
"""

import asyncio
import threading
import time

import pytest

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from proxyutil import asyncpg, needs_asyncpg
except ImportError:
    from tests.integration.proxyutil import asyncpg, needs_asyncpg


def test_cancel_only_its_own_query(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=3)
    victim = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    bystander = psycopg.connect(proxy.dsn(pg_server, user="app_md5"), autocommit=True)
    results = {}

    def run(name, conn, sql):
        t0 = time.monotonic()
        try:
            results[name] = conn.execute(sql).fetchone()[0]
        except Exception as e:
            results[name] = e
        results[name + "_t"] = time.monotonic() - t0

    try:
        threads = [threading.Thread(target=run, args=("victim", victim, "select pg_sleep(10)::text")),
                   threading.Thread(target=run, args=("bystander", bystander, "select pg_sleep(2)::text || 'done'"))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        victim.cancel_safe(timeout=10)
        for t in threads:
            t.join(20)
        assert isinstance(results["victim"], psycopg.errors.QueryCanceled), results
        assert results["victim_t"] < 5
        assert results["bystander"] == "done" and results["bystander_t"] >= 2
        # both sessions go on
        assert victim.execute("select 'after'").fetchone() == ("after",)
        assert bystander.execute("select 'after'").fetchone() == ("after",)
    finally:
        victim.close()
        bystander.close()


def test_cancel_of_an_idle_session_does_nothing(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2)
    idle = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    busy = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    try:
        t = threading.Thread(target=lambda: busy.execute("select pg_sleep(1)"))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.3)
        idle.cancel_safe(timeout=10)  # no query of its own: must not hit the busy session's connection
        t.join(10)
        assert time.monotonic() - t0 >= 1
        assert busy.execute("select 1").fetchone() == (1,)
        assert idle.execute("select 2").fetchone() == (2,)
    finally:
        idle.close()
        busy.close()


@needs_asyncpg
def test_asyncpg_timeout_cancels(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=5)

    async def main():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="app_scram",
                                     password=pg_server.users["app_scram"], database="appdb")
        try:
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(10)", timeout=0.5)
            assert time.monotonic() - t0 < 5
            assert await conn.fetchval("select 5") == 5
        finally:
            await conn.close()

    asyncio.run(main())
