"""Connection-phase packets, byte for byte."""

import struct

import pytest

from txrdsproxy.wire.mysql import handshake as H
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.packets import ProtocolError

SCRAMBLE = bytes(range(1, 21))


def test_default_capabilities():
    caps = H.DEFAULT_SERVER_CAPABILITIES
    assert not caps & P.CLIENT_COMPRESS
    assert not caps & P.CLIENT_SSL
    for flag in (P.CLIENT_PROTOCOL_41, P.CLIENT_DEPRECATE_EOF, P.CLIENT_SESSION_TRACK,
                 P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, P.CLIENT_MULTI_RESULTS,
                 P.CLIENT_LOCAL_FILES, P.CLIENT_CONNECT_ATTRS, P.CLIENT_LONG_PASSWORD):
        assert caps & flag
    assert H.proxy_server_capabilities(tls=True) == caps | P.CLIENT_SSL
    assert H.proxy_server_capabilities() == caps


def test_make_scramble_is_nul_free():
    s = H.make_scramble(lambda n: bytes([0, 0x24, 0x80, 0xA4, 0xFF] * 4))
    assert len(s) == 20
    assert b"\x00" not in s and b"$" not in s
    assert all(b < 0x80 for b in s)


def test_build_handshake_v10_bytes():
    caps = H.DEFAULT_SERVER_CAPABILITIES
    pl = H.build_handshake_v10("8.0.0-txrdsproxy", 7, SCRAMBLE, caps, 45, 2,
                               "mysql_native_password")
    expected = (b"\x0a8.0.0-txrdsproxy\x00" + b"\x07\x00\x00\x00" + SCRAMBLE[:8] + b"\x00"
                + struct.pack("<H", caps & 0xFFFF) + b"\x2d" + b"\x02\x00"
                + struct.pack("<H", caps >> 16) + b"\x15" + b"\x00" * 10
                + SCRAMBLE[8:] + b"\x00" + b"mysql_native_password\x00")
    assert pl == expected
    hs = H.parse_handshake_v10(pl)
    assert hs == H.Handshake(10, "8.0.0-txrdsproxy", 7, SCRAMBLE, caps, 45, 2,
                             "mysql_native_password", 0)
    with pytest.raises(ValueError):
        H.build_handshake_v10("v", 1, b"short", caps, 45, 2, "x")


def mariadb_greeting():
    # A MariaDB-shaped greeting: CLIENT_MYSQL (bit 0) unset, extended caps in filler.
    caps = (H.DEFAULT_SERVER_CAPABILITIES & ~P.CLIENT_LONG_PASSWORD) | P.CLIENT_SSL
    return (b"\x0a5.5.5-10.11.6-MariaDB\x00" + b"\x2a\x00\x00\x00" + SCRAMBLE[:8] + b"\x00"
            + struct.pack("<H", caps & 0xFFFF) + b"\x08" + b"\x02\x00"
            + struct.pack("<H", caps >> 16) + b"\x15" + b"\x00" * 6
            + struct.pack("<I", 0x1D) + SCRAMBLE[8:] + b"\x00"
            + b"mysql_native_password\x00"), caps


def test_parse_mariadb_greeting():
    pl, caps = mariadb_greeting()
    hs = H.parse_handshake_v10(pl)
    assert hs.server_version == "5.5.5-10.11.6-MariaDB"
    assert hs.connection_id == 42
    assert hs.scramble == SCRAMBLE
    assert hs.capabilities == caps
    assert hs.mariadb_capabilities == 0x1D
    assert hs.auth_plugin == "mysql_native_password"


def test_parse_greeting_plugin_without_nul():
    pl, _ = mariadb_greeting()
    assert H.parse_handshake_v10(pl[:-1]).auth_plugin == "mysql_native_password"


def test_parse_greeting_truncations_never_escape():
    pl, _ = mariadb_greeting()
    for i in range(len(pl) - len(b"mysql_native_password\x00")):
        try:
            H.parse_handshake_v10(pl[:i])
        except ProtocolError:
            pass


def test_parse_greeting_err_and_bad_protocol():
    with pytest.raises(ProtocolError, match="1040"):
        H.parse_handshake_v10(P.err_packet(1040, "HY000", "Too many connections"))
    with pytest.raises(ProtocolError):
        H.parse_handshake_v10(b"\x09abc\x00")


CLIENT_CAPS = (P.CLIENT_LONG_PASSWORD | P.CLIENT_PROTOCOL_41 | P.CLIENT_SECURE_CONNECTION
               | P.CLIENT_PLUGIN_AUTH | P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
               | P.CLIENT_CONNECT_WITH_DB | P.CLIENT_CONNECT_ATTRS | P.CLIENT_TRANSACTIONS
               | P.CLIENT_DEPRECATE_EOF)


