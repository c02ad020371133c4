"""Accepting a client socket costs the database nothing: one shared, bounded greeting probe.

MySQLConnector.probe() on task.Clock with a fake endpoint that counts connection attempts."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.failover.topology import Topology
from txrdsproxy.proxy import mysql_backend
from txrdsproxy.proxy.connector import BackendGone
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P

from tests.unit.test_target_health import T1

GREETING = P.encode_packet(hs.build_handshake_v10(
    "10.11.6-MariaDB", 5, b"B" * 20, hs.DEFAULT_SERVER_CAPABILITIES, 45,
    P.SERVER_STATUS_AUTOCOMMIT, hs.NATIVE_PASSWORD), 0)


class FakeEndpoint:
    def __init__(self, attempts):
        self.attempts = attempts

    def connect(self, factory):
        d = defer.Deferred()
        self.attempts.append((factory, d))
        return d


@pytest.fixture
def connector():
    clock = Clock()
    c = mysql_backend.MySQLConnector(clock, Topology([T1]), lambda u: Credentials(u, "pw"), "",
                                     1 << 20, connect_timeout=10.0)
    c.attempts = []
    c.endpoint = lambda target, timeout=None: FakeEndpoint(c.attempts)
    return c


def connect(attempt):
    factory, d = attempt
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    d.callback(proto)
    return proto


def results(ds):
    out = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_many_sockets_share_one_probe_then_the_cache(connector):
    waiters = [connector.probe() for _ in range(50)]
    assert len(connector.attempts) == 1 and connector.probes_opened == 1
    proto = connect(connector.attempts[0])
    proto.dataReceived(GREETING)
    got = results(waiters)
    assert len(got) == 50 and all(g.server_version == "10.11.6-MariaDB" for g in got)
    more = results([connector.probe() for _ in range(50)])
    assert len(more) == 50 and connector.probes_opened == 1  # no database work per socket
    assert connector.reactor.getDelayedCalls() == []


def test_a_failed_probe_is_remembered_so_sockets_cost_nothing_meanwhile(connector):
    first = results([connector.probe()])
    connector.attempts[0][1].errback(ConnectionRefusedError("refused"))
    assert first[0].check(BackendGone)
    again = results([connector.probe() for _ in range(100)])
    assert all(r.check(BackendGone) for r in again)
    assert connector.probes_opened == 1
    connector.reactor.advance(connector.PROBE_RETRY)
    connector.probe()
    assert connector.probes_opened == 2


def test_a_silent_database_fails_the_probe_at_the_connect_timeout(connector):
    waiter = results([connector.probe()])
    proto = connect(connector.attempts[0])
    assert waiter == []
    connector.reactor.advance(10.0)
    assert waiter[0].check(BackendGone)
    assert "no greeting from the database within 10 s" in waiter[0].getErrorMessage()
    assert proto.transport.disconnecting


def test_a_connect_that_never_completes_is_cancelled_at_the_timeout(connector):
    waiter = results([connector.probe()])
    connector.reactor.advance(10.0)
    assert waiter[0].check(BackendGone)


def test_a_cancelled_waiter_does_not_disturb_the_others(connector):
    a, b = connector.probe(), connector.probe()
    a.addErrback(lambda f: f.trap(defer.CancelledError))
    a.cancel()
    got = results([b])
    connect(connector.attempts[0]).dataReceived(GREETING)
    assert got[0].server_version == "10.11.6-MariaDB"


def test_a_login_greeting_fills_the_cache(connector):
    connector.note_greeting(hs.parse_handshake_v10(GREETING[4:]))
    assert results([connector.probe()])[0].connection_id == 5
    assert connector.probes_opened == 0
