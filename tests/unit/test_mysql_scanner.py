"""wire/mysql/scanner.py: the client stream's position, fed whole, byte by byte and split at every
offset, with 16 MiB multi-packet commands."""

import pytest

from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.packets import ProtocolError
from txrdsproxy.wire.mysql.scanner import CommandScanner, StreamPosition


def cmd(payload, seq=0):
    return P.encode_packet(payload, seq)


def stream_all(chunks, whole_limit=64):
    """Drive a scanner the way the frontend does: small commands whole, large ones streamed.
    -> [(kind, bytes)] with kind 'whole' or 'streamed', and the positions seen after each feed."""
    s = CommandScanner()
    out, current, positions = [], None, []
    for chunk in chunks:
        s.feed(chunk)
        while True:
            if not s.at_boundary:
                part = s.take()
                current += part
                if s.at_boundary:
                    out.append(("streamed", current))
                    current = None
                elif not part:
                    break
                continue
            head = s.head()
            if head is None:
                break
            length = head[0]
            if length <= whole_limit:
                if not s.whole():
                    break
                seq, payload = s.take_packet()
                out.append(("whole", P.encode_packet(payload, seq)))
            else:
                s.begin()
                current = s.take()
                if s.at_boundary:
                    out.append(("streamed", current))
                    current = None
        positions.append(s.position)
    return out, current, positions


SMALL = cmd(b"\x03SELECT 1")
BIG = cmd(b"\x03" + b"x" * 300, seq=0)


@pytest.mark.parametrize("cut", range(1, len(SMALL + BIG + SMALL)))
def test_split_at_every_offset_gives_the_same_commands(cut):
    data = SMALL + BIG + SMALL
    out, current, _ = stream_all([data[:cut], data[cut:]])
    assert current is None
    assert out == [("whole", SMALL), ("streamed", BIG), ("whole", SMALL)]


def test_byte_by_byte():
    data = SMALL + BIG + SMALL
    out, current, positions = stream_all([data[i:i + 1] for i in range(len(data))])
    assert out == [("whole", SMALL), ("streamed", BIG), ("whole", SMALL)]
    # Inside BIG (after its header and first byte were read) the stream is mid-command.
    assert positions[len(SMALL) + 10] is StreamPosition.COMMAND
    assert positions[-1] is StreamPosition.BOUNDARY


def test_partial_header_is_not_a_boundary_problem_but_partial_body_is():
    s = CommandScanner()
    s.feed(BIG[:2])
    assert s.head() is None and s.at_boundary  # nothing taken yet
    s.feed(BIG[2:50])
    s.begin()
    assert s.take() == BIG[:50]
    assert not s.at_boundary and s.taken == 50
    assert s.take() == b""
    s.feed(BIG[50:])
    assert s.take() == BIG[50:]
    assert s.at_boundary and s.taken == 0


def test_multi_packet_command_is_whole_only_after_its_last_continuation():
    payload = b"\x03" + b"y" * (P.MAX_PACKET_CHUNK + 10)
    data = P.encode_packet(payload, 0)
    first_end = 4 + P.MAX_PACKET_CHUNK
    s = CommandScanner()
    s.feed(data[:first_end])  # the whole first physical packet
    s.begin()
    assert s.take() == data[:first_end]
    assert not s.at_boundary, "a 0xFFFFFF packet announces a continuation"
    for i in range(3):  # the continuation header arrives byte by byte
        s.feed(data[first_end + i:first_end + i + 1])
        assert s.take() == b"" and not s.at_boundary
    s.feed(data[first_end + 3:first_end + 6])
    assert s.take() == data[first_end:first_end + 6]
    assert not s.at_boundary and s.taken == first_end + 6
    s.feed(data[first_end + 6:])
    assert s.take() == data[first_end + 6:]
    assert s.at_boundary


def test_exact_multiple_of_the_chunk_ends_with_an_empty_packet():
    payload = b"\x03" + b"z" * (P.MAX_PACKET_CHUNK - 1)  # exactly 0xFFFFFF bytes
    data = P.encode_packet(payload, 0)
    assert len(data) == 4 + P.MAX_PACKET_CHUNK + 4  # then an empty packet
    s = CommandScanner()
    s.feed(data[:-4])
    s.begin()
    s.take()
    assert not s.at_boundary
    s.feed(data[-4:])
    assert s.take() == data[-4:]
    assert s.at_boundary


def test_single_packet_units_ignore_continuation():
    s = CommandScanner()
    s.feed(b"\x00\x00\x00\x05")  # an empty LOCAL INFILE packet (end of file data)
    assert s.begin(single_packet=True) == 0
    assert s.take() == b"\x00\x00\x00\x05"
    assert s.at_boundary


def test_misuse_raises_protocol_error():
    s = CommandScanner()
    s.feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="empty command"):
        s.head()
    s = CommandScanner()
    s.feed(BIG[:10])
    with pytest.raises(ProtocolError):
        s.take_packet()
    s.begin()
    with pytest.raises(ProtocolError):
        s.head()
    with pytest.raises(ProtocolError):
        s.take_rest()


def test_cost_is_linear_many_small_feeds_of_one_large_command():
    # 4 MiB in 1-KiB reads: every read is taken at once (nothing re-joined).
    body = b"\x03" + b"q" * (4 * 1024 * 1024)
    data = P.encode_packet(body, 0)
    s = CommandScanner()
    s.feed(data[:1024])
    s.begin()
    total = len(s.take())
    for i in range(1024, len(data), 1024):
        s.feed(data[i:i + 1024])
        total += len(s.take())
        assert s.buffered == 0
    assert total == len(data) and s.at_boundary


def test_take_whole_takes_exactly_one_whole_command_and_stays_at_a_boundary():
    first = P.encode_packet(bytes((P.COM_QUERY,)) + b"SELECT 1", 0)
    second = P.encode_packet(bytes((P.COM_PING,)), 0)
    s = CommandScanner()
    for i in range(len(first)):  # not whole yet: refused, nothing taken
        s.feed(first[i:i + 1])
        if i < len(first) - 1:
            with pytest.raises(ProtocolError):
                s.take_whole()
            assert s.buffered == i + 1
    s.feed(second)
    assert s.take_whole() == first and s.at_boundary and s.taken == 0
    assert s.take_whole() == second and s.buffered == 0


def test_take_whole_refuses_a_continued_packet():
    s = CommandScanner()
    s.feed(b"\xff\xff\xff\x00" + b"\x03" * 0xFFFFFF)
    with pytest.raises(ProtocolError):
        s.take_whole()
