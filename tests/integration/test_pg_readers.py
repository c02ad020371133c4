"""A READ_ONLY proxy endpoint on real PostgreSQL replication: a primary and two streaming
standbys behind one proxy.

Reads through the reader endpoint run on the standbys (pg_is_in_recovery() is true), spread over
both; a write there gets PostgreSQL's own read-only error, unchanged; a standby stopped while
sessions are using the endpoint is left out and those sessions go on, on the other standby, over
the same client connections; it rejoins once it is back.  A standby that vanishes (SIGSTOP:
its kernel keeps every TCP connection open) while a reader session's statement runs there: the
statement ends with 08006 within the proxy's vanished-target bound, the same client connection
goes on on the other standby.  A lagging standby's TargetHealth is UNAVAILABLE in every round
(DescribeDBProxyTargets through boto3, and every record the proxy made).  A standby promoted in
a switchover is AVAILABLE with Reason PROMOTED while a session's transaction still runs on the
former writer, plain AVAILABLE once it has ended.  The default (writer) endpoint takes writes
the whole time.
"""

import os
import signal
import socket
import struct
import threading
import time

import psycopg  # test extras: a missing driver must fail, not skip
import pytest

from txrdsproxy.failover.monitor import WriterMonitor
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.auth import ScramClient

try:
    from rdsapi_util import client, start
except ImportError:
    from tests.integration.rdsapi_util import client, start

try:
    from failover_util import in_thread, pg_replicated, wait_replicated
except ImportError:
    from tests.integration.failover_util import in_thread, pg_replicated, wait_replicated

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


class RawPg:
    """A bare PostgreSQL client (simple Query protocol) that writes exactly the bytes it is
    given, in one send: what a pipelining client does."""

    def __init__(self, port, user, password, database):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = b""
        self.sock.sendall(msg.startup_message({"user": user, "database": database}))
        scram = ScramClient(user, password)
        kind, payload = self.read()
        assert kind == b"R" and payload[:4] == b"\0\0\0\x0a", (kind, payload)
        self.sock.sendall(msg.sasl_initial("SCRAM-SHA-256", scram.client_first()))
        kind, payload = self.read()
        self.sock.sendall(msg.message(b"p", scram.server_first(payload[4:])))
        kind, payload = self.read()
        scram.server_final(payload[4:])
        self.until_ready()

    def read(self):
        """-> (kind, payload) of the next message."""
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack_from("!I", self.buf, 1)
                if len(self.buf) >= 1 + length:
                    kind, payload = self.buf[:1], self.buf[5:1 + length]
                    self.buf = self.buf[1 + length:]
                    return kind, payload
            data = self.sock.recv(65536)
            assert data, "the proxy closed the connection"
            self.buf += data

    def until_ready(self):
        """-> ([first column of each row (str)], error fields or None, transaction status)."""
        rows, error = [], None
        while True:
            kind, payload = self.read()
            if kind == b"D":
                (size,) = struct.unpack_from("!i", payload, 2)
                rows.append(payload[6:6 + size].decode())
            elif kind == b"E":
                error = msg.parse_error_fields(payload)
            elif kind == b"Z":
                return rows, error, payload

    def pipeline(self, *sqls):
        """Every query in one send; -> the answer of each."""
        self.sock.sendall(b"".join(msg.query(sql) for sql in sqls))
        return [self.until_ready() for _ in sqls]

    def close(self):
        self.sock.close()


def _borrowed_on(proxy, index):
    """Connections of target *index*'s replica pool lent to a session now."""
    def count():
        pool = proxy.ctx.replica_pools.existing(proxy.ctx.topology.targets[index])
        return 0 if pool is None else sum(str(c.state) == "borrowed" for c in pool.connections())
    return proxy.call(count)


def test_pg_reader_endpoint_reads_on_standbys_and_survives_a_stopped_one(replicated, tmp_path):
    primary, (s1, s2) = replicated
    proxy, api, _ = start(tmp_path, primary, targets=[primary, s1, s2], HealthCheckInterval=1,
                          Endpoints=[{"DBProxyEndpointName": READER, "TargetRole": "READ_ONLY",
                                      "Listen": "tcp:0:interface=127.0.0.1"}])
    try:
        _reader_endpoint_scenario(proxy, client(api), primary, s1, s2)
    finally:
        proxy.stop()


