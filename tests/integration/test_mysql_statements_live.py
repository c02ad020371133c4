"""SessionPinningFilters EXCLUDE_PREPARED_STATEMENTS on MySQL: server-side prepared statements of
real drivers (sysbench --db-ps-mode=auto, mysql-connector's prepared cursors) multiplexed over a
pool smaller than the number of clients, against the real MariaDB."""

import subprocess

import pytest

import mysql.connector  # installed by the test extras

try:
    from mysql_harness import start_mysql_proxy
    from servers import require_binaries
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy
    from tests.integration.servers import require_binaries

USER = "app_ps"
ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_ps"
PASSWORD = "ps-pass-77c1"
SYSBENCH = "/usr/bin/sysbench"


@pytest.fixture(scope="module")
def ps_user(mariadb_server):
    if USER not in mariadb_server.users:
        mariadb_server.create_user(USER, PASSWORD)
    return USER


@pytest.fixture
def ps_proxy(mariadb_server, ps_user, tmp_path):
    """A proxy with EXCLUDE_PREPARED_STATEMENTS and a pool of 2 connections (2 % of 100)."""
    proxy = start_mysql_proxy(tmp_path / "p", mariadb_server,
                              secrets={ARN: (USER, PASSWORD, "MYSQL_NATIVE_PASSWORD")},
                              name="ps", MaxConnectionsPercent=2, ConnectionBorrowTimeout=20,
                              SessionPinningFilters=["EXCLUDE_PREPARED_STATEMENTS"])
    yield proxy
    proxy.stop()


def connector(proxy, **kw):
    return mysql.connector.connect(host=proxy.host, port=proxy.port, user=USER, password=PASSWORD,
                                   database="appdb", autocommit=True, use_pure=True,
                                   ssl_disabled=True, **kw)


def test_prepared_cursors_of_many_sessions_share_two_connections(ps_proxy, mariadb_server):
    """Six sessions, each with its own prepared statements (ints, strings, NULL), executed in
    turn: every answer is its own, and all of it runs on the pool's two connections (pinned,
    six sessions would need six)."""
    sessions = [connector(ps_proxy) for _ in range(6)]
    cursors = []
    for i, conn in enumerate(sessions):
        cur = conn.cursor(prepared=True)
        cursors.append(cur)
        cur.execute("SELECT ? + 1, CONCAT(?, '-x'), CONNECTION_ID()", (i, "s%d" % i))
        assert cur.fetchall()[0][:2] == (i + 1, "s%d-x" % i)
    seen = set()
    for round_ in range(3):
        for i, cur in enumerate(cursors):
            value = None if round_ == 2 else round_ * 10 + i
            cur.execute("SELECT ? + 1, CONCAT(?, '-x'), CONNECTION_ID()", (value, "r%d" % i))
            first, second, thread = cur.fetchall()[0]
            assert (first, second) == (None if value is None else value + 1, "r%d-x" % i)
            seen.add(thread)
    assert len(seen) <= 2  # (not the server's processlist: a stopped proxy's threads may linger)
    # A closed statement is gone for its session; prepared again it works.
    cursors[0].close()
    cur = sessions[0].cursor(prepared=True)
    cur.execute("SELECT ? * 2", (21,))
    assert cur.fetchall() == [(42,)]
    for conn in sessions:
        conn.close()


def test_a_shared_statement_answers_with_each_sessions_own_values(ps_proxy, mariadb_server):
    """Two sessions run the same statement text (one statement on the shared connections) with
    different time zones and character sets of results: each sees its own, whichever connection
    prepared the statement first."""
    a, b = connector(ps_proxy), connector(ps_proxy)
    acur = a.cursor()
    acur.execute("SET time_zone = '+01:00'")
    bcur = b.cursor()
    bcur.execute("SET time_zone = '-07:00'")
    sql = "SELECT @@session.time_zone, CONVERT_TZ('2020-01-01 00:00:00', '+00:00', @@session.time_zone), ?"
    pa, pb = a.cursor(prepared=True), b.cursor(prepared=True)
    for i in range(4):
        pa.execute(sql, (i,))
        pb.execute(sql, (i,))
        assert [tuple(map(str, r)) for r in pa.fetchall()] == [("+01:00", "2020-01-01 01:00:00", str(i))]
        assert [tuple(map(str, r)) for r in pb.fetchall()] == [("-07:00", "2019-12-31 17:00:00", str(i))]
    a.close()
    b.close()


