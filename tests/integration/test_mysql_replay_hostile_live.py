"""A hostile client against the MySQL pin move (wire/mysql/replay.py) on real MariaDB GTID
replication: user variables whose names, read back in the session's own character sets, would
make the capture read another variable or run SQL the client never sent.

The capture and the check run on connections in the session's character_set_client (latin1,
gbk...): a name sent back as UTF-8 there is read differently.  Such a session must never go on
with other values or with SQL of the proxy's making run for it: it is ended at the switchover
(names of user variables that move are printable ASCII), while an ASCII one moves with the same
values.
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

# In gbk, the last byte of U+20AC's UTF-8 (0xAC) starts a two-byte character that swallows the
# doubled backtick's first half: the second one closes the name and the rest is SQL.
INJECTED = "\u20ac`) AS a, 'x', 'y', (@pwn := 1) #"


def _quoted(name):
    return "@`" + name.replace("`", "``") + "`"


def test_user_variable_names_read_in_another_character_set_do_not_move(mariadb_replication_factory,
                                                                         tmp_path):
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
        latin, gbk, plain = (pymysql.connect(**login) for _ in range(3))
        conns += [latin, gbk, plain]
        # @`é` and @`Ã©`: sent as UTF-8 on a latin1 connection, the first name reads the second
        _run_sql(latin, "SET @`\u00e9` = 'secret', @`\u00c3\u00a9` = 'other'")
        _run_sql(latin, "SET character_set_client = latin1")
        _run_sql(gbk, f"SET {_quoted(INJECTED)} = _binary'v'")
        _run_sql(gbk, "SET character_set_client = gbk")
        _run_sql(plain, "SET @`we``ird \\\\ '\"` = _binary X'00FF5C27', @n = 7")
        _run_sql(plain, "SET character_set_client = gbk")
        plain_before = _run_sql(plain, "SELECT HEX(@`we``ird \\\\ '\"`), @n, @pwn IS NULL")
        assert plain_before == (("00FF5C27", 7, 1),)
        assert proxy.session_states().count("pinned") == 3

        primary.mariadb("SET GLOBAL read_only = 1")
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) != "mariadb-1", timeout=20,
                       what="the demoted writer to be dropped")
        for conn in (latin, gbk):
            seq, code, message = _unsolicited_error(conn)
            assert (seq, code) == (0, 1053) and b"the writer changed" in message, message
        replica.sync_with(primary)
        replica.promote()
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) == "mariadb-2", timeout=20,
                       what="the promoted writer")
        assert _run_sql(plain, "SELECT HEX(@`we``ird \\\\ '\"`), @n, @pwn IS NULL") == plain_before
        assert _run_sql(plain, "SELECT @@port, @@character_set_client") == ((replica.port, "gbk"),)
    finally:
        for conn in conns:
            try:
                conn.close()
            except pymysql.err.Error:
                pass  # ended by the proxy
        proxy.stop()
