"""The split-command attack on real MariaDB through the proxy (issue 6, items 1-2, MySQL side).

An authenticated attacker sends a command that ends its transaction followed by only part of the
next command, then nothing.  Before the fix, a database connection could go back to the pool
while the server still waited for the rest of a command, so the next session's bytes completed
it.  Here, after every attack, other sessions are answered correctly and no state (a user
variable, a session variable) crosses to them; the attacker's half command never runs.
"""

import struct
import time

import pymysql
import pytest

try:
    from mysql_harness import start_mysql_proxy
    from mysql_raw import RawMySQL
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy
    from tests.integration.mysql_raw import RawMySQL

from txrdsproxy.wire.mysql import packets as P

USER = "app_native"


@pytest.fixture(scope="module")
def proxy(mariadb_server, tmp_path_factory):
    # max_connections=100 -> 2 database connections for the whole proxy.
    proxy = start_mysql_proxy(tmp_path_factory.mktemp("isolation"), mariadb_server,
                              MaxConnectionsPercent=2, ConnectionBorrowTimeout=10)
    yield proxy
    proxy.stop()


def victim(proxy, server):
    return pymysql.connect(host=proxy.host, port=proxy.port, user=USER,
                           password=server.users[USER], database="appdb", autocommit=True)


def attacker(proxy, server):
    return RawMySQL(proxy.host, proxy.port, USER, server.users[USER], database="appdb")


