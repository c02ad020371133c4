"""Tests for txrdsproxy.wire.pg.auth: MD5 and SCRAM-SHA-256 maths, byte for byte."""

import base64
import hashlib

import pytest

from txrdsproxy.wire.pg import auth
from txrdsproxy.wire.pg.auth import (
    AuthError,
    ScramClient,
    ScramServer,
    ScramVerifier,
    md5_check,
    md5_password_hash,
    md5_response,
)

# RFC 7677 section 3 test vector.
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
FULL_NONCE = RFC_CLIENT_NONCE + RFC_SERVER_NONCE


@pytest.fixture(scope="module")
def rfc_verifier():
    return ScramVerifier.from_password(RFC_PASSWORD, RFC_SALT, 4096)


def rfc_server(verifier):
    return ScramServer(verifier, nonce=RFC_SERVER_NONCE)


def server_after_first(verifier, first=RFC_CLIENT_FIRST):
    server = rfc_server(verifier)
    server.client_first(first)
    return server


# --- MD5 -------------------------------------------------------------------------------


def test_md5_password_hash_known_literal():
    assert md5_password_hash("foo", "bar") == "md596948aad3fcae80c08a35c9b5958cd89"


def test_md5_password_hash_matches_definition():
    # pg stores "md5" followed by the hex MD5 of the password with the user name appended.
    expected = "md5" + hashlib.md5(b"secret" + b"postgres").hexdigest()
    assert md5_password_hash("postgres", "secret") == expected


def test_md5_response_matches_definition():
    salt = b"\x01\x02\x03\x04"
    inner_hex = hashlib.md5(b"secretpostgres").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner_hex + salt).hexdigest().encode()
    assert md5_response("postgres", "secret", salt) == expected
    assert len(expected) == 35 and not expected.endswith(b"\0")


def test_md5_check():
    salt = b"abcd"
    good = md5_response("foo", "bar", salt)
    assert md5_check("foo", "bar", salt, good)
    assert md5_check("foo", "bar", salt, good + b"\0")
    assert not md5_check("foo", "baz", salt, good)
    assert not md5_check("foo", "bar", b"abce", good)
    assert not md5_check("foo", "bar", salt, b"")
    assert not md5_check("foo", "bar", salt, b"\xff\xfe garbage")


# --- verifier --------------------------------------------------------------------------


def test_verifier_rfc_keys(rfc_verifier):
    assert rfc_verifier.to_text() == (
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"
        "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
        "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
    )


def test_verifier_parse_round_trips(rfc_verifier):
    parsed = ScramVerifier.parse(rfc_verifier.to_text())
    assert parsed == rfc_verifier
    assert parsed.salt == RFC_SALT and parsed.iterations == 4096


def test_verifier_parse_pg_stored_form_matches_from_password():
    salt = b"0123456789abcdef"
    stored = ScramVerifier.from_password("s3cret", salt, 1000).to_text()
    assert stored.startswith("SCRAM-SHA-256$1000:MDEyMzQ1Njc4OWFiY2RlZg==$")
    assert ScramVerifier.parse(stored) == ScramVerifier.from_password("s3cret", salt, 1000)


def test_verifier_repr_hides_keys(rfc_verifier):
    text = repr(rfc_verifier)
    assert "4096" in text
    for key in (rfc_verifier.stored_key, rfc_verifier.server_key):
        assert base64.b64encode(key).decode() not in text
        assert repr(key) not in text


def test_verifier_random_salt():
    a = ScramVerifier.from_password("x", iterations=1)
    b = ScramVerifier.from_password("x", iterations=1)
    assert len(a.salt) == 16 and a.salt != b.salt


def test_verifier_saslprep_lite():
    salt = b"saltsalt"
    # NFKC maps the non-breaking space to a space and the "fi" ligature to "fi".
    assert ScramVerifier.from_password("a\u00a0b", salt, 1) == ScramVerifier.from_password(
        "a b", salt, 1
    )
    assert ScramVerifier.from_password("\ufb01", salt, 1) == ScramVerifier.from_password(
        "fi", salt, 1
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abc",
        "SCRAM-SHA-256$4096:c2FsdA==$a:b",  # keys too short / not 32 bytes
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:!!!$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096c2FsdA==$" + "A" * 43 + "=" + "A" * 43 + "=",
        "SCRAM-SHA-256$４０９６:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    ],
)
def test_verifier_parse_rejects(text):
    with pytest.raises(AuthError):
        ScramVerifier.parse(text)


def test_verifier_parse_accepts_valid_shape():
    key = base64.b64encode(b"k" * 32).decode()
    v = ScramVerifier.parse(f"SCRAM-SHA-256$10:c2FsdA==${key}:{key}")
    assert v.iterations == 10 and v.salt == b"salt"


