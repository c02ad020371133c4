"""ResponseTracker against hand-built server responses for every command type."""

import struct

import pytest

from txrdsproxy.wire.mysql import commands as C
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.packets import ProtocolError

BASE = P.CLIENT_PROTOCOL_41 | P.CLIENT_TRANSACTIONS | P.CLIENT_MULTI_RESULTS | \
    P.CLIENT_PS_MULTI_RESULTS | P.CLIENT_LOCAL_FILES
CAPS_EOF = BASE
CAPS_NOEOF = BASE | P.CLIENT_DEPRECATE_EOF | P.CLIENT_SESSION_TRACK

AC = P.SERVER_STATUS_AUTOCOMMIT
MORE = P.SERVER_MORE_RESULTS_EXISTS
INTX = P.SERVER_STATUS_IN_TRANS


def coldef(name=b"c"):
    return (b"\x03def" + b"\x00" + b"\x01t" + b"\x01t" + P.encode_lenenc_str(name)
            + P.encode_lenenc_str(name) + b"\x0c" + b"\x21\x00" + b"\x0b\x00\x00\x00"
            + b"\x03" + b"\x00\x00" + b"\x00" + b"\x00\x00")


def ok(status=AC, affected=0, header=b"\x00", state=b""):
    if state:
        status |= P.SERVER_SESSION_STATE_CHANGED
        return (header + b"\x00" + P.encode_lenenc_int(affected) + struct.pack("<HH", status, 0)
                + b"\x00" + P.encode_lenenc_str(state))
    return header + P.encode_lenenc_int(affected) + b"\x00" + struct.pack("<HH", status, 0)


def eof(status=AC):
    return P.eof_packet(status, 0)


def terminator(caps, status=AC):
    return ok(status, header=b"\xfe") if caps & P.CLIENT_DEPRECATE_EOF else eof(status)


def text_row(*vals):
    return b"".join(P.encode_lenenc_str(v) for v in vals)


def resultset(caps, ncols, rows, status=AC, binary=False):
    out = [P.encode_lenenc_int(ncols)] + [coldef() for _ in range(ncols)]
    if not caps & P.CLIENT_DEPRECATE_EOF:
        out.append(eof(status))
    for r in rows:
        out.append(b"\x00" + b"\x00" + r if binary else r)
    out.append(terminator(caps, status))
    return out


def wire(payloads, seq=1):
    return b"".join(P.encode_packet(p, (seq + i) & 0xFF) for i, p in enumerate(payloads))


def check_all_ways(caps, command, payloads, status=None, trailing=b"\x05\x00\x00\x09extra"):
    """The response is complete exactly at its last byte, whichever way it arrives."""
    data = wire(payloads)
    # whole, with trailing bytes
    t = C.ResponseTracker(caps)
    t.expect(command)
    buf = bytearray(data + trailing)
    assert t.consume(buf) == len(data)
    assert t.idle
    if status is not None:
        assert t.status == status
    # one byte at a time, buffer accumulating like a real receive path
    t2 = C.ResponseTracker(caps)
    t2.expect(command)
    buf = bytearray()
    pos = 0
    for i in range(len(data)):
        assert not t2.idle
        buf += data[i:i + 1]
        pos = t2.consume(buf, pos)
    assert pos == len(data) and t2.idle
    # logical packets
    t3 = C.ResponseTracker(caps)
    t3.expect(command)
    for i, p in enumerate(payloads):
        done = t3.feed(p)
        assert done == (i == len(payloads) - 1)
    assert t3.status == t.status == t2.status
    return t


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_query_ok_and_err(caps):
    check_all_ways(caps, P.COM_QUERY, [ok(AC | INTX, affected=3)], status=AC | INTX)
    t = check_all_ways(caps, P.COM_QUERY, [P.err_packet(1064, "42000", "syntax")])
    assert t.last_error.code == 1064


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_text_resultset(caps):
    rows = [text_row(b"1", b"a"), text_row(b"2", b"bb"), b"\xfb" + P.encode_lenenc_str(b"x")]
    t = check_all_ways(caps, P.COM_QUERY, resultset(caps, 2, rows, AC | INTX), AC | INTX)
    assert t.in_transaction


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_empty_resultset(caps):
    check_all_ways(caps, P.COM_QUERY, resultset(caps, 1, []))


