"""A real PostgreSQL process stopped (SIGSTOP) in each phase of a database connection's life
(issue 6 item 9): connect/login, InitQuery, mid-transaction, the reset before reuse, the health
check and a cancel.  Each wait ends (short configured timeouts; the tests assert outcomes, not
durations), the slot comes back, and other sessions and other targets keep working.  Every
stopped process gets SIGCONT in cleanup.
"""

import os
import signal
import socket
import struct
import threading

import psycopg
import pytest

try:
    from proxyutil import (
        InProcessProxy, raw_connect, raw_login, raw_query, read_messages, write_proxy_config,
    )
except ImportError:
    from tests.integration.proxyutil import (
        InProcessProxy, raw_connect, raw_login, raw_query, read_messages, write_proxy_config,
    )

TIMEOUTS = {"DatabaseConnectTimeout": 2, "DatabaseOperationTimeout": 1.5, "ConnectionBorrowTimeout": 15}


@pytest.fixture(scope="module")
def victim(tmp_path_factory, pg_server):
    """A PostgreSQL server of this module's own, to be stopped and continued; same users and
    passwords as pg_server (so one proxy's secrets fit both targets)."""
    try:
        from servers import PostgresServer
    except ImportError:
        from tests.integration.servers import PostgresServer
    server = PostgresServer(tmp_path_factory.mktemp("pgstop"), max_connections=40)
    server.start()
    try:
        for name, password in pg_server.users.items():
            server.create_user(name, password, method=pg_server.auth_methods[name])
        server.psql("CREATE ROLE appdb_owner NOLOGIN; GRANT appdb_owner TO %s" % ", ".join(pg_server.users))
        server.create_database("appdb", owner="appdb_owner")
        yield server
    finally:
        if server.running:
            os.kill(postmaster_pid(server), signal.SIGCONT)
        server.stop()


def postmaster_pid(server):
    return int((server.data_dir / "postmaster.pid").read_text().split()[0])


class Stopped:
    """SIGSTOP processes; SIGCONT them all on exit (also on failure)."""

    def __init__(self):
        self.pids = []

    def stop(self, pid):
        os.kill(int(pid), signal.SIGSTOP)
        self.pids.append(int(pid))

    def cont(self):
        while self.pids:
            try:
                os.kill(self.pids.pop(), signal.SIGCONT)
            except ProcessLookupError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cont()


@pytest.fixture
def make_proxy(tmp_path_factory, request):
    def make(server, **overrides):
        config = write_proxy_config(tmp_path_factory.mktemp("stopproxy"), server, **overrides)
        proxy = InProcessProxy(config)
        request.addfinalizer(proxy.stop)
        return proxy
    return make


def _dsn(proxy, server):
    return proxy.dsn(server, user="app_md5", password=server.users["app_md5"], dbname="appdb",
                     connect_timeout=30)


