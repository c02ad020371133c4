"""Connection-phase packets: HandshakeV10, HandshakeResponse41, SSLRequest,
AuthSwitchRequest and AuthMoreData.

The proxy plays both roles: it *sends* a HandshakeV10 to its clients and
*parses* their HandshakeResponse41; towards MariaDB it *parses* the server's
HandshakeV10 and *builds* its own HandshakeResponse41.  All parse functions
raise :class:`ProtocolError` on malformed input (never IndexError).
"""

import os
import struct
from collections import namedtuple

from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.packets import ProtocolError

#: What the proxy advertises to its clients.  Not CLIENT_COMPRESS (RDS Proxy
#: doesn't support compressed mode: clients that *ask* for compression, e.g.
#: ``mysql --compress``, see the flag missing and silently proceed
#: uncompressed), and not CLIENT_SSL unless the listener has TLS
#: (see :func:`proxy_server_capabilities`).
DEFAULT_SERVER_CAPABILITIES = (
    P.CLIENT_LONG_PASSWORD | P.CLIENT_FOUND_ROWS | P.CLIENT_LONG_FLAG
    | P.CLIENT_CONNECT_WITH_DB | P.CLIENT_LOCAL_FILES | P.CLIENT_PROTOCOL_41
    | P.CLIENT_TRANSACTIONS | P.CLIENT_SECURE_CONNECTION | P.CLIENT_MULTI_STATEMENTS
    | P.CLIENT_MULTI_RESULTS | P.CLIENT_PS_MULTI_RESULTS | P.CLIENT_PLUGIN_AUTH
    | P.CLIENT_CONNECT_ATTRS | P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | P.CLIENT_SESSION_TRACK | P.CLIENT_DEPRECATE_EOF)

NATIVE_PASSWORD = "mysql_native_password"
CACHING_SHA2_PASSWORD = "caching_sha2_password"
CLEAR_PASSWORD = "mysql_clear_password"

SSL_REQUEST_LENGTH = 32

Handshake = namedtuple(
    "Handshake",
    "protocol_version server_version connection_id scramble capabilities charset "
    "status auth_plugin mariadb_capabilities")
HandshakeResponse = namedtuple(
    "HandshakeResponse",
    "capabilities max_packet charset user auth_response database auth_plugin "
    "attributes mariadb_capabilities")
SSLRequest = namedtuple("SSLRequest", "capabilities max_packet charset")
AuthSwitchRequest = namedtuple("AuthSwitchRequest", "plugin data")


def proxy_server_capabilities(tls=False):
    """Capabilities to advertise: the defaults, plus CLIENT_SSL when ``tls``."""
    caps = DEFAULT_SERVER_CAPABILITIES
    if tls:
        caps |= P.CLIENT_SSL
    return caps


# Each random byte -> 7 bits, NUL and "$" moved up by one (one `translate`, no Python loop).
_SCRAMBLE_BYTES = bytes((b & 0x7F) + ((b & 0x7F) in (0, 0x24)) for b in range(256))


def make_scramble(randbytes=os.urandom):
    """A 20-byte nonce like the server's: 7-bit, no NUL and no ``$``.

    NUL-free matters because the scramble travels NUL-terminated in the
    handshake and in AuthSwitchRequest.
    """
    return bytes(randbytes(20)).translate(_SCRAMBLE_BYTES)


def _s(value):
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _wrap(fn, what):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (IndexError, struct.error, ValueError, UnicodeDecodeError) as e:
            raise ProtocolError("malformed %s: %s" % (what, e))
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --- HandshakeV10 ---------------------------------------------------------------------
def build_handshake_v10(server_version, connection_id, scramble, capabilities,
                        charset, status, auth_plugin):
    """Server greeting payload (protocol 10) with a 20-byte scramble."""
    scramble = bytes(scramble)
    if len(scramble) != 20:
        raise ValueError("scramble must be 20 bytes")
    return b"".join([
        b"\x0a", _s(server_version), b"\x00",
        struct.pack("<I", connection_id & 0xFFFFFFFF),
        scramble[:8], b"\x00",
        struct.pack("<H", capabilities & 0xFFFF),
        bytes((charset & 0xFF,)),
        struct.pack("<H", status & 0xFFFF),
        struct.pack("<H", (capabilities >> 16) & 0xFFFF),
        bytes((21,)) if capabilities & P.CLIENT_PLUGIN_AUTH else b"\x00",
        b"\x00" * 10,
        scramble[8:], b"\x00",
        (_s(auth_plugin) + b"\x00") if capabilities & P.CLIENT_PLUGIN_AUTH else b"",
    ])


