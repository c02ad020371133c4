"""No exception escapes a PostgreSQL protocol callback (issue 6 item 15).

Whatever a bug raises -- in dataReceived, in a pool Deferred's callback, in a session callback
made by the database connection -- ends that one session with "Unknown error." (XX000), logs the
reason with a traceback, and closes its database connection instead of reusing it.
"""

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from tests.unit import test_pg_backend as be
from tests.unit import test_pg_frontend as fe
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg import pinning


def _assert_unknown_error_and_closed(h):
    errors = [msg.parse_error_fields(p) for k, p in h.messages() if k == b"E"]
    assert [(e["C"], e["M"]) for e in errors] == [("XX000", "Unknown error.")]
    assert h.closed


def test_bug_while_reading_client_bytes_closes_that_session_only(monkeypatch, failures):
    h, other = fe.Harness(), fe.Harness()
    h.login()
    other.login()
    h.send(msg.query("SELECT 1"))
    lease = h.pool.give()

    def broken(*args, **kwargs):
        raise RuntimeError("classifier bug")

    monkeypatch.setattr(pinning, "classify_query", broken)
    h.send(msg.query("SELECT 2"))  # raises inside the scanner's inspect callback
    _assert_unknown_error_and_closed(h)
    assert [f["log_failure"].type for f in failures] == [RuntimeError]
    assert "unexpected error in dataReceived" in failures[0]["log_format"].format(
        s="", where="dataReceived")
    h.lose()
    assert lease.release_args["clean"] is False  # its state is unknown: closed, not reused
    assert not other.closed


def test_bug_in_a_borrow_callback_closes_the_session(monkeypatch, failures):
    h = fe.Harness()
    h.login()
    h.send(msg.query("SELECT 1"))

    def broken(conn, waited):
        raise KeyError("attach bug")

    monkeypatch.setattr(h.frontend, "attach_connection", broken)
    lease = h.pool.give()  # the Deferred's callback raises: no unhandled error in a Deferred
    _assert_unknown_error_and_closed(h)
    assert [f["log_failure"].type for f in failures] == [KeyError]
    h.lose()
    assert lease.released and lease.release_args["clean"] is False  # no pool slot leaks


def test_bug_in_the_session_called_by_the_database_connection_closes_that_connection(failures):
    conn, t, sink, listener = be.lent()

    def broken(status):
        raise ValueError("session bug")

    sink.ready_for_query = broken
    conn.dataReceived(be.command_complete("SELECT 1") + msg.ready_for_query())
    assert conn.state == "closed"
    assert t.disconnecting
    [(gone, why)] = listener.calls
    assert gone is conn and "unexpected error" in why
    conn.connectionLost(Failure(ConnectionDone()))  # the transport closes: the session is told
    assert [e[2] for e in sink.events if e[0] == "lost"] == [why]
    assert [f["log_failure"].type for f in failures] == [ValueError]
