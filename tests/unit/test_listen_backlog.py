"""runtime.with_backlog: proxy TCP listeners take bursts of connects (Twisted's default is 50)."""

import pytest
from twisted.internet import endpoints
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from txrdsproxy.runtime import LISTEN_BACKLOG, with_backlog


@pytest.mark.parametrize("listen,expected", [
    ("tcp:6432", "tcp:6432:backlog=%d" % LISTEN_BACKLOG),
    ("tcp:6432:interface=127.0.0.1", "tcp:6432:interface=127.0.0.1:backlog=%d" % LISTEN_BACKLOG),
    ("tcp6:6432:interface=\\:\\:1", "tcp6:6432:interface=\\:\\:1:backlog=%d" % LISTEN_BACKLOG),
    ("tcp:6432:backlog=10", "tcp:6432:backlog=10"),  # the user's choice stays
    ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
])
def test_with_backlog(listen, expected):
    assert with_backlog(listen) == expected


def test_the_result_is_a_valid_endpoint_with_that_backlog():
    reactor = MemoryReactor()
    endpoint = endpoints.serverFromString(reactor, with_backlog("tcp:0:interface=127.0.0.1"))
    endpoint.listen(Factory())
    [(port, _, backlog, interface)] = reactor.tcpServers  # what listenTCP was asked (public API)
    assert (port, backlog, interface) == (0, LISTEN_BACKLOG, "127.0.0.1")
