"""Before authentication (issue 6 item 11): limits decided at accept, a first-packet deadline,
the auth deadline, and rate-limited CancelRequests.  PostgreSQL frontend on task.Clock; the
MySQL side's accept-time errors are in test_mysql_frontend."""

from twisted.internet.task import Clock

from txrdsproxy.proxy.limits import Admission, Refusal
from txrdsproxy.proxy.pg_frontend import PgFrontend
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import SSL_REQUEST_CODE

from tests.unit.test_pg_frontend import (
    ClientTransport, FakeConnector, Harness, _cancel_request, fatal, proxy_config,
)

SSL_REQUEST = b"\0\0\0\x08" + SSL_REQUEST_CODE.to_bytes(4, "big")


def another(harness):
    """A second client socket accepted by the same proxy."""
    frontend = PgFrontend(harness.ctx)
    transport = ClientTransport()
    frontend.makeConnection(transport)
    return frontend, transport


def test_admission_counts_every_open_socket_and_the_rate():
    clock = Clock()
    admission = Admission(proxy_config(MaxClientConnections=2, MaxConnectionRate=2), clock)
    assert admission.admit(1) is None and admission.admit(2) is None
    assert admission.admit(3) is Refusal.TOO_MANY_CONNECTIONS
    assert admission.admit(2) is Refusal.CONNECTION_RATE  # two tokens used this second
    clock.advance(0.5)
    assert admission.admit(2) is None
    assert admission.refused == {Refusal.TOO_MANY_CONNECTIONS: 1, Refusal.CONNECTION_RATE: 1}


def test_too_many_clients_is_decided_at_accept_and_answers_the_first_packet():
    first = Harness(MaxClientConnections=1)  # a silent socket still counts
    frontend, transport = another(first)
    assert frontend.refusal is Refusal.TOO_MANY_CONNECTIONS
    assert transport.value() == b""  # PostgreSQL clients speak first: nothing is read yet
    frontend.dataReceived(msg.startup_message({"user": "bob", "database": "app"}))
    error = fatal(transport.value())
    assert (error["C"], error["M"]) == ("53300", "The maximum number of client connections to the proxy exceeded 1.")
    assert transport.disconnecting
    assert first.pool.requests == []  # no database work for a refused client


def test_a_refused_client_that_asks_for_tls_gets_the_error_after_the_startup_message():
    """libpq 17 no longer shows an error answer to SSLRequest: the refusal waits for the
    StartupMessage, which must come within the first-packet deadline too."""
    first = Harness(MaxClientConnections=1)
    frontend, transport = another(first)
    frontend.dataReceived(SSL_REQUEST)
    assert transport.value() == b"N"
    transport.clear()
    frontend.dataReceived(msg.startup_message({"user": "bob"}))
    assert fatal(transport.value())["C"] == "53300"
    assert transport.disconnecting


def test_the_startup_message_after_an_ssl_request_has_its_own_short_deadline():
    h = Harness()
    h.clock.advance(4)
    h.send(SSL_REQUEST)
    assert h.sent() == b"N"
    h.clock.advance(4.9)
    assert not h.closed
    h.clock.advance(0.1)
    assert h.closed


def test_connection_rate_counts_sockets_at_accept():
    first = Harness(MaxConnectionRate=1)
    frontend, transport = another(first)  # never sends anything, still uses the rate
    assert frontend.refusal is Refusal.CONNECTION_RATE
    frontend.dataReceived(msg.startup_message({"user": "bob"}))
    assert fatal(transport.value())["M"] == "Rate of connection to proxy exceeded 1."
    first.clock.advance(1)
    assert another(first)[0].refusal is None


def test_silent_socket_is_closed_at_the_first_packet_deadline():
    h = Harness()
    h.clock.advance(4.9)
    assert not h.closed
    h.clock.advance(0.1)
    assert h.closed and h.sent() == b""


def test_half_a_startup_packet_is_not_a_first_packet():
    h = Harness(ClientFirstPacketTimeout=2)
    h.send(msg.startup_message({"user": "bob"})[:6])
    h.clock.advance(2)
    assert h.closed


def test_a_whole_first_packet_stops_the_first_deadline_the_auth_deadline_goes_on():
    h = Harness(ClientAuthTimeout=20)
    h.startup()
    h.sent()
    h.clock.advance(19)
    assert not h.closed
    h.clock.advance(1)
    assert fatal(h.sent())["M"] == "Authentication timed out."


def test_cancel_requests_are_rate_limited():
    s = Harness(MaxCancelRate=1)
    s.login()
    s.ctx.connector = FakeConnector()
    s.send(msg.query("SELECT pg_sleep(10)"))
    s.pool.give()
    _cancel_request(s)
    assert len(s.ctx.connector.cancels) == 1
    dropped = _cancel_request(s)
    assert dropped.disconnecting and dropped.value() == b""
    assert len(s.ctx.connector.cancels) == 1  # not passed on to the database
    assert s.ctx.admission.cancels_dropped == 1
    s.clock.advance(1)
    _cancel_request(s)
    assert len(s.ctx.connector.cancels) == 2


def test_client_sockets_get_tcp_keepalive():
    class TCP(ClientTransport):
        keepalive = None

        def setTcpKeepAlive(self, on):
            self.keepalive = on

    h = Harness()
    frontend = PgFrontend(h.ctx)
    transport = TCP()
    frontend.makeConnection(transport)
    assert transport.keepalive == 1


def test_liveness_keys_load_with_defaults_and_ranges():
    import pytest
    from txrdsproxy.config.load import ConfigError

    p = proxy_config()
    assert (p.client_first_packet_timeout, p.client_auth_timeout, p.max_cancel_rate,
            p.database_connect_timeout, p.database_operation_timeout) == (5.0, 60.0, 100.0, 30.0, 30.0)
    p = proxy_config(DatabaseConnectTimeout=3, DatabaseOperationTimeout=4)
    assert (p.database_connect_timeout, p.database_operation_timeout) == (3.0, 4.0)
    with pytest.raises(ConfigError, match="ClientFirstPacketTimeout"):
        proxy_config(ClientFirstPacketTimeout=0)
