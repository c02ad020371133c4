"""metrics/: naming, the collector's figures read from states, latencies, availability, and the
IBackendConnection seam both engines' connections must provide."""

import re
from collections import namedtuple
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from tests.unit import test_pg_frontend as pg
from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.config.load import parse_config
from txrdsproxy.failover.monitor import TargetHealth
from txrdsproxy.failover.topology import READ_ONLY, READ_WRITE, Topology
from txrdsproxy.metrics import CLOSE_CATEGORIES, Metrics, close_category
from txrdsproxy.metrics.availability import RoleAvailability
from txrdsproxy.metrics.collector import proxy_figures, state_cloudwatch_names
from txrdsproxy.metrics.instruments import Histogram, HistogramSeries
from txrdsproxy.proxy.interfaces import IBackendConnection
from txrdsproxy.proxy.mysql_backend import MySQLBackendConnection
from txrdsproxy.proxy.pg_backend import PgBackendConnection
from txrdsproxy.proxy.session import ProxyContext
from txrdsproxy.testing.certs import write_self_signed
from txrdsproxy.testing.fakes import FakePgBackendConn
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.commands import ResponseTracker

Target = namedtuple("Target", "rds_resource_id endpoint port role")
T1, T2 = Target("db-1", "127.0.0.1", 5432, ""), Target("db-2", "127.0.0.2", 5432, "")
CREDS = Credentials("app", "pw")

# The metrics of the seed's CloudWatch table ("Monitoring RDS Proxy Using Amazon CloudWatch").
CLOUDWATCH = [
    "AvailabilityPercentage", "ClientConnections", "ClientConnectionsClosed",
    "ClientConnectionsNoTLS", "ClientConnectionsReceived", "ClientConnectionsSetupFailedAuth",
    "ClientConnectionsSetupSucceeded", "ClientConnectionsTLS", "DatabaseConnectionRequests",
    "DatabaseConnectionRequestsWithTLS", "DatabaseConnections", "DatabaseConnectionsBorrowLatency",
    "DatabaseConnectionsCurrentlyBorrowed", "DatabaseConnectionsCurrentlyInTransaction",
    "DatabaseConnectionsCurrentlySessionPinned", "DatabaseConnectionsSetupFailed",
    "DatabaseConnectionsSetupSucceeded", "DatabaseConnectionsWithTLS",
    "MaxDatabaseConnectionsAllowed", "QueryDatabaseResponseLatency", "QueryRequests",
    "QueryRequestsNoTLS", "QueryRequestsTLS", "QueryResponseLatency",
]
LABELS = {"proxy_name", "target_group", "target", "target_role", "reason", "state", "le"}


def pg_connection():
    return PgBackendConnection(("app", "appdb"), T1, CREDS, "", 1 << 20)


def mysql_connection(status=None):
    conn = MySQLBackendConnection(("app", 0), T1, CREDS, "", 1 << 20, connector=None)
    if status is not None:
        conn.tracker = ResponseTracker(hs.DEFAULT_SERVER_CAPABILITIES, status)
    return conn


# -- the seam ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [pg_connection, mysql_connection, lambda: FakePgBackendConn(("u", "d"))],
                         ids=["postgresql", "mysql", "fake"])
def test_backend_connections_provide_the_interface(make):
    assert verifyObject(IBackendConnection, make())


def test_mysql_in_transaction_follows_the_server_status():
    assert mysql_connection().in_transaction is False  # not logged in yet
    assert mysql_connection(P.SERVER_STATUS_AUTOCOMMIT).in_transaction is False
    assert mysql_connection(P.SERVER_STATUS_IN_TRANS).in_transaction is True


def test_pg_in_transaction_and_backend_id():
    conn = pg_connection()
    assert conn.in_transaction is False and conn.backend_id is None
    conn.txn_status, conn.backend_pid = b"T", 321
    assert conn.in_transaction is True and conn.backend_id == 321
    conn.txn_status = b"E"  # a failed transaction is still one
    assert conn.in_transaction is True


