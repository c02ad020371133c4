"""The proxy process on PyPy in front of real PostgreSQL and MariaDB, driven by real clients.

The split is the one a user runs: the proxy is `.venv-pypy3/bin/twistd -n rdsproxy` (Debian's
PyPy 7.3, made by `make setup PYTHON=pypy3`); the clients (psycopg, pgbench, PyMySQL, sysbench)
and this test run on CPython.  psycopg cannot run *on* PyPy 7.3.11 (its ctypes binding fails
there) but talks to a proxy on PyPy like to any server.

Run by `make test-pypy` (TXRDSPROXY_PYPY=1), not by `make test`: building .venv-pypy3 takes
minutes to most of an hour (sdists without PyPy wheels), so CI's `make test` stays CPython-only.
When TXRDSPROXY_PYPY is set, a missing .venv-pypy3 FAILS (it never skips); without it this file
is not collected at all (tests/integration/conftest.py).
"""

import os
import subprocess
import threading
from pathlib import Path

import psycopg
import pymysql
import pytest

try:
    from proxyutil import (PGBENCH, HOST, TwistdProxy, client_env, find_free_port, write_config,
                           write_proxy_config)
    from servers import require_binaries
except ImportError:  # tests/ became a package
    from tests.integration.proxyutil import (PGBENCH, HOST, TwistdProxy, client_env, find_free_port,
                                             write_config, write_proxy_config)
    from tests.integration.servers import require_binaries

REPO = Path(__file__).resolve().parents[2]
NATIVE_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_native"
SYSBENCH = "/usr/bin/sysbench"


def pypy_twistd():
    """.venv-pypy3's twistd (or $TXRDSPROXY_PYPY when it names one); fails when missing."""
    named = os.environ.get("TXRDSPROXY_PYPY", "1")
    path = Path(named) if named not in ("1", "true", "yes") else REPO / ".venv-pypy3" / "bin" / "twistd"
    if not path.exists():
        pytest.fail("no PyPy twistd at %s: run `make setup PYTHON=pypy3` first" % path)
    return str(path)


class PyPyTwistdProxy(TwistdProxy):
    """TwistdProxy with PyPy's twistd."""

    def twistd(self):
        return pypy_twistd()

    def interpreter(self):
        """-> the executable of the running proxy process (/proc/<pid>/exe)."""
        return os.path.realpath("/proc/%d/exe" % self.proc.pid)


def _started(config, port):
    proxy = PyPyTwistdProxy(config, port)
    proxy.start(timeout=120)  # PyPy starts slower than CPython, more so on a loaded machine
    return proxy


def _stopped(proxy):
    status = proxy.stop()
    log = proxy.log()
    assert status in (0, -15), log[-3000:]
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="module")
def pypy_pg_proxy(pg_server, tmp_path_factory):
    port = find_free_port()
    config = write_proxy_config(tmp_path_factory.mktemp("pypy-pg"), pg_server,
                                listen="tcp:%d:interface=127.0.0.1" % port, name="pypy-pg",
                                MaxConnectionsPercent=10)  # 10 of 100: sessions share them
    proxy = _started(config, port)
    yield proxy
    _stopped(proxy)


@pytest.fixture(scope="module")
def pypy_mysql_proxy(mariadb_server, tmp_path_factory):
    port = find_free_port()
    directory = tmp_path_factory.mktemp("pypy-mysql")
    entries = {NATIVE_ARN: ("app_native", mariadb_server.users["app_native"], "MYSQL_NATIVE_PASSWORD")}
    target = {"RdsResourceId": "mariadb-1", "Endpoint": mariadb_server.host, "Port": mariadb_server.port}
    config = write_config(directory, "MYSQL", "pypy-mysql", "tcp:%d:interface=127.0.0.1" % port,
                          entries, [target], {"MaxConnectionsPercent": 10})
    proxy = _started(config, port)
    yield proxy
    _stopped(proxy)


def pg_connect(proxy, pg_server, user="app_scram", **kw):
    return psycopg.connect(host=HOST, port=proxy.port, user=user, password=pg_server.users[user],
                           dbname="appdb", sslmode="disable", connect_timeout=30, **kw)


def my_connect(proxy, mariadb_server, **kw):
    return pymysql.connect(host=HOST, port=proxy.port, user="app_native",
                           password=mariadb_server.users["app_native"], database="appdb",
                           connect_timeout=30, ssl_disabled=True, **kw)


# -- PostgreSQL --------------------------------------------------------------------------------------

def test_the_pg_proxy_runs_on_pypy(pypy_pg_proxy):
    exe = pypy_pg_proxy.interpreter()
    assert "pypy" in os.path.basename(exe), exe


@pytest.mark.parametrize("user", ["app_scram", "app_md5"])
def test_psycopg_queries_parameters_and_errors(pypy_pg_proxy, pg_server, user):
    with pg_connect(pypy_pg_proxy, pg_server, user) as conn:
        assert conn.execute("SELECT current_user, %s::int + 1", (41,)).fetchone() == (user, 42)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table")
        conn.rollback()
        # a result larger than the socket buffers, relayed whole and in order
        rows = conn.execute("SELECT g, repeat('x', g % 97) FROM generate_series(1, 20000) g").fetchall()
        assert [r[0] for r in rows] == list(range(1, 20001))
        assert all(len(r[1]) == r[0] % 97 for r in rows)


