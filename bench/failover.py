"""Failover figures: time from a promotion to the first write through the proxy, and the share
of idle client sessions kept, for PostgreSQL (streaming hot standby) and MySQL (MariaDB GTID
replica).  Figures, never assertions.

Per engine: a writer and its standby/replica, the proxy (`twistd -n rdsproxy`) with both as
targets (HealthCheckInterval 1 s), IDLE client sessions that each ran a statement, and one
writer session.  The writer stops (fast shutdown: PostgreSQL SIGINT, MariaDB SIGTERM); the
writer session sends an INSERT, which waits in the proxy (no writer); the standby/replica is
promoted (`pg_promote(wait => true)` / STOP SLAVE; RESET SLAVE ALL; read_only=0) and the clock
starts when the promotion has returned.  "first write" is when that INSERT's answer arrives;
"kept" counts the idle sessions whose next statement answers from the new writer on the same
client connection (no reconnect).

    .venv/bin/python bench/failover.py [--idle N] [--only pg|mysql]
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from txrdsproxy.testing.servers import (MARIADB_BINARIES, PG_BINARIES, MariaDBServer,  # noqa: E402
                                        PostgresServer, find_binary, find_free_port, stop_process)

HOST = "127.0.0.1"
VENV_BIN = Path(os.path.abspath(sys.executable)).parent
USER, PASSWORD, DB = "bench_fo", "failover-pw-1", "appdb"
ARN = "arn:bench:failover"
HEALTH_CHECK_INTERVAL = 1


def _proxy(workdir, engine, auth_type, targets):
    """twistd -n rdsproxy over *targets* [(id, port)] -> (Popen, port)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    (workdir / "secrets.json").write_text(json.dumps({ARN: {"username": USER, "password": PASSWORD}}))
    rows = "".join("          - {RdsResourceId: %s, Endpoint: %s, Port: %d}\n" % (t, HOST, p)
                   for t, p in targets)
    (workdir / "proxy.yaml").write_text(
        "Secrets: {Backend: file, Path: secrets.json}\n"
        "DBProxies:\n"
        "  - DBProxyName: bench-failover-%s\n"
        "    EngineFamily: %s\n"
        '    Listen: "tcp:%d:interface=%s"\n'
        "    HealthCheckInterval: %d\n"
        '    Auth: [{SecretArn: "%s", ClientPasswordAuthType: %s}]\n'
        "    TargetGroups:\n"
        "      - TargetGroupName: default\n"
        "        ConnectionPoolConfig: {MaxConnectionsPercent: 50, ConnectionBorrowTimeout: 60}\n"
        "        Targets:\n%s"
        % (engine.lower(), engine, port, HOST, HEALTH_CHECK_INTERVAL, ARN, auth_type, rows))
    log = open(workdir / "proxy.log", "ab")
    try:
        proc = subprocess.Popen([str(VENV_BIN / "twistd"), "-n", "--pidfile=", "rdsproxy",
                                 "--config", str(workdir / "proxy.yaml")], cwd=str(REPO),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the proxy exited with %s" % proc.returncode)
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc, signal.SIGKILL, 5)
                raise RuntimeError("the proxy is not listening after 30 s")
            time.sleep(0.05)


def _measure(engine, connect, port_of, write, stop_writer, promote, new_port, idle_count):
    """The scenario of the module docstring -> (first write seconds, kept, idle_count)."""
    idle = [connect() for _ in range(idle_count)]
    writer = connect()
    for conn in idle + [writer]:
        port_of(conn)
    time.sleep(2 * HEALTH_CHECK_INTERVAL + 1)  # a few health checks: both targets known
    stop_writer()
    done = []

    def write_once():
        try:
            write(writer)
            done.append(time.monotonic())
        except Exception as e:
            done.append(e)

    thread = threading.Thread(target=write_once, daemon=True)
    thread.start()
    time.sleep(1.0)  # the write is waiting in the proxy (the writer is gone)
    promote()
    promoted_at = time.monotonic()
    thread.join(60)
    first_write = done[0] - promoted_at if done and isinstance(done[0], float) else None
    kept = 0
    for conn in idle:
        try:
            if port_of(conn) == new_port:
                kept += 1
        except Exception:
            pass
    for conn in idle + [writer]:
        try:
            conn.close()
        except Exception:
            pass
    return first_write, kept, done[0] if done and not isinstance(done[0], float) else None


