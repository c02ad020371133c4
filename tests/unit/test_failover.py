"""Failover: failover/topology.py, failover/monitor.py WriterMonitor, the pool's failover hooks,
the connectors' health checks and their wiring in service.py.  task.Clock and fake probes only."""

import pytest
from twisted.internet import defer
from twisted.internet import error as twisted_error
from twisted.internet.task import Clock

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.config.load import ConfigError, parse_config
from txrdsproxy.config.model import ConnectionPoolConfig, DBProxyTarget
from txrdsproxy.failover import monitor as mon
from txrdsproxy.failover.monitor import TargetHealth, WriterMonitor
from txrdsproxy.failover.topology import NoWriter, Topology
from txrdsproxy.pool.pool import BackendPool, BorrowTimeout
from txrdsproxy.proxy import mysql_backend, pg_backend
from txrdsproxy.proxy.connector import BackendGone, TargetUnreachable
from txrdsproxy.testing.deferreds import failure_of, result
from txrdsproxy.testing.fakes import FakePooledConn

W = DBProxyTarget("db-1", "10.0.0.1", 5432)
S = DBProxyTarget("db-2", "10.0.0.2", 5432)
RW, RO = "READ_WRITE", "READ_ONLY"
KEY = ("app", "appdb")
INTERVAL = 5.0
BACKOFF = (0.5, 1.0)  # a quick failure of the writer's check: checked again after 0.5 s, then 1 s


def retries_done(clock):
    """Let the writer's checks again run out (Clock.advance jumps: one step per retry)."""
    for step in BACKOFF:
        clock.advance(step)


class Refused(Exception):
    """Stands for the engine's DatabaseError (the database's own answer)."""


# -- fakes ----------------------------------------------------------------------------------------
def FakeConn(key, target):
    return FakePooledConn(key, target)


class FakeConnector:
    """Opens to `topology.writer()` like the real Connector; the test completes or fails each."""

    def __init__(self, topology):
        self.topology = topology
        self.pending = []  # [(key, target, Deferred)]

    def connect(self, key):
        try:
            target = self.topology.writer()
        except NoWriter:
            return defer.fail()
        d = defer.Deferred()
        self.pending.append((key, target, d))
        return d

    def complete(self, index=0):
        key, target, d = self.pending.pop(index)
        conn = FakeConn(key, target)
        d.callback(conn)
        return conn

    def fail(self, index=0, error=None):
        _, _, d = self.pending.pop(index)
        d.errback(error or BackendGone("cannot connect: connection refused"))


class FakeProbes:
    """probe(target) -> the answer set for that target: a role, an exception, or None (hang)."""

    def __init__(self, answers):
        self.answers = dict(answers)
        self.calls = []

    def __call__(self, target):
        self.calls.append(target)
        answer = self.answers[target]
        if answer is None:
            return defer.Deferred()
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


class World:
    """Topology, TargetHealth, pool, connector and monitor over W (writer) and S (standby)."""

    def __init__(self, answers=None, timeout=30.0, targets=(W, S)):
        self.clock = Clock()
        self.topology = Topology(targets)
        self.health = TargetHealth(self.clock)
        self.connector = FakeConnector(self.topology)
        cfg = ConnectionPoolConfig(connection_borrow_timeout=timeout)
        self.pool = BackendPool("p", self.connector, cfg, self.clock)
        self.probes = FakeProbes(answers or {W: RW, S: RO})
        self.monitor = WriterMonitor(self.clock, self.topology, self.health, self.probes, INTERVAL,
                                     pool=self.pool, database_errors=(Refused,),
                                     unreachable=(TargetUnreachable,))
        self.pool.failover = self.monitor

    def lend(self, key=KEY):
        """A borrowed connection to the current writer -> (lease, conn)."""
        d = self.pool.borrow(key)
        conn = self.connector.complete()
        return result(d), conn


# -- topology -------------------------------------------------------------------------------------
def test_topology_initial_writer_is_first_read_write_else_first():
    a, b = DBProxyTarget("a", "h", 1), DBProxyTarget("b", "h", 2, role=RW)
    assert Topology([a, b]).writer() is b
    assert Topology([a, DBProxyTarget("c", "h", 3, role=RO)]).writer() is a


