"""`Workers: 2` as an operator runs it (`twistd -n rdsproxy`, real PostgreSQL): sessions spread
over both workers, the connection cap holds for the proxy as a whole (pg_stat_activity), a
cancel reaches its query whichever worker accepted the cancel connection, a SIGKILLed worker
is restarted and only its clients are cut, /metrics, /healthz, the console, DescribeDBProxySessions,
SIGHUP and SIGTERM answer for the whole proxy, and `--uid` works with workers on a port below
1024 (the supervisor hands its socket down)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import yaml

try:
    from proxyutil import (TwistdProxy, all_sessions, find_free_port, free_privileged_port, sessions_client,
                           wait_for, write_proxy_config)
except ImportError:
    from tests.integration.proxyutil import (TwistdProxy, all_sessions, find_free_port, free_privileged_port,
                                             sessions_client, wait_for, write_proxy_config)

USER = "app_workers"  # its own role: pg_stat_activity counts only this proxy's connections
PASSWORD = "workers-pw-1"
ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_workers"
API_KEY = ("AKIAWORKERS00000001", "workers-secret-key-01")
KEY_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:key-admin"
# Bound on twistd + 2 workers starting (each worker imports the whole proxy): a full suite at load
# ~26 on 2 cores once needed more than 30 s.
STARTUP = 120
CAP = 5  # MaxConnectionsPercent 5 of max_connections 100: shares 3 (worker 0) and 2 (worker 1)


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def health(proxy):
    return json.loads(_get(proxy.admin_port, "/healthz")[1])


def owner(conn):
    """The worker holding *conn*'s session: its BackendKeyData process id names it."""
    return conn.info.backend_pid % 2


def _role(pg_server):
    """The test's own role (pg_stat_activity counts only this proxy's connections)."""
    if USER not in pg_server.users:
        pg_server.create_user(USER, PASSWORD)
        pg_server.psql(f"GRANT appdb_owner TO {USER}")
        pg_server.users[USER] = PASSWORD


@pytest.fixture(scope="module")
def workers_proxy(pg_server, tmp_path_factory):
    _role(pg_server)
    tmp = tmp_path_factory.mktemp("workers")
    port, admin = find_free_port(), find_free_port()
    config = write_proxy_config(tmp, pg_server, listen=f"tcp:{port}:interface=127.0.0.1",
                                secrets={ARN: (USER, PASSWORD, "POSTGRES_SCRAM_SHA_256")},
                                MaxConnectionsPercent=CAP, MaxIdleConnectionsPercent=CAP,
                                ConnectionBorrowTimeout=60)
    data = yaml.safe_load(Path(config).read_text())
    data.update(Workers=2, DrainTimeout=10, Admin={"Listen": f"tcp:{admin}:interface=127.0.0.1"})
    # One API principal, so a signed ModifyDBProxyTargetGroup can be sent to the supervisor.
    secrets_path = Path(config).with_name("secrets.json")
    secrets = json.loads(secrets_path.read_text())
    secrets[KEY_ARN] = {"secret_access_key": API_KEY[1]}
    secrets_path.write_text(json.dumps(secrets))
    os.chmod(secrets_path, 0o600)
    data["IAM"] = {"Region": "us-east-1", "AccountId": "123456789012", "Principals": [{
        "Arn": "arn:aws:iam::123456789012:user/admin",
        "AccessKeys": [{"AccessKeyId": API_KEY[0], "SecretArn": KEY_ARN}],
        "Policies": [{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "rds:*", "Resource": "*"}]}]}]}
    Path(config).write_text(yaml.safe_dump(data, sort_keys=False))
    proxy = TwistdProxy(config, port).start(timeout=STARTUP)
    proxy.admin_port = admin
    proxy.dsn = (f"host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname=appdb "
                 f"sslmode=disable connect_timeout=10")
    proxy.connect = lambda: psycopg.connect(proxy.dsn, autocommit=True, prepare_threshold=None)
    try:
        wait_for(lambda: health(proxy)["status"] == "ok", timeout=STARTUP, what="both workers listening")
        yield proxy
    finally:
        status = proxy.stop(timeout=60)
        log = proxy.log()
        assert status == 0, log
        assert "Traceback" not in log, log
        # Scrapes, API calls and passed-on cancels do not log a factory per request.
        assert "Starting factory" not in log, log


