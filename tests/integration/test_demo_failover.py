"""`make demo`'s failover path (scripts/demo.py), on real servers.

- The whole demo as `make demo` runs it (PostgreSQL primary + hot standby, MariaDB primary + GTID
  replica, twistd with both proxies and their READ_ONLY endpoints): sessions through the ports it
  prints, `demo.py failover postgresql` and `demo.py failover mysql` from another process, the
  same sessions answering from the new writers, SIGTERM stops everything (about 35 s here; the
  demo's `current.json` goes to a temporary path through TXRDSPROXY_DEMO_CURRENT, so a demo you
  are running is never touched);
- the configuration the demo writes loads with the proxy's own loader.

`demo.py failover mysql` there and back is also run at the end of test_mysql_readers.py.
"""

import importlib.util
import json
import os
import types
from pathlib import Path

import psycopg  # test extras: a missing driver must fail, not skip
import pytest

from txrdsproxy.config.load import load_config
from txrdsproxy.testing.servers import MARIADB_BINARIES, PG_BINARIES, require_binaries

REPO = Path(__file__).resolve().parents[2]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_the_demo_writes_loads(tmp_path):
    demo = load_demo()
    args = types.SimpleNamespace(password="pw", pg_port=0, mysql_port=0, no_mysql=False, keep=False)
    d = demo.Demo(args)
    d.state_dir = str(tmp_path)
    d.pg, d.pg_standby = types.SimpleNamespace(port=15432), types.SimpleNamespace(port=15433)
    d.maria, d.maria_replica = types.SimpleNamespace(port=13306), types.SimpleNamespace(port=13307)
    path = d.write_config()
    assert os.stat(tmp_path / "secrets.json").st_mode & 0o077 == 0  # passwords: owner only
    config = load_config(path)
    proxies = {p.name: p for p in config.proxies}
    assert set(proxies) == {"demo-pg", "demo-mysql"}
    for name, ports in (("demo-pg", [15432, 15433]), ("demo-mysql", [13306, 13307])):
        proxy = proxies[name]
        assert [t.port for t in proxy.target_group.targets] == ports  # writer first
        assert proxy.health_check_interval == demo.HEALTH_CHECK_INTERVAL
        [endpoint] = proxy.endpoints
        assert (endpoint.name, endpoint.target_role) == (name + "-ro", "READ_ONLY")
    assert json.loads((tmp_path / "secrets.json").read_text())[demo.PG_ARN]["username"] == demo.USER


def _collect(proc, lines):
    """Read *proc*'s output lines into *lines* from a thread (until EOF)."""
    import threading

    def run():
        for line in proc.stdout:
            lines.append(line)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for_line(proc, marker, lines, timeout):
    """Poll *lines* until one contains *marker* (bounded)."""
    import time
    deadline = time.monotonic() + timeout
    while not any(marker in line for line in list(lines)):
        assert proc.poll() is None, "the demo exited; output:\n" + "".join(lines)
        assert time.monotonic() < deadline, "no %r within %g s; output:\n%s" % (marker, timeout, "".join(lines))
        time.sleep(0.1)


def test_make_demo_starts_fails_over_and_stops(tmp_path):
    """`make demo` as run (scripts/demo.py under this interpreter), PostgreSQL and MariaDB with
    their standby/replica: sessions through the printed proxy ports, `demo.py failover
    postgresql` and `demo.py failover mysql` from another process, the same sessions answering
    from the new writers, then SIGTERM stops everything and removes the state."""
    import re
    import signal
    import subprocess
    import sys

    import pymysql

    reason = require_binaries(*PG_BINARIES, *MARIADB_BINARIES)  # CI=true: raises, never skips
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, TXRDSPROXY_DEMO_CURRENT=str(tmp_path / "current.json"))
    argv = [sys.executable, str(REPO / "scripts" / "demo.py"), "--pg-port", "0", "--mysql-port", "0",
            "--password", "demo-test-pw"]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    reader_thread = _collect(proc, lines)
    try:
        _wait_for_line(proc, "Press Ctrl-C", lines, timeout=180)
        out = "".join(lines)

        def found(pattern):
            """The groups of *pattern* in the demo's output; a miss shows the whole output (why
            a server did not start, e.g. "MariaDB did not start; going on without ...")."""
            match = re.search(pattern, out)
            assert match, "no %r in the demo's output:\n%s" % (pattern, out)
            return [int(g) for g in match.groups()]

        [pg_proxy] = found(r'psql "host=127\.0\.0\.1 port=(\d+) user=app')
        [pg_reader] = found(r'port=(\d+) user=app dbname=appdb"    # demo-pg-ro')
        primary, standby = found(r"PostgreSQL primary 127\.0\.0\.1:(\d+), hot standby 127\.0\.0\.1:(\d+)")
        [my_proxy] = found(r"mariadb -h 127\.0\.0\.1 -P (\d+) -u app")
        m1, m2 = found(r"MariaDB primary 127\.0\.0\.1:(\d+), GTID replica 127\.0\.0\.1:(\d+)")
        dsn = "host=127.0.0.1 user=app password=demo-test-pw dbname=appdb port=%d"
        pg = psycopg.connect(dsn % pg_proxy, autocommit=True)
        reader = psycopg.connect(dsn % pg_reader, autocommit=True)
        my = pymysql.connect(host="127.0.0.1", port=my_proxy, user="app", password="demo-test-pw",
                             database="appdb", autocommit=True)
        try:
            assert pg.execute("SELECT inet_server_port()").fetchone()[0] == primary
            assert reader.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone() == (True, standby)
            with my.cursor() as cur:
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == m1
            for engine in ("postgresql", "mysql"):
                done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "failover", engine],
                                      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stdout + done.stderr
            # the same sessions, on the new writers (a statement waits in the proxy until its
            # health checks have found the new writer)
            assert pg.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone() == (standby, False)
            # MySQL's switchover leaves the old writer up, read-only: until the next health check
            # (HealthCheckInterval 2 s in the demo) reads still go there (documented), so poll
            import time
            deadline = time.monotonic() + 60
            while True:
                with my.cursor() as cur:
                    cur.execute("SELECT @@port, @@read_only")
                    found = cur.fetchone()
                if found == (m2, 0):
                    break
                assert found == (m1, 1) and time.monotonic() < deadline, found
                time.sleep(0.1)
        finally:
            for conn in (pg, reader, my):
                conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
        reader_thread.join(10)
        assert "demo: stopping PostgreSQL" in "".join(lines)
        assert not (tmp_path / "current.json").exists()
    finally:
        if proc.poll() is None:
            # the demo stops its own children (twistd and the servers run in sessions of their
            # own: killing the demo alone would leave them running)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