def run_pg(root, idle_count, say):
    import psycopg
    primary = PostgresServer(root / "pg", max_connections=100).start()
    standby = proxy = None
    try:
        primary.create_user(USER, PASSWORD)
        primary.create_database(DB, owner=USER)
        standby = primary.start_standby(root / "pg-standby")
        proxy, port = _proxy(root / "pg-proxy", "POSTGRESQL", "POSTGRES_SCRAM_SHA_256",
                             [("pg-1", primary.port), ("pg-2", standby.port)])
        dsn = "host=%s port=%d user=%s password=%s dbname=%s" % (HOST, port, USER, PASSWORD, DB)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE fo (x int)")
        first, kept, error = _measure(
            "PostgreSQL", lambda: psycopg.connect(dsn, autocommit=True),
            lambda c: c.execute("SELECT inet_server_port()").fetchone()[0],
            lambda c: c.execute("INSERT INTO fo VALUES (1)"),
            primary.stop, standby.promote, standby.port, idle_count)
        return first, kept, error
    finally:
        if proxy is not None:
            stop_process(proxy, signal.SIGTERM, 15)
        if standby is not None:
            standby.stop()
        primary.stop()


def run_mysql(root, idle_count, say):
    import pymysql
    primary = MariaDBServer(root / "maria", max_connections=100, binlog=True).start()
    replica = proxy = None
    try:
        primary.create_user(USER, PASSWORD)
        primary.create_database(DB)
        primary.mariadb("CREATE TABLE %s.fo (x int)" % DB)
        replica = primary.start_replica(root / "maria-replica")
        proxy, port = _proxy(root / "mysql-proxy", "MYSQL", "MYSQL_NATIVE_PASSWORD",
                             [("mariadb-1", primary.port), ("mariadb-2", replica.port)])

        def connect():
            return pymysql.connect(host=HOST, port=port, user=USER, password=PASSWORD, database=DB,
                                   autocommit=True, connect_timeout=30, read_timeout=90)

        def run(conn, sql):
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchone()

        first, kept, error = _measure(
            "MySQL", connect, lambda c: run(c, "SELECT @@port")[0],
            lambda c: run(c, "INSERT INTO fo VALUES (1)"),
            primary.stop, replica.promote, replica.port, idle_count)
        return first, kept, error
    finally:
        if proxy is not None:
            stop_process(proxy, signal.SIGTERM, 15)
        if replica is not None:
            replica.stop()
        primary.stop()


def run(say, idle_count=50, only=None):
    """Print the figures; -> list of (what, detail) functional failures."""
    failures = []
    say("\n== Failover: promotion -> first write through the proxy, idle sessions kept"
        " (HealthCheckInterval %d s, %d idle sessions) ==" % (HEALTH_CHECK_INTERVAL, idle_count))
    engines = [("PostgreSQL", PG_BINARIES, run_pg), ("MySQL", MARIADB_BINARIES, run_mysql)]
    for name, binaries, fn in engines:
        if only and only.lower() not in name.lower():
            continue
        missing = [b for b in binaries if find_binary(b) is None]
        if missing:
            say("  %-10s skipped: missing %s" % (name, ", ".join(missing)))
            continue
        with tempfile.TemporaryDirectory(prefix="txrdsproxy-failover-") as root:
            try:
                first, kept, error = fn(Path(root), idle_count, say)
            except Exception as e:  # a setup failure: reported, the other engine still runs
                failures.append(("failover " + name, repr(e)))
                say("  %-10s FAILED: %r" % (name, e))
                continue
        say("  %-10s first write %s after the promotion; idle sessions kept %d of %d (%.0f%%)"
            % (name, "%.2f s" % first if first is not None else "FAILED (%r)" % (error,),
               kept, idle_count, 100.0 * kept / idle_count))
        if first is None or kept < idle_count:
            failures.append(("failover " + name, "write error %r; kept %d of %d" % (error, kept, idle_count)))
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=50, help="idle sessions (default %(default)s)")
    parser.add_argument("--only", choices=("pg", "mysql"))
    args = parser.parse_args()
    failures = run(lambda *a: print(*a, flush=True), args.idle,
                   {"pg": "postgresql", "mysql": "mysql"}.get(args.only))
    for what, detail in failures:
        print("FAILURE %s: %s" % (what, detail))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