def test_row_starting_with_fe_is_not_eof_legacy():
    # A row whose first column has an 8-byte length prefix starts with 0xFE;
    # with length >= 9 it must be treated as data.
    fe_row = b"\xfe" + struct.pack("<Q", 3) + b"abc"
    payloads = resultset(CAPS_EOF, 1, [fe_row, b"\xfe" + b"\x00" * 8], AC)
    check_all_ways(CAPS_EOF, P.COM_QUERY, payloads)


def test_huge_row_starting_with_fe_deprecate_eof():
    # Under DEPRECATE_EOF a 0xFE row is only possible as a >= 16 MiB packet.
    big = b"\xfe" + struct.pack("<Q", P.MAX_PACKET_CHUNK) + b"z" * P.MAX_PACKET_CHUNK
    payloads = resultset(CAPS_NOEOF, 1, [big], AC)
    data = wire(payloads)
    t = C.ResponseTracker(CAPS_NOEOF)
    t.expect(P.COM_QUERY)
    assert t.consume(bytearray(data)) == len(data)
    assert t.idle


def test_deprecate_eof_terminator_with_session_state():
    state = P.encode_session_state([(P.SESSION_TRACK_SCHEMA, "shop")])
    term = ok(AC, header=b"\xfe", state=state)
    assert len(term) > 9
    payloads = resultset(CAPS_NOEOF, 1, [text_row(b"1")])[:-1] + [term]
    t = check_all_ways(CAPS_NOEOF, P.COM_QUERY, payloads)
    assert t.take_session_state_changes() == [(P.SESSION_TRACK_SCHEMA, "shop")]
    assert t.session_state_changes == []


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_multi_resultsets_and_call(caps):
    # CALL p(): two result sets then the final OK, all chained with MORE_RESULTS.
    payloads = (resultset(caps, 1, [text_row(b"1")], AC | MORE)
                + resultset(caps, 2, [text_row(b"a", b"b")] * 3, AC | MORE)
                + [ok(AC)])
    check_all_ways(caps, P.COM_QUERY, payloads, status=AC)


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_multi_statement_ok_chain_and_error_stops(caps):
    payloads = [ok(AC | MORE | INTX), ok(AC | MORE | INTX)] + resultset(
        caps, 1, [text_row(b"1")], AC | INTX)
    check_all_ways(caps, P.COM_QUERY, payloads, status=AC | INTX)
    payloads = [ok(AC | MORE), P.err_packet(1146, "42S02", "no table")]
    t = check_all_ways(caps, P.COM_QUERY, payloads)
    assert t.last_error.sqlstate == "42S02"


def test_error_in_the_middle_of_rows():
    payloads = resultset(CAPS_EOF, 1, [text_row(b"1")])[:-1] + [
        P.err_packet(1317, "70100", "Query execution was interrupted")]
    check_all_ways(CAPS_EOF, P.COM_QUERY, payloads)


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_an_error_with_autocommit_off_counts_as_an_open_transaction(caps):
    # mysql-connector's BugOra20653441 (KILL QUERY of a SELECT in its rows, autocommit off,
    # CLIENT_DEPRECATE_EOF: no status before the ERR) left the server transaction open on a
    # connection the proxy thought free.  An ERR has no status: with autocommit off the
    # transaction the statement started may be open.
    t = check_all_ways(caps, P.COM_QUERY, [ok(0)], status=0)  # SET autocommit=0
    assert not t.in_transaction
    t.expect(P.COM_QUERY)
    rows = resultset(caps, 1, [text_row(b"1")], status=0)[:-1]
    buf = bytearray(wire(rows + [P.err_packet(1317, "70100", "Query execution was interrupted")]))
    assert t.consume(buf) == len(buf)
    assert t.idle and t.in_transaction
    t.expect(P.COM_QUERY)
    assert t.feed(ok(0))  # ROLLBACK: the server says
    assert t.idle and not t.in_transaction
    # With autocommit on, a failed statement leaves no transaction behind.
    t = check_all_ways(caps, P.COM_QUERY, [P.err_packet(1062, "23000", "Duplicate entry")])
    assert not t.in_transaction


