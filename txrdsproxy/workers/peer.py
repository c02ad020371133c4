"""Cancel requests and MySQL `KILL` for a session another worker holds (`Workers: N`).

A PostgreSQL client cancels on a new connection, which the kernel may give to any worker, and a
MySQL `KILL [QUERY] id` may come from a session of any worker.  The id (BackendKeyData process
id, MySQL connection id) names the worker holding the session (`WorkerIdentity.owner`); a worker
that does not hold it asks the owner through the owner's peer socket, a UNIX socket in the run
directory (mode 0700: only the proxy's user can reach it).  One request per connection:

    b"C" + process id, secret (2 x uint32)      PG cancel: the owner asks the database to cancel
                                                and closes once the database has taken it
    b"K" + flags (1 byte: 1 = QUERY only) + id (uint64) + proxy name and user (uint16 length +
    UTF-8 each)                                 MySQL KILL: the owner answers one line
        b"OK"            done (KILL CONNECTION: that session is ended; or nothing was running)
        b"UNKNOWN"       no such session in that proxy
        b"NOT_OWNER"     a session of another user
        b"THREAD <n>"    KILL QUERY: the database thread serving the session now; the asking
                         worker sends `KILL QUERY <n>` on its own connection (same proxy, same
                         user), as for a local session

    b"V" + length (uint32) + JSON               a verdict of the supervisor's health monitor
                                                (workers/hub.py): the worker applies it and
                                                answers JSON (what its pool still holds)

Every wait is bounded (`PEER_TIMEOUT`); a dead or restarting owner means a cancel is dropped
(like a cancel with a wrong key: PostgreSQL never answers a CancelRequest) and a KILL is
answered "UNKNOWN".
"""

import struct

from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger

__all__ = ["PeerFactory", "forward_cancel", "forward_kill", "send_request", "PEER_TIMEOUT"]

log = Logger()

PEER_TIMEOUT = 10.0  # seconds a forwarded request may take, end to end
MAX_REQUEST = 1 + 1 + 8 + 2 + 1024 + 2 + 1024
MAX_VERDICT = 1 << 20  # a verdict names every target of one proxy: far below this
_VLEN = struct.Struct("!I")
_KEY = struct.Struct("!II")
_KILL = struct.Struct("!BQ")
_LEN = struct.Struct("!H")


def _kill_request(query_only, session_id, proxy_name, user):
    name, who = proxy_name.encode("utf-8")[:1024], user.encode("utf-8")[:1024]
    return (b"K" + _KILL.pack(1 if query_only else 0, session_id) + _LEN.pack(len(name)) + name
            + _LEN.pack(len(who)) + who)


def _parse_kill(buf):
    """-> (query_only, id, proxy name, user), or None while *buf* is not whole."""
    need = 1 + _KILL.size + _LEN.size
    if len(buf) < need:
        return None
    flags, session_id = _KILL.unpack_from(buf, 1)
    (n,) = _LEN.unpack_from(buf, need - _LEN.size)
    if len(buf) < need + n + _LEN.size:
        return None
    name = bytes(buf[need:need + n])
    (m,) = _LEN.unpack_from(buf, need + n)
    start = need + n + _LEN.size
    if len(buf) < start + m:
        return None
    return bool(flags & 1), session_id, name.decode("utf-8", "replace"), \
        bytes(buf[start:start + m]).decode("utf-8", "replace")