class GreetingTemplate:
    """The proxy's greeting packet (header included) for one server version, capability set,
    charset, status and plugin, built once: per client only the connection id and the scramble
    change, and `packet` splices them into the precomputed bytes (the same bytes as
    ``encode_packet(build_handshake_v10(...), 0)``)."""

    __slots__ = ("_head", "_middle", "_tail")

    def __init__(self, server_version, capabilities, charset, status, auth_plugin):
        zero = b"\x00" * 20
        payload = build_handshake_v10(server_version, 0, zero, capabilities, charset, status,
                                      auth_plugin)
        at_id = 1 + len(_s(server_version)) + 1
        at_scramble2 = at_id + 4 + 8 + 1 + 2 + 1 + 2 + 2 + 1 + 10
        header = struct.pack("<I", len(payload))[:3] + b"\x00"
        self._head = header + payload[:at_id]
        self._middle = payload[at_id + 4 + 8:at_scramble2]
        self._tail = payload[at_scramble2 + 12:]

    def packet(self, connection_id, scramble):
        """The greeting packet (sequence id 0) with this *connection_id* and 20-byte *scramble*."""
        if len(scramble) != 20:
            raise ValueError("scramble must be 20 bytes")
        return b"".join((self._head, (connection_id & 0xFFFFFFFF).to_bytes(4, "little"),
                         scramble[:8], self._middle, scramble[8:], self._tail))


def _parse_handshake_v10(payload):
    payload = bytes(payload)
    if not payload:
        raise ProtocolError("empty handshake")
    if payload[0] == P.ERR_HEADER:
        err = P.parse_err(payload)
        raise ProtocolError("server refused connection: %d %s" % (err.code, err.message))
    if payload[0] != 10:
        raise ProtocolError("unsupported handshake protocol %d" % payload[0])
    version, pos = P.read_nul_str(payload, 1)
    if pos + 4 + 8 + 1 + 2 > len(payload):
        raise ProtocolError("truncated handshake")
    conn_id = struct.unpack_from("<I", payload, pos)[0]
    pos += 4
    part1 = payload[pos:pos + 8]
    pos += 9  # + filler
    caps = struct.unpack_from("<H", payload, pos)[0]
    pos += 2
    charset = status = 0
    data_len = 0
    mariadb_caps = 0
    part2 = b""
    plugin = ""
    if pos < len(payload):
        if pos + 16 > len(payload):
            raise ProtocolError("truncated handshake")
        charset = payload[pos]
        status, caps_hi = struct.unpack_from("<HH", payload, pos + 1)
        caps |= caps_hi << 16
        data_len = payload[pos + 5]
        if not caps & P.CLIENT_LONG_PASSWORD:  # MariaDB: CLIENT_MYSQL unset
            mariadb_caps = struct.unpack_from("<I", payload, pos + 12)[0]
        pos += 16
        if caps & P.CLIENT_SECURE_CONNECTION:
            n = max(13, data_len - 8)
            if pos + n > len(payload):
                raise ProtocolError("truncated handshake scramble")
            part2 = payload[pos:pos + n].rstrip(b"\x00")
            pos += n
        if caps & P.CLIENT_PLUGIN_AUTH:
            end = payload.find(b"\x00", pos)
            name = payload[pos:] if end < 0 else payload[pos:end]  # some servers omit NUL
            plugin = name.decode("ascii")
    return Handshake(10, version.decode("utf-8", "replace"), conn_id, part1 + part2,
                     caps, charset, status, plugin or NATIVE_PASSWORD, mariadb_caps)


