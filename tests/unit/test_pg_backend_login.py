"""wire/pg/backend_login.py: the proxy's own login to PostgreSQL, byte for byte, without Twisted.

The server side is played with bytes built by hand (struct) and a real ScramServer; every answer
the machine gives is compared with the exact bytes libpq would send.
"""

import hashlib
import struct

import pytest

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.wire.pg.auth import AuthError, ScramServer, ScramVerifier
from txrdsproxy.wire.pg.backend_login import CLEARTEXT_REFUSED, BackendLogin, LoginStep
from txrdsproxy.wire.pg.framing import ProtocolViolation

USER, PASSWORD, DB = "bob", "s3cret", "app"
R, S, K, E, Z, N = (ord(c) for c in "RSKEZN")


def creds(password=PASSWORD):
    return Credentials(USER, password, "arn:x")


def auth(code, data=b""):
    return struct.pack("!I", code) + data


def password_message(data):
    return b"p" + struct.pack("!I", len(data) + 5) + data + b"\0"


def login(credentials=None, cleartext_allowed=False):
    machine = BackendLogin(USER, DB, credentials if credentials is not None else creds(), cleartext_allowed)
    return machine


def finish(machine):
    """AuthenticationOk, two parameters, key data, ReadyForQuery (idle)."""
    assert machine.message(R, auth(0)) == b""
    assert machine.step is LoginStep.AUTHENTICATED
    assert machine.message(S, b"server_version\x0015.4\0") == b""
    assert machine.message(S, b"TimeZone\0UTC\0") == b""
    assert machine.message(K, struct.pack("!II", 4242, 0xDEADBEEF)) == b""
    assert machine.message(N, b"SWARNING\0Mhello\0\0") == b""  # notices are ignored
    assert machine.message(Z, b"I") == b""
    assert machine.step is LoginStep.READY and machine.done
    assert machine.server_params == {"server_version": "15.4", "TimeZone": "UTC"}
    assert (machine.backend_pid, machine.backend_secret) == (4242, 0xDEADBEEF)
    assert machine.txn_status == b"I"


def test_startup_message_bytes():
    machine = login()
    body = struct.pack("!I", 196608) + b"user\0bob\0database\0app\0\0"
    assert machine.startup() == struct.pack("!I", len(body) + 4) + body
    assert machine.step is LoginStep.AUTHENTICATING


def test_trust_login():
    machine = login()
    machine.startup()
    finish(machine)


def test_md5_answer_is_libpq_s():
    machine = login()
    machine.startup()
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(PASSWORD.encode() + USER.encode()).hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert machine.message(R, auth(5, salt)) == password_message(expected)
    finish(machine)


def test_cleartext_only_when_allowed():
    machine = login()
    machine.startup()
    with pytest.raises(ProtocolViolation, match="cleartext password"):
        machine.message(R, auth(3))
    assert "cleartext" in CLEARTEXT_REFUSED
    machine = login(cleartext_allowed=True)
    machine.startup()
    assert machine.message(R, auth(3)) == password_message(PASSWORD.encode())
    finish(machine)


def _scram_exchange(machine, server):
    first = machine.message(R, auth(10, b"SCRAM-SHA-256\0\0"))
    assert first[:1] == b"p"
    (length,) = struct.unpack_from("!I", first, 1)
    assert length == len(first) - 1
    mech, rest = first[5:].split(b"\0", 1)
    assert mech == b"SCRAM-SHA-256"
    (n,) = struct.unpack_from("!i", rest)
    client_first = rest[4:4 + n]
    assert client_first.startswith(b"n,,n=,r=")  # libpq leaves the user to the StartupMessage
    server_first = server.client_first(client_first)
    final = machine.message(R, auth(11, server_first))
    assert final[:1] == b"p"
    return server.client_final(final[5:])


def test_scram_against_a_real_server():
    machine = login()
    machine.startup()
    server = ScramServer(ScramVerifier.from_password(PASSWORD))
    server_final = _scram_exchange(machine, server)
    assert machine.message(R, auth(12, server_final)) == b""
    finish(machine)


def test_authentication_ok_before_the_server_signature_is_refused():
    machine = login()
    machine.startup()
    server = ScramServer(ScramVerifier.from_password(PASSWORD))
    _scram_exchange(machine, server)
    with pytest.raises(ProtocolViolation, match="signature"):
        machine.message(R, auth(0))


def test_bad_server_signature():
    machine = login()
    machine.startup()
    server = ScramServer(ScramVerifier.from_password(PASSWORD))
    _scram_exchange(machine, server)
    with pytest.raises(AuthError):
        machine.message(R, auth(12, b"v=" + b"A" * 44))


def test_sasl_without_scram_sha_256():
    machine = login()
    machine.startup()
    with pytest.raises(ProtocolViolation, match="no supported SASL"):
        machine.message(R, auth(10, b"SCRAM-SHA-1\0\0"))


@pytest.mark.parametrize("code", [11, 12])
def test_sasl_continuation_without_sasl(code):
    machine = login()
    machine.startup()
    with pytest.raises(ProtocolViolation, match="without a SASL exchange"):
        machine.message(R, auth(code, b"x"))


@pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 99])
def test_unsupported_requests(code):
    machine = login()
    machine.startup()
    with pytest.raises(ProtocolViolation, match="unsupported authentication request"):
        machine.message(R, auth(code))


@pytest.mark.parametrize("code", [3, 5, 10])
def test_a_password_request_without_credentials(code):
    machine = BackendLogin(USER, DB, None, cleartext_allowed=True)
    machine.startup()
    with pytest.raises(ProtocolViolation, match="has none"):
        machine.message(R, auth(code, b"SCRAM-SHA-256\0\0" if code == 10 else b"salt"))


def test_error_response_fails_the_login_with_its_fields():
    machine = login()
    machine.startup()
    assert machine.message(E, b"SFATAL\0C28P01\0Mpassword authentication failed\0\0") == b""
    assert machine.step is LoginStep.FAILED and machine.done
    assert machine.error["C"] == "28P01"
    with pytest.raises(ProtocolViolation):
        machine.message(Z, b"I")


@pytest.mark.parametrize("script", [
    [(Z, b"I")],  # ReadyForQuery before AuthenticationOk
    [(R, auth(0)), (R, auth(5, b"salt"))],  # a password request after AuthenticationOk
    [(R, auth(0)), (Z, b"")],  # ReadyForQuery without its status
    [(R, auth(0)), (Z, b"II")],
    [(R, auth(0)), (Z, b"I"), (S, b"a\0b\0")],  # anything after the login
])
def test_out_of_order_messages_are_violations(script):
    machine = login()
    machine.startup()
    *before, last = script
    for kind, body in before:
        machine.message(kind, body)
    with pytest.raises(ProtocolViolation):
        machine.message(*last)


def test_messages_before_the_startup_are_violations():
    with pytest.raises(ProtocolViolation):
        login().message(R, auth(0))