def _works(proxy, server, sql="select 40 + 2"):
    with psycopg.connect(_dsn(proxy, server), autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


def _settled(proxy):
    """No database connection stuck opening, lent, or resetting; no session holding one."""
    state = proxy.pool_state()
    return set(state) <= {"idle"} and not any(
        s in ("borrowed", "pinned", "borrowing") for s in proxy.session_states())


def _pool_pids(proxy):
    return proxy.call(lambda: [c.backend_pid for c in proxy.ctx.pool.connections()])


def _kill(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _wait_for_backend(server, marker, proxy):
    """-> pid of the backend whose query holds *marker* (polled through the superuser)."""
    def find():
        out = server.psql("select pid from pg_stat_activity where query like "
                          f"'%{marker}%' and pid <> pg_backend_pid()").strip()
        return int(out.split()[0]) if out else None
    return proxy.wait_for(find, timeout=15, interval=0.02, what=f"a backend running {marker}")


def test_login_to_a_stopped_server_times_out_and_other_targets_work(victim, pg_server, make_proxy):
    proxy = make_proxy(victim, **TIMEOUTS)
    other = make_proxy(pg_server)
    with Stopped() as stopped:
        stopped.stop(postmaster_pid(victim))  # TCP connects still succeed (listen backlog)
        with pytest.raises(psycopg.OperationalError) as e:
            _works(proxy, victim)
        assert "timed out after 2 s" in str(e.value), str(e.value)
        assert proxy.pool_state() == {}  # the attempt's slot is free
        assert "database login to" in proxy.logs.text()
        assert _works(other, pg_server) == 42  # another target, unaffected
    assert _works(proxy, victim) == 42  # continued: the same proxy serves again
    proxy.wait_for(lambda: _settled(proxy), what="settled")


def test_init_query_on_a_stopped_backend_times_out(victim, make_proxy):
    marker = "initquery_marker_7"
    proxy = make_proxy(victim, InitQuery=f"select '{marker}', pg_sleep(2)",
                       **dict(TIMEOUTS, DatabaseConnectTimeout=5, DatabaseOperationTimeout=10))
    failures = []

    def client():
        try:
            _works(proxy, victim)
        except psycopg.OperationalError as e:
            failures.append(str(e))

    with Stopped() as stopped:
        t = threading.Thread(target=client)
        t.start()
        stopped.stop(_wait_for_backend(victim, marker, proxy))
        t.join(30)
        assert not t.is_alive()
        assert failures and "timed out after 5 s" in failures[0], failures
        assert proxy.pool_state() == {}


def test_stopped_backend_mid_transaction_frees_its_slot_when_the_client_gives_up(victim, make_proxy):
    proxy = make_proxy(victim, **TIMEOUTS)
    sock, _ = raw_login(proxy, victim)
    raw_query(sock, "begin")
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    with Stopped() as stopped:
        stopped.stop(pid)
        body = b"select 1\0"
        sock.sendall(b"Q" + struct.pack("!I", len(body) + 4) + body)  # never answered
        assert _works(proxy, victim) == 42  # other sessions: another connection
        _kill(sock)  # the client gives up
        proxy.wait_for(lambda: int(pid) not in _pool_pids(proxy), what="stalled connection closed")
        proxy.wait_for(lambda: _settled(proxy), what="settled")
        assert _works(proxy, victim) == 42


def test_reset_of_a_stopped_backend_times_out_and_frees_the_slot(victim, make_proxy):
    proxy = make_proxy(victim, **TIMEOUTS)
    sock, _ = raw_login(proxy, victim)
    raw_query(sock, "begin")  # left open: the connection needs a ROLLBACK before reuse
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    with Stopped() as stopped:
        stopped.stop(pid)
        sock.sendall(b"X\0\0\0\x04")  # Terminate, between requests: a clean exit
        sock.close()
        proxy.wait_for(lambda: int(pid) not in _pool_pids(proxy), timeout=15,
                       what="the connection whose reset hung is closed")
        assert "internal query timed out after 1.5 s" in proxy.logs.text()
        proxy.wait_for(lambda: _settled(proxy), what="settled")
        assert _works(proxy, victim) == 42


def test_health_check_of_a_stopped_target_fails_and_the_writer_keeps_serving(victim, pg_server, make_proxy):
    from txrdsproxy.failover.monitor import AVAILABLE, UNAVAILABLE
    proxy = make_proxy(pg_server, targets=[pg_server, victim], HealthCheckInterval=1,
                       **TIMEOUTS)
    target = proxy.call(lambda: proxy.ctx.topology.targets[1])

    def health():
        return proxy.call(lambda: proxy.ctx.health.health_of(target).state)

    proxy.wait_for(lambda: health() == AVAILABLE, timeout=20, what="second target checked")
    with Stopped() as stopped:
        stopped.stop(postmaster_pid(victim))
        proxy.wait_for(lambda: health() == UNAVAILABLE, timeout=30, what="stopped target unavailable")
        with psycopg.connect(proxy.dsn(pg_server, user="app_md5"), autocommit=True) as conn:
            assert conn.execute("select 1 + 1").fetchone()[0] == 2  # the writer serves on
    proxy.wait_for(lambda: health() == AVAILABLE, timeout=30, what="target back")


def test_cancel_to_a_stopped_postmaster_gives_up(victim, make_proxy):
    proxy = make_proxy(victim, **TIMEOUTS)
    sock, msgs = raw_login(proxy, victim)
    key = next(p for k, p in msgs if k == b"K")
    body = b"select pg_sleep(1)\0"
    with Stopped() as stopped:
        sock.sendall(b"Q" + struct.pack("!I", len(body) + 4) + body)
        proxy.wait_for(lambda: proxy.pool_state().get("borrowed"), what="query running")
        stopped.stop(postmaster_pid(victim))  # cancels go to the postmaster
        cancel = raw_connect(proxy)
        cancel.sendall(struct.pack("!II", 16, 80877102) + key)
        cancel.settimeout(20)
        assert cancel.recv(1) == b""  # closed once the proxy gave up on the database
        cancel.close()
    assert read_messages(sock, until=b"Z")[-1] == (b"Z", b"I")  # the query finished normally
    sock.close()


# -- MySQL / MariaDB: the server is one process; stopping it stops every connection ------------------
def test_mysql_stopped_server_login_and_reset_are_bounded(mariadb_server, tmp_path):
    import pymysql
    try:
        from mysql_harness import start_mysql_proxy
    except ImportError:
        from tests.integration.mysql_harness import start_mysql_proxy
    proxy = start_mysql_proxy(tmp_path, mariadb_server, **TIMEOUTS)
    server_pid = int(mariadb_server.pid_path.read_text().split()[0])

    def connect(**kw):
        return pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                               password=mariadb_server.users["app_native"], autocommit=True,
                               connect_timeout=30, read_timeout=30, **kw)

    try:
        with connect() as warm:  # the greeting is known from here on
            with warm.cursor() as cur:
                cur.execute("select 1")
        holder = connect()
        with holder.cursor() as cur:
            cur.execute("begin")
            cur.execute("select 1")
        proxy.wait_for(lambda: proxy.pool_state().get("borrowed") == 1, what="transaction holds a connection")
        with Stopped() as stopped:
            stopped.stop(server_pid)
            holder.close()  # COM_QUIT between requests: the open transaction needs a ROLLBACK
            with pytest.raises(pymysql.err.OperationalError):
                with connect(database="appdb") as c:  # needs a new connection: login times out
                    with c.cursor() as cur:
                        cur.execute("select 1")
            proxy.wait_for(lambda: proxy.pool_state() == {}, timeout=15,
                           what="the resetting and the opening connection both closed")
            text = proxy.logs.text()
            assert "internal command timed out after 1.5 s" in text, text[-3000:]
            assert "database login to" in text
        with connect() as again:
            with again.cursor() as cur:
                cur.execute("select 40 + 2")
                assert cur.fetchone()[0] == 42
    finally:
        os.kill(server_pid, signal.SIGCONT)
        proxy.stop()
