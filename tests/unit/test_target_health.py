"""failover/monitor.py TargetHealth, and the connectors recording each attempt's outcome in it."""

import pytest
from twisted.internet.task import Clock

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.config.model import DBProxyTarget
from txrdsproxy.failover import monitor
from txrdsproxy.failover.monitor import TargetHealth
from txrdsproxy.failover.topology import Topology
from txrdsproxy.proxy import connector, mysql_backend, pg_backend
from txrdsproxy.wire.mysql import packets as P

T1 = DBProxyTarget("db-1", "10.0.0.1", 5432)
T2 = DBProxyTarget("db-2", "10.0.0.2", 5432)


def test_registering_until_an_attempt_then_the_last_outcome_wins():
    clock = Clock()
    health = TargetHealth(clock)
    assert health.health_of(T1).state == monitor.REGISTERING
    assert health.health_of(T1).reason is None
    clock.advance(5)
    health.record_failure(T1, monitor.CONNECTION_FAILED, "refused")
    record = health.health_of(T1)
    assert (record.state, record.reason, record.description, record.since) == (
        monitor.UNAVAILABLE, "CONNECTION_FAILED", "refused", 5)
    assert health.health_of(T2).state == monitor.REGISTERING  # per target
    health.record_success(T1)
    assert health.health_of(T1) == monitor.HealthRecord(monitor.AVAILABLE, since=5)


def pg_connector(health):
    return pg_backend.PgConnector(Clock(), Topology([T1, T2]),
                                  lambda user: Credentials(user, "pw"), "", 1 << 20, health=health)


def outcome(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_pg_success_marks_the_writer_available(endpoints):
    health = TargetHealth()
    d = pg_connector(health).connect(("app", "appdb"))
    endpoint, factory, connected = endpoints[0]
    assert (endpoint.host, endpoint.port) == ("10.0.0.1", 5432)
    conn = factory.proto
    connected.callback(conn)
    assert health.health_of(T1).state == monitor.REGISTERING  # not yet logged in
    conn.ready.callback(conn)
    assert outcome(d) is conn
    assert health.health_of(T1).state == monitor.AVAILABLE
    assert health.health_of(T2).state == monitor.REGISTERING


def test_pg_refused_connection_is_unreachable(endpoints):
    health = TargetHealth()
    d = pg_connector(health).connect(("app", "appdb"))
    endpoints[0][2].errback(ConnectionRefusedError("Connection refused"))
    assert outcome(d).check(connector.TargetUnreachable)
    record = health.health_of(T1)
    assert (record.state, record.reason) == (monitor.UNAVAILABLE, monitor.UNREACHABLE)
    assert "10.0.0.1:5432" in record.description and "refused" in record.description


def test_pg_connect_timeout_is_unreachable_and_a_close_after_connecting_is_connection_failed(endpoints):
    clock = Clock()
    health = TargetHealth()
    pg = pg_backend.PgConnector(clock, Topology([T1, T2]), lambda user: Credentials(user, "pw"),
                                "", 1 << 20, health=health, connect_timeout=3.0)
    d = pg.connect(("app", "appdb"))
    clock.advance(3.0)  # the TCP connect never completed
    assert outcome(d).check(connector.TargetUnreachable)
    assert health.health_of(T1).reason == monitor.UNREACHABLE
    d = pg.connect(("app", "appdb"))
    _, factory, connected = endpoints[1]
    connected.callback(factory.proto)  # TCP is up ...
    factory.proto.ready.errback(connector.BackendGone("closed during login"))  # ... then it breaks
    failure = outcome(d)
    assert failure.check(connector.BackendGone) and not failure.check(connector.TargetUnreachable)
    assert health.health_of(T1).reason == monitor.CONNECTION_FAILED


@pytest.mark.parametrize("sqlstate,reason", [
    ("28P01", monitor.AUTH_FAILURE), ("28000", monitor.AUTH_FAILURE),
    ("53300", monitor.PENDING_PROXY_CAPACITY), ("57P03", monitor.CONNECTION_FAILED),
])
def test_pg_login_errors(endpoints, sqlstate, reason):
    health = TargetHealth()
    d = pg_connector(health).connect(("app", "appdb"))
    _, factory, connected = endpoints[0]
    connected.callback(factory.proto)
    factory.proto.ready.errback(pg_backend.DatabaseError({"C": sqlstate, "M": "nope for app"}))
    assert outcome(d).check(pg_backend.DatabaseError)
    assert health.health_of(T1) == monitor.HealthRecord(monitor.UNAVAILABLE, reason, "nope for app")


def test_pg_unknown_database_says_nothing_about_the_target(endpoints):
    health = TargetHealth()
    connector = pg_connector(health)
    d = connector.connect(("app", "appdb"))
    _, factory, connected = endpoints[0]
    connected.callback(factory.proto)
    factory.proto.ready.callback(factory.proto)
    outcome(d)
    d = connector.connect(("app", "nodb"))
    _, factory, connected = endpoints[1]
    connected.callback(factory.proto)
    factory.proto.ready.errback(pg_backend.DatabaseError({"C": "3D000", "M": "no such database"}))
    outcome(d)
    assert health.health_of(T1).state == monitor.AVAILABLE


def test_pg_without_health_still_works(endpoints):
    d = pg_connector(None).connect(("app", "appdb"))
    endpoints[0][2].errback(ConnectionRefusedError())
    assert outcome(d).check(connector.BackendGone)


def my_connector(health):
    return mysql_backend.MySQLConnector(Clock(), Topology([T1]), lambda user: Credentials(user, "pw"),
                                        "", 1 << 20, health=health)


@pytest.mark.parametrize("code,sqlstate,reason", [
    (1045, "28000", monitor.AUTH_FAILURE), (1044, "42000", monitor.AUTH_FAILURE),
    (1040, "08004", monitor.PENDING_PROXY_CAPACITY), (1049, "42000", None),
])
def test_mysql_login_errors(endpoints, code, sqlstate, reason):
    health = TargetHealth()
    d = my_connector(health).connect(("app", "p"))
    _, factory, connected = endpoints[0]
    connected.callback(factory.proto)
    factory.proto.ready.errback(mysql_backend.DatabaseError(P.err_packet(code, sqlstate, "denied")))
    assert outcome(d).check(mysql_backend.DatabaseError)
    record = health.health_of(T1)
    if reason is None:
        assert record.state == monitor.REGISTERING
    else:
        assert (record.state, record.reason) == (monitor.UNAVAILABLE, reason)
        assert "denied" in record.description


def test_mysql_success_and_refusal(endpoints):
    health = TargetHealth()
    my = my_connector(health)
    d = my.connect(("app", "p"))
    endpoints[0][2].errback(ConnectionRefusedError("Connection refused"))
    assert outcome(d).check(connector.TargetUnreachable)
    assert health.health_of(T1).reason == monitor.UNREACHABLE
    d = my.connect(("app", "p"))
    _, factory, connected = endpoints[1]
    connected.callback(factory.proto)
    factory.proto.ready.callback(factory.proto)
    assert outcome(d) is factory.proto
    assert health.health_of(T1).state == monitor.AVAILABLE


def test_mysql_greeting_probe_failure_is_recorded(endpoints):
    health = TargetHealth()
    d = my_connector(health).probe()
    endpoints[0][2].errback(ConnectionRefusedError("Connection refused"))
    assert outcome(d).check(connector.TargetUnreachable)
    assert health.health_of(T1).reason == monitor.UNREACHABLE