def test_topology_roles_follow_the_writer_and_no_writer_raises():
    topo = Topology([W, S])
    assert (topo.role_of(W), topo.role_of(S)) == (RW, RO)
    topo.set_writer(S)
    assert topo.writer() is S and (topo.role_of(W), topo.role_of(S)) == (RO, RW)
    topo.record_role(S, RO)
    topo.set_writer(None)
    assert topo.current_writer() is None
    with pytest.raises(NoWriter):
        topo.writer()
    # no writer: each target's own last answer (READ_ONLY when unknown)
    assert topo.probed_role(S) == RO and topo.role_of(S) == RO and topo.role_of(W) == RO


# -- the monitor ----------------------------------------------------------------------------------
def test_healthy_writer_stays_and_every_target_is_probed_each_interval():
    world = World()
    world.monitor.start()
    assert world.probes.calls == [W, S]  # a round at start
    assert world.topology.writer() is W
    assert world.health.health_of(W).state == mon.AVAILABLE
    assert world.health.health_of(S).state == mon.AVAILABLE
    assert world.topology.probed_role(S) == RO and world.topology.role_of(S) == RO
    world.clock.advance(INTERVAL - 0.1)
    assert len(world.probes.calls) == 2
    world.clock.advance(0.1)
    assert world.probes.calls == [W, S, W, S]
    assert world.topology.writer() is W
    world.monitor.stop()
    world.clock.advance(INTERVAL * 3)
    assert len(world.probes.calls) == 4
    assert not world.clock.getDelayedCalls()


def test_writer_down_and_standby_read_write_switches_and_retires_old_connections():
    world = World()
    world.monitor.start()
    pool = world.pool
    idle_lease, idle_conn = world.lend()
    busy_lease, busy_conn = world.lend(("app", "other"))
    idle_lease.release()
    assert idle_conn.state == "idle"

    world.probes.answers = {W: TargetUnreachable("connection refused"), S: RW}
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S
    assert world.monitor.last_writer is S
    assert (world.topology.role_of(W), world.topology.role_of(S)) == (RO, RW)
    h = world.health.health_of(W)
    assert (h.state, h.reason, h.description) == (mon.UNAVAILABLE, "CONNECTION_FAILED", "connection refused")
    assert idle_conn.closed_reason == "failover"  # idle connections to the old writer: closed
    assert busy_conn.state == "borrowed"  # the transaction under way is not cut (yet)

    # still no answer from the old writer at the next round: it vanished, and the lent
    # connection to it is cut (aborted) so that its session hears of it now
    world.clock.advance(INTERVAL)
    assert busy_conn.aborted and busy_conn.closed_reason == "target db-1 vanished: connection refused"
    assert pool.connections() == []
    busy_lease.release(clean=False, reason="database connection lost")  # what the session does
    assert pool.connections() == []

    # the next borrow opens to the new writer
    d = pool.borrow(KEY)
    assert [t for _, t, _ in world.connector.pending] == [S]
    conn = world.connector.complete()
    assert result(d).conn is conn and conn.target is S


@pytest.mark.parametrize("old_writer_answer", [
    RO, Refused("too many connections"),
    BackendGone("no credentials for health checks (first Auth secret)"),  # says nothing of it
])
def test_a_writer_that_answers_keeps_its_lent_connections_across_a_failover(old_writer_answer):
    """Demoted (READ_ONLY) or refusing logins, the old writer is there: a transaction under way
    on it is not cut; its connection is closed when given back (not reused)."""
    world = World()
    world.monitor.start()
    busy_lease, busy_conn = world.lend()
    world.probes.answers = {W: old_writer_answer, S: RW}
    for _ in range(3):
        world.clock.advance(INTERVAL)
    assert world.topology.writer() is S
    assert busy_conn.state == "borrowed" and busy_conn.closed_reason is None
    busy_lease.release()
    assert busy_conn.closed_reason == "failover" and not busy_conn.aborted


