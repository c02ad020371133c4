"""A sync of autocommit alone travels in the same write as the session's command (no round trip
of its own), and its answer never reaches the client: MySQLBackendConnection.sync_inline and
_forward, and the frontend that writes it."""

import pytest

from tests.unit import test_mysql_backend as mb
from tests.unit import test_mysql_frontend as mf
from txrdsproxy.proxy import mysql_state as mstate
from txrdsproxy.wire.mysql import packets as P

SET_AC1 = P.encode_packet(bytes((P.COM_QUERY,)) + b"SET autocommit=1", 0)
SELECT = P.encode_packet(bytes((P.COM_QUERY,)) + b"SELECT 1", 0)


def lent_at(**values):
    """A logged-in connection (lent to a FakeSink) whose tracked values another session left."""
    server = mb.Server()
    sink = server.lend()
    server.conn.current.update(values)
    return server, sink


def test_only_a_change_of_autocommit_goes_inline():
    server, _ = lent_at(autocommit="0")
    conn = server.conn
    assert conn.sync_inline({}, None) == SET_AC1
    assert conn.busy  # its answer is owed
    server2, _ = lent_at(autocommit="0", time_zone="+05:00")
    assert server2.conn.sync_inline({}, None) is None  # more than autocommit: a round trip
    server3, _ = lent_at(autocommit="0")
    assert server3.conn.sync_inline({}, "otherdb") is None  # COM_INIT_DB first: a round trip
    server4, _ = lent_at()
    assert server4.conn.sync_inline({}, None) is None  # nothing to do


def _answers(caps):
    """The SET's OK, then a one-row result set for the command."""
    first = P.encode_packet(mb.ok(mb.AC), 1)
    command = mb.wire(mb.resultset(caps, [["1"]]), seq=1)
    return first, command


@pytest.mark.parametrize("split", range(0, 40))
def test_the_sets_answer_is_read_here_and_only_the_commands_is_relayed(split):
    server, sink = lent_at(autocommit="0")
    conn = server.conn
    conn.tracker.expect(P.COM_QUERY)
    conn.write(conn.sync_inline({}, None) + SELECT)
    assert server.transport.value() == SET_AC1 + SELECT  # one write
    first, command = _answers(conn.capabilities)
    data = first + command
    split = min(split, len(data))
    conn.dataReceived(data[:split])
    conn.dataReceived(data[split:])
    assert bytes(sink.data) == command
    assert sink.completes == [len(command)]
    assert conn.current["autocommit"] == "1" and not conn.busy and not server.closed


def test_byte_by_byte():
    server, sink = lent_at(autocommit="0")
    conn = server.conn
    conn.tracker.expect(P.COM_QUERY)
    conn.write(conn.sync_inline({}, None) + SELECT)
    first, command = _answers(conn.capabilities)
    for i in range(len(first + command)):
        conn.dataReceived((first + command)[i:i + 1])
    assert bytes(sink.data) == command and sink.completes == [len(command)]


@pytest.mark.parametrize("answer", [
    P.err_packet(1231, "42000", "Variable 'autocommit' can't be set"),
    mb.wire(mb.resultset(mb.PROFILE_NOEOF, [["x"]]), seq=1)[4:5],  # not an OK
])
def test_a_failed_inline_set_closes_the_connection_and_relays_nothing(answer):
    server, sink = lent_at(autocommit="0")
    conn = server.conn
    conn.tracker.expect(P.COM_QUERY)
    conn.write(conn.sync_inline({}, None) + SELECT)
    _, command = _answers(conn.capabilities)
    conn.dataReceived(P.encode_packet(answer, 1) + command)
    assert server.closed
    assert bytes(sink.data) == b"" and sink.completes == []  # the command ran in a wrong state
    assert server.lost and "inline sync failed" in server.lost[0]


# -- the frontend ---------------------------------------------------------------------------------
class InlineConn(mf.FakeConn):
    """FakeConn that goes inline as the real connection does."""

    def __init__(self, key, connector):
        super().__init__(key, connector)
        self.inline = []

    def sync_inline(self, desired, database):
        if database is not None and database != self.database:
            return None
        sql, target = mstate.sync_sql(self.current, self.baseline, desired)
        if set(target) != {"autocommit"}:
            return None
        self.inline.append(sql)
        self.current.update(target)
        return P.encode_packet(bytes((P.COM_QUERY,)) + sql, 0)


