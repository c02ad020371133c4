"""MySQL password authentication maths and the caching_sha2 exchanges.

The proxy verifies client passwords without keeping the plaintext around per
connection: it derives, once per secret, the same hashes the server stores
(``SHA1(SHA1(pw))`` for mysql_native_password, ``SHA256(SHA256(pw))`` for
caching_sha2_password) and checks scrambles against those.  Towards MariaDB
it computes scrambles from the secret's password.

Empty passwords: every plugin sends an *empty* auth response for an empty
password, and an empty response only ever means "empty password".

Server-side RSA (caching_sha2 full auth over plaintext) is supported when the
caller gives :class:`CachingSha2ServerAuth` an RSA private key; without one,
a public-key request fails the login (the caller answers Access denied).
Clients with a warm cache use the fast path and never need it; the proxy can
mark users "cached" once any login for them has succeeded over TLS/RSA.
"""

import hashlib
import hmac

from txrdsproxy.wire.mysql.packets import ProtocolError

NATIVE_PASSWORD = "mysql_native_password"
CACHING_SHA2_PASSWORD = "caching_sha2_password"
CLEAR_PASSWORD = "mysql_clear_password"

# caching_sha2 AuthMoreData status bytes
REQUEST_PUBLIC_KEY = b"\x02"
FAST_AUTH_SUCCESS = b"\x03"
PERFORM_FULL_AUTH = b"\x04"


class UnsupportedAuthPlugin(ProtocolError):
    """The peer asked for an authentication plugin we do not implement."""


def _pw(password):
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def _xor(a, b):
    """Byte-wise XOR over the shorter length (as zip would), on ints: no Python loop."""
    n = min(len(a), len(b))
    return (int.from_bytes(a[:n], "little") ^ int.from_bytes(b[:n], "little")).to_bytes(n, "little")


def _sha1(data):
    return hashlib.sha1(data).digest()


def _sha256(data):
    return hashlib.sha256(data).digest()


# --- mysql_native_password ---------------------------------------------------------------
def native_password_scramble(password, nonce):
    """SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))); empty for an empty password."""
    pw = _pw(password)
    if not pw:
        return b""
    stage1 = _sha1(pw)
    return _xor(stage1, _sha1(bytes(nonce) + _sha1(stage1)))


def native_password_check(stored_double_sha1, nonce, response):
    """Verify a native scramble knowing only ``SHA1(SHA1(pw))``.

    ``stored_double_sha1`` is ``b""`` for an account with an empty password.
    """
    response = bytes(response)
    if not stored_double_sha1 or not response:
        return not stored_double_sha1 and not response
    if len(response) != 20:
        return False
    stage1 = _xor(response, _sha1(bytes(nonce) + stored_double_sha1))
    return hmac.compare_digest(_sha1(stage1), stored_double_sha1)


class _DoubleHashVerifier:
    """Holds ``H(H(pw))`` (or ``b""`` for an empty password): all a server needs to check a
    scramble, derived once per secret value.  Subclasses name the hash and the check."""

    __slots__ = ("stored",)
    _hash = None  # staticmethod: bytes -> digest

    def __init__(self, stored):
        self.stored = bytes(stored)

    @classmethod
    def from_password(cls, password):
        pw = _pw(password)
        return cls(cls._hash(cls._hash(pw)) if pw else b"")

    def check_cleartext(self, password):
        pw = _pw(password)
        if not pw or not self.stored:
            return not pw and not self.stored
        return hmac.compare_digest(self._hash(self._hash(pw)), self.stored)

    def __repr__(self):
        return f"<{type(self).__name__} (redacted)>"


class NativeVerifier(_DoubleHashVerifier):
    """mysql_native_password: ``SHA1(SHA1(pw))``."""

    __slots__ = ()
    _hash = staticmethod(_sha1)

    def check(self, nonce, response):
        return native_password_check(self.stored, nonce, response)


# --- caching_sha2_password ------------------------------------------------------------
def caching_sha2_scramble(password, nonce):
    """XOR(SHA256(pw), SHA256(SHA256(SHA256(pw)) + nonce)); empty for empty pw."""
    pw = _pw(password)
    if not pw:
        return b""
    h1 = _sha256(pw)
    return _xor(h1, _sha256(_sha256(h1) + bytes(nonce)))


