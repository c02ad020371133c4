"""The two places the proxy reads private Twisted attributes (DESIGN: "no private Twisted
attributes without a guard and a test"): each is checked against the installed Twisted (so an
upgrade that renames them fails here, loudly) and works without them (the guard's fallback).

- proxy/relay.direct_write reads tcp.Connection's `_tempDataLen` to know nothing is queued;
- tls.start_tls points TLSMemoryBIOProtocol's `_aggregator._clock` at the injected clock.
"""

import errno

import pytest
from twisted.internet import protocol, ssl, tcp
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory

from txrdsproxy import tls
from txrdsproxy.proxy import relay


class Socket:
    """What tcp.Connection uses of a socket; `send` takes at most `room` bytes."""

    def __init__(self, room=1 << 20):
        self.room = room
        self.sent = bytearray()

    def setblocking(self, flag):
        pass

    def fileno(self):
        return 99

    def send(self, data):
        if self.room == 0:
            raise BlockingIOError(errno.EAGAIN, "would block")
        n = min(len(data), self.room)
        self.sent += data[:n]
        self.room -= n
        return n


def connection(room=1 << 20):
    reactor = MemoryReactor()
    conn = tcp.Connection(Socket(room), protocol.Protocol(), reactor)
    conn.connected = True
    return conn


@pytest.fixture(autouse=True)
def fresh_check(monkeypatch):
    monkeypatch.setattr(relay, "_direct", None)  # the once-per-process check runs again


def test_installed_twisted_has_the_fields_direct_write_reads():
    conn = connection()
    assert relay.direct_write(conn, b"hello") is True
    assert conn.socket.sent == b"hello" and not conn.dataBuffer and relay._direct is True


def test_what_does_not_fit_is_queued_by_the_transport():
    conn = connection(room=3)
    assert relay.direct_write(conn, b"hello") is False
    assert conn.socket.sent == b"hel"
    conn.doWrite()  # the reactor's turn: the rest leaves
    assert conn.socket.sent == b"hel"  # still no room ...
    conn.socket.room = 10
    conn.doWrite()
    assert conn.socket.sent == b"hello"


def test_queued_bytes_keep_their_order():
    conn = connection(room=0)
    assert relay.direct_write(conn, b"first ") is False  # would block: queued
    conn.socket.room = 100
    assert relay.direct_write(conn, b"second") is False  # something is queued: queue behind it
    conn.doWrite()
    assert conn.socket.sent == b"first second"


def test_without_the_private_fields_every_write_is_queued(monkeypatch):
    """A Twisted that renamed `_tempDataLen`: the guard turns direct writes off, nothing breaks."""
    conn = connection()
    del conn._tempDataLen  # as a Twisted without the field (instance attribute)
    monkeypatch.setattr(tcp.Connection, "write", lambda self, data: queued.append(data))
    queued = []
    assert relay.direct_write(conn, b"hello") is False
    assert queued == [b"hello"] and conn.socket.sent == b"" and relay._direct is False


class _Transport:
    def startTLS(self, creator):
        self.creator = creator
        self.protocol = self.make_protocol()


def test_installed_twisted_tls_protocol_has_the_aggregator_start_tls_moves():
    clock = Clock()
    wrapped = protocol.Protocol()
    transport = _Transport()
    factory = TLSMemoryBIOFactory(ssl.optionsForClientTLS("db.example"), True, protocol.Factory())
    transport.make_protocol = lambda: factory.protocol(factory, wrapped, False)  # as startTLS does
    tls.start_tls(transport, "creator", clock)
    assert transport.protocol._aggregator._clock is clock


def test_start_tls_without_the_private_aggregator_still_starts_tls():
    transport = _Transport()
    transport.make_protocol = lambda: protocol.Protocol()  # no _aggregator: nothing to move
    tls.start_tls(transport, "creator", Clock())
    assert transport.creator == "creator"
