"""MessageScanner's HOLD: a message the consumer cannot place yet stays buffered, whole, with
everything after it, and is inspected again when scanning resumes (wire/pg/scanner.py)."""

from txrdsproxy.wire.pg.framing import message
from txrdsproxy.wire.pg.scanner import HOLD, MessageScanner, limits_table

LIMITS = limits_table({b"Q": 64, b"S": 1}, default=0)
FIRST = message(b"Q", b"COMMIT\0")
HELD = message(b"Q", b"INSERT INTO t VALUES (2)\0")
AFTER = message(b"S") + message(b"d", b"copy bytes the consumer never looks into")


def run(chunks):
    """Feed *chunks*; the consumer holds every Query after the first one until resumed.
    -> (bytes emitted before resuming, bytes emitted after, kinds inspected)."""
    out, seen = [], []
    state = {"first": True}

    def inspect(kind, body):
        seen.append(bytes((kind,)))
        if kind == ord("Q") and not state["first"]:
            return HOLD
        state["first"] = False
        return None

    sc = MessageScanner(LIMITS, inspect=inspect, emit=out.append)
    for chunk in chunks:
        sc.feed(chunk)
    before = b"".join(out)
    assert sc.halted
    assert sc.buffered == len(HELD + AFTER) and not sc.mid_message
    out.clear()
    state["first"] = True  # the boundary was decided: the held message may go now
    sc.scan()
    return before, b"".join(out), seen


def test_a_held_message_and_what_follows_go_out_only_after_resuming_at_every_split():
    stream = FIRST + HELD + AFTER
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            chunks = [c for c in (stream[:i], stream[i:j], stream[j:]) if c]
            before, after, seen = run(chunks)
            assert before == FIRST, (i, j)
            assert after == HELD + AFTER, (i, j)
            assert seen.count(b"Q") == 3  # the held Query was inspected again on resuming


def test_hold_of_a_message_longer_than_its_limit_keeps_all_of_it():
    long = message(b"Q", b"x" * 200 + b"\0")  # longer than the 64 bytes inspected
    out = []
    calls = []

    def inspect(kind, body):
        calls.append(len(body))
        return HOLD if len(calls) == 2 else None

    sc = MessageScanner(LIMITS, inspect=inspect, emit=out.append)
    sc.feed(FIRST + long[:100])
    sc.feed(long[100:])
    assert b"".join(out) == FIRST
    assert sc.halted and sc.buffered == len(long) and not sc.mid_message
    sc.scan()
    assert b"".join(out) == FIRST + long
    assert not sc.mid_message and sc.at_boundary
