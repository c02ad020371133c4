"""A request pipelined right behind COMMIT never reaches a connection the pool has retired.

During a switchover the pool retires the old writer's connections: one lent to a session in a
transaction stays with it until the transaction ends, then closes.  A client that pipelines its
next request behind COMMIT (same TCP read, or any split of the bytes over reads) must not have
that request forwarded to the former writer with the COMMIT: the session decides the boundary
at COMMIT's ReadyForQuery first (release, borrow a connection to the new writer, or end a pinned
session), and only then forwards what follows.

The real PgFrontend and real PgBackendConnections, the lending pool of test_pg_release_boundary,
and a scripted PostgreSQL that keeps a transaction status and records every statement it runs.
Client bytes are split at every offset (two and three pieces).
"""

import pytest

from tests.unit import test_pg_release_boundary as rb
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import message


def batch(sql):
    """An extended-protocol round: Parse (unnamed), Bind, Execute, Sync."""
    return (message(b"P", b"\0" + sql + b"\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0")
            + message(b"E", b"\0\0\0\0\0") + message(b"S"))


class TxnServer(rb.Server):
    """Answers whole messages as PostgreSQL would, keeping a transaction status; `ran` lists the
    statements it executed, in order."""

    def __init__(self, conn, transport):
        super().__init__(conn, transport)
        self.status = b"I"
        self.parsed = b""
        self.ran = []

    def _run(self, sql):
        self.ran.append(sql)
        word = sql.split()[0].upper() if sql.split() else b""
        if word == b"BEGIN":
            self.status = b"T"
        elif word in (b"COMMIT", b"ROLLBACK"):
            self.status = b"I"
        return message(b"C", word + b"\0")

    def reply(self, kind, body):
        if kind == b"Q":
            return self._run(body[:-1]) + msg.ready_for_query(self.status)
        if kind == b"P":
            self.parsed = body.split(b"\0")[1]
            return message(b"1")
        if kind == b"B":
            return message(b"2")
        if kind == b"E":
            return self._run(self.parsed)
        if kind == b"S":
            return msg.ready_for_query(self.status)
        return b""


class Pool(rb.Pool):
    server_class = TxnServer


def session():
    h = rb.fe.Harness()
    h.pool = h.ctx.pool = Pool()
    h.login()
    return h


def in_transaction(h):
    """BEGIN and one INSERT on connection A -> A (the session still holds it)."""
    rb.run(h, [msg.query("BEGIN")])
    rb.run(h, [msg.query("INSERT INTO t VALUES (1)")])
    [conn] = h.ctx.pool.servers
    assert h.frontend.lease.conn is conn
    h.messages()
    return conn


def every_split(data):
    yield [data]
    yield from rb.splits(data)


SIMPLE = msg.query("COMMIT") + msg.query("INSERT INTO t VALUES (2)")
EXTENDED = batch(b"COMMIT") + batch(b"INSERT INTO t VALUES (2)")
MIXED = msg.query("COMMIT") + batch(b"INSERT INTO t VALUES (2)")


def send(h, chunks, answer_between):
    """Send *chunks*; the servers answer after each one (*answer_between*) or only after all:
    a later read may arrive before or after the answer to the earlier request."""
    if answer_between:
        rb.run(h, chunks)
        return
    for chunk in chunks:
        h.send(chunk)
    rb.run(h, [b""])


@pytest.mark.parametrize("answer_between", [True, False], ids=["answered-between", "all-reads-first"])
@pytest.mark.parametrize("stream", [SIMPLE, EXTENDED, MIXED], ids=["simple", "extended", "mixed"])
def test_a_request_pipelined_behind_commit_goes_to_the_new_writer_whatever_the_split(stream, answer_between):
    for chunks in every_split(stream):
        h = session()
        old = in_transaction(h)
        h.ctx.pool.retired.add(old)  # switchover: the writer was demoted under the transaction
        send(h, chunks, answer_between)
        servers = h.ctx.pool.servers
        assert servers[old].ran == [b"BEGIN", b"INSERT INTO t VALUES (1)", b"COMMIT"], chunks
        assert old.state == "closed"  # given back at COMMIT's boundary and not lent again
        [new] = [c for c in servers if c is not old]
        assert servers[new].ran == [b"INSERT INTO t VALUES (2)"], chunks
        assert not servers[new].mid_message and not servers[old].mid_message
        kinds = rb.replies(h)
        assert kinds.count(b"Z") == 2 and b"E" not in kinds, (chunks, kinds)


@pytest.mark.parametrize("answer_between", [True, False], ids=["answered-between", "all-reads-first"])
def test_requests_pipelined_inside_the_transaction_stay_on_its_connection_in_order(answer_between):
    stream = msg.query("INSERT INTO t VALUES (2)") + msg.query("COMMIT") + msg.query("SELECT 1")
    for chunks in every_split(stream):
        h = session()
        old = in_transaction(h)
        h.ctx.pool.retired.add(old)
        send(h, chunks, answer_between)
        servers = h.ctx.pool.servers
        assert servers[old].ran == [b"BEGIN", b"INSERT INTO t VALUES (1)", b"INSERT INTO t VALUES (2)",
                                    b"COMMIT"], chunks
        [new] = [c for c in servers if c is not old]
        assert servers[new].ran == [b"SELECT 1"], chunks
        assert rb.replies(h).count(b"Z") == 3


def test_without_a_retired_connection_pipelined_requests_go_out_together():
    """The gate costs nothing in the ordinary case: both requests go out in the same write."""
    h = session()
    old = in_transaction(h)
    before = len(old.transport.value())
    h.send(SIMPLE)
    assert old.transport.value()[before:] == SIMPLE  # not held back for the boundary
    for _ in range(3):
        h.ctx.pool.step()
    assert h.ctx.pool.servers[old].ran[-2:] == [b"COMMIT", b"INSERT INTO t VALUES (2)"]


@pytest.mark.parametrize("answer_between", [True, False], ids=["answered-between", "all-reads-first"])
@pytest.mark.parametrize("stream", [SIMPLE, EXTENDED], ids=["simple", "extended"])
def test_a_pinned_session_on_a_former_writer_ends_at_commit_and_its_pipelined_request_goes_nowhere(
        stream, answer_between):
    for chunks in every_split(stream):
        h = session()
        rb.run(h, [msg.query("CREATE TEMP TABLE tt (x int)")])  # pins the session; cannot move
        assert h.frontend.pin_reason is not None
        old = in_transaction(h)
        h.ctx.pool.retired.add(old)
        assert h.frontend.drain("writer changed") is False  # in a transaction: ends at its boundary
        send(h, chunks, answer_between)
        servers = h.ctx.pool.servers
        assert servers[old].ran[-1] == b"COMMIT", chunks
        assert b"INSERT INTO t VALUES (2)" not in [sql for s in servers.values() for sql in s.ran]
        assert list(servers) == [old]  # nothing borrowed for it either
        assert h.closed
        out = h.sent()
        assert b"the writer changed" in out, out
