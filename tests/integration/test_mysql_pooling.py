"""Multiplexing, tracked variables, pinning, limits and disconnects through the MySQL proxy."""

import socket
import threading
import time

import pytest

import mysql.connector  # installed by the test extras
import pymysql

try:
    from mysql_harness import start_mysql_proxy
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy

MUX_USER = "app_mux"
MUX_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_mux"
MUX_PASSWORD = "mux-pass-31ad"


@pytest.fixture(scope="module")
def mux_user(mariadb_server):
    if MUX_USER not in mariadb_server.users:
        mariadb_server.create_user(MUX_USER, MUX_PASSWORD)
    return MUX_USER


@pytest.fixture
def proxy_factory(mariadb_server, mux_user, tmp_path):
    started = []

    def make(**overrides):
        secrets = {MUX_ARN: (MUX_USER, MUX_PASSWORD, "MYSQL_NATIVE_PASSWORD")}
        proxy = start_mysql_proxy(tmp_path / f"p{len(started)}", mariadb_server, secrets=secrets,
                                  name=f"pool{len(started)}", **overrides)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def connect(proxy, database="appdb", autocommit=True, password=MUX_PASSWORD, **kw):
    return pymysql.connect(host=proxy.host, port=proxy.port, user=MUX_USER, password=password,
                           database=database, autocommit=autocommit, **kw)


def one(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def server_connections(server):
    out = server.mariadb("SELECT COUNT(*) FROM information_schema.processlist"
                         " WHERE user = '%s'" % MUX_USER)
    return int(out.strip())


# -- multiplexing ------------------------------------------------------------------------------------

def test_many_clients_share_few_connections(proxy_factory, mariadb_server):
    proxy = proxy_factory(MaxConnectionsPercent=2)  # max_connections=100 -> 2
    clients = [connect(proxy) for _ in range(12)]
    errors = []
    peak = []

    def work(conn, n):
        try:
            for i in range(20):
                assert one(conn, f"SELECT {n} * 1000 + {i}") == (n * 1000 + i,)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c, n)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak.append(server_connections(mariadb_server))
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors
    assert max(peak + [server_connections(mariadb_server)]) <= 2
    for c in clients:
        c.close()


def test_transaction_holds_connection_until_commit(proxy_factory, mariadb_server):
    proxy = proxy_factory(MaxConnectionsPercent=1, ConnectionBorrowTimeout=1)
    a, b = connect(proxy), connect(proxy)
    one(a, "DROP TABLE IF EXISTS txn_t")
    one(a, "CREATE TABLE txn_t (x INT)")
    a.begin()
    one(a, "INSERT INTO txn_t VALUES (1)")
    with pytest.raises(pymysql.err.OperationalError) as info:
        one(b, "SELECT 1")  # the only connection is in a's transaction
    assert info.value.args == (9501, "Timed-out waiting to acquire database connection")
    a.commit()
    assert one(b, "SELECT COUNT(*) FROM txn_t") == (1,)  # b's session is still usable
    # autocommit off: the connection is held from the first statement to COMMIT/ROLLBACK.
    one(a, "SET autocommit = 0")
    one(a, "INSERT INTO txn_t VALUES (2)")
    with pytest.raises(pymysql.err.OperationalError):
        one(b, "SELECT 1")
    one(a, "ROLLBACK")
    assert one(b, "SELECT COUNT(*) FROM txn_t") == (1,)
    assert one(b, "SELECT @@autocommit") == (1,)
    assert one(a, "SELECT @@autocommit") == (0,)
    a.close()
    b.close()


