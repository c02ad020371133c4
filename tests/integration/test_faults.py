"""Faults between the proxy and the database, and clients that vanish (issue 6 item 16).

A FaultRelay (txrdsproxy/testing/faultrelay.py) sits between the proxy and the real database.
Rules keyed on a marker in one session's statement hit that session's database connection only:
the database stalls mid-result, resets mid-transaction, cuts mid-COPY.  Clients vanish mid-COPY,
mid-result and mid-login.  In every case: the connection in an unknown state is never reused
(its server backend is gone, or it is not in the pool), other sessions are unaffected, and the
pool's slots come back.
"""

import os
import socket
import struct
import types

import pymysql
import psycopg
import pytest
from twisted.internet.threads import blockingCallFromThread

from txrdsproxy.testing.faultrelay import TO_CLIENT, TO_SERVER, Action, FaultRelay, Rule

try:
    from mysql_harness import start_mysql_proxy
    from proxyutil import (
        InProcessProxy, kill_socket, raw_connect, raw_login, raw_query, read_messages, reactor_thread,
        send_query, startup_packet, write_proxy_config,
    )
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy
    from tests.integration.proxyutil import (
        InProcessProxy, kill_socket, raw_connect, raw_login, raw_query, read_messages, reactor_thread,
        send_query, startup_packet, write_proxy_config,
    )


class Relayed:
    """A proxy whose only target is a FaultRelay in front of the real server."""

    def __init__(self, relay, proxy):
        self.relay, self.proxy = relay, proxy

    def call(self, fn, *args):
        return blockingCallFromThread(self.relay.reactor, fn, *args)

    def rule(self, direction, pattern, action, offset=None):
        return self.call(self.relay.add_rule, Rule(direction, pattern, action, offset))

    def pool_ok(self):
        """Every pooled connection idle, no session left holding one."""
        state = self.proxy.pool_state()
        return set(state) <= {"idle"} and not any(
            s in ("borrowed", "pinned", "borrowing") for s in self.proxy.session_states())


def _relay(server):
    reactor = reactor_thread()
    relay = FaultRelay(reactor, server.host, server.port)
    port = blockingCallFromThread(reactor, relay.listen)
    return relay, types.SimpleNamespace(host="127.0.0.1", port=port, users=server.users)


@pytest.fixture
def pg_relayed(pg_server, tmp_path, request):
    relay, front = _relay(pg_server)
    config = write_proxy_config(tmp_path, pg_server, targets=[front], MaxConnectionsPercent=5,
                                MaxIdleConnectionsPercent=5, ConnectionBorrowTimeout=10)
    proxy = InProcessProxy(config)
    request.addfinalizer(lambda: blockingCallFromThread(relay.reactor, relay.stop))
    request.addfinalizer(proxy.stop)
    return Relayed(relay, proxy)


@pytest.fixture
def my_relayed(mariadb_server, tmp_path, request):
    relay, front = _relay(mariadb_server)
    proxy = start_mysql_proxy(tmp_path, front, MaxConnectionsPercent=5, MaxIdleConnectionsPercent=5,
                              ConnectionBorrowTimeout=10)
    request.addfinalizer(lambda: blockingCallFromThread(relay.reactor, relay.stop))
    request.addfinalizer(proxy.stop)
    return Relayed(relay, proxy)


@pytest.fixture
def pg_table(pg_server):
    pg_server.psql("drop table if exists fault_t; create table fault_t (x int);"
                   " alter table fault_t owner to appdb_owner", dbname="appdb")
    return "fault_t"


def _pg_backend_alive(pg_server, pid):
    return pg_server.psql(f"select count(*) from pg_stat_activity where pid = {int(pid)}").strip() != "0"


def _pool_pids(proxy):
    return proxy.call(lambda: sorted(c.backend_pid for c in proxy.ctx.pool.connections()))


def _other_session_works(r, pg_server, n=3):
    with psycopg.connect(r.proxy.dsn(pg_server), autocommit=True, connect_timeout=10) as other:
        for i in range(n):
            assert other.execute("select %s::int + 1", (i,)).fetchone()[0] == i + 1
        return other.execute("select pg_backend_pid()").fetchone()[0]


