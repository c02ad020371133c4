"""Builders and parsers for the PostgreSQL messages the proxy itself reads or writes.

Only what the proxy needs: startup, authentication, errors and notices it sends to clients,
ParameterStatus / BackendKeyData / ReadyForQuery, and the few client messages the pinning
classifier inspects (Query, Parse, Bind).
"""

import struct

from txrdsproxy.wire.pg.framing import (
    CANCEL_REQUEST_CODE, PROTOCOL_3_0, ProtocolViolation, cstring, message, pack_length,
)

_II = struct.Struct("!II")
_I = struct.Struct("!I")

# Authentication request codes (the 'R' message).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

READY_FOR_QUERY = b"Z"
IDLE, IN_TRANSACTION, FAILED_TRANSACTION = b"I", b"T", b"E"


def parse_startup_params(payload):
    """Decode a StartupMessage body (after the protocol code) -> dict[str, str]."""
    params = {}
    pos = 0
    try:
        while pos < len(payload):
            key, pos = cstring(payload, pos)
            if not key:
                break
            value, pos = cstring(payload, pos)
            params[key.decode("utf-8")] = value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("startup parameter is not UTF-8") from None
    return params


def startup_message(params):
    body = _I.pack(PROTOCOL_3_0) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return pack_length(len(body) + 4) + body


def cancel_request(pid, secret):
    return _I.pack(16) + _I.pack(CANCEL_REQUEST_CODE) + _II.pack(pid, secret)


def parse_cancel(payload):
    if len(payload) != 8:
        raise ProtocolViolation("bad CancelRequest length")
    return _II.unpack(payload)


def negotiate_protocol_version(minor, unrecognised_options):
    """NegotiateProtocolVersion: the newest 3.x minor version we speak and options we ignore."""
    body = _I.pack(minor) + _I.pack(len(unrecognised_options))
    body += b"".join(o.encode() + b"\0" for o in unrecognised_options)
    return message(b"v", body)


def auth_request(code, data=b""):
    return message(b"R", _I.pack(code) + data)


def auth_sasl(mechanisms):
    return auth_request(AUTH_SASL, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


def parse_auth_request(payload):
    """-> (code, data) of an Authentication* message."""
    if len(payload) < 4:
        raise ProtocolViolation("short authentication request")
    return _I.unpack_from(payload)[0], payload[4:]


def parse_sasl_initial(payload):
    """SASLInitialResponse body -> (mechanism, data)."""
    mech, pos = cstring(payload)
    if len(payload) < pos + 4:
        raise ProtocolViolation("short SASLInitialResponse")
    (n,) = _I.unpack_from(payload, pos)
    data = payload[pos + 4:]
    if n != 0xFFFFFFFF and n != len(data):
        raise ProtocolViolation("SASLInitialResponse length mismatch")
    return mech.decode("ascii", "replace"), data


def sasl_initial(mechanism, data):
    return message(b"p", mechanism.encode() + b"\0" + _I.pack(len(data)) + data)


def password_message(data):
    return message(b"p", data + b"\0")


def parameter_status(name, value):
    return message(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def parse_parameter_status(payload):
    name, pos = cstring(payload)
    value, _ = cstring(payload, pos)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def backend_key_data(pid, secret):
    return message(b"K", _II.pack(pid, secret))


def parse_backend_key_data(payload):
    if len(payload) != 8:
        raise ProtocolViolation("bad BackendKeyData length")
    return _II.unpack(payload)


def ready_for_query(status=IDLE):
    return message(b"Z", status)


def query(sql):
    return message(b"Q", (sql.encode() if isinstance(sql, str) else sql) + b"\0")


TERMINATE = message(b"X")


def error_response(code, text, severity="FATAL", detail=None, hint=None):
    """ErrorResponse with S/V/C/M fields (and D/H when given)."""
    fields = [b"S" + severity.encode(), b"V" + severity.encode(), b"C" + code.encode(), b"M" + text.encode()]
    if detail:
        fields.append(b"D" + detail.encode())
    if hint:
        fields.append(b"H" + hint.encode())
    return message(b"E", b"\0".join(fields) + b"\0\0")


def parse_error_fields(payload):
    """ErrorResponse/NoticeResponse body -> dict[field code char, str]."""
    out = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        code = chr(payload[pos])
        value, pos = cstring(payload, pos + 1)
        out[code] = value.decode("utf-8", "replace")
    return out


def parse_parse(payload):
    """Parse message body -> (statement name, query text)."""
    name, pos = cstring(payload)
    sql, _ = cstring(payload, pos)
    return name, sql


def parse_bind_portal(payload):
    """Bind message body -> (portal name, statement name)."""
    portal, pos = cstring(payload)
    stmt, _ = cstring(payload, pos)
    return portal, stmt


def query_text(payload):
    """Query message body -> the SQL text without its NUL terminator."""
    return payload[:-1] if payload.endswith(b"\0") else payload
