"""Verifying AWS Signature Version 4 requests with botocore's own signer.

Two shapes of signed request reach the proxy:

- the **presigned query string** of an RDS IAM auth token (what
  ``generate_db_auth_token`` returns: ``host:port/?Action=connect&DBUser=...&X-Amz-Signature=...``),
  sent by a database client as its password;
- the **Authorization header** of a management API call (``AWS4-HMAC-SHA256 Credential=...,
  SignedHeaders=..., Signature=...``), as boto3 and the AWS CLI send it.

Both are checked the same way: parse strictly (each parameter once, the scope well formed), look
up the access key's secret, rebuild the request and let `botocore.auth.SigV4Auth` compute the
canonical request, the string to sign and the signature at the request's own timestamp, then
compare signatures with `hmac.compare_digest`.  No canonicalisation is written here, so what we
accept is exactly what botocore signs.  The clock is passed in (POSIX seconds) so expiry is
tested on `task.Clock`.

`SignatureError.reason` is a short text for the log; it never contains the signature, the
secret key or the session token.
"""

import datetime
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Mapping, Optional
from urllib.parse import unquote, urlsplit

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_PRESIGNED_EXPIRES = 900  # seconds: the longest an RDS IAM token lives
PRESIGNED_CLOCK_SKEW = 60.0  # a token dated this far in the future is still accepted
HEADER_CLOCK_SKEW = 300.0  # AWS's own tolerance for an Authorization-header request
MAX_TOKEN_LENGTH = 8192

_AUTH_PARAMS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                "X-Amz-SignedHeaders", "X-Amz-Signature")


class SignatureError(Exception):
    """The request is not validly signed.  `reason` is safe to log (no secret material)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SigningKey:
    """The secret half of an access key, as the principal store resolves it."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True)
class VerifiedRequest:
    """What a valid signature proves: who signed, for which scope, when, and the signed params."""

    access_key_id: str
    region: str
    service: str
    signed_at: float  # POSIX seconds (X-Amz-Date)
    expires: Optional[int]  # presigned only: X-Amz-Expires
    host: str
    port: Optional[int]
    params: Mapping[str, str]  # the signed query parameters except X-Amz-Signature (and the token)


def _parse_timestamp(text):
    try:
        stamp = datetime.datetime.strptime(text, SIGV4_TIMESTAMP)
    except (TypeError, ValueError):
        raise SignatureError("malformed X-Amz-Date") from None
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


def _parse_scope(credential, timestamp_text):
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not all(parts[:4]):
        raise SignatureError("malformed credential scope")
    akid, date, region, service, _ = parts
    if date != timestamp_text[:8]:
        raise SignatureError("credential scope date differs from X-Amz-Date")
    return akid, region, service


def _strict_query(query):
    """'a=1&b=2' -> {name: value} (percent-decoded); a repeated or empty name is refused."""
    params = {}
    if not query:
        return params
    for pair in query.split("&"):
        name, sep, value = pair.partition("=")
        name = unquote(name)
        if not name or not sep:
            raise SignatureError("malformed query parameter")
        if name in params:
            raise SignatureError(f"repeated query parameter {name}")
        params[name] = unquote(value)
    return params


def _check_key(key, access_key_id, token):
    if key is None:
        raise SignatureError("unknown access key")
    if key.session_token is None:
        if token is not None:
            raise SignatureError("session token given for a long-term access key")
    elif token is None or not hmac.compare_digest(token.encode(), key.session_token.encode()):
        raise SignatureError("missing or wrong session token")
    return ReadOnlyCredentials(access_key_id, key.secret_access_key, token)


def _signature(credentials, service, region, request, timestamp_text):
    """The hex signature botocore computes for *request* signed at *timestamp_text*."""
    signer = SigV4Auth(credentials, service, region)
    request.context["timestamp"] = timestamp_text
    canonical = signer.canonical_request(request)
    return signer.signature(signer.string_to_sign(request, canonical), request)


def _same(expected, given):
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii", "replace"))