# -- figures read from states ---------------------------------------------------------------------------
class StatePool:
    """A pool as the collector reads it."""

    def __init__(self, conns, waiting_since=(), max_connections=80):
        self.conns = conns
        self.waiters = list(waiting_since)
        self.max_connections = max_connections

    def connections(self):
        return list(self.conns)

    @property
    def waiting(self):
        return len(self.waiters)

    @property
    def oldest_wait_since(self):
        return self.waiters[0] if self.waiters else None


class Opening:
    """The pool's placeholder for a connection being opened (provides no interface)."""

    state = "connecting"


def context(engine, pool, clock, targets=(T1,)):
    proxy = {"DBProxyName": "p", "EngineFamily": engine, "Listen": "tcp:0",
             "Auth": [{"SecretArn": "arn:s"}],
             "TargetGroups": [{"Targets": [{"RdsResourceId": t.rds_resource_id,
                                             "Endpoint": t.endpoint, "Port": t.port}
                                            for t in targets]}]}
    config = parse_config({"Secrets": {"Path": "/s.json"}, "DBProxies": [proxy]}).proxies[0]
    ctx = ProxyContext(config, pool, None, clock, Metrics())
    ctx.topology = Topology(targets)
    ctx.health = TargetHealth(clock)
    return ctx


def figures(ctx):
    return {(name, tuple(labels)): value for name, labels, value in proxy_figures(ctx, ctx.metrics)}


def test_in_transaction_gauge_counts_mysql_connections_in_a_transaction():
    """The bug this seam fixes: the gauge read PostgreSQL's txn_status and gave 0 for MySQL."""
    conns = [mysql_connection(P.SERVER_STATUS_IN_TRANS), mysql_connection(P.SERVER_STATUS_AUTOCOMMIT),
             mysql_connection(P.SERVER_STATUS_IN_TRANS)]
    conns[0].state = conns[1].state = "borrowed"
    conns[2].state = "idle"  # in a transaction but not lent: not "currently in transaction"
    clock = Clock()
    ctx = context("MYSQL", StatePool(conns + [Opening()]), clock)
    f = figures(ctx)
    key = ("p", "default", "db-1")
    assert f[("database_connections_currently_in_transaction", key)] == 1
    assert f[("database_connections_currently_borrowed", key)] == 2
    assert f[("database_connections", key)] == 3
    assert f[("database_connections_opening", ("p", "default"))] == 1
    assert f[("database_connections_by_state", key + ("idle",))] == 1
    assert f[("max_database_connections_allowed", key)] == 80


def test_waiting_clients_and_the_longest_wait():
    clock = Clock()
    clock.advance(100)
    ctx = context("POSTGRESQL", StatePool([], waiting_since=[93.5, 99.0]), clock)
    f = figures(ctx)
    assert f[("client_connections_waiting", ("p", "default"))] == 2
    assert f[("client_longest_wait_seconds", ("p", "default"))] == 6.5
    ctx.pool.waiters = []
    assert figures(ctx)[("client_longest_wait_seconds", ("p", "default"))] == 0.0


# -- a real frontend: latencies, pins, setup failures, QueryRequests by TLS ---------------------------------
def metered_session():
    s = pg.Harness()
    s.ctx.metrics = Metrics()
    s.pool.clock = s.clock
    s.ctx.topology = Topology([T1])
    s.ctx.health = TargetHealth(s.clock)
    s.login()
    return s


