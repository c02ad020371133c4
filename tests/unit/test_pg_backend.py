"""proxy/pg_backend.py driven with StringTransport and hand-built server byte streams.

The server side is played by bytes built with wire/pg/messages.py (and a real ScramServer for the
SCRAM exchange); what the connection writes is read back from the transport and split into messages.
"""

import dataclasses
import random
import struct

import pytest
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.proxy.connector import BackendGone
from txrdsproxy.proxy.pg_backend import (
    SESSION_PARAMS, DatabaseError, PgBackendConnection, _data_row, param_sync_sql,
    quote_literal,
)
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.auth import AuthError, ScramServer, ScramVerifier, md5_response
from txrdsproxy.wire.pg.framing import PROTOCOL_3_0, ProtocolViolation, message, split_messages

USER, PASSWORD, DATABASE = "bob", "s3cret", "app"
KEY = (USER, DATABASE)
MAX_MESSAGE = 1 << 20


# -- helpers -------------------------------------------------------------------------------------------
class FakeTarget:
    rds_resource_id = "db-1"
    endpoint = "db.example"
    port = 5432


class Sink:
    """Records what a session would be told, in order."""

    def __init__(self):
        self.events = []

    def backend_data(self, data):
        assert isinstance(data, (bytes, bytearray, memoryview))
        self.events.append(("data", bytes(data)))

    def ready_for_query(self, status):
        self.events.append(("ready", bytes(status)))

    def parameter_changed(self, name, value):
        self.events.append(("param", name, value))

    def backend_lost(self, conn, why):
        self.events.append(("lost", conn, why))

    @property
    def data(self):
        return b"".join(e[1] for e in self.events if e[0] == "data")

    def of(self, kind):
        return [e[1:] for e in self.events if e[0] == kind]


class PoolListener:
    def __init__(self):
        self.calls = []

    def __call__(self, conn, reason):
        self.calls.append((conn, reason))