def test_a_transaction_of_prepared_statements_keeps_its_connection(ps_proxy, mariadb_server):
    conn = connector(ps_proxy)
    other = connector(ps_proxy)
    mariadb_server.mariadb("CREATE TABLE IF NOT EXISTS appdb.ps_t (id INT PRIMARY KEY, v INT)")
    mariadb_server.mariadb("GRANT ALL ON appdb.* TO '%s'@'%%'" % USER)
    mariadb_server.mariadb("DELETE FROM appdb.ps_t")
    cur = conn.cursor(prepared=True)
    conn.start_transaction()
    cur.execute("INSERT INTO ps_t VALUES (?, ?)", (1, 10))
    cur.execute("SELECT CONNECTION_ID()")
    [(inside,)] = cur.fetchall()
    ocur = other.cursor(prepared=True)
    ocur.execute("SELECT COUNT(*) FROM ps_t WHERE id = ?", (1,))
    assert ocur.fetchall() == [(0,)]  # not committed: another connection
    cur.execute("SELECT CONNECTION_ID()")
    assert cur.fetchall() == [(inside,)]
    conn.rollback()
    ocur.execute("SELECT COUNT(*) FROM ps_t WHERE id = ?", (1,))
    assert ocur.fetchall() == [(0,)]
    conn.close()
    other.close()


@pytest.mark.parametrize("workload,events", [("oltp_point_select", 3000),
                                             ("oltp_read_write", 100)])
