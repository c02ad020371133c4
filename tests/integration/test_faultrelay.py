"""The fault relay itself (txrdsproxy/testing/faultrelay.py), over real sockets to an echo server."""

import socket

import pytest
from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import blockingCallFromThread

from txrdsproxy.testing.faultrelay import TO_CLIENT, TO_SERVER, Action, FaultRelay, Rule

try:
    from proxyutil import reactor_thread
except ImportError:
    from tests.integration.proxyutil import reactor_thread


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@pytest.fixture
def relay():
    reactor = reactor_thread()
    echo = blockingCallFromThread(
        reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen,
        protocol.Factory.forProtocol(Echo))
    relay = FaultRelay(reactor, "127.0.0.1", echo.getHost().port)
    relay.listen_port = blockingCallFromThread(reactor, relay.listen)
    relay.call = lambda fn, *a: blockingCallFromThread(reactor, fn, *a)
    yield relay
    relay.call(relay.stop)
    blockingCallFromThread(reactor, echo.stopListening)


def client(relay):
    return socket.create_connection(("127.0.0.1", relay.listen_port), timeout=5)


def read_exactly(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_plain_relay_passes_bytes_both_ways(relay):
    with client(relay) as c:
        c.sendall(b"hello")
        assert read_exactly(c, 5) == b"hello"


def test_stall_on_a_pattern_holds_the_rest_until_resume(relay):
    rule = relay.call(relay.add_rule, Rule(TO_CLIENT, b"MARK", Action.STALL, offset=2))
    with client(relay) as c:
        c.sendall(b"abcMARKdef")
        assert read_exactly(c, 5) == b"abcMA"  # stalled mid-pattern: offset 2
        c.settimeout(0.3)
        with pytest.raises(socket.timeout):
            c.recv(10)
        assert rule.fired is not None
        relay.call(relay.resume)
        c.settimeout(5)
        assert read_exactly(c, 5) == b"RKdef"


def test_cut_closes_both_sides_mid_stream(relay):
    relay.call(relay.add_rule, Rule(TO_CLIENT, b"xyz", Action.CUT, offset=1))
    with client(relay) as c:
        c.sendall(b"12xyz34")  # echoed back, cut one byte into the pattern
        assert read_exactly(c, 100) == b"12x"  # what went through, then EOF
    links = relay.call(lambda: list(relay.links))
    assert links[0].how == "cut"


def test_reset_is_a_real_rst(relay):
    relay.call(relay.add_rule, Rule(TO_SERVER, b"boom", Action.RESET))
    with client(relay) as c:
        c.sendall(b"boom")
        with pytest.raises(ConnectionResetError):
            while c.recv(100):
                pass


def test_rules_fire_once_on_the_first_matching_link_only(relay):
    relay.call(relay.add_rule, Rule(TO_SERVER, b"kill", Action.CUT, offset=0))
    with client(relay) as a, client(relay) as b:
        a.sendall(b"kill")
        assert read_exactly(a, 10) == b""
        b.sendall(b"kill")  # the rule has fired: the second link is untouched
        assert read_exactly(b, 4) == b"kill"


def test_pattern_split_across_reads_is_found(relay):
    relay.call(relay.add_rule, Rule(TO_SERVER, b"SPLIT", Action.CUT, offset=0))
    with client(relay) as c:
        c.sendall(b"..SP")
        assert read_exactly(c, 4) == b"..SP"
        c.sendall(b"LIT..")
        assert read_exactly(c, 10) == b""  # cut at the pattern's first byte, sent in the last read
    assert relay.call(lambda: relay.links[0].how) == "cut"


def test_stall_all_and_reset_all(relay):
    with client(relay) as c:
        c.sendall(b"a")
        assert read_exactly(c, 1) == b"a"
        relay.call(relay.stall_all)
        c.sendall(b"b")
        c.settimeout(0.3)
        with pytest.raises(socket.timeout):
            c.recv(1)
        relay.call(relay.reset_all)
        c.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while c.recv(1):
                pass


def test_throttle_paces_delivery_but_loses_nothing(relay):
    relay.throttle = 2000  # bytes per second
    payload = bytes(range(256)) * 8  # 2048 bytes: about a second through the throttle
    with client(relay) as c:
        c.sendall(payload)
        c.settimeout(0.2)
        first = c.recv(4096)
        assert 0 < len(first) < len(payload)  # not all at once
        c.settimeout(10)
        assert first + read_exactly(c, len(payload) - len(first)) == payload


def test_delay_keeps_order(relay):
    relay.delay = 0.2
    with client(relay) as c:
        for i in range(5):
            c.sendall(b"%d" % i)
        assert read_exactly(c, 5) == b"01234"
