"""Byte-for-byte tests of MySQL framing and OK/ERR/EOF packets."""

import struct

import pytest

from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.packets import ProtocolError


def frame(payload, seq):
    return struct.pack("<I", len(payload))[:3] + bytes((seq,)) + payload


# --- length-encoded values ------------------------------------------------------
@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (250, b"\xfa"), (251, b"\xfc\xfb\x00"), (0xFFFF, b"\xfc\xff\xff"),
    (0x10000, b"\xfd\x00\x00\x01"), (0xFFFFFF, b"\xfd\xff\xff\xff"),
    (0x1000000, b"\xfe\x00\x00\x00\x01\x00\x00\x00\x00"),
])
def test_lenenc_int_roundtrip(value, encoded):
    assert P.encode_lenenc_int(value) == encoded
    assert P.read_lenenc_int(encoded + b"zz", 0) == (value, len(encoded))


def test_lenenc_null_and_bad():
    assert P.read_lenenc_int(b"\xfb") == (None, 1)
    for bad in (b"", b"\xff", b"\xfc\x01", b"\xfd\x01\x02", b"\xfe\x01"):
        with pytest.raises(ProtocolError):
            P.read_lenenc_int(bad)
    with pytest.raises(ValueError):
        P.encode_lenenc_int(-1)


def test_lenenc_str():
    enc = P.encode_lenenc_str(b"hello")
    assert enc == b"\x05hello"
    assert P.read_lenenc_str(enc + b"x") == (b"hello", 6)
    with pytest.raises(ProtocolError):
        P.read_lenenc_str(b"\x05hell")
    with pytest.raises(ProtocolError):
        P.read_lenenc_str(b"\xfb")


# --- framing -------------------------------------------------------------------------
def test_encode_small_packet():
    assert P.encode_packet(b"\x03SELECT 1", 0) == b"\x09\x00\x00\x00\x03SELECT 1"
    assert P.encode_packet(b"", 7) == b"\x00\x00\x00\x07"
    assert P.encode_packet(b"x", 255) == b"\x01\x00\x00\xffx"


def test_encode_continuation_not_multiple():
    payload = b"a" * (P.MAX_PACKET_CHUNK + 10)
    wire = P.encode_packet(payload, 3)
    assert wire[:4] == b"\xff\xff\xff\x03"
    tail = wire[4 + P.MAX_PACKET_CHUNK:]
    assert tail == b"\x0a\x00\x00\x04" + b"a" * 10
    assert P.next_seq(3, len(payload)) == 5


def test_encode_continuation_exact_multiple():
    payload = b"b" * P.MAX_PACKET_CHUNK
    wire = P.encode_packet(payload, 255)
    assert len(wire) == 4 + P.MAX_PACKET_CHUNK + 4
    assert wire[:4] == b"\xff\xff\xff\xff"
    assert wire[-4:] == b"\x00\x00\x00\x00"  # trailing empty packet, seq wrapped
    assert P.fragment_count(len(payload)) == 2
    two = b"c" * (2 * P.MAX_PACKET_CHUNK)
    wire2 = P.encode_packet(two, 0)
    assert len(wire2) == 3 * 4 + len(two)
    assert wire2[-4:] == b"\x00\x00\x00\x02"


def test_reader_whole_packets_and_trailing():
    wire = frame(b"\x00\x00\x00\x02\x00\x00\x00", 1) + frame(b"abc", 2) + b"\x05\x00"
    r = P.PacketReader()
    assert r.feed(wire) == [(1, b"\x00\x00\x00\x02\x00\x00\x00"), (2, b"abc")]
    assert r.buffered == 2
    assert r.feed(b"\x00\x03hello") == [(3, b"hello")]
    assert r.buffered == 0


def test_reader_one_byte_at_a_time():
    wire = frame(b"first", 0) + frame(b"", 1) + frame(b"third!", 2)
    r = P.PacketReader()
    got = []
    for i in range(len(wire)):
        got.extend(r.feed(wire[i:i + 1]))
    assert got == [(0, b"first"), (1, b""), (2, b"third!")]


@pytest.mark.parametrize("extra", [0, 10, P.MAX_PACKET_CHUNK])
def test_reader_continuation(extra):
    payload = bytes(range(256)) * ((P.MAX_PACKET_CHUNK + extra) // 256) + b"z" * (
        (P.MAX_PACKET_CHUNK + extra) % 256)
    assert len(payload) == P.MAX_PACKET_CHUNK + extra
    wire = P.encode_packet(payload, 0) + frame(b"next", 9)
    r = P.PacketReader()
    out = []
    step = 1 << 20
    for i in range(0, len(wire), step):
        out.extend(r.feed(wire[i:i + step]))
    last_seq = P.fragment_count(len(payload)) - 1
    assert len(out) == 2
    assert out[0][0] == last_seq
    assert out[0][1] == payload
    assert out[1] == (9, b"next")


def test_reader_max_payload_single_and_continued():
    r = P.PacketReader(max_payload=10)
    with pytest.raises(ProtocolError):
        r.feed(b"\x0b\x00\x00\x00")  # header alone is enough to refuse
    r = P.PacketReader(max_payload=P.MAX_PACKET_CHUNK + 5)
    r.feed(b"\xff\xff\xff\x00" + b"a" * P.MAX_PACKET_CHUNK)
    with pytest.raises(ProtocolError):
        r.feed(b"\x06\x00\x00\x01")
    r = P.PacketReader(max_payload=5)
    assert r.feed(frame(b"12345", 0)) == [(0, b"12345")]


