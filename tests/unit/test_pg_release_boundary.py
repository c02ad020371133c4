"""A database connection goes back to the pool only at a message boundary (DESIGN rule 9).

The real PgFrontend and real PgBackendConnections, a pool that lends them, and a scripted
PostgreSQL that answers each *whole* message it receives as the server would (and ignores
CopyData outside COPY, as the server does).  Client bytes and server bytes are split at every
offset; after every step we check the invariant: a connection released as clean has received
only whole messages from the session, and receives nothing more from it after its release.

The attack this closes: Query("SELECT 1") followed by the bare 5-byte header of a CopyData.
ReadyForQuery comes back while the server still waits for the CopyData body; the connection
must stay with the session until the body has been sent, and only then go back.
"""

import struct

import pytest

from tests.unit import test_pg_backend as be
from tests.unit import test_pg_frontend as fe
from txrdsproxy.testing.fakes import FakePgBackendConn, FakePool
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import message

SELECT = msg.query("SELECT 1")
SYNC = message(b"S")
PARSE = message(b"P", b"\0SELECT 1\0\0\0")
BIND = message(b"B", b"\0\0\0\0\0\0\0\0")
EXECUTE = message(b"E", b"\0\0\0\0\0")
COPY_DATA_100 = message(b"d", b"x" * 95)  # length field 99
HEADER_ONLY = COPY_DATA_100[:5]


def answer(kind):
    """What PostgreSQL sends for one whole client message (outside COPY)."""
    if kind == b"Q":
        return message(b"C", b"SELECT 1\0") + msg.ready_for_query(b"I")
    if kind == b"S":
        return msg.ready_for_query(b"I")
    return {b"P": message(b"1"), b"B": message(b"2"), b"E": message(b"C", b"SELECT 1\0"),
            b"D": message(b"n")}.get(kind, b"")


class Server:
    """Reads whole messages from one connection's transport and answers them."""

    def __init__(self, conn, transport):
        self.conn, self.t, self.offset = conn, transport, 0

    def reply(self, kind, body):
        """The answer to one whole message (*body*: its bytes after the length)."""
        return answer(kind)

    def pending_answer(self):
        """The answers to the whole messages received since the last call."""
        data = self.t.value()
        out = []
        while len(data) - self.offset >= 5:
            (length,) = struct.unpack_from("!I", data, self.offset + 1)
            stop = self.offset + 1 + length
            if stop > len(data):
                break
            out.append(self.reply(data[self.offset:self.offset + 1], data[self.offset + 5:stop]))
            self.offset = stop
        return b"".join(out)

    @property
    def mid_message(self):
        """The server has part of a message: it waits for the rest on this connection."""
        data = self.t.value()
        pos = 0
        while len(data) - pos >= 5:
            pos += 1 + struct.unpack_from("!I", data, pos + 1)[0]
        return pos != len(data)


class Lease:
    def __init__(self, pool, conn):
        self.pool, self.conn, self.released, self.release_args = pool, conn, False, None

    @property
    def retired(self):
        return self.conn in self.pool.retired

    def release(self, clean=True, needs_reset=False, reason=None):
        assert not self.released
        self.released = True
        self.release_args = dict(clean=clean, needs_reset=needs_reset, reason=reason)
        server = self.pool.servers[self.conn]
        self.pool.released.append((self.conn, clean, len(server.t.value()), server.mid_message))
        self.conn.detach()
        if self.conn in self.pool.retired:
            self.conn.state = "closed"  # a former writer's connection is not lent again
        elif clean:
            self.conn.state = "idle"
            self.pool.free.append(self.conn)


class Pool(FakePool):
    """Login borrows are answered by hand (FakePool); session borrows get real connections,
    each with its scripted server (an instance of `server_class`)."""

    server_class = Server

    def __init__(self):
        super().__init__(FakePgBackendConn)
        self.free, self.servers, self.released, self.leases = [], {}, [], []
        self.retired = set()  # connections that close once given back (a former writer's)

    def try_borrow(self, key):
        if self.free:
            conn = self.free.pop()
        else:
            conn, t = be.logged_in()
            self.servers[conn] = self.server_class(conn, t)
        conn.state = "borrowed"
        lease = Lease(self, conn)
        self.leases.append(lease)
        return lease

    def step(self, split=None):
        """Every server answers what it has received whole (its answer split at *split*)."""
        for conn, server in list(self.servers.items()):
            out = server.pending_answer()
            if out and conn.state != "closed":
                pieces = [out] if split is None or not 0 < split < len(out) else [out[:split], out[split:]]
                for piece in pieces:
                    conn.dataReceived(piece)

    def check(self):
        """The invariant: a clean release happened only at a boundary, and the session sent
        nothing to that connection afterwards (unless it borrowed it again)."""
        for conn, clean, length_then, mid in self.released:
            if clean:
                assert not mid, "released while the server was in the middle of a message"