def presigned_access_key(token):
    """The access key id a presigned token claims (unverified), or None: enough to know which
    secret to load before verifying."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return None
    start = token.find("X-Amz-Credential=")
    if start < 0:
        return None
    value = unquote(token[start + len("X-Amz-Credential="):].split("&", 1)[0])
    return value.split("/", 1)[0] or None


def verify_presigned(token, lookup, now, *, max_expires=MAX_PRESIGNED_EXPIRES,
                     skew=PRESIGNED_CLOCK_SKEW):
    """Verify a presigned URL (with or without its ``https://``) -> VerifiedRequest.

    *lookup(access_key_id)* -> SigningKey or None.  *now*: POSIX seconds.  Refused (SignatureError):
    malformed, unsigned parameters, an unknown key, a wrong session token, X-Amz-Expires above
    *max_expires*, a date more than *skew* seconds ahead of *now*, past its expiry, or a
    signature that differs.  The caller checks what the parameters say (action, user, host).
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise SignatureError("not a presigned token")
    if token.startswith("https://"):
        token = token[len("https://"):]
    parts = urlsplit("https://" + token)
    if parts.fragment or parts.username is not None or parts.password is not None or not parts.hostname:
        raise SignatureError("not a presigned token")
    try:
        port = parts.port
    except ValueError:
        raise SignatureError("malformed port") from None
    params = _strict_query(parts.query)
    missing = [p for p in _AUTH_PARAMS if p not in params]
    if missing:
        raise SignatureError(f"missing {missing[0]}")
    if params["X-Amz-Algorithm"] != ALGORITHM:
        raise SignatureError("unsupported X-Amz-Algorithm")
    if params["X-Amz-SignedHeaders"] != "host":
        raise SignatureError("X-Amz-SignedHeaders must be host")
    expires_text = params["X-Amz-Expires"]
    if not expires_text.isdigit() or len(expires_text) > 6:
        raise SignatureError("malformed X-Amz-Expires")
    expires = int(expires_text)
    if not 1 <= expires <= max_expires:
        raise SignatureError(f"X-Amz-Expires {expires} outside 1..{max_expires}")
    timestamp_text = params["X-Amz-Date"]
    signed_at = _parse_timestamp(timestamp_text)
    if signed_at > now + skew:
        raise SignatureError("signed in the future (X-Amz-Date ahead of the proxy's clock)")
    if now > signed_at + expires:
        raise SignatureError("expired")
    akid, region, service = _parse_scope(params["X-Amz-Credential"], timestamp_text)
    credentials = _check_key(lookup(akid), akid, params.get("X-Amz-Security-Token"))
    given = params.pop("X-Amz-Signature")
    request = AWSRequest(method="GET", url=f"https://{parts.netloc}{parts.path or '/'}", params=params)
    expected = _signature(credentials, service, region, request, timestamp_text)
    if not _same(expected, given):
        raise SignatureError("signature mismatch")
    signed = {k: v for k, v in params.items() if k != "X-Amz-Security-Token"}
    return VerifiedRequest(akid, region, service, signed_at, expires, parts.hostname, port, signed)


def _parse_authorization(value):
    algorithm, _, rest = value.partition(" ")
    if algorithm != ALGORITHM:
        raise SignatureError("unsupported Authorization scheme")
    fields = {}
    for item in rest.split(","):
        name, sep, val = item.strip().partition("=")
        if not sep or name in fields:
            raise SignatureError("malformed Authorization header")
        fields[name] = val
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise SignatureError("malformed Authorization header")
    return fields


def verify_authorization(method, url, headers, body, lookup, now, *, skew=HEADER_CLOCK_SKEW):
    """Verify an Authorization-header SigV4 request -> VerifiedRequest.

    *url*: ``scheme://host[:port]/path?query`` with path and query exactly as received (the raw
    request URI); *headers*: a mapping of header name -> value as received (names any case);
    *body*: bytes.  The Host and X-Amz-Date headers must be signed; an X-Amz-Content-SHA256
    header must be the body's SHA-256.  The date may differ from *now* by *skew* seconds either
    way.  Refusals as in `verify_presigned`.
    """
    lower = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname in lower:
            raise SignatureError(f"repeated header {lname}")
        lower[lname] = value
    auth = lower.get("authorization")
    if not auth:
        raise SignatureError("no Authorization header")
    fields = _parse_authorization(auth)
    signed_names = fields["SignedHeaders"].split(";")
    if "host" not in signed_names or "x-amz-date" not in signed_names:
        raise SignatureError("Host and X-Amz-Date must be signed")
    if any(n not in lower for n in signed_names) or signed_names != sorted(set(signed_names)):
        raise SignatureError("malformed SignedHeaders")
    timestamp_text = lower["x-amz-date"]
    signed_at = _parse_timestamp(timestamp_text)
    if abs(signed_at - now) > skew:
        raise SignatureError("X-Amz-Date too far from the proxy's clock")
    content_hash = lower.get("x-amz-content-sha256")
    if content_hash is not None and content_hash != hashlib.sha256(body or b"").hexdigest():
        raise SignatureError("X-Amz-Content-SHA256 does not match the body")
    akid, region, service = _parse_scope(fields["Credential"], timestamp_text)
    credentials = _check_key(lookup(akid), akid, lower.get("x-amz-security-token"))
    request = AWSRequest(method=method, url=url, headers={n: lower[n] for n in signed_names},
                         data=body or b"")
    expected = _signature(credentials, service, region, request, timestamp_text)
    if not _same(expected, fields["Signature"]):
        raise SignatureError("signature mismatch")
    parts = urlsplit(url)
    return VerifiedRequest(akid, region, service, signed_at, None, parts.hostname or "", parts.port,
                           _strict_query(parts.query))
