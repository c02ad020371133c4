"""Switchover on real PostgreSQL: pinned sessions whose pin can be replayed move to the new writer.

A primary and a streaming standby behind one proxy; the primary is made read-only for the whole
server and stays up, then the standby is promoted (issue 11 item 3).  With real psycopg clients:
- a session pinned by a SET, a named protocol prepared statement (psycopg prepare=True) and a
  SQL PREPARE keeps its client connection: its next statements run on the new writer, with
  the SET still in effect (SHOW), and both prepared statements usable under their names;
- a session pinned inside a transaction moves once the transaction has ended;
- a session with a temporary table is ended with the "writer changed" error;
- under EXCLUDE_PREPARED_STATEMENTS (named statements tracked by the proxy, not recorded) a
  session pinned by a SET moves, and its tracked statement is prepared again on the new writer;
- with MaxSessionReplaySize 0 nothing moves (the rule before this feature);
- asyncpg (its own named statements, `__asyncpg_stmt_N__`) with a SET moves the same way.
"""

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from failover_util import health_with_reasons, pg_replicated, writer_id
    from proxyutil import asyncpg, needs_asyncpg
except ImportError:
    from tests.integration.failover_util import health_with_reasons, pg_replicated, writer_id
    from tests.integration.proxyutil import asyncpg, needs_asyncpg

WRITER_CHANGED = "The proxy ended this session: it was pinned to a database connection on the former writer"
ADD_ONE = "SELECT %s::int + 1"


def _ended(conn):
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError as e:
        return str(e)
    return None


def _pinned_session(dsn):
    """A session pinned by a SET, then holding a named protocol statement and a SQL PREPARE."""
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET work_mem = '8MB'")
    conn.execute("SET application_name = 'moving'")
    assert conn.execute(ADD_ONE, (1,), prepare=True).fetchone() == (2,)
    conn.execute("PREPARE twice (int) AS SELECT $1 * 2")
    assert conn.execute("EXECUTE twice (21)").fetchone() == (42,)
    return conn


def _switchover(proxy, primary, standby):
    ctx = proxy.ctx
    primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
    primary.reload()
    proxy.wait_for(lambda: proxy.call(writer_id, ctx) != "pg-1", what="the demoted writer to be dropped")
    standby.promote()
    proxy.wait_for(lambda: proxy.call(writer_id, ctx) == "pg-2", what="the promoted writer")


def _start(pg_proxy_factory, primary, standby, **extra):
    proxy = pg_proxy_factory(server=primary, targets=[primary, standby], HealthCheckInterval=1,
                             ConnectionBorrowTimeout=30, **extra)
    ctx = proxy.ctx
    proxy.wait_for(lambda: proxy.call(health_with_reasons, ctx) == {"pg-1": ("AVAILABLE", None),
                                                                   "pg-2": ("AVAILABLE", None)},
                   what="the first health checks")
    return proxy


