"""ClientStream.take_batch: one whole Parse/Bind/Describe/Execute/Sync batch per read, taken
without the scanner, must have exactly the effect `feed` has (or not be taken at all).

- differential (hypothesis): any run of client messages -- named and unnamed statements and
  portals, statements that pin, disguised ones, malformed strings, lying lengths, Syncs in the
  middle, Queries and Flushes after the Sync, batches already open or sessions already pinned --
  gives the same bytes to the database, pin, pin text, counts, open-batch flag and error with the
  fast path as with `feed` alone;
- end to end through the real PgFrontend and PgBackendConnections: a batch followed by a
  pipelined Query, split at every byte, gives the client and every server the same bytes and
  releases each connection only at a boundary, with and without the fast path.
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import test_pg_release_boundary as rb
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg import pinning
from txrdsproxy.wire.pg.frontend import ClientStream
from txrdsproxy.wire.pg.framing import ProtocolViolation, message
from txrdsproxy.wire.pg.scanner import MessageScanner


def parse(sql, name=b""):
    return message(b"P", name + b"\0" + sql + b"\0\0\0")


def bind(portal=b"", statement=b""):
    return message(b"B", portal + b"\0" + statement + b"\0\0\0\0\0\0\0")


DESCRIBE = message(b"D", b"P\0")
EXECUTE = message(b"E", b"\0\0\0\0\0")
SYNC = message(b"S")
FLUSH = message(b"H")
PGBENCH = (parse(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1") + bind() + DESCRIBE + EXECUTE
           + SYNC)

SQL = [b"SELECT 1", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1", b"SET search_path = evil",
       b"/* SELECT */ SET work_mem = '1MB'", b"SELECT 'SET x = 1'", b"select set_config('a', 'b', false)",
       b"LISTEN chan", b"SELECT 1; SET x = 1", b"PREPARE p AS SELECT 1", b"SELECT $$; SET a=1; $$",
       b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", b"SELECT pg_advisory_lock(1)", b"x" * 70000]
MESSAGES = st.one_of(
    st.builds(parse, st.sampled_from(SQL), st.sampled_from([b"", b"", b"s1"])),
    st.builds(bind, st.sampled_from([b"", b"", b"p1"]), st.sampled_from([b"", b"s1"])),
    st.sampled_from([DESCRIBE, EXECUTE, SYNC, FLUSH, msg.query("SELECT 1"), message(b"C", b"S\0"),
                     message(b"D", b"S"),  # unterminated name: not looked at, forwarded
                     message(b"P", b"unterminated"), message(b"B", b"unterminated"),
                     message(b"P", b"\0SET a = 1"),  # named, its SQL unterminated in the message
                     b"P\0\0\0\x03", b"B\0\0\x01\0\0", b"E\0\0\0\x04", message(b"d", b"data")]),
)


class Conn:
    server_params = {"standard_conforming_strings": "on"}


def outcome(prefix, data, fast, max_size=1 << 20, gate=False):
    stream = ClientStream(max_size)
    sent = []
    stream.attach(Conn(), sent.append)
    stream.gate = gate  # the session's connection takes nothing pipelined behind an open request
    error = None
    try:
        stream.feed(prefix)
        if fast and stream.take_batch(data):
            sent.append(data)
        else:
            stream.feed(data)
    except ProtocolViolation as e:
        error = str(e)
    return (b"".join(sent), stream.pin_reason, stream.pin_text, stream.outstanding, stream.requests,
            stream.unsynced, error, stream.scanner.buffered, stream.holding)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.lists(MESSAGES, max_size=2), batch=st.lists(MESSAGES, min_size=1, max_size=6),
       sync=st.booleans(), max_size=st.sampled_from([1 << 20, 1 << 20, 60]), gate=st.booleans())
def test_take_batch_has_the_effect_of_feed(prefix, batch, sync, max_size, gate):
    """(max_size: the session's MaxMessageSize; a longer message is refused either way.  gate:
    a batch behind an unanswered request is held, never taken)"""
    data = b"".join(batch) + (SYNC if sync else b"")
    head = b"".join(prefix)
    assert outcome(head, data, True, max_size, gate) == outcome(head, data, False, max_size, gate)


def test_a_batch_behind_an_unanswered_request_is_not_taken_when_gated():
    stream = ClientStream(1 << 20)
    sent = []
    stream.attach(Conn(), sent.append)
    stream.gate = True
    assert stream.take_batch(PGBENCH)  # nothing outstanding: taken
    assert not stream.take_batch(PGBENCH)  # behind it: left to feed, which holds it
    stream.feed(PGBENCH)
    assert stream.holding and sent == [] and stream.outstanding == 1


def test_pgbench_batch_is_taken_without_the_scanner(monkeypatch):
    stream = ClientStream(1 << 20)
    stream.attach(Conn(), lambda data: None)
    monkeypatch.setattr(MessageScanner, "feed", lambda self, data: pytest.fail("scanned"))
    assert stream.take_batch(PGBENCH)
    assert (stream.outstanding, stream.requests, stream.unsynced, stream.pin_reason) == (1, 1, False, None)


@pytest.mark.parametrize("data, reason", [
    (parse(b"SET search_path = evil") + bind() + EXECUTE + SYNC, pinning.PinReason.SET_VARIABLE),
    (parse(b"/* x */ SELECT 1; SET search_path = evil") + bind() + EXECUTE + SYNC, pinning.PinReason.SET_VARIABLE),
    (parse(b"SELECT 1", b"stmt") + bind(statement=b"stmt") + EXECUTE + SYNC, pinning.PinReason.PREPARED_STATEMENT),
    (parse(b"SELECT 1") + bind(b"portal") + EXECUTE + SYNC, pinning.PinReason.NAMED_PORTAL),
])
def test_disguised_and_named_batches_pin_on_the_fast_path(data, reason):
    stream = ClientStream(1 << 20)
    stream.attach(Conn(), lambda data: None)
    assert stream.take_batch(data)
    assert stream.pin_reason is reason


@pytest.mark.parametrize("data", [
    PGBENCH + msg.query("SELECT 1"),  # pipelined after the Sync
    PGBENCH[:-5] + SYNC + PGBENCH,  # two batches
    PGBENCH[:-5] + FLUSH + SYNC,
    PGBENCH[:-5],  # no Sync: the batch stays open
    PGBENCH[:-1],
    b"P\0\0\x10\0" + PGBENCH[5:],  # a lying length
    message(b"C", b"S\0") + SYNC,
])
def test_anything_else_is_left_to_the_scanner(data):
    stream = ClientStream(1 << 20)
    stream.attach(Conn(), lambda data: None)
    assert not stream.take_batch(data)
    assert (stream.outstanding, stream.requests, stream.unsynced, stream.pin_reason) == (0, 0, False, None)


# -- end to end -----------------------------------------------------------------------------------------
def run_split(chunks, fast, monkeypatch):
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(ClientStream, "take_batch", lambda self, data: False)
        h = rb.session()
        rb.run(h, chunks)
        pool = h.ctx.pool
        return (h.sent(), [s.t.value() for s in pool.servers.values()], h.frontend.pin_reason, h.closed,
                [(clean, mid) for _, clean, _, mid in pool.released], h.frontend._stream.outstanding)


@pytest.mark.parametrize("tail", [msg.query("SELECT 1"), parse(b"SET a = 1") + bind() + EXECUTE + SYNC],
                         ids=["query", "pinning-batch"])
def test_every_split_of_a_batch_and_what_follows_is_the_same_on_both_paths(tail, monkeypatch):
    stream = PGBENCH + tail
    cuts = [[stream]] + [[stream[:i], stream[i:]] for i in range(1, len(stream))]
    cuts += [[PGBENCH, tail]]
    for chunks in cuts:
        fast = run_split(chunks, True, monkeypatch)
        assert fast == run_split(chunks, False, monkeypatch), chunks
        assert all(clean is False or not mid for clean, mid in fast[4])
        assert fast[0].count(b"Z\0\0\0\x05") == 2  # both requests answered


def test_release_boundary_server_answers_the_whole_batch():
    """The scripted server of the boundary tests answers each message of the batch."""
    h = rb.session()
    h.send(PGBENCH)
    h.ctx.pool.step()
    assert rb.replies(h) == [b"1", b"2", b"n", b"C", b"Z"]
    assert struct.unpack_from("!I", PGBENCH, 1)[0] == len(PGBENCH[:PGBENCH.index(b"B")]) - 1


def test_a_strings_nul_is_looked_for_only_inside_its_own_message():
    """The SQL of a Parse ends at a NUL inside that Parse: a NUL in the next message (a Bind)
    does not end it.  take_batch leaves such a batch to feed, which refuses it."""
    for unterminated in (message(b"P", b"\0SET work_mem = '1MB'"), message(b"P", b"s1"),
                         message(b"B", b"p1")):
        data = unterminated + bind() + DESCRIBE + EXECUTE + SYNC
        stream = ClientStream(1 << 20)
        stream.attach(Conn(), [].append)
        assert not stream.take_batch(data)
        assert stream.outstanding == 0 and stream.pin_reason is None
        assert outcome(b"", data, True) == outcome(b"", data, False)
        assert outcome(b"", data, False)[6] is not None  # feed: a protocol violation