def test_local_infile():
    t = C.ResponseTracker(CAPS_EOF)
    t.expect(P.COM_QUERY)
    req = wire([b"\xfb/tmp/data.csv"])
    assert t.consume(bytearray(req)) == len(req)
    assert t.awaiting_client_data and not t.idle
    with pytest.raises(ProtocolError):
        t.feed(ok())
    t.client_packet(100)
    t.client_packet(P.MAX_PACKET_CHUNK)
    t.client_packet(0)  # ends the continued packet, not the file
    assert t.awaiting_client_data
    t.client_packet(0)  # end of file
    assert not t.awaiting_client_data and not t.idle
    assert t.feed(ok(AC, affected=5))
    with pytest.raises(ProtocolError):
        t.client_packet(0)


def test_local_infile_refused_outside_query():
    t = C.ResponseTracker(CAPS_EOF)
    t.expect(P.COM_STMT_EXECUTE)
    with pytest.raises(ProtocolError):
        t.feed(b"\xfbfile")


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
@pytest.mark.parametrize("params,cols", [(0, 0), (2, 0), (0, 3), (2, 3)])
def test_prepare_response(caps, params, cols):
    first = b"\x00" + struct.pack("<IHHBH", 7, cols, params, 0, 0)
    payloads = [first]
    for n in (params, cols):
        if n:
            payloads += [coldef() for _ in range(n)]
            if not caps & P.CLIENT_DEPRECATE_EOF:
                payloads.append(eof(AC))
    t = check_all_ways(caps, P.COM_STMT_PREPARE, payloads)
    assert t.last_prepare == (7, cols, params)


def test_prepare_error_and_garbage():
    check_all_ways(CAPS_EOF, P.COM_STMT_PREPARE, [P.err_packet(1064, "42000", "bad")])
    t = C.ResponseTracker(CAPS_EOF)
    t.expect(P.COM_STMT_PREPARE)
    with pytest.raises(ProtocolError):
        t.feed(b"\x00\x01\x00")
    t = C.ResponseTracker(CAPS_EOF)
    t.expect(P.COM_STMT_PREPARE)
    with pytest.raises(ProtocolError):
        t.feed(b"\x05abc")


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_execute_binary_resultset(caps):
    rows = [b"\x01\x02", b"\xfe\xfe\xfe"]  # binary rows begin 0x00 whatever follows
    payloads = resultset(caps, 2, rows, AC | INTX, binary=True)
    check_all_ways(caps, P.COM_STMT_EXECUTE, payloads, status=AC | INTX)
    check_all_ways(caps, P.COM_STMT_EXECUTE, [ok(AC, affected=1)])


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_execute_with_cursor_then_fetch(caps):
    cur = AC | P.SERVER_STATUS_CURSOR_EXISTS
    payloads = [b"\x01", coldef()]
    # After the metadata, one EOF (or OK-0xFE) carrying CURSOR_EXISTS; no rows.
    payloads.append(eof(cur) if not caps & P.CLIENT_DEPRECATE_EOF else ok(cur, header=b"\xfe"))
    check_all_ways(caps, P.COM_STMT_EXECUTE, payloads)
    fetch = [b"\x00\x00\x01", b"\x00\x00\x02", terminator(
        caps, cur | P.SERVER_STATUS_LAST_ROW_SENT)]
    check_all_ways(caps, P.COM_STMT_FETCH, fetch)


def test_no_response_commands():
    t = C.ResponseTracker(CAPS_EOF)
    for cmd in (P.COM_STMT_CLOSE, P.COM_STMT_SEND_LONG_DATA, P.COM_QUIT):
        t.expect(cmd)
        assert t.idle
    with pytest.raises(ProtocolError):
        t.consume(bytearray(wire([ok()])))


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
def test_field_list(caps):
    check_all_ways(caps, P.COM_FIELD_LIST, [coldef(b"a"), coldef(b"b"), terminator(caps)])
    check_all_ways(caps, P.COM_FIELD_LIST, [P.err_packet(1146, "42S02", "x")])


def test_statistics():
    check_all_ways(CAPS_EOF, P.COM_STATISTICS, [b"Uptime: 5  Threads: 1  Questions: 2"])
    # A stats string that happens to begin with 0x00/0xFE is still one packet.
    check_all_ways(CAPS_EOF, P.COM_STATISTICS, [b"\xfe"])


@pytest.mark.parametrize("cmd", [P.COM_PING, P.COM_INIT_DB, P.COM_RESET_CONNECTION,
                                 P.COM_STMT_RESET, P.COM_PROCESS_KILL])
