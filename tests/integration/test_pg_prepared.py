"""SessionPinningFilters: [EXCLUDE_PREPARED_STATEMENTS] — named statements without pinning.

Real drivers that prepare named statements (pgbench -M prepared, asyncpg always, psycopg after
prepare_threshold) multiplex over fewer database connections than clients, and every session
keeps seeing its own statements whichever connection serves it.
"""

import asyncio
import threading

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from test_pg_clients import _pgbench, pgbench_db  # noqa: F401 (fixture)
    from proxyutil import asyncpg, needs_asyncpg
except ImportError:
    from tests.integration.test_pg_clients import _pgbench, pgbench_db  # noqa: F401
    from tests.integration.proxyutil import asyncpg, needs_asyncpg

TRACKED = {"SessionPinningFilters": ["EXCLUDE_PREPARED_STATEMENTS"]}


def pins(proxy):
    return proxy.call(lambda: dict(proxy.ctx.pin_counts))


def test_pgbench_prepared_multiplexes_without_pinning(pgbench_db, pg_proxy_factory):  # noqa: F811
    # 8 clients over a cap of 2 connections, every query a named prepared statement.
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2, **TRACKED)
    _pgbench(proxy, pgbench_db, "-M", "prepared", "-S", clients=8, transactions=100)
    assert pins(proxy) == {}
    assert proxy.call(lambda: len(proxy.ctx.pool.connections())) <= 2


def test_without_the_filter_named_statements_pin(pg_server, pg_proxy_factory):
    proxy = pg_proxy_factory(MaxConnectionsPercent=10)
    with psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=0) as conn:
        conn.execute("select %s::int", (1,))
    assert pins(proxy) == {"prepared_statement": 1}


@needs_asyncpg
def test_asyncpg_sessions_share_two_connections(pg_server, pg_proxy_factory):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2, **TRACKED)

    async def client(i):
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="app_scram",
                                     password=pg_server.users["app_scram"], database="appdb")
        try:
            stmt = await conn.prepare("select $1::int * 2 as doubled, $2::text as tag")
            for n in range(30):
                row = await stmt.fetchrow(n, f"client{i}")
                assert (row["doubled"], row["tag"]) == (n * 2, f"client{i}")
                # And the driver's own statement cache (named statements too).
                assert await conn.fetchval("select $1::int + 1", n) == n + 1
            async with conn.transaction():
                assert await conn.fetchval("select count(*) from generate_series(1, $1::int)", i + 1) == i + 1
        finally:
            await conn.close()

    async def main():
        await asyncio.gather(*(client(i) for i in range(8)))

    asyncio.run(main())
    assert pins(proxy) == {}
    assert proxy.call(lambda: len(proxy.ctx.pool.connections())) <= 2


def test_same_statement_name_in_two_sessions_on_one_connection(pg_server, pg_proxy_factory):
    # psycopg names its statements _pg3_0, _pg3_1...: both sessions use the same names for
    # different queries, over a single database connection.
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1, **TRACKED)
    a = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=0)
    b = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=0)
    try:
        for n in range(5):
            assert a.execute("select 'a' || %s::text", (n,)).fetchone() == (f"a{n}",)
            assert b.execute("select %s::int * 100", (n,)).fetchone() == (n * 100,)
    finally:
        a.close()
        b.close()
    assert pins(proxy) == {}
    assert proxy.call(lambda: len(proxy.ctx.pool.connections())) == 1


def test_psycopg_evictions_deallocate_the_right_statement(pg_server, pg_proxy_factory):
    # prepared_max=2 makes psycopg DEALLOCATE old statements as it goes.
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1, **TRACKED)
    with psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=0) as conn:
        conn.prepared_max = 2
        for round in range(3):
            for k in range(5):
                sql = f"select %s::int + {k}"
                assert conn.execute(sql, (round,)).fetchone() == (round + k,)
    assert pins(proxy) == {}


@needs_asyncpg
def test_failed_parse_then_recovery(pg_server, pg_proxy_factory):
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1, **TRACKED)

    async def main():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="app_scram",
                                     password=pg_server.users["app_scram"], database="appdb")
        try:
            try:
                await conn.prepare("selec broken syntax")
            except asyncpg.PostgresSyntaxError:
                pass
            else:
                raise AssertionError("the bad statement was accepted")
            stmt = await conn.prepare("select $1::int")
            assert await stmt.fetchval(41) == 41
            try:
                await conn.fetchval("select 1/0")
            except asyncpg.DivisionByZeroError:
                pass
            assert await stmt.fetchval(42) == 42
        finally:
            await conn.close()

    asyncio.run(main())


