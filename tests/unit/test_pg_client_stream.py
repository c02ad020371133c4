"""ClientStream (wire/pg/frontend.py): the client -> database direction, sans-IO."""

import pytest

from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import ProtocolViolation, message
from txrdsproxy.wire.pg.frontend import ClientStream, StreamState
from txrdsproxy.wire.pg.pinning import PinReason
from txrdsproxy.wire.pg.statements import StatementTracker

SYNC = message(b"S")


class Conn:
    def __init__(self):
        self.prepared, self.pending = set(), set()
        self.server_params = {}  # what the server reported (standard_conforming_strings)


def forwarding(tracker=None, **kw):
    out = []
    s = ClientStream(1 << 20, tracker=tracker, **kw)
    s.attach(Conn(), out.append)
    return s, out


@pytest.mark.parametrize("sql", ["EXECUTE txrds_1_0", "/* x */ deallocate TXRDS_1_0",
                                 "select 1; DEALLOCATE txrds_4_2"])
def test_sql_naming_the_proxy_namespace_pins_with_a_tracker(sql):
    s, out = forwarding(StatementTracker(9))
    s.feed(msg.query(sql))
    assert s.pin_reason is PinReason.PREPARED_STATEMENT
    assert b"".join(out) == msg.query(sql)  # forwarded as is, on a connection now kept


def test_deallocate_of_an_unknown_name_pins_with_a_tracker():
    s, out = forwarding(StatementTracker(9))
    s.feed(msg.query("DEALLOCATE someone_elses"))
    assert s.pin_reason is PinReason.PREPARED_STATEMENT


def test_large_query_pins_on_its_prefix_and_streams():
    s, out = forwarding()
    q = msg.query("select '" + "x" * 100000 + "'")
    for i in range(0, len(q), 1000):
        s.feed(q[i:i + 1000])
    assert s.pin_reason is PinReason.STATEMENT_TOO_LARGE
    assert b"".join(out) == q
    assert max(len(c) for c in out) <= 16390 + 1000  # the prefix, then pieces as they came
    assert s.outstanding == 1 and s.releasable is False


def test_held_until_attached_then_sent_in_one_write():
    s = ClientStream(1 << 20)
    s.feed(msg.query("select 1") + msg.query("select 2"))
    assert s.state is StreamState.HELD and s.wants_connection and s.outstanding == 0
    out = []
    s.attach(Conn(), out.append)
    assert out == [msg.query("select 1") + msg.query("select 2")]
    assert s.outstanding == 2


def test_refusal_answers_like_postgresql():
    replies = []
    s = ClientStream(1 << 20)
    s.reply = replies.append
    parse = message(b"P", b"\0select 1\0\0\0")
    s.feed(msg.query("select 1") + parse + message(b"E", b"\0\0\0\0\0"))
    s.refuse(msg.error_response("53300", "Timed-out waiting to acquire database connection."))
    kinds = [data[i:i + 1] for data in replies for i in _offsets(data)]
    assert kinds == [b"E", b"Z", b"E"]  # the Query: error + Z; the open batch: one error
    assert s.state is StreamState.REFUSING  # until the batch's Sync
    s.feed(message(b"B", b"\0\0\0\0\0\0\0\0") + SYNC)
    assert replies[-1] == msg.ready_for_query(b"I")
    assert s.state is StreamState.HELD and not s.unsynced


def test_unknown_message_types_are_refused():
    s, out = forwarding()
    with pytest.raises(ProtocolViolation):
        s.feed(message(b"Z", b"I"))
    assert out == []


def _offsets(data):
    pos = 0
    while pos < len(data):
        yield pos
        pos += 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