def test_tracked_variables_never_leak(proxy_factory, mariadb_server):
    mariadb_server.mariadb("CREATE DATABASE IF NOT EXISTS otherdb")
    proxy = proxy_factory(MaxConnectionsPercent=1)  # one connection serves both sessions
    a, b = connect(proxy), connect(proxy, database="otherdb")
    default_mode = one(b, "SELECT @@sql_mode")[0]
    one(a, "SET time_zone = '+05:00'")
    one(a, "SET sql_mode = 'ANSI_QUOTES'")
    one(a, "SET NAMES latin1")
    one(b, "USE appdb")
    one(a, "USE otherdb")
    for _ in range(3):
        assert one(a, "SELECT @@time_zone, @@sql_mode, DATABASE(), @@character_set_client") == \
            ("+05:00", "ANSI_QUOTES", "otherdb", "latin1")
        assert one(b, "SELECT @@time_zone, @@sql_mode, DATABASE(), @@character_set_client") == \
            ("SYSTEM", default_mode, "appdb", "utf8mb4")
    assert proxy.call(lambda: dict(proxy.ctx.pin_counts)) == {}
    assert server_connections(mariadb_server) == 1
    a.close()
    b.close()


def test_autocommit_synced_with_the_command_never_leaks(proxy_factory, mariadb_server):
    # One connection, sessions alternating between autocommit 0 and 1: each borrow needs
    # `SET autocommit=N`, which goes in the same write as the session's command (sync_inline);
    # its OK must never reach the client, and each session sees its own value and status flag.
    proxy = proxy_factory(MaxConnectionsPercent=1)
    a = connect(proxy, autocommit=False)  # PyMySQL sends SET AUTOCOMMIT = 0 at connect
    b = connect(proxy, autocommit=True)
    for i in range(4):
        assert one(a, f"SELECT @@autocommit, {i}") == (0, i)
        assert not a.get_autocommit()  # the status flag of the last answer it got
        a.rollback()
        assert one(b, f"SELECT @@autocommit, {i}") == (1, i)
        assert b.get_autocommit()
    with b.cursor() as cur:  # a multi-row answer after an inline SET
        cur.execute("SELECT seq FROM seq_1_to_500")
        assert [r[0] for r in cur.fetchall()] == list(range(1, 501))
    assert server_connections(mariadb_server) == 1
    a.close()
    b.close()


def test_a_drivers_connect_sets_cost_the_database_nothing(proxy_factory, mariadb_server):
    # PyMySQL connects with SET NAMES utf8mb4 and SET AUTOCOMMIT = 0: the proxy answers both
    # (the session holds no connection yet) and the value reaches the connection with the
    # first query.  Counted on the server: SET statements it ran for 6 such connects.
    proxy = proxy_factory(MaxConnectionsPercent=1)

    def sets():
        out = mariadb_server.mariadb("SHOW GLOBAL STATUS LIKE 'Com_set_option'")
        return int(out.split()[-1])

    connect(proxy, autocommit=False).close()  # warm-up: greeting, pool, collations
    before = sets()
    for i in range(6):
        conn = connect(proxy, autocommit=False)
        assert not conn.get_autocommit()
        assert one(conn, f"SELECT @@autocommit, @@character_set_client, {i}") == (0, "utf8mb4", i)
        conn.rollback()
        conn.close()
    assert sets() - before <= 1  # before: 3 per connect (SET NAMES, SET AUTOCOMMIT, a sync)
    other = connect(proxy, autocommit=True)  # and nobody else sees autocommit=0
    assert one(other, "SELECT @@autocommit") == (1,)
    other.close()


# -- pinning -------------------------------------------------------------------------------------------

def test_user_variables_and_temp_tables_pin_then_reset(proxy_factory, mariadb_server):
    proxy = proxy_factory(MaxConnectionsPercent=1, ConnectionBorrowTimeout=1)
    a, b = connect(proxy), connect(proxy)  # (login checks the database on a borrowed connection)
    one(a, "SET @secret = 'a-only'")
    one(a, "CREATE TEMPORARY TABLE tmp_a (x INT)")
    one(a, "INSERT INTO tmp_a VALUES (1)")
    assert one(a, "SELECT @secret, (SELECT COUNT(*) FROM tmp_a)") == ("a-only", 1)
    assert proxy.session_states().count("pinned") == 1
    with pytest.raises(pymysql.err.OperationalError) as info:
        one(b, "SELECT 1")  # pinned connection is not shared
    assert info.value.args[0] == 9501
    a.close()  # the pinned connection is reset (COM_RESET_CONNECTION), then reused
    assert one(b, "SELECT @secret") == (None,)
    with pytest.raises(pymysql.err.ProgrammingError):
        one(b, "SELECT * FROM tmp_a")
    pins = proxy.call(lambda: dict(proxy.ctx.pin_counts))
    assert pins.get("user_variable") == 1
    b.close()


