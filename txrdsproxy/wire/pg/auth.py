"""PostgreSQL password authentication maths: MD5 and SCRAM-SHA-256 (RFC 5802/7677).

Sans-I/O: these functions and classes turn message payloads into message payloads. The
proxy uses them on both sides: ``ScramServer`` and ``md5_check`` verify clients that log
in to the proxy, ``ScramClient`` and ``md5_response`` log the proxy in to the database.
Framing (AuthenticationSASL, SASLInitialResponse, ...) is the caller's job.

Every malformed input raises ``AuthError`` with a short reason and never another exception
type, because these bytes come straight from the network.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import string
import unicodedata
from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = [
    "AuthError",
    "md5_password_hash",
    "md5_response",
    "md5_check",
    "ScramVerifier",
    "ScramServer",
    "ScramClient",
]

SCRAM_MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
_SALT_LEN = 16  # what PostgreSQL uses for stored verifiers
_NONCE_LEN = 18  # raw random bytes in a nonce, as PostgreSQL and libpq use
_KEY_LEN = 32  # SHA-256 digest size


class AuthError(Exception):
    """Authentication failed or a message was malformed; ``str()`` is a short reason."""


# --- MD5 -------------------------------------------------------------------------------


def md5_password_hash(user: str, password: str) -> str:
    """PostgreSQL's stored MD5 form: ``"md5" + hex(md5(password + user))``."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()


def md5_response(user: str, password: str, salt: bytes) -> bytes:
    """The PasswordMessage payload answering AuthenticationMD5Password (no trailing NUL)."""
    inner = md5_password_hash(user, password)[3:].encode("ascii")
    return b"md5" + hashlib.md5(inner + bytes(salt)).hexdigest().encode("ascii")


def md5_check(user: str, password: str, salt: bytes, response: bytes) -> bool:
    """Whether a client's PasswordMessage payload is right; constant-time comparison.

    The payload may still carry its C-string NUL terminator.
    """
    response = bytes(response)
    if response.endswith(b"\0"):
        response = response[:-1]
    return hmac.compare_digest(md5_response(user, password, salt), response)


# --- SCRAM primitives ------------------------------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    """a XOR b, byte by byte, over the shorter length (one integer XOR, not a Python loop)."""
    n = min(len(a), len(b))
    return (int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")).to_bytes(n, "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:  # covers binascii.Error and UnicodeEncodeError
        raise AuthError(f"malformed {what}") from None


def _prepare_password(password: str) -> bytes:
    """SASLprep, simplified.

    Printable ASCII (the overwhelmingly common case) is its own SASLprep output. Anything
    else is NFKC-normalized, which is the bulk of SASLprep (it maps non-ASCII spaces to
    U+0020, folds compatibility forms). Not done: removing "mapped to nothing" characters
    (soft hyphen, zero-width joiners) and PostgreSQL's fallback to the raw bytes when the
    password holds prohibited or bidi-invalid characters. Such passwords may not verify.
    """
    if password.isascii() and password.isprintable():
        return password.encode("ascii")
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations, _KEY_LEN)


# The client side runs PBKDF2 per login; repeated logins to one database with one secret
# reuse the same (password, salt, iterations), so remember the last few results.
_client_salted_password = functools.lru_cache(maxsize=64)(_salted_password)


def _decode(data: bytes, what: str) -> str:
    try:
        text = bytes(data).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise AuthError(f"malformed {what}") from None
    if "\0" in text:
        raise AuthError(f"malformed {what}")
    return text


def _parse_attrs(text: str, what: str) -> List[Tuple[str, str]]:
    """Split ``a=1,b=2`` into ``[("a", "1"), ("b", "2")]``; values keep any ``=``."""
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or part[0] not in string.ascii_letters:
            raise AuthError(f"malformed {what}")
        attrs.append((part[0], part[2:]))
    return attrs


def _expect_keys(attrs: List[Tuple[str, str]], keys: str, what: str) -> None:
    if attrs and attrs[0][0] == "m":
        raise AuthError("unsupported mandatory extension")
    if len(attrs) < len(keys) or "".join(k for k, _ in attrs[: len(keys)]) != keys:
        raise AuthError(f"malformed {what}")


def _valid_nonce(nonce: str) -> bool:
    """Printable ASCII without space or comma (RFC 5802 "printable"), at least one character;
    checked with str methods rather than a loop per character (once per login)."""
    return (bool(nonce) and nonce.isascii() and nonce.isprintable() and " " not in nonce
            and "," not in nonce)