def _reader_endpoint_scenario(proxy, rds, primary, s1, s2):
    def described():
        return {t["RdsResourceId"]: (t["Role"], t["TargetHealth"])
                for t in rds.describe_db_proxy_targets(DBProxyName=proxy.ctx.name)["Targets"]}

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

        # Reads land on the standbys, spread over both.  A health check that times out on a
        # loaded machine takes a standby out for a round: read again (up to 10 rounds of 18)
        # once both are back, rather than count one unlucky round.
        seen = []
        for _ in range(10):
            proxy.wait_for(lambda: _readers(proxy) == ["pg-2", "pg-3"], what="both standbys in the reader set")
            seen += [s.execute(QUERY).fetchone() for s in sessions for _ in range(3)]
            if {row[1] for row in seen} == {s1.port, s2.port}:
                break
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

        # s2 vanishes (SIGSTOP of its whole process group: its kernel keeps the connections
        # open, nothing ever closes them) while a reader session's statement runs there.
        on_s2 = f"SELECT CASE WHEN inet_server_port() = {s2.port} THEN pg_sleep(600) END"
        victim = None
        for session in sessions:  # routing takes ties in turn: one of the first two lands on s2
            thread, outcome = in_thread(lambda session=session: session.execute(on_s2).fetchone())
            proxy.wait_for(lambda: outcome or _borrowed_on(proxy, 2) == 1, what="the statement to run")
            if _borrowed_on(proxy, 2) == 1 and not outcome:
                victim = session
                break
            thread.join(10)
        assert victim is not None, "no statement landed on s2"
        monitor = proxy.ctx.monitor
        bound = WriterMonitor.VANISHED_AFTER * (monitor.interval + monitor.probe_timeout) + 30.0
        os.killpg(s2.proc.pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            thread.join(bound)
            assert not thread.is_alive(), f"no error within {bound:g} s of the standby vanishing"
            (kind, error, at), = outcome
            assert kind == "error" and isinstance(error, psycopg.OperationalError), outcome
            assert error.sqlstate == "08006" and "outcome is unknown" in str(error), str(error)
            print(f"\nPostgreSQL: statement on a vanished standby failed after {at - stopped_at:.1f} s"
                  f" (HealthCheckInterval {monitor.interval:g} s)")
            assert not victim.closed  # the same client connection goes on, on the other standby
            assert [victim.execute(QUERY).fetchone() for _ in range(3)] == [(True, s1.port)] * 3
            assert {s.execute(QUERY).fetchone() for s in sessions} == {(True, s1.port)}
            assert _readers(proxy) == ["pg-2"]
        finally:
            os.killpg(s2.proc.pid, signal.SIGCONT)
        proxy.wait_for(lambda: _readers(proxy) == ["pg-2", "pg-3"], what="the standby to come back",
                       timeout=30)

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
        rounds = proxy.call(lambda: proxy.ctx.monitor.rounds)
        time.sleep(1.5)  # the primary idles past the bound: lag stays 0 on both standbys
        proxy.wait_for(lambda: proxy.call(lambda: proxy.ctx.monitor.rounds) >= rounds + 2, what="rounds")
        assert _readers(proxy) == ["pg-2", "pg-3"]
        s1.psql("SELECT pg_wal_replay_pause()")
        writer.execute("INSERT INTO t VALUES (-2)")
        proxy.wait_for(lambda: _readers(proxy) == ["pg-3"], what="the paused standby to leave the set",
                       timeout=15)
        # Its TargetHealth has one owner: UNAVAILABLE in every round while it lags, never
        # AVAILABLE between two (the monitor asks the reader set's verdict before recording).
        records = []
        pg2 = proxy.ctx.topology.targets[1]
        listener = lambda target, record: target is pg2 and records.append(record)  # noqa: E731
        proxy.call(proxy.ctx.health.listeners.append, listener)
        rounds = proxy.call(lambda: monitor.rounds)
        proxy.wait_for(lambda: proxy.call(lambda: monitor.rounds) >= rounds + 3, what="three rounds")
        proxy.call(proxy.ctx.health.listeners.remove, listener)
        assert records and {(r.state, r.reason) for r in records} == {("UNAVAILABLE", "INVALID_REPLICATION_STATE")}
        role, health = described()["pg-2"]
        assert role == "READ_ONLY" and (health["State"], health["Reason"]) == ("UNAVAILABLE", "INVALID_REPLICATION_STATE")
        assert health["Description"].startswith("replica lag ") and "exceeds MaxReplicaLag 1 s" in health["Description"]
        assert {s.execute(QUERY).fetchone() for s in sessions} == {(True, s2.port)}
        s1.psql("SELECT pg_wal_replay_resume()")
        proxy.wait_for(lambda: _readers(proxy) == ["pg-2", "pg-3"], what="the standby to catch up",
                       timeout=15)
        assert proxy.call(lambda: proxy.ctx.health.health_of(proxy.ctx.topology.targets[1]).state) == "AVAILABLE"

        # Switchover: the primary is made read-only while a session's transaction runs on it,
        # s1 is promoted.  s1 is the writer, AVAILABLE with Reason PROMOTED while that session is
        # still on the former writer, then plain AVAILABLE.  The session ends its transaction
        # with COMMIT and pipelines its next statement right behind it, in the same send: that
        # statement must run on the new writer, not on the former one (read-only now: 25006).
        late = RawPg(proxy.port, "app_scram", primary.users["app_scram"], "appdb")
        assert late.pipeline("BEGIN", "INSERT INTO t VALUES (-3)") == [([], None, b"T"), ([], None, b"T")]
        primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        primary.reload()
        s1.promote()
        proxy.wait_for(lambda: described()["pg-2"][0] == "READ_WRITE", what="the promoted writer", timeout=20)
        assert described()["pg-2"] == ("READ_WRITE", {"State": "AVAILABLE", "Reason": "PROMOTED"})
        rounds = proxy.call(lambda: monitor.rounds)
        proxy.wait_for(lambda: proxy.call(lambda: monitor.rounds) >= rounds + 2, what="two rounds")
        assert described()["pg-2"] == ("READ_WRITE", {"State": "AVAILABLE", "Reason": "PROMOTED"})
        commit, insert = late.pipeline("COMMIT", "INSERT INTO t VALUES (-4) RETURNING inet_server_port()")
        assert commit == ([], None, b"I")  # on the former writer: its transaction began read-write
        assert insert == ([str(s1.port)], None, b"I"), insert  # on the new writer
        assert primary.psql("SELECT count(*) FROM t WHERE x = -3", dbname="appdb").strip() == "1"
        late.close()
        proxy.wait_for(lambda: described()["pg-2"] == ("READ_WRITE", {"State": "AVAILABLE"}),
                       what="the end of the transition", timeout=20)
        with psycopg.connect(proxy.dsn(primary), autocommit=True) as moved:
            assert moved.execute(QUERY).fetchone() == (False, s1.port)
    finally:
        stop_writing.set()
        for s in sessions:
            s.close()
        writer.close()
