"""MySQL: a command pipelined right behind COMMIT never reaches the connection COMMIT ran on
when the session must leave it (a former writer's, retired by a switchover; a pinned session
being ended).  The MySQL session relays one command at a time, so the boundary decision at
COMMIT's answer comes before the next command is looked at, however the client's bytes are
split over reads.  The real MySQLFrontend, fake transports (test_mysql_frontend's harness)."""

import pytest

from tests.unit import test_mysql_frontend as fe

INSERT = fe.query("INSERT INTO t VALUES (2)")
STREAM = fe.query("COMMIT") + INSERT


def every_split(data):
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    for i in range(1, len(data) - 1):
        yield [data[:i], data[i:i + 1], data[i + 1:]]


def in_transaction(s, pin=False):
    if pin:
        s.send(fe.query("SET @v = 1"))  # a user variable pins the session
        lease = s.pool.give()
        lease.conn.respond(fe.ok(fe.AC))
        assert s.frontend.pin_reason is not None
    else:
        s.send(fe.query("BEGIN"))
        lease = s.pool.give()
    if pin:
        s.send(fe.query("BEGIN"))
    lease.conn.respond(fe.ok(fe.AC | fe.INTX))
    assert not lease.released
    s.sent()
    return lease


@pytest.mark.parametrize("answer_between", [True, False], ids=["answered-between", "all-reads-first"])
def test_a_command_pipelined_behind_commit_goes_to_a_new_connection_whatever_the_split(answer_between):
    for chunks in every_split(STREAM):
        s = fe.Harness()
        s.login()
        lease = in_transaction(s)
        lease.retired = True  # switchover: the writer was demoted under the transaction
        answered = False
        for chunk in chunks:
            s.send(chunk)
            assert INSERT not in b"".join(lease.conn.writes), chunks  # never to the old one
            if answer_between and not answered and lease.conn.writes[-1] == fe.query("COMMIT"):
                lease.conn.respond(fe.ok(fe.AC))  # COMMIT answered before the rest arrives
                answered = True
        if not answered:
            assert lease.conn.writes[-1] == fe.query("COMMIT"), chunks
            lease.conn.respond(fe.ok(fe.AC))
        assert lease.released, chunks
        new = s.pool.give()
        assert new.conn.writes == [INSERT], chunks
        assert INSERT not in b"".join(lease.conn.writes)


def test_a_pinned_session_ended_at_commit_never_sends_its_pipelined_command():
    for chunks in every_split(STREAM):
        s = fe.Harness()
        s.login()
        lease = in_transaction(s, pin=True)
        lease.retired = True
        assert s.frontend.drain("writer changed") is False  # in a transaction: at its boundary
        for chunk in chunks:
            s.send(chunk)
        assert lease.conn.writes[-1] == fe.query("COMMIT"), chunks
        lease.conn.respond(fe.ok(fe.AC))
        assert INSERT not in b"".join(lease.conn.writes), chunks
        assert s.pool.requests == [], chunks  # nothing borrowed for it either
        assert s.closed, chunks