def test_ok_err_commands(cmd):
    check_all_ways(CAPS_NOEOF, cmd, [ok(AC)])
    check_all_ways(CAPS_NOEOF, cmd, [P.err_packet(1049, "42000", "Unknown database")])


def test_init_db_collects_schema_change():
    state = P.encode_session_state([(P.SESSION_TRACK_SCHEMA, "db2")])
    t = check_all_ways(CAPS_NOEOF, P.COM_INIT_DB, [ok(AC, state=state)])
    assert t.session_state_changes == [(P.SESSION_TRACK_SCHEMA, "db2")]


@pytest.mark.parametrize("reply", [eof(AC), ok(AC)])
def test_set_option(reply):
    check_all_ways(CAPS_EOF, P.COM_SET_OPTION, [reply])


def test_unexpected_fe_at_start_of_query_response():
    t = C.ResponseTracker(CAPS_EOF)
    t.expect(P.COM_QUERY)
    with pytest.raises(ProtocolError):
        t.feed(eof())


def test_unsupported_commands():
    t = C.ResponseTracker(CAPS_EOF)
    for cmd in (P.COM_CHANGE_USER, P.COM_BINLOG_DUMP, P.COM_BINLOG_DUMP_GTID,
                P.COM_REGISTER_SLAVE):
        with pytest.raises(C.UnsupportedCommand):
            t.expect(cmd)


def test_pipelined_prepare_and_execute():
    t = C.ResponseTracker(CAPS_NOEOF)
    t.expect(P.COM_STMT_PREPARE)
    t.expect(P.COM_STMT_EXECUTE)
    t.expect(P.COM_STMT_CLOSE)
    prep = [b"\x00" + struct.pack("<IHHBH", 1, 1, 0, 0, 0), coldef()]
    exe = resultset(CAPS_NOEOF, 1, [b"\x00\x00\x05"], AC, binary=True)
    data = wire(prep) + wire(exe)
    assert t.consume(bytearray(data)) == len(data)
    assert t.idle and t.completed == 2


def test_idle_packets_and_partial_headers():
    t = C.ResponseTracker(CAPS_EOF)
    with pytest.raises(ProtocolError):
        t.feed(ok())
    t.expect(P.COM_QUERY)
    assert t.consume(bytearray(b"\x07\x00")) == 0
    assert t.consume(bytearray(b"\x07\x00\x00\x01\x00\x00")) == 0  # truncated body
    assert not t.idle


def test_bad_column_count():
    t = C.ResponseTracker(CAPS_EOF)
    t.expect(P.COM_QUERY)
    with pytest.raises(ProtocolError):
        t.feed(b"\xfc\x01")
    t = C.ResponseTracker(CAPS_EOF)
    t.expect(P.COM_QUERY)
    with pytest.raises(ProtocolError):
        t.feed(b"")


def test_missing_eof_after_coldefs():
    t = C.ResponseTracker(CAPS_EOF)
    t.expect(P.COM_QUERY)
    t.feed(b"\x01")
    t.feed(coldef())
    with pytest.raises(ProtocolError):
        t.feed(text_row(b"1"))


def test_malformed_ok_is_protocol_error():
    t = C.ResponseTracker(CAPS_NOEOF)
    t.expect(P.COM_QUERY)
    with pytest.raises(ProtocolError):
        t.feed(b"\x00\xfc")


def test_status_tracking_transaction_lifecycle():
    t = C.ResponseTracker(CAPS_EOF, status=AC)
    assert not t.in_transaction
    t.expect(P.COM_QUERY)
    t.feed(ok(AC | INTX))
    assert t.idle and t.in_transaction
    t.expect(P.COM_QUERY)
    assert t.command == P.COM_QUERY
    t.feed(ok(AC))
    assert t.idle and not t.in_transaction and t.command is None


