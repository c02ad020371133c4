"""Safety and limits: vanishing clients, malformed input, idle clients, admission limits."""

import struct
import time

import pytest

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from proxyutil import (error_fields, kill_socket, raw_login, raw_query, read_messages, send_query,
                           wait_pg_running)
except ImportError:
    from tests.integration.proxyutil import (error_fields, kill_socket, raw_login, raw_query, read_messages,
                                             send_query, wait_pg_running)


def _one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


@pytest.fixture
def safety_table(pg_server):
    pg_server.psql("drop table if exists safety_t; create table safety_t (x int);"
                   " alter table safety_t owner to appdb_owner", dbname="appdb")
    return "safety_t"


def _pool_pids(proxy):
    return proxy.call(lambda: sorted(c.backend_pid for c in proxy.ctx.pool.connections()))


def test_client_killed_mid_transaction(pg_proxy_factory, pg_server, safety_table):
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1)
    sock, _ = raw_login(proxy, pg_server)
    assert raw_query(sock, "begin") == []
    raw_query(sock, "insert into safety_t values (1)")
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    kill_socket(sock)
    proxy.wait_for(lambda: proxy.pool_state() == {"idle": 1}, what="connection back, idle")
    with psycopg.connect(proxy.dsn(pg_server, user="app_md5"), autocommit=True) as conn:
        assert _one(conn, "select pg_backend_pid()") == int(pid)  # rolled back and reused
        assert _one(conn, "select count(*) from safety_t") == 0
        assert _one(conn, "select now() = statement_timestamp()") is True
        assert _one(conn, "select count(*) from pg_stat_activity where pid = pg_backend_pid()"
                          " and backend_xid is not null") == 0


def test_client_killed_while_query_runs(pg_proxy_factory, pg_server, safety_table):
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1)
    sock, _ = raw_login(proxy, pg_server)
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    sql = "begin; insert into safety_t values (2); select pg_sleep(60)"
    send_query(sock, sql)
    try:
        wait_pg_running(pg_server, sql, "PgSleep")  # the client dies while its query runs
        kill_socket(sock)
        with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as conn:
            assert _one(conn, "select pg_backend_pid()") != int(pid)  # the dirty one was closed
            assert _one(conn, "select count(*) from safety_t") == 0
    finally:  # the closed connection's backend sleeps on (holding its lock on safety_t): end it
        pg_server.psql(f"select pg_terminate_backend({int(pid)})")
    assert "client left mid-request" in proxy.logs.text() or "mid-request" in proxy.logs.text()