class _Peer(protocol.Protocol):
    """The owner's side of one request (see the module docstring)."""

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
        kind = self._buf[:1]
        if len(self._buf) > (1 + _VLEN.size + MAX_VERDICT if kind == b"V" else MAX_REQUEST):
            self._buf = None
            self.transport.abortConnection()
            return
        if kind == b"V":
            if len(self._buf) >= 1 + _VLEN.size:
                (n,) = _VLEN.unpack_from(self._buf, 1)
                if n > MAX_VERDICT:
                    self._buf = None
                    self.transport.abortConnection()
                elif len(self._buf) >= 1 + _VLEN.size + n:
                    payload, self._buf = self._buf[1 + _VLEN.size:1 + _VLEN.size + n], None
                    self._verdict(payload)
        elif kind == b"C":
            if len(self._buf) >= 1 + _KEY.size:
                key, self._buf = _KEY.unpack(self._buf[1:1 + _KEY.size]), None
                self._cancel(key)
        elif kind == b"K":
            request = _parse_kill(self._buf)
            if request is not None:
                self._buf = None
                self._kill(*request)
        elif kind:
            self._buf = None
            self.transport.abortConnection()

    def _cancel(self, key):
        session = self.factory.cancel_registry.get(key)
        if session is None or session.lease is None or session.ctx.connector is None:
            self.transport.loseConnection()
            return
        log.info("cancel request for {s} (passed on by another worker)", s=session)
        done = session.ctx.connector.send_cancel(session.lease.conn)
        done.addBoth(lambda _: self.transport.loseConnection())

    def _verdict(self, payload):
        try:
            answer = self.factory.verdicts(payload)
        except Exception:
            log.failure("applying a verdict of the health monitor failed")
            answer = b""
        self.transport.write(answer)
        self.transport.loseConnection()

    def _kill(self, query_only, session_id, proxy_name, user):
        answer = kill_locally(self.factory.contexts(), query_only, session_id, proxy_name, user)
        self.transport.write(answer)
        self.transport.loseConnection()

    def connectionLost(self, reason=None):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def kill_locally(contexts, query_only, session_id, proxy_name, user):
    """What the owner does for a KILL another worker passed on -> the answer line."""
    ctx = next((c for c in contexts if c.name == proxy_name), None)
    target = None if ctx is None else next((s for s in ctx.sessions if s.id == session_id), None)
    if target is None:
        return b"UNKNOWN"
    if target.user != user:
        return b"NOT_OWNER"
    if not query_only:
        log.info("KILL CONNECTION {t} (passed on by another worker)", t=target)
        target._close_client()
        return b"OK"
    conn = target.lease.conn if target.lease is not None else None
    if conn is None or conn.handshake is None:
        return b"OK"  # nothing running there: nothing to kill
    return b"THREAD %d" % conn.handshake.connection_id


class PeerFactory(protocol.Factory):
    """Serves the peer socket of one worker; *cancel_registry* is the registry's (every PG
    proxy of the process), *contexts* a callable -> the ProxyContexts now (MySQL KILL),
    *clock* bounds each request, *verdicts*(JSON bytes) -> answer bytes applies a verdict of the
    health monitor (workers/hub.py receive_verdict)."""

    noisy = False

    def __init__(self, cancel_registry, clock, contexts=lambda: (), verdicts=lambda payload: b""):
        self.cancel_registry, self.clock, self.contexts = cancel_registry, clock, contexts
        self.verdicts = verdicts

    def buildProtocol(self, addr):
        return _Peer(self)


class _Sender(protocol.Protocol):
    def __init__(self, payload, done, limit=64):
        self.payload, self.done, self.limit = payload, done, limit
        self.answer = b""

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.answer = (self.answer + data)[:self.limit]

    def connectionLost(self, reason=None):
        if not self.done.called:
            self.done.callback(self.answer)


def _ask(worker, owner, payload, reactor):
    """Send *payload* to worker *owner*'s peer socket -> Deferred[bytes]: what it answered
    before closing (b"" when it could not be reached or after PEER_TIMEOUT).  Never fails."""
    return send_request(worker.peer_socket(owner), payload, reactor, PEER_TIMEOUT, 64,
                        f"worker {owner}")


def send_request(path, payload, reactor, timeout, limit, who, quiet=False):
    """Send *payload* to the UNIX socket *path* -> Deferred[bytes]: at most *limit* bytes of
    what it answered before closing (b"" when it could not be reached, or after *timeout*
    seconds).  Never fails; *quiet*: the caller logs failures itself."""
    done = defer.Deferred()
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    factory = protocol.Factory.forProtocol(lambda: _Sender(payload, done, limit))
    factory.noisy = False  # no "Starting factory" log line per request passed on
    connecting = endpoint.connect(factory)
    connected = []
    connecting.addCallback(connected.append)

    def failed(failure):
        if not quiet:
            log.info("request not passed on to {who}: {why}", who=who, why=failure.getErrorMessage())
        if not done.called:
            done.callback(b"")

    connecting.addErrback(failed)

    def timed_out():
        connecting.cancel()
        for proto in connected:  # the owner never answered: give up on it
            proto.transport.abortConnection()
        if not done.called:
            done.callback(b"")

    timer = reactor.callLater(timeout, timed_out)
    done.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
    return done


def forward_cancel(worker, owner, key, reactor):
    """Pass the PG cancel *key* ((process id, secret)) to worker *owner*.  -> Deferred firing
    once the owner has handled it (or could not be reached, or after PEER_TIMEOUT)."""
    return _ask(worker, owner, b"C" + _KEY.pack(*key), reactor)


def forward_kill(worker, owner, query_only, session_id, proxy_name, user, reactor):
    """Pass a MySQL `KILL [QUERY] id` to worker *owner* -> Deferred[bytes], its answer line
    (see the module docstring; b"" when it could not be reached: treat as UNKNOWN)."""
    return _ask(worker, owner, _kill_request(query_only, session_id, proxy_name, user), reactor)