def test_query_latencies_are_measured_per_request():
    s = metered_session()
    m = s.ctx.metrics
    s.clock.advance(10)
    s.send(pg.msg.query("SELECT 1"))
    s.clock.advance(0.25)  # waiting for a connection
    lease = s.pool.give()
    s.clock.advance(0.5)  # the database works
    s.frontend.backend_data(pg.msg.ready_for_query(b"I"))
    s.frontend.ready_for_query(b"I")
    response = m.query_response_latency.series("app-pg")
    database = m.query_database_response_latency.series("app-pg", "db-1")
    assert (response.count, response.sum) == (1, 0.75)
    assert (database.count, database.sum) == (1, 0.5)
    assert lease.released
    # An extended-protocol batch split over reads is one request, measured from its first byte.
    s.send(pg.PARSE + pg.BIND)
    s.clock.advance(1)
    s.send(pg.EXECUTE + pg.SYNC)
    s.pool.give()
    s.clock.advance(2)
    s.frontend.ready_for_query(b"I")
    assert (response.count, response.sum) == (2, 3.75)
    assert (database.count, database.sum) == (2, 2.5)


def test_a_request_on_a_held_connection_records_both_latencies_alike():
    """In a transaction the connection is held before the request arrives: its database
    latency is its response latency (one bisect for both: HistogramSeries.observe_pair)."""
    s = metered_session()
    m = s.ctx.metrics
    s.send(pg.msg.query("BEGIN"))
    s.pool.give()
    s.frontend.ready_for_query(b"T")
    response = m.query_response_latency.series("app-pg")
    database = m.query_database_response_latency.series("app-pg", "db-1")
    before = (list(response.counts), list(database.counts))
    s.clock.advance(5)
    s.send(pg.msg.query("SELECT 1"))
    s.clock.advance(0.3)
    s.frontend.ready_for_query(b"T")
    assert response.sum == pytest.approx(0.3) and database.sum == pytest.approx(0.3)
    grew = [i for i, (a, b) in enumerate(zip(before[0], response.counts)) if a != b]
    assert grew == [i for i, (a, b) in enumerate(zip(before[1], database.counts)) if a != b]
    assert len(grew) == 1 and response.count == database.count == 2


def test_a_request_on_a_connection_lent_at_once_records_both_latencies_alike(monkeypatch):
    """An idle connection lent in the read that brought the request waited for nothing: its
    database latency is the response latency, though the pool read its clock a moment after
    the session did (real time moves within a turn), and one bisect records both."""
    s = metered_session()
    m = s.ctx.metrics
    s.clock.advance(10)
    lease = s.pool.new_lease(s.frontend.key)
    lease.conn.client_params = dict(s.frontend.desired)  # nothing to sync: attached at once
    lease.borrowed_at = s.clock.seconds() + 0.001  # the pool's own, later, clock reading
    s.pool.idle.append(lease)
    single = []
    real_observe = HistogramSeries.observe
    monkeypatch.setattr(HistogramSeries, "observe",
                        lambda self, value: (single.append(value), real_observe(self, value)))
    s.send(pg.msg.query("SELECT 1"))
    assert s.frontend.lease is lease and s.pool.try_borrows == 1
    s.clock.advance(0.5)
    s.frontend.backend_data(pg.msg.ready_for_query(b"I"))
    s.frontend.ready_for_query(b"I")
    response = m.query_response_latency.series("app-pg")
    database = m.query_database_response_latency.series("app-pg", "db-1")
    assert (response.count, response.sum) == (database.count, database.sum) == (1, 0.5)
    assert single == []  # observe_pair, not two observes
    assert lease.released


@pytest.mark.parametrize("value", [0.0, 0.0001, 0.005, 0.0051, 1.0, 1e9])
def test_observe_pair_is_two_observes(value):
    h = Histogram("x", "x", (), [0.001, 0.005, 0.01, 1, 10])
    alone, a, b = h.series("alone"), h.series("a"), h.series("b")
    alone.observe(value)
    a.observe_pair(b, value)
    assert a.counts == b.counts == alone.counts and a.sum == b.sum == alone.sum


