"""One incremental scanner for typed PostgreSQL messages, used in both directions.

Every byte the proxy relays after login passes through a `MessageScanner`: client -> database
(the session's scanner, which also feeds the pinning classifier and the statement tracker) and
database -> client (the backend connection's).  It exists once so that one piece of code knows,
at any moment, whether the stream stands at a message boundary and how much of the current
message has been passed on -- the fact a connection's release depends on (DESIGN rule 9).

How it reads:

- a per-kind table says, for each message type byte, whether the consumer looks inside
  (`limits[kind] > 0`: the number of body bytes it needs), streams it unseen (`0`) or refuses it
  (`-1`: ProtocolViolation);
- a message the consumer looks inside is held until its first `limits[kind]` body bytes (or the
  whole body, if shorter) are here, then handed to `inspect(kind, body)`; `whole` says whether
  *body* is all of it.  The rest of a longer message streams through as it arrives;
- everything else streams: header and body go out as they arrive, never buffered.

So the memory a scanner holds is bounded by the largest limit plus a header, whatever the
lengths, and each byte is copied a constant number of times (the held part is copied into the
buffer, then out of it once it is complete; no `partial + data` join per read): cost is linear.

What `inspect` returns decides what goes out:

- None: the message goes out unchanged;
- bytes: they replace the header and the inspected body bytes (a rewritten message; for a
  message longer than its limit the replacement must carry the new total length, and the rest
  of the body follows unchanged);
- DROP: the (whole) message is swallowed;
- HALT: the (whole) message goes out, then scanning stops with `halted` set; whatever follows
  stays buffered until `scan()` is called (after the consumer changed mode: released the
  connection, finished a login step...);
- DROP_HALT: the (whole) message is swallowed and scanning halts.
- HOLD: nothing of the message goes out and scanning halts before it: it stays buffered, whole
  or not, and is inspected again when `scan()` resumes (the consumer must decide a boundary
  first: the connection the message goes to is not known yet).

All output of one `feed` goes to `emit` in one call (one send per read).  With `hold` set the
scanner only buffers (nothing is scanned: the session has no database connection yet); with
`emit` None scanned bytes are dropped (internal reads, refused requests).

Pure: no Twisted, no sockets.
"""

import struct

from txrdsproxy.wire.pg.framing import ProtocolViolation

__all__ = ["MessageScanner", "HALT", "DROP", "DROP_HALT", "HOLD", "limits_table", "maxima_table",
           "uniform_maxima"]

HALT = 1
DROP = 2
DROP_HALT = 3
HOLD = 4

_unpack_len = struct.Struct("!I").unpack_from
_STREAM_MAX = 0x7FFFFFFF


def limits_table(inspected, default=-1):
    """A 256-entry list: `inspected` maps type bytes (b"Q") to body limits; others get *default*
    (-1: refused, 0: streamed)."""
    table = [default] * 256
    for kind, limit in inspected.items():
        table[kind[0] if isinstance(kind, bytes) else kind] = limit
    return table


def maxima_table(default, overrides=None):
    """A 256-entry list of maximum message lengths (length field): *default*, and per type byte
    in *overrides* ({b"Z": 5})."""
    table = [default] * 256
    for kind, length in (overrides or {}).items():
        table[kind[0]] = length
    return table


_UNIFORM_MAXIMA = {}  # max_size -> the shared read-only 256-entry table


def uniform_maxima(value):
    """-> the maxima table (see `maxima_table`) giving every kind the maximum *value*.  The
    table is shared by every scanner with the same maximum (a 256-entry list per client
    session was 2 KiB of its idle memory)."""
    table = _UNIFORM_MAXIMA.get(value)
    if table is None:
        if len(_UNIFORM_MAXIMA) >= 64:
            _UNIFORM_MAXIMA.clear()
        table = _UNIFORM_MAXIMA[value] = (value,) * 256
    return table

