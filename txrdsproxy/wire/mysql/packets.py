"""MySQL/MariaDB packet framing and the generic OK/ERR/EOF packets.

Sans-I/O: nothing here touches a socket or Twisted.  Every packet on the wire is
``int<3> payload_length, int<1> sequence_id, payload``.  A payload of 0xFFFFFF
bytes or more is split into 0xFFFFFF-byte fragments; a logical packet ends with
the first fragment shorter than 0xFFFFFF (possibly empty).

Two ways to read:

* :class:`PacketReader` reassembles logical packets and returns
  ``(seq, payload)`` pairs.  Used for handshakes, auth and anything whose
  content we must read.  It enforces a maximum logical payload size *before*
  buffering the data (lengths are never trusted).
* :func:`split_packets` scans a ``bytearray`` in place and returns where each
  *physical* packet lies, so the relay can forward a run of packets with one
  write.  The result-set hot path does not even use that: it calls
  :meth:`txrdsproxy.wire.mysql.commands.ResponseTracker.consume` which walks the
  headers inline and creates no object per packet (see there).

Parse functions (``parse_ok``, ``parse_err``, ``parse_eof``, ``read_lenenc_*``)
raise :class:`ProtocolError` on truncated or malformed input, never
``IndexError``/``struct.error``.
"""

import struct
from collections import namedtuple

# --- capability flags -------------------------------------------------------
CLIENT_LONG_PASSWORD = 0x00000001  # MariaDB calls this CLIENT_MYSQL
CLIENT_FOUND_ROWS = 0x00000002
CLIENT_LONG_FLAG = 0x00000004
CLIENT_CONNECT_WITH_DB = 0x00000008
CLIENT_NO_SCHEMA = 0x00000010
CLIENT_COMPRESS = 0x00000020
CLIENT_ODBC = 0x00000040
CLIENT_LOCAL_FILES = 0x00000080
CLIENT_IGNORE_SPACE = 0x00000100
CLIENT_PROTOCOL_41 = 0x00000200
CLIENT_INTERACTIVE = 0x00000400
CLIENT_SSL = 0x00000800
CLIENT_IGNORE_SIGPIPE = 0x00001000
CLIENT_TRANSACTIONS = 0x00002000
CLIENT_RESERVED = 0x00004000
CLIENT_SECURE_CONNECTION = 0x00008000
CLIENT_MULTI_STATEMENTS = 0x00010000
CLIENT_MULTI_RESULTS = 0x00020000
CLIENT_PS_MULTI_RESULTS = 0x00040000
CLIENT_PLUGIN_AUTH = 0x00080000
CLIENT_CONNECT_ATTRS = 0x00100000
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 0x00200000
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 0x00400000
CLIENT_SESSION_TRACK = 0x00800000
CLIENT_DEPRECATE_EOF = 0x01000000
CLIENT_OPTIONAL_RESULTSET_METADATA = 0x02000000
CLIENT_ZSTD_COMPRESSION_ALGORITHM = 0x04000000
CLIENT_QUERY_ATTRIBUTES = 0x08000000
CLIENT_SSL_VERIFY_SERVER_CERT = 0x40000000
CLIENT_REMEMBER_OPTIONS = 0x80000000

# MariaDB extended capabilities (sent in the handshake filler when the
# server does not set CLIENT_LONG_PASSWORD/CLIENT_MYSQL).  We never advertise
# them, so results never use them; named for parsing/logging only.
MARIADB_CLIENT_PROGRESS = 1 << 0
MARIADB_CLIENT_COM_MULTI = 1 << 1
MARIADB_CLIENT_STMT_BULK_OPERATIONS = 1 << 2
MARIADB_CLIENT_EXTENDED_METADATA = 1 << 3
MARIADB_CLIENT_CACHE_METADATA = 1 << 4

