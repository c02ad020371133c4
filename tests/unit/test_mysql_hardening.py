"""MySQL frontend hardening: prepared statements belong to their session, KILL with absurd
numbers, bounded buffering in every phase, and no exception out of a protocol callback
(seeded random bytes at every phase)."""

import random
import struct

import pytest

from tests.unit import test_mysql_frontend as my
from txrdsproxy.proxy.mysql_frontend import PENDING_PAUSE
from txrdsproxy.proxy.session import Phase
from txrdsproxy.wire.mysql import packets as P


@pytest.fixture
def s():
    h = my.Harness()
    h.login()
    return h


def stmt(cmd, stmt_id, rest=b""):
    return my.command(cmd, struct.pack("<I", stmt_id) + rest)


EXECUTE_ARGS = b"\x00\x01\x00\x00\x00"  # flags, iteration count


# -- prepared statements belong to the session that prepared them ------------------------------------
@pytest.mark.parametrize("cmd,name", [(P.COM_STMT_EXECUTE, "mysqld_stmt_execute"),
                                      (P.COM_STMT_RESET, "mysqld_stmt_reset"),
                                      (P.COM_STMT_FETCH, "mysqld_stmt_fetch")])
def test_statement_command_for_an_id_never_prepared_is_refused(s, cmd, name):
    s.send(stmt(cmd, 7, EXECUTE_ARGS if cmd == P.COM_STMT_EXECUTE else b"\x01\x00\x00\x00"))
    [(seq, payload)] = s.packets()
    assert seq == 1
    assert my.err(payload) == (1243, "HY000", f"Unknown prepared statement handler (7) given to {name}")
    assert s.pool.requests == [] and s.pool.try_borrows == 0  # never reached a connection
    assert not s.closed


def test_own_statement_runs_and_others_are_refused_even_when_pinned(s):
    s.send(my.command(P.COM_STMT_PREPARE, b"SELECT 1"))
    lease = s.pool.give()
    lease.conn.respond(my.prepare_ok(stmt_id=41))
    s.sent()
    assert s.frontend.pin_reason.value == "prepared_statement"
    own = stmt(P.COM_STMT_EXECUTE, 41, EXECUTE_ARGS)
    s.send(own)
    assert lease.conn.writes[-1] == own
    lease.conn.respond(my.ok())
    s.sent()
    # Another id on the same (pinned) connection: refused, not forwarded.
    s.send(stmt(P.COM_STMT_EXECUTE, 40, EXECUTE_ARGS))
    [(_, payload)] = s.packets()
    assert my.err(payload)[0] == 1243
    assert lease.conn.writes[-1] == own
    # COM_STMT_CLOSE of another id: dropped (the server answers nothing to it either).
    s.send(stmt(P.COM_STMT_CLOSE, 40) + my.command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))]
    assert lease.conn.writes[-1] == own
    # Closing its own statement is forwarded; after that the id is no longer the session's.
    s.send(stmt(P.COM_STMT_CLOSE, 41))
    assert lease.conn.writes[-1] == stmt(P.COM_STMT_CLOSE, 41)
    s.send(stmt(P.COM_STMT_EXECUTE, 41, EXECUTE_ARGS))
    assert my.err(s.packets()[0][1])[0] == 1243


AC = P.SERVER_STATUS_AUTOCOMMIT


@pytest.mark.parametrize("arrival", ["alone", "split", "two in one read", "with a foreign id",
                                     "with a ping"])