def test_sysbench_prepared_statements_with_more_threads_than_connections(
        ps_proxy, mariadb_server, workload, events):
    """sysbench's default --db-ps-mode=auto: each thread prepares its statements once and
    executes them with the types it bound on its first execute (the proxy adds them where a
    connection's statement had none or others).  6 threads on a pool of 2: with prepared
    statements pinning, threads 3 to 6 would wait for a connection until the borrow timeout."""
    reason = require_binaries("sysbench")  # raises under CI=true
    if reason:
        pytest.skip(reason)
    mariadb_server.mariadb("GRANT ALL ON appdb.* TO '%s'@'%%'" % USER)
    common = ["--db-driver=mysql", f"--mysql-user={USER}", f"--mysql-password={PASSWORD}",
              "--mysql-db=appdb", "--mysql-host=127.0.0.1", "--tables=2", "--table-size=200",
              "--db-ps-mode=auto"]
    direct = [f"--mysql-port={mariadb_server.port}"]
    run = lambda port, *args: subprocess.run(  # noqa: E731
        [SYSBENCH, workload] + common + port + list(args), capture_output=True, text=True,
        timeout=300)
    run(direct, "cleanup")
    out = run(direct, "prepare")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([f"--mysql-port={ps_proxy.port}"], "--threads=6", "--time=0",
              f"--events={events}", "run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "transactions:" in out.stdout
    if workload == "oltp_point_select":  # (read_write's threads may deadlock each other, which
        # sysbench retries and counts as ignored errors, as it does without the proxy)
        assert "ignored errors:                      0" in out.stdout, out.stdout
    # (completing at all is the check: pinned, threads 3 to 6 would time out borrowing)
    run(direct, "cleanup")


# -- raw protocol: an execute that relies on the types bound before ------------------------------------
try:
    from mysql_raw import RawMySQL
except ImportError:
    from tests.integration.mysql_raw import RawMySQL

from txrdsproxy.wire.mysql import packets as P  # noqa: E402
from txrdsproxy.wire.mysql.commands import ResponseTracker  # noqa: E402

LONG, LONGLONG, VAR_STRING = 0x03, 0x08, 0xFD


def exchange(raw, cmd, arg):
    """Send one command, -> the payloads of its whole response."""
    raw.send(P.encode_packet(bytes((cmd,)) + arg, 0))
    tracker = ResponseTracker(raw.caps)
    tracker.expect(cmd)
    out = []
    while True:
        _, payload = raw.packet()
        out.append(payload)
        if tracker.feed(payload):
            return out


def prepare(raw, sql):
    first = exchange(raw, P.COM_STMT_PREPARE, sql)[0]
    assert first[0] == 0, first
    return int.from_bytes(first[1:5], "little")


def execute(raw, stmt_id, value, types=None):
    """EXECUTE of `SELECT ? AS v, CONNECTION_ID()` with one parameter: *types* given (flag 1)
    or not (flag 0: the types bound last).  -> (value bytes of column 1, connection id)."""
    if isinstance(value, int):
        data = value.to_bytes(8, "little", signed=True)
    else:
        data = P.encode_lenenc_str(value.encode())
    arg = (stmt_id.to_bytes(4, "little") + b"\x00" + b"\x01\x00\x00\x00" + b"\x00"
           + (b"\x01" + types if types is not None else b"\x00") + data)
    payloads = exchange(raw, P.COM_STMT_EXECUTE, arg)
    assert payloads[0][0] != 0xFF, P.parse_err(payloads[0])
    [row] = payloads[3:-1]  # column count, 2 definitions, the row, the terminator (DEPRECATE_EOF)
    assert row[:2] == b"\x00\x00"  # binary row header, no NULL
    out, pos = [], 2
    for definition in payloads[1:3]:
        kind = definition[-6]  # the type byte of a column definition
        if kind in (LONGLONG, LONG):
            size = 8 if kind == LONGLONG else 4
            out.append(row[pos:pos + size])
            pos += size
        else:
            value, pos = P.read_lenenc_str(row, pos)
            out.append(value)
    return out[0], int.from_bytes(out[1], "little")


def test_an_execute_without_types_gets_the_sessions_types_on_another_connection(ps_proxy):
    """A driver sends the parameter types with its first execute only (new-params-bound 1, then
    0).  The same statement on another connection was never bound there, or bound by another
    session with other types: the proxy sends this session's types with it."""
    connect = lambda: RawMySQL(ps_proxy.host, ps_proxy.port, USER, PASSWORD, "appdb")  # noqa: E731
    a, b, d = connect(), connect(), connect()
    sql = b"SELECT ? AS v, CONNECTION_ID()"
    sa = prepare(a, sql)
    value, x = execute(a, sa, 5, types=bytes((LONGLONG, 0)))
    assert value == (5).to_bytes(8, "little")
    b.query("BEGIN")  # b holds the connection a used (the only one idle)
    value, y = execute(a, sa, 7)  # flag 0, on a connection never holding the statement
    assert value == (7).to_bytes(8, "little") and y != x
    sb = prepare(b, sql)  # on x, in b's transaction: bound with strings there
    value, bx = execute(b, sb, "abc", types=bytes((VAR_STRING, 0)))
    assert (value, bx) == (b"abc", x)
    d.query("BEGIN")  # d holds y
    b.query("COMMIT")  # x idle again, its statement bound with b's string type
    value, again = execute(a, sa, 9)  # flag 0 on x: a's own types go with it
    assert (value, again) == ((9).to_bytes(8, "little"), x)
    value, _ = execute(b, sb, "de")  # b's types again (flag 0) on x, now bound by a
    assert value == b"de"
    d.query("COMMIT")
    for raw in (a, b, d):
        raw.close()


def test_a_statement_the_database_refuses_to_prepare_again_answers_its_execute(
        ps_proxy, mariadb_server):
    """The statement's table is dropped after the session prepared it; its next execute lands on
    a connection without the statement: the database's error to the internal prepare answers the
    execute, in sequence, and the session goes on."""
    mariadb_server.mariadb("GRANT ALL ON appdb.* TO '%s'@'%%'" % USER)
    mariadb_server.mariadb("CREATE TABLE IF NOT EXISTS appdb.ps_gone (id INT PRIMARY KEY)")
    connect = lambda: RawMySQL(ps_proxy.host, ps_proxy.port, USER, PASSWORD, "appdb")  # noqa: E731
    a, b = connect(), connect()
    sa = prepare(a, b"SELECT id FROM ps_gone WHERE id = ?")
    b.query("BEGIN")  # b holds the connection a prepared on
    mariadb_server.mariadb("DROP TABLE appdb.ps_gone")
    arg = sa.to_bytes(4, "little") + b"\x00\x01\x00\x00\x00\x00\x01" + bytes((LONGLONG, 0)) \
        + (1).to_bytes(8, "little")
    a.send(P.encode_packet(bytes((P.COM_STMT_EXECUTE,)) + arg, 0))
    seq, payload = a.packet()
    err = P.parse_err(payload)
    assert (seq, err.code, err.sqlstate) == (1, 1146, "42S02")
    assert a.query("SELECT 7") == [["7"]]  # the session goes on
    b.query("COMMIT")
    a.close()
    b.close()
