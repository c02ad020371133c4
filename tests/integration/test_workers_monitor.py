"""One health monitor for `Workers: 2` (twistd, a real PostgreSQL primary and streaming standby):

- every target is checked once per round, by the supervisor's monitor, not once per worker: the
  health-check logins PostgreSQL logged (log_connections) equal the monitor's own check counter;
- when the primary stops and the standby is promoted, a session on worker 0 writes to the
  promoted standby over the same client connection, and worker 1, killed and restarted in the
  middle of the failover, starts from the monitor's view (no writer, never the configured one)
  and its new session writes to the promoted standby too;
- DescribeDBProxyTargets gives the same Role and TargetHealth from the supervisor and from each
  worker's private admin socket;
- the fencing of the former writer survives a restart: the proxy is stopped, the former primary
  comes back read-write (a split brain), and the restarted proxy still refuses it
  (INVALID_REPLICATION_STATE) and writes to the promoted one.
"""

import http.client
import os
import re
import signal
import socket
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import yaml

try:
    from failover_util import pg_replicated, wait_replicated
    from proxyutil import TwistdProxy, find_free_port, sessions_client, wait_for, write_proxy_config
except ImportError:
    from tests.integration.failover_util import pg_replicated, wait_replicated
    from tests.integration.proxyutil import (TwistdProxy, find_free_port, sessions_client, wait_for,
                                             write_proxy_config)

PASSWORD = "monitor-pw-1"
NAME = "mon-pg"
STARTUP = 120  # twistd + 2 workers on a loaded 2-core machine
CHECK_LOGIN = re.compile(r"connection authorized: user=app_scram database=postgres")


def targets(rds):
    """{RdsResourceId: (Role, State, Reason)} as DescribeDBProxyTargets answers (None while no
    worker is up to answer it: the supervisor's 503 is plain text, which botocore cannot parse)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError
    try:
        answer = rds.describe_db_proxy_targets(DBProxyName=NAME)["Targets"]
    except (BotoCoreError, ClientError, ResponseParserError):
        return None
    return {t["RdsResourceId"]: (t.get("Role"), t["TargetHealth"]["State"],
                                 t["TargetHealth"].get("Reason")) for t in answer}


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("worker", timeout=15)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(self.path)


def worker_view(rundir, index):
    """DescribeDBProxyTargets asked of worker *index* itself (its private admin socket) -> the
    XML's (RdsResourceId, Role, State, Reason) in order: what that worker would answer."""
    conn = _UnixHTTP(f"{rundir}/admin-{index}.sock")
    body = urlencode({"Action": "DescribeDBProxyTargets", "Version": "2014-10-31", "DBProxyName": NAME})
    conn.request("POST", "/", body, {"Content-Type": "application/x-www-form-urlencoded",
                                     "X-Rdsproxy-Client": "127.0.0.1"})
    data = conn.getresponse().read().decode()
    conn.close()
    out = []
    for member in re.findall(r"<member>(.*?)</member>", data, re.S):
        ident = re.search(r"<RdsResourceId>(.*?)<", member)
        if ident is None:
            continue
        fields = [ident.group(1)]
        for tag in ("Role", "State", "Reason"):
            found = re.search(rf"<{tag}>(.*?)<", member)
            fields.append(found.group(1) if found else None)
        out.append(tuple(fields))
    return sorted(out)


