"""Real MySQL clients through the proxy: PyMySQL, mysql-connector-python, the mariadb CLI."""

import os
import subprocess

import pytest

pymysql = pytest.importorskip("pymysql")
mysql_connector = pytest.importorskip("mysql.connector")

try:
    from mysql_harness import start_mysql_proxy
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy

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
        pytest.skip("mysql-connector C extension cannot load here (_mysql_connector)")
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