def test_client_killed_mid_copy(pg_proxy_factory, pg_server, safety_table):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2)
    other = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    try:
        assert _one(other, "select 1") == 1
        sock, _ = raw_login(proxy, pg_server)
        (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
        send_query(sock, "copy safety_t from stdin")
        msgs = read_messages(sock, until=b"G")
        assert msgs[-1][0] == b"G", msgs
        data = b"".join(f"{i}\n".encode() for i in range(1000))
        sock.sendall(b"d" + struct.pack("!I", len(data) + 4) + data)
        kill_socket(sock)
        proxy.wait_for(lambda: int(pid) not in _pool_pids(proxy), what="dirty connection closed")
        live = pg_server.psql(f"select count(*) from pg_stat_activity where pid = {pid}").strip()
        proxy.wait_for(lambda: pg_server.psql(
            f"select count(*) from pg_stat_activity where pid = {pid}").strip() == "0",
            what="server backend gone") if live != "0" else None
        assert _one(other, "select count(*) from safety_t") == 0
        for i in range(5):
            assert _one(other, "select %s::int", (i,)) == i
    finally:
        other.close()


def test_client_killed_mid_large_result(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2)
    other = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    try:
        sock, _ = raw_login(proxy, pg_server)
        (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
        send_query(sock, "select repeat('x', 1000) from generate_series(1, 100000)")
        got = 0
        while got < 256 * 1024:
            got += len(sock.recv(65536))
        kill_socket(sock)
        proxy.wait_for(lambda: int(pid) not in _pool_pids(proxy), what="connection closed")
        assert _one(other, "select count(*) from generate_series(1, 1000)") == 1000
        with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as conn:
            assert _one(conn, "select pg_backend_pid()") != int(pid)
            assert _one(conn, "select 'clean'") == "clean"
    finally:
        other.close()


@pytest.mark.parametrize("bad", [
    b"Q" + struct.pack("!I", 2),                      # length below the header
    b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"x" * 16,  # length above the maximum
], ids=["short-length", "huge-length"])
def test_malformed_message_closes_only_that_client(pg_proxy, pg_server, bad):
    other = psycopg.connect(pg_proxy.dsn(pg_server), autocommit=True)
    try:
        sock, _ = raw_login(pg_proxy, pg_server)
        sock.sendall(bad)
        msgs = read_messages(sock)  # until the proxy closes the socket
        errors = [error_fields(p) for k, p in msgs if k == b"E"]
        assert errors and errors[0]["C"] == "08P01", msgs
        assert "Traceback" not in errors[0].get("M", "") + errors[0].get("D", "")
        assert sock.recv(1) == b""
        sock.close()
        assert _one(other, "select 'still here'") == "still here"
        assert "protocol violation from client" in pg_proxy.logs.text()
    finally:
        other.close()


def test_idle_client_timeout(pg_proxy_factory, pg_server):
    # 3 s against a query every 0.1 s: the working client's gaps stay far below the timeout
    # however loaded the machine (with 1 s and 0.4 s sleeps, one slow gap closed it too).
    proxy = pg_proxy_factory(IdleClientTimeout=3)
    conn = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    busy = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=None)
    try:
        assert _one(conn, "select 1") == 1
        # A client that keeps working is not idle; the idle one is closed meanwhile.
        deadline = time.monotonic() + 60
        while len(proxy.session_states()) > 1:
            assert time.monotonic() < deadline, "the idle client was not closed"
            time.sleep(0.1)
            assert _one(busy, "select 2") == 2
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
        assert _one(busy, "select 3") == 3
        assert proxy.pool_state() == {"idle": 1}  # the database connection stayed pooled
    finally:
        conn.close()
        busy.close()


def test_long_query_is_not_idle(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(IdleClientTimeout=1)
    with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as conn:
        assert _one(conn, "select pg_sleep(2.5)::text") == ""


def test_max_client_connections(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxClientConnections=2)
    a = psycopg.connect(proxy.dsn(pg_server))
    b = psycopg.connect(proxy.dsn(pg_server))
    try:
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(proxy.dsn(pg_server))
        assert "The maximum number of client connections to the proxy exceeded 2." in str(e.value)
    finally:
        a.close()
    proxy.wait_for(lambda: len(proxy.session_states()) == 1, what="a slot free")
    with psycopg.connect(proxy.dsn(pg_server)) as c:
        assert _one(c, "select 1") == 1
    b.close()


def test_max_connection_rate(pg_proxy_factory, pg_server):
    """MaxConnectionRate 1 (a burst of one second's worth): the file's rate reaches the proxy's
    limiter, which is then given a clock that moves only when the test moves it, so the
    machine's speed cannot decide the outcome (four logins that took more than a second each
    used to all get in)."""
    from twisted.internet.task import Clock

    from txrdsproxy.proxy.limits import ConnectionRateLimiter
    proxy = pg_proxy_factory(MaxConnectionRate=1)
    clock = Clock()

    def hold_time_still():
        assert proxy.ctx.admission.connection_rate.rate == 1
        proxy.ctx.admission.connection_rate = ConnectionRateLimiter(1, clock)
    proxy.call(hold_time_still)

    def attempts(n):
        results = []
        for _ in range(n):
            try:
                psycopg.connect(proxy.dsn(pg_server)).close()
                results.append("ok")
            except psycopg.OperationalError as e:
                results.append(str(e))
        return results

    results = attempts(4)
    assert results[0] == "ok", results
    assert len(results) == 4 and all("Rate of connection to proxy exceeded 1." in r for r in results[1:]), results
    proxy.call(clock.advance, 1.0)
    after = attempts(2)  # the bucket refills, by one
    assert after[0] == "ok" and "Rate of connection to proxy exceeded 1." in after[1], after