# --- server status flags ----------------------------------------------------
SERVER_STATUS_IN_TRANS = 0x0001
SERVER_STATUS_AUTOCOMMIT = 0x0002
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_NO_GOOD_INDEX_USED = 0x0010
SERVER_STATUS_NO_INDEX_USED = 0x0020
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_STATUS_LAST_ROW_SENT = 0x0080
SERVER_STATUS_DB_DROPPED = 0x0100
SERVER_STATUS_NO_BACKSLASH_ESCAPES = 0x0200
SERVER_STATUS_METADATA_CHANGED = 0x0400
SERVER_QUERY_WAS_SLOW = 0x0800
SERVER_PS_OUT_PARAMS = 0x1000
SERVER_STATUS_IN_TRANS_READONLY = 0x2000
SERVER_SESSION_STATE_CHANGED = 0x4000

# --- commands -----------------------------------------------------------------
COM_SLEEP = 0x00
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_CREATE_DB = 0x05
COM_DROP_DB = 0x06
COM_REFRESH = 0x07
COM_SHUTDOWN = 0x08
COM_STATISTICS = 0x09
COM_PROCESS_INFO = 0x0A
COM_CONNECT = 0x0B
COM_PROCESS_KILL = 0x0C
COM_DEBUG = 0x0D
COM_PING = 0x0E
COM_TIME = 0x0F
COM_DELAYED_INSERT = 0x10
COM_CHANGE_USER = 0x11
COM_BINLOG_DUMP = 0x12
COM_TABLE_DUMP = 0x13
COM_CONNECT_OUT = 0x14
COM_REGISTER_SLAVE = 0x15
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_DAEMON = 0x1D
COM_BINLOG_DUMP_GTID = 0x1E
COM_RESET_CONNECTION = 0x1F
COM_STMT_BULK_EXECUTE = 0xFA  # MariaDB

# --- session state tracker entry types (OK packet) -----------------------------
SESSION_TRACK_SYSTEM_VARIABLES = 0
SESSION_TRACK_SCHEMA = 1
SESSION_TRACK_STATE_CHANGE = 2
SESSION_TRACK_GTIDS = 3
SESSION_TRACK_TRANSACTION_CHARACTERISTICS = 4
SESSION_TRACK_TRANSACTION_STATE = 5

# --- packet headers -------------------------------------------------------------
OK_HEADER = 0x00
LOCAL_INFILE_HEADER = 0xFB
EOF_HEADER = 0xFE
ERR_HEADER = 0xFF