def test_a_vanished_writer_without_a_successor_loses_its_lent_connections_at_once():
    """No answer from the writer within the probe timeout (SIGSTOP, network cut), nobody
    promoted yet: the statements in flight there are cut now (their sessions get an error)
    instead of hanging until TCP gives up; borrows wait for a writer."""
    world = World()
    world.monitor.start()
    busy_lease, busy_conn = world.lend()
    world.probes.answers = {W: None, S: RO}  # the writer's checks hang
    round_time = INTERVAL + world.monitor.probe_timeout
    for _ in range(int(round_time)):  # the first round that gets no answer: could be a blip
        world.clock.advance(1)
    assert busy_conn.state == "borrowed" and world.monitor.rounds == 2
    for _ in range(int(round_time) - 1):
        world.clock.advance(1)
    assert busy_conn.state == "borrowed"  # not before the second check timed out
    world.clock.advance(1)
    assert busy_conn.aborted and busy_conn.closed_reason.startswith("target db-1 vanished: no answer")
    with pytest.raises(NoWriter):
        world.topology.writer()
    assert world.pool.connections() == []


def test_failover_waiters_wait_while_there_is_no_writer_then_go_to_the_new_writer():
    world = World(timeout=30.0)
    world.monitor.start()
    # primary stops: no target answers READ_WRITE yet (standby not promoted)
    world.probes.answers = {W: BackendGone("refused"), S: RO}
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is W  # checked again first (backoff)
    retries_done(world.clock)
    assert world.monitor.retried == 2
    with pytest.raises(NoWriter):
        world.topology.writer()
    assert world.topology.role_of(S) == RO

    d = world.pool.borrow(KEY)
    assert not d.called and world.pool.waiting == 1 and world.pool.stalled
    assert world.connector.pending == []  # nothing to connect to
    world.clock.advance(1)  # the NoWriter made the monitor probe at once (not at the next tick)
    assert world.probes.calls.count(S) == 3
    assert world.monitor.retried == 2  # no writer to check again any more

    world.probes.answers = {W: BackendGone("refused"), S: RW}  # standby promoted
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S and not world.pool.stalled
    key, target, _ = world.connector.pending[0]
    assert (key, target) == (KEY, S)
    conn = world.connector.complete()
    assert result(d).conn is conn


def test_no_writer_borrows_time_out_after_connection_borrow_timeout():
    world = World(answers={W: BackendGone("refused"), S: RO}, timeout=12.0)
    world.monitor.start()
    retries_done(world.clock)
    assert world.topology.current_writer() is None
    d = world.pool.borrow(KEY)
    world.clock.advance(11.9)
    assert not d.called
    world.clock.advance(0.1)
    assert failure_of(d).check(BorrowTimeout)
    assert world.pool.waiting == 0


def test_writer_connection_refused_probes_at_once_and_keeps_the_waiter():
    world = World()
    world.monitor.start()
    d = world.pool.borrow(KEY)
    world.probes.answers = {W: BackendGone("refused"), S: RW}
    world.connector.fail(error=BackendGone("cannot connect to 10.0.0.1:5432: refused"))
    assert not d.called and world.pool.stalled
    world.clock.advance(0)  # the immediate round, not INTERVAL later
    assert world.topology.writer() is S
    conn = world.connector.complete()
    assert conn.target is S and result(d).conn is conn


def test_lost_pooled_connection_probes_at_once():
    world = World()
    world.monitor.start()
    lease, conn = world.lend()
    lease.release()
    world.probes.answers = {W: BackendGone("refused"), S: RW}
    conn.lose()
    world.clock.advance(0)
    assert world.topology.writer() is S


def test_database_refusal_fails_the_waiter_as_before():
    world = World()
    world.monitor.start()
    d = world.pool.borrow(KEY)
    world.connector.fail(error=Refused("password authentication failed"))
    assert failure_of(d).check(Refused)
    assert not world.pool.stalled


def test_writer_back_after_a_blip_is_kept_without_retiring_connections():
    world = World()
    world.monitor.start()
    lease, conn = world.lend()
    lease.release()
    world.probes.answers = {W: TargetUnreachable("timeout"), S: RO}
    world.clock.advance(INTERVAL)
    retries_done(world.clock)
    assert world.topology.current_writer() is None
    d = world.pool.borrow(("app", "other"))
    assert world.pool.stalled
    world.probes.answers = {W: RW, S: RO}
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is W
    assert conn.state == "idle"  # same writer: its connections stay
    assert not world.pool.stalled
    new = world.connector.complete()
    assert result(d).conn is new and new.target is W