def test_response41_lenenc_full():
    auth = bytes(range(20))
    attrs = {"_client_name": "libmariadb", "program_name": "mysql"}
    pl = H.build_handshake_response41(CLIENT_CAPS, "app", auth, database="shop",
                                      auth_plugin="mysql_native_password",
                                      attributes=attrs)
    blob = b"".join(P.encode_lenenc_str(k.encode()) + P.encode_lenenc_str(v.encode())
                    for k, v in attrs.items())
    expected = (struct.pack("<IIB", CLIENT_CAPS, 0xFFFFFF, 45) + b"\x00" * 23 + b"app\x00"
                + b"\x14" + auth + b"shop\x00" + b"mysql_native_password\x00"
                + P.encode_lenenc_str(blob))
    assert pl == expected
    r = H.parse_handshake_response41(pl, H.DEFAULT_SERVER_CAPABILITIES)
    assert r == H.HandshakeResponse(CLIENT_CAPS, 0xFFFFFF, 45, "app", auth, "shop",
                                    "mysql_native_password", attrs, 0)


def test_response41_secure_connection_one_byte_length():
    caps = CLIENT_CAPS & ~(P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | P.CLIENT_CONNECT_ATTRS)
    pl = (struct.pack("<IIB", caps, 1 << 24, 33) + b"\x00" * 23 + b"bob\x00"
          + b"\x03abc" + b"db\x00" + b"caching_sha2_password\x00")
    r = H.parse_handshake_response41(pl, H.DEFAULT_SERVER_CAPABILITIES)
    assert (r.user, r.auth_response, r.database, r.auth_plugin, r.attributes) == (
        "bob", b"abc", "db", "caching_sha2_password", {})


def test_response41_old_nul_auth_and_no_db():
    caps = P.CLIENT_PROTOCOL_41 | P.CLIENT_LONG_PASSWORD
    pl = struct.pack("<IIB", caps, 0, 8) + b"\x00" * 23 + b"u\x00" + b"secret\x00"
    r = H.parse_handshake_response41(pl, H.DEFAULT_SERVER_CAPABILITIES)
    assert (r.user, r.auth_response, r.database, r.auth_plugin) == ("u", b"secret", None, None)


def test_response41_empty_password_and_optional_tail_absent():
    # pymysql-style: CONNECT_WITH_DB set but fields stop after auth (no db sent).
    pl = (struct.pack("<IIB", CLIENT_CAPS, 0, 45) + b"\x00" * 23 + b"root\x00" + b"\x00")
    r = H.parse_handshake_response41(pl, H.DEFAULT_SERVER_CAPABILITIES)
    assert r.auth_response == b""
    assert r.database is None and r.auth_plugin is None and r.attributes == {}


def test_response41_respects_server_caps():
    # The client set CONNECT_ATTRS but the server didn't offer it: no attrs read.
    caps = CLIENT_CAPS & ~P.CLIENT_CONNECT_WITH_DB
    pl = (struct.pack("<IIB", caps, 0, 45) + b"\x00" * 23 + b"u\x00\x00"
          + b"mysql_native_password\x00" + b"\x04\x01a\x01b")
    server = H.DEFAULT_SERVER_CAPABILITIES & ~P.CLIENT_CONNECT_ATTRS
    r = H.parse_handshake_response41(pl, server)
    assert r.attributes == {}
    r2 = H.parse_handshake_response41(pl, H.DEFAULT_SERVER_CAPABILITIES)
    assert r2.attributes == {"a": "b"}


def test_response41_mariadb_ext_caps():
    caps = CLIENT_CAPS & ~P.CLIENT_LONG_PASSWORD
    pl = (struct.pack("<IIB", caps, 0, 45) + b"\x00" * 19 + struct.pack("<I", 4)
          + b"u\x00\x00")
    assert H.parse_handshake_response41(pl, H.DEFAULT_SERVER_CAPABILITIES
                                        ).mariadb_capabilities == 4


def test_ssl_request():
    pl = H.build_ssl_request(CLIENT_CAPS, 45)
    assert len(pl) == 32
    assert H.is_ssl_request(pl)
    r = H.parse_handshake_response41(pl, H.proxy_server_capabilities(tls=True))
    assert r == H.SSLRequest(CLIENT_CAPS | P.CLIENT_SSL, 0xFFFFFF, 45)
    assert not H.is_ssl_request(pl[:31])


@pytest.mark.parametrize("cut", range(0, 70))
def test_response41_truncation_is_protocol_error(cut):
    pl = H.build_handshake_response41(CLIENT_CAPS, "app", b"x" * 20, database="shop",
                                      attributes={"k": "v"})
    if cut >= len(pl):
        return
    data = pl[:cut]
    try:
        H.parse_handshake_response41(data, H.DEFAULT_SERVER_CAPABILITIES)
    except ProtocolError:
        pass


