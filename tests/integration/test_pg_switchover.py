"""Switchover on real PostgreSQL: the old writer stays up and becomes read-only (issue 11 item 3).

A primary and a streaming standby behind one proxy.  The primary is made read-only for the whole
server (ALTER SYSTEM default_transaction_read_only + reload), then the standby is promoted:
- idle pooled connections to the demoted writer are closed at once, never lent again;
- a pinned session between transactions whose pin cannot move (a temporary table) is ended with
  the proxy's "writer changed" error, one inside a transaction is ended right after it (no
  session goes on against the read-only server; pins that move: test_pg_pin_move_live.py);
- a session that is not pinned keeps its client connection and its next transaction runs, and
  writes, on the new writer; one whose named prepared statements are tracked
  (EXCLUDE_PREPARED_STATEMENTS) has them prepared again there;
then never two writers: the old primary switched back to read-write is not trusted over the
promoted one (TargetHealth INVALID_REPLICATION_STATE), not even once the promoted one stops.
"""


import psycopg  # test extras: a missing driver must fail, not skip

try:
    from failover_util import health_with_reasons, pg_replicated, pool_by_target, wait_replicated, writer_id
except ImportError:
    from tests.integration.failover_util import (health_with_reasons, pg_replicated, pool_by_target,
                                                 wait_replicated, writer_id)

WRITER_CHANGED = "The proxy ended this session: it was pinned to a database connection on the former writer"










def _ended_with_writer_changed(conn, notices=()):
    """The proxy ended *conn*: its next use fails, and the client was told why.  libpq reads a
    FATAL that arrives in the same read as the ReadyForQuery before it while idle, and hands it
    to the notice processor (*notices*, collected by the test) instead of the next query's error."""
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError as e:
        told = WRITER_CHANGED in str(e) or any(WRITER_CHANGED in n for n in notices)
        return told, f"{e} (notices: {list(notices)})"
    return False, "the session was not ended"


def test_pg_switchover_demoted_writer_and_never_two_writers(pg_server_factory, pg_proxy_factory, tmp_path):
    with pg_replicated(pg_server_factory, tmp_path, "switchover-pass") as (primary, [standby]):
        _run(primary, standby, pg_proxy_factory)


def _run(primary, standby, pg_proxy_factory):
    proxy = pg_proxy_factory(server=primary, targets=[primary, standby], HealthCheckInterval=1,
                             ConnectionBorrowTimeout=4,
                             SessionPinningFilters=["EXCLUDE_PREPARED_STATEMENTS"])
    ctx = proxy.ctx
    proxy.wait_for(lambda: proxy.call(health_with_reasons, ctx) == {"pg-1": ("AVAILABLE", None),
                                                       "pg-2": ("AVAILABLE", None)},
                   what="the first health checks")
    assert proxy.call(writer_id, ctx) == "pg-1"

    unpinned = psycopg.connect(proxy.dsn(primary), autocommit=True)
    pinned = psycopg.connect(proxy.dsn(primary), autocommit=True)
    pinned_in_txn = psycopg.connect(proxy.dsn(primary))  # not autocommit
    # named protocol statements, tracked (not pinned) under EXCLUDE_PREPARED_STATEMENTS
    prepared = psycopg.connect(proxy.dsn(primary), autocommit=True, prepare_threshold=0)
    try:
        pinned.execute("CREATE TEMP TABLE t1 (x int)")  # pins, and cannot move
        pinned_in_txn.execute("CREATE TEMP TABLE t2 (x int)")  # the same; the transaction stays open
        pinned_in_txn.execute("SET work_mem = '4MB'")
        unpinned.execute("CREATE TABLE moved (x int)")
        unpinned.execute("INSERT INTO moved VALUES (1)")
        count = "SELECT count(*), inet_server_port() FROM moved WHERE x > %s"
        assert prepared.execute(count, (0,)).fetchone() == (1, primary.port)
        assert proxy.session_states().count("pinned") == 2
        assert proxy.call(lambda: dict(ctx.pin_counts)) == {"temporary_object": 2}  # the statement: tracked
        assert ("pg-1", "IDLE") in proxy.call(pool_by_target, ctx)  # the unpinned sessions' connection
        wait_replicated(standby, "SELECT count(*) FROM moved", "1")

        # -- switchover, step 1: the writer is made read-only and stays up
        primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        primary.reload()
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) is None, what="the demoted writer to be dropped")
        # no idle connection to it is left to lend; only the open transaction's is still there
        assert proxy.call(pool_by_target, ctx) == [("pg-1", "BORROWED")]
        ended, why = _ended_with_writer_changed(pinned)
        assert ended, why
        # the pinned session inside a transaction goes on until the transaction ends ...
        assert pinned_in_txn.execute("SELECT current_setting('work_mem')").fetchone() == ("4MB",)
        notices = []
        pinned_in_txn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        pinned_in_txn.commit()
        # ... and is ended right after it
        proxy.wait_for(lambda: proxy.session_states().count("pinned") == 0, what="the pinned session to end")
        ended, why = _ended_with_writer_changed(pinned_in_txn, notices)
        assert ended, why
        assert proxy.call(pool_by_target, ctx) == []

        # -- step 2: the standby is promoted; the unpinned session moves at its next transaction
        standby.promote()
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) == "pg-2", what="the promoted writer")
        unpinned.execute("INSERT INTO moved VALUES (2)")
        assert unpinned.execute("SELECT count(*), inet_server_port(), pg_is_in_recovery() FROM moved"
                                ).fetchone() == (2, standby.port, False)
        # the session with a prepared statement moved too: the statement is prepared again on
        # the new writer, under the same name the driver keeps using
        assert prepared.execute(count, (0,)).fetchone() == (2, standby.port)
        assert {t for t, _ in proxy.call(pool_by_target, ctx)} == {"pg-2"}

        # -- never two writers: the old primary switched back to read-write is not trusted
        primary.psql("ALTER SYSTEM RESET default_transaction_read_only")
        primary.reload()
        proxy.wait_for(lambda: proxy.call(health_with_reasons, ctx)["pg-1"] == ("UNAVAILABLE", "INVALID_REPLICATION_STATE"),
                       what="the former writer to be flagged")
        assert proxy.call(writer_id, ctx) == "pg-2"
        assert unpinned.execute("SELECT inet_server_port()").fetchone() == (standby.port,)
        description = proxy.call(lambda: ctx.health.health_of(ctx.topology.targets[0]).description)
        assert "pg-2 was promoted in its place" in description

        # ... not even once the promoted writer stops: requests wait, then time out
        standby.stop()
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) is None, what="the promoted writer to be lost")
        try:
            unpinned.execute("INSERT INTO moved VALUES (3)")
        except psycopg.OperationalError as e:
            assert "Timed-out waiting to acquire database connection" in str(e), str(e)
        else:
            raise AssertionError("a write went to the former writer")
        assert proxy.call(writer_id, ctx) is None
        assert "pg-1" not in {t for t, _ in proxy.call(pool_by_target, ctx)}
        assert primary.psql("SELECT count(*) FROM moved", dbname="appdb").strip() == "1"
    finally:
        for conn in (unpinned, pinned, pinned_in_txn, prepared):
            conn.close()