def connect_on_both(proxy, per_worker=1, limit=64):
    """-> {worker: [connections]}, at least *per_worker* on each (the kernel picks the
    worker of each new connection by a hash of its address: keep connecting)."""
    by_worker, spare = {0: [], 1: []}, []
    for _ in range(limit):
        conn = proxy.connect()
        (by_worker[owner(conn)] if len(by_worker[owner(conn)]) < per_worker else spare).append(conn)
        if all(len(c) >= per_worker for c in by_worker.values()):
            break
    for conn in spare:
        conn.close()
    assert all(len(c) >= per_worker for c in by_worker.values()), \
        f"{limit} connections, all accepted by one worker"
    return by_worker


def test_sessions_spread_and_cap_holds_in_total(workers_proxy, pg_server):
    proxy = workers_proxy
    conns = [proxy.connect() for _ in range(24)]
    try:
        owners = [owner(c) for c in conns]
        assert set(owners) == {0, 1}, owners  # 24 connections: both workers got some
        pids = {c.info.backend_pid for c in conns}
        assert len(pids) == len(conns)  # session ids are unique over the workers
        stop, peak, errors = threading.Event(), [0], []

        def load(conn):
            try:
                while not stop.is_set():
                    with conn.transaction():
                        conn.execute("SELECT pg_sleep(0.02)")
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=load, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        try:
            count = "SELECT count(*) FROM pg_stat_activity WHERE usename = '%s'" % USER
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                peak[0] = max(peak[0], int(pg_server.psql(count).strip()))
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors
        # The cap holds for the proxy as a whole, and more than one worker's share was in use.
        assert 3 < peak[0] <= CAP, peak
        h = health(proxy)["proxies"]["test-pg"]
        assert h["max_database_connections"] == CAP, h
        assert h["client_connections"] == len(conns), h
        status, text = _get(proxy.admin_port, "/metrics")
        assert status == 200
        assert 'rdsproxy_max_database_connections_allowed{proxy_name="test-pg"' in text
        allowed = [line for line in text.splitlines()
                   if line.startswith("rdsproxy_max_database_connections_allowed{")]
        assert allowed and float(allowed[0].rsplit(" ", 1)[1]) == CAP, allowed
        for w in (0, 1):
            line = next(line for line in text.splitlines()
                        if line.startswith("rdsproxy_worker_client_connections{")
                        and f'worker="{w}"' in line)
            assert float(line.rsplit(" ", 1)[1]) == owners.count(w), (line, owners)
    finally:
        for c in conns:
            c.close()


def test_cancel_reaches_the_query_whichever_worker_accepts_it(workers_proxy):
    proxy = workers_proxy
    by_worker = connect_on_both(proxy)
    routed = local = 0
    try:
        for attempt in range(40):
            conn = by_worker[attempt % 2][0]
            before = proxy.log().count("passed on by another worker")
            outcome = []

            def run():
                try:
                    conn.execute("SELECT pg_sleep(60)")
                    outcome.append("finished")
                except psycopg.errors.QueryCanceled:
                    outcome.append("cancelled")
                except Exception as e:
                    outcome.append(repr(e))

            t = threading.Thread(target=run)
            t.start()
            pid = conn.info.backend_pid
            wait_for(lambda: "pg_sleep(60)" in str(_active_queries(proxy)), what="the query running")
            conn.cancel()  # a new connection: either worker accepts it
            t.join(30)
            assert outcome == ["cancelled"], (attempt, pid, outcome)
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
            if wait_for_count(proxy, "passed on by another worker", before):
                routed += 1
            else:
                local += 1
            if routed and local:
                break
        assert routed and local, (routed, local)
    finally:
        for conns in by_worker.values():
            for c in conns:
                c.close()


def _active_queries(proxy):
    with proxy.connect() as c:
        return c.execute("SELECT query FROM pg_stat_activity WHERE usename = %s AND state = 'active'",
                         (USER,)).fetchall()