def caching_sha2_check(stored, nonce, response):
    """Verify a caching_sha2 fast-auth scramble; ``stored`` is a
    :class:`Sha2Verifier` or the raw ``SHA256(SHA256(pw))`` bytes."""
    stored = stored.stored if isinstance(stored, Sha2Verifier) else bytes(stored)
    response = bytes(response)
    if not stored or not response:
        return not stored and not response
    if len(response) != 32:
        return False
    h1 = _xor(response, _sha256(stored + bytes(nonce)))
    return hmac.compare_digest(_sha256(h1), stored)


class Sha2Verifier(_DoubleHashVerifier):
    """caching_sha2_password: ``SHA256(SHA256(pw))``."""

    __slots__ = ()
    _hash = staticmethod(_sha256)

    def check(self, nonce, response):
        return caching_sha2_check(self, nonce, response)


# --- mysql_clear_password -------------------------------------------------------------
def clear_password_response(password):
    """Cleartext auth response: the password NUL-terminated (send over TLS only)."""
    return _pw(password) + b"\x00"


def parse_clear_password(response):
    """Password text from a cleartext response (the trailing NUL is optional)."""
    response = bytes(response)
    if response.endswith(b"\x00"):
        response = response[:-1]
    return response.decode("utf-8", "replace")


# --- RSA (caching_sha2 full auth without TLS) --------------------------------------------
def _xor_nonce(password, nonce):
    data = _pw(password) + b"\x00"
    nonce = bytes(nonce)
    return bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(data))


def _oaep():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()),
                        algorithm=hashes.SHA1(), label=None)


