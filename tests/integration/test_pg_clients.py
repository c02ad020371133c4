"""Real clients through the proxy: psql, psycopg 3, asyncpg and pgbench."""

import asyncio
import re
import subprocess
import threading

import pytest

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from proxyutil import PGBENCH, asyncpg, client_env, needs_asyncpg, pg_running, run_psql, wait_pg_running
except ImportError:
    from tests.integration.proxyutil import (PGBENCH, asyncpg, client_env, needs_asyncpg, pg_running, run_psql,
                                             wait_pg_running)


# -- psql ----------------------------------------------------------------------------------------

def test_psql_query(pg_proxy, pg_server):
    out = run_psql(pg_proxy, pg_server, ["-A", "-t", "-c", "select current_user, 40 + 2"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "app_scram|42"


@pytest.mark.parametrize("user", ["app_scram", "app_md5"])
def test_psql_error_then_next_query_works(pg_proxy, pg_server, user):
    script = "select 1/0;\nselect 'after' as x;\n"
    out = run_psql(pg_proxy, pg_server, ["-A", "-t"], user=user, input=script)
    assert "division by zero" in out.stderr
    assert out.stdout.strip() == "after"


def test_psql_multi_statement_simple_query(pg_proxy, pg_server):
    # One -c string is sent as one Query message: several statements, one ReadyForQuery.
    out = run_psql(pg_proxy, pg_server, ["-A", "-t", "-c",
                                         "create temp table m (x int); insert into m values (1),(2);"
                                         " select sum(x) from m; select 'two'"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert "3" in lines and "two" in lines, out.stdout  # every statement ran, in one batch
    out = run_psql(pg_proxy, pg_server, ["-A", "-t", "-c", "select 1; select 2/0; select 3"])
    assert "division by zero" in out.stderr
    out = run_psql(pg_proxy, pg_server, ["-A", "-t", "-c", "select 'fine'"])
    assert out.stdout.strip() == "fine"


def test_psql_copy_in_and_out(pg_proxy, pg_server, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("".join(f"{i},row {i}\n" for i in range(1, 5001)))
    dst = tmp_path / "out.csv"
    pg_server.psql("drop table if exists copy_t; create table copy_t (id int, label text);"
                   " alter table copy_t owner to appdb_owner", dbname="appdb")
    script = (f"\\copy copy_t from '{src}' with (format csv)\n"
              f"\\copy (select * from copy_t order by id) to '{dst}' with (format csv)\n"
              "select count(*) from copy_t;\n")
    out = run_psql(pg_proxy, pg_server, ["-A", "-t", "-v", "ON_ERROR_STOP=1"], input=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "5000"
    assert dst.read_text() == src.read_text()


def test_psql_notice(pg_proxy, pg_server):
    out = run_psql(pg_proxy, pg_server, ["-A", "-t", "-c",
                                         "DO $$ BEGIN RAISE NOTICE 'hi'; END $$"])
    assert out.returncode == 0, out.stderr
    assert "NOTICE:  hi" in out.stderr


# -- psycopg 3 -----------------------------------------------------------------------------------

def test_psycopg_parameters_and_types(pg_proxy, pg_server):
    with psycopg.connect(pg_proxy.dsn(pg_server)) as conn:
        row = conn.execute("select %s::int + 1, %s::text, %s::numeric * 2, %s::bytea",
                           (41, "héllo", "1.5", b"\x00\x01")).fetchone()
        assert row == (42, "héllo", 3, b"\x00\x01")
        assert conn.execute("select %s::text is null", (None,)).fetchone() == (True,)


def test_psycopg_transactions(pg_proxy, pg_server):
    pg_server.psql("drop table if exists txn_t; create table txn_t (x int);"
                   " alter table txn_t owner to appdb_owner", dbname="appdb")
    with psycopg.connect(pg_proxy.dsn(pg_server)) as conn:
        with conn.transaction():
            conn.execute("insert into txn_t values (1)")
        try:
            with conn.transaction():
                conn.execute("insert into txn_t values (2)")
                raise RuntimeError("roll it back")
        except RuntimeError:
            pass
        conn.execute("insert into txn_t values (3)")
        conn.rollback()  # implicit transaction of a non-autocommit connection
        conn.execute("insert into txn_t values (4)")
        conn.commit()
    assert pg_server.psql("select string_agg(x::text, ',' order by x) from txn_t",
                          dbname="appdb").strip() == "1,4"


def test_psycopg_copy(pg_proxy, pg_server):
    pg_server.psql("drop table if exists pcopy; create table pcopy (id int, label text);"
                   " alter table pcopy owner to appdb_owner", dbname="appdb")
    with psycopg.connect(pg_proxy.dsn(pg_server), autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy("copy pcopy from stdin") as copy:
            for i in range(20000):
                copy.write_row((i, f"label {i}"))
        assert conn.execute("select count(*), sum(id) from pcopy").fetchone() == (20000, sum(range(20000)))
        got = bytearray()
        with cur.copy("copy (select * from pcopy order by id) to stdout") as copy:
            for chunk in copy:
                got += chunk
        lines = bytes(got).decode().splitlines()
        assert len(lines) == 20000 and lines[7] == "7\tlabel 7"
        # COPY that fails part way: the session goes on.
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with cur.copy("copy pcopy from stdin") as copy:
                copy.write(b"1\tok\nnot-a-number\tbad\n")
        assert conn.execute("select count(*) from pcopy").fetchone() == (20000,)


def test_psycopg_error_sqlstates(pg_proxy, pg_server):
    with psycopg.connect(pg_proxy.dsn(pg_server), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero) as e:
            conn.execute("select 1/0")
        assert e.value.sqlstate == "22012"
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table")
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("selec 1")
        with pytest.raises(psycopg.errors.RaiseException) as e:
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'custom %', 7 USING ERRCODE = 'P0001'; END $$")
        assert "custom 7" in str(e.value)
        assert conn.execute("select 'still fine'").fetchone() == ("still fine",)


def test_large_result_100mb(pg_proxy, pg_server):
    sql = "select repeat('x', 1000) from generate_series(1, 100000)"
    with psycopg.connect(pg_proxy.dsn(pg_server)) as conn:
        count = total = 0
        with conn.cursor(name="big") as cur:  # server-side cursor: fetched in batches
            cur.itersize = 5000
            cur.execute(sql)
            for (value,) in cur:
                count += 1
                total += len(value)
        conn.commit()
        assert (count, total) == (100000, 100_000_000)
    with psycopg.connect(pg_proxy.dsn(pg_server), autocommit=True) as conn:
        rows = conn.execute(sql).fetchall()  # one plain fetch: 100 MB in one result
        assert len(rows) == 100000 and sum(len(r[0]) for r in rows) == 100_000_000
        del rows
        assert conn.execute("select 1").fetchone() == (1,)


def test_long_query_while_others_run(pg_proxy, pg_server):
    """A client whose query runs long does not hold up the others: 50 queries of another client
    are answered while the long one is still running (it waits on a lock the test holds, so
    "still running" does not depend on the machine's speed)."""
    slow_sql = "select pg_advisory_xact_lock(7303)::text || 'slept'"
    result = {}
    holder = psycopg.connect(pg_server.dsn(dbname="appdb"))
    holder.execute("select pg_advisory_xact_lock(7303)")

    def slow():
        with psycopg.connect(pg_proxy.dsn(pg_server), autocommit=True) as conn:
            result["slow"] = conn.execute(slow_sql).fetchone()[0]

    t = threading.Thread(target=slow, daemon=True)
    try:
        t.start()
        wait_pg_running(pg_server, slow_sql, "advisory")
        with psycopg.connect(pg_proxy.dsn(pg_server, user="app_md5"), autocommit=True) as conn:
            for i in range(50):
                assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        # the quick client was not queued behind the slow one
        assert "slow" not in result and pg_running(pg_server, slow_sql, "advisory")
    finally:
        holder.close()
    t.join(30)
    assert result.get("slow") == "slept", result


# -- asyncpg ---------------------------------------------------------------------------------------

@needs_asyncpg
def test_asyncpg(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory()

    async def main():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="app_scram",
                                     password=pg_server.users["app_scram"], database="appdb")
        try:
            rows = await conn.fetch("select g, g * 2 as d from generate_series(1, $1) g", 100)
            assert len(rows) == 100 and rows[9]["d"] == 20
            assert await conn.fetchval("select $1::text || $2::text", "a", "b") == "ab"
            await conn.execute("create temp table ap (x int, y text)")
            await conn.executemany("insert into ap values ($1, $2)", [(i, str(i)) for i in range(500)])
            assert await conn.fetchval("select count(*) from ap") == 500
            async with conn.transaction():
                await conn.execute("insert into ap values (1000, 'in txn')")
            try:
                async with conn.transaction():
                    await conn.execute("insert into ap values (2000, 'rolled back')")
                    raise RuntimeError
            except RuntimeError:
                pass
            assert await conn.fetchval("select count(*) from ap where x >= 1000") == 1
            with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
                await conn.fetchval("select 1/0")
            assert await conn.fetchval("select 7") == 7
        finally:
            await conn.close()

    asyncio.run(main())


# -- pgbench ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pgbench_db(pg_server):
    env = client_env(pg_server.users["app_scram"])
    out = subprocess.run([PGBENCH, "-i", "-s", "1", "-q", "-h", pg_server.host, "-p",
                          str(pg_server.port), "-U", "app_scram", "appdb"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    pg_server.psql("; ".join(f"alter table pgbench_{t} owner to appdb_owner"
                             for t in ("accounts", "branches", "history", "tellers")), dbname="appdb")
    return pg_server


def _pgbench(proxy, server, *args, clients=4, transactions=50, user="app_scram"):
    cmd = [PGBENCH, "-n", "-c", str(clients), "-j", "2", "-t", str(transactions),
           "-h", proxy.host, "-p", str(proxy.port), "-U", user] + list(args) + ["appdb"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                         env=client_env(server.users[user]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "number of failed transactions: 0" in out.stdout, out.stdout
    done = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out.stdout)
    assert done and done.group(1) == done.group(2) == str(clients * transactions), out.stdout
    return out.stdout


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_modes(pgbench_db, pg_proxy_factory, mode):
    # Cap of 2% of 100 = 2 connections for 8 clients: multiplexing at work.
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2)
    _pgbench(proxy, pgbench_db, "-M", mode, clients=8, transactions=50)
    assert proxy.call(lambda: len(proxy.ctx.pool.connections())) <= 2


def test_pgbench_prepared(pgbench_db, pg_proxy_factory):
    # Named prepared statements pin each client: the cap must cover every client.
    proxy = pg_proxy_factory(MaxConnectionsPercent=10)
    _pgbench(proxy, pgbench_db, "-M", "prepared", clients=4, transactions=50)
    assert proxy.call(lambda: sum(proxy.ctx.pin_counts.values())) >= 4, proxy.ctx.pin_counts


@pytest.mark.parametrize("user", ["app_scram", "app_md5"])
def test_pgbench_connect_per_transaction(pgbench_db, pg_proxy_factory, user):
    proxy = pg_proxy_factory(MaxConnectionsPercent=3)
    _pgbench(proxy, pgbench_db, "-C", "-S", clients=4, transactions=30, user=user)
