"""Writing on the relay path without a reactor round trip, and backpressure when it matters.

Twisted's `transport.write` only queues: the bytes leave on the next reactor iteration, after two
epoll changes.  On the proxy's request/response path that doubles the event-loop work per message.
`direct_write` sends at once when nothing is queued on a plain TCP transport, and falls back to
the buffered write for the remainder, for TLS transports, or on any socket error (which the
transport then reports the usual way).
"""

import errno

from twisted.internet import tcp
from twisted.logger import Logger

_Connection = tcp.Connection
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
# What direct_write reads of a tcp.Connection to know that nothing is queued: `_tempDataLen`
# is private to Twisted's FileDescriptor (an instance attribute, so it is checked on the first
# TCP transport seen, once).  Without them every write goes through `transport.write`.
_BUFFER_FIELDS = ("_tempDataLen", "dataBuffer", "socket", "TLS")
_direct = None  # None: not checked yet; True/False: the installed Twisted has those fields
log = Logger()


def _check_fields(transport):
    global _direct
    _direct = all(hasattr(transport, name) for name in _BUFFER_FIELDS)
    if not _direct:
        log.warn("Twisted's tcp.Connection lacks {fields}: direct writes are off (every write "
                 "is queued by the transport)", fields=", ".join(_BUFFER_FIELDS))
    return _direct


def direct_write(transport, data):
    """Write *data*; -> True when it all left immediately, False when some was queued."""
    if (isinstance(transport, _Connection) and (_direct or (_direct is None and _check_fields(transport)))
            and not transport.TLS and not transport._tempDataLen and not transport.dataBuffer
            and transport.connected and not transport.disconnecting):
        try:
            sent = transport.socket.send(data)
        except OSError as e:
            if e.errno not in _RETRY:
                transport.write(data)  # the transport notices the error on its own write
                return False
            sent = 0
        if sent == len(data):
            return True
        data = data[sent:]
    transport.write(data)
    return False


class _ReadPauser:
    """Registered as a transport's producer in place of the peer transport itself.

    Pausing and resuming reach the peer; `stopProducing` does not.  Twisted calls stopProducing
    on a closing transport's producer, and the peer here is a pooled database connection (or a
    client) whose life must not end with the other side's.
    """

    __slots__ = ("transport",)

    def __init__(self, transport):
        self.transport = transport

    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        if self.transport.connected:
            self.transport.resumeProducing()

    def stopProducing(self):
        pass


def couple(a, b):
    """Make each transport pause the other's reading while its own send buffer is full."""
    a.registerProducer(_ReadPauser(b), True)
    b.registerProducer(_ReadPauser(a), True)


def uncouple(a, b):
    """Undo `couple`, leaving both transports reading."""
    for t in (a, b):
        if t is not None and getattr(t, "producer", None) is not None:
            t.unregisterProducer()
    for t in (a, b):
        if t is not None and t.connected:
            t.resumeProducing()