# --- SCRAM server: RFC 7677 ------------------------------------------------------------


def test_server_rfc7677_vector(rfc_verifier):
    server = rfc_server(rfc_verifier)
    assert server.client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_server_works_from_parsed_verifier(rfc_verifier):
    server = rfc_server(ScramVerifier.parse(rfc_verifier.to_text()))
    assert server.client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_server_ignores_username(rfc_verifier):
    # PostgreSQL takes the user from the startup message; n= may hold anything.
    server = rfc_server(rfc_verifier)
    first = server.client_first(b"n,,n=,r=abc")
    assert first.startswith(b"r=abc" + RFC_SERVER_NONCE + b",s=")


def test_server_accepts_y_flag(rfc_verifier):
    """gs2 flag "y" (client could bind, thinks we can't) with its c=eSws echo verifies."""
    import hmac

    def h(key, msg):
        return hmac.new(key, msg, hashlib.sha256).digest()

    server = rfc_server(rfc_verifier)
    bare = b"n=,r=" + RFC_CLIENT_NONCE
    server_first = server.client_first(b"y,," + bare)
    without_proof = b"c=eSws,r=" + FULL_NONCE
    salted = hashlib.pbkdf2_hmac("sha256", RFC_PASSWORD.encode(), RFC_SALT, 4096)
    client_key = h(salted, b"Client Key")
    auth_message = bare + b"," + server_first + b"," + without_proof
    signature = h(hashlib.sha256(client_key).digest(), auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    final = server.client_final(without_proof + b",p=" + base64.b64encode(proof))
    assert final == b"v=" + base64.b64encode(h(h(salted, b"Server Key"), auth_message))


def test_server_rejects_y_header_with_n_binding(rfc_verifier):
    client = ScramClient("u", RFC_PASSWORD, nonce=b"clientnonce")
    server = rfc_server(rfc_verifier)
    first = client.client_first().replace(b"n,,", b"y,,", 1)
    server_first = server.client_first(first)
    final = client.server_first(server_first)
    # Proof covers c=; with "y" the echo must be eSws (base64 of "y,,").
    assert final.startswith(b"c=biws,")
    with pytest.raises(AuthError, match="channel binding"):
        server.client_final(final)


def test_server_rejects_n_header_with_y_binding(rfc_verifier):
    server = server_after_first(rfc_verifier)
    bad = RFC_CLIENT_FINAL.replace(b"c=biws", b"c=eSws")
    with pytest.raises(AuthError, match="channel binding"):
        server.client_final(bad)


def test_server_rejects_channel_binding(rfc_verifier):
    server = rfc_server(rfc_verifier)
    with pytest.raises(AuthError, match="channel binding"):
        server.client_first(b"p=tls-server-end-point,,n=,r=abc")


def test_server_wrong_proof_is_password_error(rfc_verifier):
    server = server_after_first(rfc_verifier)
    proof = bytearray(base64.b64decode(RFC_CLIENT_FINAL.rsplit(b",p=", 1)[1]))
    proof[0] ^= 1
    bad = RFC_CLIENT_FINAL.rsplit(b",p=", 1)[0] + b",p=" + base64.b64encode(bytes(proof))
    with pytest.raises(AuthError) as info:
        server.client_final(bad)
    assert str(info.value) == "password"


def test_server_wrong_password():
    server = ScramServer(ScramVerifier.from_password("right", b"salt", 16))
    client = ScramClient("u", "wrong")
    final = client.server_first(server.client_first(client.client_first()))
    with pytest.raises(AuthError, match="^password$"):
        server.client_final(final)


def test_server_tampered_nonce(rfc_verifier):
    server = server_after_first(rfc_verifier)
    bad = RFC_CLIENT_FINAL.replace(b"hNlF$k0", b"hNlF$k1")
    with pytest.raises(AuthError, match="nonce"):
        server.client_final(bad)


def test_server_message_order(rfc_verifier):
    server = rfc_server(rfc_verifier)
    with pytest.raises(AuthError):
        server.client_final(RFC_CLIENT_FINAL)
    # a failed exchange stays failed
    with pytest.raises(AuthError):
        server.client_first(RFC_CLIENT_FIRST)


def test_server_no_retry_after_bad_proof(rfc_verifier):
    server = server_after_first(rfc_verifier)
    with pytest.raises(AuthError):
        server.client_final(RFC_CLIENT_FINAL.replace(b"p=d", b"p=e"))
    with pytest.raises(AuthError):
        server.client_final(RFC_CLIENT_FINAL)


BAD_CLIENT_FIRST = [
    b"",
    b"n",
    b"n,",
    b"n,,",
    b"n,,n=user",
    b"n,,r=abc",
    b"n,,n=user,r=",
    b"n,,r=abc,n=user",
    b"n,,n=user,x",
    b"x,,n=user,r=abc",
    b"n,a=admin,n=user,r=abc",
    b"n,,m=ext,n=user,r=abc",
    b"n,,n=user,r=a\x01bc",
    b"n,,n=user,r=\xc3\xa9",
    b"\xff\xfe\xfd",
    b"n,,n=user,r=abc\x00",
    b"n,,\xc3(,r=abc",
    b"\x00" * 40,
    RFC_CLIENT_FIRST[:-5] + b"\x80" + RFC_CLIENT_FIRST[-4:],
]


@pytest.mark.parametrize("data", BAD_CLIENT_FIRST)
def test_server_malformed_client_first(rfc_verifier, data):
    with pytest.raises(AuthError):
        rfc_server(rfc_verifier).client_first(data)


def _truncations(message):
    return [message[:n] for n in range(len(message))]


BAD_CLIENT_FINAL = [
    *_truncations(RFC_CLIENT_FINAL)[::7],
    RFC_CLIENT_FINAL[:-1],
    b"c=biws,r=" + FULL_NONCE,  # no proof
    b"r=" + FULL_NONCE + b",p=" + RFC_CLIENT_FINAL.rsplit(b"p=", 1)[1],  # no c=
    b"c=biws,p=" + RFC_CLIENT_FINAL.rsplit(b"p=", 1)[1],  # no r=
    b"c=!!!!,r=" + FULL_NONCE + b",p=AAAA",  # bad base64 binding
    RFC_CLIENT_FINAL.replace(b"p=dHz", b"p=*Hz"),  # bad base64 proof
    RFC_CLIENT_FINAL.rsplit(b",p=", 1)[0] + b",p=AAAA",  # proof too short
    RFC_CLIENT_FINAL.rsplit(b",p=", 1)[0] + b",p=",
    RFC_CLIENT_FINAL.replace(b"c=biws", b"c=bmV3"),  # binding not the gs2 header
    RFC_CLIENT_FINAL.replace(b"c=biws", b"c=\xc3\xa9"),
    RFC_CLIENT_FINAL + b"\xff",
    b"\xff" + RFC_CLIENT_FINAL,
    b"garbage",
    b",,,,,p=",
    b"c=biws,r=" + FULL_NONCE + b"\xe2\x82,p=AAAA",
]


@pytest.mark.parametrize("data", BAD_CLIENT_FINAL)
def test_server_malformed_client_final(rfc_verifier, data):
    server = server_after_first(rfc_verifier)
    with pytest.raises(AuthError):
        server.client_final(data)


# --- SCRAM client: RFC 7677 ------------------------------------------------------------


def test_client_rfc7677_vector():
    client = ScramClient("user", RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, send_user=True)
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert client.server_final(RFC_SERVER_FINAL) is None


def test_client_sends_empty_username_by_default():
    client = ScramClient("user", RFC_PASSWORD, nonce=RFC_CLIENT_NONCE)
    assert client.client_first() == b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"


def test_client_escapes_username():
    client = ScramClient("a=b,c", "pw", nonce=b"xyz", send_user=True)
    assert client.client_first() == b"n,,n=a=3Db=2Cc,r=xyz"


def test_client_random_nonce_is_base64_of_18_bytes():
    first = ScramClient("u", "p").client_first()
    nonce = first.split(b"r=", 1)[1]
    assert len(base64.b64decode(nonce, validate=True)) == 18


def test_client_rejects_bad_server_signature():
    client = ScramClient("user", RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, send_user=True)
    client.client_first()
    client.server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthError, match="signature"):
        client.server_final(RFC_SERVER_FINAL.replace(b"v=6", b"v=7"))


