"""wire/pg/framing.py and messages.py: byte-for-byte builders, parsers fed whole, bytewise, with
trailing data and with lying lengths."""

import pytest

from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import (
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET, PROTOCOL_3_0, SSL_REQUEST_CODE,
    ProtocolViolation, cstring, message, split_messages, split_startup,
)

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
STARTUP = (b"\x00\x00\x00\x1f" b"\x00\x03\x00\x00"
           b"user\x00bob\x00" b"database\x00app\x00" b"\x00")


# -- constants ------------------------------------------------------------------------------------
def test_codes():
    assert SSL_REQUEST_CODE == 1234 << 16 | 5679
    assert GSSENC_REQUEST_CODE == 1234 << 16 | 5680
    assert CANCEL_REQUEST_CODE == 1234 << 16 | 5678
    assert PROTOCOL_3_0 == 3 << 16


# -- builders, byte for byte ---------------------------------------------------------------------------
def test_message():
    assert message(b"X") == b"X\x00\x00\x00\x04"
    assert message(b"d", b"abc") == b"d\x00\x00\x00\x07abc"


def test_startup_message():
    assert msg.startup_message({"user": "bob", "database": "app"}) == STARTUP
    assert len(STARTUP) == 0x1f


def test_startup_message_empty():
    assert msg.startup_message({}) == b"\x00\x00\x00\x09\x00\x03\x00\x00\x00"


def test_cancel_request():
    assert msg.cancel_request(0x01020304, 0xA0B0C0D0) == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x01\x02\x03\x04\xa0\xb0\xc0\xd0")


def test_negotiate_protocol_version():
    assert msg.negotiate_protocol_version(0, ["_pq_.a", "_pq_.bb"]) == (
        b"v\x00\x00\x00\x1b" b"\x00\x00\x00\x00" b"\x00\x00\x00\x02" b"_pq_.a\x00" b"_pq_.bb\x00")
    assert msg.negotiate_protocol_version(0, []) == b"v\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00"


