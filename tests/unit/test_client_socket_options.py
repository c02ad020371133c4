"""Client socket options set once on the listening socket (connector.tune_client_port) instead of
on every accepted socket: what the running kernel copies on accept, and who sets what."""

import socket
import sys

import pytest
from twisted.internet import protocol

from txrdsproxy.proxy import connector

OPTIONS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
if sys.platform.startswith("linux"):
    OPTIONS += [(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, connector.KEEPALIVE_IDLE),
                (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, connector.KEEPALIVE_INTERVAL),
                (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, connector.KEEPALIVE_COUNT)]


class FakePort:
    def __init__(self, sock):
        self.socket = sock


@pytest.mark.skipif(not connector.INHERITS_SOCKET_OPTIONS,
                    reason="options are copied on accept only on Linux; elsewhere each socket is set")
def test_the_kernel_copies_the_tuned_listening_sockets_options_to_accepted_sockets():
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        for level, option, value in OPTIONS:  # the defaults differ from what the proxy sets
            assert listener.getsockopt(level, option) != value, option
        port = FakePort(listener)
        assert connector.tune_client_port(port) is True and port.client_options_inherited
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        try:
            for level, option, value in OPTIONS:
                assert accepted.getsockopt(level, option) == value, option
        finally:
            accepted.close()
            client.close()
    finally:
        listener.close()


def test_ports_without_a_tcp_socket_are_left_alone(tmp_path):
    unix = socket.socket(socket.AF_UNIX)
    try:
        port = FakePort(unix)
        assert connector.tune_client_port(port) is False
        assert not hasattr(port, "client_options_inherited")
    finally:
        unix.close()
    assert connector.tune_client_port(object()) is False


class CountingTransport:
    """A TCP transport's socket-option calls, counted."""

    def __init__(self, server=None):
        self.server = server
        self.calls = []
        self.handle = self

    def setTcpNoDelay(self, on):
        self.calls.append(("nodelay", on))

    def setTcpKeepAlive(self, on):
        self.calls.append(("keepalive", on))

    def getHandle(self):
        return self

    def setsockopt(self, *args):
        self.calls.append(args)


def test_a_session_accepted_on_a_tuned_port_sets_nothing_else_everything():
    tuned = type("Port", (), {"client_options_inherited": True})()
    inherited = CountingTransport(server=tuned)
    connector.client_socket_ready(inherited)
    assert inherited.calls == []
    for port in (None, object()):  # not tuned (another platform, an adopted socket...)
        own = CountingTransport(server=port)
        connector.client_socket_ready(own)
        assert ("nodelay", True) in own.calls and ("keepalive", 1) in own.calls
        assert len(own.calls) == 2 + (3 if sys.platform.startswith("linux") else 0)


def test_the_proxys_listeners_are_tuned(tmp_path):
    """ProxyRuntime.binder tunes every port it binds (the proxy's Listen and its endpoints')."""
    from txrdsproxy.runtime import ProxyRuntime
    bound = []

    class Port:
        socket = None

    def binder(listen, factory, reactor, what):
        port = Port()
        port.socket = socket.socket()
        bound.append(port)
        return port

    runtime = ProxyRuntime.__new__(ProxyRuntime)
    runtime.binder = binder
    port = runtime.binder("tcp:0", protocol.Factory(), None, "proxy p")
    try:
        assert port is bound[0]
        tuned = connector.INHERITS_SOCKET_OPTIONS
        assert getattr(port, "client_options_inherited", False) is tuned
        assert port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == (1 if tuned else 0)
    finally:
        port.socket.close()