def test_concurrent_psycopg_transactions_keep_their_own_rows(pypy_pg_proxy, pg_server):
    """12 clients over a pool of 10: each transaction sees its own uncommitted rows and only
    them, commits land, rollbacks leave nothing (transaction-level multiplexing on PyPy)."""
    with pg_connect(pypy_pg_proxy, pg_server, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pypy_t")
        conn.execute("CREATE TABLE pypy_t (client int, n int)")
    errors = []

    def client(i):
        try:
            with pg_connect(pypy_pg_proxy, pg_server) as conn:
                for n in range(30):
                    with conn.transaction():
                        conn.execute("INSERT INTO pypy_t VALUES (%s, %s)", (i, n))
                        mine = conn.execute("SELECT count(*) FROM pypy_t WHERE client = %s", (i,)).fetchone()[0]
                        if mine != n + 1:
                            errors.append((i, n, mine))
                    try:
                        with conn.transaction():
                            conn.execute("INSERT INTO pypy_t VALUES (%s, -1)", (i,))
                            raise RuntimeError("roll back")
                    except RuntimeError:
                        pass
        except Exception as exc:  # reported below with the others
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    with pg_connect(pypy_pg_proxy, pg_server) as conn:
        counts = dict(conn.execute("SELECT client, count(*) FROM pypy_t GROUP BY client").fetchall())
        assert counts == {i: 30 for i in range(12)}
        assert conn.execute("SELECT count(*) FROM pypy_t WHERE n < 0").fetchone() == (0,)


@pytest.mark.parametrize("reconnect", [False, True], ids=["persistent", "connect-per-tx"])
def test_pgbench_through_the_pypy_proxy(pypy_pg_proxy, pg_server, tmp_path, reconnect):
    """pgbench with its own script (counting transactions, not timing them): every one done,
    none failed, with persistent sessions and with a new md5 login per transaction (-C)."""
    script = tmp_path / "tx.sql"
    script.write_text("\\set v random(1, 1000)\nBEGIN;\nSELECT :v + 1;\nSELECT count(*) FROM pg_class;\nEND;\n")
    clients, per_client = 8, 150 if not reconnect else 40
    argv = [PGBENCH, "-n", "-c", str(clients), "-j", "2", "-t", str(per_client), "-f", str(script),
            "-h", HOST, "-p", str(pypy_pg_proxy.port), "-U", "app_md5", "-M", "extended",
            *(["-C"] if reconnect else []), "appdb"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                         env=client_env(pg_server.users["app_md5"]))
    assert out.returncode == 0, out.stdout + out.stderr + pypy_pg_proxy.log()[-3000:]
    assert "number of transactions actually processed: %d/%d" % (
        clients * per_client, clients * per_client) in out.stdout, out.stdout
    assert "number of failed transactions: 0" in out.stdout, out.stdout


# -- MariaDB ------------------------------------------------------------------------------------------

def test_the_mysql_proxy_runs_on_pypy(pypy_mysql_proxy):
    exe = pypy_mysql_proxy.interpreter()
    assert "pypy" in os.path.basename(exe), exe


def test_pymysql_queries_transactions_and_errors(pypy_mysql_proxy, mariadb_server):
    conn = my_connect(pypy_mysql_proxy, mariadb_server)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 40 + 2, DATABASE(), CURRENT_USER()")
            assert cur.fetchone() == (42, "appdb", "app_native@%")
            with pytest.raises(pymysql.err.ProgrammingError) as info:
                cur.execute("SELECT * FROM no_such_table")
            assert info.value.args[0] == 1146
            cur.execute("DROP TABLE IF EXISTS pypy_m")
            cur.execute("CREATE TABLE pypy_m (id INT PRIMARY KEY, v VARCHAR(200)) ENGINE=InnoDB")
            conn.begin()
            cur.executemany("INSERT INTO pypy_m VALUES (%s, %s)", [(i, "v" * (i % 200)) for i in range(2000)])
            conn.rollback()
            cur.execute("SELECT COUNT(*) FROM pypy_m")
            assert cur.fetchone() == (0,)
            conn.begin()
            cur.executemany("INSERT INTO pypy_m VALUES (%s, %s)", [(i, "v" * (i % 200)) for i in range(2000)])
            conn.commit()
            cur.execute("SELECT id, v FROM pypy_m ORDER BY id")
            rows = cur.fetchall()
            assert [r[0] for r in rows] == list(range(2000))
            assert all(len(v) == i % 200 for i, v in rows)
        conn.ping(reconnect=False)
    finally:
        conn.close()


def test_sysbench_through_the_pypy_proxy(pypy_mysql_proxy, mariadb_server):
    """sysbench oltp_read_write, a fixed number of events (counted, not timed): all done."""
    reason = require_binaries("sysbench")  # raises under CI=true
    if reason:
        pytest.skip(reason)
    common = ["--db-driver=mysql", "--mysql-host=%s" % HOST, "--mysql-port=%d" % pypy_mysql_proxy.port,
              "--mysql-user=app_native", "--mysql-password=%s" % mariadb_server.users["app_native"],
              "--mysql-db=appdb", "--tables=2", "--table-size=500", "--threads=4"]

    def run(workload, *args):
        return subprocess.run([SYSBENCH, workload] + common + list(args), capture_output=True,
                              text=True, timeout=600)

    run("oltp_read_write", "cleanup")
    out = run("oltp_read_write", "prepare")
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        for workload in ("oltp_point_select", "oltp_read_write"):
            out = run(workload, "--events=400", "--time=0", "run")
            assert out.returncode == 0, out.stdout + out.stderr + pypy_mysql_proxy.log()[-3000:]
            assert "total number of events:              400" in out.stdout, out.stdout
    finally:
        run("oltp_read_write", "cleanup")