def test_a_request_the_proxy_answers_itself_records_no_latency():
    s = metered_session()
    s.send(pg.msg.query("SELECT 1"))
    s.pool.refuse(pg.BorrowTimeout("Timed-out waiting to acquire database connection"))
    assert s.ctx.metrics.query_response_latency.items() == []
    assert s.frontend.request_started is None


def test_tls_refusal_and_wrong_password_count_as_setup_failed_auth(tmp_path):
    cert, key = write_self_signed(str(tmp_path))
    h = pg.Harness(TLS={"CertificateFile": cert, "PrivateKeyFile": key}, RequireTLS=True)
    h.ctx.metrics = m = Metrics()
    h.startup()
    assert h.closed
    assert m.client_connections_setup_failed_auth.value("app-pg") == 1
    h = pg.Harness()
    h.ctx.metrics = m
    h.startup()
    h.send(pg.msg.password_message(b"md5" + b"0" * 32))
    assert m.client_connections_setup_failed_auth.value("app-pg") == 2


def test_a_tls_handshake_failure_counts_once():
    from OpenSSL.SSL import Error as TLSError
    h = pg.Harness()
    h.ctx.metrics = m = Metrics()
    h.frontend.tls = True  # switched to TLS, then the handshake failed
    h.frontend.connectionLost(Failure(TLSError([("SSL routines", "", "wrong version number")])))
    assert m.client_connections_setup_failed_auth.value("app-pg") == 1


def test_query_requests_split_by_tls_survive_the_session():
    s = metered_session()
    s.frontend.tls = True
    for _ in range(3):
        s.send(pg.msg.query("SELECT 1"))
        s.pool.give()
        s.frontend.ready_for_query(b"I")
    text = s.ctx.metrics.render([s.ctx])
    assert 'rdsproxy_query_requests_tls_total{proxy_name="app-pg"} 3.0' in text
    s.lose()
    text = s.ctx.metrics.render([s.ctx])
    assert 'rdsproxy_query_requests_total{proxy_name="app-pg"} 3.0' in text
    assert 'rdsproxy_query_requests_tls_total{proxy_name="app-pg"} 3.0' in text
    assert 'rdsproxy_query_requests_no_tls_total{proxy_name="app-pg"} 0.0' in text


def test_pinned_sessions_by_reason():
    s = metered_session()
    s.send(pg.msg.query("SET work_mem = '8MB'"))
    s.pool.give()
    s.frontend.ready_for_query(b"I")
    f = figures(s.ctx)
    assert f[("sessions_pinned", ("app-pg", "set_variable"))] == 1
    assert f[("client_sessions", ("app-pg", "pinned"))] == 1
    assert f[("database_connections_currently_session_pinned", ("app-pg", "default", "db-1"))] == 1
    assert s.ctx.metrics.pins.value("app-pg", "set_variable") == 1


