"""Failover on real MariaDB: a primary and a GTID replica behind one MYSQL proxy (issue 11 item 1).

The RDS Proxy guide's "Preserving Connections to a MySQL Database Across a Failover", as written:
a `mariadb` client connected through the proxy before the failover (with reconnecting switched
off) asks `select @@port, @@hostname, @@server_id` and, after each failover, gets the new writer's
answer on the same connection.  The guide fails over twice; here the first is a switchover (the
writer turns read-only, the replica is promoted, the old writer replicates from it: what Aurora's
`failover-db-cluster` does) and the second a crash of the writer, during which requests wait in
the proxy (up to ConnectionBorrowTimeout) and idle sessions are kept.  Prints the time from the
promotion to the first write through the proxy and the share of idle sessions kept.
"""

import os
import select
import subprocess
import threading
import time

import pymysql  # test extras: a missing driver must fail, not skip

try:
    from failover_util import health_states, writer_id
    from mysql_harness import start_mysql_proxy
    from servers import find_binary
except ImportError:
    from tests.integration.failover_util import health_states, writer_id
    from tests.integration.mysql_harness import start_mysql_proxy
    from tests.integration.servers import find_binary

IDLE_SESSIONS = 20






class MariadbCli:
    """The `mariadb` command-line client on a pipe (batch mode, one line per answer), with
    automatic reconnection off: if the proxy dropped its connection, the next statement fails
    and the client exits instead of quietly opening a new one."""

    def __init__(self, proxy, server):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MYSQL")}
        env["MYSQL_PWD"] = server.users["app_native"]
        self.proc = subprocess.Popen(
            [find_binary("mariadb"), "--no-defaults", "--protocol=TCP", "-h", proxy.host,
             "-P", str(proxy.port), "-u", "app_native", "--batch", "--skip-column-names",
             "--unbuffered", "--skip-reconnect", "appdb"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)

    def query(self, sql, timeout=60):
        """-> the first answer row as a list of strings."""
        self.proc.stdin.write(sql + ";\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer to {sql!r} within {timeout}s"
        line = self.proc.stdout.readline()
        assert line, f"the mariadb client ended: {self.proc.stderr.read()}"
        return line.rstrip("\n").split("\t")

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _connect(proxy, server, **kw):
    return pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                           password=server.users["app_native"], database="appdb",
                           autocommit=True, connect_timeout=30, read_timeout=90, **kw)


def _one(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def test_mysql_failover_keeps_the_session_as_in_the_rds_guide(mariadb_replication_factory, tmp_path):
    primary, (replica,) = mariadb_replication_factory()
    proxy = start_mysql_proxy(tmp_path / "proxy", primary, targets=[primary, replica],
                              HealthCheckInterval=1, ConnectionBorrowTimeout=30)
    # A second proxy over the same targets with a short borrow timeout: what a request gets
    # when the gap lasts longer than ConnectionBorrowTimeout.
    impatient = start_mysql_proxy(tmp_path / "impatient", primary, targets=[primary, replica],
                                  name="impatient", HealthCheckInterval=1, ConnectionBorrowTimeout=3)
    conns = []
    try:
        _run(primary, replica, proxy, impatient, conns, lambda: MariadbCli(proxy, primary))
    finally:
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
        impatient.stop()
        proxy.stop()


def _run(primary, replica, proxy, impatient, conns, make_cli):
    ctx = proxy.ctx
    for p in (proxy, impatient):
        p.wait_for(lambda: p.call(health_states, p.ctx) == {"mariadb-1": "AVAILABLE", "mariadb-2": "AVAILABLE"},
                   timeout=30, what="the first health checks")
    assert proxy.call(writer_id, ctx) == "mariadb-1"
    assert proxy.call(lambda: ctx.topology.probed_role(ctx.topology.targets[1])) == "READ_ONLY"
    hostname = primary.mariadb("SELECT @@hostname").strip()

    cli = make_cli()
    conns.append(cli)
    try:
        # mysql> select @@aurora_server_id;  (here: the port, host and server id of the writer)
        assert cli.query("select @@port, @@hostname, @@server_id") == [
            str(primary.port), hostname, str(primary.server_id)]

        app = _connect(proxy, primary)
        conns.append(app)
        _one(app, "CREATE TABLE kept (x int primary key, port int)")
        _one(app, "INSERT INTO kept VALUES (1, @@port)")
        idle = [_connect(proxy, primary) for _ in range(IDLE_SESSIONS)]
        conns.extend(idle)
        for conn in idle:
            assert _one(conn, "SELECT @@port")[0] == primary.port
        late = _connect(impatient, primary)  # logged in before the gap
        conns.append(late)
        assert _one(late, "SELECT @@port")[0] == primary.port
        sessions = proxy.call(lambda: sorted(s.id for s in ctx.sessions))
        assert len(sessions) == IDLE_SESSIONS + 2

        # $ aws rds failover-db-cluster ...: a switchover to the replica
        primary.mariadb("SET GLOBAL read_only = 1")
        replica.sync_with(primary)
        replica.promote()
        primary.demote(replica)
        # "After a short time, the console shows that the failover operation is complete."
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) == "mariadb-2", timeout=30,
                       what="the proxy to take the promoted replica as its writer")
        assert cli.query("select @@port, @@hostname, @@server_id") == [
            str(replica.port), hostname, str(replica.server_id)]
        _one(app, "INSERT INTO kept VALUES (2, @@port)")

        # The second failover: the writer crashes away; requests wait for the promotion.
        replica.stop()
        proxy.wait_for(lambda: proxy.call(writer_id, ctx) is None, timeout=30,
                       what="the writer to be lost")
        answers, errors = [], []

        def write():
            try:
                _one(app, "INSERT INTO kept VALUES (3, @@port)")
                answers.append((time.monotonic(), _one(app, "SELECT @@port, @@read_only")))
            except Exception as e:  # reported below
                errors.append(e)

        waiting = threading.Thread(target=write, daemon=True)
        waiting.start()
        proxy.wait_for(lambda: proxy.call(lambda: ctx.pool.waiting) == 1, timeout=15,
                       what="the write to wait in the proxy")
        # Longer than ConnectionBorrowTimeout without a writer: RDS Proxy's error, and the
        # session stays usable.
        try:
            _one(late, "SELECT @@port")
        except pymysql.err.OperationalError as e:
            assert e.args == (9501, "Timed-out waiting to acquire database connection"), e.args
        else:
            raise AssertionError("a request got an answer while no target was a writer")
        assert not answers and not errors  # the patient one still waits

        primary.promote()
        promoted_at = time.monotonic()
        waiting.join(60)
        assert not waiting.is_alive() and not errors, errors
        (done_at, row), = answers
        assert row == (primary.port, 0)
        first_write = done_at - promoted_at
        assert proxy.call(writer_id, ctx) == "mariadb-1"

        # $ fg / mysql> select @@aurora_server_id;  -- the first writer again, same connection
        assert cli.query("select @@port, @@hostname, @@server_id") == [
            str(primary.port), hostname, str(primary.server_id)]
        assert _one(late, "SELECT @@port")[0] == primary.port
        kept = 0
        for conn in idle:
            try:
                if _one(conn, "SELECT @@port")[0] == primary.port:
                    kept += 1
            except pymysql.err.MySQLError:
                pass
        assert _one(app, "SELECT group_concat(port ORDER BY x) FROM kept")[0] == ",".join(
            str(p) for p in (primary.port, replica.port, primary.port))
        # nobody reconnected: the same client sessions, and the CLI (reconnect off) lives on
        assert proxy.call(lambda: sorted(s.id for s in ctx.sessions)) == sessions
        assert cli.proc.poll() is None
        print(f"\nMySQL failover: first write through the proxy {first_write:.2f} s after the"
              f" promotion (HealthCheckInterval 1 s); idle sessions kept {kept} of {len(idle)}")
        assert kept == len(idle)
        targets = proxy.call(lambda: {c.target.rds_resource_id for c in ctx.pool.connections()})
        assert targets == {"mariadb-1"}
    finally:
        cli.close()
