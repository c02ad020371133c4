"""The lent reply fast path of PgBackendConnection.dataReceived against the scanner path.

A read that is whole messages the proxy does not look at, ending with a ReadyForQuery, is
forwarded in one write and the session told about the ReadyForQuery without the scanner's
per-message work.  These tests hold that it changes nothing a client or the session can see:

- differential, at the connection: any server stream (results, notices, ParameterStatus, errors,
  FATALs, lookalike bytes inside rows, bad lengths) cut anywhere gives the same events, status,
  parameters and end with and without the fast path (hypothesis);
- differential, end to end through the real PgFrontend: the client gets the same bytes for any
  cut of the server's replies, with pinned sessions, transactions and pipelined queries;
- the case that got the fast path taken out last time: a pinned session asked to end (writer
  changed) inside a transaction gets its COMMIT's reply and then the writer-changed FATAL,
  byte for byte, with the reply in one read or cut anywhere, on both paths.

What the client library makes of those bytes is its own affair: libpq hands an ErrorResponse
read in the same recv() as the ReadyForQuery before it to the notice processor (it is idle by
then), and the next query only sees the EOF; tests/integration/test_pg_switchover.py accepts both.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import test_pg_backend as be
from tests.unit import test_pg_frontend as fe
from tests.unit import test_pg_release_boundary as rb
from txrdsproxy.proxy.pg_backend import PgBackendConnection
from txrdsproxy.wire.pg import errors
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import message, split_messages


@pytest.fixture(params=[True, False], ids=["fast", "scanner"])
def path(request, monkeypatch):
    monkeypatch.setattr(PgBackendConnection, "fast_replies", request.param)
    return request.param


# -- at the connection ----------------------------------------------------------------------------------
PARTS = [
    be.command_complete("SELECT 1") + msg.ready_for_query(b"I"),
    be.row_description("a") + be.data_row("1") + be.command_complete("SELECT 1"),
    be.command_complete("BEGIN") + msg.ready_for_query(b"T"),
    be.notice("n"),
    msg.parameter_status("TimeZone", "UTC"),
    msg.parameter_status("application_name", "x" * 40),
    be.data_row(b"Z\0\0\0\x05I"),  # a row whose value ends like a ReadyForQuery
    be.data_row(b"C\0\0\0\x05Z\0\0\0\x05I"),
    msg.error_response("22012", "division by zero", severity="ERROR") + msg.ready_for_query(b"E"),
    msg.error_response("57P01", "terminating connection due to administrator command", severity="FATAL"),
    be.data_row("x" * 300),
    msg.ready_for_query(b"I"),
    message(b"1"), message(b"2"), message(b"n"),
]
BAD = [b"C\0\0\0\x02", b"Z\0\0\0\x06II", b"\x00\0\0\0\x04"]  # bad length, long RFQ, unknown kind


def run_conn(chunks, fast, detach_at_ready):
    """Feed *chunks* to a lent connection; -> what the session and the connection ended with."""
    saved = PgBackendConnection.fast_replies
    PgBackendConnection.fast_replies = fast
    try:
        conn, t = be.logged_in()
        conn.pool_listener = be.PoolListener()
        conn.state = "borrowed"
        sink = be.Sink()
        if detach_at_ready:  # the session releases the connection at its ReadyForQuery
            def ready(status, sink=sink):
                sink.events.append(("ready", bytes(status)))
                conn.detach()
            sink.ready_for_query = ready
        conn.attach(sink)
        for chunk in chunks:
            if conn.state == "closed":
                break
            conn.dataReceived(chunk)
    finally:
        PgBackendConnection.fast_replies = saved
    merged = []
    for e in sink.events:  # how the data was cut into writes may differ, not its order
        if e[0] == "data" and merged and merged[-1][0] == "data":
            merged[-1] = ("data", merged[-1][1] + e[1])
        else:
            merged.append(e)
    return (merged, conn.txn_status, dict(conn.server_params), conn.fatal_error, conn.state,
            t.disconnecting, t.value())


@st.composite
def server_streams(draw):
    parts = draw(st.lists(st.sampled_from(PARTS), min_size=1, max_size=10))
    if draw(st.integers(0, 9)) == 0:
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(BAD)))
    stream = b"".join(parts)
    # Cuts anywhere, and where the fast path's test is most easily fooled: at message ends and
    # 6 bytes before them (a read that ends like a ReadyForQuery but starts inside a message).
    ends, pos = [], 0
    for part in parts:
        pos += len(part)
        ends += [pos, pos - 6]
    anywhere = st.integers(1, max(1, len(stream) - 1))
    cuts = draw(st.lists(st.one_of(anywhere, st.sampled_from(ends)), max_size=6, unique=True))
    cuts = sorted(c for c in cuts if 0 < c < len(stream))
    return [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=server_streams(), detach=st.booleans())
def test_fast_path_tells_the_session_exactly_what_the_scanner_would(chunks, detach):
    assert run_conn(chunks, True, detach) == run_conn(chunks, False, detach)


def test_whole_reply_in_one_read_takes_the_fast_path(monkeypatch):
    """The fast path is taken (the scanner never sees the read) for the usual reply."""
    from txrdsproxy.wire.pg.scanner import MessageScanner
    conn, t, sink, _ = be.lent()
    fed = []
    monkeypatch.setattr(MessageScanner, "feed", lambda self, data: fed.append(data))
    reply = be.row_description("a") + be.data_row("1") + be.command_complete("SELECT 1") + msg.ready_for_query(b"T")
    conn.dataReceived(reply)
    assert fed == []
    assert sink.events == [("data", reply), ("ready", b"T")] and conn.txn_status == b"T"


# -- end to end through the real PgFrontend -------------------------------------------------------------
class Server(rb.Server):
    """A scripted PostgreSQL on one connection: answers each whole Query by its text."""

    def __init__(self, conn, transport):
        super().__init__(conn, transport)
        self.status = b"I"

    def answer(self, text):
        if text.startswith(b"BEGIN"):
            self.status = b"T"
            return be.command_complete("BEGIN") + msg.ready_for_query(self.status)
        if text.startswith((b"COMMIT", b"ROLLBACK")):
            self.status = b"I"
            return be.command_complete("COMMIT") + msg.ready_for_query(self.status)
        if text.startswith(b"FAIL"):
            if self.status == b"T":
                self.status = b"E"
            return (msg.error_response("42601", "syntax error", severity="ERROR")
                    + msg.ready_for_query(self.status))
        if text.startswith(b"SET"):
            return be.command_complete("SET") + msg.ready_for_query(self.status)
        return (be.row_description("a") + be.data_row(text[-8:]) + be.command_complete("SELECT 1")
                + msg.ready_for_query(self.status))

    def reply(self, kind, body):
        return self.answer(body[:-1]) if kind == b"Q" else b""


class Pool(rb.Pool):
    """Session borrows get real PgBackendConnections, each with its scripted server."""

    server_class = Server

    def step(self, cut):
        """Every server answers what it has received whole, its answer cut by *cut*(len)."""
        for conn, server in list(self.servers.items()):
            out = server.pending_answer()
            if out and conn.state != "closed":
                at = cut(len(out))
                for piece in ([out] if not 0 < at < len(out) else [out[:at], out[at:]]):
                    if conn.state != "closed":
                        conn.dataReceived(piece)


def session():
    h = fe.Harness()
    h.pool = h.ctx.pool = Pool()
    h.login()
    h.sent()
    return h


CLIENT = [b"SELECT 1", b"SELECT 2", b"BEGIN", b"COMMIT", b"ROLLBACK", b"FAIL", b"SET work_mem = '1MB'",
          b"/* COMMIT */ SELECT 3", b"SELECT 'Z\0\0\0\x05I'"[:-2]]


def run_session(batches, cuts, fast):
    saved = PgBackendConnection.fast_replies
    PgBackendConnection.fast_replies = fast
    try:
        h = session()
        out = []
        for i, batch in enumerate(batches):
            h.send(b"".join(msg.query(q.decode("latin-1")) for q in batch))
            for j in range(3):
                h.ctx.pool.step(lambda n, i=i, j=j: cuts[(i + j) % len(cuts)] % (n + 1))
            out.append(h.sent())
        return (out, h.closed, h.frontend.pin_reason, h.frontend._stream.outstanding,
                [lease.release_args for lease in h.ctx.pool.leases])
    finally:
        PgBackendConnection.fast_replies = saved


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(st.sampled_from(CLIENT), min_size=1, max_size=3), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 400), min_size=1, max_size=4))
def test_client_gets_the_same_bytes_on_both_paths(batches, cuts):
    """Pipelined queries (several in one read, after a COMMIT too), pins, transactions, errors:
    the client's bytes, the session's state and the releases are the same on both paths."""
    assert run_session(batches, cuts, True) == run_session(batches, cuts, False)


# -- the writer-changed end at COMMIT ---------------------------------------------------------------------
COMMIT_REPLY = be.command_complete("COMMIT") + msg.ready_for_query(b"I")


def pinned_in_transaction():
    """A session pinned by a LISTEN (which does not move), inside a transaction, asked to end
    because the writer changed."""
    h = session()
    h.send(msg.query("LISTEN ch"))  # pins
    h.ctx.pool.step(lambda n: 0)
    h.send(msg.query("BEGIN"))
    h.ctx.pool.step(lambda n: 0)
    h.sent()
    assert h.frontend.pin_reason is not None
    assert h.frontend.drain("writer changed") is False  # a transaction is open: not yet
    assert not h.closed
    [(conn, server)] = h.ctx.pool.servers.items()
    h.send(msg.query("COMMIT"))
    assert server.pending_answer() == COMMIT_REPLY
    return h, conn


@pytest.mark.parametrize("cut", range(len(COMMIT_REPLY)))
def test_writer_changed_fatal_follows_the_commit_reply_byte_for_byte(cut, path):
    h, conn = pinned_in_transaction()
    for piece in ([COMMIT_REPLY] if cut == 0 else [COMMIT_REPLY[:cut], COMMIT_REPLY[cut:]]):
        conn.dataReceived(piece)
    # the reply as the server sent it, then the FATAL, in the turn of the ReadyForQuery, then EOF
    assert h.sent() == COMMIT_REPLY + errors.WRITER_CHANGED
    assert h.closed
    fields = msg.parse_error_fields(split_messages(errors.WRITER_CHANGED, 1 << 20)[0][0][1])
    assert fields["S"] == "FATAL" and fields["C"] == "08006"
    # the pinned connection is not lent again as it is (the pool resets or closes it)
    h.lose()
    [lease] = [lease for lease in h.ctx.pool.leases if lease.conn is conn]
    assert lease.released and (not lease.release_args["clean"] or lease.release_args["needs_reset"])


def test_writer_changed_with_a_query_pipelined_after_the_commit(path):
    """COMMIT and a SELECT in one read, on a draining pinned session: the SELECT is held behind
    the COMMIT (ClientStream.gate) and never reaches the former writer; the client gets the
    COMMIT's reply, then the FATAL, then EOF -- on both reply paths."""
    h = session()
    h.send(msg.query("LISTEN ch"))  # pins; does not move
    h.ctx.pool.step(lambda n: 0)
    h.send(msg.query("BEGIN"))
    h.ctx.pool.step(lambda n: 0)
    h.sent()
    assert h.frontend.drain("writer changed") is False
    [(conn, server)] = h.ctx.pool.servers.items()
    h.send(msg.query("COMMIT") + msg.query("SELECT 1"))
    assert server.pending_answer() == COMMIT_REPLY  # the SELECT was not sent
    conn.dataReceived(COMMIT_REPLY)
    assert h.sent() == COMMIT_REPLY + errors.WRITER_CHANGED
    assert h.closed
    assert server.pending_answer() == b""  # still nothing more reached the server