class MessageScanner:
    """Incremental scanner of one direction of a PostgreSQL connection (see the module doc)."""

    __slots__ = ("limits", "maxima", "inspect", "emit", "hold", "halted", "length", "whole",
                 "_buf", "_need", "_left")

    def __init__(self, limits, max_size=_STREAM_MAX, inspect=None, emit=None, hold=False):
        self.limits = limits
        self.maxima = None
        self.max_size = max_size  # any message longer than this is a protocol violation
        self.inspect = inspect
        self.emit = emit
        self.hold = hold
        self.halted = False
        self.length = 0  # length field of the message being inspected (header excluded: +1)
        self.whole = True  # the body handed to inspect is the whole body
        self._buf = bytearray()  # not yet scanned: a partial header / held prefix, or held data
        self._need = 5  # bytes that must be in _buf before scanning can make progress
        self._left = 0  # body bytes of a partly passed-on message still to pass on

    @property
    def max_size(self):
        return self.maxima[0]

    @max_size.setter
    def max_size(self, value):
        """One maximum length for every kind (see `set_maxima` for a table)."""
        self.maxima = uniform_maxima(value)

    def set_maxima(self, maxima):
        """Per-kind maximum lengths (a 256-entry list, see `maxima_table`)."""
        self.maxima = maxima

    # -- what the consumer asks ---------------------------------------------------------------
    @property
    def buffered(self):
        """Bytes received and not yet passed on (held while `hold`, or a partial message)."""
        return len(self._buf)

    @property
    def mid_message(self):
        """True while a message has been partly passed on: the peer has begun reading it and
        expects the rest on the same connection."""
        return self._left != 0

    @property
    def at_boundary(self):
        """Nothing held and nothing half passed on: the stream stands between two messages."""
        return self._left == 0 and not self._buf

    def first_kind(self):
        """The type byte of the first held message (int), or -1 while no whole header is held.
        Its header is checked as the scan will check it (ProtocolViolation), so that bytes held
        for want of a connection are refused before one is borrowed for them."""
        buf = self._buf
        if self._left or len(buf) < 5:
            return -1
        kind = buf[0]
        (length,) = _unpack_len(buf, 1)
        if self.limits[kind] < 0:
            raise ProtocolViolation(f"unexpected message type {bytes((kind,))!r}")
        if length < 4 or length > self.maxima[kind]:
            raise ProtocolViolation(f"invalid length {length} for message {bytes((kind,))!r}")
        return kind

    @property
    def idle(self):
        """At a boundary with nothing held, not halted, not holding: a fast path may handle the
        next read itself (see `plain_run`) without changing anything here."""
        return not self._left and not self._buf and not self.halted and not self.hold

    def plain_run(self, data):
        """-> the offset in *data* of the first message this scanner would have to look at:
        one it inspects, refuses, or finds a bad length in, or one not whole in *data*
        (len(data) when every message is whole and streamed unseen).  Reads nothing into the
        scanner; only meaningful while `idle`.  The bytes before the offset are exactly what
        `feed` would pass on unchanged, so a caller may send them itself."""
        n = len(data)
        pos = 0
        limits = self.limits
        maxima = self.maxima
        unpack = _unpack_len
        while n - pos >= 5:
            kind = data[pos]
            (length,) = unpack(data, pos + 1)
            if limits[kind] or length < 4 or length > maxima[kind]:
                return pos
            stop = pos + 1 + length
            if stop > n:
                return pos
            pos = stop
        return pos

    def take_buffered(self):
        """-> the held bytes (bytes), leaving the scanner empty (used when a phase hands its
        leftover input to another reader)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._need = 5
        return data

    # -- input ----------------------------------------------------------------------------------
    def feed(self, data):
        """Take *data* (bytes) from the peer; scan and emit as far as possible."""
        if self.hold or self.halted:
            self._buf += data
            return
        left = self._left
        head = None
        if left:
            n = len(data)
            if n <= left:
                self._left = left - n
                if self.emit is not None:
                    self.emit(data)
                return
            self._left = 0
            head = data[:left]
            data = data[left:]
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                if head is not None and self.emit is not None:
                    self.emit(head)
                return
            data = bytes(buf)
            buf.clear()
        self._scan(data, head)

    def scan(self):
        """Resume after a HALT, or after `hold` was cleared: scan what is buffered."""
        self.halted = False
        if self.hold:
            return
        buf = self._buf
        if not buf:
            return
        left = self._left
        head = None
        if left:
            n = len(buf)
            head = bytes(buf[:left])
            if n <= left:
                self._left = left - n
                buf.clear()
                if self.emit is not None:
                    self.emit(head)
                return
            self._left = 0
            del buf[:left]
        data = bytes(buf)
        buf.clear()
        self._scan(data, head)

    def _scan(self, data, head):
        n = len(data)
        pos = start = 0
        out = None if head is None else [head]
        limits = self.limits
        maxima = self.maxima
        inspect = self.inspect
        unpack = _unpack_len
        while True:
            if n - pos < 5:
                self._need = 5
                break
            kind = data[pos]
            (length,) = unpack(data, pos + 1)
            limit = limits[kind]
            if length < 4 or length > maxima[kind] or limit < 0:
                if limit < 0:
                    raise ProtocolViolation(f"unexpected message type {bytes((kind,))!r}")
                raise ProtocolViolation(f"invalid length {length} for message {bytes((kind,))!r}")
            stop = pos + 1 + length
            if limit:
                blen = length - 4
                whole = blen <= limit
                end = stop if whole else pos + 5 + limit
                if end > n:
                    self._need = end - pos
                    break
                self.length = length
                self.whole = whole
                action = inspect(kind, data[pos + 5:end])
                if action is not None:
                    if out is None:
                        out = []
                    if action.__class__ is int:
                        if action == HOLD:  # before the message: it stays buffered from pos
                            out.append(data[start:pos])
                            start = pos
                            self.halted = True
                            self._need = 5
                            break
                        if action == HALT:
                            out.append(data[start:stop])
                            start = pos = stop
                        else:  # DROP / DROP_HALT: whole messages only
                            if not whole:
                                raise ValueError("only a whole message can be dropped")
                            out.append(data[start:pos])
                            start = pos = stop
                        if action != DROP:
                            self.halted = True
                            break
                        continue
                    out.append(data[start:pos])
                    out.append(action)
                    start = end
            if stop > n:  # streams on: the rest of the body passes as it arrives
                self._left = stop - n
                pos = n
                self._need = 5
                break
            pos = stop
        emit = self.emit
        if emit is not None:
            if out is None:
                if pos > start:
                    emit(data if start == 0 and pos == n else data[start:pos])
            else:
                if pos > start:
                    out.append(data[start:pos])
                chunk = b"".join(out)
                if chunk:
                    emit(chunk)
        if pos < n:
            self._buf += data[pos:] if pos else data
