"""A READ_ONLY proxy endpoint on real PostgreSQL replication: a primary and two streaming
standbys behind one proxy.

Reads through the reader endpoint run on the standbys (pg_is_in_recovery() is true), spread over
both; a write there gets PostgreSQL's own read-only error, unchanged; a standby stopped while
sessions are using the endpoint is left out and those sessions go on, on the other standby, over
the same client connections; it rejoins once it is back.  The default (writer) endpoint takes
writes the whole time.
"""

import threading
import time

import psycopg  # test extras: a missing driver must fail, not skip
import pytest

try:
    from failover_util import pg_replicated, wait_replicated
except ImportError:
    from tests.integration.failover_util import pg_replicated, wait_replicated

READER = "test-pg-ro"
QUERY = "SELECT pg_is_in_recovery(), inet_server_port()"


def _endpoint_port(proxy, name):
    def read():
        runtime = proxy.service.registry.get(proxy.ctx.name)
        return runtime.endpoints.get(name).port.getHost().port
    return proxy.call(read)


def _readers(proxy):
    return proxy.call(lambda: [t.rds_resource_id for t in proxy.ctx.readers.eligible()])


@pytest.fixture
def replicated(pg_server_factory, tmp_path):
    with pg_replicated(pg_server_factory, tmp_path, "reader-pass", standbys=2) as (primary, standbys):
        yield primary, standbys