# -- PostgreSQL: the database misbehaves -----------------------------------------------------------
def test_pg_database_stalls_mid_result(pg_relayed, pg_server):
    r = pg_relayed
    sock, _ = raw_login(r.proxy, pg_server)
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    r.rule(TO_CLIENT, b"stall-here", Action.STALL, offset=3)  # inside the DataRow
    send_query(sock, "select 'stall-here' || g from generate_series(1, 5000) g")
    sock.settimeout(0.5)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        pass
    assert b"Z\0\0\0\x05" not in got  # the result never completed
    assert _other_session_works(r, pg_server) != int(pid)  # on another connection
    kill_socket(sock)  # the client gives up
    r.proxy.wait_for(lambda: int(pid) not in _pool_pids(r.proxy), what="stalled connection closed")
    r.call(r.relay.resume)  # what the database sent late goes nowhere
    r.proxy.wait_for(r.pool_ok, what="slots back")
    assert _other_session_works(r, pg_server) != int(pid)
    r.proxy.wait_for(lambda: not _pg_backend_alive(pg_server, pid), what="server backend gone")


def test_pg_database_resets_mid_transaction(pg_relayed, pg_server, pg_table):
    r = pg_relayed
    sock, _ = raw_login(r.proxy, pg_server)
    raw_query(sock, "begin")
    raw_query(sock, "insert into fault_t values (1)")
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    r.rule(TO_SERVER, b"reset-here", Action.RESET, offset=0)
    send_query(sock, "select 'reset-here'")
    msgs = read_messages(sock)  # until the proxy closes the client
    errors = [p for k, p in msgs if k == b"E"]
    assert errors and b"the database connection was lost" in errors[0], msgs
    r.proxy.wait_for(r.pool_ok, what="slots back")
    assert int(pid) not in _pool_pids(r.proxy)
    r.proxy.wait_for(lambda: not _pg_backend_alive(pg_server, pid), what="server backend gone")
    with psycopg.connect(r.proxy.dsn(pg_server), autocommit=True) as conn:
        assert conn.execute("select count(*) from fault_t").fetchone()[0] == 0  # rolled back
    _other_session_works(r, pg_server)


