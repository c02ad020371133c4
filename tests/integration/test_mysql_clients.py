"""Real MySQL clients through the proxy: PyMySQL, mysql-connector-python, the mariadb CLI."""

import os
import subprocess

import pytest

import mysql.connector as mysql_connector  # the test extras install both drivers: no skipping
import pymysql

try:
    from mysql_harness import kill_connection_ends_only_the_victim, start_mysql_proxy
    from servers import require_binaries
    from proxyutil import mariadb_running, wait_for
except ImportError:
    from tests.integration.mysql_harness import kill_connection_ends_only_the_victim, start_mysql_proxy
    from tests.integration.servers import require_binaries
    from tests.integration.proxyutil import mariadb_running, wait_for

USER = "app_native"


def _cext_available():
    try:
        import _mysql_connector  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def mysql_proxy(mariadb_server, tmp_path_factory):
    proxy = start_mysql_proxy(tmp_path_factory.mktemp("mysqlproxy"), mariadb_server)
    yield proxy
    proxy.stop()


def pm(proxy, server, database="appdb", **kw):
    kw.setdefault("password", server.users[USER])
    return pymysql.connect(host=proxy.host, port=proxy.port, user=kw.pop("user", USER),
                           database=database, autocommit=kw.pop("autocommit", True), **kw)


def mc(proxy, server, pure=True, database="appdb", **kw):
    if not pure and not _cext_available():
        reason = "mysql-connector C extension cannot load here (_mysql_connector)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " [CI=true: not skipping]")
        pytest.skip(reason)
    kw.setdefault("password", server.users[USER])
    return mysql_connector.connect(host=proxy.host, port=proxy.port, user=kw.pop("user", USER),
                                   database=database, use_pure=pure, **kw)