def test_connection_opened_across_a_switch_is_closed_not_lent():
    world = World()
    world.monitor.start()
    d = world.pool.borrow(KEY)  # opening to W
    world.probes.answers = {W: BackendGone("refused"), S: RW}
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S
    old = world.connector.complete(0)  # the attempt to W completes late
    assert old.closed_reason == "failover"
    new = world.connector.complete(0)
    assert new.target is S and result(d).conn is new


def test_a_hanging_probe_counts_as_a_failure():
    world = World(answers={W: None, S: RW})
    world.monitor.start()
    assert world.topology.writer() is W  # still waiting for W's answer
    world.clock.advance(world.monitor.probe_timeout)
    assert world.topology.writer() is S
    h = world.health.health_of(W)
    assert h.state == mon.UNAVAILABLE and "no answer" in h.description


def test_two_read_write_targets_keep_the_current_writer():
    world = World(answers={W: RW, S: RW})
    world.monitor.start()
    assert world.topology.writer() is W
    assert world.topology.role_of(S) == RO


def test_probes_do_not_stack_while_a_round_is_running():
    world = World(answers={W: None, S: RO})
    world.monitor.start()
    world.monitor.probe_now()
    world.clock.advance(0)
    assert world.probes.calls == [W, S]


# -- the connectors' health checks ----------------------------------------------------------------
# (the `endpoints` fixture: tests/unit/conftest.py)
class FakeMetrics:
    class _C:
        def __init__(self):
            self.n = 0

        def inc(self, *labels):
            self.n += 1

    def __init__(self):
        self.db_connection_requests = self._C()
        self.db_connections_setup_failed = self._C()
        self.db_connections_setup_succeeded = self._C()


@pytest.mark.parametrize("answer, role, lag", [
    (["f", "f", None], RW, None),  # a primary
    (["t", "f", "0"], RO, 0.0),    # a standby that replayed all it received
    (["t", "f", "12.5"], RO, 12.5),  # a standby behind by its last replayed transaction's age
    (["t", "f", None], RO, None),  # a standby that has replayed no transaction yet
    (["f", "t", None], RO, None),  # a primary made read-only for the whole server (switchover, kept up)
])
def test_pg_probe_logs_in_asks_pg_is_in_recovery_and_closes(endpoints, answer, role, lag):
    health, metrics, clock = TargetHealth(), FakeMetrics(), Clock()
    conn_ = pg_backend.PgConnector(clock, Topology([W, S]), None, "", 1 << 20, health=health,
                                   metrics=metrics)
    d = conn_.probe_role(S, Credentials("app", "pw"))
    endpoint, factory, connected = endpoints[0]
    assert (endpoint.host, endpoint.timeout) == ("10.0.0.2", conn_.PROBE_TIMEOUT)
    conn = factory.proto
    assert conn.key == ("app", "postgres")
    asked, closed = [], []
    conn.run_internal = lambda sql: asked.append(sql) or defer.succeed([answer])
    conn.close = closed.append
    connected.callback(conn)
    conn.ready.callback(conn)
    found = result(d)
    assert found.role == role and found.replica == (answer[0] == "t") and found.lag == lag
    assert asked == [pg_backend.PgConnector.ROLE_QUERY] and closed == ["health check done"]
    # a health check is neither a pool connection request nor evidence for the connector
    assert metrics.db_connection_requests.n == 0
    assert health.health_of(S).state == mon.REGISTERING
    assert not clock.getDelayedCalls()


def test_probe_of_an_unreachable_target_fails_with_backend_gone(endpoints):
    conn_ = pg_backend.PgConnector(Clock(), Topology([W, S]), None, "", 1 << 20)
    d = conn_.probe_role(W, Credentials("app", "pw"))
    _, factory, connected = endpoints[0]
    connected.errback(twisted_error.ConnectionRefusedError("refused"))
    assert failure_of(d).check(TargetUnreachable)  # nothing answered: counts towards "vanished"
    # the login never started: its `ready` is not failed (nothing would handle that error)
    assert not factory.proto.ready.called


def test_probe_without_credentials_fails():
    conn_ = pg_backend.PgConnector(Clock(), Topology([W, S]), None, "", 1 << 20)
    assert failure_of(conn_.probe_role(W, None)).check(BackendGone)


def _slave_status(seconds_behind):
    """A SHOW SLAVE STATUS row: Seconds_Behind_Master is its 33rd column."""
    row = ["x"] * 40
    row[32] = seconds_behind
    return [row]