def wait_for_count(proxy, needle, before, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.log().count(needle) > before:
            return True
        time.sleep(0.05)
    return False


def test_a_killed_worker_is_restarted_and_only_its_clients_are_cut(workers_proxy):
    proxy = workers_proxy
    by_worker = connect_on_both(proxy, per_worker=2)
    try:
        victim = health(proxy)["workers"][0]
        restarts = victim["restarts"]
        survivor_tx = by_worker[1][0]
        survivor_tx.execute("BEGIN")
        survivor_tx.execute("SELECT 1")
        os.kill(victim["pid"], signal.SIGKILL)
        for conn in by_worker[0]:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        # The other worker's sessions never noticed, even inside a transaction.
        assert survivor_tx.execute("SELECT 2").fetchone() == (2,)
        survivor_tx.execute("COMMIT")
        assert by_worker[1][1].execute("SELECT 3").fetchone() == (3,)
        wait_for(lambda: (lambda h: h["status"] == "ok" and h["workers"][0]["restarts"] == restarts + 1
                          and h["workers"][0]["pid"] != victim["pid"])(health(proxy)),
                 timeout=STARTUP, what="worker 0 restarted")
        fresh = connect_on_both(proxy)
        for conns in fresh.values():
            for c in conns:
                assert c.execute("SELECT 4").fetchone() == (4,)
                c.close()
        assert "worker 0 (pid %d) died" % victim["pid"] in proxy.log()
    finally:
        for conns in by_worker.values():
            for c in conns:
                c.close()


def test_sighup_reaches_every_worker(workers_proxy):
    proxy = workers_proxy
    path = Path(proxy.config_path)
    data = yaml.safe_load(path.read_text())
    group = data["DBProxies"][0]["TargetGroups"][0]["ConnectionPoolConfig"]
    try:
        group["MaxConnectionsPercent"] = 7
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        proxy.proc.send_signal(signal.SIGHUP)
        # 7 = 4 + 3: both workers applied it (the figure is their shares summed).
        wait_for(lambda: health(proxy)["proxies"]["test-pg"]["max_database_connections"] == 7,
                 what="both workers reloaded")
    finally:
        group["MaxConnectionsPercent"] = CAP
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: health(proxy)["proxies"]["test-pg"]["max_database_connections"] == CAP,
                 what="both workers reloaded back")


def test_an_api_change_reaches_every_worker(workers_proxy):
    import boto3
    from botocore.config import Config
    rds = boto3.client("rds", endpoint_url=f"http://127.0.0.1:{workers_proxy.admin_port}",
                       region_name="us-east-1", aws_access_key_id=API_KEY[0],
                       aws_secret_access_key=API_KEY[1], config=Config(retries={"max_attempts": 1}))
    try:
        rds.modify_db_proxy_target_group(DBProxyName="test-pg", TargetGroupName="default",
                                         ConnectionPoolConfig={"MaxConnectionsPercent": 9})
        # 9 = 5 + 4: the worker that served the call and the other one (reloaded) both apply it.
        wait_for(lambda: health(workers_proxy)["proxies"]["test-pg"]["max_database_connections"] == 9,
                 what="the change in both workers")
        group = rds.describe_db_proxy_target_groups(DBProxyName="test-pg")["TargetGroups"][0]
        assert group["ConnectionPoolConfig"]["MaxConnectionsPercent"] == 9
    finally:
        rds.modify_db_proxy_target_group(DBProxyName="test-pg", TargetGroupName="default",
                                         ConnectionPoolConfig={"MaxConnectionsPercent": CAP})
        wait_for(lambda: health(workers_proxy)["proxies"]["test-pg"]["max_database_connections"] == CAP,
                 what="the change undone in both workers")