def test_statements_survive_moving_between_connections(pg_server, pg_proxy_factory):
    # Two connections; a session holding one in a transaction pushes the other session's
    # statements onto the second connection, where they are re-prepared on demand.
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2, **TRACKED)
    holder = psycopg.connect(proxy.dsn(pg_server), prepare_threshold=None)
    worker = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=0)
    try:
        assert worker.execute("select %s::int", (1,)).fetchone() == (1,)
        first_pid = worker.execute("select pg_backend_pid()").fetchone()[0]
        holder.execute("select 1")  # holds a connection in an open transaction
        held_pid = holder.execute("select pg_backend_pid()").fetchone()[0]
        pids = set()
        for n in range(5):
            assert worker.execute("select %s::int", (n,)).fetchone() == (n,)
            pids.add(worker.execute("select pg_backend_pid()").fetchone()[0])
        # The only connection that existed was lent to the holder, so the worker's statement,
        # prepared there, had to be prepared again on the second connection.
        assert first_pid == held_pid
        assert held_pid not in pids and len(pids) == 1
        holder.rollback()
    finally:
        holder.close()
        worker.close()
    assert pins(proxy) == {}


def test_many_threads_of_psycopg_with_named_statements(pg_server, pg_proxy_factory):
    proxy = pg_proxy_factory(MaxConnectionsPercent=3, MaxIdleConnectionsPercent=3, **TRACKED)
    errors = []

    def client(i):
        try:
            with psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=0) as conn:
                for n in range(40):
                    got = conn.execute("select %s::int * %s::int", (i, n)).fetchone()[0]
                    assert got == i * n, (i, n, got)
        except Exception as e:  # reported below
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert pins(proxy) == {}


@needs_asyncpg
def test_sql_execute_of_a_named_protocol_statement(pg_server, pg_proxy_factory):
    # asyncpg prepares "foobar" through the protocol; the SQL EXECUTE must find it on whichever
    # connection serves the session (a cap of 2 and a second session moving things around).
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2, **TRACKED)

    async def main():
        kw = dict(host=proxy.host, port=proxy.port, user="app_scram",
                  password=pg_server.users["app_scram"], database="appdb")
        conn, other = await asyncpg.connect(**kw), await asyncpg.connect(**kw)
        try:
            # Keep a reference: asyncpg closes a statement object it garbage-collects.
            foobar = await conn.prepare("select $1::int + 1", name="foobar")
            for n in range(6):
                async with other.transaction():  # takes a connection for a while
                    assert await conn.fetchval(f"EXECUTE foobar({n})") == n + 1
                    await other.fetchval("select 1")
                await conn.execute(f"EXECUTE foobar({n})")  # simple protocol too
            assert await foobar.fetchval(1) == 2
        finally:
            await conn.close()
            await other.close()

    asyncio.run(main())
    assert pins(proxy) == {}


@needs_asyncpg
def test_a_second_parse_under_a_taken_name_is_refused_as_directly(pg_server, pg_proxy_factory):
    # asyncpg's test_prepare_explicitly_named: PostgreSQL refuses a Parse reusing the name of an
    # existing statement (42P05, naming it) and keeps the first; on the connection that has it and
    # on one that does not (the other session holds the first connection in a transaction).
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2, **TRACKED)

    async def main():
        kw = dict(host=proxy.host, port=proxy.port, user="app_scram",
                  password=pg_server.users["app_scram"], database="appdb")
        conn, other = await asyncpg.connect(**kw), await asyncpg.connect(**kw)
        try:
            foobar = await conn.prepare("select 1", name="foobar")
            refused = 0
            for hold in (False, True, False):
                tr = other.transaction()
                if hold:
                    await tr.start()
                    await other.fetchval("select 1")
                try:
                    await conn.prepare("select 2", name="foobar")
                except asyncpg.DuplicatePreparedStatementError as e:
                    assert 'prepared statement "foobar" already exists' in str(e)
                    refused += 1
                if hold:
                    await tr.rollback()
                assert await foobar.fetchval() == 1
                assert await conn.fetchval("EXECUTE foobar") == 1
            assert refused == 3
        finally:
            await conn.close()
            await other.close()

    asyncio.run(main())
    assert pins(proxy) == {}


def test_another_sessions_statement_cannot_be_dropped_or_used(pg_server, pg_proxy_factory):
    # Issue 6 item 8: session a's tracked statement lives on the shared connection under the
    # proxy's name txrds_<a>_0.  Session b names it directly: DEALLOCATE pins b (so what it does
    # stays on a connection nobody else gets until it is reset) and a keeps working; a
    # protocol-level Bind of that name never reaches the server as such.
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2, **TRACKED)
    a = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=0)
    b = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    try:
        assert a.execute("select %s::int + 1", (1,)).fetchone() == (2,)
        names = [r[0] for r in b.execute("select name from pg_prepared_statements").fetchall()]
        assert names and all(n.startswith("txrds_") for n in names)
        try:
            # b is pinned first, so whichever connection runs this is b's alone from now on
            # (the name may exist there: then only that connection, reset before reuse, loses it).
            b.execute(f"DEALLOCATE {names[0]}")
        except psycopg.errors.InvalidSqlStatementName:
            pass
        assert pins(proxy) == {"prepared_statement": 1}
        for n in range(5):
            assert a.execute("select %s::int + 1", (n,)).fetchone() == (n + 1,)
    finally:
        a.close()
        b.close()