def check_figures(port):
    """The supervisor's monitor: (rounds, {target: checks}) from /metrics."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as r:
        text = r.read().decode()
    rounds = int(float(re.search(rf'rdsproxy_health_check_rounds_total{{proxy_name="{NAME}"}} (\S+)',
                                 text).group(1)))
    checks = {m.group(1): int(float(m.group(2))) for m in re.finditer(
        rf'rdsproxy_health_checks_total{{proxy_name="{NAME}",target="([^"]+)"}} (\S+)', text)}
    return rounds, checks


def healthz(port):
    import json
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=15) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def logins(server):
    return len(CHECK_LOGIN.findall(Path(server.log_path).read_text(errors="replace")))


def test_one_monitor_for_two_workers_and_fencing_across_a_restart(pg_server_factory, tmp_path):
    settings = {"log_connections": "on"}
    with pg_replicated(pg_server_factory, tmp_path, PASSWORD, max_connections=40,
                       settings=settings) as (primary, [standby]):
        port, admin = find_free_port(), find_free_port()
        config = write_proxy_config(tmp_path / "proxy", primary, name=NAME,
                                    listen=f"tcp:{port}:interface=127.0.0.1",
                                    targets=[primary, standby], HealthCheckInterval=1,
                                    ConnectionBorrowTimeout=30)
        data = yaml.safe_load(Path(config).read_text())
        data.update(Workers=2, DrainTimeout=5, Admin={"Listen": f"tcp:{admin}:interface=127.0.0.1",
                                                      "AllowUnauthenticatedLoopbackReads": True})
        Path(config).write_text(yaml.safe_dump(data, sort_keys=False))
        proxy = TwistdProxy(config, port).start(timeout=STARTUP)
        rds = sessions_client(admin)
        dsn = (f"host=127.0.0.1 port={port} user=app_scram password={PASSWORD} dbname=appdb "
               f"sslmode=disable connect_timeout=10")
        conns = []
        try:
            wait_for(lambda: targets(rds) == {"pg-1": ("READ_WRITE", "AVAILABLE", None),
                                              "pg-2": ("READ_ONLY", "AVAILABLE", None)},
                     timeout=STARTUP, what="the first health checks")
            rundir = re.search(r"run directory (\S+)", proxy.log()).group(1)

            # -- probes: once per round, whatever the number of workers -------------------------
            wait_for(lambda: check_figures(admin)[0] >= 6, timeout=60, what="six rounds")
            before = check_figures(admin)
            seen = {"pg-1": logins(primary), "pg-2": logins(standby)}
            after = check_figures(admin)
            for target in ("pg-1", "pg-2"):
                # Counted when a check starts: the server's count lies between two readings,
                # less at most the one check under way at the first (never twice the checks).
                assert before[1][target] - 1 <= seen[target] <= after[1][target], (before, seen, after)
                assert after[0] <= after[1][target] <= after[0] + 1, after  # one per round
            assert after[0] >= 6

            # -- a session on each worker ----------------------------------------------------------------
            by_worker = {}
            for _ in range(64):
                conn = psycopg.connect(dsn, autocommit=True)
                conns.append(conn)
                by_worker.setdefault(conn.info.backend_pid % 2, conn)
                if len(by_worker) == 2:
                    break
            assert set(by_worker) == {0, 1}, "64 connections, all accepted by one worker"
            for conn in by_worker.values():
                assert conn.execute("SELECT inet_server_port()").fetchone()[0] == primary.port
            by_worker[0].execute("CREATE TABLE monitored (worker int)")
            wait_replicated(standby, "SELECT count(*) FROM monitored", "0")

            # -- failover, with worker 1 killed and restarted in the middle of it -----------------
            primary.stop()
            wait_for(lambda: (targets(rds) or {}).get("pg-1", ())[1:2] == ("UNAVAILABLE",), timeout=60,
                     what="pg-1 lost")
            os.kill(healthz(admin)["workers"][1]["pid"], signal.SIGKILL)
            wait_for(lambda: (lambda w: w["up"] and w["restarts"] == 1)(healthz(admin)["workers"][1]),
                     timeout=STARTUP, what="worker 1 restarted")
            # It asked the monitor as it started: no writer (not pg-1, the configuration's first).
            wait_for(lambda: [v[:3] for v in worker_view(rundir, 1)][0] == ("pg-1", "READ_ONLY", "UNAVAILABLE"),
                     timeout=30, what="the restarted worker's view")
            assert [v[1] for v in worker_view(rundir, 1)] == ["READ_ONLY", "READ_ONLY"]  # no writer
            standby.promote()
            wait_for(lambda: (targets(rds) or {}).get("pg-2", ())[:2] == ("READ_WRITE", "AVAILABLE"),
                     timeout=60, what="pg-2 the writer")
            by_worker.pop(1).close()  # its worker was killed: a new session on the restarted one
            for _ in range(64):
                conn = psycopg.connect(dsn, autocommit=True)
                conns.append(conn)
                if conn.info.backend_pid % 2 == 1:
                    by_worker[1] = conn
                    break
            assert 1 in by_worker, "64 connections, none accepted by the restarted worker"
            for index, conn in sorted(by_worker.items()):
                row = conn.execute("WITH w AS (INSERT INTO monitored VALUES (%s) RETURNING 1)"
                                   " SELECT inet_server_port(), pg_is_in_recovery() FROM w",
                                   (index,)).fetchone()
                assert row == (standby.port, False), (index, row)
            # Both workers hold the monitor's view (read one after the other, so a round ending
            # PROMOTED may land between the two readings: read again until they agree).
            # (A check that times out on a loaded machine changes a state for a round: the
            # waits below read again rather than fail on it.)
            expected = [("pg-1", "READ_ONLY", "UNAVAILABLE"), ("pg-2", "READ_WRITE", "AVAILABLE")]
            views = []
            wait_for(lambda: views.append([worker_view(rundir, i) for i in (0, 1)])
                     or (views[-1][0] == views[-1][1] and [v[:3] for v in views[-1][0]] == expected),
                     timeout=30, what="the same view in both workers")
            # The supervisor answers the same view.
            wait_for(lambda: {k: v[:2] for k, v in (targets(rds) or {}).items()} == {
                "pg-1": ("READ_ONLY", "UNAVAILABLE"), "pg-2": ("READ_WRITE", "AVAILABLE")},
                timeout=30, what="the supervisor's answer")
            state = (Path(config).parent / "rdsproxy-state.json").read_text()
            assert '"pg-1": "pg-2"' in state and '"writer": "pg-2"' in state, state
        finally:
            for conn in conns:
                conn.close()
            status = proxy.stop(timeout=60)
            log = proxy.log()
        assert status == 0, log
        assert "Traceback" not in log, log
        assert "failover: writer pg-1 -> pg-2 (the health monitor's verdict)" in log, log

        # -- restart: the former writer comes back read-write, and stays fenced ---------------------
        primary.start()  # its own primary again: a split brain
        assert primary.psql("SELECT pg_is_in_recovery()").strip() == "f"
        proxy = TwistdProxy(config, port, log_path=str(tmp_path / "twistd-2.log")).start(timeout=STARTUP)
        try:
            wait_for(lambda: targets(rds) == {
                "pg-1": ("READ_ONLY", "UNAVAILABLE", "INVALID_REPLICATION_STATE"),
                "pg-2": ("READ_WRITE", "AVAILABLE", None)}, timeout=STARTUP,
                what="pg-1 fenced after the restart")
            with psycopg.connect(dsn, autocommit=True) as conn:
                assert conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone() == (
                    standby.port, False)
        finally:
            status = proxy.stop(timeout=60)
        log = proxy.log()
        assert status == 0, log
        assert "fenced (remembered in the state file)" in log, log