parse_handshake_v10 = _wrap(_parse_handshake_v10, "handshake")
parse_handshake_v10.__doc__ = """Parse a server greeting into a :class:`Handshake`.

An ERR packet instead of a greeting (e.g. too many connections, host
blocked) raises :class:`ProtocolError` carrying the server message."""


# --- HandshakeResponse41 / SSLRequest -------------------------------------------------
def is_ssl_request(payload):
    """True for the 32-byte SSLRequest that precedes a TLS handshake."""
    return (len(payload) == SSL_REQUEST_LENGTH
            and struct.unpack_from("<I", payload, 0)[0] & P.CLIENT_SSL != 0)


def _parse_handshake_response41(payload, server_caps):
    payload = bytes(payload)
    if len(payload) < 4:
        raise ProtocolError("truncated handshake response")
    client_caps = struct.unpack_from("<I", payload, 0)[0]
    if not client_caps & P.CLIENT_PROTOCOL_41:
        raise ProtocolError("pre-4.1 clients are not supported")
    if len(payload) < SSL_REQUEST_LENGTH:
        raise ProtocolError("truncated handshake response")
    max_packet, charset = struct.unpack_from("<IB", payload, 4)
    if len(payload) == SSL_REQUEST_LENGTH and client_caps & P.CLIENT_SSL:
        return SSLRequest(client_caps, max_packet, charset)
    mariadb_caps = 0
    if not client_caps & P.CLIENT_LONG_PASSWORD:
        mariadb_caps = struct.unpack_from("<I", payload, 28)[0]
    caps = client_caps & server_caps  # the format follows what both agreed on
    user, pos = P.read_nul_str(payload, SSL_REQUEST_LENGTH)
    if caps & P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth, pos = P.read_lenenc_str(payload, pos)
    elif caps & P.CLIENT_SECURE_CONNECTION:
        if pos >= len(payload):
            raise ProtocolError("truncated auth response")
        n = payload[pos]
        if pos + 1 + n > len(payload):
            raise ProtocolError("truncated auth response")
        auth = payload[pos + 1:pos + 1 + n]
        pos += 1 + n
    else:
        auth, pos = P.read_nul_str(payload, pos)
    database = None
    if caps & P.CLIENT_CONNECT_WITH_DB and pos < len(payload):
        db, pos = P.read_nul_str(payload, pos)
        database = db.decode("utf-8")
    plugin = None
    if caps & P.CLIENT_PLUGIN_AUTH and pos < len(payload):
        name, pos = P.read_nul_str(payload, pos)
        plugin = name.decode("ascii")
    attrs = {}
    if caps & P.CLIENT_CONNECT_ATTRS and pos < len(payload):
        blob, pos = P.read_lenenc_str(payload, pos)
        attrs = _attributes(blob)
    return HandshakeResponse(client_caps, max_packet, charset, user.decode("utf-8"), auth,
                             database, plugin, attrs, mariadb_caps)


def _attributes(blob):
    """Connection attributes: lenenc key/value strings (one-byte lengths read inline)."""
    attrs = {}
    apos, end = 0, len(blob)
    while apos < end:
        strings = []
        for _ in range(2):
            n = blob[apos] if apos < end else 0xFF
            if n < 0xFB and apos + 1 + n <= end:
                strings.append(blob[apos + 1:apos + 1 + n])
                apos += 1 + n
            else:  # longer strings, or malformed (ProtocolError)
                value, apos = P.read_lenenc_str(blob, apos)
                strings.append(value)
        attrs[strings[0].decode("utf-8", "replace")] = strings[1].decode("utf-8", "replace")
    return attrs


parse_handshake_response41 = _wrap(_parse_handshake_response41, "handshake response")
parse_handshake_response41.__doc__ = """Parse the client's reply to our greeting.

Returns :class:`SSLRequest` for the 32-byte TLS upgrade request (the caller
then starts TLS and reads the full response again), else
:class:`HandshakeResponse`.  ``capabilities`` is what the client sent; the
fields are decoded by ``client_caps & server_caps``.  Raises
:class:`ProtocolError` for pre-4.1 clients and malformed packets."""


