"""`Workers: 2` in front of MariaDB (`twistd -n rdsproxy`): `Listen: tcp:0` gets one port shared
by both workers, connection ids are unique over the workers and name the worker, `KILL QUERY` and
`KILL CONNECTION` reach the session whichever worker the KILL comes from, and an id of the other
worker's range that it does not hold gets 1094, never passed to the database as a thread id."""

import json
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pymysql
import pytest
import yaml

try:
    from mysql_harness import kill_connection_ends_only_the_victim, write_mysql_config
    from proxyutil import TwistdProxy, all_sessions, find_free_port, sessions_client
except ImportError:
    from tests.integration.mysql_harness import kill_connection_ends_only_the_victim, write_mysql_config
    from tests.integration.proxyutil import TwistdProxy, all_sessions, find_free_port, sessions_client

LISTENING = re.compile(r"worker (\d): proxy test-mysql \(MYSQL\) listening on .*port=(\d+)\)")


class AnyPortProxy(TwistdProxy):
    """twistd with `Listen: tcp:0`: ready once every worker logged the port it listens on."""

    def start(self, timeout=120):  # two workers import the whole proxy; bounded for loaded machines
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.twistd(), "-n", "--pidfile=", "rdsproxy", "--config", self.config_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(Path(self.config_path).parent), start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log()
            found = dict(LISTENING.findall(self.log()))
            if len(found) == 2:
                self.ports = set(found.values())
                self.port = int(found["0"])
                return self
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)


@pytest.fixture(scope="module")
def mysql_workers(mariadb_server, tmp_path_factory):
    config = write_mysql_config(tmp_path_factory.mktemp("myworkers"), mariadb_server,
                                MaxConnectionsPercent=10)
    data = yaml.safe_load(Path(config).read_text())
    data["Workers"] = 2
    data["DrainTimeout"] = 5
    admin = find_free_port()
    data["Admin"] = {"Listen": f"tcp:{admin}:interface=127.0.0.1", "AllowUnauthenticatedLoopbackReads": True}
    Path(config).write_text(yaml.safe_dump(data, sort_keys=False))
    proxy = AnyPortProxy(config, None).start()
    proxy.admin_port = admin
    try:
        yield proxy
    finally:
        assert proxy.stop(timeout=60) == 0, proxy.log()
        assert "Traceback" not in proxy.log(), proxy.log()
        assert "Starting factory" not in proxy.log(), proxy.log()  # passed-on KILLs, admin fetches


def connect(proxy, server):
    return pymysql.connect(host="127.0.0.1", port=proxy.port, user="app_native",
                           password=server.users["app_native"], database=server.app_db,
                           autocommit=True, connect_timeout=10)


def on_both(proxy, server, per_worker=2, limit=64):
    by_worker, spare = {0: [], 1: []}, []
    for _ in range(limit):
        conn = connect(proxy, server)
        worker = conn.thread_id() % 2
        (by_worker[worker] if len(by_worker[worker]) < per_worker else spare).append(conn)
        if all(len(c) >= per_worker for c in by_worker.values()):
            break
    for conn in spare:
        conn.close()
    assert all(len(c) >= per_worker for c in by_worker.values()), by_worker
    return by_worker


def test_port_zero_is_one_port_for_every_worker(mysql_workers, mariadb_server):
    assert len(mysql_workers.ports) == 1, mysql_workers.ports
    with connect(mysql_workers, mariadb_server).cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


def _sleep_and_kill(victim, killer):
    result = {}

    def sleeper():
        with victim.cursor() as cur:
            try:
                cur.execute("SELECT SLEEP(30)")
                result["value"] = cur.fetchone()[0]
            except pymysql.err.OperationalError as e:
                result["error"] = e.args[0]

    t = threading.Thread(target=sleeper)
    t.start()
    try:
        deadline = time.monotonic() + 20
        with killer.cursor() as cur:
            while True:  # until SLEEP runs on the server (its thread is then known)
                cur.execute("SELECT count(*) FROM information_schema.processlist "
                            "WHERE info = 'SELECT SLEEP(30)'")
                if cur.fetchone()[0]:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.05)
            cur.execute("KILL QUERY %d" % victim.thread_id())
        t.join(30)
    finally:
        t.join(30)
    # interrupted: SLEEP returns 1, or the server reports the query killed (1317)
    assert result.get("value") == 1 or result.get("error") == 1317, result
    with victim.cursor() as cur:  # the session goes on
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone() == (42,)


def test_kill_reaches_the_session_whichever_worker_sends_it(mysql_workers, mariadb_server):
    by_worker = on_both(mysql_workers, mariadb_server, per_worker=3)
    try:
        ids = [c.thread_id() for conns in by_worker.values() for c in conns]
        assert len(set(ids)) == len(ids)
        _sleep_and_kill(by_worker[0][0], by_worker[0][1])  # same worker
        _sleep_and_kill(by_worker[0][0], by_worker[1][0])  # from the other worker
        _sleep_and_kill(by_worker[1][0], by_worker[0][1])  # ... and the other way round
        # KILL CONNECTION from the other worker ends that session only.
        victim, killer = by_worker[1][2], by_worker[0][2]
        kill_connection_ends_only_the_victim(killer, victim)
        assert f"KILL CONNECTION <session test-mysql#{victim.thread_id()} " in mysql_workers.log()
        # An id of worker 1's range that it does not hold: the server's error, nothing sent on.
        unknown = max(ids) + 1001 if (max(ids) + 1001) % 2 == 1 else max(ids) + 1002
        with pytest.raises(pymysql.err.OperationalError) as refused:
            with killer.cursor() as cur:
                cur.execute("KILL QUERY %d" % unknown)
        assert refused.value.args == (1094, f"Unknown thread id: {unknown}"), refused.value
    finally:
        for conns in by_worker.values():
            for c in conns:
                c.close()


def test_describe_sessions_and_the_console_answer_for_both_workers(mysql_workers, mariadb_server):
    by_worker = on_both(mysql_workers, mariadb_server, per_worker=2)
    conns = by_worker[0] + by_worker[1]
    try:
        pinned = [by_worker[0][0], by_worker[1][0]]
        for conn in pinned:
            with conn.cursor() as cur:
                cur.execute("SET @token = 'secret-token'")  # a user variable pins the session
        ids = sorted(c.thread_id() for c in conns)
        rds = sessions_client(mysql_workers.admin_port)  # unsigned: loopback reads are allowed
        found = all_sessions(rds, DBProxyName="test-mysql")
        assert sorted(s["SessionId"] for s in found) == ids
        assert {s["SessionId"] % 2 for s in found} == {0, 1}
        only = rds.describe_db_proxy_sessions(DBProxyName="test-mysql", Pinned=True)["DBProxySessions"]
        assert sorted(s["SessionId"] for s in only) == sorted(c.thread_id() for c in pinned)
        assert {s["PinStatement"] for s in only} == {"SET @token = ?"}
        with urllib.request.urlopen(f"http://127.0.0.1:{mysql_workers.admin_port}/console/data.json",
                                    timeout=15) as r:
            text = r.read().decode()
        assert "secret" not in text
        [view] = json.loads(text)["proxies"]
        assert view["figures"]["client_connections"] == len(conns)
        assert sorted(s["SessionId"] for s in view["pinnedSessions"]) == sorted(c.thread_id() for c in pinned)
    finally:
        for conn in conns:
            conn.close()
