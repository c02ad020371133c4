"""txrdsproxy/fastpoll.py against the installed Twisted: the guard, and a real epoll reactor
relaying bytes over loopback with the replaced dispatch."""

import errno

import pytest
from twisted.internet import protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from txrdsproxy import fastpoll

epollreactor = pytest.importorskip("twisted.internet.epollreactor",
                                   reason="epoll is Linux only (the proxy's production reactor)")


@pytest.fixture
def reactor():
    r = epollreactor.EPollReactor()
    yield r
    r.removeAll()
    r.waker.connectionLost(None)
    r._poller.close()


def test_installed_twisted_passes_the_guard(reactor):
    assert fastpoll.installable(reactor) is None
    assert fastpoll.install(reactor) is True
    assert reactor.doIteration.__func__ is fastpoll._do_poll
    assert type(reactor).doIteration is epollreactor.EPollReactor.doPoll  # the class is untouched


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Client(protocol.Protocol):
    def __init__(self):
        self.got = b""

    def connectionMade(self):
        self.transport.write(b"x" * 100000)  # more than one read

    def dataReceived(self, data):
        self.got += data


def test_loopback_relay_through_the_replaced_dispatch(reactor):
    assert fastpoll.install(reactor)
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    client = Client()
    reactor.connectTCP("127.0.0.1", port.getHost().port, _OneProtocol(client))
    for _ in range(2000):
        reactor.iterate(0.01)
        if len(client.got) >= 100000:
            break
    assert client.got == b"x" * 100000
    client.transport.loseConnection()
    port.stopListening()
    for _ in range(20):
        reactor.iterate(0.01)


class _OneProtocol(protocol.ClientFactory):
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class FakePoller:
    def __init__(self, events=None, error=None):
        self.events, self.error = events or [], error

    def poll(self, timeout, maxevents):
        if self.error is not None:
            raise self.error
        return self.events


class FakeReactor:
    def __init__(self, poller, selectables, dispatch):
        self._poller, self._selectables, self._doReadOrWrite = poller, selectables, dispatch


def test_an_exception_from_one_event_is_logged_and_the_others_still_dispatched(monkeypatch):
    logged = []
    monkeypatch.setattr(fastpoll, "log", Logger(observer=logged.append))
    done = []

    def dispatch(selectable, fd, event):
        if selectable == "bad":
            raise RuntimeError("boom")
        done.append((selectable, fd, event))

    fake = FakeReactor(FakePoller([(3, 1), (9, 1), (4, 4)]), {3: "bad", 4: "good"}, dispatch)
    fastpoll._do_poll(fake, 0.5)  # fd 9 is not registered (closed meanwhile): skipped
    assert done == [("good", 4, 4)]
    [event] = logged
    assert event["log_failure"].check(RuntimeError) and "'bad'" in event["log_format"].format(**event)


def test_eintr_returns_quietly_other_errors_propagate():
    fastpoll._do_poll(FakeReactor(FakePoller(error=InterruptedError(errno.EINTR, "intr")), {}, None), None)
    with pytest.raises(OSError):
        fastpoll._do_poll(FakeReactor(FakePoller(error=OSError(errno.EBADF, "bad")), {}, None), None)


def test_guard_refuses_other_reactors_and_changed_twisted(reactor):
    memory = MemoryReactorClock()
    assert "not EPollReactor" in fastpoll.installable(memory)
    assert fastpoll.install(memory) is False and not hasattr(memory, "doIteration")

    class Custom(epollreactor.EPollReactor):
        def doPoll(self, timeout):
            return super().doPoll(timeout)

    custom = Custom()
    try:
        assert "not Twisted's" in fastpoll.installable(custom)
        before = custom.doIteration
        assert fastpoll.install(custom) is False and custom.doIteration == before
    finally:
        custom._poller.close()

    saved = reactor._selectables
    del reactor._selectables  # a Twisted that renamed the field
    try:
        assert "lacks _selectables" in fastpoll.installable(reactor)
        assert fastpoll.install(reactor) is False
    finally:
        reactor._selectables = saved


# -- the inline read of plain TCP connections ------------------------------------------------------

def test_the_installed_twisted_reads_tcp_as_the_inline_copy_assumes():
    from twisted.internet import endpoints, tcp
    assert fastpoll.plain_readers() == {tcp.Server, tcp.Client}
    assert fastpoll._steps_over_wrapper() is endpoints._WrappingProtocol


def test_a_changed_tcp_read_turns_the_inline_read_off(monkeypatch, reactor):
    from twisted.internet import tcp

    def doRead(self):  # a Twisted whose reading is not what the inline copy does
        return None

    monkeypatch.setattr(tcp.Connection, "doRead", doRead)
    assert fastpoll.plain_readers() == frozenset()
    assert fastpoll.install(reactor)
    assert reactor._txrdsproxy_plain_readers == frozenset()  # dispatch only


class Recorder(protocol.Protocol):
    def __init__(self):
        self.got, self.lost = b"", []

    def dataReceived(self, data):
        assert type(data) is bytes  # as Twisted's doRead hands them (never a view of a buffer)
        self.got += data

    def connectionLost(self, reason):
        self.lost.append(reason)


def _counting_dispatch(reactor):
    calls = []
    real = reactor._doReadOrWrite

    def dispatch(selectable, fd, event):
        calls.append((type(selectable), event))
        return real(selectable, fd, event)

    reactor._doReadOrWrite = dispatch
    return calls