def session():
    h = fe.Harness()
    h.pool = h.ctx.pool = Pool()
    h.login()
    return h


def replies(h):
    return [k for k, _ in h.messages()]


def run(h, chunks, server_split=None):
    for chunk in chunks:
        h.send(chunk)
        h.ctx.pool.check()
        for _ in range(3):
            h.ctx.pool.step(server_split)
            h.ctx.pool.check()


def splits(stream):
    """Every way to cut *stream* in two, and in three around each offset."""
    for i in range(1, len(stream)):
        yield [stream[:i], stream[i:]]
    for i in range(1, len(stream) - 1):
        yield [stream[:i], stream[i:i + 1], stream[i + 1:]]


# -- the attack -------------------------------------------------------------------------------------
def test_header_only_after_a_query_keeps_the_connection_until_the_body_is_sent():
    h = session()
    h.send(SELECT + HEADER_ONLY)
    pool = h.ctx.pool
    pool.step()
    assert replies(h) == [b"C", b"Z"]  # the client got its answer
    assert pool.released == []  # ... but the connection stays: its server waits for 94 bytes
    [conn] = pool.servers
    assert pool.servers[conn].mid_message
    h.send(COPY_DATA_100[5:])  # the rest goes to the same connection, which is then free
    assert not pool.servers[conn].mid_message
    assert [(c, clean, mid) for c, clean, _, mid in pool.released] == [(conn, True, False)]
    # The next request is served whole on a connection at a boundary.
    h.send(SELECT)
    pool.step()
    assert replies(h) == [b"C", b"Z"]
    assert all(not s.mid_message for s in pool.servers.values())


def test_client_leaving_mid_message_closes_the_connection():
    h = session()
    h.send(SELECT + HEADER_ONLY)
    h.ctx.pool.step()
    h.lose()
    [(conn, clean, _, mid)] = h.ctx.pool.released
    assert mid and clean is False


def test_partial_header_after_a_query_is_held_not_forwarded():
    h = session()
    h.send(SELECT + HEADER_ONLY[:3])
    h.ctx.pool.step()
    pool = h.ctx.pool
    [(conn, clean, _, mid)] = pool.released  # released at the boundary: the 3 bytes were held
    assert clean and not mid
    h.send(HEADER_ONLY[3:] + COPY_DATA_100[5:] + SELECT)
    pool.step()
    assert replies(h) == [b"C", b"Z", b"C", b"Z"]
    assert all(not s.mid_message for s in pool.servers.values())