def test_pg_database_cuts_mid_copy(pg_relayed, pg_server):
    r = pg_relayed
    keeper = psycopg.connect(r.proxy.dsn(pg_server), autocommit=True)  # another session, open throughout
    try:
        keeper.execute("select 1")
        sock, _ = raw_login(r.proxy, pg_server)
        (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
        r.rule(TO_CLIENT, b"cut-here", Action.CUT, offset=4)  # inside a CopyData message
        send_query(sock, "copy (select 'cut-here', g from generate_series(1, 20000) g) to stdout")
        sock.settimeout(10)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        assert b"H" in data[:200]  # CopyOutResponse came, then the stream was cut
        assert b"Z\0\0\0\x05I" not in data  # never completed
        r.proxy.wait_for(r.pool_ok, what="slots back")
        assert int(pid) not in _pool_pids(r.proxy)
        assert keeper.execute("select 41 + 1").fetchone()[0] == 42
        _other_session_works(r, pg_server)
    finally:
        keeper.close()


# -- PostgreSQL: the client vanishes ---------------------------------------------------------------
def test_pg_client_vanishes_mid_copy_in(pg_relayed, pg_server, pg_table):
    r = pg_relayed
    sock, _ = raw_login(r.proxy, pg_server)
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    send_query(sock, "copy fault_t from stdin")
    assert read_messages(sock, until=b"G")[-1][0] == b"G"
    rows = b"".join(b"%d\n" % i for i in range(500))
    message = b"d" + struct.pack("!I", len(rows) + 4) + rows
    sock.sendall(message[:len(message) // 2])  # half a CopyData message, then gone
    kill_socket(sock)
    r.proxy.wait_for(lambda: int(pid) not in _pool_pids(r.proxy), what="dirty connection closed")
    r.proxy.wait_for(r.pool_ok, what="slots back")
    r.proxy.wait_for(lambda: not _pg_backend_alive(pg_server, pid), what="server backend gone")
    with psycopg.connect(r.proxy.dsn(pg_server), autocommit=True) as conn:
        assert conn.execute("select count(*) from fault_t").fetchone()[0] == 0


def test_pg_client_vanishes_mid_result(pg_relayed, pg_server):
    r = pg_relayed
    r.relay.throttle = 200_000  # the result trickles: the client leaves while it flows
    sock, _ = raw_login(r.proxy, pg_server)
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    send_query(sock, "select repeat('y', 500) from generate_series(1, 20000)")
    got = 0
    while got < 64 * 1024:
        got += len(sock.recv(65536))
    kill_socket(sock)
    r.proxy.wait_for(lambda: int(pid) not in _pool_pids(r.proxy), what="connection closed")
    r.relay.throttle = 0
    r.proxy.wait_for(r.pool_ok, what="slots back")
    assert _other_session_works(r, pg_server) != int(pid)


def test_pg_client_vanishes_mid_login(pg_relayed, pg_server):
    """The login's database connection is being opened (slowed by the relay) when the client
    goes: the new connection ends up idle in the pool or closed, never lent half-made."""
    r = pg_relayed
    r.relay.delay = 0.3
    import hashlib
    sock = raw_connect(r.proxy)
    sock.sendall(startup_packet({"user": "app_md5", "database": "appdb", "application_name": "vanish"}))
    kind, payload = read_messages(sock, until=b"R")[-1]
    salt = payload[4:8]
    inner = hashlib.md5((pg_server.users["app_md5"] + "app_md5").encode()).hexdigest()
    body = ("md5" + hashlib.md5(inner.encode() + salt).hexdigest()).encode() + b"\0"
    sock.sendall(b"p" + struct.pack("!I", len(body) + 4) + body)
    kill_socket(sock)  # before the login's borrow is answered
    r.proxy.wait_for(lambda: r.proxy.session_states() == [], what="session gone")
    r.proxy.wait_for(lambda: r.pool_ok() and "connecting" not in r.proxy.pool_state(),
                     what="slots back", timeout=15)
    r.relay.delay = 0
    with psycopg.connect(r.proxy.dsn(pg_server, user="app_md5"), autocommit=True,
                         application_name="after") as conn:
        assert conn.execute("select current_setting('application_name')").fetchone()[0] == "after"


# -- MySQL / MariaDB -------------------------------------------------------------------------------
def _my(r, server, **kw):
    return pymysql.connect(host=r.proxy.host, port=r.proxy.port, user="app_native",
                           password=server.users["app_native"], database="appdb", autocommit=True,
                           connect_timeout=10, **kw)


def _my_one(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


@pytest.fixture
def my_table(mariadb_server):
    with pymysql.connect(host=mariadb_server.host, port=mariadb_server.port, user="app_native",
                         password=mariadb_server.users["app_native"], database="appdb",
                         autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute("drop table if exists fault_t")
            cur.execute("create table fault_t (x int) engine=InnoDB")
    return "fault_t"


def _my_pool_size(r):
    return r.proxy.call(lambda: len(r.proxy.ctx.pool.connections()))


def test_mysql_database_stalls_mid_result(my_relayed, mariadb_server):
    r = my_relayed
    victim = _my(r, mariadb_server, read_timeout=1)
    thread_id = _my_one(victim, "select connection_id()")
    r.rule(TO_CLIENT, b"stall-here", Action.STALL, offset=2)
    with pytest.raises(pymysql.err.OperationalError):  # the client gives up after read_timeout
        _my_one(victim, "select concat('stall-here', seq) from seq_1_to_5000")
    victim.close()
    other = _my(r, mariadb_server)
    try:
        assert _my_one(other, "select connection_id()") != thread_id
        assert _my_one(other, "select 1 + 1") == 2
    finally:
        other.close()
    r.call(r.relay.resume)
    r.proxy.wait_for(r.pool_ok, what="slots back")
    assert thread_id not in r.proxy.call(
        lambda: [getattr(c, "thread_id", None) for c in r.proxy.ctx.pool.connections()])


def test_mysql_database_resets_mid_transaction(my_relayed, mariadb_server, my_table):
    r = my_relayed
    victim = _my(r, mariadb_server)
    with victim.cursor() as cur:
        cur.execute("begin")
        cur.execute("insert into fault_t values (1)")
    r.rule(TO_SERVER, b"reset-here", Action.RESET, offset=0)
    with pytest.raises(pymysql.err.OperationalError):
        _my_one(victim, "select 'reset-here'")
    victim.close()
    r.proxy.wait_for(r.pool_ok, what="slots back")
    other = _my(r, mariadb_server)
    try:
        assert _my_one(other, "select count(*) from fault_t") == 0  # rolled back by the server
    finally:
        other.close()


def test_mysql_client_vanishes_mid_result(my_relayed, mariadb_server):
    r = my_relayed
    r.relay.throttle = 200_000
    victim = _my(r, mariadb_server, cursorclass=pymysql.cursors.SSCursor)
    cur = victim.cursor()
    cur.execute("select repeat('z', 500) from seq_1_to_20000")
    for _ in range(10):
        cur.fetchone()
    victim._result.unbuffered_active = False  # the driver must not read the rest later
    sock = victim._sock  # vanish (RST) with the rest of the result in flight; the driver's
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    os.close(sock.detach())  # buffered reader holds the socket object, so close the fd itself
    # Let the driver forget the unfinished result instead of reading it at garbage collection.
    cur._result = cur.connection = victim._result = None
    victim._sock = victim._rfile = None
    r.proxy.wait_for(lambda: r.proxy.session_states() == [], what="session gone")
    r.relay.throttle = 0
    r.proxy.wait_for(r.pool_ok, what="slots back")
    other = _my(r, mariadb_server)
    try:
        assert _my_one(other, "select 'clean'") == "clean"
    finally:
        other.close()
    assert _my_pool_size(r) <= 5


def test_mysql_client_vanishes_mid_login(my_relayed, mariadb_server):
    """The client names a database, so its login needs a database connection (slowed by the
    relay); it vanishes before the answer.  The connection ends up idle or closed, the session
    is gone, and the next client logs in normally."""
    from txrdsproxy.wire.mysql import auth as myauth
    from txrdsproxy.wire.mysql import handshake as hs
    from txrdsproxy.wire.mysql import packets as P

    r = my_relayed
    with _my(r, mariadb_server) as warm:  # the greeting is known; the pool starts empty again
        _my_one(warm, "select 1")
    r.proxy.wait_for(r.pool_ok, what="settled")
    r.relay.delay = 0.3
    sock = socket.create_connection((r.proxy.host, r.proxy.port), timeout=10)
    [(_, payload)] = P.PacketReader().feed(sock.recv(65536))
    greeting = hs.parse_handshake_v10(payload)
    caps = (P.CLIENT_LONG_PASSWORD | P.CLIENT_PROTOCOL_41 | P.CLIENT_TRANSACTIONS
            | P.CLIENT_SECURE_CONNECTION | P.CLIENT_PLUGIN_AUTH | P.CLIENT_CONNECT_WITH_DB
            | P.CLIENT_DEPRECATE_EOF) & greeting.capabilities
    scramble = myauth.native_password_scramble(mariadb_server.users["app_native"], greeting.scramble)
    sock.sendall(P.encode_packet(hs.build_handshake_response41(caps, "app_native", scramble,
                                                               database="appdb"), 1))
    kill_socket(sock)
    r.proxy.wait_for(lambda: r.proxy.session_states() == [], what="session gone")
    r.proxy.wait_for(lambda: r.pool_ok() and "connecting" not in r.proxy.pool_state(),
                     timeout=15, what="slots back")
    r.relay.delay = 0
    other = _my(r, mariadb_server)
    try:
        assert _my_one(other, "select database()") == "appdb"
    finally:
        other.close()


def test_mysql_database_cut_mid_load_data_local(my_relayed, mariadb_server, my_table, tmp_path):
    """LOAD DATA LOCAL (MySQL's COPY FROM STDIN): the connection to the database is cut while the
    file streams to it.  The proxy reads and drops the rest of the file and answers its end
    with ERR 2013: the client gets that error and keeps its connection, nothing was loaded,
    slots come back."""
    r = my_relayed
    data = tmp_path / "rows.txt"
    data.write_text("".join(f"{i}\n" for i in range(20000)) + "cut-here\n" + "".join(
        f"{i}\n" for i in range(20000)))
    victim = _my(r, mariadb_server, local_infile=True)
    with victim.cursor() as cur:  # the path works: a small file loads (then is removed)
        small = tmp_path / "small.txt"
        small.write_text("1\n2\n")
        cur.execute(f"load data local infile '{small}' into table fault_t")
        cur.execute("delete from fault_t")
    rule = r.rule(TO_SERVER, b"cut-here", Action.CUT, offset=3)  # inside a file-content packet
    with pytest.raises(pymysql.err.OperationalError) as lost:
        with victim.cursor() as cur:
            cur.execute(f"load data local infile '{data}' into table fault_t")
    assert rule.fired is not None
    assert lost.value.args == (2013, "Lost connection to the database during the command")
    assert _my_one(victim, "select 41 + 1") == 42  # the same client connection goes on
    victim.close()
    r.proxy.wait_for(r.pool_ok, what="slots back")
    other = _my(r, mariadb_server)
    try:
        assert _my_one(other, "select count(*) from fault_t") == 0  # the statement never completed
    finally:
        other.close()
