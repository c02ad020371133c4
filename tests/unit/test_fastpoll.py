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