def mariadb_cli(proxy, server, args, input=None, database="appdb", password=None, timeout=60):
    cmd = ["mariadb", "--no-defaults", "--protocol=TCP", "-h", proxy.host, "-P", str(proxy.port),
           "-u", USER, "--batch", "--skip-column-names"]
    if database:
        cmd += ["-D", database]
    env = dict(os.environ, MYSQL_PWD=password if password is not None else server.users[USER])
    return subprocess.run(cmd + list(args), input=input, capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- basics ----------------------------------------------------------------------------------------

def test_pymysql_query_and_error(mysql_proxy, mariadb_server):
    conn = pm(mysql_proxy, mariadb_server)
    with conn.cursor() as cur:
        cur.execute("SELECT 40 + 2, DATABASE(), CURRENT_USER()")
        assert cur.fetchone() == (42, "appdb", "app_native@%")
        with pytest.raises(pymysql.err.ProgrammingError) as info:
            cur.execute("SELECT * FROM no_such_table")
        assert info.value.args[0] == 1146
        cur.execute("SELECT 'after'")
        assert cur.fetchone() == ("after",)
    conn.ping()
    conn.close()


@pytest.mark.parametrize("pure", [True, False], ids=["pure", "cext"])
def test_mysql_connector_query(mysql_proxy, mariadb_server, pure):
    conn = mc(mysql_proxy, mariadb_server, pure=pure)
    cur = conn.cursor()
    cur.execute("SELECT 1 + 1, DATABASE()")
    assert cur.fetchall() == [(2, "appdb")]
    conn.ping(reconnect=False)
    conn.close()


def test_mariadb_cli(mysql_proxy, mariadb_server):
    out = mariadb_cli(mysql_proxy, mariadb_server, ["-e", "SELECT 6*7; SELECT DATABASE()"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "appdb"]


def test_mariadb_cli_error_text(mysql_proxy, mariadb_server):
    out = mariadb_cli(mysql_proxy, mariadb_server, ["-e", "SELECT * FROM nope"])
    assert out.returncode != 0
    assert "1146" in out.stderr and "doesn't exist" in out.stderr


def test_wrong_password_text(mysql_proxy, mariadb_server):
    out = mariadb_cli(mysql_proxy, mariadb_server, ["-e", "SELECT 1"], password="wrong")
    assert out.returncode != 0
    assert "ERROR 1045 (28000): Access denied for user 'app_native'@'%' (using password: YES)" \
        in out.stderr
    with pytest.raises(pymysql.err.OperationalError) as info:
        pm(mysql_proxy, mariadb_server, password="nope")
    assert info.value.args[0] == 1045


def test_unknown_initial_database(mysql_proxy, mariadb_server):
    with pytest.raises(pymysql.err.OperationalError) as info:
        pm(mysql_proxy, mariadb_server, database="no_such_db")
    assert info.value.args[0] == 1049


# -- protocol features -----------------------------------------------------------------------------

def test_multi_statements_and_call_multi_results(mysql_proxy, mariadb_server):
    conn = pm(mysql_proxy, mariadb_server,
              client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
    with conn.cursor() as cur:
        cur.execute("SELECT 1; SELECT 2, 3; DO 0")
        assert cur.fetchall() == ((1,),)
        assert cur.nextset() and cur.fetchall() == ((2, 3),)
        cur.execute("DROP PROCEDURE IF EXISTS two_sets")
        cur.execute("CREATE PROCEDURE two_sets() BEGIN SELECT 'a'; SELECT 'b', 'c'; END")
        cur.execute("CALL two_sets()")
        assert cur.fetchall() == (("a",),)
        assert cur.nextset() and cur.fetchall() == (("b", "c"),)
        while cur.nextset():
            pass
        with pytest.raises(pymysql.err.ProgrammingError):
            cur.execute("SELECT 1; SELECT * FROM nope")
            while cur.nextset():
                pass
        cur.execute("SELECT 'still fine'")
        assert cur.fetchone() == ("still fine",)
    conn.close()


def test_load_data_local_infile(mysql_proxy, mariadb_server, tmp_path):
    src = tmp_path / "rows.csv"
    src.write_text("".join(f"{i},row {i}\n" for i in range(1, 20001)))
    conn = pm(mysql_proxy, mariadb_server, local_infile=True)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS infile_t")
        cur.execute("CREATE TABLE infile_t (id INT PRIMARY KEY, label VARCHAR(40))")
        cur.execute(f"LOAD DATA LOCAL INFILE '{src}' INTO TABLE infile_t "
                    "FIELDS TERMINATED BY ',' LINES TERMINATED BY '\\n'")
        cur.execute("SELECT COUNT(*), MAX(id) FROM infile_t")
        assert cur.fetchone() == (20000, 20000)
    conn.close()
    out = mariadb_cli(mysql_proxy, mariadb_server, ["--local-infile=1", "-e",
                      f"DELETE FROM infile_t; LOAD DATA LOCAL INFILE '{src}' INTO TABLE infile_t"
                      " FIELDS TERMINATED BY ','; SELECT COUNT(*) FROM infile_t"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["20000"]


@pytest.mark.parametrize("pure", [True, False], ids=["pure", "cext"])
def test_binary_prepared_statements(mysql_proxy, mariadb_server, pure):
    conn = mc(mysql_proxy, mariadb_server, pure=pure, autocommit=True)
    cur = conn.cursor(prepared=True)
    cur.execute("SELECT ? + 1, ?", (41, "text"))
    assert cur.fetchall() == [(42, "text")]
    cur.execute("SELECT ? * 2", (21,))
    assert cur.fetchall() == [(42,)]
    cur.close()
    assert mysql_proxy.call(lambda: mysql_proxy.ctx.pin_counts.get("prepared_statement", 0)) >= 1
    conn.close()


def test_com_init_db_and_use(mysql_proxy, mariadb_server):
    mariadb_server.mariadb("CREATE DATABASE IF NOT EXISTS otherdb")
    conn = pm(mysql_proxy, mariadb_server)
    conn.select_db("otherdb")  # COM_INIT_DB
    with conn.cursor() as cur:
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == ("otherdb",)
        cur.execute("USE appdb")
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == ("appdb",)
    with pytest.raises(pymysql.err.OperationalError) as info:
        conn.select_db("no_such_db")
    assert info.value.args[0] == 1049
    with conn.cursor() as cur:
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == ("appdb",)
    conn.close()


def test_change_user_and_reset_connection(mysql_proxy, mariadb_server):
    conn = mc(mysql_proxy, mariadb_server, autocommit=True)
    cur = conn.cursor()
    cur.execute("SET @v = 7")  # pins
    cur.execute("SELECT @v")
    assert cur.fetchall() == [(7,)]
    conn.cmd_reset_connection()
    cur = conn.cursor()
    cur.execute("SELECT @v")
    assert cur.fetchall() == [(None,)]
    cur.execute("SET @w = 8")
    cur.close()
    conn.cmd_change_user(username=USER, password=mariadb_server.users[USER], database="appdb")
    cur = conn.cursor()
    cur.execute("SELECT @w, CURRENT_USER(), DATABASE()")
    assert cur.fetchall() == [(None, "app_native@%", "appdb")]
    cur.close()
    conn.close()


def test_change_user_wrong_password(mysql_proxy, mariadb_server):
    conn = mc(mysql_proxy, mariadb_server)
    with pytest.raises(mysql_connector.Error) as info:
        conn.cmd_change_user(username=USER, password="bad", database="appdb")
    assert info.value.errno == 1045


def test_large_rows_over_16mib(mariadb_server, tmp_path):
    mariadb_server.mariadb("SET GLOBAL max_allowed_packet = 64*1024*1024")
    proxy = start_mysql_proxy(tmp_path, mariadb_server, name="big")
    try:
        size = 20 * 1024 * 1024
        conn = pm(proxy, mariadb_server, max_allowed_packet=64 * 1024 * 1024)
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS big_t")
            cur.execute("CREATE TABLE big_t (id INT, b LONGBLOB)")
            blob = bytes(range(256)) * (size // 256)
            cur.execute("INSERT INTO big_t VALUES (1, %s)", (blob,))  # >16 MiB client packet
            cur.execute("SELECT b FROM big_t WHERE id = 1")  # >16 MiB row
            assert cur.fetchone()[0] == blob
            cur.execute("SELECT LENGTH(REPEAT('x', %s))" % size)
            assert cur.fetchone() == (size,)
            cur.execute("SELECT 'next'")
            assert cur.fetchone() == ("next",)
        conn.close()
    finally:
        proxy.stop()


def test_compression_refused_cleanly(mysql_proxy, mariadb_server):
    out = mariadb_cli(mysql_proxy, mariadb_server, ["--compress", "-e", "SELECT 5"])
    # The proxy never advertises CLIENT_COMPRESS: the client proceeds uncompressed.
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5"]


def test_invalid_charset_client(mysql_proxy, mariadb_server):
    conn = pm(mysql_proxy, mariadb_server)
    with conn.cursor() as cur:
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("SET character_set_client = 'ucs2'")
        assert info.value.args[0] == 1231
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()


SYSBENCH = "/usr/bin/sysbench"


@pytest.mark.parametrize("workload", ["oltp_point_select", "oltp_read_write"])
def test_sysbench(mysql_proxy, mariadb_server, workload):
    reason = require_binaries("sysbench")  # raises under CI=true
    if reason:
        pytest.skip(reason)
    common = ["--db-driver=mysql", f"--mysql-host={mysql_proxy.host}",
              f"--mysql-port={mysql_proxy.port}", f"--mysql-user={USER}",
              f"--mysql-password={mariadb_server.users[USER]}", "--mysql-db=appdb",
              "--tables=2", "--table-size=500", "--threads=4"]
    run = lambda *args: subprocess.run([SYSBENCH, workload] + common + list(args),  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    run("cleanup")
    out = run("prepare")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run("--time=3", "run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "transactions:" in out.stdout
    run("cleanup")


def test_empty_password_says_using_password_no(mysql_proxy, mariadb_server):
    out = mariadb_cli(mysql_proxy, mariadb_server, ["-e", "SELECT 1"], password="")
    assert "ERROR 1045 (28000): Access denied for user 'app_native'@'%' (using password: NO)" \
        in out.stderr


def test_kill_query_by_the_id_from_the_greeting(mysql_proxy, mariadb_server):
    # The id a client sees (thread_id(), CONNECTION_ID() is the server's) is the proxy's
    # session id; KILL QUERY with it must stop the query that session runs, wherever it runs.
    import threading
    victim, killer = pm(mysql_proxy, mariadb_server), pm(mysql_proxy, mariadb_server)
    result = {}

    def sleeper():
        with victim.cursor() as cur:
            try:
                cur.execute("SELECT SLEEP(20)")
                result["value"] = cur.fetchone()[0]
            except pymysql.err.OperationalError as e:
                result["error"] = e.args[0]

    t = threading.Thread(target=sleeper)
    t.start()
    # KILL QUERY once the server runs it (before that it is a session without a query: nothing to
    # kill, and SLEEP(20) would sleep its full time).
    wait_for(lambda: mariadb_running(mariadb_server, "SELECT SLEEP(20)"), what="SLEEP(20) running")
    with killer.cursor() as cur:
        cur.execute("KILL QUERY %d" % victim.thread_id())
    t.join(30)
    # interrupted: SLEEP() returns 1 when killed (0 after sleeping its full time), or error 1317
    assert result.get("value") == 1 or result.get("error") == 1317, result
    with victim.cursor() as cur:  # the session goes on
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone() == (42,)
    # An idle session: nothing to kill, still OK.
    with killer.cursor() as cur:
        cur.execute("KILL QUERY %d" % victim.thread_id())
    # KILL CONNECTION ends that client session only.
    kill_connection_ends_only_the_victim(killer, victim)
    killer.close()
