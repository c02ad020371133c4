"""Behaviours found by running mysql-connector-python 9.7's own test suite (unittests.py
--use-external-server, tests/) through the proxy.

Each test here pins down a proxy bug that suite found, on real MariaDB with the real driver.
"""

import pytest

import mysql.connector as mysql_connector
from mysql.connector import constants

try:
    from mysql_harness import start_mysql_proxy
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy

USER = "app_native"


@pytest.fixture(scope="module")
def mysql_proxy(mariadb_server, tmp_path_factory):
    proxy = start_mysql_proxy(tmp_path_factory.mktemp("mysqlconf"), mariadb_server)
    yield proxy
    proxy.stop()


def connect(proxy, server, pure, **kw):
    return mysql_connector.connect(host=proxy.host, port=proxy.port, user=USER,
                                   password=server.users[USER], database="appdb",
                                   use_pure=pure, **kw)


@pytest.mark.parametrize("pure", [True, False], ids=["pure", "cext"])
def test_no_backslash_escapes_survives_a_ping(mysql_proxy, mariadb_server, pure):
    """The C extension escapes parameters by SERVER_STATUS_NO_BACKSLASH_ESCAPES of the last OK;
    cursor() pings, and the proxy answers COM_PING itself: its OK must carry the flag of the
    session's sql_mode, or 'abc''cba' goes out as 'abc\\'cba' (a syntax error, or an injection).
    BugOra34984850.test_no_backslash_escapes, BugOra36476195 (test_bugs.py)."""
    cnx = connect(mysql_proxy, mariadb_server, pure)
    try:
        cnx.sql_mode = [constants.SQLMode.NO_BACKSLASH_ESCAPES]
        cnx.ping()
        cur = cnx.cursor()
        cur.execute("SELECT %s, %s", ("abc'cba", "' UNION SELECT 1 #\\"))
        assert cur.fetchall() == [("abc'cba", "' UNION SELECT 1 #\\")]
        cnx.sql_mode = ""
        cnx.ping()
        cur.execute("SELECT %s", ("abc'cba\\",))
        assert cur.fetchall() == [("abc'cba\\",)]
    finally:
        cnx.close()