def test_pg_pinned_sessions_move_to_the_new_writer_unless_they_hold_a_temp_table(
        pg_server_factory, pg_proxy_factory, tmp_path):
    with pg_replicated(pg_server_factory, tmp_path, "move-pass") as (primary, [standby]):
        proxy = _start(pg_proxy_factory, primary, standby)
        tracking = _start(pg_proxy_factory, primary, standby,
                          SessionPinningFilters=["EXCLUDE_PREPARED_STATEMENTS"])
        dsn = proxy.dsn(primary)
        moving = _pinned_session(dsn)
        in_txn = psycopg.connect(dsn)  # not autocommit
        temp = psycopg.connect(dsn, autocommit=True)
        tracked = psycopg.connect(tracking.dsn(primary), autocommit=True)
        try:
            tracked.execute("SET work_mem = '16MB'")  # pins; the statement below does not
            assert tracked.execute(ADD_ONE, (1,), prepare=True).fetchone() == (2,)
            in_txn.execute("SET search_path TO pg_catalog, public")
            in_txn.commit()
            in_txn.execute("SELECT 1")  # a transaction stays open across the demotion
            temp.execute("CREATE TEMP TABLE t (x int)")
            assert proxy.session_states().count("pinned") == 3
            assert moving.execute("SELECT inet_server_port()").fetchone() == (primary.port,)

            _switchover(proxy, primary, standby)
            tracking.wait_for(lambda: tracking.call(writer_id, tracking.ctx) == "pg-2",
                              what="the other proxy's promoted writer")
            in_txn.commit()  # its boundary: it moves now

            # the moved session: same client connection, the new writer, its state there
            assert moving.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone() == (
                standby.port, False)
            assert moving.execute("SHOW work_mem").fetchone() == ("8MB",)
            assert moving.execute("SHOW application_name").fetchone() == ("moving",)
            assert moving.execute(ADD_ONE, (41,), prepare=True).fetchone() == (42,)  # same name
            assert moving.execute("EXECUTE twice (5)").fetchone() == (10,)
            names = {n for (n,) in moving.execute("SELECT name FROM pg_prepared_statements")}
            assert "twice" in names and any(n.startswith("_pg3_") for n in names), names
            moving.execute("CREATE TABLE after_move (x int)")  # it writes: the new writer
            assert in_txn.execute("SELECT inet_server_port(), current_setting('search_path')").fetchone() == (
                standby.port, "pg_catalog, public")
            in_txn.commit()
            assert tracked.execute("SELECT inet_server_port(), current_setting('work_mem')").fetchone() == (
                standby.port, "16MB")
            assert tracked.execute(ADD_ONE, (2,), prepare=True).fetchone() == (3,)

            error = _ended(temp)
            assert error is not None and WRITER_CHANGED in error, error
            # the moved ones, pinned again (the ended one leaves once its socket has closed)
            proxy.wait_for(lambda: sorted(proxy.session_states()) == ["pinned", "pinned"],
                           what="the moved sessions alone")
            # the old writer keeps no connection of the sessions (closing one takes a moment)
            proxy.wait_for(lambda: primary.psql("SELECT count(*) FROM pg_stat_activity"
                                                " WHERE datname = 'appdb'").strip() == "0",
                           what="the former writer's connections to close")
        finally:
            for conn in (moving, in_txn, temp, tracked):
                conn.close()


def test_pg_pinned_sessions_are_ended_when_moving_is_off(pg_server_factory, pg_proxy_factory, tmp_path):
    with pg_replicated(pg_server_factory, tmp_path, "nomove-pass") as (primary, [standby]):
        proxy = _start(pg_proxy_factory, primary, standby, MaxSessionReplaySize=0)
        conn = psycopg.connect(proxy.dsn(primary), autocommit=True)
        try:
            conn.execute("SET work_mem = '8MB'")
            _switchover(proxy, primary, standby)
            error = _ended(conn)
            assert error is not None and WRITER_CHANGED in error, error
        finally:
            conn.close()


@needs_asyncpg
def test_asyncpg_session_with_a_set_and_prepared_statements_moves(pg_server_factory, pg_proxy_factory,
                                                                  tmp_path):
    import asyncio
    loop = asyncio.new_event_loop()
    with pg_replicated(pg_server_factory, tmp_path, "asyncpg-move") as (primary, [standby]):
        proxy = _start(pg_proxy_factory, primary, standby)
        conn = loop.run_until_complete(asyncpg.connect(
            host=proxy.host, port=proxy.port, user="app_scram", password="asyncpg-move",
            database="appdb", ssl=False))
        try:
            loop.run_until_complete(conn.execute("SET work_mem = '2MB'"))
            stmt = loop.run_until_complete(conn.prepare("SELECT $1::int * 3, inet_server_port()"))
            assert loop.run_until_complete(stmt.fetchrow(5)) == (15, primary.port)
            _switchover(proxy, primary, standby)
            assert loop.run_until_complete(stmt.fetchrow(7)) == (21, standby.port)
            assert loop.run_until_complete(conn.fetchval("SHOW work_mem")) == "2MB"
        finally:
            loop.run_until_complete(conn.close())
            loop.close()
