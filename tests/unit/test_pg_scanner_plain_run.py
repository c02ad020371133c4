"""MessageScanner.plain_run / idle: the offset a fast path may send on unseen is exactly what
`feed` passes on before the first message it must look at (DESIGN rule 9)."""

import random

import pytest

from txrdsproxy.wire.pg.framing import message
from txrdsproxy.wire.pg.scanner import MessageScanner, limits_table

LIMITS = limits_table({b"Z": 1, b"E": 100}, default=0)
KINDS = [b"D", b"C", b"T", b"N", b"Z", b"E"]


class Recorder:
    def __init__(self):
        self.events = []
        self.scanner = MessageScanner(LIMITS, 1 << 20, self.inspect, self.emit)

    def inspect(self, kind, body):
        self.events.append(("inspect", bytes((kind,))))

    def emit(self, data):
        self.events.append(("emit", bytes(data)))


@pytest.mark.parametrize("seed", range(40))
def test_plain_run_stops_where_the_scanner_would_look(seed):
    rnd = random.Random(seed)
    stream = b"".join(message(rnd.choice(KINDS), bytes(rnd.randrange(0, 30)))
                      for _ in range(rnd.randint(1, 8)))
    cut = rnd.randint(1, len(stream))
    data = stream[:cut]
    sc = MessageScanner(LIMITS, 1 << 20)
    assert sc.idle
    pos = sc.plain_run(data)
    # Everything before pos is whole, uninspected messages.
    i = 0
    while i < pos:
        assert data[i:i + 1] in (b"D", b"C", b"T", b"N")
        i += 1 + int.from_bytes(data[i + 1:i + 5], "big")
    assert i == pos
    # The scanner passes data[:pos] on without looking inside ...
    r = Recorder()
    r.scanner.feed(data[:pos])
    assert r.events == ([("emit", data[:pos])] if pos else [])
    assert r.scanner.idle
    # ... and at pos it must look inside (an inspected kind), or the message is not whole.
    r.events.clear()
    r.scanner.feed(data[pos:])
    if pos < len(data):
        whole = len(data) - pos >= 5 and pos + 1 + int.from_bytes(data[pos + 1:pos + 5], "big") <= len(data)
        if whole:
            assert r.events[0] == ("inspect", data[pos:pos + 1])


@pytest.mark.parametrize("bad", [b"D\0\0\0\x03", b"D\x7f\xff\xff\xff"])
def test_plain_run_stops_at_a_bad_length(bad):
    sc = MessageScanner(LIMITS, 1 << 20)
    data = message(b"C", b"x\0") + bad + b"...."
    assert sc.plain_run(data) == len(message(b"C", b"x\0"))


def test_not_idle_while_holding_or_mid_message():
    sc = MessageScanner(LIMITS, 1 << 20, None, lambda d: None)
    sc.feed(b"D\0\0")
    assert not sc.idle  # a partial header held
    sc.feed(b"\0\x20" + b"x" * 3)
    assert not sc.idle  # mid-message: the rest of the row is still to come
    sc.feed(b"x" * 25)
    assert sc.idle
    sc.hold = True
    assert not sc.idle
