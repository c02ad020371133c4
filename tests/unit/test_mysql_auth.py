"""Password maths with independently computed vectors, and the caching_sha2 flows."""

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from txrdsproxy.wire.mysql import auth as A
from txrdsproxy.wire.mysql.packets import ProtocolError

NONCE = b"abcdefghijklmnopqrst"


def xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))


def expected_native(pw, nonce):
    s1 = hashlib.sha1(pw).digest()
    return xor(s1, hashlib.sha1(nonce + hashlib.sha1(s1).digest()).digest())


def expected_sha2(pw, nonce):
    h1 = hashlib.sha256(pw).digest()
    h3 = hashlib.sha256(hashlib.sha256(h1).digest() + nonce).digest()
    return xor(h1, h3)


@pytest.mark.parametrize("pw", ["secret", "pässwörd", "x" * 100])
def test_native_vector_and_check(pw):
    resp = A.native_password_scramble(pw, NONCE)
    assert resp == expected_native(pw.encode(), NONCE)
    assert len(resp) == 20
    v = A.NativeVerifier.from_password(pw)
    assert v.stored == hashlib.sha1(hashlib.sha1(pw.encode()).digest()).digest()
    assert v.check(NONCE, resp)
    assert not v.check(NONCE, A.native_password_scramble(pw + "x", NONCE))
    assert not v.check(b"other-nonce-12345678", resp)
    assert not v.check(NONCE, resp[:19])
    assert not v.check(NONCE, b"")
    assert "secret" not in repr(v)


def test_native_known_vector():
    # Fixed vector: password "password", nonce of 20 x 0x01.
    nonce = b"\x01" * 20
    assert A.native_password_scramble("password", nonce).hex() == \
        expected_native(b"password", nonce).hex()


def test_native_empty_password():
    assert A.native_password_scramble("", NONCE) == b""
    v = A.NativeVerifier.from_password("")
    assert v.stored == b""
    assert v.check(NONCE, b"")
    assert not v.check(NONCE, b"\x00" * 20)
    assert not A.NativeVerifier.from_password("pw").check(NONCE, b"")


@pytest.mark.parametrize("pw", ["secret", "pässwörd"])
def test_sha2_vector_and_check(pw):
    resp = A.caching_sha2_scramble(pw, NONCE)
    assert resp == expected_sha2(pw.encode(), NONCE)
    v = A.Sha2Verifier.from_password(pw)
    assert v.stored == hashlib.sha256(hashlib.sha256(pw.encode()).digest()).digest()
    assert A.caching_sha2_check(v, NONCE, resp)
    assert A.caching_sha2_check(v.stored, NONCE, resp)
    assert not v.check(NONCE, A.caching_sha2_scramble("nope", NONCE))
    assert not v.check(NONCE, resp[:31])
    assert v.check_cleartext(pw) and not v.check_cleartext(pw + "!")
    assert "secret" not in repr(v)


def test_sha2_empty_password():
    assert A.caching_sha2_scramble("", NONCE) == b""
    v = A.Sha2Verifier.from_password("")
    assert v.check(NONCE, b"") and v.check_cleartext("")
    assert not A.Sha2Verifier.from_password("x").check(NONCE, b"")


def test_clear_password():
    assert A.clear_password_response("pw") == b"pw\x00"
    assert A.parse_clear_password(b"pw\x00") == "pw"
    assert A.parse_clear_password(b"pw") == "pw"


def test_auth_response_for():
    assert A.auth_response_for("mysql_native_password", "pw", NONCE) == \
        expected_native(b"pw", NONCE)
    assert A.auth_response_for("caching_sha2_password", "pw", NONCE) == \
        expected_sha2(b"pw", NONCE)
    assert A.auth_response_for("mysql_clear_password", "pw", NONCE, tls=True) == b"pw\x00"
    with pytest.raises(A.UnsupportedAuthPlugin):
        A.auth_response_for("mysql_clear_password", "pw", NONCE)
    with pytest.raises(A.UnsupportedAuthPlugin):
        A.auth_response_for("client_ed25519", "pw", NONCE)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rsa_roundtrip(rsa_key):
    pem = A.public_key_pem(rsa_key)
    blob = A.rsa_encrypt_password("hunter2", NONCE, pem)
    assert len(blob) == 256
    assert A.rsa_decrypt_password(rsa_key, blob, NONCE) == b"hunter2"
    with pytest.raises(ProtocolError):
        A.rsa_encrypt_password("x", NONCE, b"not a pem")