def test_reader_take_buffer():
    r = P.PacketReader()
    assert r.feed(frame(b"x", 1) + b"\x16\x03\x01") == [(1, b"x")]
    assert r.take_buffer() == b"\x16\x03\x01"
    assert r.buffered == 0


def test_split_packets():
    buf = bytearray(b"junk" + frame(b"ab", 1) + frame(b"", 2) + frame(b"cde", 3)[:5])
    end, found = P.split_packets(buf, 4)
    assert found == [(8, 2, 1), (14, 0, 2)]
    assert end == 14
    assert P.split_packets(b"\x01\x00") == (0, [])


# --- OK / ERR / EOF ------------------------------------------------------------------
CAPS41 = P.CLIENT_PROTOCOL_41 | P.CLIENT_TRANSACTIONS
CAPS_TRACK = CAPS41 | P.CLIENT_SESSION_TRACK


def test_ok_packet_bytes_and_parse():
    pl = P.ok_packet(affected_rows=3, last_insert_id=300, status=0x0003, warnings=1)
    assert pl == b"\x00\x03\xfc\x2c\x01\x03\x00\x01\x00"
    ok = P.parse_ok(pl, CAPS41)
    assert ok == P.OK(3, 300, 3, 1, b"", [])
    assert P.parse_ok(pl, CAPS_TRACK).status == 3


def test_ok_with_info_both_encodings():
    pl = P.ok_packet(1, 0, 2, 0, b"Rows matched: 1")
    assert P.parse_ok(pl, CAPS41).info == b"Rows matched: 1"
    pl2 = P.ok_packet_for(CAPS_TRACK, 1, 0, 2, 0, "Rows matched: 1")
    assert pl2 == b"\x00\x01\x00\x02\x00\x00\x00\x0fRows matched: 1"
    assert P.parse_ok(pl2, CAPS_TRACK).info == b"Rows matched: 1"


def test_ok_session_state():
    changes = [
        (P.SESSION_TRACK_SYSTEM_VARIABLES, ("autocommit", "OFF")),
        (P.SESSION_TRACK_SCHEMA, "shop"),
        (P.SESSION_TRACK_STATE_CHANGE, "1"),
        (P.SESSION_TRACK_TRANSACTION_STATE, "T_______"),
        (P.SESSION_TRACK_TRANSACTION_CHARACTERISTICS, "START TRANSACTION;"),
        (P.SESSION_TRACK_GTIDS, b"\x00\x050-1-2"),
    ]
    state = P.encode_session_state(changes)
    status = P.SERVER_SESSION_STATE_CHANGED | P.SERVER_STATUS_IN_TRANS
    pl = (b"\x00\x00\x00" + struct.pack("<HH", status, 0) + b"\x00"
          + P.encode_lenenc_str(state))
    ok = P.parse_ok(pl, CAPS_TRACK)
    assert ok.status == status
    assert ok.session_state_changes == changes
    # Without CLIENT_SESSION_TRACK the tail is plain info.
    assert P.parse_ok(pl, CAPS41).session_state_changes == []


def test_ok_mariadb_multiple_sysvars_in_one_entry():
    entry = (P.encode_lenenc_str(b"a") + P.encode_lenenc_str(b"1")
             + P.encode_lenenc_str(b"b") + P.encode_lenenc_str(b"2"))
    state = b"\x00" + P.encode_lenenc_str(entry)
    assert P.parse_session_state(state) == [(0, ("a", "1")), (0, ("b", "2"))]


@pytest.mark.parametrize("bad", [
    b"", b"\x01", b"\x00", b"\x00\x00", b"\x00\x00\x00\x02", b"\x00\xfc\x01",
    b"\x00\x00\x00\x00\x40\x00\x00\x05ab", b"\x00\x00\x00\x00\x40\x00\x00\x00\x09\x00",
    b"\x00\xfb\x00\x02\x00\x00\x00",
])
def test_ok_malformed(bad):
    with pytest.raises(ProtocolError):
        P.parse_ok(bad, CAPS_TRACK)


def test_err_packet():
    pl = P.err_packet(1045, "28000", "Access denied")
    assert pl == b"\xff\x15\x04#28000Access denied"
    assert P.parse_err(pl) == P.ERR(1045, "28000", "Access denied")
    assert P.parse_err(b"\xff\x10\x04Too many connections") == P.ERR(
        1040, "HY000", "Too many connections")
    for bad in (b"", b"\xff\x01", b"\x00\x01\x02"):
        with pytest.raises(ProtocolError):
            P.parse_err(bad)
    with pytest.raises(ValueError):
        P.err_packet(1, "123", "x")


def test_eof_packet():
    pl = P.eof_packet(status=0x000A, warnings=2)
    assert pl == b"\xfe\x02\x00\x0a\x00"
    assert P.parse_eof(pl) == P.EOF(2, 10)
    assert P.is_eof(pl)
    assert not P.is_eof(b"\xfe" + b"\x00" * 8)
    assert P.is_eof(b"\xfe" + b"\x00" * 8, deprecate_eof=True)
    for bad in (b"", b"\x00\x00", b"\xfe" + b"\x00" * 9, b"\xfe\x00\x00\x01"):
        with pytest.raises(ProtocolError):
            P.parse_eof(bad)