def test_client_server_error():
    client = ScramClient("user", RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, send_user=True)
    client.client_first()
    client.server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthError, match="invalid-proof"):
        client.server_final(b"e=invalid-proof")


def _client_after_first():
    client = ScramClient("user", RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, send_user=True)
    client.client_first()
    return client


BAD_SERVER_FIRST = [
    *_truncations(RFC_SERVER_FIRST)[::9],
    RFC_SERVER_FIRST.replace(b"r=rOpr", b"r=xOpr"),  # nonce not extending ours
    b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nothing appended
    RFC_SERVER_FIRST.replace(b"i=4096", b"i=0"),
    RFC_SERVER_FIRST.replace(b"i=4096", b"i=-1"),
    RFC_SERVER_FIRST.replace(b"i=4096", b"i=x"),
    RFC_SERVER_FIRST.replace(b"i=4096", b"i=\xd9\xa1"),  # Arabic-Indic digit one
    RFC_SERVER_FIRST.replace(b"i=4096", b"i=99999999999999999999"),
    RFC_SERVER_FIRST.replace(b"s=W22Z", b"s=*22Z"),
    RFC_SERVER_FIRST.replace(b"s=W22ZaJ0SNY7soEsUEjb6gQ==", b"s="),
    b"m=ext," + RFC_SERVER_FIRST,
    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    b"\xff\xfe",
    b"e=other-error",
]