def test_auth_requests():
    assert msg.auth_request(msg.AUTH_OK) == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert msg.auth_request(msg.AUTH_CLEARTEXT) == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert msg.auth_request(msg.AUTH_MD5, b"\x01\x02\x03\x04") == (
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04")
    assert msg.auth_request(msg.AUTH_SASL_CONTINUE, b"r=abc") == b"R\x00\x00\x00\x0d\x00\x00\x00\x0br=abc"
    assert msg.auth_request(msg.AUTH_SASL_FINAL, b"v=x") == b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=x"


def test_auth_sasl():
    assert msg.auth_sasl(["SCRAM-SHA-256"]) == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00")
    assert msg.auth_sasl(["A", "B"]) == b"R\x00\x00\x00\x0d\x00\x00\x00\x0aA\x00B\x00\x00"


def test_sasl_initial():
    assert msg.sasl_initial("SCRAM-SHA-256", b"n,,n=,r=x") == (
        b"p\x00\x00\x00\x1fSCRAM-SHA-256\x00\x00\x00\x00\x09n,,n=,r=x")


def test_password_message():
    assert msg.password_message(b"md5abc") == b"p\x00\x00\x00\x0bmd5abc\x00"


def test_parameter_status():
    assert msg.parameter_status("TimeZone", "UTC") == b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"


def test_backend_key_data():
    assert msg.backend_key_data(7, 0xDEADBEEF) == b"K\x00\x00\x00\x0c\x00\x00\x00\x07\xde\xad\xbe\xef"


def test_ready_for_query():
    assert msg.ready_for_query() == b"Z\x00\x00\x00\x05I"
    assert msg.ready_for_query(msg.IN_TRANSACTION) == b"Z\x00\x00\x00\x05T"
    assert msg.ready_for_query(msg.FAILED_TRANSACTION) == b"Z\x00\x00\x00\x05E"


def test_query():
    assert msg.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert msg.query(b"SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert msg.query("SELECT 'é'") == b"Q\x00\x00\x00\x10SELECT '\xc3\xa9'\x00"


def test_terminate():
    assert msg.TERMINATE == b"X\x00\x00\x00\x04"


def test_error_response():
    assert msg.error_response("28P01", "bad") == (
        b"E\x00\x00\x00\x1f" b"SFATAL\x00" b"VFATAL\x00" b"C28P01\x00" b"Mbad\x00" b"\x00")


def test_error_response_with_detail_and_hint():
    assert msg.error_response("08P01", "m", severity="ERROR", detail="d", hint="h") == (
        b"E\x00\x00\x00\x23" b"SERROR\x00" b"VERROR\x00" b"C08P01\x00" b"Mm\x00" b"Dd\x00" b"Hh\x00" b"\x00")


# -- parsers -------------------------------------------------------------------------------------------
def test_cstring():
    assert cstring(b"ab\0cd\0") == (b"ab", 3)
    assert cstring(b"ab\0cd\0", 3) == (b"cd", 6)
    assert cstring(b"\0") == (b"", 1)
    with pytest.raises(ProtocolViolation, match="unterminated"):
        cstring(b"abc")
    with pytest.raises(ProtocolViolation):
        cstring(b"ab\0cd", 3)


def test_parse_startup_params():
    assert msg.parse_startup_params(STARTUP[8:]) == {"user": "bob", "database": "app"}
    assert msg.parse_startup_params(b"\0") == {}
    assert msg.parse_startup_params(b"") == {}
    # Anything after the terminating empty name is ignored.
    assert msg.parse_startup_params(b"user\0bob\0\0junk") == {"user": "bob"}
    assert msg.parse_startup_params("application_name\0é\0\0".encode()) == {"application_name": "é"}


@pytest.mark.parametrize("payload", [b"user\0bob", b"user", b"user\0"])
def test_parse_startup_params_unterminated(payload):
    with pytest.raises(ProtocolViolation, match="unterminated"):
        msg.parse_startup_params(payload)


@pytest.mark.parametrize("payload", [b"user\0b\xffb\0\0", b"\xc3\0x\0\0"])
def test_parse_startup_params_not_utf8(payload):
    with pytest.raises(ProtocolViolation, match="not UTF-8"):
        msg.parse_startup_params(payload)


def test_parse_cancel():
    assert msg.parse_cancel(msg.cancel_request(5, 6)[8:]) == (5, 6)
    for bad in (b"", b"\0" * 7, b"\0" * 9):
        with pytest.raises(ProtocolViolation):
            msg.parse_cancel(bad)


def test_parse_auth_request():
    assert msg.parse_auth_request(b"\x00\x00\x00\x05\x01\x02\x03\x04") == (5, b"\x01\x02\x03\x04")
    assert msg.parse_auth_request(b"\x00\x00\x00\x00") == (0, b"")
    with pytest.raises(ProtocolViolation):
        msg.parse_auth_request(b"\x00\x00\x00")


def test_parse_sasl_initial():
    body = msg.sasl_initial("SCRAM-SHA-256", b"n,,n=,r=x")[5:]
    assert msg.parse_sasl_initial(body) == ("SCRAM-SHA-256", b"n,,n=,r=x")
    # -1: no initial response
    assert msg.parse_sasl_initial(b"M\0\xff\xff\xff\xff") == ("M", b"")


@pytest.mark.parametrize("body,why", [
    (b"SCRAM-SHA-256", "unterminated"),
    (b"SCRAM-SHA-256\0\0\0", "short"),
    (b"SCRAM-SHA-256\0\0\0\0\x05abc", "mismatch"),
    (b"SCRAM-SHA-256\0\0\0\0\x01abc", "mismatch"),
])
def test_parse_sasl_initial_bad(body, why):
    with pytest.raises(ProtocolViolation, match=why):
        msg.parse_sasl_initial(body)


def test_parse_parameter_status():
    assert msg.parse_parameter_status(msg.parameter_status("TimeZone", "UTC")[5:]) == ("TimeZone", "UTC")
    with pytest.raises(ProtocolViolation):
        msg.parse_parameter_status(b"TimeZone\0UTC")
    with pytest.raises(ProtocolViolation):
        msg.parse_parameter_status(b"TimeZone")


def test_parse_backend_key_data():
    assert msg.parse_backend_key_data(msg.backend_key_data(7, 0xDEADBEEF)[5:]) == (7, 0xDEADBEEF)
    with pytest.raises(ProtocolViolation):
        msg.parse_backend_key_data(b"\0" * 4)


def test_parse_error_fields():
    body = msg.error_response("08P01", "m", severity="ERROR", detail="d", hint="h")[5:]
    assert msg.parse_error_fields(body) == {"S": "ERROR", "V": "ERROR", "C": "08P01", "M": "m", "D": "d", "H": "h"}
    assert msg.parse_error_fields(b"\0") == {}
    assert msg.parse_error_fields(b"") == {}
    with pytest.raises(ProtocolViolation):
        msg.parse_error_fields(b"Mno terminator")


def test_parse_parse_and_bind():
    assert msg.parse_parse(b"s1\0SELECT $1\0\0\x01\0\0\0\x17") == (b"s1", b"SELECT $1")
    assert msg.parse_parse(b"\0SELECT 1\0\0\0") == (b"", b"SELECT 1")
    with pytest.raises(ProtocolViolation):
        msg.parse_parse(b"s1\0SELECT")
    assert msg.parse_bind_portal(b"p\0s1\0\0\0\0\0\0\0") == (b"p", b"s1")
    with pytest.raises(ProtocolViolation):
        msg.parse_bind_portal(b"p")


def test_query_text():
    assert msg.query_text(b"SELECT 1\0") == b"SELECT 1"
    assert msg.query_text(b"SELECT 1") == b"SELECT 1"


# -- split_startup ---------------------------------------------------------------------------------------
def test_split_startup_whole():
    assert split_startup(STARTUP) == (PROTOCOL_3_0, STARTUP[8:], len(STARTUP))
    assert split_startup(SSL_REQUEST) == (SSL_REQUEST_CODE, b"", 8)
    assert split_startup(GSSENC_REQUEST) == (GSSENC_REQUEST_CODE, b"", 8)
    assert split_startup(msg.cancel_request(1, 2)) == (CANCEL_REQUEST_CODE, b"\0\0\0\1\0\0\0\2", 16)


def test_split_startup_trailing_data():
    buf = bytearray(SSL_REQUEST + STARTUP + b"Q\0")
    code, payload, used = split_startup(buf)
    assert (code, used) == (SSL_REQUEST_CODE, 8)
    del buf[:used]
    code, payload, used = split_startup(buf)
    assert (code, payload) == (PROTOCOL_3_0, STARTUP[8:])
    del buf[:used]
    assert bytes(buf) == b"Q\0"


@pytest.mark.parametrize("packet", [STARTUP, SSL_REQUEST, msg.cancel_request(1, 2)])
def test_split_startup_one_byte_at_a_time(packet):
    buf = bytearray()
    for i, byte in enumerate(packet):
        buf.append(byte)
        got = split_startup(buf)
        if i < len(packet) - 1:
            assert got is None
    assert got[2] == len(packet)
    assert got[1] == packet[8:]


@pytest.mark.parametrize("length", [0, 4, 7, MAX_STARTUP_PACKET + 1, 0xFFFFFFFF])
def test_split_startup_lying_length(length):
    buf = length.to_bytes(4, "big") + b"\x00\x03\x00\x00"
    with pytest.raises(ProtocolViolation, match="invalid startup packet length"):
        split_startup(buf)


def test_split_startup_rejects_a_bad_length_as_soon_as_it_is_read():
    with pytest.raises(ProtocolViolation):
        split_startup(b"\x00\x00\x00\x04")
    with pytest.raises(ProtocolViolation):
        split_startup(b"\xff\xff\xff\xff")


def test_split_startup_accepts_the_maximum():
    buf = MAX_STARTUP_PACKET.to_bytes(4, "big") + b"\x00\x03\x00\x00" + b"\0" * (MAX_STARTUP_PACKET - 8)
    assert split_startup(buf)[2] == MAX_STARTUP_PACKET
    assert split_startup(buf[:-1]) is None


# -- split_messages --------------------------------------------------------------------------------------
MESSAGES = [
    msg.query("SELECT 1"),
    b"P\x00\x00\x00\x11s\x00SELECT 1\x00\x00\x00",
    b"B\x00\x00\x00\x0d\x00s\x00\x00\x00\x00\x00\x00\x00",
    b"S\x00\x00\x00\x04",
    msg.TERMINATE,
    msg.password_message(b"secret"),
    msg.sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc"),
]


@pytest.mark.parametrize("m", MESSAGES)
def test_split_messages_each_whole(m):
    assert split_messages(m, 1 << 20) == ([(m[:1], m[5:])], len(m))


def test_split_messages_many_with_trailing_data():
    data = b"".join(MESSAGES)
    for tail in (b"", b"Q", b"Q\0\0", b"Q\0\0\0\x10SELE"):
        out, used = split_messages(data + tail, 1 << 20)
        assert [k + len(p).to_bytes(4, "big") for k, p in out] == [m[:1] + (len(m) - 5).to_bytes(4, "big") for m in MESSAGES]
        assert [k + (len(p) + 4).to_bytes(4, "big") + p for k, p in out] == MESSAGES
        assert used == len(data)


def test_split_messages_returns_bytes_type_and_payload():
    out, _ = split_messages(bytearray(msg.query("x")), 100)
    kind, payload = out[0]
    assert kind == b"Q" and payload == b"x\0"
    assert isinstance(payload, bytes)


def test_split_messages_one_byte_at_a_time():
    data = b"".join(MESSAGES)
    buf = bytearray()
    got = []
    for byte in data:
        buf.append(byte)
        out, used = split_messages(buf, 1 << 20)
        del buf[:used]
        got.extend(kind + (len(p) + 4).to_bytes(4, "big") + p for kind, p in out)
    assert got == MESSAGES
    assert buf == b""


def test_split_messages_empty_and_partial():
    assert split_messages(b"", 100) == ([], 0)
    assert split_messages(b"Q\0\0\0", 100) == ([], 0)
    assert split_messages(b"Q\0\0\0\x0aab", 100) == ([], 0)


@pytest.mark.parametrize("length", [0, 1, 3])
def test_split_messages_length_below_header(length):
    with pytest.raises(ProtocolViolation, match=f"invalid length {length}"):
        split_messages(b"Q" + length.to_bytes(4, "big"), 100)


def test_split_messages_length_above_max():
    assert split_messages(b"Q\0\0\0\x64" + b"x" * 96, 100)[1] == 101
    with pytest.raises(ProtocolViolation, match="invalid length 101"):
        split_messages(b"Q\0\0\0\x65", 100)
    with pytest.raises(ProtocolViolation):
        split_messages(b"Q\xff\xff\xff\xff", 1 << 30)


def test_split_messages_bad_length_after_good_messages():
    with pytest.raises(ProtocolViolation):
        split_messages(msg.query("x") + b"Q\0\0\0\0", 100)