MAX_PACKET_CHUNK = 0xFFFFFF
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent bytes that do not follow the protocol; close the connection."""


OK = namedtuple("OK", "affected_rows last_insert_id status warnings info session_state_changes")
ERR = namedtuple("ERR", "code sqlstate message")
EOF = namedtuple("EOF", "warnings status")


# --- length-encoded integers and strings ---------------------------------------
def encode_lenenc_int(value):
    """Encode a non-negative int as a MySQL length-encoded integer."""
    if value < 0:
        raise ValueError("length-encoded integers are unsigned")
    if value < 0xFB:
        return bytes((value,))
    if value < 0x10000:
        return b"\xfc" + struct.pack("<H", value)
    if value < 0x1000000:
        return b"\xfd" + struct.pack("<I", value)[:3]
    if value < 1 << 64:
        return b"\xfe" + struct.pack("<Q", value)
    raise ValueError("integer too large for a length-encoded integer")


def encode_lenenc_str(data):
    """Encode bytes as a length-encoded string."""
    return encode_lenenc_int(len(data)) + bytes(data)


def read_lenenc_int(data, pos=0):
    """Decode a length-encoded integer at ``pos``; returns ``(value, new_pos)``.

    ``value`` is ``None`` for the 0xFB NULL marker (only meaningful in text
    rows).  Raises :class:`ProtocolError` for 0xFF or truncated data.
    """
    if pos >= len(data):
        raise ProtocolError("truncated length-encoded integer")
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFB:
        return None, pos + 1
    if first == 0xFF:
        raise ProtocolError("invalid length-encoded integer prefix 0xFF")
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    end = pos + 1 + size
    if end > len(data):
        raise ProtocolError("truncated length-encoded integer")
    return int.from_bytes(data[pos + 1:end], "little"), end


def read_lenenc_str(data, pos=0):
    """Decode a length-encoded string at ``pos``; returns ``(bytes, new_pos)``."""
    length, pos = read_lenenc_int(data, pos)
    if length is None:
        raise ProtocolError("unexpected NULL length-encoded string")
    end = pos + length
    if end > len(data):
        raise ProtocolError("truncated length-encoded string")
    return bytes(data[pos:end]), end


def read_nul_str(data, pos=0):
    """Decode a NUL-terminated string at ``pos``; returns ``(bytes, new_pos)``."""
    end = data.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("missing NUL terminator")
    return bytes(data[pos:end]), end + 1


def _u16(data, pos):
    if pos + 2 > len(data):
        raise ProtocolError("truncated packet")
    return data[pos] | (data[pos + 1] << 8)


# --- framing ---------------------------------------------------------------------
def encode_packet(payload, seq):
    """Frame ``payload`` with sequence id ``seq`` (fragments get seq+1, ...).

    Payloads of 0xFFFFFF bytes or more are split into 0xFFFFFF-byte fragments;
    when the length is an exact multiple of 0xFFFFFF an empty fragment ends it.
    Use :func:`next_seq` to know the sequence id that follows.
    """
    payload = bytes(payload)
    n = len(payload)
    if n < MAX_PACKET_CHUNK:
        return struct.pack("<I", n)[:3] + bytes((seq & 0xFF,)) + payload
    out = []
    pos = 0
    while True:
        chunk = payload[pos:pos + MAX_PACKET_CHUNK]
        out.append(struct.pack("<I", len(chunk))[:3] + bytes((seq & 0xFF,)))
        out.append(chunk)
        seq += 1
        pos += len(chunk)
        if len(chunk) < MAX_PACKET_CHUNK:
            break
    return b"".join(out)


def fragment_count(payload_length):
    """How many physical packets carry a logical payload of this length."""
    return payload_length // MAX_PACKET_CHUNK + 1


def next_seq(seq, payload_length):
    """Sequence id after sending a ``payload_length`` payload starting at ``seq``."""
    return (seq + fragment_count(payload_length)) & 0xFF


def split_packets(buf, pos=0, end=None):
    """Find complete *physical* packets in ``buf[pos:end]``.

    Returns ``(consumed_end, [(payload_offset, payload_length, seq), ...])``
    where ``consumed_end`` is the offset just past the last complete packet.
    Continuation fragments (length 0xFFFFFF) are reported as they are; the
    caller decides how to join them.  One small tuple per packet: for bulk
    result sets prefer ``ResponseTracker.consume`` which allocates nothing per
    packet.
    """
    if end is None:
        end = len(buf)
    found = []
    while end - pos >= 4:
        length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
        if end - pos - 4 < length:
            break
        found.append((pos + 4, length, buf[pos + 3]))
        pos += 4 + length
    return pos, found


class PacketReader:
    """Reassemble logical packets from a byte stream.

    ``feed(data)`` returns a list of ``(seq, payload)``; for a payload split
    across fragments ``seq`` is the sequence id of the *last* fragment, so the
    reply uses ``seq + 1``.  A logical payload larger than ``max_payload``
    raises :class:`ProtocolError` as soon as its header announces it, before
    the data is buffered.
    """

    def __init__(self, max_payload=DEFAULT_MAX_PAYLOAD):
        self.max_payload = max_payload
        self._buf = bytearray()
        self._partial = []  # fragments of a continued logical packet
        self._partial_len = 0

    def feed(self, data):
        buf = self._buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        try:
            while n - pos >= 4:
                length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
                if self._partial_len + length > self.max_payload:
                    raise ProtocolError(
                        "packet payload exceeds maximum of %d bytes" % self.max_payload)
                if n - pos - 4 < length:
                    break
                seq = buf[pos + 3]
                payload = bytes(buf[pos + 4:pos + 4 + length])
                pos += 4 + length
                if length == MAX_PACKET_CHUNK:
                    self._partial.append(payload)
                    self._partial_len += length
                    continue
                if self._partial:
                    self._partial.append(payload)
                    payload = b"".join(self._partial)
                    self._partial = []
                    self._partial_len = 0
                out.append((seq, payload))
        finally:
            del buf[:pos]
        return out

    @property
    def buffered(self):
        """Bytes held that do not yet form a complete logical packet."""
        return len(self._buf) + self._partial_len

    def take_buffer(self):
        """Return and clear unparsed bytes (e.g. to hand over to a TLS layer)."""
        if self._partial:
            raise ProtocolError("cannot hand over mid-packet")
        data = bytes(self._buf)
        self._buf = bytearray()
        return data


# --- OK / ERR / EOF ---------------------------------------------------------------
def ok_packet(affected_rows=0, last_insert_id=0, status=SERVER_STATUS_AUTOCOMMIT,
              warnings=0, info=b"", header=OK_HEADER):
    """OK payload for a 4.1+ client, ``info`` appended as plain trailing text.

    With the default empty ``info`` the payload is valid whether or not the
    client negotiated CLIENT_SESSION_TRACK (which wants info length-encoded);
    use :func:`ok_packet_for` when sending a non-empty info string.
    """
    if isinstance(info, str):
        info = info.encode("utf-8")
    return (bytes((header,)) + encode_lenenc_int(affected_rows)
            + encode_lenenc_int(last_insert_id)
            + struct.pack("<HH", status & 0xFFFF, warnings & 0xFFFF) + info)


def ok_packet_for(capabilities, affected_rows=0, last_insert_id=0,
                  status=SERVER_STATUS_AUTOCOMMIT, warnings=0, info=b"",
                  header=OK_HEADER):
    """OK payload encoded for the client's negotiated ``capabilities``."""
    if isinstance(info, str):
        info = info.encode("utf-8")
    if capabilities & CLIENT_SESSION_TRACK and info:
        info = encode_lenenc_str(info)
    return ok_packet(affected_rows, last_insert_id, status & ~SERVER_SESSION_STATE_CHANGED,
                     warnings, info, header)