def test_the_console_and_describe_sessions_answer_for_every_worker(workers_proxy):
    proxy = workers_proxy
    by_worker = connect_on_both(proxy, per_worker=1)
    conns = by_worker[0] + by_worker[1]
    conns += [proxy.connect() for _ in range(24 - len(conns))]  # more than one page of 20
    try:
        pinned = [by_worker[0][0], by_worker[1][0]]  # one pinned session in each worker
        for conn in pinned:
            conn.execute("SET application_name = 'secret-app-name'")
        for conn in conns:
            conn.execute("SELECT 1")
        ids = {c.info.backend_pid for c in conns}
        assert {i % 2 for i in ids} == {0, 1}
        rds = sessions_client(proxy.admin_port, API_KEY)
        found = all_sessions(rds, DBProxyName="test-pg")
        assert sorted(s["SessionId"] for s in found) == sorted(ids)  # every worker's, once each
        assert [s["CreatedDate"] for s in found] == sorted(s["CreatedDate"] for s in found)
        only = rds.describe_db_proxy_sessions(DBProxyName="test-pg", Pinned=True)["DBProxySessions"]
        assert sorted(s["SessionId"] for s in only) == sorted(c.info.backend_pid for c in pinned)
        assert {s["PinStatement"] for s in only} == {"SET application_name = ?"}
        assert all(s["DatabaseConnection"]["BackendId"] for s in only)
        first = rds.describe_db_proxy_sessions(DBProxyName="test-pg", MaxRecords=20)
        assert len(first["DBProxySessions"]) == 20 and first["Marker"]
        # A request the workers refuse is refused once, in the API's own words.
        with pytest.raises(Exception) as refused:
            rds.describe_db_proxy_sessions(DBProxyName="no-such-proxy")
        assert "DBProxyNotFoundFault" in str(refused.value)
        wrong = sessions_client(proxy.admin_port, (API_KEY[0], "not-the-secret-key-0"))
        with pytest.raises(Exception) as refused:
            wrong.describe_db_proxy_sessions(DBProxyName="test-pg")
        assert "SignatureDoesNotMatch" in str(refused.value)
        with pytest.raises(Exception) as refused:
            rds.describe_db_proxy_sessions(DBProxyName="test-pg", Marker="bm90LWFuLW9mZnNldA==")
        assert "InvalidParameterValue" in str(refused.value)
        # The console: every worker's figures and pinned sessions.
        status, text = _get(proxy.admin_port, "/console/data.json")
        assert status == 200, text
        data = json.loads(text)
        [view] = [p for p in data["proxies"] if p["name"] == "test-pg"]
        assert view["figures"]["client_connections"] == len(conns), view["figures"]
        assert sorted(s["SessionId"] for s in view["pinnedSessions"]) == \
            sorted(c.info.backend_pid for c in pinned)
        assert "secret" not in text
        # Each worker's share of the cap (3 and 2) adds up to the proxy's cap.
        assert [i["value"] for i in view["figures"]["max_database_connections_allowed"]] == [CAP]
        assert [w["index"] for w in data["workers"]] == [0, 1] and all(w["up"] for w in data["workers"])
        assert view["borrowLatency"]["count"] >= len(conns)
        status, page = _get(proxy.admin_port, "/console")
        assert status == 200 and "<html" in page.lower()
    finally:
        for c in conns:
            c.close()


def _line_of(log, text):
    """The first line of *log* holding *text* that says the worker is listening, else ''."""
    return next((line for line in log.splitlines() if text in line and "is listening" in line), "")


def _config_with_workers(tmp_path, pg_server, port, **top):
    config = write_proxy_config(tmp_path, pg_server, listen=f"tcp:{port}:interface=127.0.0.1",
                                secrets={ARN: (USER, PASSWORD, "POSTGRES_SCRAM_SHA_256")},
                                MaxConnectionsPercent=CAP)
    data = yaml.safe_load(Path(config).read_text())
    data.update(Workers=2, **top)
    Path(config).write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def test_a_busy_port_stops_the_start_with_the_address(workers_proxy, pg_server, tmp_path):
    import socket
    import subprocess
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = _config_with_workers(tmp_path, pg_server, port)
        out = subprocess.run([TwistdProxy.twistd(), "-n", "--pidfile=", "rdsproxy", "--config", config],
                             capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 1, out
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in out.stdout + out.stderr, out
    assert "worker 0 started" not in out.stdout  # nothing was started


def test_sigterm_drains_every_worker(workers_proxy, pg_server, tmp_path):
    port = find_free_port()
    proxy = TwistdProxy(_config_with_workers(tmp_path, pg_server, port, DrainTimeout=20), port).start(
        timeout=STARTUP)
    dsn = workers_proxy.dsn.replace(f"port={workers_proxy.port}", f"port={port}")
    proxy.dsn = dsn
    proxy.admin_port = None
    conns = []
    try:
        # the port answers once one worker listens: wait for both before spreading sessions
        wait_for(lambda: all(_line_of(proxy.log(), f"worker {w} (pid") for w in (0, 1)),
                 timeout=STARTUP, what="both workers listening")
        conns = [psycopg.connect(dsn, autocommit=True, prepare_threshold=None) for _ in range(24)]
        assert {owner(c) for c in conns} == {0, 1}
        in_tx = [next(c for c in conns if owner(c) == w) for w in (0, 1)]
        for c in in_tx:
            c.execute("BEGIN")
            c.execute("SELECT 1")
        proxy.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: all(f"worker {w}: Received SIGTERM, draining" in proxy.log() for w in (0, 1)),
                 what="both workers draining")
        # Open transactions finish on both workers; idle sessions get the shutdown error.
        for c in in_tx:
            assert c.execute("SELECT 2").fetchone() == (2,)
            c.execute("COMMIT")
        assert proxy.proc.wait(60) == 0, proxy.log()
        for c in conns:
            with pytest.raises(psycopg.OperationalError):
                c.execute("SELECT 3")
        log = proxy.log()
        assert log.count("exited (status 0)") == 2, log
        assert "Traceback" not in log, log
    finally:
        for c in conns:
            c.close()
        proxy.stop()


