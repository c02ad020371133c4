"""The epoll reactor's event dispatch without the legacy log context, and with plain TCP reads
done in the loop itself, for the relay's hot path.

For every ready socket, Twisted's `EPollReactor.doPoll` calls
`twisted.python.log.callWithLogger(selectable, _doReadOrWrite, ...)`, which asks the selectable
for its `logPrefix()`, copies the legacy log context dict, pushes it on the context stack and
pops it after the read: six Python calls per socket event, whose only use is the `system` field
of *legacy* `twisted.python.log.msg`/`err` events emitted during the read.  The proxy logs with
`twisted.logger`, whose events never read that context.  On the PostgreSQL relay path (two
socket events per pgbench -S transaction) these calls were about a tenth of the proxy's CPU.

A read event (EPOLLIN alone) on a TCP connection (`tcp.Server`, `tcp.Client`) then goes through
`_doReadOrWrite` -> `fileno` -> `doRead` -> `_dataReceived` -> (for a connection made through an
endpoint, `_WrappingProtocol.dataReceived`) -> the protocol's `dataReceived`.  `_do_poll` does
what that chain does, inline: `recv(bufferSize)`; data goes to the protocol (the endpoint's
wrapper is stepped over: it only forwards); b"" disconnects with ConnectionDone, an error other
than EWOULDBLOCK with ConnectionLost, an exception from the protocol is logged and disconnects
with that exception -- each through the reactor's own `_disconnectSelectable`, as
`_doReadOrWrite` does.  Any other event (write, hang-up, error, several at once) and any other
selectable keep `_doReadOrWrite`.  TLS connections qualify too: their transport's protocol is the
TLS layer, which `doRead` feeds the same way.  One difference: a closed socket still registered
(`fileno() == -1`, which Twisted checks first) fails its recv with EBADF, so it is disconnected
with ConnectionLost instead of ConnectionFdescWentAway.

`install(reactor)` replaces the reactor's `doIteration` (an instance attribute, nothing of the
class is touched) with `_do_poll`.  What is lost: a legacy log line emitted inside a read
(Twisted's own "Unhandled Error" when a protocol raises) carries `system` "-" instead of the
connection's prefix; the error itself is still logged, and an exception escaping a dispatch is
logged as `callWithLogger` would and does not stop the loop.

Guards (the loop reads private reactor attributes): installed only on an `EPollReactor` whose
`doPoll` is Twisted's own and still dispatches through `callWithLogger`, and which has the
`_poller`, `_selectables`, `_doReadOrWrite` and `_disconnectSelectable` it uses; otherwise the
reactor is left as it is and a warning says why.  The inline read is used only for classes whose
`doRead`/`_dataReceived` are `tcp.Connection`'s and read what the inline copy assumes
(`plain_readers`); otherwise every event keeps `_doReadOrWrite`.  tests/unit/test_fastpoll.py
checks all of it against the installed Twisted.
"""

import errno
import sys
import types

from twisted.internet import main, tcp
from twisted.logger import Logger

try:
    from twisted.internet.endpoints import _WrappingProtocol
except ImportError:  # a Twisted without it: no wrapper to step over
    _WrappingProtocol = None

__all__ = ["install", "installable", "plain_readers"]

log = Logger()
_FIELDS = ("_poller", "_selectables", "_doReadOrWrite", "_disconnectSelectable", "_POLL_IN")
_EWOULDBLOCK = errno.EWOULDBLOCK
# PyPy: `recv(bufferSize)` puts a 64 KiB buffer in the GC nursery for every read, however few
# bytes came (a login's 7 reads fill the nursery about once: measured, 4760 minor collections
# for 6000 pgbench -C logins, and the premature promotions feed major collections).  There the
# inline read receives into one buffer of the loop's own and copies out only what arrived.
# CPython's recv allocates and shrinks in place: it keeps recv.
_RECV_INTO = sys.implementation.name == "pypy"
# What tcp.Connection's reading does, by the names its code uses: the inline copy in _do_poll is
# right only while these hold (checked against the installed Twisted, and by the tests).
_DOREAD_NAMES = {"socket", "recv", "bufferSize", "_dataReceived", "EWOULDBLOCK", "CONNECTION_LOST"}
_DATA_NAMES = {"protocol", "dataReceived", "CONNECTION_DONE"}


