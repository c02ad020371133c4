"""The PostgreSQL session feeds the classifier what decides lexing: the attached connection's
standard_conforming_strings, the client encoding (startup packet and ParameterStatus), and
FunctionCall messages (functions called by OID)."""

import struct

import pytest

from test_pg_frontend import PASSWORD, USER, Harness  # shared harness (tests/unit, no package)
from txrdsproxy.proxy.session import SessionState
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.auth import md5_response

# Hidden in a string when standard_conforming_strings is on; LISTEN runs when it is off.
HIDDEN_UNLESS_OFF = "SELECT 'x\\''; LISTEN c; --'"
UTF8_PARAMS = {"client_encoding": "UTF8", "TimeZone": "UTC", "application_name": ""}


@pytest.fixture
def s():
    harness = Harness()
    harness.login()
    return harness


@pytest.mark.parametrize("scs,pinned", [("on", False), ("off", True)])
def test_classifier_reads_the_connections_standard_conforming_strings(s, scs, pinned):
    s.send(msg.query(HIDDEN_UNLESS_OFF))
    lease = s.pool.give(server_params=dict(UTF8_PARAMS, standard_conforming_strings=scs))
    s.frontend.ready_for_query(b"I")
    assert (s.frontend.pin_reason is not None) is pinned
    assert lease.released is (not pinned)
    if pinned:
        assert s.ctx.pin_counts == {"listen": 1}


def test_unknown_standard_conforming_strings_pins_if_either_reading_would(s):
    s.send(msg.query(HIDDEN_UNLESS_OFF))
    lease = s.pool.give(server_params=dict(UTF8_PARAMS))  # the server never said
    s.frontend.ready_for_query(b"I")
    assert s.frontend.pin_reason is not None
    assert not lease.released


def function_call(oid):
    body = struct.pack("!IhhhI", oid, 0, 1, 4, 1) + b"\0\0\0\x01" + struct.pack("!h", 0)
    return b"F" + struct.pack("!I", len(body) + 4) + body


def test_function_call_by_oid_pins(s):
    s.send(function_call(2078))  # set_config
    lease = s.pool.give()
    s.frontend.ready_for_query(b"I")
    assert s.ctx.pin_counts == {"function_call": 1}
    assert s.frontend.state is SessionState.PINNED
    assert not lease.released


def test_large_object_function_call_does_not_pin(s):
    s.send(function_call(952))  # lo_open
    lease = s.pool.give()
    s.frontend.ready_for_query(b"I")
    assert s.frontend.pin_reason is None
    assert lease.released


def test_unlexable_client_encoding_at_startup_pins_from_the_start():
    h = Harness()
    h.startup(user=USER, database="app", client_encoding="SJIS")
    [(kind, payload)] = h.messages()
    h.send(msg.password_message(md5_response(USER, PASSWORD, payload[4:8])))
    h.pool.give()
    assert h.messages()[-1] == (b"Z", b"I")
    assert h.frontend.pin_reason is not None
    assert h.ctx.pin_counts == {"client_encoding": 1}
    h.send(msg.query("SELECT 1"))
    lease = h.pool.give()
    assert h.frontend.state is SessionState.PINNED
    h.frontend.ready_for_query(b"I")
    assert not lease.released


def test_safe_client_encoding_at_startup_does_not_pin():
    h = Harness()
    h.startup(user=USER, database="app", client_encoding="LATIN1")
    [(kind, payload)] = h.messages()
    h.send(msg.password_message(md5_response(USER, PASSWORD, payload[4:8])))
    h.pool.give()
    assert h.frontend.pin_reason is None


def test_client_encoding_switched_by_the_server_pins_before_the_ready_for_query(s):
    s.send(msg.query("SELECT f()"))  # a function that sets client_encoding: not visible in SQL
    lease = s.pool.give()
    s.frontend.parameter_changed("client_encoding", "BIG5")
    assert s.frontend.state is SessionState.PINNED
    s.frontend.ready_for_query(b"I")
    assert not lease.released
    assert s.ctx.pin_counts == {"client_encoding": 1}