def rsa_encrypt_password(password, nonce, public_key_pem):
    """RSA-OAEP(SHA1) of (password + NUL) XOR nonce, as MySQL 8 clients send."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    try:
        key = load_pem_public_key(bytes(public_key_pem))
    except ValueError as e:
        raise ProtocolError("bad server public key: %s" % e)
    return key.encrypt(_xor_nonce(password, nonce), _oaep())


def rsa_decrypt_password(private_key, data, nonce):
    """Inverse of :func:`rsa_encrypt_password`; returns the password bytes."""
    plain = private_key.decrypt(bytes(data), _oaep())
    nonce = bytes(nonce)
    plain = bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(plain))
    return plain[:-1] if plain.endswith(b"\x00") else plain


def public_key_pem(private_key):
    from cryptography.hazmat.primitives import serialization
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- state machines -----------------------------------------------------------------------
class CachingSha2ServerAuth:
    """Server side of caching_sha2_password for one login.

    Drive it with :meth:`start` (the auth response from HandshakeResponse41 or
    from the reply to an AuthSwitchRequest), then :meth:`feed` every further
    client auth packet while ``done`` is False.  Both return a list of
    payloads to send (AuthMoreData).  When ``succeeded`` the caller sends its
    OK packet; when ``done and not succeeded`` it sends Access denied
    (``failure_reason`` says why, for logs).

    ``cached``: the proxy already saw this user log in with the right
    password, so a scramble is accepted (fast auth).  Otherwise full auth is
    demanded: cleartext over TLS (``tls``) or RSA when ``rsa_private_key``
    (a ``cryptography`` RSA private key) is given.
    """

    def __init__(self, verifier, nonce, cached=True, tls=False, rsa_private_key=None):
        self.verifier = verifier
        self.nonce = bytes(nonce)
        self.cached = cached
        self.tls = tls
        self.rsa_private_key = rsa_private_key
        self.done = False
        self.succeeded = False
        self.failure_reason = None
        self.full_auth_used = False
        self._state = "start"

    def _finish(self, ok, reason=None):
        self.done = True
        self.succeeded = ok
        self.failure_reason = None if ok else reason
        self._state = "done"
        return []

    def start(self, auth_response):
        if self._state != "start":
            raise ProtocolError("caching_sha2 exchange already started")
        response = bytes(auth_response)
        if not response:
            return self._finish(self.verifier.check_cleartext(b""), "password required")
        if self.cached:
            if self.verifier.check(self.nonce, response):
                self._finish(True)
                return [b"\x01" + FAST_AUTH_SUCCESS]
            return self._finish(False, "scramble mismatch")
        self._state = "full"
        self.full_auth_used = True
        return [b"\x01" + PERFORM_FULL_AUTH]

    def feed(self, payload):
        payload = bytes(payload)
        if self._state == "full":
            if self.tls:
                return self._finish(self.verifier.check_cleartext(parse_clear_password(payload)),
                                    "wrong password")
            if payload == REQUEST_PUBLIC_KEY:
                if self.rsa_private_key is None:
                    return self._finish(False, "public key retrieval not supported")
                self._state = "rsa"
                return [b"\x01" + public_key_pem(self.rsa_private_key)]
            if self.rsa_private_key is not None and len(payload) * 8 == \
                    self.rsa_private_key.key_size:
                return self._rsa(payload)  # client already had our public key
            return self._finish(False, "cleartext password over an unencrypted connection")
        if self._state == "rsa":
            return self._rsa(payload)
        raise ProtocolError("unexpected auth packet in state %s" % self._state)

    def _rsa(self, payload):
        try:
            pw = rsa_decrypt_password(self.rsa_private_key, payload, self.nonce)
        except ValueError:
            return self._finish(False, "RSA decryption failed")
        return self._finish(self.verifier.check_cleartext(pw), "wrong password")


class CachingSha2ClientAuth:
    """Client side of caching_sha2_password (the proxy logging in to MySQL 8).

    Send :meth:`initial_response` as the auth response; then hand every 0x01
    AuthMoreData payload to :meth:`feed`, which returns the payload to send
    back or ``None`` (fast auth succeeded: wait for OK).  OK/ERR and auth
    switches are handled by the caller.

    Full authentication sends the password: in clear over TLS (``tls``), or
    RSA-encrypted with a ``server_public_key`` configured in advance.  Asking
    the server for its key over an unencrypted connection would let anyone in
    the middle hand us theirs, so it is refused unless ``request_public_key``
    (ProtocolError "...needs TLS or a configured server public key").
    """

    def __init__(self, password, nonce, tls=False, server_public_key=None,
                 request_public_key=False):
        self._password = _pw(password)
        self.nonce = bytes(nonce)
        self.tls = tls
        self.server_public_key = server_public_key
        self.request_public_key = request_public_key
        self._awaiting_key = False

    def __repr__(self):
        return "<CachingSha2ClientAuth (redacted)>"

    def initial_response(self):
        return caching_sha2_scramble(self._password, self.nonce)

    def feed(self, payload):
        if not payload or payload[0] != 0x01:
            raise ProtocolError("expected AuthMoreData")
        data = bytes(payload[1:])
        if self._awaiting_key:
            self._awaiting_key = False
            self.server_public_key = data
            return rsa_encrypt_password(self._password, self.nonce, data)
        if data == FAST_AUTH_SUCCESS:
            return None
        if data == PERFORM_FULL_AUTH:
            if self.tls:
                return clear_password_response(self._password)
            if self.server_public_key:
                return rsa_encrypt_password(self._password, self.nonce,
                                            self.server_public_key)
            if not self.request_public_key:
                raise ProtocolError(
                    "caching_sha2_password full authentication needs TLS to the "
                    "database or a configured server public key")
            self._awaiting_key = True
            return REQUEST_PUBLIC_KEY
        raise ProtocolError("unexpected caching_sha2 status %r" % data[:1])


def auth_response_for(plugin, password, nonce, tls=False):
    """First auth response the proxy sends for ``plugin`` (handshake or switch).

    mysql_clear_password is refused without TLS so a secret never crosses the
    network in the clear.  Raises :class:`UnsupportedAuthPlugin` otherwise
    (e.g. MariaDB's client_ed25519, parsec, sha256_password, dialog).
    """
    if plugin == NATIVE_PASSWORD:
        return native_password_scramble(password, nonce)
    if plugin == CACHING_SHA2_PASSWORD:
        return caching_sha2_scramble(password, nonce)
    if plugin == CLEAR_PASSWORD:
        if not tls:
            raise UnsupportedAuthPlugin("mysql_clear_password needs TLS")
        return clear_password_response(password)
    raise UnsupportedAuthPlugin("unsupported auth plugin %r" % plugin)