def test_pg_reader_endpoint_reads_on_standbys_and_survives_a_stopped_one(replicated, pg_proxy_factory):
    primary, (s1, s2) = replicated
    proxy = pg_proxy_factory(server=primary, targets=[primary, s1, s2], HealthCheckInterval=1,
                             Endpoints=[{"DBProxyEndpointName": READER, "TargetRole": "READ_ONLY",
                                         "Listen": "tcp:0:interface=127.0.0.1"}])
    proxy.wait_for(lambda: _readers(proxy) == ["pg-2", "pg-3"], what="both standbys in the reader set")
    reader_dsn = proxy.dsn(primary).replace(f"port={proxy.port}", f"port={_endpoint_port(proxy, READER)}")

    writer = psycopg.connect(proxy.dsn(primary), autocommit=True)
    writer.execute("CREATE TABLE t (x int)")
    assert writer.execute(QUERY).fetchone() == (False, primary.port)
    # Both standbys have replayed the CREATE before anything reads t through them (else a write
    # there fails with "relation does not exist", not with the read-only error).
    proxy.wait_for(lambda: all(s.psql("SELECT to_regclass('public.t') IS NOT NULL", dbname="appdb").strip() == "t"
                               for s in (s1, s2)), interval=0.2, what="the standbys to replay CREATE TABLE t")

    # The writer endpoint is written to for the whole test, from its own thread.
    stop_writing = threading.Event()
    written, write_errors = [], []

    def write_load():
        with psycopg.connect(proxy.dsn(primary), autocommit=True) as conn:
            i = 0
            while not stop_writing.is_set():
                i += 1
                try:
                    conn.execute("INSERT INTO t VALUES (%s)", (i,))
                    written.append(i)
                except Exception as e:  # reported below
                    write_errors.append(e)
                    return
                time.sleep(0.005)

    loader = threading.Thread(target=write_load, daemon=True)
    loader.start()
    # prepare_threshold=None: psycopg would prepare a statement run 5 times, which pins the
    # session to its standby for good (pinned sessions are not moved).
    sessions = [psycopg.connect(reader_dsn, autocommit=True, prepare_threshold=None) for _ in range(6)]
    try:
        # Each endpoint reports its own servers' parameters: a standby's in_hot_standby to the
        # reader sessions, the writer's to the writer's (libpq's target_session_attrs reads them).
        assert {s.info.parameter_status("in_hot_standby") for s in sessions} == {"on"}
        assert writer.info.parameter_status("in_hot_standby") == "off"
        with psycopg.connect(proxy.dsn(primary), target_session_attrs="read-write") as again:
            assert again.execute(QUERY).fetchone() == (False, primary.port)
        with psycopg.connect(reader_dsn, target_session_attrs="read-only") as again:
            assert again.execute(QUERY).fetchone()[0] is True

        # Reads land on the standbys, spread over both.
        seen = [s.execute(QUERY).fetchone() for s in sessions for _ in range(3)]
        assert {row[0] for row in seen} == {True}
        assert {row[1] for row in seen} == {s1.port, s2.port}

        # The replicas' connections and caps are in the proxy's figures (/metrics), per target.
        from txrdsproxy.metrics.collector import proxy_figures
        figures = proxy.call(proxy_figures, proxy.ctx)
        per_target = {labels[2]: value for family, labels, value in figures
                      if family == "database_connections"}
        assert per_target.get("pg-2", 0) >= 1 and per_target.get("pg-3", 0) >= 1
        caps = {labels[2]: value for family, labels, value in figures
                if family == "max_database_connections_allowed"}
        assert caps.get("pg-2") == caps.get("pg-3") == 30  # 100% of each standby's max_connections

        # A write through the reader endpoint gets PostgreSQL's read-only error, as the standby
        # itself answers it; the session goes on.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as through_proxy:
            sessions[0].execute("INSERT INTO t VALUES (-1)")
        with psycopg.connect(host=s1.host, port=s1.port, user="app_scram", password="reader-pass",
                             dbname="appdb", autocommit=True) as direct:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as from_standby:
                direct.execute("INSERT INTO t VALUES (-1)")
        assert str(through_proxy.value) == str(from_standby.value)
        assert through_proxy.value.sqlstate == "25006"
        assert sessions[0].execute(QUERY).fetchone()[0] is True

        # A transaction through the reader endpoint stays on one standby until it ends.
        with sessions[1].transaction():
            first = sessions[1].execute(QUERY).fetchone()
            assert all(sessions[1].execute(QUERY).fetchone() == first for _ in range(4))

        # s2 stops while the sessions are in use (between their transactions).
        s2.stop()
        proxy.wait_for(lambda: _readers(proxy) == ["pg-2"], what="the stopped standby to leave the set")
        after = [s.execute(QUERY).fetchone() for s in sessions for _ in range(3)]
        assert after == [(True, s1.port)] * len(after)  # same client connections, other standby
        counts = proxy.call(lambda: {t.rds_resource_id: len(p.connections()) for t, p in
                                     proxy.ctx.replica_pools._pools.items()})
        assert counts.get("pg-3", 0) == 0
        proxy.wait_for(lambda: proxy.call(
            lambda: proxy.ctx.health.health_of(proxy.ctx.topology.targets[2]).state) == "UNAVAILABLE",
            what="TargetHealth of the stopped standby", timeout=10)

        # It comes back and rejoins the reader set.
        s2.start()
        proxy.wait_for(lambda: _readers(proxy) == ["pg-2", "pg-3"], what="the standby to rejoin",
                       timeout=20)
        again = {s.execute(QUERY).fetchone()[1] for s in sessions for _ in range(2)}
        assert again == {s1.port, s2.port}

        # The writer endpoint never failed, and its pool holds connections to the primary only.
        stop_writing.set()
        loader.join(10)
        assert not write_errors, write_errors
        assert written
        wait_replicated(s1, "SELECT count(*) FROM t WHERE x > 0", str(len(written)))
        writer_targets = proxy.call(lambda: {c.target.rds_resource_id for c in proxy.ctx.pool.connections()})
        assert writer_targets == {"pg-1"}

        # Replica lag: a bound set live; s1 stops replaying while the primary writes, so its lag
        # (now - its last replayed transaction) grows past the bound: it leaves the set with the
        # reason in TargetHealth, and comes back once it has caught up.  An idle primary gives
        # no lag (s2 replayed everything it received).
        runtime = proxy.call(proxy.service.registry.modify_proxy, proxy.ctx.name, max_replica_lag=1.0)
        assert runtime.config.max_replica_lag == 1.0
        time.sleep(1.5)  # the primary idles past the bound: lag stays 0 on both standbys
        proxy.wait_for(lambda: proxy.call(lambda: proxy.ctx.monitor.rounds) >= 2, what="rounds")
        assert _readers(proxy) == ["pg-2", "pg-3"]
        s1.psql("SELECT pg_wal_replay_pause()")
        writer.execute("INSERT INTO t VALUES (-2)")
        proxy.wait_for(lambda: _readers(proxy) == ["pg-3"], what="the paused standby to leave the set",
                       timeout=15)
        record = proxy.call(lambda: proxy.ctx.health.health_of(proxy.ctx.topology.targets[1]))
        assert (record.state, record.reason) == ("UNAVAILABLE", "INVALID_REPLICATION_STATE")
        assert record.description.startswith("replica lag ") and "exceeds MaxReplicaLag 1 s" in record.description
        assert {s.execute(QUERY).fetchone() for s in sessions} == {(True, s2.port)}
        s1.psql("SELECT pg_wal_replay_resume()")
        proxy.wait_for(lambda: _readers(proxy) == ["pg-2", "pg-3"], what="the standby to catch up",
                       timeout=15)
        assert proxy.call(lambda: proxy.ctx.health.health_of(proxy.ctx.topology.targets[1]).state) == "AVAILABLE"
    finally:
        stop_writing.set()
        for s in sessions:
            s.close()
        writer.close()
