"""A database connection goes back to the pool only at a command boundary (design rule 9).

Every sequence here is split at every byte offset, on the client side and on the database side,
around an OK that ends a transaction (SERVER_STATUS_IN_TRANS cleared) or an autocommit change.
Invariant checked after every step: a lease released as clean holds, on its connection, only
whole commands (complete packets, no 0xFFFFFF packet without its continuation) and no response
outstanding.  The attacks: a command followed by part of the next one (a header announcing a
long body, the first fragment of a 16 MiB multi-packet command), then nothing.
"""

import struct

import pytest

from tests.unit import test_mysql_frontend as my
from txrdsproxy.proxy.mysql_frontend import WHOLE_LIMIT
from txrdsproxy.proxy.session import SessionState
from txrdsproxy.wire.mysql import packets as P

AC, INTX = P.SERVER_STATUS_AUTOCOMMIT, P.SERVER_STATUS_IN_TRANS


def whole_commands(data):
    """True when *data* is a run of complete logical packets."""
    pos, more = 0, False
    while pos < len(data):
        if len(data) - pos < 4:
            return False
        length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        if pos + 4 + length > len(data):
            return False
        more = length == P.MAX_PACKET_CHUNK
        pos += 4 + length
    return not more


def check_invariant(h):
    for lease in h.pool.leases:
        if lease.released and lease.release_args["clean"]:
            written = b"".join(lease.conn.writes)
            assert whole_commands(written), "a connection went back mid-command"
            assert lease.conn.tracker.idle, "a connection went back with a response outstanding"


def server_feed(conn, data):
    """The database's bytes arrive: what MySQLBackendConnection._forward does."""
    buf = getattr(conn, "_test_buf", None)
    if buf is None:
        buf = conn._test_buf = bytearray()
    buf += data
    end = conn.tracker.consume(buf, 0)
    chunk = bytes(buf[:end])
    del buf[:end]
    if chunk:
        conn._sink.backend_data(chunk)
    if conn.tracker.idle and conn._sink is not None:
        conn._sink.response_complete()


def in_transaction(h):
    """A logged-in session holding a connection inside a transaction."""
    h.login()
    h.send(my.query("BEGIN"))
    lease = h.pool.give()
    server_feed(lease.conn, my.wire([my.ok(AC | INTX)]))
    assert not lease.released
    h.sent()
    return lease


# The partial next command: (name, bytes sent, whether it is long enough to be streamed).
PARTIAL = [
    ("query header announcing 100 bytes", struct.pack("<I", 100)[:3] + b"\x00\x03SEL", False),
    ("query header announcing 1 MiB", struct.pack("<I", 1 << 20)[:3] + b"\x00\x03SELECT '", True),
    ("first bytes of a 16 MiB fragment", b"\xff\xff\xff\x00\x03SELECT '" + b"a" * 40, True),
    ("field list announcing 100 KiB", struct.pack("<I", 100 << 10)[:3] + b"\x00\x04tbl", True),
    ("unowned stmt execute, 100 KiB", struct.pack("<I", 100 << 10)[:3] + b"\x00\x17\x01\x00\x00\x00",
     True),
]
COMMIT = my.query("COMMIT")
COMMIT_OK = my.wire([my.ok(AC)])  # ends the transaction