def one(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def header(length, seq=0):
    return struct.pack("<I", length)[:3] + bytes((seq,))


# The attacker's bytes after COMMIT: what a pooled connection would have swallowed.
HIDDEN = b"SET @leak = 'crossed', SESSION sql_mode = 'ANSI_QUOTES'"
ATTACKS = {
    # A header announcing more than is sent: the hidden SET waits for bytes that never come.
    "short query header": header(1 + len(HIDDEN) + 50) + b"\x03" + HIDDEN,
    # A query too long to be read whole (streamed, pins), cut short.
    "long query header": header(200 * 1024) + b"\x03" + HIDDEN + b" -- ",
    # The first fragment of a 16 MiB multi-packet command, cut short.
    "multi-packet first fragment": header(P.MAX_PACKET_CHUNK) + b"\x03" + HIDDEN + b" /* ",
    # A command the proxy relays as it arrives without pinning (COM_FIELD_LIST), cut short.
    "field list header": header(100 * 1024) + b"\x04" + b"t" * 100,
}


def state_of(conn):
    return one(conn, "SELECT @leak, @@session.sql_mode = @@global.sql_mode, 42")


@pytest.mark.parametrize("name", list(ATTACKS))
def test_split_command_after_commit_never_reaches_another_session(proxy, mariadb_server, name):
    a = attacker(proxy, mariadb_server)
    a.query("BEGIN")
    a.query("SELECT 1")
    # COMMIT and the partial next command in one write: the OK that ends the transaction comes
    # back while the client stream stands in the middle of a command.
    a.send(P.encode_packet(b"\x03COMMIT", 0) + ATTACKS[name])
    _, ok = a.packet()
    assert ok[:1] == b"\x00" and not P.parse_ok(ok, a.caps).status & P.SERVER_STATUS_IN_TRANS
    # Other sessions, one after another and together, are answered correctly and see no state.
    sessions = [victim(proxy, mariadb_server) for _ in range(3)]
    for _ in range(5):
        for v in sessions:
            assert state_of(v) == (None, 1, 42)
            assert one(v, "SELECT CONNECTION_ID() > 0, 'mine'") == (1, "mine")
    # The attacker leaves mid-command: its half command never ran anywhere.
    a.sock.close()
    deadline = time.monotonic() + 10
    while True:  # the proxy notices the close asynchronously
        for v in sessions:
            assert state_of(v) == (None, 1, 42)
        if time.monotonic() > deadline or proxy_sessions(proxy) <= 3:
            break
        time.sleep(0.05)
    for v in sessions:
        v.close()
    # On the server, no connection kept the hidden state.
    rows = mariadb_server.mariadb(
        "SELECT COUNT(*) FROM information_schema.user_variables WHERE variable_name = 'leak'")
    assert rows.strip() == "0"


def proxy_sessions(proxy):
    try:
        return len(proxy.ctx.sessions)
    except AttributeError:
        return 0


def test_whole_hidden_statement_after_commit_runs_only_for_its_own_session(proxy, mariadb_server):
    """Control: the same bytes sent whole are the attacker's own business (pinned, not shared)."""
    a = attacker(proxy, mariadb_server)
    a.query("BEGIN")
    a.send(P.encode_packet(b"\x03COMMIT", 0) + P.encode_packet(b"\x03" + HIDDEN, 0))
    a.read_response()
    a.read_response()
    assert a.query("SELECT @leak") == [["crossed"]]
    v = victim(proxy, mariadb_server)
    assert state_of(v) == (None, 1, 42)
    v.close()
    a.close()


def test_a_session_without_a_database_never_inherits_another_sessions(proxy, mariadb_server):
    mariadb_server.mariadb("CREATE DATABASE IF NOT EXISTS otherdb; "
                           f"GRANT ALL ON otherdb.* TO '{USER}'@'%'")
    a = victim(proxy, mariadb_server)
    one(a, "USE otherdb")  # a's connection now stands in otherdb
    assert one(a, "SELECT DATABASE()") == ("otherdb",)
    a.close()
    for _ in range(3):
        b = pymysql.connect(host=proxy.host, port=proxy.port, user=USER,
                            password=mariadb_server.users[USER], autocommit=True)
        assert one(b, "SELECT DATABASE()") == (None,)
        one(b, "USE appdb")  # and once it chose one, it has it
        assert one(b, "SELECT DATABASE()") == ("appdb",)
        b.close()


def test_large_rows_are_relayed_intact(proxy, mariadb_server):
    v = victim(proxy, mariadb_server)
    size = 6 * 1024 * 1024
    row = one(v, f"SELECT REPEAT('r', {size}), MD5(REPEAT('r', {size})), 7")
    import hashlib
    assert len(row[0]) == size and hashlib.md5(row[0].encode()).hexdigest() == row[1]
    assert row[2] == 7
    assert one(v, "SELECT 8") == (8,)
    v.close()


def server_connections_total(server):
    return int(server.mariadb("SHOW GLOBAL STATUS LIKE 'Connections'").split()[1])


def test_accepting_sockets_costs_the_database_at_most_one_shared_probe(mariadb_server,
                                                                        tmp_path_factory):
    """Item 11: 40 unauthenticated sockets at once on a proxy that knows no greeting yet open
    one database connection between them (the shared probe), then none."""
    import socket
    fresh = start_mysql_proxy(tmp_path_factory.mktemp("accept"), mariadb_server,
                              MaxConnectionsPercent=2)
    try:
        before = server_connections_total(mariadb_server)
        socks = [socket.create_connection((fresh.host, fresh.port), timeout=10)
                 for _ in range(40)]
        greetings = [s.recv(4) for s in socks]  # every socket gets a greeting header
        assert all(len(g) == 4 for g in greetings)
        for s in socks:
            s.close()
        # +1 for the probe, +1 for our own SHOW STATUS connection.
        assert server_connections_total(mariadb_server) - before <= 2
        before = server_connections_total(mariadb_server)
        socks = [socket.create_connection((fresh.host, fresh.port), timeout=10)
                 for _ in range(40)]
        assert all(len(s.recv(4)) == 4 for s in socks)
        for s in socks:
            s.close()
        assert server_connections_total(mariadb_server) - before == 1  # only our SHOW STATUS
    finally:
        fresh.stop()


@pytest.mark.parametrize("warm", [True, False], ids=["warm-pool", "cold-pool"])
def test_concurrent_sessions_each_keep_their_own_state(mariadb_server, tmp_path_factory, warm):
    """12 sessions at once over at most 4 connections: each pins with its own user variable or
    keeps its own tracked time_zone / sql_mode, and reads back only its own values."""
    import threading
    proxy = start_mysql_proxy(tmp_path_factory.mktemp("concurrent"), mariadb_server,
                              MaxConnectionsPercent=4, ConnectionBorrowTimeout=30)
    try:
        if warm:
            v = victim(proxy, mariadb_server)
            one(v, "SELECT 1")
            v.close()
        seen, errors, start = [], [], threading.Barrier(12)

        def session(i):
            try:
                c = victim(proxy, mariadb_server)
                start.wait(30)
                if i % 2:
                    one(c, f"SET @tag = 't{i}'")  # pins
                    for _ in range(5):
                        seen.append((i, one(c, "SELECT @tag")[0], f"t{i}"))
                else:  # tracked, not pinned: moves between connections
                    zone = f"+{i // 2:02d}:00"
                    one(c, f"SET time_zone = '{zone}'")
                    one(c, "SET sql_mode = 'ANSI_QUOTES'" if i % 4 == 0 else "SET sql_mode = ''")
                    for _ in range(5):
                        row = one(c, "SELECT @@time_zone, @@sql_mode, @tag")
                        want = (zone, "ANSI_QUOTES" if i % 4 == 0 else "", None)
                        seen.append((i, row, want))
                c.close()
            except Exception as e:  # pragma: no cover - reported below
                errors.append((i, e))

        threads = [threading.Thread(target=session, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == []
        assert len(seen) == 60
        assert [s for s in seen if s[1] != s[2]] == []
        assert proxy.call(lambda: proxy.ctx.pin_counts) == {"user_variable": 6}
    finally:
        proxy.stop()


def test_a_failed_multi_statement_that_set_sql_mode_does_not_leak_it(mariadb_server,
                                                                       tmp_path_factory):
    """The SET ran before the error; the proxy cannot tell which statements ran, so the session
    pins (before: the connection went back with ANSI_QUOTES and the next session got it)."""
    from pymysql.constants import CLIENT

    def multi():  # both sessions with the same capabilities: the same pool key
        return pymysql.connect(host=proxy.host, port=proxy.port, user=USER,
                               password=mariadb_server.users[USER], database="appdb",
                               autocommit=True, client_flag=CLIENT.MULTI_STATEMENTS)

    proxy = start_mysql_proxy(tmp_path_factory.mktemp("multi"), mariadb_server,
                              MaxConnectionsPercent=1, ConnectionBorrowTimeout=5)
    try:
        a = multi()
        with pytest.raises(pymysql.err.ProgrammingError):
            with a.cursor() as cur:
                cur.execute("SET sql_mode = 'ANSI_QUOTES'; SELECT * FROM no_such_table")
        assert one(a, "SELECT @@sql_mode") == ("ANSI_QUOTES",)  # a keeps what it did
        a.close()  # pinned: its connection is reset before anyone else gets it
        b = multi()
        assert one(b, "SELECT @@sql_mode = @@global.sql_mode") == (1,)
        b.close()
    finally:
        proxy.stop()


def test_an_error_with_autocommit_off_keeps_the_connection_until_the_transaction_ends(
        proxy, mariadb_server):
    # Found by mysql-connector's BugOra20653441 (a SELECT killed in its rows, autocommit off):
    # an ERR carries no status, and the failed statement may have opened a transaction (here a
    # duplicate-key INSERT as the first statement, whose lock stays).  The connection must stay
    # with the session, never go to another one (or to the pool) inside that transaction.
    setup = victim(proxy, mariadb_server)
    with setup.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS err_tx (id INT PRIMARY KEY) ENGINE=InnoDB")
        cur.execute("INSERT IGNORE INTO err_tx VALUES (1)")
    setup.close()

    def borrowed():
        return proxy.call(lambda: sum(str(c.state) == "borrowed" for c in proxy.ctx.pool.connections()))

    s1 = pymysql.connect(host=proxy.host, port=proxy.port, user=USER, password=mariadb_server.users[USER],
                         database="appdb", autocommit=False)
    try:
        with s1.cursor() as cur:
            with pytest.raises(pymysql.err.IntegrityError):
                cur.execute("INSERT INTO err_tx VALUES (1)")
        open_threads = mariadb_server.mariadb(
            "SELECT trx_mysql_thread_id FROM information_schema.innodb_trx").split()
        assert len(open_threads) == 1  # the server holds the transaction open
        assert borrowed() == 1  # and the proxy keeps its connection with the session
        assert one(s1, "SELECT CONNECTION_ID()")[0] == int(open_threads[0])
        s1.rollback()
        assert borrowed() == 0
    finally:
        s1.close()
