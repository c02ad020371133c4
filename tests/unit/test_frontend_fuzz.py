"""Random bytes at every phase of both frontends: a clear error or a close, never a traceback.

Seeded, so a failure reproduces.  The point is the ground rule "bad input gets a clear error and
loses nothing": whatever a client sends, the frontend neither raises out of dataReceived nor
logs an unhandled failure, and a lent database connection is never returned as clean after it.
"""

import random

import pytest

from tests.unit import test_mysql_frontend as my
from tests.unit import test_pg_frontend as pg


def chunks(rng, data):
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 64)
        yield data[pos:pos + step]
        pos += step


def garbage(rng, size):
    return bytes(rng.getrandbits(8) for _ in range(size))


@pytest.mark.parametrize("seed", range(40))
def test_pg_random_bytes_before_and_after_login(seed, failures):
    rng = random.Random(seed)
    h = pg.Harness()
    session_lease = None
    if seed % 2:
        h.login()
        h.send(pg.msg.query("SELECT 1"))  # no answer comes: the query stays outstanding
        session_lease = h.pool.give()
    for piece in chunks(rng, garbage(rng, rng.randint(1, 400))):
        h.send(piece)
        if h.closed:
            break
    h.lose()
    assert failures == []
    if session_lease is not None:
        # The database still owes an answer: the connection must not go back as clean.
        assert session_lease.released and session_lease.release_args["clean"] is False


@pytest.mark.parametrize("seed", range(40))
def test_mysql_random_bytes_before_and_after_login(seed, failures):
    rng = random.Random(1000 + seed)
    h = my.Harness()
    if seed % 2:
        h.login()
    for piece in chunks(rng, garbage(rng, rng.randint(1, 400))):
        h.send(piece)
        if h.closed:
            break
    h.lose()
    assert failures == []


@pytest.mark.parametrize("seed", range(20))
def test_pg_valid_messages_with_one_corrupted_byte(seed, failures):
    rng = random.Random(2000 + seed)
    h = pg.Harness()
    h.login()
    stream = bytearray(pg.msg.query("SELECT 1") + pg.PARSE + pg.BIND + pg.msg.message(b"S")
                       + pg.msg.query("BEGIN"))
    stream[rng.randrange(len(stream))] = rng.getrandbits(8)
    for piece in chunks(rng, bytes(stream)):
        h.send(piece)
        if h.pool.requests:
            h.pool.give()
        if h.closed:
            break
    h.lose()
    assert failures == []
