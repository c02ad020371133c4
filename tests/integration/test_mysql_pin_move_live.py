"""Switchover on real MariaDB GTID replication: pinned sessions whose pin is only variables move.

A primary and a replica behind one MYSQL proxy; the primary gets `SET GLOBAL read_only = 1` and
stays up, then the replica is promoted (issue 11 item 3).  With real PyMySQL clients:
- a session pinned by user variables (a string in utf8mb4 with its collation, an integer, a
  decimal, NULL) and session system variables (one set to the server's global value too) keeps
  its client connection: after the switchover the same connection reads the same values, from
  the new writer, and writes there;
- a session pinned inside a transaction moves once it has committed;
- a session with a temporary table gets the unsolicited "writer changed" ERR and the close.
"""

import pymysql  # test extras: a missing driver must fail, not skip

try:
    from failover_util import health_with_reasons, writer_id
    from proxyutil import HOST, InProcessProxy, write_config
    from test_mysql_switchover import NATIVE_ARN, _run_sql, _unsolicited_error
except ImportError:
    from tests.integration.failover_util import health_with_reasons, writer_id
    from tests.integration.proxyutil import HOST, InProcessProxy, write_config
    from tests.integration.test_mysql_switchover import NATIVE_ARN, _run_sql, _unsolicited_error

VALUES = ("SELECT @s, COLLATION(@s), @i, @d, @n IS NULL, @@session.div_precision_increment,"
          " @@session.sql_select_limit, @@session.max_join_size = @@global.max_join_size")


def test_mysql_sessions_pinned_by_variables_move_to_the_new_writer(mariadb_replication_factory, tmp_path):
    primary, (replica,) = mariadb_replication_factory(replicas=1, max_connections=40)
    password = primary.users["app_native"]
    targets = [{"RdsResourceId": "mariadb-1", "Endpoint": primary.host, "Port": primary.port},
               {"RdsResourceId": "mariadb-2", "Endpoint": replica.host, "Port": replica.port}]
    (tmp_path / "proxy").mkdir()
    config = write_config(tmp_path / "proxy", "MYSQL", "test-my", f"tcp:0:interface={HOST}",
                          {NATIVE_ARN: ("app_native", password, "MYSQL_NATIVE_PASSWORD")}, targets,
                          {"HealthCheckInterval": 1, "ConnectionBorrowTimeout": 30})
    proxy = InProcessProxy(config)
    ctx = proxy.ctx
    login = dict(host=HOST, port=proxy.port, user="app_native", password=password, database="appdb",
                 autocommit=True, charset="utf8mb4")
    conns = []
    try:
        proxy.wait_for(lambda: proxy.call(health_with_reasons, ctx) == {
            "mariadb-1": ("AVAILABLE", None), "mariadb-2": ("AVAILABLE", None)},
            timeout=20, what="the first health checks")
        moving, in_txn, temp = (pymysql.connect(**login) for _ in range(3))
        conns += [moving, in_txn, temp]
        _run_sql(moving, "SET @s = _utf8mb4'h\u00e9llo \U0001F600' COLLATE utf8mb4_bin, @i = -42,"
                         " @d = 1.50, @n = NULL")  # pins (user variables)
        _run_sql(moving, "SET SESSION div_precision_increment = 7, sql_select_limit = 1000,"
                         " max_join_size = @@global.max_join_size")  # the last: the global value
        before = _run_sql(moving, VALUES)
        assert before == (("h\u00e9llo \U0001F600", "utf8mb4_bin", -42, 1.5, 1, 7, 1000, 1),), before
        _run_sql(in_txn, "SET @t = 'in a transaction'")
        _run_sql(in_txn, "BEGIN")
        _run_sql(in_txn, "SELECT 1")
        _run_sql(temp, "CREATE TEMPORARY TABLE t (n int)")
        assert proxy.session_states().count("pinned") == 3
        assert _run_sql(moving, "SELECT @@port") == ((primary.port,),)

        primary.mariadb("SET GLOBAL read_only = 1")
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) != "mariadb-1", timeout=20,
                       what="the demoted writer to be dropped")
        seq, code, message = _unsolicited_error(temp)
        assert (seq, code) == (0, 1053) and b"the writer changed" in message, message
        _run_sql(in_txn, "COMMIT")  # its boundary: it moves now
        replica.sync_with(primary)
        replica.promote()
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) == "mariadb-2", timeout=20,
                       what="the promoted writer")

        assert _run_sql(moving, VALUES) == before
        assert _run_sql(moving, "SELECT @@port, @@global.read_only") == ((replica.port, 0),)
        _run_sql(moving, "CREATE TABLE after_move (n int)")  # it writes: the new writer
        assert _run_sql(in_txn, "SELECT @t, @@port") == (("in a transaction", replica.port),)
        # the moved ones, pinned again (the ended one leaves once its socket has closed)
        proxy.wait_for(lambda: sorted(proxy.session_states()) == ["pinned", "pinned"],
                       what="the moved sessions alone")
    finally:
        for conn in conns:
            try:
                conn.close()
            except pymysql.err.Error:
                pass  # ended by the proxy
        proxy.stop()