SEQUENCES = {
    "query+copydata+query": SELECT + COPY_DATA_100 + SELECT,
    "extended+header-only": PARSE + BIND + EXECUTE + SYNC + COPY_DATA_100 + PARSE + BIND + EXECUTE + SYNC,
    "pipelined queries": SELECT + SELECT + COPY_DATA_100 + SELECT,
    "copydata first": COPY_DATA_100 + SELECT,
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
@pytest.mark.parametrize("server_split", [None, 1, 5, 6])
def test_every_split_releases_only_at_a_boundary(name, server_split):
    stream = SEQUENCES[name]
    expected = stream.count(b"Q\0") + stream.count(b"S\0\0\0\x04")
    for chunks in splits(stream):
        h = session()
        run(h, chunks, server_split)
        got = replies(h)
        assert got.count(b"Z") == expected, chunks
        pool = h.ctx.pool
        assert all(not s.mid_message for s in pool.servers.values())
        assert any(clean for _, clean, _, _ in pool.released)  # every test releases at least once
        assert not h.closed


@pytest.mark.parametrize("bad", [
    b"d\0\0\0\x03",  # length below the header
    b"d\x7f\xff\xff\xff",  # above MaxMessageSize
    b"Z\0\0\0\x05I",  # not a client message
])
def test_bad_lengths_and_kinds_after_a_query_close_the_session_and_the_connection(bad):
    for i in range(1, len(SELECT + bad)):
        stream = SELECT + bad
        h = session()
        run(h, [stream[:i], stream[i:]])
        assert h.closed
        errors = [msg.parse_error_fields(p) for k, p in h.messages() if k == b"E"]
        assert [e["C"] for e in errors] == ["08P01"]
        h.lose()
        pool = h.ctx.pool
        pool.check()
        for s in pool.servers.values():
            assert not s.mid_message


def test_huge_copy_data_streams_and_holds_the_connection():
    h = session()
    body = 50 * 1024 * 1024  # below MaxMessageSize: legal, streamed, never buffered whole
    h.send(SELECT + b"d" + struct.pack("!I", body + 4) + b"y" * 1000)
    pool = h.ctx.pool
    pool.step()
    assert replies(h) == [b"C", b"Z"]
    assert pool.released == []
    [conn] = pool.servers
    assert len(pool.servers[conn].t.value()) == len(SELECT) + 5 + 1000  # forwarded as it came
    assert h.frontend._stream.buffered == 0
    h.lose()
    assert pool.released[0][1] is False  # unknown state: never reused


def test_trailing_terminate_after_a_query():
    h = session()
    h.send(SELECT + msg.TERMINATE)
    assert h.closed
    h.lose()
    h.ctx.pool.step()
    [(conn, clean, _, mid)] = h.ctx.pool.released
    # The Query was sent and not answered when the client left: not clean.
    assert clean is False and not mid


def test_lose_after_release_does_not_touch_the_connection():
    h = session()
    run(h, [SELECT])
    [(conn, clean, n, _)] = h.ctx.pool.released
    h.lose()
    assert len(h.ctx.pool.servers[conn].t.value()) == n


# -- the fast path (one whole Query per read, taken without the scanner) ----------------------------
def test_query_shaped_copy_data_body_is_not_taken_as_a_query():
    """The body of a CopyData that is exactly a whole Query message, in a read of its own: it
    belongs to the CopyData (the server reads it so), is not counted or classified as a Query,
    and the connection goes back once it has been sent."""
    body = msg.query("SET search_path = evil")
    h = session()
    h.send(SELECT + b"d" + struct.pack("!I", 4 + len(body)))
    pool = h.ctx.pool
    pool.step()
    assert replies(h) == [b"C", b"Z"]
    assert pool.released == []
    h.send(body)
    pool.step()
    assert replies(h) == []  # the server answers no Query
    [(conn, clean, _, mid)] = pool.released
    assert clean and not mid
    assert h.frontend.pin_reason is None  # the SET was data, never a statement
    assert h.frontend._stream.outstanding == 0


def test_query_after_held_bytes_goes_through_the_scanner():
    h = session()
    h.send(SELECT[:4])  # a partial header is held
    h.send(SELECT[4:] + SELECT)  # not one whole Query: the scanner reads it
    h.ctx.pool.step()
    assert replies(h) == [b"C", b"Z", b"C", b"Z"]
    h.send(SELECT)  # at a boundary again: the fast path
    h.ctx.pool.step()
    assert replies(h) == [b"C", b"Z"]
    assert all(clean and not mid for _, clean, _, mid in h.ctx.pool.released)


@pytest.mark.parametrize("query", [
    b"Q\0\0\0\x09SELECT",  # no NUL terminator
    b"Q\0\0\0\x03",  # length below the header
    msg.query("SET search_path = evil"),  # pins
    msg.query("SELECT 1; SET work_mem = '1MB'"),  # pins, second statement
])
def test_fast_path_and_scanner_agree(query, monkeypatch):
    """Differential: a read that is one Query (or looks like one) has the same effect with and
    without the fast path: replies, pin, the bytes the server got, the session's counts."""
    from txrdsproxy.wire.pg.frontend import ClientStream

    def outcome():
        h = session()
        h.send(query)
        h.ctx.pool.step()
        pool = h.ctx.pool
        sent = [s.t.value() for s in pool.servers.values()]
        return (h.sent(), h.frontend.pin_reason, sent, h.closed, h.frontend._stream.outstanding,
                h.frontend.queries, [(clean, mid) for _, clean, _, mid in pool.released])

    fast = outcome()
    monkeypatch.setattr(ClientStream, "take_query", lambda self, data: False)
    assert outcome() == fast