def test_executes_on_a_held_connection_whatever_the_reads(s, arrival):
    """A pinned session's COM_STMT_EXECUTE is relayed byte for byte and answered in order,
    whether it arrives alone in a read (the fast path) or cut, or with other commands (the
    stream): a foreign id is refused either way, and nothing but whole commands reaches the
    connection."""
    s.send(my.command(P.COM_STMT_PREPARE, b"SELECT 2"))
    lease = s.pool.give()
    lease.conn.respond(my.prepare_ok(stmt_id=5))
    s.sent()
    own = stmt(P.COM_STMT_EXECUTE, 5, EXECUTE_ARGS)
    foreign = stmt(P.COM_STMT_EXECUTE, 6, EXECUTE_ARGS)
    writes = len(lease.conn.writes)
    if arrival == "alone":
        s.send(own)
    elif arrival == "split":
        s.send(own[:7])
        assert len(lease.conn.writes) == writes  # nothing of a command cut short
        s.send(own[7:])
    elif arrival == "two in one read":
        s.send(own + own)
    elif arrival == "with a foreign id":
        s.send(foreign + own)
        [(seq, payload)] = s.packets()
        assert seq == 1 and my.err(payload)[0] == 1243
    else:
        s.send(my.command(P.COM_PING) + own)
        assert s.packets() == [(1, P.ok_packet(status=AC))]
    assert lease.conn.writes[writes:] == [own]
    lease.conn.respond(my.ok())
    assert s.packets() == [(1, my.ok())]
    if arrival == "two in one read":  # the second waited for the first's answer
        assert lease.conn.writes[writes:] == [own, own]
        lease.conn.respond(my.ok())
        assert s.packets() == [(1, my.ok())]
    # QueryRequests: each execute that reached the proxy whole, a refused one included
    assert s.frontend.queries == 1 + (arrival in ("two in one read", "with a foreign id"))
    assert not s.closed