def _parse_iterations(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise AuthError(f"malformed {what}")
    iterations = int(text)
    if iterations < 1:
        raise AuthError(f"malformed {what}")
    return iterations


def _new_nonce() -> str:
    return _b64(os.urandom(_NONCE_LEN))


def _nonce_arg(nonce: Optional[bytes]) -> str:
    if nonce is None:
        return _new_nonce()
    text = bytes(nonce).decode("ascii", "replace")
    if not _valid_nonce(text):
        raise ValueError("nonce must be printable ASCII without commas")
    return text


# --- SCRAM server side -----------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ScramVerifier:
    """What the server needs to check a SCRAM-SHA-256 login: PostgreSQL's stored verifier.

    Deriving it costs a full PBKDF2 run, so the proxy builds one per secret value and
    reuses it for every login; a login itself then costs only a few HMACs.
    """

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(
        cls, password: str, salt: Optional[bytes] = None, iterations: int = DEFAULT_ITERATIONS
    ) -> "ScramVerifier":
        """Derive the verifier (one PBKDF2 run); a random 16-byte salt unless given."""
        if salt is None:
            salt = os.urandom(_SALT_LEN)
        if iterations < 1:
            raise ValueError("iterations must be >= 1")
        salted = _salted_password(_prepare_password(password), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(salt, iterations, _sha256(client_key), _hmac(salted, b"Server Key"))

    @classmethod
    def parse(cls, text: str) -> "ScramVerifier":
        """Read ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (pg_authid form).

        Raises AuthError if the text is not in that form.
        """
        what = "SCRAM verifier"
        if not isinstance(text, str):
            raise AuthError(f"malformed {what}")
        parts = text.split("$")
        if len(parts) != 3 or parts[0] != SCRAM_MECHANISM:
            raise AuthError(f"malformed {what}")
        iter_text, sep1, salt_b64 = parts[1].partition(":")
        stored_b64, sep2, server_b64 = parts[2].partition(":")
        if not (sep1 and sep2):
            raise AuthError(f"malformed {what}")
        iterations = _parse_iterations(iter_text, what)
        salt = _b64decode(salt_b64, what)
        stored_key = _b64decode(stored_b64, what)
        server_key = _b64decode(server_b64, what)
        if not salt or len(stored_key) != _KEY_LEN or len(server_key) != _KEY_LEN:
            raise AuthError(f"malformed {what}")
        return cls(salt, iterations, stored_key, server_key)

    def to_text(self) -> str:
        """The pg_authid form that ``parse`` reads."""
        return (
            f"{SCRAM_MECHANISM}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    def __repr__(self) -> str:
        # The keys let anyone impersonate the server, so they never reach logs.
        return f"ScramVerifier(iterations={self.iterations}, keys=<redacted>)"


_INITIAL, _WAIT_FINAL, _DONE, _FAILED = "initial", "wait_final", "done", "failed"


class ScramServer:
    """One SCRAM-SHA-256 exchange, server side (the proxy verifying a client).

    The proxy advertises only SCRAM-SHA-256 (not -PLUS), so it accepts gs2 flags "n" and
    "y" and rejects channel binding "p=". Like PostgreSQL it ignores the SCRAM username:
    the user comes from the startup message. Any error ends the exchange for good.
    """

    def __init__(self, verifier: ScramVerifier, nonce: Optional[bytes] = None):
        self._verifier = verifier
        self._server_nonce = _nonce_arg(nonce)
        self._state = _INITIAL
        self._gs2_header = b""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def _begin(self, expected: str) -> None:
        state, self._state = self._state, _FAILED  # until this step succeeds
        if state != expected:
            raise AuthError("unexpected SCRAM message")

    def client_first(self, data: bytes) -> bytes:
        """Take client-first-message, return server-first-message."""
        self._begin(_INITIAL)
        what = "client-first-message"
        text = _decode(data, what)
        if text.startswith("p="):
            raise AuthError("channel binding not supported")
        if text[:2] not in ("n,", "y,"):
            raise AuthError(f"malformed {what}")
        authzid, sep, bare = text[2:].partition(",")
        if not sep:
            raise AuthError(f"malformed {what}")
        if authzid:
            raise AuthError("authorization identity not supported")
        attrs = _parse_attrs(bare, what)
        _expect_keys(attrs, "nr", what)
        client_nonce = attrs[1][1]
        if not _valid_nonce(client_nonce):
            raise AuthError(f"malformed {what}")
        v = self._verifier
        self._gs2_header = text[:3].encode("ascii")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self._state = _WAIT_FINAL
        return self._server_first.encode("ascii")

    def client_final(self, data: bytes) -> bytes:
        """Take client-final-message, return server-final-message (``v=...``).

        Raises AuthError("password") when the proof is wrong.
        """
        self._begin(_WAIT_FINAL)
        what = "client-final-message"
        text = _decode(data, what)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise AuthError(f"malformed {what}")
        attrs = _parse_attrs(without_proof, what)
        _expect_keys(attrs, "cr", what)
        if _b64decode(attrs[0][1], what) != self._gs2_header:
            raise AuthError("channel binding mismatch")
        if not hmac.compare_digest(attrs[1][1].encode("utf-8"), self._nonce.encode("ascii")):
            raise AuthError("nonce mismatch")
        proof = _b64decode(proof_b64, what)
        if len(proof) != _KEY_LEN:
            raise AuthError(f"malformed {what}")
        v = self._verifier
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_message_bytes = auth_message.encode("utf-8")
        client_key = _xor(proof, _hmac(v.stored_key, auth_message_bytes))
        if not hmac.compare_digest(_sha256(client_key), v.stored_key):
            raise AuthError("password")
        self._state = _DONE
        return b"v=" + _b64(_hmac(v.server_key, auth_message_bytes)).encode("ascii")


# --- SCRAM client side -----------------------------------------------------------------


def _saslname(user: str) -> str:
    return user.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """One SCRAM-SHA-256 exchange, client side (the proxy logging in to the database).

    Sends an empty username like libpq does, since PostgreSQL takes the user from the
    startup message; ``send_user=True`` puts ``user`` in instead (for other servers and
    for checking against RFC test vectors).
    """

    def __init__(
        self, user: str, password: str, nonce: Optional[bytes] = None, *, send_user: bool = False
    ):
        self._user = user
        self._password = _prepare_password(password)
        self._client_nonce = _nonce_arg(nonce)
        self._send_user = send_user
        self._state = _INITIAL
        self._client_first_bare = ""
        self._server_signature = b""

    def __repr__(self) -> str:
        return f"ScramClient(user={self._user!r}, state={self._state})"

    def _begin(self, expected: str) -> None:
        state, self._state = self._state, _FAILED  # until this step succeeds
        if state != expected:
            raise AuthError("unexpected SCRAM message")

    def client_first(self) -> bytes:
        """The client-first-message (SASLInitialResponse data)."""
        self._begin(_INITIAL)
        name = _saslname(self._user) if self._send_user else ""
        self._client_first_bare = f"n={name},r={self._client_nonce}"
        self._state = "wait_server_first"
        return b"n,," + self._client_first_bare.encode("utf-8")

    def server_first(self, data: bytes) -> bytes:
        """Take server-first-message, return client-final-message carrying the proof."""
        self._begin("wait_server_first")
        what = "server-first-message"
        text = _decode(data, what)
        attrs = _parse_attrs(text, what)
        _expect_keys(attrs, "rsi", what)
        nonce = attrs[0][1]
        if (
            not _valid_nonce(nonce)
            or not nonce.startswith(self._client_nonce)
            or len(nonce) == len(self._client_nonce)
        ):
            raise AuthError("nonce mismatch")
        salt = _b64decode(attrs[1][1], what)
        if not salt:
            raise AuthError(f"malformed {what}")
        iterations = _parse_iterations(attrs[2][1], what)
        salted = _client_salted_password(self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        without_proof = f"c=biws,r={nonce}"
        auth_message = ",".join((self._client_first_bare, text, without_proof)).encode("utf-8")
        proof = _xor(client_key, _hmac(_sha256(client_key), auth_message))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        self._state = "wait_server_final"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    @property
    def verified(self) -> bool:
        """The server proved it knows the password (its signature checked): only then may an
        AuthenticationOk be believed."""
        return self._state == _DONE

    def server_final(self, data: bytes) -> None:
        """Check server-final-message; AuthError on ``e=...`` or a wrong signature."""
        self._begin("wait_server_final")
        what = "server-final-message"
        attrs = _parse_attrs(_decode(data, what), what)
        key, value = attrs[0]
        if key == "e":
            raise AuthError(f"server error: {value[:80]}")
        if key != "v":
            raise AuthError(f"malformed {what}")
        if not hmac.compare_digest(_b64decode(value, what), self._server_signature):
            raise AuthError("server signature mismatch")
        self._state = _DONE
