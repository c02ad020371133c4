"""A worker's client sockets accepted on a listening socket handed down by the supervisor
(workers/listen.worker_binder adopts it) carry TCP_NODELAY and keepalive: the binder every proxy
listener goes through (ProxyRuntime.binder) tunes the adopted socket, and the kernel copies the
options on accept.  Read with getsockopt on the accepting side, on the reactor thread."""

import socket
import time

import pytest
from twisted.internet import protocol

try:
    from proxyutil import reactor_thread
except ImportError:
    from tests.integration.proxyutil import reactor_thread

from tests.unit.test_client_socket_options import OPTIONS
from txrdsproxy.proxy import connector
from txrdsproxy.runtime import ProxyRuntime
from txrdsproxy.workers import WorkerIdentity
from txrdsproxy.workers.listen import inherited_sockets, worker_binder


class _Accepting(protocol.Factory):
    def __init__(self):
        self.transports = []

    def buildProtocol(self, addr):
        proto = protocol.Protocol()
        proto.factory = self
        self.transports.append(None)
        original = proto.makeConnection

        def made(transport, i=len(self.transports) - 1):
            self.transports[i] = transport
            original(transport)
        proto.makeConnection = made
        return proto


@pytest.mark.skipif(not connector.INHERITS_SOCKET_OPTIONS,
                    reason="options are copied on accept only on Linux; elsewhere each socket is set")
def test_sockets_accepted_on_a_handed_down_listener_get_the_options(tmp_path):
    from twisted.internet.threads import blockingCallFromThread
    reactor = reactor_thread()
    handed = socket.socket()
    handed.bind(("127.0.0.1", 0))
    handed.listen()
    host, port_number = handed.getsockname()
    worker = WorkerIdentity(index=0, count=2, rundir=str(tmp_path), inherited=inherited_sockets([handed.fileno()]))
    runtime = ProxyRuntime.__new__(ProxyRuntime)  # only its binder property: the path of every listener
    runtime._binder = worker_binder(worker)
    factory = _Accepting()
    port = blockingCallFromThread(reactor, runtime.binder, f"tcp:{port_number}:interface={host}", factory,
                                  reactor, "test")
    client = socket.create_connection((host, port_number))
    try:
        deadline = time.monotonic() + 30  # against a hang, not a promise of speed
        while not (factory.transports and factory.transports[0] is not None):
            assert time.monotonic() < deadline, "the worker's reactor did not accept"
            time.sleep(0.01)
        transport = factory.transports[0]
        values = blockingCallFromThread(reactor, lambda: {
            option: transport.getHandle().getsockopt(level, option) for level, option, _ in OPTIONS})
        assert values == {option: value for _, option, value in OPTIONS}
        assert getattr(port, "client_options_inherited", False)
    finally:
        client.close()
        blockingCallFromThread(reactor, port.stopListening)
        handed.close()