@pytest.mark.parametrize("caps", [CAPS_EOF, CAPS_NOEOF])
@pytest.mark.parametrize("row_size", [1 << 20, P.MAX_PACKET_CHUNK + 1000])
def test_large_rows_are_streamed_not_buffered(caps, row_size):
    """Driven as MySQLBackendConnection._forward does (buffer trimmed after each consume): the
    proxy never holds more than one read of a large row, continuation fragments included."""
    big = b"\xfc" + struct.pack("<H", 0xFFFF)  # starts like a length-encoded cell
    row = big + b"r" * (row_size - len(big))
    data = wire(resultset(caps, 1, [row, text_row(b"small")]))
    t = C.ResponseTracker(caps)
    t.expect(P.COM_QUERY)
    buf = bytearray()
    forwarded = 0
    largest = 0
    step = 64 * 1024
    for i in range(0, len(data), step):
        buf += data[i:i + step]
        largest = max(largest, len(buf))
        end = t.consume(buf, 0)
        forwarded += end
        del buf[:end]
    assert t.idle and forwarded == len(data) and not buf
    assert largest <= step + 8


def test_a_streamed_row_followed_by_the_terminator_in_pieces():
    caps = CAPS_NOEOF
    row = text_row(b"x" * 5000)
    payloads = resultset(caps, 1, [row], status=AC | INTX)
    data = wire(payloads)
    for cut in range(1, len(data)):
        t = C.ResponseTracker(caps)
        t.expect(P.COM_QUERY)
        buf = bytearray(data[:cut])
        end = t.consume(buf, 0)
        del buf[:end]
        buf += data[cut:]
        end = t.consume(buf, 0)
        assert end == len(buf) and t.idle and t.in_transaction


# --- consume's inline result-set path against the per-packet state machine -------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _responses(draw):
    """A COM_QUERY / COM_STMT_EXECUTE response: result sets (1..300 columns: one-byte and
    0xFC column counts), rows (some starting with 0xFE, 0xFF-free), OK/ERR parts chained by
    MORE_RESULTS, as legacy-EOF or DEPRECATE_EOF bytes."""
    caps = draw(st.sampled_from([CAPS_EOF, CAPS_NOEOF]))
    command = draw(st.sampled_from([P.COM_QUERY, P.COM_STMT_EXECUTE]))
    parts = draw(st.lists(st.sampled_from(["rs", "ok", "empty"]), min_size=1, max_size=3))
    end_with_err = draw(st.booleans())
    payloads = []
    for i, kind in enumerate(parts):
        last = i == len(parts) - 1 and not end_with_err
        status = draw(st.sampled_from([AC, AC | INTX, 0, AC | P.SERVER_STATUS_NO_BACKSLASH_ESCAPES])) \
            | (0 if last else MORE)
        if kind == "ok":
            # the short OK consume reads inline, and longer ones (2-byte affected rows, session
            # state changes) that go through the packet machine
            shape = draw(st.sampled_from(["short", "affected", "state"]))
            if shape == "short":
                payloads.append(ok(status))
            elif shape == "affected":
                payloads.append(ok(status, affected=300))
            else:
                payloads.append(ok(status, state=b"\x01\x04\x03abc" if caps & P.CLIENT_SESSION_TRACK
                                   else b"") + (b"" if caps & P.CLIENT_SESSION_TRACK else b"info"))
            continue
        ncols = draw(st.sampled_from([1, 2, 250, 251, 300]))
        rows = [] if kind == "empty" else draw(st.lists(
            st.sampled_from([text_row(b"1"), text_row(b"\xfe" * 3), text_row(b"x" * 300)]),
            max_size=3))
        payloads += resultset(caps, ncols, rows, status)
    if end_with_err:
        payloads.append(P.err_packet(1064, "42000", "bad"))
    return caps, command, payloads


@settings(max_examples=150, deadline=None)
@given(_responses(), st.data())
def test_consume_matches_the_packet_machine_at_any_split(response, data):
    caps, command, payloads = response
    logical = C.ResponseTracker(caps)
    logical.expect(command)
    for i, p in enumerate(payloads):
        assert logical.feed(p) == (i == len(payloads) - 1)
    raw = wire(payloads)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(raw)), max_size=6))))
    tracker = C.ResponseTracker(caps)
    tracker.expect(command)
    buf, pos, start = bytearray(), 0, 0
    for cut in cuts + [len(raw)]:
        buf += raw[start:cut]
        start = cut
        pos = tracker.consume(buf, pos)
    assert pos == len(raw) and tracker.idle
    assert tracker.status == logical.status
    assert (tracker.last_error is None) == (logical.last_error is None)
    assert tracker.completed == logical.completed == 1
    assert tracker.session_state_changes == logical.session_state_changes