# --- server flow -------------------------------------------------------------------------
def server(pw="pw", **kw):
    return A.CachingSha2ServerAuth(A.Sha2Verifier.from_password(pw), NONCE, **kw)


def test_server_fast_auth():
    s = server()
    assert s.start(A.caching_sha2_scramble("pw", NONCE)) == [b"\x01\x03"]
    assert s.done and s.succeeded


def test_server_fast_auth_wrong_password():
    s = server()
    assert s.start(A.caching_sha2_scramble("bad", NONCE)) == []
    assert s.done and not s.succeeded and s.failure_reason


def test_server_empty_password():
    s = server("")
    assert s.start(b"") == [] and s.succeeded
    s = server("pw")
    assert s.start(b"") == [] and s.done and not s.succeeded


def test_server_full_auth_tls():
    s = server(cached=False, tls=True)
    assert s.start(A.caching_sha2_scramble("pw", NONCE)) == [b"\x01\x04"]
    assert not s.done
    assert s.feed(b"pw\x00") == []
    assert s.succeeded and s.full_auth_used
    s = server(cached=False, tls=True)
    s.start(b"x" * 32)
    s.feed(b"wrong\x00")
    assert s.done and not s.succeeded


def test_server_full_auth_plaintext_without_key_fails():
    s = server(cached=False)
    s.start(b"x" * 32)
    assert s.feed(b"\x02") == []
    assert s.done and not s.succeeded
    assert "public key" in s.failure_reason
    s = server(cached=False)
    s.start(b"x" * 32)
    s.feed(b"pw\x00")  # cleartext without TLS is refused
    assert s.done and not s.succeeded


def test_server_full_auth_rsa(rsa_key):
    s = server(cached=False, rsa_private_key=rsa_key)
    s.start(b"x" * 32)
    out = s.feed(b"\x02")
    assert out[0][:1] == b"\x01" and b"BEGIN PUBLIC KEY" in out[0]
    s.feed(A.rsa_encrypt_password("pw", NONCE, out[0][1:]))
    assert s.succeeded
    s = server(cached=False, rsa_private_key=rsa_key)
    s.start(b"x" * 32)
    s.feed(A.rsa_encrypt_password("pw", NONCE, A.public_key_pem(rsa_key)))  # key preloaded
    assert s.succeeded
    s = server(cached=False, rsa_private_key=rsa_key)
    s.start(b"x" * 32)
    s.feed(b"\x02")
    s.feed(b"\x00" * 256)
    assert s.done and not s.succeeded


def test_server_misuse():
    s = server()
    s.start(b"")
    with pytest.raises(ProtocolError):
        s.start(b"")
    with pytest.raises(ProtocolError):
        s.feed(b"x")


# --- client and server talking to each other --------------------------------------------
def test_client_fast_path_against_server():
    c = A.CachingSha2ClientAuth("pw", NONCE)
    assert "pw" not in repr(c)
    srv = server()
    out = srv.start(c.initial_response())
    assert c.feed(out[0]) is None
    assert srv.succeeded


@pytest.mark.parametrize("tls,preload", [(True, False), (False, False), (False, True)])
def test_client_full_path_against_server(rsa_key, tls, preload):
    c = A.CachingSha2ClientAuth("pw", NONCE, tls=tls,
                                server_public_key=A.public_key_pem(rsa_key) if preload else None,
                                request_public_key=True)
    srv = server(cached=False, tls=tls, rsa_private_key=rsa_key)
    pending = srv.start(c.initial_response())
    while not srv.done:
        assert len(pending) == 1
        reply = c.feed(pending[0])
        pending = srv.feed(reply)
    assert srv.succeeded


def test_client_full_auth_without_tls_or_a_known_key_is_refused(rsa_key):
    """Asking an unauthenticated server for its RSA key would let a man in the middle read the
    password: refused unless explicitly allowed."""
    c = A.CachingSha2ClientAuth("pw", NONCE)
    srv = server(cached=False, tls=False, rsa_private_key=rsa_key)
    pending = srv.start(c.initial_response())
    with pytest.raises(ProtocolError, match="needs TLS to the database or a configured server public key"):
        c.feed(pending[0])


def test_client_rejects_garbage():
    c = A.CachingSha2ClientAuth("pw", NONCE)
    with pytest.raises(ProtocolError):
        c.feed(b"\x00")
    with pytest.raises(ProtocolError):
        c.feed(b"\x01\x09")