@pytest.mark.parametrize("name,partial,streamed", PARTIAL, ids=[p[0] for p in PARTIAL])
@pytest.mark.parametrize("answer_first", [True, False], ids=["answer-early", "answer-late"])
def test_commit_then_part_of_a_command_split_everywhere(name, partial, streamed, answer_first):
    data = COMMIT + partial
    for cut in range(1, len(data)):
        for server_cut in (0, 3, len(COMMIT_OK) - 1):
            h = my.Harness()
            lease = in_transaction(h)
            h.send(data[:cut])
            check_invariant(h)
            if answer_first and cut >= len(COMMIT):
                if server_cut:
                    server_feed(lease.conn, COMMIT_OK[:server_cut])
                    check_invariant(h)
                    assert not lease.released  # half an OK proves nothing
                    server_feed(lease.conn, COMMIT_OK[server_cut:])
                else:
                    server_feed(lease.conn, COMMIT_OK)
                check_invariant(h)
            h.send(data[cut:])
            check_invariant(h)
            if not lease.released:
                server_feed(lease.conn, COMMIT_OK)
                check_invariant(h)
            # COMMIT ended the transaction at a boundary: that connection went back clean ...
            assert lease.released and lease.release_args["clean"] is True
            assert lease.conn.writes[-1] == COMMIT or b"".join(lease.conn.writes).endswith(COMMIT)
            # ... and the partial command went nowhere, or to a connection that stays with it.
            for key_d in list(h.pool.requests):
                h.pool.give()
                check_invariant(h)
            h.lose()  # the client vanishes mid-command
            check_invariant(h)
            for other in h.pool.leases[1:]:
                written = b"".join(other.conn.writes)
                if written:
                    assert not whole_commands(written)
                    assert other.released and other.release_args["clean"] is False


def test_early_answer_to_a_streamed_command_does_not_release_mid_command():
    """Even if the database answered before the command is whole (an early ERR), the connection
    stays with the session until the rest was written, and goes back unclean if it never is."""
    h = my.Harness()
    h.login()
    big = my.command(P.COM_FIELD_LIST, b"t" * (WHOLE_LIMIT + 100))
    h.send(big[:1000])
    lease = h.pool.give()
    assert lease.conn.writes == [big[:1000]]
    server_feed(lease.conn, my.wire([P.err_packet(1146, "42S02", "no such table")]))
    check_invariant(h)
    assert not lease.released and h.frontend.lease is lease
    h.lose()
    assert lease.released and lease.release_args["clean"] is False


def test_early_answer_then_the_rest_releases_at_the_boundary():
    h = my.Harness()
    h.login()
    big = my.command(P.COM_FIELD_LIST, b"t" * (WHOLE_LIMIT + 100))
    h.send(big[:1000])
    lease = h.pool.give()
    server_feed(lease.conn, my.wire([P.err_packet(1146, "42S02", "no such table")]))
    assert not lease.released
    h.send(big[1000:])
    assert b"".join(lease.conn.writes) == big
    assert lease.released and lease.release_args["clean"] is True
    check_invariant(h)


def test_multi_packet_command_releases_only_after_its_last_continuation():
    h = my.Harness()
    h.login()
    payload = bytes((P.COM_FIELD_LIST,)) + b"f" * (P.MAX_PACKET_CHUNK + 5)
    data = P.encode_packet(payload, 0)
    edges = [4 + P.MAX_PACKET_CHUNK + d for d in (-1, 0, 1, 3, 4, 5)]
    h.send(data[:edges[0]])
    lease = h.pool.give()
    for a, b in zip(edges, edges[1:] + [len(data)]):
        h.send(data[a - (a - edges[0] if a == edges[0] else 0):b] if a == edges[0] else data[a:b])
        check_invariant(h)
    assert b"".join(lease.conn.writes) == data
    server_feed(lease.conn, my.wire([P.err_packet(1146, "42S02", "no such table")]))
    assert lease.released and lease.release_args["clean"] is True


def test_autocommit_change_split_at_every_server_offset():
    """SET autocommit=1 inside a transaction commits it: the OK that clears IN_TRANS, split at
    every byte, releases exactly once it is whole, and a pipelined partial command stays home."""
    sql = my.query("SET autocommit = 1")
    partial = struct.pack("<I", 200)[:3] + b"\x00\x03SELECT"
    answer = my.wire([my.ok(AC)])
    for cut in range(len(answer) + 1):
        h = my.Harness()
        lease = in_transaction(h)
        h.send(sql + partial)
        server_feed(lease.conn, answer[:cut])
        check_invariant(h)
        assert lease.released is (cut == len(answer))
        if cut < len(answer):
            server_feed(lease.conn, answer[cut:])
        assert lease.released and lease.release_args["clean"] is True
        assert h.pool.requests == []  # the partial query waits, whole-or-nothing, in the proxy
        assert h.frontend.state is SessionState.IDLE


