"""Where the client's byte stream stands, command by command: the one scanner of client packets.

Sans-I/O.  In the command phase a MySQL client sends one logical packet per command (and, during
LOCAL INFILE, data packets).  A logical packet of 0xFFFFFF bytes or more travels as 0xFFFFFF-byte
physical packets followed by a shorter one (possibly empty): a command is whole only after that
last continuation packet.  The proxy takes each command from the head of the stream in one of two
ways:

* whole (`take_packet`): small commands the proxy reads or classifies (COM_QUERY up to the
  classifier's limit, COM_INIT_DB, COM_PING, ...); nothing leaves before all of it is here;
* streamed (`begin` then `take` until `at_boundary`): large commands, relayed (or dropped) as
  they arrive, continuation headers included, so that a 64 MiB command never sits in memory.

`position` says at every moment whether the stream stands at a command boundary.  The proxy gives
a database connection back only when it does (and the bytes taken since the last boundary were
all written to that connection): a command cut short by the client can never be completed by
another session's bytes on a pooled connection.

Cost per byte is linear: bytes are appended once and removed from the front of a bytearray
(which CPython does without moving the rest); a header is parsed once per physical packet.
"""

import enum

from txrdsproxy.wire.mysql.packets import MAX_PACKET_CHUNK, ProtocolError


class StreamPosition(enum.Enum):
    BOUNDARY = "boundary"  # the next byte begins a command (or a LOCAL INFILE data packet)
    COMMAND = "command"    # part of the current unit was taken; the rest is still to come


def _length(buf, pos=0):
    return buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)


class CommandScanner:
    """Client-to-database packets of the command phase, taken one unit at a time.

    ``feed(data)`` appends what the socket read.  At a boundary, `head()` shows the next
    command's header; the caller then either `take_packet()`s it whole or `begin()`s streaming
    it and calls `take()` (each call returns the bytes of the current unit that are here, to
    relay or drop) until `at_boundary`.  `taken` counts the bytes of the current unit taken so
    far (0 at a boundary).
    """

    def __init__(self):
        self.buf = bytearray()
        self.position = StreamPosition.BOUNDARY
        self.taken = 0
        self._remaining = 0   # body bytes of the current physical packet not taken yet
        self._more = False    # a continuation packet follows the current physical packet
        self._single = False  # the unit is one physical packet (LOCAL INFILE data)

    def feed(self, data):
        self.buf += data

    @property
    def buffered(self):
        """Bytes read from the client and not taken yet."""
        return len(self.buf)

    @property
    def at_boundary(self):
        return self.position is StreamPosition.BOUNDARY

    # -- at a boundary ---------------------------------------------------------------------------
    def head(self):
        """``(payload_length, command_byte, seq)`` of the next command, or None until its header
        and first payload byte are here.  Raises ProtocolError for an empty command packet."""
        self._at_boundary("head")
        buf = self.buf
        if len(buf) < 4:
            return None
        length = _length(buf)
        if length == 0:
            raise ProtocolError("empty command packet")
        if len(buf) < 5:
            return None
        return length, buf[4], buf[3]

    def has(self, n):
        """Whether the first *n* bytes of the next command's payload are here."""
        return len(self.buf) >= 4 + n

    def peek(self, start, end):
        """Bytes ``payload[start:end]`` of the next command (must be here: see `has`)."""
        return bytes(self.buf[4 + start:4 + end])

    def whole(self):
        """Whether the next command is here whole and fits one physical packet."""
        buf = self.buf
        if len(buf) < 4:
            return False
        length = _length(buf)
        return length < MAX_PACKET_CHUNK and len(buf) >= 4 + length

    def take_packet(self):
        """Take the next command whole: ``(seq, payload)``.  Only after `whole()` is true."""
        self._at_boundary("take_packet")
        if not self.whole():
            raise ProtocolError("command taken before it is whole")
        buf = self.buf
        length = _length(buf)
        seq = buf[3]
        payload = bytes(buf[4:4 + length])
        del buf[:4 + length]
        return seq, payload

    def take_whole(self):
        """Take the next command whole, header included (the bytes to relay as they are).  Only
        after `whole()` is true; the stream stays at a boundary.  The common case of `begin` +
        `take` in one step."""
        buf = self.buf
        length = _length(buf) if len(buf) >= 4 else MAX_PACKET_CHUNK
        if self.position is not StreamPosition.BOUNDARY or length >= MAX_PACKET_CHUNK \
                or len(buf) < 4 + length:
            raise ProtocolError("command taken whole before it is whole")
        if len(buf) == 4 + length:
            out = bytes(buf)
            buf.clear()
        else:
            out = bytes(buf[:4 + length])
            del buf[:4 + length]
        return out

    def take_if_whole(self):
        """`take_whole` when the next command is here whole in one physical packet (at a
        boundary), else None and nothing taken: the relay's common case in one header read."""
        buf = self.buf
        have = len(buf)
        if have < 4 or self.position is not StreamPosition.BOUNDARY:
            return None
        size = 4 + (buf[0] | (buf[1] << 8) | (buf[2] << 16))
        if size - 4 >= MAX_PACKET_CHUNK or have < size:
            return None
        if have == size:
            out = bytes(buf)
            buf.clear()
        else:
            out = bytes(buf[:size])
            del buf[:size]
        return out

    def begin(self, single_packet=False):
        """Start streaming the unit at the head (its header must be here); -> the payload length
        of its first physical packet.  *single_packet*: a LOCAL INFILE data packet, one physical
        packet whatever its length (the response tracker follows their continuation)."""
        self._at_boundary("begin")
        if len(self.buf) < 4:
            raise ProtocolError("command begun before its header is here")
        length = _length(self.buf)
        self._single = single_packet
        self._remaining = 4 + length  # the header is taken with the body
        self._more = length == MAX_PACKET_CHUNK and not single_packet
        self.position = StreamPosition.COMMAND
        self.taken = 0
        return length

    # -- inside a unit -------------------------------------------------------------------------
    def take(self):
        """The bytes of the current unit that are here (b"" if none), removed from the buffer.
        The unit ends (`at_boundary`) once its last physical packet was taken."""
        if self.position is StreamPosition.BOUNDARY:
            return b""
        buf = self.buf
        have = len(buf)
        n = 0
        while True:
            if self._remaining:
                step = min(self._remaining, have - n)
                n += step
                self._remaining -= step
                if self._remaining:
                    break  # the rest of this physical packet has not arrived
            if not self._more:
                self.position = StreamPosition.BOUNDARY
                break
            if have - n < 4:
                break  # the next continuation header has not arrived
            length = _length(buf, n)
            self._more = length == MAX_PACKET_CHUNK
            self._remaining = 4 + length
        if not n:
            if self.position is StreamPosition.BOUNDARY:
                self.taken = 0
            return b""
        out = bytes(buf[:n]) if n < have else bytes(buf)
        del buf[:n]
        self.taken = 0 if self.position is StreamPosition.BOUNDARY else self.taken + n
        return out

    def take_rest(self):
        """Hand over everything buffered (the stream is leaving the command phase)."""
        self._at_boundary("take_rest")
        data = bytes(self.buf)
        del self.buf[:]
        return data

    def _at_boundary(self, what):
        if self.position is not StreamPosition.BOUNDARY:
            raise ProtocolError(f"{what} in the middle of a command")