# -- exposition ------------------------------------------------------------------------------------------
def test_exposition_follows_prometheus_naming():
    s = metered_session()
    m = s.ctx.metrics
    m.db_connection_requests.inc("app-pg", "db-1")
    m.borrow_latency.observe("app-pg", 0.002)
    m.connection_closed("app-pg", FakePgBackendConn(("u", "d")), "above MaxIdleConnectionsPercent")
    families = list(text_string_to_metric_families(m.render([s.ctx])))
    assert families
    for family in families:
        assert re.fullmatch(r"rdsproxy_[a-z][a-z0-9_]*", family.name), family.name
        for sample in family.samples:
            assert set(sample.labels) <= LABELS, sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
    by_name = {f.name: f for f in families}
    [sample] = by_name["rdsproxy_database_connection_requests"].samples
    assert sample.labels == {"proxy_name": "app-pg", "target_group": "default", "target": "db-1"}
    buckets = {s.labels["le"]: s.value for s in by_name[
        "rdsproxy_database_connections_borrow_latency_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 0 and buckets["0.005"] == 1 and buckets["+Inf"] == 1
    [closed] = by_name["rdsproxy_database_connections_closed"].samples
    assert closed.labels["reason"] == "idle_limit" and closed.value == 1


def test_every_cloudwatch_metric_has_a_family_and_a_line_in_the_docs():
    mapping = dict(Metrics().cloudwatch_names())
    mapping.update(state_cloudwatch_names())
    assert sorted(set(mapping.values())) == sorted(CLOUDWATCH)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    rows = {}
    for line in doc.splitlines():
        m = re.match(r"\|\s*`(rdsproxy_[a-z0-9_]+)`\s*\|[^|]*\|\s*`?([A-Za-z]*)`?\s*\|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    for family, cloudwatch in mapping.items():
        suffix = "_total" if family not in state_cloudwatch_names() or family.startswith("query_requests") else ""
        if family.endswith("_seconds"):
            suffix = ""
        name = "rdsproxy_" + family + suffix
        assert rows.get(name) == cloudwatch, f"docs/metrics.md: {name} should map to {cloudwatch}"


# -- pieces ---------------------------------------------------------------------------------------------
def test_histogram_buckets_are_less_or_equal_and_cumulative():
    h = Histogram("x_seconds", "", ("proxy_name",), (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        h.observe("p", value)
    series = h.series("p")
    assert series.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert series.sum == pytest.approx(2.65)


@pytest.mark.parametrize("reason, category", [
    ("above MaxIdleConnectionsPercent", "idle_limit"),
    ("above MaxConnectionsPercent", "max_connections"),
    ("evicted for a waiter of another user/database", "evicted"),
    ("making room for a waiter of another user/database", "evicted"),
    ("failover", "failover"),
    ("target db-1 vanished: no answer within 2s", "target_vanished"),
    ("target db-1 vanished: cannot connect to 10.0.0.1:5432: timed out after 2 s", "target_vanished"),
    ("reset failed: database closed the connection (EOF)", "reset_failed"),
    ("client disconnected mid-request", "client_disconnected"),
    ("returned in an unknown state", "unknown_state"),
    ("database closed the connection (Connection was closed cleanly.)", "database_closed"),
    ("parameter sync timed out after 30 s", "timeout"),
    ("proxy stopping", "proxy_stopping"),
    ("pool closed", "proxy_stopping"),
    ("idle too long", "idle_timeout"),
    ("something new", "other"),
])
def test_close_reasons_map_to_a_few_label_values(reason, category):
    assert close_category(reason) == category
    assert category == "other" or category in dict(CLOSE_CATEGORIES)


def test_role_availability_over_the_last_minute():
    role = RoleAvailability()
    assert role.percentage(0.0) is None
    role.note(0.0, True)
    role.note(30.0, False)
    role.note(45.0, True)
    assert role.percentage(60.0) == pytest.approx(75.0)
    assert role.percentage(90.0) == pytest.approx(75.0)  # window [30, 90]: 15 s down of 60
    assert role.percentage(200.0) == 100.0


def test_availability_percentage_follows_target_health_and_the_writer():
    clock = Clock()
    ctx = context("POSTGRESQL", StatePool([]), clock, targets=(T1, T2))
    assert "availability_percentage" not in {n for n, _ in figures(ctx)}  # nothing tried yet
    ctx.topology.record_role(T2, READ_ONLY)
    ctx.health.record_success(T1)
    ctx.health.record_success(T2)
    clock.advance(30)
    ctx.health.record_failure(T1, "CONNECTION_FAILED", "refused")  # the writer goes down
    clock.advance(30)
    f = figures(ctx)
    assert f[("availability_percentage", ("p", "default", READ_WRITE))] == pytest.approx(50.0)
    assert f[("availability_percentage", ("p", "default", READ_ONLY))] == 100.0
    assert f[("target_available", ("p", "default", "db-1", READ_WRITE))] == 0
    assert f[("target_available", ("p", "default", "db-2", READ_ONLY))] == 1
