"""`rdsproxy describe-db-proxy-sessions` (DescribeDBProxySessions, our extension of the RDS model)
against real PostgreSQL and MariaDB sessions through an in-process proxy, signed with SigV4 and
checked against an IAM policy like every other operation."""

import json

import psycopg
import pymysql

try:
    from rdsapi_util import aws_env, start
    from test_admin import rdsproxy
except ImportError:
    from tests.integration.rdsapi_util import aws_env, start
    from tests.integration.test_admin import rdsproxy


def sessions(endpoint, *args, who="reader"):
    proc = rdsproxy(endpoint, "--output", "json", "describe-db-proxy-sessions", *args, who=who)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["DBProxySessions"]


def test_describe_db_proxy_sessions(pg_server, mariadb_server, tmp_path):
    proxy, endpoint, _ = start(tmp_path, pg_server, mariadb_server=mariadb_server)
    try:
        pinned = psycopg.connect(proxy.dsn(pg_server, sslmode="disable"), autocommit=True)
        pinned.execute("SET application_name = 'secret-app-name-42'")  # pins: set_variable
        pid = pinned.execute("SELECT pg_backend_pid()").fetchone()[0]
        plain = psycopg.connect(proxy.dsn(pg_server, sslmode="disable"), autocommit=True)
        plain.execute("SELECT 1")
        found = sessions(endpoint, "--db-proxy-name", "test-pg")
        assert len(found) == 2
        only = sessions(endpoint, "--db-proxy-name", "test-pg", "--pinned")
        assert len(only) == 1
        [s] = only
        assert s["PinReason"] == "set_variable"
        assert s["PinStatement"] == "SET application_name = ?"
        assert s["State"] == "pinned" and s["UserName"] == "app_scram" and s["DatabaseName"] == "appdb"
        assert s["ClientAddress"] == "127.0.0.1" and s["TLS"] is False
        assert s["DatabaseConnection"]["BackendId"] == pid
        assert s["DatabaseConnection"]["RdsResourceId"] == "pg-1"
        [idle] = sessions(endpoint, "--db-proxy-name", "test-pg", "--no-pinned")
        assert idle["State"] == "idle" and "PinReason" not in idle and "DatabaseConnection" not in idle
        # MySQL: a pin by a user variable, with the literal masked.
        my = pymysql.connect(host=proxy.host, port=proxy.ports[1], user="app_native",
                             password=mariadb_server.users["app_native"], database="appdb",
                             autocommit=True)
        with my.cursor() as cur:
            cur.execute("SET @token = 'secret-token-42'")
            cur.execute("SELECT CONNECTION_ID()")
            (thread_id,) = cur.fetchone()
        [m] = sessions(endpoint, "--db-proxy-name", "test-my", "--pinned")
        assert m["PinStatement"] == "SET @token = ?" and m["PinReason"]
        assert m["DatabaseConnection"]["BackendId"] == thread_id
        # Nothing secret in any answer; an unknown proxy is the RDS fault.
        text = rdsproxy(endpoint, "--output", "json", "describe-db-proxy-sessions", "--db-proxy-name", "test-my",
                        who="reader").stdout
        assert "secret" not in text
        proc = rdsproxy(endpoint, "describe-db-proxy-sessions", "--db-proxy-name", "nope", who="reader")
        assert proc.returncode == 254 and "DBProxyNotFoundFault" in proc.stderr
        for conn in (pinned, plain, my):
            conn.close()
    finally:
        proxy.stop()