def test_stmt_close_of_a_foreign_id_inside_a_transaction_is_not_forwarded(s):
    s.send(my.query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(my.ok(AC | P.SERVER_STATUS_IN_TRANS))
    s.send(stmt(P.COM_STMT_CLOSE, 1) + stmt(P.COM_STMT_SEND_LONG_DATA, 1, b"\x00\x00data"))
    assert lease.conn.writes == [my.query("BEGIN")]


def test_mariadb_last_statement_id_needs_a_statement_of_the_session(s):
    s.send(stmt(P.COM_STMT_EXECUTE, 0xFFFFFFFF, EXECUTE_ARGS))
    assert my.err(s.packets()[0][1])[0] == 1243
    assert s.pool.requests == []


def test_reset_connection_forgets_the_sessions_statements(s):
    s.send(my.command(P.COM_STMT_PREPARE, b"SELECT 1"))
    lease = s.pool.give()
    lease.conn.respond(my.prepare_ok(stmt_id=3))
    s.send(my.command(P.COM_RESET_CONNECTION))
    s.sent()
    s.send(stmt(P.COM_STMT_EXECUTE, 3, EXECUTE_ARGS))
    assert my.err(s.packets()[0][1])[0] == 1243


def test_large_execute_of_a_foreign_id_is_dropped_as_it_arrives(s):
    big = stmt(P.COM_STMT_EXECUTE, 9, EXECUTE_ARGS + b"p" * (200 * 1024))
    s.send(big[:20])
    assert my.err(s.packets()[0][1])[0] == 1243
    s.send(big[20:] + my.command(P.COM_PING))
    assert s.packets() == [(1, P.ok_packet(status=AC))]  # the rest was dropped, the stream in step
    assert s.pool.requests == []


# -- KILL with absurd ids: no exception, the server answers ---------------------------------------------
@pytest.mark.parametrize("digits", [21, 5000, 100000])
def test_kill_with_a_huge_number_goes_to_the_server(s, failures, digits):
    sql = b"KILL " + b"9" * digits
    s.send(my.query(sql))
    if len(sql) > 16 * 1024:
        assert s.frontend.pin_reason.value == "statement_too_large"
    lease = s.pool.give()
    assert b"".join(lease.conn.writes) == my.query(sql)
    assert failures == [] and not s.closed


# -- bounded buffering in every phase ----------------------------------------------------------------------
def test_bytes_pipelined_behind_a_login_are_bounded():
    h = my.Harness()
    h.handshake(database="app")  # the login borrows to check the database
    assert h.pool.requests
    chunk = my.query("SELECT 1") * 10000
    sent = 0
    while h.transport.producerState == "producing":
        h.send(chunk)
        sent += len(chunk)
        assert sent < 4 * PENDING_PAUSE
    assert sent > PENDING_PAUSE
    lease = h.pool.give()  # login done: the commands are served in order, reading resumes
    assert h.packets()[0] == (2, P.ok_packet(status=AC))
    for _ in range(3):
        if h.pool.requests:
            h.pool.give()
    assert h.transport.producerState == "paused" or h.frontend._stream.buffered < PENDING_PAUSE


def test_command_phase_pauses_while_a_response_is_outstanding(s):
    s.send(my.query("SELECT SLEEP(1)"))
    lease = s.pool.give()
    s.send(my.query("SELECT 2") * (PENDING_PAUSE // 10))
    assert s.transport.producerState == "paused"
    lease.conn.respond(my.ok())
    assert s.transport.producerState == "paused"  # still far more than a quarter buffered


def test_handshake_packet_above_the_limit_is_refused_before_buffering(failures):
    h = my.Harness()
    h.greeting()
    h.send(b"\xff\xff\xff\x01" + b"a" * 100)
    assert h.closed and failures == []


# -- random bytes at every phase: a clear error or a close, never a traceback ------------------------------
def garbage(rng, size):
    return bytes(rng.getrandbits(8) for _ in range(size))


def chunks(rng, data):
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 64)
        yield data[pos:pos + step]
        pos += step


def _phase(h, phase):
    """Bring a fresh harness to *phase*; -> the lease held (or None)."""
    if phase == "greeting-pending":
        h.frontend._phase = Phase.GREETING  # the probe has not answered yet
        return None
    if phase == "handshake":
        h.greeting()
        return None
    if phase == "auth-switch":
        greeting = h.greeting()
        packet = my.hs.build_handshake_response41(my.CLIENT_CAPS & greeting.capabilities, my.USER,
                                                  b"x" * 20, auth_plugin="other_plugin")
        h.send(P.encode_packet(packet, 1))
        h.sent()
        return None
    if phase == "login-borrowing":
        h.handshake(database="app")
        return None
    h.login()
    if phase == "idle":
        return None
    if phase == "response-outstanding":
        h.send(my.query("SELECT 1"))
        return h.pool.give()
    if phase == "local-infile":
        h.send(my.query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))
        lease = h.pool.give()
        lease.conn.respond(b"\xfbf")
        return lease
    if phase == "pinned-in-transaction":
        h.send(my.query("SET @x = 1"))
        lease = h.pool.give()
        lease.conn.respond(my.ok(AC | P.SERVER_STATUS_IN_TRANS))
        return lease
    raise AssertionError(phase)


PHASES = ["greeting-pending", "handshake", "auth-switch", "login-borrowing", "idle",
          "response-outstanding", "local-infile", "pinned-in-transaction"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("seed", range(12))
def test_random_bytes_at_every_phase(phase, seed, failures):
    rng = random.Random(seed * 7919 + PHASES.index(phase))
    h = my.Harness()
    lease = _phase(h, phase)
    stream = garbage(rng, rng.randint(1, 600))
    if seed % 3 == 0:  # valid-looking headers with random bodies
        stream = b"".join(P.encode_packet(garbage(rng, rng.randint(1, 40)), rng.getrandbits(8))
                          for _ in range(rng.randint(1, 20)))
    for piece in chunks(rng, stream):
        h.send(piece)
        while h.pool.requests and rng.random() < 0.5:
            h.pool.give()
        if h.closed:
            break
    h.lose()
    assert failures == []
    if lease is not None and phase != "pinned-in-transaction":
        # The database still owes an answer (or file data is half sent): never back clean.
        assert lease.released and lease.release_args["clean"] is False
    for other in h.pool.leases:
        if other.released and other.release_args["clean"]:
            assert other.conn.tracker.idle


# -- the classifier as the frontend drives it ---------------------------------------------------------------
def test_set_names_sjis_pins_with_the_reason(s):
    s.send(my.query("SET NAMES sjis"))
    lease = s.pool.give()
    assert s.frontend.pin_reason.value == "client_charset"
    lease.conn.respond(my.ok())
    assert not lease.released


def test_session_in_ansi_quotes_mode_is_lexed_in_that_mode(s):
    s.send(my.query("SET sql_mode = 'ANSI_QUOTES'"))
    lease = s.pool.give()
    lease.conn.respond(my.ok())
    assert lease.released and s.frontend.pin_reason is None
    s.send(my.query('SELECT "a\\"; SET @x = 1; -- "'))
    s.pool.give()
    assert s.frontend.pin_reason.value == "user_variable"


def test_failed_multi_statement_that_set_tracked_values_pins(s):
    s.send(my.query("SET sql_mode = 'ANSI_QUOTES'; SELECT * FROM missing"))
    lease = s.pool.give()
    lease.conn.respond(P.err_packet(1146, "42S02", "Table 'missing' doesn't exist"))
    assert s.frontend.pin_reason.value == "set_variable"
    assert not lease.released  # the first statement ran: its connection stays with the session


def test_failed_single_set_changes_nothing_and_does_not_pin(s):
    s.send(my.query("SET time_zone = 'Nowhere/Else'"))
    lease = s.pool.give()
    lease.conn.respond(P.err_packet(1298, "HY000", "Unknown or incorrect time zone"))
    assert s.frontend.pin_reason is None and lease.released
    assert "time_zone" not in s.frontend.desired


def no_tracking_session():
    h = my.Harness()
    h.login(caps=my.CLIENT_CAPS & ~P.CLIENT_SESSION_TRACK)
    return h


def test_use_is_followed_when_the_server_does_not_track_the_schema():
    h = no_tracking_session()
    h.send(my.query("SELECT 1; USE `other`"))
    lease = h.pool.give()
    lease.conn.respond(my.ok(AC | P.SERVER_MORE_RESULTS_EXISTS), my.ok())
    assert h.frontend.database == "other" and lease.conn.database == "other"
    assert h.frontend.pin_reason is None


def test_use_that_cannot_be_followed_pins():
    h = no_tracking_session()
    h.send(my.query("USE /* where? */"))
    h.pool.give()
    assert h.frontend.pin_reason.value == "unknown_database"


def test_init_db_is_followed(s):
    s.send(my.command(P.COM_INIT_DB, b"shop"))
    lease = s.pool.give()
    lease.conn.respond(my.ok())
    assert s.frontend.database == "shop" and lease.conn.database == "shop"


# -- a session without a database never inherits another session's ---------------------------------------
def test_sessions_without_a_database_borrow_connections_of_their_own_kind(s):
    from txrdsproxy.proxy.mysql_frontend import NO_DATABASE
    s.send(my.query("SELECT 1"))
    [(key, _)] = s.pool.requests
    assert key == my.KEY + (NO_DATABASE,)
    lease = s.pool.give()
    lease.conn.respond(my.ok())
    assert lease.released and lease.release_args["clean"] is True
    with_db = my.Harness(ctx=s.ctx)
    with_db.handshake(database="app")  # checked at login on a connection of the other kind
    [(key, _)] = s.pool.requests
    assert key == my.KEY


def schema_ok(database):
    """An OK whose session-state information says the current database changed."""
    entry = bytes((P.SESSION_TRACK_SCHEMA,)) + P.encode_lenenc_str(
        P.encode_lenenc_str(database))
    status = AC | P.SERVER_SESSION_STATE_CHANGED
    return (b"\x00\x00\x00" + struct.pack("<HH", status, 0) + P.encode_lenenc_str(b"")
            + P.encode_lenenc_str(entry))


def test_use_on_a_connection_of_sessions_without_a_database_closes_it_after(s):
    s.send(my.query("USE shop"))
    lease = s.pool.give()
    lease.conn.respond(schema_ok(b"shop"))
    assert s.frontend.database == "shop"
    # That connection never goes back to sessions without a database ...
    assert lease.released and lease.release_args["clean"] is False
    # ... and the session's next borrow is of the ordinary kind.
    s.send(my.query("SELECT 1"))
    assert s.pool.requests[-1][0] == my.KEY


@pytest.mark.parametrize("cmd", [P.COM_STMT_EXECUTE, P.COM_STMT_CLOSE, P.COM_STMT_RESET])
def test_a_statement_id_is_read_from_its_own_command_only(s, cmd):
    """A statement command shorter than its 4-byte id: the id is never completed with the
    bytes of the command pipelined after it (which could spell an id the session owns)."""
    s.send(my.command(P.COM_STMT_PREPARE, b"SELECT 1"))
    lease = s.pool.give()
    lease.conn.respond(my.prepare_ok(stmt_id=0x03_03_01))
    s.sent()
    writes = list(lease.conn.writes)
    # a 2-byte command (id 0x01), then a packet whose header bytes are 03 03 00 ...: read across
    # the boundary they would make 0x030301, the session's own statement.
    short = P.encode_packet(bytes((cmd, 0x01)), 0)
    follower = P.encode_packet(b"\x0e" + b"\x00" * (0x0303 - 1), 0)  # a COM_PING of 0x303 bytes
    assert follower[:2] == b"\x03\x03"
    s.send(short + follower)
    assert lease.conn.writes == writes  # the short command named no statement of the session
    if cmd != P.COM_STMT_CLOSE:
        assert my.err(s.packets()[0][1])[:1] == (1243,)