@pytest.mark.parametrize("answer, status, role, lag, replica", [
    (["0", "0"], None, RW, None, None),                 # the writer: no replica status asked
    (["OFF", "OFF"], None, RW, None, None),
    (["1", "0"], _slave_status("7"), RO, 7.0, True),    # a replica 7 s behind
    (["0", "1"], [], RO, None, None),                   # innodb_read_only (an Aurora reader)
    (["1", "1"], _slave_status(None), RO, None, True),  # threads not running: unknown lag
    (["1", "0"], [], RO, None, None),                   # read-only, replicating from nothing
    (["1", "0"], "refused", RO, None, None),            # the check user may not ask: unknown
    (["0"], [], RO, None, None),                        # a short answer is not a writer's
])
def test_mysql_probe_asks_read_only_innodb_read_only_and_a_replicas_lag(endpoints, answer, status, role,
                                                                          lag, replica):
    conn_ = mysql_backend.MySQLConnector(Clock(), Topology([W, S]), None, "", 1 << 20)
    d = conn_.probe_role(S, Credentials("app", "pw"))
    _, factory, connected = endpoints[0]
    conn = factory.proto
    assert conn.key == ("app", 0)
    asked, closed = [], []
    answers = {mysql_backend.MySQLConnector.ROLE_QUERY: [answer], b"SHOW SLAVE STATUS": status}

    def query(sql):
        asked.append(sql)
        if answers[sql] == "refused":
            return defer.fail(mysql_backend.DatabaseError(
                b"\xff\xbb\x04#42000Access denied; you need (at least one of) the REPLICATION CLIENT privilege(s)"))
        return defer.succeed(answers[sql])

    conn.query = query
    conn.close = closed.append
    connected.callback(conn)
    conn.ready.callback(conn)
    found = result(d)
    assert (found.role, found.lag, found.replica) == (role, lag, replica)
    expected = [mysql_backend.MySQLConnector.ROLE_QUERY] + ([b"SHOW SLAVE STATUS"] if role == RO else [])
    assert asked == expected and closed == ["health check done"]


def test_connect_without_a_writer_fails_with_no_writer():
    topo = Topology([W, S])
    topo.set_writer(None)
    pg = pg_backend.PgConnector(Clock(), topo, lambda u: Credentials(u, "pw"), "", 1 << 20)
    assert failure_of(pg.connect(KEY)).check(NoWriter)
    my = mysql_backend.MySQLConnector(Clock(), topo, lambda u: Credentials(u, "pw"), "", 1 << 20)
    assert failure_of(my.probe()).check(NoWriter)


# -- configuration and wiring ---------------------------------------------------------------------
ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"


def config(targets, **proxy):
    data = {
        "Secrets": {"Path": "/etc/secrets.json"},
        "DBProxies": [dict({
            "DBProxyName": "p1", "EngineFamily": "POSTGRESQL", "Listen": "tcp:6432",
            "Auth": [{"SecretArn": ARN}],
            "TargetGroups": [{"Targets": targets}],
        }, **proxy)],
    }
    return parse_config(data, "x.yaml", "/base")


TWO = [{"RdsResourceId": "pg-1", "Endpoint": "127.0.0.1", "Port": 5432},
       {"RdsResourceId": "pg-2", "Endpoint": "127.0.0.1", "Port": 5433, "Role": "READ_ONLY"}]


def test_health_check_interval_default_and_range():
    assert config(TWO).proxies[0].health_check_interval == 5.0
    assert config(TWO, HealthCheckInterval=1).proxies[0].health_check_interval == 1.0
    for bad in (0, 301):
        with pytest.raises(ConfigError) as info:
            config(TWO, HealthCheckInterval=bad)
        assert "HealthCheckInterval" in str(info.value)


class FakeSecrets:
    def get(self, arn):
        return Credentials("app", "pw", arn)


def test_monitor_only_for_several_targets():
    from txrdsproxy.service import build_proxy
    one = build_proxy(config(TWO[:1]).proxies[0], FakeSecrets(), Clock(), {})
    assert one.monitor is None and one.pool.failover is None
    two = build_proxy(config(TWO, HealthCheckInterval=2).proxies[0], FakeSecrets(), Clock(), {})
    assert two.monitor is not None and two.pool.failover is two.monitor
    assert two.monitor.interval == 2.0 and two.monitor.pool is two.pool
