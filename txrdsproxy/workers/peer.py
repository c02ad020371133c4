"""Cancel requests for a session another worker holds (`Workers: N`).

A PostgreSQL client cancels on a new connection, which the kernel may give to any worker.  The
BackendKeyData process id it got names the worker holding its session (`WorkerIdentity.owner`);
a worker that does not hold the key passes the request's 8 bytes (process id, secret) to the
owner's peer socket, a UNIX socket in the run directory (mode 0700: only the proxy's user can
reach it).  The owner looks the key up as a cancel arriving on its own port would be, asks the
database to cancel, and closes the peer connection once the database has taken it; the worker
that accepted the client's cancel closes the client's connection then, as PostgreSQL does.

Every wait is bounded (`PEER_TIMEOUT`); a dead or restarting owner means the cancel is dropped,
like a cancel with a wrong key (PostgreSQL never answers a CancelRequest).
"""

import struct

from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger

__all__ = ["PeerFactory", "forward_cancel", "PEER_TIMEOUT"]

log = Logger()

PEER_TIMEOUT = 10.0  # seconds a forwarded cancel may take, end to end
_KEY = struct.Struct("!II")


class _PeerCancel(protocol.Protocol):
    """The owner's side: 8 bytes (process id, secret), then close once the cancel is sent."""

    def __init__(self, factory):
        self.factory = factory
        self._buf = b""
        self._timer = None

    def connectionMade(self):
        self._timer = self.factory.clock.callLater(PEER_TIMEOUT, self.transport.abortConnection)

    def dataReceived(self, data):
        if self._buf is None:
            return
        self._buf += data
        if len(self._buf) < _KEY.size:
            return
        key, self._buf = _KEY.unpack(self._buf[:_KEY.size]), None
        session = self.factory.cancel_registry.get(key)
        if session is None or session.lease is None or session.ctx.connector is None:
            self.transport.loseConnection()
            return
        log.info("cancel request for {s} (passed on by another worker)", s=session)
        done = session.ctx.connector.send_cancel(session.lease.conn)
        done.addBoth(lambda _: self.transport.loseConnection())

    def connectionLost(self, reason=None):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class PeerFactory(protocol.Factory):
    """Serves the peer socket of one worker; *cancel_registry* is the registry's (every PG
    proxy of the process), *clock* bounds each request."""

    noisy = False

    def __init__(self, cancel_registry, clock):
        self.cancel_registry, self.clock = cancel_registry, clock

    def buildProtocol(self, addr):
        return _PeerCancel(self)


class _Sender(protocol.Protocol):
    def __init__(self, payload, done):
        self.payload, self.done = payload, done

    def connectionMade(self):
        self.transport.write(self.payload)

    def connectionLost(self, reason=None):
        if not self.done.called:
            self.done.callback(None)


def forward_cancel(worker, owner, key, reactor):
    """Pass the cancel *key* ((process id, secret)) to worker *owner*'s peer socket.

    -> Deferred[None] that fires once the owner has handled it (closed the peer connection),
    or could not be reached, or after PEER_TIMEOUT.  It never fails."""
    done = defer.Deferred()
    endpoint = UNIXClientEndpoint(reactor, worker.peer_socket(owner), timeout=PEER_TIMEOUT)
    connecting = endpoint.connect(protocol.Factory.forProtocol(lambda: _Sender(_KEY.pack(*key), done)))

    def failed(failure):
        log.info("cancel request not passed on to worker {owner}: {why}", owner=owner,
                 why=failure.getErrorMessage())
        if not done.called:
            done.callback(None)

    connected = []
    connecting.addCallback(connected.append)
    connecting.addErrback(failed)

    def timed_out():
        connecting.cancel()
        for proto in connected:  # the owner never answered: give up on it
            proto.transport.abortConnection()
        if not done.called:
            done.callback(None)

    timer = reactor.callLater(PEER_TIMEOUT, timed_out)
    done.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
    return done