def test_local_infile_data_cut_short_never_goes_back_clean():
    h = my.Harness()
    h.login()
    h.send(my.query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))
    lease = h.pool.give()
    server_feed(lease.conn, my.wire([b"\xfbf"]))
    assert lease.conn.tracker.awaiting_client_data
    h.send(struct.pack("<I", 1000)[:3] + b"\x02" + b"row\n" * 10)  # part of a data packet
    check_invariant(h)
    assert not h.frontend.busy  # waiting for the client: IdleClientTimeout applies
    h.lose()
    assert lease.released and lease.release_args["clean"] is False


def _data_packet(seq, payload):
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


@pytest.mark.parametrize("mid_packet", [False, True])
def test_database_lost_during_local_infile_drops_the_file_and_keeps_the_session(mid_packet):
    """The database connection breaks while the client streams its file: the rest of the file,
    split at every byte, is read and dropped (nothing of it reaches any connection), its end is
    answered with ERR 2013 in sequence, and the session's next command borrows a new
    connection."""
    rows = b"row\n" * 40
    rest = _data_packet(3, rows) + _data_packet(4, b"") + my.query("SELECT 2")
    for cut in range(len(rest) + 1):
        h = my.Harness()
        h.login()
        h.send(my.query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))
        lease = h.pool.give()
        server_feed(lease.conn, my.wire([b"\xfbf"]))
        assert [p for _, p in h.packets()] == [b"\xfbf"]
        first = _data_packet(2, rows)
        h.send(first[:10] if mid_packet else first)
        h.frontend.backend_lost(lease.conn, "database closed the connection")
        assert lease.released and lease.release_args["clean"] is False
        written = b"".join(lease.conn.writes)
        if mid_packet:
            h.send(first[10:])
        h.send(rest[:cut])
        h.send(rest[cut:])
        assert b"".join(lease.conn.writes) == written  # nothing more went to the lost one
        [(seq, payload)] = h.packets()
        assert seq == 5
        assert my.err(payload) == (2013, "HY000",
                                   "Lost connection to the database during the command")
        assert not h.closed
        [nxt] = h.pool.leases[1:] or [h.pool.give()]
        assert nxt.conn.writes == [my.query("SELECT 2")]
        check_invariant(h)


def test_database_lost_during_local_infile_in_a_transaction_ends_the_session_after_the_file():
    """Inside a transaction the transaction is gone with the connection: the client connection
    is closed, but only after the client has sent its whole file and read the error (a driver
    cut off mid-upload may not report it well)."""
    h = my.Harness()
    lease = in_transaction(h)
    h.send(my.query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))
    server_feed(lease.conn, my.wire([b"\xfbf"]))
    h.send(_data_packet(2, b"row\n"))
    h.packets()
    h.frontend.backend_lost(lease.conn, "database closed the connection")
    assert not h.closed
    h.send(_data_packet(3, b"row\n"))
    assert not h.closed and h.sent() == b""
    h.send(_data_packet(4, b""))
    [(seq, payload)] = h.packets()
    assert seq == 5 and my.err(payload)[0] == 2013
    assert h.closed


def test_database_lost_after_the_whole_local_infile_answers_the_file_end():
    """The file went whole (its empty end packet too) and the connection broke before the
    server's answer: ERR 2013 in sequence after the end packet, and the session goes on."""
    h = my.Harness()
    h.login()
    h.send(my.query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))
    lease = h.pool.give()
    server_feed(lease.conn, my.wire([b"\xfbf"]))
    h.packets()
    h.send(_data_packet(2, b"row\n") + _data_packet(3, b"row\n") + _data_packet(4, b""))
    assert not lease.conn.tracker.awaiting_client_data
    h.frontend.backend_lost(lease.conn, "database closed the connection")
    [(seq, payload)] = h.packets()
    assert seq == 5 and my.err(payload)[0] == 2013
    assert not h.closed
    h.send(my.query("SELECT 2"))
    [nxt] = h.pool.leases[1:] or [h.pool.give()]
    assert nxt.conn.writes == [my.query("SELECT 2")]
