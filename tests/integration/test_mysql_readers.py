"""A READ_ONLY proxy endpoint on real MariaDB GTID replication: a primary and two read-only
replicas behind one proxy.

Reads through the reader endpoint run on the replicas (@@read_only is 1), spread over both; a
write there gets the server's own read-only error (1290), unchanged; a replica stopped while
sessions are using the endpoint is left out and those sessions go on, on the other replica, over
the same client connections.  A replica that vanishes (SIGSTOP) while a reader session's
statement runs there: the statement ends with 2013 within the proxy's vanished-target bound and
the same client connection goes on on the other replica.  The default (writer) endpoint takes
writes the whole time.  At the end, `make demo`'s MySQL failover (scripts/demo.py failover mysql)
switches the writer over and back under the proxy.
"""

import os
import signal
import threading
import time

import pymysql  # test extras: a missing driver must fail, not skip
import pytest

from txrdsproxy.failover.monitor import WriterMonitor

try:
    from failover_util import in_thread
    from proxyutil import InProcessProxy, write_config
except ImportError:  # tests/ became a package
    from tests.integration.failover_util import in_thread
    from tests.integration.proxyutil import InProcessProxy, write_config

NATIVE_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_native"
READER = "test-mysql-ro"
QUERY = "SELECT @@read_only, @@port"


def _readers(proxy):
    return proxy.call(lambda: [t.rds_resource_id for t in proxy.ctx.readers.eligible()])


def _endpoint_port(proxy, name):
    def read():
        runtime = proxy.service.registry.get(proxy.ctx.name)
        return runtime.endpoints.get(name).port.getHost().port
    return proxy.call(read)


def _connect(server, port):
    return pymysql.connect(host="127.0.0.1", port=port, user="app_native",
                           password=server.users["app_native"], database="appdb", autocommit=True)