def test_client_disconnect_mid_transaction_rolls_back(proxy_factory, mariadb_server):
    proxy = proxy_factory(MaxConnectionsPercent=1)
    a = connect(proxy)
    one(a, "DROP TABLE IF EXISTS gone_t")
    one(a, "CREATE TABLE gone_t (x INT)")
    a.begin()
    one(a, "INSERT INTO gone_t VALUES (1)")
    a.close()
    b = connect(proxy)
    assert one(b, "SELECT COUNT(*), @@in_transaction FROM gone_t") == (0, 0)
    b.close()


def test_client_vanishes_mid_query_connection_not_reused(proxy_factory, mariadb_server):
    proxy = proxy_factory(MaxConnectionsPercent=2)
    a = connect(proxy)
    with a.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        first_id = cur.fetchone()[0]
    # Send a slow query and drop the socket without waiting for the answer.
    with a.cursor() as cur:
        a._execute_command(pymysql.constants.COMMAND.COM_QUERY, "SELECT SLEEP(1), CONNECTION_ID()")
    a._sock.shutdown(socket.SHUT_RDWR)
    a._sock.close()
    time.sleep(0.3)
    b = connect(proxy)
    assert one(b, "SELECT CONNECTION_ID()")[0] != first_id
    b.close()


# -- limits and errors -----------------------------------------------------------------------------------

def test_max_client_connections(proxy_factory, mariadb_server):
    proxy = proxy_factory(MaxClientConnections=2)
    held = [connect(proxy), connect(proxy)]
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy)
    assert info.value.args == (1040, "Number simultaneous connections exceeded (2)")
    for c in held:
        c.close()


def test_connection_rate_limit(proxy_factory, mariadb_server):
    """MaxConnectionRate 2 (a burst of one second's worth): the file's rate reaches the proxy's
    limiter, which is then given a clock that moves only when the test moves it, so the
    machine's speed cannot decide the outcome: within one second two full logins get in and
    every later connection gets 1040; a second later two more may come."""
    from twisted.internet.task import Clock

    from txrdsproxy.proxy.limits import ConnectionRateLimiter
    proxy = proxy_factory(MaxConnectionRate=2)
    clock = Clock()

    def hold_time_still():
        assert proxy.ctx.admission.connection_rate.rate == 2
        proxy.ctx.admission.connection_rate = ConnectionRateLimiter(2, clock)
    proxy.call(hold_time_still)

    def attempts(n):
        results = []
        for _ in range(n):
            try:
                conn = connect(proxy)
                assert one(conn, "SELECT 1") == (1,)
                conn.close()
                results.append("ok")
            except pymysql.err.OperationalError as e:
                results.append(e.args)
        return results

    refused = (1040, "Connections rate limit exceeded (2)")
    assert attempts(5) == ["ok", "ok", refused, refused, refused]
    proxy.call(clock.advance, 1.0)
    assert attempts(3) == ["ok", "ok", refused]