@pytest.fixture
def s():
    h = mf.Harness()
    h.pool.make_conn = lambda key: InlineConn(key, h.connector)
    h.login()
    return h


def test_the_frontend_writes_the_set_and_the_command_at_once(s):
    s.send(mf.query("SELECT 1"))
    lease = s.pool.give(current=dict(mf.BASELINE, autocommit="0"))
    conn = lease.conn
    assert conn.synced == [] and conn.inline == [b"SET autocommit=1"]
    assert conn.writes == [SET_AC1 + mf.query("SELECT 1")]


def test_no_inline_sync_ahead_of_a_command_without_answer(s):
    # COM_STMT_CLOSE gets no answer: the connection could go back before the SET's answer.
    s.frontend._statements.add(7)
    s.send(mf.command(P.COM_STMT_CLOSE, (7).to_bytes(4, "little")))
    lease = s.pool.give(current=dict(mf.BASELINE, autocommit="0"))
    assert lease.conn.inline == [] and len(lease.conn.synced) == 1


# -- SETs answered by the proxy (no database) -------------------------------------------------------
COLLATIONS = mstate.Collations([["45", "utf8mb4_general_ci", "utf8mb4", "Yes"],
                                ["8", "latin1_swedish_ci", "latin1", "Yes"]])
PYMYSQL_CAPS = mf.CLIENT_CAPS & ~P.CLIENT_SESSION_TRACK  # PyMySQL does not ask for it


def _session(caps=PYMYSQL_CAPS):
    h = mf.Harness()
    h.pool.make_conn = lambda key: InlineConn(key, h.connector)
    h.connector.collations = COLLATIONS
    h.connector.server_info = h.connector.greeting
    h.connector.baseline = dict(mf.BASELINE)
    h.handshake(caps=caps)
    assert h.packets() == [(2, P.ok_packet(status=mf.AC))]
    return h


def test_a_drivers_connect_sets_are_answered_here_and_reach_the_connection_with_the_query():
    s = _session()
    s.send(mf.query("SET NAMES utf8mb4"))  # what the session has already: a no-op
    assert s.packets() == [(1, P.ok_packet(status=mf.AC))]
    s.send(mf.query("SET AUTOCOMMIT = 0"))
    assert s.packets() == [(1, P.ok_packet(status=0))]  # the status flag says autocommit is off
    assert s.pool.requests == [] and s.pool.try_borrows == 0  # no database so far
    s.send(mf.query("SELECT @@autocommit"))
    lease = s.pool.give()  # a connection at the baseline: autocommit=1
    conn = lease.conn
    assert conn.inline == [b"SET autocommit=0"] and conn.synced == []
    assert conn.writes == [P.encode_packet(bytes((P.COM_QUERY,)) + b"SET autocommit=0", 0)
                           + mf.query("SELECT @@autocommit")]


@pytest.mark.parametrize("sql", [
    "SET NAMES latin1",                      # a change of character set: the server decides
    "SET time_zone = '+01:00'",              # a value the server may refuse
    "SET autocommit = 0; SELECT 1",          # more than one statement
    "SET sql_mode = 'ANSI_QUOTES'",
])
def test_other_sets_go_to_the_database(sql):
    s = _session()
    s.send(mf.query(sql))
    assert s.packets() == [] and len(s.pool.requests) == 1


def test_no_local_answer_for_clients_that_track_session_state():
    s = _session(caps=mf.CLIENT_CAPS)  # the server's OK would list the variables set
    s.send(mf.query("SET autocommit = 0"))
    assert s.packets() == [] and len(s.pool.requests) == 1


def test_no_local_answer_while_a_connection_is_held():
    s = _session()
    s.send(mf.query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(mf.ok(mf.AC | mf.INTX))
    assert not lease.released
    s.sent()
    s.send(mf.query("SET autocommit = 1"))  # inside a transaction: commits it on the server
    assert s.packets() == []
    assert lease.conn.writes[-1] == mf.query("SET autocommit = 1")
