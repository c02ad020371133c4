"""wire/pg/client_login.py: a client's StartupMessage and password exchange, byte for byte,
without Twisted (the Twisted side is tested in test_pg_frontend.py)."""

import base64
import hashlib
import hmac
import struct

import pytest

from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.wire.pg.auth import ScramClient, ScramVerifier
from txrdsproxy.wire.pg.client_login import (
    SESSION_PARAMS, AuthStep, PasswordExchange, StartupRefused, read_startup,
)
from txrdsproxy.wire.pg.framing import ProtocolViolation

V30, V32 = 196608, 196610
USER, PASSWORD = "bob", "s3cret"


def body(*pairs):
    return b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in pairs) + b"\0"


def error_of(encoded):
    """(severity, code, text) of an encoded ErrorResponse, checking its framing."""
    assert encoded[:1] == b"E"
    (length,) = struct.unpack_from("!I", encoded, 1)
    assert length == len(encoded) - 1
    fields = dict((f[:1].decode(), f[1:].decode()) for f in encoded[5:-1].split(b"\0") if f)
    return fields["S"], fields["C"], fields["M"]


# -- StartupMessage ---------------------------------------------------------------------------------
def test_plain_startup():
    r = read_startup(V30, body(("user", "bob"), ("database", "app"), ("application_name", "psql")))
    assert (r.user, r.database, r.negotiate) == ("bob", "app", b"")
    assert r.desired == dict.fromkeys(SESSION_PARAMS) | {"application_name": "psql"}


def test_database_defaults_to_the_user_and_names_are_case_insensitive():
    r = read_startup(V30, body(("user", "bob"), ("TIMEZONE", "UTC"), ("datestyle", "ISO")))
    assert r.database == "bob"
    assert r.desired["TimeZone"] == "UTC" and r.desired["DateStyle"] == "ISO"


def test_newer_minor_version_and_protocol_options_are_negotiated():
    r = read_startup(V32, body(("user", "bob"), ("_pq_.compression", "on")))
    opts = b"_pq_.compression\0"
    payload = struct.pack("!II", 0, 1) + opts
    assert r.negotiate == b"v" + struct.pack("!I", len(payload) + 4) + payload
    assert read_startup(V32, body(("user", "bob"))).negotiate == b"v\0\0\0\x0c\0\0\0\0\0\0\0\0"


@pytest.mark.parametrize("pairs,code,text", [
    ([("user", "bob"), ("replication", "database")], "0A000", "streaming replication"),
    ([("user", "bob"), ("replication", "TRUE")], "0A000", "streaming replication"),
    ([("database", "app")], "28000", "user name is missing"),
    ([("user", "")], "28000", "user name is missing"),
    ([("user", "bob"), ("options", "-c work_mem=1MB")], "0A000", "the option options"),
])
def test_refused_startups(pairs, code, text):
    with pytest.raises(StartupRefused) as e:
        read_startup(V30, body(*pairs))
    severity, got_code, message = error_of(e.value.error)
    assert (severity, got_code) == ("FATAL", code) and text in message


def test_refusal_after_a_negotiation_carries_it_first():
    with pytest.raises(StartupRefused) as e:
        read_startup(V32, body(("database", "app")))
    assert e.value.error.startswith(b"v\0\0\0\x0c")
    assert error_of(e.value.error[13:])[1] == "28000"


@pytest.mark.parametrize("replication", ["false", "off", "no", "0", "OFF"])
def test_replication_off_is_accepted(replication):
    assert read_startup(V30, body(("user", "bob"), ("replication", replication))).user == "bob"


def test_non_utf8_parameters_are_a_violation():
    with pytest.raises(ProtocolViolation):
        read_startup(V30, b"user\0\xff\xfe\0\0")


# -- md5 ----------------------------------------------------------------------------------------------
def md5_password(salt, password=PASSWORD):
    inner = hashlib.md5(password.encode() + USER.encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\0"


def test_md5_request_and_right_password():
    x = PasswordExchange("md5", Credentials(USER, PASSWORD, "arn"), salt=b"\x0a\x0b\x0c\x0d")
    assert x.start() == b"R\0\0\0\x0c\0\0\0\x05\x0a\x0b\x0c\x0d"
    assert x.receive(md5_password(b"\x0a\x0b\x0c\x0d")) == (b"", AuthStep.OK)


@pytest.mark.parametrize("payload", [md5_password(b"\x0a\x0b\x0c\x0d", "wrong"),
                                     md5_password(b"zzzz"), b"", b"md5", b"\0" * 40])
def test_md5_wrong_answers_fail(payload):
    x = PasswordExchange("md5", Credentials(USER, PASSWORD, "arn"), salt=b"\x0a\x0b\x0c\x0d")
    assert x.receive(payload) == (b"", AuthStep.FAILED)


# -- SCRAM-SHA-256 -------------------------------------------------------------------------------------
def sasl_initial(mech, data):
    return mech + b"\0" + struct.pack("!i", len(data)) + data


def scram(password=PASSWORD):
    return PasswordExchange("scram", verifier=ScramVerifier.from_password(PASSWORD)), ScramClient(USER, password)


def test_scram_request_bytes():
    x, _ = scram()
    assert x.start() == b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"


def test_scram_right_password():
    x, client = scram()
    answer, step = x.receive(sasl_initial(b"SCRAM-SHA-256", client.client_first()))
    assert step is AuthStep.CONTINUE and answer[:9] == b"R" + struct.pack("!I", len(answer) - 1) + b"\0\0\0\x0b"
    final, step = x.receive(client.server_first(answer[9:]))
    assert step is AuthStep.OK and final[5:9] == b"\0\0\0\x0c"
    client.server_final(final[9:])  # the client accepts the server's signature
    assert client.verified


def test_scram_wrong_password_fails_at_the_final_message():
    x, client = scram("wrong")
    answer, _ = x.receive(sasl_initial(b"SCRAM-SHA-256", client.client_first()))
    assert x.receive(client.server_first(answer[9:])) == (b"", AuthStep.FAILED)


def test_scram_other_mechanism_or_extra_messages_fail():
    x, client = scram()
    assert x.receive(sasl_initial(b"SCRAM-SHA-1", client.client_first()))[1] is AuthStep.FAILED
    x, client = scram()
    answer, _ = x.receive(sasl_initial(b"SCRAM-SHA-256", client.client_first()))
    x.receive(client.server_first(answer[9:]))
    assert x.receive(b"c=biws,r=x,p=y")[1] is AuthStep.FAILED


def test_scram_proof_is_checked_not_just_its_shape():
    x, client = scram()
    answer, _ = x.receive(sasl_initial(b"SCRAM-SHA-256", client.client_first()))
    final = client.server_first(answer[9:])
    without_proof, proof = final.rsplit(b",p=", 1)
    forged = base64.b64encode(hmac.new(b"k", b"m", "sha256").digest())
    assert forged != proof
    assert x.receive(without_proof + b",p=" + forged) == (b"", AuthStep.FAILED)


# -- cleartext (IAM tokens) ---------------------------------------------------------------------------
def test_cleartext_hands_the_token_back():
    x = PasswordExchange("cleartext")
    assert x.start() == b"R\0\0\0\x08\0\0\0\x03"
    assert x.receive(b"host:5432/?Action=connect&X-Amz-Signature=ab\0") == (b"", AuthStep.TOKEN)
    assert x.token == "host:5432/?Action=connect&X-Amz-Signature=ab"


def test_unknown_method():
    with pytest.raises(ValueError):
        PasswordExchange("gss")