def test_caching_sha2_client_auth(mariadb_server, mux_user, tmp_path):
    secrets = {MUX_ARN: (MUX_USER, MUX_PASSWORD, "MYSQL_CACHING_SHA2_PASSWORD")}
    proxy = start_mysql_proxy(tmp_path, mariadb_server, secrets=secrets, name="sha2")
    try:
        # Nobody has passed full authentication yet: a client that won't send its password over
        # plain TCP (not even RSA-encrypted) is refused.
        with pytest.raises(mysql.connector.Error):
            mysql.connector.connect(host=proxy.host, port=proxy.port, user=MUX_USER,
                                    password=MUX_PASSWORD, database="appdb", use_pure=True,
                                    auth_plugin="caching_sha2_password", ssl_disabled=True)
        # A wrong password on the full path (RSA) is refused and caches nothing.
        with pytest.raises(pymysql.err.OperationalError) as info:
            connect(proxy, password="wrong")
        assert info.value.args[0] == 1045
        assert proxy.call(lambda: len(getattr(proxy.ctx, "mysql_sha2_cache", ()))) == 0
        # First good login: auth switch to caching_sha2, full path (PyMySQL fetches the proxy's
        # RSA public key and sends the password encrypted with it).
        conn = connect(proxy)
        assert one(conn, "SELECT CURRENT_USER()") == ("app_mux@%",)
        conn.close()
        assert proxy.call(lambda: len(proxy.ctx.mysql_sha2_cache)) == 1
        # Later logins take the fast path: mysql-connector (which refuses the full path over
        # plain TCP, as the first check below shows on a fresh proxy) now gets in.
        conn = mysql.connector.connect(host=proxy.host, port=proxy.port, user=MUX_USER,
                                       password=MUX_PASSWORD, database="appdb", use_pure=True,
                                       auth_plugin="caching_sha2_password", ssl_disabled=True)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
        conn.close()
        with pytest.raises(pymysql.err.OperationalError) as info:
            connect(proxy, password="wrong")  # fast path, wrong scramble
        assert info.value.args[0] == 1045
    finally:
        proxy.stop()


def test_client_vanishes_while_large_result_streams(proxy_factory, mariadb_server):
    proxy = proxy_factory(MaxConnectionsPercent=2)
    for _ in range(3):
        a = connect(proxy)
        a._execute_command(pymysql.constants.COMMAND.COM_QUERY,
                           "SELECT REPEAT('x', 1000000) FROM seq_1_to_50")
        a._sock.recv(65536)  # part of the result has arrived
        a._sock.shutdown(socket.SHUT_RDWR)
        a._sock.close()
    time.sleep(0.3)
    b = connect(proxy)
    assert one(b, "SELECT 'pool still healthy'") == ("pool still healthy",)
    assert proxy.wait_for(lambda: proxy.pool_state().get("borrowed", 0) == 0 or None,
                          what="no borrowed connections")
    b.close()


def test_quit_ends_the_session_and_gives_its_connection_back(proxy_factory, mariadb_server):
    """After COM_QUIT the session's database connection goes back clean, every time, including
    after a transaction left open and a pinned session (reset, then reused), and the client's
    socket is closed in order (EOF, as MariaDB closes it), never reset: a reset would make the
    client's kernel drop answers the client has not read yet (a pipelining client)."""
    proxy = proxy_factory(MaxConnectionsPercent=1)  # one database connection for everybody

    def opened():
        out = mariadb_server.mariadb("SHOW GLOBAL STATUS LIKE 'Connections'")
        return int(out.split()[-1])

    connect(proxy).close()  # warm-up: the pool's connection exists
    before = opened()
    for i in range(20):
        conn = connect(proxy, autocommit=i % 3 != 1)
        if i % 3 == 1:
            one(conn, "SELECT 1")  # a transaction left open: rolled back, connection kept
        elif i % 3 == 2:
            one(conn, "SET @x = 1")  # pinned: reset before another session gets it
        assert one(conn, f"SELECT {i}") == (i,)
        conn.close()  # PyMySQL sends COM_QUIT
    conn = connect(proxy)
    assert one(conn, "SELECT @x") == (None,)  # nothing of the pinned sessions is left
    conn.close()
    # the second reading's own connection (the mariadb CLI), none by the proxy
    assert opened() - before == 1
    assert server_connections(mariadb_server) <= 1
    # the socket of a client that sent COM_QUIT is closed by the proxy: EOF, promptly
    conn = connect(proxy)
    sock = conn._sock
    sock.sendall(b"\x01\x00\x00\x00\x01")  # COM_QUIT
    sock.settimeout(10)
    assert sock.recv(100) == b""
    sock.close()
