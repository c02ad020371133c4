"""Switchover and never two writers on real MariaDB GTID replication (issue 11 item 3).

A primary and a read-only replica behind one MYSQL proxy:
1. switchover: the primary gets `SET GLOBAL read_only = 1` and stays up: its idle pooled
   connections are closed at once, a pinned session between transactions whose pin cannot move
   (a temporary table) gets the proxy's unsolicited "writer changed" ERR (1053, 08S01) and the
   close, one inside a transaction is ended right after its COMMIT (pins that move:
   test_mysql_pin_move_live.py); then the replica is promoted and a session that is not pinned writes
   there over its same client connection;
2. the old primary made writable again is not used while the promoted writer answers;
3. the promoted writer stops (unreachable) and the old primary, now the only writer, takes over;
   the stopped one comes back read-write (it never learnt of the change): it is fenced, its
   TargetHealth says INVALID_REPLICATION_STATE and writes keep going to the current writer.
"""

import time

import pymysql  # test extras: a missing driver must fail, not skip

try:
    from failover_util import health_with_reasons, pool_by_target, writer_id
    from proxyutil import HOST, InProcessProxy, write_config
except ImportError:
    from tests.integration.failover_util import health_with_reasons, pool_by_target, writer_id
    from tests.integration.proxyutil import HOST, InProcessProxy, write_config

NATIVE_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_native"








def _unsolicited_error(conn):
    """Read what the proxy sent *conn* on its own (PyMySQL's buffered socket file, which may
    already hold it when it came right behind the last answer; the driver itself would only say
    "lost connection"): -> (sequence id, error code, message bytes) of one ERR packet, then EOF."""
    conn._sock.settimeout(10)
    data = conn._rfile.read()
    assert len(data) > 7 and data[4] == 0xFF, data
    return data[3], int.from_bytes(data[5:7], "little"), data[13:]


def _run_sql(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def test_mysql_switchover_and_never_two_writers(mariadb_replication_factory, tmp_path):
    primary, (replica,) = mariadb_replication_factory(replicas=1, max_connections=40)
    password = primary.users["app_native"]
    targets = [{"RdsResourceId": "mariadb-1", "Endpoint": primary.host, "Port": primary.port},
               {"RdsResourceId": "mariadb-2", "Endpoint": replica.host, "Port": replica.port}]
    (tmp_path / "proxy").mkdir()
    config = write_config(tmp_path / "proxy", "MYSQL", "test-my", f"tcp:0:interface={HOST}",
                          {NATIVE_ARN: ("app_native", password, "MYSQL_NATIVE_PASSWORD")}, targets,
                          {"HealthCheckInterval": 1, "ConnectionBorrowTimeout": 5})
    proxy = InProcessProxy(config)
    try:
        _run(proxy, primary, replica, password)
    finally:
        proxy.stop()


def _run(proxy, primary, replica, password):
    ctx = proxy.ctx
    proxy.wait_for(lambda: proxy.call(health_with_reasons, ctx) == {"mariadb-1": ("AVAILABLE", None),
                                                       "mariadb-2": ("AVAILABLE", None)},
                   timeout=20, what="the first health checks")
    assert proxy.call(writer_id, ctx) == "mariadb-1"
    login = dict(host=HOST, port=proxy.port, user="app_native", password=password, database="appdb",
                 autocommit=True)
    unpinned = pymysql.connect(**login)
    pinned = pymysql.connect(**login)
    pinned_in_txn = pymysql.connect(**login)
    try:
        _run_sql(pinned, "CREATE TEMPORARY TABLE t1 (n int)")  # pins, and cannot move
        _run_sql(pinned_in_txn, "BEGIN")
        _run_sql(pinned_in_txn, "CREATE TEMPORARY TABLE t2 (n int)")  # the same, inside a transaction
        _run_sql(pinned_in_txn, "SET @y = 2")
        _run_sql(unpinned, "CREATE TABLE switched (n int)")
        _run_sql(unpinned, "INSERT INTO switched VALUES (1)")
        assert proxy.session_states().count("pinned") == 2
        assert ("mariadb-1", "IDLE") in proxy.call(pool_by_target, ctx)
        replica.sync_with(primary)

        # -- 1. switchover: the writer is made read-only and stays up
        primary.mariadb("SET GLOBAL read_only = 1")
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) is None, timeout=20,
                       what="the demoted writer to be dropped")
        assert proxy.call(pool_by_target, ctx) == [("mariadb-1", "BORROWED")]  # the open transaction's only
        seq, code, message = _unsolicited_error(pinned)
        assert (seq, code) == (0, 1053) and b"writer changed" in message, message
        assert _run_sql(pinned_in_txn, "SELECT @y") == ((2,),)  # its transaction goes on ...
        _run_sql(pinned_in_txn, "COMMIT")
        seq, code, message = _unsolicited_error(pinned_in_txn)  # ... and it is ended after it
        assert (seq, code) == (0, 1053) and b"The proxy ended this session" in message, message
        assert proxy.call(pool_by_target, ctx) == []

        replica.promote()
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) == "mariadb-2", timeout=20,
                       what="the promoted writer")
        _run_sql(unpinned, "INSERT INTO switched VALUES (2)")
        assert _run_sql(unpinned, "SELECT count(*), @@port, @@global.read_only FROM switched") == (
            (2, replica.port, 0),)

        # -- 2. the old writer made writable again is not used while the promoted one answers
        primary.mariadb("SET GLOBAL read_only = 0")
        deadline = time.monotonic() + 3  # three health-check rounds
        while time.monotonic() < deadline:
            assert proxy.call(writer_id, ctx) == "mariadb-2"
            assert _run_sql(unpinned, "SELECT @@port") == ((replica.port,),)
            time.sleep(0.2)

        # -- 3. the promoted writer stops; the old primary (writable) takes over; the stopped one
        #       comes back read-write and is fenced
        replica.stop()
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) == "mariadb-1", timeout=30,
                       what="the failover to the old primary")
        replica.start()  # promoted before, so it starts writable: it never learnt of the change
        proxy.wait_for(lambda: proxy.call(health_with_reasons, ctx)["mariadb-2"] == ("UNAVAILABLE",
                                                                         "INVALID_REPLICATION_STATE"),
                       timeout=30, what="the former writer to be fenced")
        assert _run_sql(unpinned, "SELECT @@port") == ((primary.port,),)
        _run_sql(unpinned, "INSERT INTO switched VALUES (3)")
        assert proxy.call(writer_id, ctx) == "mariadb-1"
        assert {t for t, _ in proxy.call(pool_by_target, ctx)} == {"mariadb-1"}
    finally:
        for conn in (unpinned, pinned, pinned_in_txn):
            try:
                conn.close()
            except pymysql.err.Error:
                pass  # already ended by the proxy
