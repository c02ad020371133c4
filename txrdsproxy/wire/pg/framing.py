"""PostgreSQL message framing: lengths checked before anything is trusted.

Startup-phase packets are `int32 length, int32 code, payload`; after that every message is
`byte type, int32 length, payload` with the length counting itself.  A length below the header or
above the configured maximum is a protocol violation, never an allocation.
"""

import struct

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 196608
MAX_STARTUP_PACKET = 10000  # PostgreSQL's own limit for a startup packet

_I = struct.Struct("!I")
_TI = struct.Struct("!cI")
unpack_length = _I.unpack_from
pack_length = _I.pack


class ProtocolViolation(Exception):
    """The peer sent bytes that are not valid protocol; the connection must be closed."""


def split_startup(buf):
    """-> (code, payload, consumed) for one whole startup-phase packet in *buf*, or None."""
    if len(buf) < 4:
        return None
    (length,) = unpack_length(buf, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    (code,) = unpack_length(buf, 4)
    return code, bytes(buf[8:length]), length


def split_messages(buf, max_size):
    """-> ([(type, payload)], consumed) for every whole typed message at the start of *buf*.

    Used where each message is looked at (client messages, startup and auth exchanges); the
    server-to-client forwarding path scans headers only, in the backend protocol.
    """
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 5:
        (length,) = unpack_length(buf, pos + 1)
        if length < 4 or length > max_size:
            raise ProtocolViolation(f"invalid length {length} for message {bytes(buf[pos:pos + 1])!r}")
        stop = pos + 1 + length
        if stop > end:
            break
        out.append((buf[pos:pos + 1], bytes(buf[pos + 5:stop])))
        pos = stop
    return out, pos


def message(kind, payload=b""):
    """Encode one typed message."""
    return kind + pack_length(len(payload) + 4) + payload


def cstring(data, pos=0):
    """-> (bytes up to NUL, position after the NUL); ProtocolViolation if unterminated."""
    stop = data.find(b"\0", pos)
    if stop < 0:
        raise ProtocolViolation("unterminated string")
    return data[pos:stop], stop + 1