@pytest.mark.parametrize("recv_into", [False, True], ids=["recv", "recv_into (PyPy's way)"])
def test_reads_on_real_sockets_go_inline_and_an_end_of_stream_is_connection_done(reactor, recv_into):
    from twisted.internet import endpoints, error
    assert fastpoll.install(reactor)
    assert hasattr(reactor, "_txrdsproxy_recv_buffer") is fastpoll._RECV_INTO
    if recv_into:  # what install does on PyPy, here on any interpreter
        reactor._txrdsproxy_recv_buffer = memoryview(bytearray(65536))
    else:
        reactor.__dict__.pop("_txrdsproxy_recv_buffer", None)
    calls = _counting_dispatch(reactor)
    server = Recorder()
    port = reactor.listenTCP(0, _OneProtocol(server), interface="127.0.0.1")
    client = Recorder()
    # through an endpoint, as the proxy's database connections: a _WrappingProtocol in between
    d = endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
    connected = []
    d.addCallback(connected.append)
    for _ in range(3000):
        reactor.iterate(0.01)
        if connected and server.transport is not None:
            break
    assert connected and type(client.transport.protocol) is endpoints._WrappingProtocol
    server.transport.write(b"to the client")
    client.transport.write(b"to the server")
    for _ in range(3000):
        reactor.iterate(0.01)
        if (server.got, client.got) == (b"to the server", b"to the client"):
            break
    assert (server.got, client.got) == (b"to the server", b"to the client")
    from twisted.internet import tcp
    assert any(cls is tcp.Port for cls, _ in calls)  # the accept: Twisted's dispatch
    # both reads were done inline: no _doReadOrWrite for a connection's read event
    assert [(cls, e) for cls, e in calls if cls in (tcp.Server, tcp.Client) and e & reactor._POLL_IN] == []
    client.transport.loseConnection()
    for _ in range(3000):
        reactor.iterate(0.01)
        if server.lost and client.lost:
            break
    assert server.lost[0].check(error.ConnectionDone)
    port.stopListening()
    for _ in range(5):
        reactor.iterate(0.01)


class FakeSocket:
    def __init__(self, result):
        self.result = result

    def recv(self, size):
        assert size == 65536
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def recv_into(self, buffer):
        assert len(buffer) == 65536
        if isinstance(self.result, BaseException):
            raise self.result
        buffer[:len(self.result)] = self.result
        return len(self.result)


class FakeConn:
    bufferSize = 65536

    def __init__(self, result, proto):
        self.socket, self.protocol = FakeSocket(result), proto


class InlineReactor(FakeReactor):
    _POLL_IN = 1

    def __init__(self, events, selectables):
        self.dispatched, self.disconnected = [], []
        super().__init__(FakePoller(events), selectables,
                         lambda s, fd, event: self.dispatched.append((s, event)))
        self._txrdsproxy_plain_readers = frozenset({FakeConn})
        self._txrdsproxy_wrapper = Wrapper

    def _disconnectSelectable(self, selectable, why, is_read):
        self.disconnected.append((selectable, why, is_read))


class Wrapper:
    def __init__(self, inner):
        self._wrappedProtocol = inner

    def dataReceived(self, data):
        raise AssertionError("the wrapper is stepped over")


class Boom(protocol.Protocol):
    def dataReceived(self, data):
        raise ValueError("bug in a protocol")


@pytest.mark.parametrize("recv_into", [False, True], ids=["recv", "recv_into (PyPy's way)"])
def test_inline_read_outcomes_are_those_of_twisteds_read(monkeypatch, recv_into):
    from twisted.internet import main
    logged = []
    monkeypatch.setattr(fastpoll, "log", Logger(observer=logged.append))
    data, wrapped, again, reset, done, boom, both = (
        FakeConn(b"abc", Recorder()), FakeConn(b"xyz", Wrapper(Recorder())),
        FakeConn(BlockingIOError(errno.EWOULDBLOCK, "again"), Recorder()),
        FakeConn(ConnectionResetError(errno.ECONNRESET, "reset"), Recorder()),
        FakeConn(b"", Recorder()), FakeConn(b"q", Boom()), FakeConn(b"w", Recorder()))
    fake = InlineReactor([(3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 5), (10, 1)],
                         {3: data, 4: wrapped, 5: again, 6: reset, 7: done, 8: boom, 9: both,
                          10: "not a tcp connection"})
    if recv_into:
        fake._txrdsproxy_recv_buffer = memoryview(bytearray(65536))
    fastpoll._do_poll(fake, 0)
    assert data.protocol.got == b"abc"
    assert wrapped.protocol._wrappedProtocol.got == b"xyz"
    # EPOLLIN|EPOLLOUT and other selectables keep Twisted's dispatch
    assert fake.dispatched == [(both, 5), ("not a tcp connection", 1)]
    assert [(s, is_read) for s, _, is_read in fake.disconnected] == [(reset, True), (done, True),
                                                                      (boom, True)]
    whys = [why for _, why, _ in fake.disconnected]
    assert whys[0] is main.CONNECTION_LOST and whys[1] is main.CONNECTION_DONE
    assert isinstance(whys[2], ValueError)  # as _doReadOrWrite: the exception itself
    [event] = logged
    assert event["log_failure"].check(ValueError)