def installable(reactor):
    """-> None when `install` may replace *reactor*'s dispatch, else why not (a sentence)."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return "no epoll reactor here"
    if not isinstance(reactor, EPollReactor):
        return f"the reactor is {type(reactor).__name__}, not EPollReactor"
    cls = type(reactor)
    if cls.doPoll is not EPollReactor.doPoll or cls.doIteration is not EPollReactor.doPoll:
        return "the reactor's doPoll is not Twisted's EPollReactor.doPoll"
    if "callWithLogger" not in EPollReactor.doPoll.__code__.co_names:
        return "EPollReactor.doPoll no longer dispatches through callWithLogger"
    missing = [name for name in _FIELDS if not hasattr(reactor, name)]
    if missing:
        return "EPollReactor lacks " + ", ".join(missing)
    return None


def _names(function):
    code = getattr(function, "__code__", None)
    return set(code.co_names) if code is not None else set()


def plain_readers():
    """-> the transport classes whose read events `_do_poll` handles inline: `tcp.Server` and
    `tcp.Client` while their reading is `tcp.Connection`'s as this module copies it (an empty
    set otherwise: every event keeps `_doReadOrWrite`)."""
    base = tcp.Connection
    if not (_DOREAD_NAMES <= _names(base.doRead) and _DATA_NAMES <= _names(base._dataReceived)):
        return frozenset()
    if getattr(base, "bufferSize", None) is None:
        return frozenset()
    return frozenset(cls for cls in (tcp.Server, tcp.Client)
                     if cls.doRead is base.doRead and cls._dataReceived is base._dataReceived)


def _steps_over_wrapper():
    """-> the endpoint wrapper class whose dataReceived only forwards to `_wrappedProtocol`
    (stepped over by the inline read), or None (not stepped over)."""
    if _WrappingProtocol is None:
        return None
    if _names(_WrappingProtocol.dataReceived) != {"_wrappedProtocol", "dataReceived"}:
        return None
    return _WrappingProtocol


def install(reactor):
    """Dispatch *reactor*'s socket events without the legacy log context, plain TCP reads inline
    (see the module doc).  -> True when installed, False when the guard refused (logged)."""
    why = installable(reactor)
    if why is not None:
        log.warn("socket events keep Twisted's dispatch: {why}", why=why)
        return False
    readers = plain_readers()
    if not readers:
        log.warn("TCP reads keep Twisted's doRead: tcp.Connection's reading is not what"
                 " txrdsproxy.fastpoll copies")
    reactor._txrdsproxy_plain_readers = readers
    reactor._txrdsproxy_wrapper = _steps_over_wrapper()
    if _RECV_INTO:  # one receive buffer for the loop (single-threaded; copied out at once)
        reactor._txrdsproxy_recv_buffer = memoryview(bytearray(tcp.Connection.bufferSize))
    reactor.doIteration = types.MethodType(_do_poll, reactor)
    return True


def _do_poll(self, timeout):
    """EPollReactor.doPoll, dispatching each event straight to `_doReadOrWrite`, or for a read
    event of a plain TCP connection, reading it here (see the module doc)."""
    if timeout is None:
        timeout = -1  # wait indefinitely
    selectables = self._selectables
    try:
        events = self._poller.poll(timeout, len(selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    dispatch = self._doReadOrWrite
    readers = getattr(self, "_txrdsproxy_plain_readers", ())
    wrapper = getattr(self, "_txrdsproxy_wrapper", None)
    pollin = getattr(self, "_POLL_IN", None)
    into = getattr(self, "_txrdsproxy_recv_buffer", None)
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            if type(selectable) not in readers or event != pollin:
                dispatch(selectable, fd, event)
                continue
            # tcp.Connection.doRead + _dataReceived, as _doReadOrWrite runs them
            try:
                if into is None:
                    data = selectable.socket.recv(selectable.bufferSize)
                else:  # PyPy (see _RECV_INTO); at most the class's bufferSize, as recv
                    data = into[:selectable.socket.recv_into(into)].tobytes()
            except OSError as se:
                if se.args[0] == _EWOULDBLOCK:
                    continue
                why = main.CONNECTION_LOST
            else:
                if data:
                    protocol = selectable.protocol
                    if type(protocol) is wrapper:  # an endpoint's: it only forwards
                        protocol = protocol._wrappedProtocol
                    try:
                        protocol.dataReceived(data)
                        continue
                    except BaseException as e:  # as _doReadOrWrite: logged, then disconnected
                        log.failure("unhandled error reading from {s!r}", s=selectable)
                        why = e
                else:
                    why = main.CONNECTION_DONE
            self._disconnectSelectable(selectable, why, True)
        except KeyboardInterrupt:
            raise
        except BaseException:  # as callWithLogger: logged, the loop goes on
            log.failure("unexpected error dispatching a socket event of {s!r}", s=selectable)