def outcome(d):
    """The result (or Failure) a Deferred has already fired with; the test fails if it has not."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def result_of(d):
    r = outcome(d)
    if isinstance(r, Failure):
        r.raiseException()
    return r


def failure_of(d, *types):
    r = outcome(d)
    assert isinstance(r, Failure), f"expected a failure, got {r!r}"
    if types:
        assert r.check(*types), r
    return r


def not_fired(d):
    out = []

    def seen(r):
        out.append(r)
        return r

    d.addBoth(seen)
    return not out


def new_conn(init_query="", max_message_size=MAX_MESSAGE, password=PASSWORD):
    conn = PgBackendConnection(KEY, FakeTarget(), Credentials(USER, password), init_query, max_message_size)
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport


def written(transport):
    """Typed messages written since the last call (the StartupMessage must have been taken)."""
    data = transport.value()
    transport.clear()
    msgs, used = split_messages(data, MAX_MESSAGE)
    assert used == len(data), "a partial message was written"
    return [(bytes(k), p) for k, p in msgs]


def take_startup(transport):
    data = transport.value()
    transport.clear()
    (length, code) = struct.unpack_from("!II", data)
    assert length == len(data)
    return code, msg.parse_startup_params(data[8:])


def row_description(*names):
    body = struct.pack("!H", len(names))
    for n in names:
        body += n.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    return message(b"T", body)


def data_row(*values):
    body = struct.pack("!H", len(values))
    for v in values:
        if v is None:
            body += struct.pack("!i", -1)
        else:
            v = v.encode() if isinstance(v, str) else v
            body += struct.pack("!i", len(v)) + v
    return message(b"D", body)


def command_complete(tag):
    return message(b"C", tag.encode() + b"\0")


def notice(text):
    return message(b"N", b"SNOTICE\0VNOTICE\0C00000\0M" + text.encode() + b"\0\0")


def show_result(value="100"):
    return (row_description("max_connections") + data_row(value) + command_complete("SHOW")
            + msg.ready_for_query(msg.IDLE))


LOGIN_OK = (msg.auth_request(msg.AUTH_OK)
            + msg.parameter_status("server_version", "15.4")
            + msg.parameter_status("client_encoding", "UTF8")
            + msg.parameter_status("TimeZone", "UTC")
            + msg.backend_key_data(4242, 0xDEADBEEF)
            + msg.ready_for_query(msg.IDLE))


def logged_in(init_query=""):
    """A connection past login and `SHOW max_connections`, state idle, transport cleared."""
    conn, t = new_conn(init_query)
    take_startup(t)
    conn.dataReceived(LOGIN_OK)
    conn.dataReceived(show_result())
    if init_query:
        conn.dataReceived(command_complete("SET") + msg.ready_for_query())
    assert conn.state == "idle"
    t.clear()
    return conn, t


def lent():
    conn, t = logged_in()
    listener = conn.pool_listener = PoolListener()
    conn.state = "borrowed"
    sink = Sink()
    conn.attach(sink)
    return conn, t, sink, listener


def assert_closed(conn, t, listener=None, contains=""):
    assert conn.state == "closed"
    assert t.disconnecting
    assert t.value().endswith(msg.TERMINATE)
    if listener is not None:
        assert len(listener.calls) == 1
        assert listener.calls[0][0] is conn
        assert contains in listener.calls[0][1]


# -- login ---------------------------------------------------------------------------------------------
def test_startup_message_names_user_and_database():
    conn, t = new_conn()
    code, params = take_startup(t)
    assert code == PROTOCOL_3_0
    assert params == {"user": USER, "database": DATABASE}
    assert conn.state == "connecting"
    assert not_fired(conn.ready)


def test_trust_login_records_parameters_and_key_then_shows_max_connections():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(LOGIN_OK)
    assert written(t) == [(b"Q", b"SHOW max_connections\0")]
    assert conn.state == "initialising"
    assert not_fired(ready)
    assert conn.server_params == {"server_version": "15.4", "client_encoding": "UTF8", "TimeZone": "UTC"}
    assert conn.initial_params == conn.server_params
    assert (conn.backend_pid, conn.backend_secret) == (4242, 0xDEADBEEF)

    conn.dataReceived(show_result("100"))
    assert result_of(ready) is conn
    assert conn.state == "idle"
    assert conn.ready is None
    assert conn.server_max_connections == 100
    assert conn.txn_status == b"I"
    assert t.value() == b""  # no InitQuery configured


def test_initial_params_are_a_snapshot_at_login():
    conn, t = logged_in()
    conn.dataReceived(msg.parameter_status("TimeZone", "Europe/Paris") + command_complete("SET")
                      + msg.ready_for_query())  # no op running: harmless
    assert conn.server_params["TimeZone"] == "Europe/Paris"
    assert conn.initial_params["TimeZone"] == "UTC"


def test_whole_login_in_one_chunk():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    # The server cannot send the SHOW result before the query, but the framing must not care.
    conn.dataReceived(LOGIN_OK + show_result("250"))
    assert result_of(ready) is conn
    assert conn.server_max_connections == 250


def test_login_one_byte_at_a_time():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    for i in range(len(LOGIN_OK)):
        conn.dataReceived(LOGIN_OK[i:i + 1])
    assert written(t) == [(b"Q", b"SHOW max_connections\0")]
    stream = show_result("7")
    for i in range(len(stream)):
        conn.dataReceived(stream[i:i + 1])
    assert result_of(ready) is conn
    assert conn.server_max_connections == 7
    assert conn.backend_pid == 4242


def test_notice_during_login_is_ignored():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(notice("hello") + LOGIN_OK)
    conn.dataReceived(show_result())
    assert result_of(ready) is conn


def test_cleartext_password_is_sent_only_over_tls_or_when_allowed():
    from txrdsproxy.backend_tls import NO_TLS
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(msg.auth_request(msg.AUTH_CLEARTEXT))
    assert [k for k, _ in written(t)] == [b"X"]  # Terminate; the password never left
    assert "cleartext password on a connection without TLS" in str(failure_of(ready).value)
    assert conn.state == "closed"
    conn, t = new_conn()
    conn.tls_plan = dataclasses.replace(NO_TLS, allow_cleartext_password=True)
    take_startup(t)
    conn.dataReceived(msg.auth_request(msg.AUTH_CLEARTEXT))
    assert written(t) == [(b"p", PASSWORD.encode() + b"\0")]


def test_authentication_ok_before_the_scram_server_signature_is_refused():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(msg.auth_request(msg.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    assert written(t)[0][0] == b"p"
    conn.dataReceived(msg.auth_request(msg.AUTH_OK))  # a server that never proved the password
    assert "before the SCRAM server signature was verified" in str(failure_of(ready).value)
    assert conn.state == "closed"


def test_cleartext_password():
    conn, t = new_conn()
    conn.tls = True
    take_startup(t)
    conn.dataReceived(msg.auth_request(msg.AUTH_CLEARTEXT))
    assert written(t) == [(b"p", PASSWORD.encode() + b"\0")]
    assert conn.state == "connecting"
    ready = conn.ready
    conn.dataReceived(LOGIN_OK)
    conn.dataReceived(show_result())
    assert result_of(ready) is conn


def test_md5_password():
    conn, t = new_conn()
    take_startup(t)
    salt = b"\x01\x02\x03\x04"
    conn.dataReceived(msg.auth_request(msg.AUTH_MD5, salt))
    [(kind, payload)] = written(t)
    assert kind == b"p"
    assert payload == md5_response(USER, PASSWORD, salt) + b"\0"
    assert payload.startswith(b"md5")
    ready = conn.ready
    conn.dataReceived(LOGIN_OK + show_result())
    assert result_of(ready) is conn


def _scram_login(conn, t, server_password=PASSWORD):
    """Play a SCRAM-SHA-256 server up to (not including) AuthenticationSASLFinal; -> server-final."""
    server = ScramServer(ScramVerifier.from_password(server_password))
    conn.dataReceived(msg.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    [(kind, payload)] = written(t)
    assert kind == b"p"
    mechanism, client_first = msg.parse_sasl_initial(payload)
    assert mechanism == "SCRAM-SHA-256"
    server_first = server.client_first(client_first)
    conn.dataReceived(msg.auth_request(msg.AUTH_SASL_CONTINUE, server_first))
    [(kind, client_final)] = written(t)
    assert kind == b"p"
    return server.client_final(client_final)  # AuthError if the proof is wrong


def test_scram_sha_256_login_against_a_real_scram_server():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    server_final = _scram_login(conn, t)
    conn.dataReceived(msg.auth_request(msg.AUTH_SASL_FINAL, server_final) + msg.auth_request(msg.AUTH_OK))
    assert t.value() == b""
    assert conn.state == "connecting"
    conn.dataReceived(LOGIN_OK[len(msg.auth_request(msg.AUTH_OK)):])  # parameters, key, Z
    assert written(t) == [(b"Q", b"SHOW max_connections\0")]
    conn.dataReceived(show_result())
    assert result_of(ready) is conn
    assert conn.state == "idle"


def test_scram_wrong_password_is_rejected_by_the_server():
    conn, t = new_conn(password="wrong")
    take_startup(t)
    with pytest.raises(AuthError):
        _scram_login(conn, t, server_password=PASSWORD)


def test_scram_bad_server_signature_fails_login():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    _scram_login(conn, t)
    forged = b"v=" + b"A" * 43 + b"="
    conn.dataReceived(msg.auth_request(msg.AUTH_SASL_FINAL, forged))
    f = failure_of(ready, AuthError)
    assert "signature" in f.getErrorMessage()
    assert_closed(conn, t, listener, "login failed")


def test_scram_server_error_in_final_fails_login():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    _scram_login(conn, t)
    conn.dataReceived(msg.auth_request(msg.AUTH_SASL_FINAL, b"e=invalid-proof"))
    failure_of(ready, AuthError)
    assert_closed(conn, t)


def test_sasl_without_scram_sha_256_fails_login():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(msg.auth_sasl(["SCRAM-SHA-256-PLUS"]))
    f = failure_of(ready, ProtocolViolation)
    assert "SASL" in f.getErrorMessage()
    assert_closed(conn, t, listener, "login failed")
    assert written(t) == [(b"X", b"")]  # no SASLInitialResponse, only Terminate


@pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 99])  # Kerberos, SCM, GSS, GSS continue, SSPI, bogus
def test_unsupported_auth_request_fails_login(code):
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(msg.auth_request(code))
    f = failure_of(ready, ProtocolViolation)
    assert str(code) in f.getErrorMessage()
    assert_closed(conn, t, listener, "unsupported authentication")


@pytest.mark.parametrize("code", [msg.AUTH_SASL_CONTINUE, msg.AUTH_SASL_FINAL])
def test_sasl_continue_or_final_without_sasl_fails_login(code):
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(msg.auth_request(code, b"r=abc,s=c2FsdA==,i=4096"))  # must not raise
    failure_of(ready)
    assert_closed(conn, t, listener, "login failed")


def test_error_response_during_login_fails_with_sqlstate():
    conn, t = new_conn()
    conn.tls = True  # a cleartext password request is answered over TLS only
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(msg.auth_request(msg.AUTH_CLEARTEXT))
    t.clear()
    conn.dataReceived(msg.error_response("28P01", 'password authentication failed for user "bob"'))
    f = failure_of(ready, DatabaseError)
    assert f.value.sqlstate == "28P01"
    assert f.value.fields["S"] == "FATAL"
    assert "password authentication failed" in str(f.value)
    assert_closed(conn, t, listener, "password authentication failed")


def test_database_error_defaults():
    e = DatabaseError({})
    assert e.sqlstate == "XX000"
    assert str(e) == "database error"


def test_show_max_connections_error_fails_login():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(LOGIN_OK)
    t.clear()
    conn.dataReceived(msg.error_response("42501", "permission denied", severity="ERROR")
                      + msg.ready_for_query())
    assert failure_of(ready, DatabaseError).value.sqlstate == "42501"
    assert_closed(conn, t)


def test_non_numeric_max_connections_fails_login():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(LOGIN_OK)
    conn.dataReceived(show_result("lots"))
    failure_of(ready, ValueError)
    assert conn.state == "closed"


def test_init_query_runs_after_show_max_connections():
    conn, t = new_conn(init_query="SET search_path = app; SET statement_timeout = 5000")
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(LOGIN_OK)
    assert written(t) == [(b"Q", b"SHOW max_connections\0")]
    conn.dataReceived(show_result())
    assert written(t) == [(b"Q", b"SET search_path = app; SET statement_timeout = 5000\0")]
    assert not_fired(ready)
    assert conn.state == "initialising"
    conn.dataReceived(command_complete("SET") + command_complete("SET") + msg.ready_for_query())
    assert result_of(ready) is conn
    assert conn.state == "idle"


def test_blank_init_query_is_not_sent():
    conn, t = new_conn(init_query="   \n")
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(LOGIN_OK)
    t.clear()
    conn.dataReceived(show_result())
    assert result_of(ready) is conn
    assert t.value() == b""


def test_init_query_error_fails_login_and_closes():
    conn, t = new_conn(init_query="SET nonsense = 1")
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(LOGIN_OK)
    conn.dataReceived(show_result())
    t.clear()
    conn.dataReceived(msg.error_response("42704", 'unrecognized configuration parameter "nonsense"',
                                         severity="ERROR") + msg.ready_for_query())
    f = failure_of(ready, DatabaseError)
    assert f.value.sqlstate == "42704"
    assert_closed(conn, t, listener, "login failed")


def test_garbage_during_login_closes():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # 'H' then a length of 0x5454502f
    failure_of(ready, ProtocolViolation)
    assert_closed(conn, t, listener, "login failed")


@pytest.mark.parametrize("bad", [
    message(b"R", b"\0\0"),  # short authentication request
    message(b"K", b"\0\0\0\1"),  # short BackendKeyData
    message(b"S", b"TimeZone"),  # unterminated name
    b"R\0\0\0\x02",  # length below the header
])
def test_malformed_login_message_closes(bad):
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(bad)
    failure_of(ready, ProtocolViolation)
    assert_closed(conn, t, listener)


def test_connection_lost_during_login_fails_ready():
    conn, t = new_conn()
    conn.tls = True  # a cleartext password request is answered over TLS only
    take_startup(t)
    ready = conn.ready
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(msg.auth_request(msg.AUTH_CLEARTEXT))
    conn.connectionLost(Failure(ConnectionError("reset by peer")))
    f = failure_of(ready, BackendGone)
    assert "database closed the connection" in f.getErrorMessage()
    assert conn.state == "closed"
    assert len(listener.calls) == 1


def test_connection_lost_during_show_fails_ready():
    conn, t = new_conn()
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(LOGIN_OK)
    conn.connectionLost(Failure(ConnectionError("gone")))
    failure_of(ready, BackendGone)
    assert conn._op is None


def test_repr_names_target_user_and_state():
    conn, _ = logged_in()
    text = repr(conn)
    assert "db-1" in text and "bob@app" in text and "pid=4242" in text and "idle" in text
    assert PASSWORD not in text


# -- internal operations -------------------------------------------------------------------------------
def test_run_internal_collects_rows():
    conn, t = logged_in()
    d = conn.run_internal(b"SELECT a, b FROM t")
    assert written(t) == [(b"Q", b"SELECT a, b FROM t\0")]
    conn.dataReceived(row_description("a", "b") + data_row("x", None) + data_row("it's", "")
                      + command_complete("SELECT 2"))
    assert not_fired(d)
    conn.dataReceived(msg.ready_for_query(msg.IDLE))
    assert result_of(d) == [["x", None], ["it's", ""]]
    assert conn._op is None


def test_run_internal_no_rows():
    conn, t = logged_in()
    d = conn.run_internal(b"SET x = 1")
    conn.dataReceived(command_complete("SET") + msg.ready_for_query())
    assert result_of(d) == []


def test_run_internal_error_keeps_first_and_tracks_status():
    conn, t = logged_in()
    d = conn.run_internal(b"BEGIN; SELECT 1/0; SELECT 2")
    conn.dataReceived(command_complete("BEGIN")
                      + msg.error_response("22012", "division by zero", severity="ERROR")
                      + msg.error_response("25P02", "current transaction is aborted", severity="ERROR")
                      + msg.ready_for_query(msg.FAILED_TRANSACTION))
    f = failure_of(d, DatabaseError)
    assert f.value.sqlstate == "22012"
    assert conn.txn_status == b"E"
    assert conn.state == "idle"  # an error in an internal query does not close the connection
    # The next operation can run.
    d2 = conn.run_internal(b"ROLLBACK")
    conn.dataReceived(command_complete("ROLLBACK") + msg.ready_for_query(msg.IDLE))
    assert result_of(d2) == []
    assert conn.txn_status == b"I"


def test_one_internal_operation_at_a_time():
    conn, t = logged_in()
    d1 = conn.run_internal(b"SELECT 1")
    t.clear()
    d2 = conn.run_internal(b"SELECT 2")
    failure_of(d2, RuntimeError)
    assert t.value() == b""
    conn.dataReceived(data_row("1") + command_complete("SELECT 1") + msg.ready_for_query())
    assert result_of(d1) == [["1"]]


def test_parameter_status_during_internal_op_updates_server_params():
    conn, t = logged_in()
    d = conn.run_internal(b"SET TimeZone = 'Asia/Tokyo'")
    conn.dataReceived(command_complete("SET") + msg.parameter_status("TimeZone", "Asia/Tokyo")
                      + msg.ready_for_query())
    result_of(d)
    assert conn.server_params["TimeZone"] == "Asia/Tokyo"


def test_connection_lost_during_internal_op():
    conn, t = logged_in()
    listener = conn.pool_listener = PoolListener()
    d = conn.run_internal(b"SELECT pg_sleep(10)")
    conn.connectionLost(Failure(ConnectionError("gone")))
    f = failure_of(d, BackendGone)
    assert "database closed the connection" in f.getErrorMessage()
    assert len(listener.calls) == 1


def test_idle_connection_ignores_notice_and_closes_on_error():
    conn, t = logged_in()
    listener = conn.pool_listener = PoolListener()
    conn.dataReceived(notice("just saying"))
    assert conn.state == "idle"
    assert not t.disconnecting
    conn.dataReceived(msg.error_response("57P01", "terminating connection due to administrator command"))
    assert_closed(conn, t, listener, "terminating connection due to administrator command")


def test_internal_message_too_large_closes():
    conn, t = logged_in()
    conn.max_message_size = 1000
    listener = conn.pool_listener = PoolListener()
    d = conn.run_internal(b"SELECT repeat('x', 5000)")
    conn.dataReceived(data_row("x" * 5000))
    assert_closed(conn, t, listener, "protocol violation")
    conn.connectionLost(Failure(ConnectionError("closed")))
    failure_of(d, BackendGone)
    assert len(listener.calls) == 1


@pytest.mark.parametrize("bad_row", [
    message(b"D", b""),  # no column count
    message(b"D", struct.pack("!H", 2) + struct.pack("!i", 1) + b"x"),  # second column missing
    message(b"D", struct.pack("!Hi", 1, 50) + b"short"),  # column longer than the message
])
def test_malformed_data_row_in_internal_op_closes_without_raising(bad_row):
    conn, t = logged_in()
    listener = conn.pool_listener = PoolListener()
    d = conn.run_internal(b"SELECT 1")
    conn.dataReceived(bad_row)  # must not raise
    assert_closed(conn, t, listener, "protocol violation")
    conn.connectionLost(Failure(ConnectionError("closed")))
    failure_of(d, BackendGone)


def test_quote_literal():
    assert quote_literal("UTC") == "'UTC'"
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("''") == "''''''"
    assert quote_literal("") == "''"
    assert quote_literal("a\\b") == "'a\\b'"  # standard_conforming_strings: backslash is plain


def test_param_sync_sql_nothing_to_do():
    current = dict.fromkeys(SESSION_PARAMS)
    assert param_sync_sql(current, {}) == b""
    assert param_sync_sql({"TimeZone": "UTC"}, {"TimeZone": "UTC"}) == b""


def test_param_sync_sql_set_and_reset_in_a_fixed_order():
    current = {"application_name": "old", "TimeZone": "UTC", "DateStyle": None}
    desired = {"TimeZone": "Europe/Paris", "DateStyle": "ISO, DMY", "client_encoding": None,
               "extra_float_digits": "3", "application_name": None}
    assert param_sync_sql(current, desired) == (
        b"RESET application_name; SET DateStyle = 'ISO, DMY'; "
        b"SET TimeZone = 'Europe/Paris'; SET extra_float_digits = '3'")


def test_param_sync_sql_quotes_values():
    sql = param_sync_sql({}, {"application_name": "x'; DROP TABLE t; --"})
    assert sql == b"SET application_name = 'x''; DROP TABLE t; --'"


def test_param_sync_sql_ignores_unknown_names():
    assert param_sync_sql({}, {"search_path": "evil"}) == b""


def test_param_sync_sql_encodes_utf8():
    sql = param_sync_sql({}, {"application_name": "caf\u00e9"})
    assert sql == "SET application_name = 'caf\u00e9'".encode()


def test_sync_params_success_bookkeeping():
    conn, t = logged_in()
    desired = {"TimeZone": "Asia/Tokyo", "application_name": "web"}
    d = conn.sync_params(desired)
    assert written(t) == [(b"Q", b"SET application_name = 'web'; SET TimeZone = 'Asia/Tokyo'\0")]
    assert conn.client_params == dict.fromkeys(SESSION_PARAMS)  # not until the server agrees
    conn.dataReceived(command_complete("SET") + msg.parameter_status("application_name", "web")
                      + command_complete("SET") + msg.parameter_status("TimeZone", "Asia/Tokyo")
                      + msg.ready_for_query())
    result_of(d)
    assert conn.client_params == {**dict.fromkeys(SESSION_PARAMS), **desired}
    # Going back to the defaults resets exactly what was set.
    d = conn.sync_params({})
    assert written(t) == [(b"Q", b"RESET application_name; RESET TimeZone\0")]
    conn.dataReceived(command_complete("RESET") + command_complete("RESET") + msg.ready_for_query())
    result_of(d)
    assert conn.client_params == dict.fromkeys(SESSION_PARAMS)


def test_sync_params_nothing_to_do_sends_nothing():
    conn, t = logged_in()
    d = conn.sync_params({})
    assert result_of(d) is None
    assert t.value() == b""
    assert conn._op is None


def test_sync_params_failure_forgets_everything():
    conn, t = logged_in()
    d = conn.sync_params({"TimeZone": "Mars/Olympus", "application_name": "web"})
    conn.dataReceived(command_complete("SET")
                      + msg.error_response("22023", 'invalid value for parameter "TimeZone"',
                                           severity="ERROR")
                      + msg.ready_for_query())
    f = failure_of(d, DatabaseError)
    assert f.value.sqlstate == "22023"
    assert conn.client_params == dict.fromkeys(SESSION_PARAMS, "?")
    # Every value is sent again next time, including those equal to the defaults.
    d = conn.sync_params({"application_name": "web"})
    [(kind, sql)] = written(t)[-1:]
    assert kind == b"Q"
    assert sql == (b"SET application_name = 'web'; RESET client_encoding; RESET DateStyle; "
                   b"RESET TimeZone; RESET extra_float_digits\0")


def test_reset_clean_idle_connection_does_nothing():
    conn, t = logged_in()
    conn.client_params["TimeZone"] = "UTC"
    d = conn.reset()
    assert result_of(d) is None
    assert t.value() == b""
    assert conn.client_params["TimeZone"] == "UTC"  # kept: nothing was discarded


@pytest.mark.parametrize("status", [msg.IN_TRANSACTION, msg.FAILED_TRANSACTION])
def test_reset_rolls_back_an_open_transaction(status):
    conn, t = logged_in()
    conn.txn_status = status
    conn.client_params["TimeZone"] = "UTC"
    d = conn.reset()
    assert written(t) == [(b"Q", b"ROLLBACK\0")]
    assert not_fired(d)
    conn.dataReceived(command_complete("ROLLBACK") + msg.ready_for_query(msg.IDLE))
    result_of(d)
    assert conn.txn_status == b"I"
    assert t.value() == b""  # no DISCARD ALL: the session was not pinned
    assert conn.client_params["TimeZone"] == "UTC"


def test_reset_discards_a_dirty_session():
    conn, t = logged_in()
    conn.session_dirty = True
    conn.client_params.update(TimeZone="Asia/Tokyo", application_name="web")
    d = conn.reset()
    assert written(t) == [(b"Q", b"DISCARD ALL\0")]
    conn.dataReceived(command_complete("DISCARD ALL") + msg.ready_for_query())
    result_of(d)
    assert conn.session_dirty is False
    assert conn.client_params == dict.fromkeys(SESSION_PARAMS)


def test_reset_rolls_back_then_discards():
    conn, t = logged_in()
    conn.txn_status = b"T"
    conn.session_dirty = True
    d = conn.reset()
    assert written(t) == [(b"Q", b"ROLLBACK\0")]  # DISCARD ALL waits for the ROLLBACK
    conn.dataReceived(command_complete("ROLLBACK") + msg.ready_for_query())
    assert written(t) == [(b"Q", b"DISCARD ALL\0")]
    assert not_fired(d)
    conn.dataReceived(command_complete("DISCARD ALL") + msg.ready_for_query())
    result_of(d)
    assert conn.session_dirty is False


def test_reset_failure_leaves_the_connection_marked_dirty():
    conn, t = logged_in()
    conn.txn_status = b"T"
    conn.session_dirty = True
    d = conn.reset()
    conn.dataReceived(msg.error_response("XX000", "boom", severity="ERROR") + msg.ready_for_query(b"E"))
    failure_of(d, DatabaseError)
    assert conn.session_dirty is True
    assert b"DISCARD" not in t.value()


def test_data_row_decoding():
    payload = data_row("1", None, "", "caf\u00e9")[5:]
    assert _data_row(payload) == ["1", None, "", "caf\u00e9"]
    assert _data_row(struct.pack("!H", 0)) == []
    # A non-UTF-8 value (a LATIN1 database, say) does not break the connection.
    assert _data_row(data_row(b"caf\xe9")[5:]) == ["caf\ufffd"]
    for bad in (b"", b"\0", struct.pack("!Hi", 1, 4) + b"abc"):
        with pytest.raises(ProtocolViolation):
            _data_row(bad)


def test_non_utf8_row_from_init_query_does_not_break_login():
    conn, t = new_conn(init_query="SELECT 'caf\u00e9'")
    take_startup(t)
    ready = conn.ready
    conn.dataReceived(LOGIN_OK + show_result())
    conn.dataReceived(data_row(b"caf\xe9") + command_complete("SELECT 1") + msg.ready_for_query())
    assert result_of(ready) is conn


# -- forwarding ----------------------------------------------------------------------------------------
RESULT = (row_description("id", "name")
          + b"".join(data_row(str(i), "row %d" % i) for i in range(50))
          + command_complete("SELECT 50")
          + msg.ready_for_query(msg.IDLE))


def test_attach_forwards_a_whole_result_unchanged():
    conn, t, sink, listener = lent()
    conn.dataReceived(RESULT)
    assert sink.events == [("data", RESULT), ("ready", b"I")]
    assert conn.txn_status == b"I"
    assert t.value() == b""


def test_write_goes_to_the_database():
    conn, t, sink, listener = lent()
    conn.write(msg.query("SELECT 1"))
    assert t.value() == msg.query("SELECT 1")


def test_forwarding_one_byte_at_a_time():
    conn, t, sink, listener = lent()
    for i in range(len(RESULT)):
        conn.dataReceived(RESULT[i:i + 1])
    assert sink.data == RESULT
    assert sink.of("ready") == [(b"I",)]
    assert sink.events[-1] == ("ready", b"I")


@pytest.mark.parametrize("seed", range(20))
def test_forwarding_random_chunks(seed):
    rnd = random.Random(seed)
    stream = (msg.parameter_status("TimeZone", "UTC") + RESULT
              + command_complete("BEGIN") + msg.ready_for_query(msg.IN_TRANSACTION)
              + data_row("x" * 3000) + notice("n") + msg.ready_for_query(msg.FAILED_TRANSACTION)
              + msg.parameter_status("application_name", "a") + RESULT)
    conn, t, sink, listener = lent()
    pos = 0
    while pos < len(stream):
        step = rnd.choice([1, 2, 3, 4, 5, 6, 7, rnd.randint(1, 200), rnd.randint(1, 5000)])
        conn.dataReceived(stream[pos:pos + step])
        pos += step
    assert sink.data == stream
    assert sink.of("ready") == [(b"I",), (b"T",), (b"E",), (b"I",)]
    assert sink.of("param") == [("TimeZone", "UTC"), ("application_name", "a")]
    assert conn.txn_status == b"I"
    assert not t.disconnecting
    # Every ReadyForQuery is announced only once the bytes up to and including it were forwarded.
    delivered = 0
    zs = [i for i in range(len(stream)) if stream.startswith(b"Z\0\0\0\x05", i)]
    n = 0
    for event in sink.events:
        if event[0] == "data":
            delivered += len(event[1])
        elif event[0] == "ready":
            assert delivered == zs[n] + 6
            n += 1


def test_several_ready_for_query_in_one_chunk():
    conn, t, sink, listener = lent()
    one = command_complete("BEGIN") + msg.ready_for_query(b"T")
    two = command_complete("INSERT 0 1") + msg.ready_for_query(b"T")
    three = msg.error_response("23505", "duplicate", severity="ERROR") + msg.ready_for_query(b"E")
    four = command_complete("ROLLBACK") + msg.ready_for_query(b"I")
    conn.dataReceived(one + two + three + four)
    assert sink.events == [("data", one), ("ready", b"T"), ("data", two), ("ready", b"T"),
                           ("data", three), ("ready", b"E"), ("data", four), ("ready", b"I")]


def test_data_after_the_last_ready_for_query_is_forwarded_too():
    conn, t, sink, listener = lent()
    head = command_complete("SELECT 0") + msg.ready_for_query()
    tail = notice("async")
    conn.dataReceived(head + tail)
    assert sink.events == [("data", head), ("ready", b"I"), ("data", tail)]


@pytest.mark.parametrize("split", range(1, 6))
def test_ready_for_query_split_across_chunks(split):
    conn, t, sink, listener = lent()
    stream = command_complete("SELECT 1") + msg.ready_for_query(b"T")
    cut = len(stream) - 6 + split
    conn.dataReceived(stream[:cut])
    assert sink.of("ready") == []
    conn.dataReceived(stream[cut:])
    assert sink.data == stream
    assert sink.of("ready") == [(b"T",)]
    assert conn.txn_status == b"T"


def test_huge_data_row_is_forwarded_progressively():
    conn, t, sink, listener = lent()
    row = data_row(b"x" * (1 << 20))
    stream = row + command_complete("SELECT 1") + msg.ready_for_query()
    chunk = 64 * 1024
    fed = 0
    for pos in range(0, len(stream), chunk):
        piece = stream[pos:pos + chunk]
        conn.dataReceived(piece)
        fed += len(piece)
        if fed < len(row):
            # Everything fed so far reached the client: nothing is held back waiting for the row.
            assert len(sink.data) == fed
    assert sink.data == stream
    assert sink.of("ready") == [(b"I",)]
    assert conn._scanner.at_boundary
    # No chunk was copied into one big buffer: each delivery is at most a chunk (plus a header).
    assert max(len(e[1]) for e in sink.events if e[0] == "data") <= chunk + 5


def test_huge_data_row_larger_than_max_message_size_is_forwarded():
    conn, t, sink, listener = lent()
    conn.max_message_size = 1024
    stream = data_row(b"y" * 100000) + command_complete("SELECT 1") + msg.ready_for_query()
    for pos in range(0, len(stream), 4096):
        conn.dataReceived(stream[pos:pos + 4096])
    assert sink.data == stream
    assert not t.disconnecting


def test_parameter_status_while_lent():
    conn, t, sink, listener = lent()
    stream = (command_complete("SET") + msg.parameter_status("TimeZone", "America/New_York")
              + msg.parameter_status("is_superuser", "off") + msg.ready_for_query())
    conn.dataReceived(stream)
    assert conn.server_params["TimeZone"] == "America/New_York"
    assert conn.client_params["TimeZone"] == "America/New_York"
    assert conn.server_params["is_superuser"] == "off"
    assert "is_superuser" not in conn.client_params
    assert sink.of("param") == [("TimeZone", "America/New_York")]
    assert sink.data == stream  # ParameterStatus is forwarded, not swallowed
    assert sink.of("ready") == [(b"I",)]


def test_parameter_status_split_across_chunks_while_lent():
    conn, t, sink, listener = lent()
    stream = msg.parameter_status("application_name", "reporting") + msg.ready_for_query()
    for cut in range(1, len(stream)):
        conn2, t2, sink2, _ = lent()
        conn2.dataReceived(stream[:cut])
        conn2.dataReceived(stream[cut:])
        assert sink2.data == stream
        assert sink2.of("param") == [("application_name", "reporting")]
        assert conn2.client_params["application_name"] == "reporting"


class DetachingSink(Sink):
    def __init__(self, conn):
        super().__init__()
        self.conn = conn

    def ready_for_query(self, status):
        super().ready_for_query(status)
        self.conn.detach()
        self.conn.state = "idle"


def test_detach_in_ready_for_query_leaves_the_rest_as_idle_traffic():
    conn, t = logged_in()
    listener = conn.pool_listener = PoolListener()
    sink = DetachingSink(conn)
    conn.attach(sink)
    head = command_complete("SELECT 1") + msg.ready_for_query()
    conn.dataReceived(head + notice("later"))
    assert sink.events == [("data", head), ("ready", b"I")]
    assert conn.state == "idle"
    assert not t.disconnecting
    assert listener.calls == []


def test_detach_in_ready_for_query_then_fatal_error_closes():
    conn, t = logged_in()
    listener = conn.pool_listener = PoolListener()
    sink = DetachingSink(conn)
    conn.attach(sink)
    head = command_complete("SELECT 1") + msg.ready_for_query()
    fatal = msg.error_response("57P01", "terminating connection due to administrator command")
    conn.dataReceived(head + fatal)
    assert sink.events == [("data", head), ("ready", b"I")]
    assert_closed(conn, t, listener, "terminating connection due to administrator command")


def test_detach_in_ready_for_query_with_a_partial_message_after_it():
    conn, t = logged_in()
    listener = conn.pool_listener = PoolListener()
    sink = DetachingSink(conn)
    conn.attach(sink)
    head = command_complete("SELECT 1") + msg.ready_for_query()
    fatal = msg.error_response("57P01", "terminating connection")
    conn.dataReceived(head + fatal[:7])
    assert conn.state == "idle"
    conn.dataReceived(fatal[7:])
    assert sink.data == head
    assert_closed(conn, t, listener, "terminating connection")


def test_detach_then_internal_op_reads_whole_messages():
    conn, t, sink, listener = lent()
    conn.dataReceived(command_complete("BEGIN") + msg.ready_for_query(b"T"))
    conn.detach()
    conn.state = "resetting"
    d = conn.reset()
    assert written(t) == [(b"Q", b"ROLLBACK\0")]
    conn.dataReceived(command_complete("ROLLBACK") + msg.ready_for_query())
    result_of(d)
    assert len(sink.events) == 2  # nothing more went to the old sink


def test_attach_in_a_callback_of_an_internal_op_forwards_the_rest_of_the_chunk():
    """sync_params fires on ReadyForQuery and the session attaches at once (pg_frontend does):
    whatever followed in the same chunk belongs to the session, not to the floor."""
    conn, t = logged_in()
    sink = Sink()
    d = conn.sync_params({"TimeZone": "Asia/Tokyo"})
    d.addCallback(lambda _: conn.attach(sink))
    tail = notice("after the SET")
    partial = msg.parameter_status("application_name", "x")
    conn.dataReceived(command_complete("SET") + msg.parameter_status("TimeZone", "Asia/Tokyo")
                      + msg.ready_for_query() + tail + partial[:6])
    assert conn._sink is sink
    conn.dataReceived(partial[6:] + msg.ready_for_query())
    assert sink.data == tail + partial + msg.ready_for_query()
    assert sink.of("param") == [("application_name", "x")]
    assert sink.of("ready") == [(b"I",)]


# -- bad input while lent ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    b"D\0\0\0\x03",  # length below the header
    b"D\0\0\0\x00",
    b"Z\xff\xff\xff\xff\x49",  # absurd ReadyForQuery length
    b"Z\x00\x10\x00\x00",
    b"S\x7f\xff\xff\xff",  # absurd ParameterStatus length
    message(b"S", b"TimeZone\0UTC"),  # unterminated value
])
def test_bad_server_input_while_lent_closes(bad):
    conn, t, sink, listener = lent()
    conn.dataReceived(command_complete("SELECT 1") + bad)  # must not raise
    assert_closed(conn, t, listener, "protocol violation from the database")
    assert sink.of("ready") == []
    # The transport then reports the loss: the session hears why, the pool is not told twice.
    conn.connectionLost(Failure(ConnectionError("closed")))
    [(lost_conn, why)] = sink.of("lost")
    assert lost_conn is conn
    assert "protocol violation" in why
    assert len(listener.calls) == 1


def test_bad_length_split_across_chunks_while_lent_closes():
    conn, t, sink, listener = lent()
    conn.dataReceived(b"Z\xff")
    assert not t.disconnecting
    conn.dataReceived(b"\xff\xff\xff")
    assert_closed(conn, t, listener, "protocol violation")


def test_close_is_idempotent():
    conn, t, sink, listener = lent()
    conn.close("first")
    conn.close("second")
    assert t.value().count(msg.TERMINATE) == 1
    assert listener.calls == [(conn, "first")]


# -- connectionLost while lent -------------------------------------------------------------------------
def test_connection_lost_while_lent():
    conn, t, sink, listener = lent()
    conn.dataReceived(row_description("a") + data_row("1")[:4])
    conn.connectionLost(Failure(ConnectionError("Connection reset by peer")))
    assert conn.state == "closed"
    [(lost_conn, why)] = sink.of("lost")
    assert lost_conn is conn
    assert "database closed the connection" in why
    assert "reset by peer" in why
    assert listener.calls == [(conn, why)]
    assert conn._sink is None


TERMINATING = msg.error_response("57P01", "terminating connection due to administrator command")


def test_fatal_error_while_lent_is_forwarded_and_remembered():
    conn, t, sink, listener = lent()
    conn.dataReceived(row_description("pg_sleep") + TERMINATING)
    assert sink.data == row_description("pg_sleep") + TERMINATING
    assert conn.fatal_error["C"] == "57P01"
    conn.connectionLost(Failure(ConnectionError("Connection was closed cleanly.")))
    [(lost_conn, why)] = sink.of("lost")
    assert why == "database ended the session: terminating connection due to administrator command"
    assert listener.calls == [(conn, why)]


def test_fatal_error_split_byte_by_byte_is_forwarded_and_remembered():
    conn, t, sink, listener = lent()
    for i in range(len(TERMINATING)):
        conn.dataReceived(TERMINATING[i:i + 1])
    assert sink.data == TERMINATING
    assert conn.fatal_error["M"] == "terminating connection due to administrator command"


@pytest.mark.parametrize("severity", ["ERROR", "WARNING"])
def test_non_fatal_error_is_not_the_servers_last_word(severity):
    conn, t, sink, listener = lent()
    stream = msg.error_response("22012", "division by zero", severity=severity) + msg.ready_for_query()
    conn.dataReceived(stream)
    assert sink.data == stream
    assert sink.of("ready") == [(b"I",)]
    assert conn.fatal_error is None
    conn.connectionLost(Failure(ConnectionError("reset by peer")))
    [(_, why)] = sink.of("lost")
    assert why.startswith("database closed the connection")


def test_error_response_with_a_lying_length_while_lent_closes():
    conn, t, sink, listener = lent()
    conn.max_message_size = 1024
    conn.dataReceived(b"E\0\x10\0\0" + b"x" * 100)
    assert_closed(conn, t, listener, "protocol violation from the database")


def test_connection_lost_after_close_reports_the_close_reason():
    conn, t, sink, listener = lent()
    conn.close("failover")
    conn.connectionLost(Failure(ConnectionError("closed")))
    assert sink.of("lost") == [(conn, "failover")]
    assert listener.calls == [(conn, "failover")]


def test_connection_lost_when_idle_tells_only_the_pool():
    conn, t = logged_in()
    listener = conn.pool_listener = PoolListener()
    conn.connectionLost(Failure(ConnectionError("gone")))
    assert len(listener.calls) == 1
    assert conn.state == "closed"


def test_ready_for_query_without_its_status_byte_is_a_protocol_violation():
    """A ReadyForQuery whose length leaves out the status must not read the next message's byte."""
    from txrdsproxy.wire.pg.framing import message as _message

    class Sink:
        def __init__(self):
            self.data, self.ready, self.lost = [], [], []

        def backend_data(self, data):
            self.data.append(data)

        def ready_for_query(self, status):
            self.ready.append(status)

        def parameter_changed(self, name, value):
            pass

        def backend_lost(self, conn, why):
            self.lost.append(why)

    from twisted.internet.testing import StringTransport
    from txrdsproxy.proxy.pg_backend import PgBackendConnection
    conn = PgBackendConnection(("u", "d"), None, None, "", 1 << 20)
    conn.makeConnection(StringTransport())
    conn.state = "borrowed"
    reasons = []
    conn.pool_listener = lambda c, why: reasons.append(why)
    sink = Sink()
    conn.attach(sink)
    conn.dataReceived(b"Z\0\0\0\x04" + _message(b"C", b"SELECT 1\0"))
    assert sink.ready == []
    assert conn.state == "closed" and "ReadyForQuery" in reasons[0]


# -- replies that look like they end with a ReadyForQuery ------------------------------------------------
def test_ready_for_query_lookalike_ending_a_data_row_is_not_a_reply():
    """A DataRow whose value ends with the bytes of a ReadyForQuery: neither when the row's tail
    comes in a read of its own (the scanner is mid-message) nor when the row is the whole read."""
    lookalike = b"Z\0\0\0\x05I"
    row = data_row(b"v" * 40 + lookalike)
    for first, second in [(row[:-6], row[-6:]), (row[:-7], row[-7:]), (b"", row)]:
        conn, t, sink, listener = lent()
        if first:
            conn.dataReceived(first)
        conn.dataReceived(second)
        assert sink.of("ready") == []
        assert sink.data == row
        tail = command_complete("SELECT 1") + msg.ready_for_query(b"T")
        conn.dataReceived(tail)
        assert sink.of("ready") == [(b"T",)]
        assert sink.data == row + tail


def test_bad_length_before_the_ready_for_query_still_closes():
    conn, t, sink, listener = lent()
    conn.dataReceived(b"C\0\0\0\x02" + msg.ready_for_query())
    assert t.disconnecting
    assert sink.of("ready") == []