def build_ssl_request(capabilities, charset, max_packet=P.MAX_PACKET_CHUNK):
    """The 32-byte SSLRequest the proxy sends before TLS to a backend."""
    return (struct.pack("<IIB", capabilities | P.CLIENT_SSL, max_packet, charset)
            + b"\x00" * 23)


def build_handshake_response41(capabilities, user, auth_response, database=None,
                               auth_plugin=NATIVE_PASSWORD, charset=45,
                               max_packet=P.MAX_PACKET_CHUNK, attributes=None):
    """HandshakeResponse41 for the proxy's own backend logins.

    ``capabilities`` must already be intersected with the server's; the
    CONNECT_WITH_DB / CONNECT_ATTRS / PLUGIN_AUTH bits are adjusted to match
    the arguments given.  charset 45 is utf8mb4_general_ci.
    """
    caps = capabilities | P.CLIENT_PROTOCOL_41
    if database is None:
        caps &= ~P.CLIENT_CONNECT_WITH_DB
    if not attributes:
        caps &= ~P.CLIENT_CONNECT_ATTRS
    if auth_plugin is None:
        caps &= ~P.CLIENT_PLUGIN_AUTH
    auth_response = bytes(auth_response)
    parts = [struct.pack("<IIB", caps, max_packet, charset), b"\x00" * 23,
             _s(user), b"\x00"]
    if caps & P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        parts.append(P.encode_lenenc_str(auth_response))
    elif caps & P.CLIENT_SECURE_CONNECTION:
        if len(auth_response) > 255:
            raise ValueError("auth response too long without LENENC_CLIENT_DATA")
        parts.append(bytes((len(auth_response),)) + auth_response)
    else:
        parts.append(auth_response + b"\x00")
    if caps & P.CLIENT_CONNECT_WITH_DB:
        parts.append(_s(database) + b"\x00")
    if caps & P.CLIENT_PLUGIN_AUTH:
        parts.append(_s(auth_plugin) + b"\x00")
    if caps & P.CLIENT_CONNECT_ATTRS:
        blob = b"".join(P.encode_lenenc_str(_s(k)) + P.encode_lenenc_str(_s(v))
                        for k, v in attributes.items())
        parts.append(P.encode_lenenc_str(blob))
    return b"".join(parts)


# --- auth switch / more data -------------------------------------------------------------
def auth_switch_request(plugin, data):
    """AuthSwitchRequest payload (0xFE); a NUL is appended to ``data`` as
    servers do for scramble-based plugins."""
    return b"\xfe" + _s(plugin) + b"\x00" + bytes(data) + b"\x00"


def _parse_auth_switch_request(payload):
    payload = bytes(payload)
    if not payload or payload[0] != 0xFE:
        raise ProtocolError("not an AuthSwitchRequest")
    if len(payload) == 1:
        # Old (pre-4.1) switch to mysql_old_password: unsupported by callers.
        return AuthSwitchRequest("mysql_old_password", b"")
    name, pos = P.read_nul_str(payload, 1)
    data = payload[pos:]
    if data.endswith(b"\x00"):
        data = data[:-1]
    return AuthSwitchRequest(name.decode("ascii"), data)


parse_auth_switch_request = _wrap(_parse_auth_switch_request, "auth switch request")
parse_auth_switch_request.__doc__ = """Parse 0xFE AuthSwitchRequest -> (plugin, data);
the trailing NUL servers append to the nonce is removed."""


def auth_more_data(data):
    """AuthMoreData payload (0x01 + data)."""
    return b"\x01" + bytes(data)


def parse_auth_more_data(payload):
    """Return the data of a 0x01 AuthMoreData packet."""
    if not payload or payload[0] != 0x01:
        raise ProtocolError("not an AuthMoreData packet")
    return bytes(payload[1:])