def err_packet(code, sqlstate, message):
    """ERR payload (4.1 format: ``#`` + 5-char SQLSTATE)."""
    state = sqlstate.encode("ascii")
    if len(state) != 5:
        raise ValueError("SQLSTATE must be 5 characters")
    return b"\xff" + struct.pack("<H", code) + b"#" + state + message.encode("utf-8")


def eof_packet(status=SERVER_STATUS_AUTOCOMMIT, warnings=0):
    """EOF payload (4.1 format)."""
    return b"\xfe" + struct.pack("<HH", warnings & 0xFFFF, status & 0xFFFF)


def is_eof(payload, deprecate_eof=False):
    """True if ``payload`` terminates a result set (EOF, or OK-with-0xFE)."""
    if not payload or payload[0] != EOF_HEADER:
        return False
    return len(payload) < (MAX_PACKET_CHUNK if deprecate_eof else 9)


def parse_ok(payload, capabilities=CLIENT_PROTOCOL_41):
    """Parse an OK packet (header 0x00, or 0xFE as a DEPRECATE_EOF terminator)."""
    try:
        return _parse_ok(payload, capabilities)
    except (IndexError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise ProtocolError("malformed OK packet: %s" % e)


def _parse_ok(payload, caps):
    if not payload or payload[0] not in (OK_HEADER, EOF_HEADER):
        raise ProtocolError("not an OK packet")
    affected, pos = read_lenenc_int(payload, 1)
    last_id, pos = read_lenenc_int(payload, pos)
    if affected is None or last_id is None:
        raise ProtocolError("NULL in OK packet")
    status = warnings = 0
    if caps & (CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS):
        status = _u16(payload, pos)
        pos += 2
        if caps & CLIENT_PROTOCOL_41:
            warnings = _u16(payload, pos)
            pos += 2
    changes = []
    info = b""
    if caps & CLIENT_SESSION_TRACK:
        if pos < len(payload):
            info, pos = read_lenenc_str(payload, pos)
            if status & SERVER_SESSION_STATE_CHANGED:
                state, pos = read_lenenc_str(payload, pos)
                changes = parse_session_state(state)
    else:
        info = bytes(payload[pos:])
    return OK(affected, last_id, status, warnings, info, changes)


def parse_session_state(data):
    """Parse session-state-change entries into a list of ``(type, value)``.

    ``value`` is ``(name, value)`` (str, str) for SYSTEM_VARIABLES, a str for
    SCHEMA, STATE_CHANGE, TRANSACTION_CHARACTERISTICS and TRANSACTION_STATE,
    and raw bytes for GTIDS and unknown types.
    """
    out = []
    pos = 0
    n = len(data)
    while pos < n:
        kind = data[pos]
        entry, pos = read_lenenc_str(data, pos + 1)
        if kind == SESSION_TRACK_SYSTEM_VARIABLES:
            epos = 0
            # One entry may carry several name/value pairs (MariaDB does).
            while epos < len(entry):
                name, epos = read_lenenc_str(entry, epos)
                value, epos = read_lenenc_str(entry, epos)
                out.append((kind, (name.decode("utf-8", "replace"),
                                   value.decode("utf-8", "replace"))))
        elif kind in (SESSION_TRACK_SCHEMA, SESSION_TRACK_STATE_CHANGE,
                      SESSION_TRACK_TRANSACTION_CHARACTERISTICS,
                      SESSION_TRACK_TRANSACTION_STATE):
            value, _ = read_lenenc_str(entry, 0)
            out.append((kind, value.decode("utf-8", "replace")))
        else:
            out.append((kind, entry))
    return out


def encode_session_state(changes):
    """Inverse of :func:`parse_session_state` (used by tests and fakes)."""
    out = []
    for kind, value in changes:
        if kind == SESSION_TRACK_SYSTEM_VARIABLES:
            name, val = value
            entry = encode_lenenc_str(name.encode()) + encode_lenenc_str(val.encode())
        elif isinstance(value, str):
            entry = encode_lenenc_str(value.encode())
        else:
            entry = bytes(value)
        out.append(bytes((kind,)) + encode_lenenc_str(entry))
    return b"".join(out)


def parse_err(payload):
    """Parse an ERR packet; SQLSTATE is ``"HY000"`` when the server omitted it."""
    if len(payload) < 3 or payload[0] != ERR_HEADER:
        raise ProtocolError("not an ERR packet")
    code = payload[1] | (payload[2] << 8)
    if len(payload) >= 9 and payload[3] == 0x23:  # '#'
        state = bytes(payload[4:9]).decode("ascii", "replace")
        msg = bytes(payload[9:])
    else:
        state = "HY000"
        msg = bytes(payload[3:])
    return ERR(code, state, msg.decode("utf-8", "replace"))


def parse_eof(payload):
    """Parse a 4.1 EOF packet (0xFE, warnings, status)."""
    if not payload or payload[0] != EOF_HEADER or len(payload) >= 9:
        raise ProtocolError("not an EOF packet")
    if len(payload) == 1:
        return EOF(0, 0)  # pre-4.1 EOF carries no status
    if len(payload) < 5:
        raise ProtocolError("truncated EOF packet")
    return EOF(_u16(payload, 1), _u16(payload, 3))