@pytest.mark.parametrize("data", BAD_SERVER_FIRST)
def test_client_malformed_server_first(data):
    with pytest.raises(AuthError):
        _client_after_first().server_first(data)


@pytest.mark.parametrize(
    "data", [b"", b"v", b"v=", b"v=!!!", b"x=abc", b"\xff", RFC_SERVER_FINAL[:-3], b"v=AAAA"]
)
def test_client_malformed_server_final(data):
    client = _client_after_first()
    client.server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthError):
        client.server_final(data)


def test_client_message_order():
    client = ScramClient("u", "p")
    with pytest.raises(AuthError):
        client.server_first(RFC_SERVER_FIRST)


def test_client_caches_salted_password():
    auth._client_salted_password.cache_clear()
    for _ in range(3):
        client = ScramClient("user", RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, send_user=True)
        client.client_first()
        assert client.server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    info = auth._client_salted_password.cache_info()
    assert info.misses == 1 and info.hits == 2 and info.maxsize == 64


def test_client_repr_hides_password():
    assert "pencil" not in repr(ScramClient("user", "pencil"))


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("password", ["pencil", "", "p@ss,w=rd", "пароль", "a\u00a0b"])
def test_round_trip(password):
    verifier = ScramVerifier.from_password(password, iterations=64)
    server = ScramServer(verifier)
    client = ScramClient("someone", password)
    server_first = server.client_first(client.client_first())
    server_final = server.client_final(client.server_first(server_first))
    assert server_final.startswith(b"v=")
    client.server_final(server_final)


def test_round_trip_nfkc_equivalent_passwords():
    verifier = ScramVerifier.from_password("\ufb01le", iterations=8)
    server = ScramServer(verifier)
    client = ScramClient("u", "file")
    server_first = server.client_first(client.client_first())
    client.server_final(server.client_final(client.server_first(server_first)))


def test_injected_nonce_must_be_printable():
    with pytest.raises(ValueError):
        ScramServer(ScramVerifier.from_password("x", iterations=1), nonce=b"a,b")
    with pytest.raises(ValueError):
        ScramClient("u", "p", nonce=b"")


def test_mutated_messages_only_raise_auth_error(rfc_verifier):
    """Flip, drop and insert bytes in every message: the only failure is AuthError."""
    import random

    rng = random.Random(7677)

    def mutate(message):
        data = bytearray(message)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and pos < len(data):
                data[pos] = rng.randrange(256)
            elif op == 1 and pos < len(data):
                del data[pos]
            else:
                data.insert(pos, rng.choice(b",=\x00\xff\x80abn"))
        return bytes(data)

    def attempt(step, data):
        try:
            step(data)
        except AuthError:
            pass

    for _ in range(300):
        attempt(rfc_server(rfc_verifier).client_first, mutate(RFC_CLIENT_FIRST))
        attempt(server_after_first(rfc_verifier).client_final, mutate(RFC_CLIENT_FINAL))
        client = _client_after_first()
        attempt(client.server_first, mutate(RFC_SERVER_FIRST.replace(b"i=4096", b"i=1")))
        client = _client_after_first()
        client.server_first(RFC_SERVER_FIRST)
        attempt(client.server_final, mutate(RFC_SERVER_FINAL))


# -- the helpers written without per-byte / per-character Python loops ---------------------------
from hypothesis import given, strategies as st  # noqa: E402


@given(st.binary(max_size=48), st.binary(max_size=48))
def test_xor_is_the_bytewise_xor_over_the_shorter_length(a, b):
    assert auth._xor(a, b) == bytes(x ^ y for x, y in zip(a, b))


@given(st.text(max_size=40))
def test_a_valid_nonce_is_printable_ascii_without_comma(nonce):
    expected = bool(nonce) and all("\x21" <= ch <= "\x7e" and ch != "," for ch in nonce)
    assert auth._valid_nonce(nonce) is expected


def test_nonce_edges():
    for ch in map(chr, range(0x180)):
        expected = "\x21" <= ch <= "\x7e" and ch != ","
        assert auth._valid_nonce("ab" + ch) is expected, repr(ch)
    assert auth._valid_nonce("") is False