# -- --uid / --gid ---------------------------------------------------------------------------------

NOBODY = 65534


def _reachable_by_others(path):
    """Whether a user who is neither owner nor in the group can reach and run *path*."""
    path = Path(os.path.realpath(path))
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents]) and bool(path.stat().st_mode & 0o004)


def _interpreter_for_nobody():
    """-> (interpreter, PYTHONPATH) an unprivileged user can run with this venv's packages, or
    None.  The workers are started with the supervisor's own interpreter after it dropped its
    privileges: a venv whose base interpreter lives in a private home cannot be run by them."""
    import sysconfig
    site = sysconfig.get_paths()["purelib"]
    repo = str(Path(__file__).resolve().parents[2])
    if not (_reachable_by_others(site) and _reachable_by_others(repo)):
        return None
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version) or "", f"/usr/bin/{version}"):
        if candidate and os.path.exists(candidate) and _reachable_by_others(candidate):
            return candidate, os.pathsep.join([repo, site])
    return None


def _uid_of(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(x) for x in next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]]


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a port below 1024 then dropping privileges needs root")
def test_uid_with_workers_privileged_port_handed_down(pg_server):
    _role(pg_server)
    """`twistd --uid nobody` with `Workers: 2` on a port below 1024: the supervisor binds it as
    root, twistd drops privileges, and the workers (running as nobody) accept on the socket the
    supervisor hands them; both serve, and a killed worker comes back on the same socket."""
    found = _interpreter_for_nobody()
    if found is None:
        pytest.skip("no Python interpreter with this venv's packages that an unprivileged user can run "
                    "(the venv's base interpreter is in a private directory)")
    python, pythonpath = found
    port = free_privileged_port()
    folder = Path(tempfile.mkdtemp(prefix="rdsproxy-uid-"))  # readable by the dropped user
    try:
        config = _config_with_workers(folder, pg_server, port)
        for path in [folder, *folder.iterdir()]:
            os.chown(path, NOBODY, NOBODY)
        os.chmod(folder, 0o755)
        os.chmod(folder / "secrets.json", 0o600)
        log_path = folder / "twistd.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [python, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                 f"--uid={NOBODY}", f"--gid={NOBODY}", "rdsproxy", "--config", config],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(folder),
                env=dict(os.environ, PYTHONPATH=pythonpath), start_new_session=True)
        text = lambda: log_path.read_text(errors="replace")  # noqa: E731
        try:
            wait_for(lambda: text().count("is listening") >= 2 or proc.poll() is not None,
                     timeout=STARTUP, what="both workers listening")
            assert proc.poll() is None, text()
            assert "handed down by the supervisor" in text()
            pids = {int(i): int(p) for i, p in re.findall(r"worker (\d) started \(pid (\d+)\)", text())}
            assert _uid_of(proc.pid)[:2] == [NOBODY, NOBODY]
            assert all(_uid_of(pid) == [NOBODY] * 4 for pid in pids.values()), pids  # no way back to root
            dsn = (f"host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname=appdb "
                   f"sslmode=disable connect_timeout=10")

            def served_by_both():
                seen = set()
                for _ in range(64):
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        assert conn.execute("SELECT 1").fetchone() == (1,)
                        seen.add(conn.info.backend_pid % 2)
                    if seen == {0, 1}:
                        return seen
                return seen

            assert served_by_both() == {0, 1}
            os.kill(pids[0], signal.SIGKILL)
            wait_for(lambda: len(re.findall(r"worker 0 started", text())) == 2
                     and text().count("is listening") >= 3, timeout=STARTUP, what="worker 0 restarted")
            assert served_by_both() == {0, 1}  # the restarted worker adopted the same socket
        finally:
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(60)
        assert status == 0, text()
        assert "Traceback" not in text(), text()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