def test_response41_lying_lengths():
    base = struct.pack("<IIB", CLIENT_CAPS, 0, 45) + b"\x00" * 23 + b"u\x00"
    for tail in (b"\xfc\xff\xff", b"\x30abc", b"\x00db-without-nul",
                 b"\x00db\x00plugin\x00\xfd\xff\xff\xff",
                 b"\x00db\x00plugin\x00\x04\x09abc"):
        with pytest.raises(ProtocolError):
            H.parse_handshake_response41(base + tail, H.DEFAULT_SERVER_CAPABILITIES)
    with pytest.raises(ProtocolError):
        H.parse_handshake_response41(struct.pack("<I", P.CLIENT_LONG_PASSWORD) + b"\x00" * 40,
                                     H.DEFAULT_SERVER_CAPABILITIES)  # pre-4.1


def test_build_response_capability_adjustment():
    pl = H.build_handshake_response41(CLIENT_CAPS, "u", b"", database=None,
                                      auth_plugin="mysql_native_password")
    caps = struct.unpack_from("<I", pl)[0]
    assert not caps & P.CLIENT_CONNECT_WITH_DB
    assert not caps & P.CLIENT_CONNECT_ATTRS
    assert pl.endswith(b"u\x00\x00mysql_native_password\x00")


def test_auth_switch_roundtrip():
    pl = H.auth_switch_request("mysql_native_password", SCRAMBLE)
    assert pl == b"\xfemysql_native_password\x00" + SCRAMBLE + b"\x00"
    assert H.parse_auth_switch_request(pl) == H.AuthSwitchRequest(
        "mysql_native_password", SCRAMBLE)
    assert H.parse_auth_switch_request(b"\xfe").plugin == "mysql_old_password"
    for bad in (b"", b"\x01x", b"\xfeno-nul"):
        with pytest.raises(ProtocolError):
            H.parse_auth_switch_request(bad)


def test_auth_more_data():
    assert H.auth_more_data(b"\x03") == b"\x01\x03"
    assert H.parse_auth_more_data(b"\x01\x04") == b"\x04"
    with pytest.raises(ProtocolError):
        H.parse_auth_more_data(b"\x00")


def test_make_scramble_maps_every_byte_as_the_server_does():
    """7 bits, NUL and '$' moved up by one: the same nonce bytes as the per-byte rule."""
    def per_byte(raw):
        out = bytearray()
        for b in raw:
            b &= 0x7F
            out.append(b + 1 if b in (0, 0x24) else b)
        return bytes(out)

    for start in range(0, 256, 20):
        raw = bytes((start + i) % 256 for i in range(20))
        assert H.make_scramble(lambda n, raw=raw: raw) == per_byte(raw)
    assert len(H.make_scramble()) == 20


@pytest.mark.parametrize("version", ["10.11.6-MariaDB-log", "5.7.0-txrdsproxy", "8.0.36", "x"])
@pytest.mark.parametrize("caps", [H.DEFAULT_SERVER_CAPABILITIES,
                                  H.DEFAULT_SERVER_CAPABILITIES | P.CLIENT_SSL,
                                  H.DEFAULT_SERVER_CAPABILITIES & ~P.CLIENT_PLUGIN_AUTH])
def test_greeting_template_is_the_built_greeting(version, caps):
    import os
    template = H.GreetingTemplate(version, caps, 224, P.SERVER_STATUS_AUTOCOMMIT, H.NATIVE_PASSWORD)
    for connection_id in (0, 1, 77, 0xFFFFFFFF, 0x1_0000_0005):
        scramble = H.make_scramble(os.urandom)
        built = P.encode_packet(H.build_handshake_v10(
            version, connection_id, scramble, caps, 224, P.SERVER_STATUS_AUTOCOMMIT,
            H.NATIVE_PASSWORD), 0)
        assert template.packet(connection_id, scramble) == built
        parsed = H.parse_handshake_v10(built[4:])
        assert parsed.connection_id == connection_id & 0xFFFFFFFF
        if caps & P.CLIENT_PLUGIN_AUTH:
            assert parsed.scramble == scramble
    with pytest.raises(ValueError):
        template.packet(1, b"short")


def _attributes_by_lenenc(blob):
    """The reference: every string through packets.read_lenenc_str."""
    attrs, pos = {}, 0
    while pos < len(blob):
        key, pos = P.read_lenenc_str(blob, pos)
        value, pos = P.read_lenenc_str(blob, pos)
        attrs[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return attrs


def _outcome(fn, blob):
    try:
        return fn(blob)
    except ProtocolError:
        return ProtocolError


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=300)), max_size=4).map(
        lambda pairs: b"".join(P.encode_lenenc_str(k) + P.encode_lenenc_str(v) for k, v in pairs)),
), st.integers(0, 3))
def test_connection_attributes_read_as_lenenc_strings(blob, cut):
    """Well-formed attributes (short and 0xFC-length strings), truncated ones, and garbage: the
    same dict, or the same ProtocolError, as reading each string with read_lenenc_str."""
    blob = blob[:len(blob) - cut] if cut else blob
    assert _outcome(H._attributes, blob) == _outcome(_attributes_by_lenenc, blob)