def _one(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def _load_demo():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _borrowed_on(proxy, index):
    """Connections of target *index*'s replica pool lent to a session now."""
    def count():
        pool = proxy.ctx.replica_pools.existing(proxy.ctx.topology.targets[index])
        return 0 if pool is None else sum(str(c.state) == "borrowed" for c in pool.connections())
    return proxy.call(count)


def test_mysql_reader_endpoint_reads_on_replicas_and_survives_a_stopped_one(
        mariadb_replication_factory, tmp_path):
    primary, (r1, r2) = mariadb_replication_factory(replicas=2)
    targets = [{"RdsResourceId": f"mariadb-{i}", "Endpoint": s.host, "Port": s.port}
               for i, s in enumerate((primary, r1, r2), 1)]
    (tmp_path / "proxy").mkdir()
    config = write_config(tmp_path / "proxy", "MYSQL", "test-mysql", "tcp:0:interface=127.0.0.1",
                          {NATIVE_ARN: ("app_native", primary.users["app_native"], "MYSQL_NATIVE_PASSWORD")},
                          targets, {"HealthCheckInterval": 1, "Endpoints": [
                              {"DBProxyEndpointName": READER, "TargetRole": "READ_ONLY",
                               "Listen": "tcp:0:interface=127.0.0.1"}]})
    proxy = InProcessProxy(config)
    try:
        _run(proxy, primary, r1, r2)
    finally:
        proxy.stop()


def _run(proxy, primary, r1, r2):
    proxy.wait_for(lambda: _readers(proxy) == ["mariadb-2", "mariadb-3"],
                   what="both replicas in the reader set")
    reader_port = _endpoint_port(proxy, READER)
    writer = _connect(primary, proxy.port)
    _one(writer, "CREATE TABLE t (x int)")
    assert _one(writer, QUERY) == (0, primary.port)

    stop_writing = threading.Event()
    written, write_errors = [], []

    def write_load():
        conn = _connect(primary, proxy.port)
        try:
            i = 0
            while not stop_writing.is_set():
                i += 1
                try:
                    _one(conn, "INSERT INTO t VALUES (%s)", (i,))
                    written.append(i)
                except Exception as e:  # reported below
                    write_errors.append(e)
                    return
                time.sleep(0.005)
        finally:
            conn.close()

    loader = threading.Thread(target=write_load, daemon=True)
    loader.start()
    sessions = [_connect(primary, reader_port) for _ in range(6)]
    try:
        # Spread over both replicas.  A health check that times out on a loaded machine takes a
        # replica out for a round: read again (up to 10 rounds of 18) once both are back.
        seen = []
        for _ in range(10):
            proxy.wait_for(lambda: _readers(proxy) == ["mariadb-2", "mariadb-3"],
                           what="both replicas in the reader set")
            seen += [_one(s, QUERY) for s in sessions for _ in range(3)]
            if {row[1] for row in seen} == {r1.port, r2.port}:
                break
        assert {row[0] for row in seen} == {1}
        assert {row[1] for row in seen} == {r1.port, r2.port}

        # A write through the reader endpoint: the replica's own error, unchanged.
        with pytest.raises(pymysql.err.OperationalError) as through_proxy:
            _one(sessions[0], "INSERT INTO t VALUES (-1)")
        direct = _connect(r1, r1.port)
        try:
            with pytest.raises(pymysql.err.OperationalError) as from_replica:
                _one(direct, "INSERT INTO t VALUES (-1)")
        finally:
            direct.close()
        assert through_proxy.value.args == from_replica.value.args
        assert through_proxy.value.args[0] == 1290
        assert _one(sessions[0], QUERY)[0] == 1

        # A transaction through the reader endpoint stays on one replica until it ends.
        sessions[1].begin()
        first = _one(sessions[1], QUERY)
        assert all(_one(sessions[1], QUERY) == first for _ in range(4))
        sessions[1].commit()

        # r2 vanishes (SIGSTOP: its connections stay open) while a reader session's statement
        # runs there: 2013 within the bound, and the same client connection goes on, on r1.
        on_r2 = f"SELECT IF(@@port = {r2.port}, SLEEP(600), 0)"
        victim = None
        for session in sessions:  # ties are taken in turn: one of the first two lands on r2
            thread, outcome = in_thread(lambda session=session: _one(session, on_r2))
            proxy.wait_for(lambda: outcome or _borrowed_on(proxy, 2) == 1, what="the statement to run")
            if _borrowed_on(proxy, 2) == 1 and not outcome:
                victim = session
                break
            thread.join(10)
        assert victim is not None, "no statement landed on r2"
        monitor = proxy.ctx.monitor
        bound = WriterMonitor.VANISHED_AFTER * (monitor.interval + monitor.probe_timeout) + 30.0
        os.killpg(r2.proc.pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            thread.join(bound)
            assert not thread.is_alive(), f"no error within {bound:g} s of the replica vanishing"
            (kind, error, at), = outcome
            assert kind == "error" and isinstance(error, pymysql.err.OperationalError), outcome
            assert error.args == (2013, "Lost connection to the database during the command"), error.args
            print(f"\nMySQL: statement on a vanished replica failed after {at - stopped_at:.1f} s"
                  f" (HealthCheckInterval {monitor.interval:g} s)")
            assert [_one(victim, QUERY) for _ in range(3)] == [(1, r1.port)] * 3
            assert {_one(s, QUERY) for s in sessions} == {(1, r1.port)}
        finally:
            os.killpg(r2.proc.pid, signal.SIGCONT)
        proxy.wait_for(lambda: _readers(proxy) == ["mariadb-2", "mariadb-3"],
                       what="the replica to come back", timeout=30)

        r2.stop()
        proxy.wait_for(lambda: _readers(proxy) == ["mariadb-2"],
                       what="the stopped replica to leave the set")
        after = [_one(s, QUERY) for s in sessions for _ in range(3)]
        assert after == [(1, r1.port)] * len(after)  # same client connections, other replica

        stop_writing.set()
        loader.join(10)
        assert not write_errors, write_errors
        assert written
        r1.sync_with(primary)
        assert _one(sessions[2], "SELECT count(*) FROM t WHERE x > 0") == (len(written),)
        writer_targets = proxy.call(lambda: {c.target.rds_resource_id for c in proxy.ctx.pool.connections()})
        assert writer_targets == {"mariadb-1"}

        # Replica lag (Seconds_Behind_Master): a bound set live; r1's SQL thread is held by a
        # global read lock while the primary writes, so it falls behind and leaves the set with
        # the reason in TargetHealth; unlocked, it catches up and comes back.
        proxy.call(proxy.service.registry.modify_proxy, proxy.ctx.name, max_replica_lag=1.0)
        lock = pymysql.connect(host="127.0.0.1", port=r1.port, user="root", password=r1.root_password,
                               autocommit=True)
        try:
            _one(lock, "FLUSH TABLES WITH READ LOCK")
            _one(writer, "INSERT INTO t VALUES (-2)")
            proxy.wait_for(lambda: _readers(proxy) == [], what="the held replica to leave the set",
                           timeout=20)
            record = proxy.call(lambda: proxy.ctx.health.health_of(proxy.ctx.topology.targets[1]))
            assert (record.state, record.reason) == ("UNAVAILABLE", "INVALID_REPLICATION_STATE")
            assert "exceeds MaxReplicaLag 1 s" in record.description
            with pytest.raises(pymysql.err.OperationalError) as refused:
                _one(sessions[0], QUERY)  # no replica left and no FallbackToWriter
            assert refused.value.args == (
                1105, "No healthy read replica is available for proxy endpoint test-mysql-ro")
        finally:
            _one(lock, "UNLOCK TABLES")
            lock.close()
        proxy.wait_for(lambda: _readers(proxy) == ["mariadb-2"], what="the replica to catch up",
                       timeout=20)
        assert _one(sessions[0], QUERY) == (1, r1.port)

        # `make demo`'s MySQL failover (scripts/demo.py failover mysql: a switchover, from the
        # state the demo writes) under this proxy, there and back: the writer endpoint's same
        # client connection answers from the new writer each time, with no reconnect.
        demo = _load_demo()
        state = {"mysql": {"servers": [demo._maria_state(primary), demo._maria_state(r1)]}}
        demo.failover_mysql(state)
        proxy.wait_for(lambda: _one(writer, "SELECT @@port, @@read_only") == (r1.port, 0),
                       what="the writer session on the promoted replica", timeout=30)
        _one(writer, "INSERT INTO t VALUES (-5)")
        demo.failover_mysql(state)  # and back, as the demo's tour suggests
        proxy.wait_for(lambda: _one(writer, "SELECT @@port, @@read_only") == (primary.port, 0),
                       what="the writer session back on the first writer", timeout=30)
        assert _one(writer, "SELECT count(*) FROM t WHERE x = -5") == (1,)
    finally:
        stop_writing.set()
        for s in sessions:
            s.close()
        writer.close()
