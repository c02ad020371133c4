"""A client's startup and password exchange with the proxy (the proxy is the server), sans-IO.

- `read_startup(code, payload)`: a StartupMessage -> `StartupRequest` (who, which database, the
  session parameters the proxy keeps per session, and the NegotiateProtocolVersion to send
  first, if any), or `StartupRefused` with the encoded FATAL ErrorResponse the client gets.
- `PasswordExchange`: the server side of md5, SCRAM-SHA-256 and cleartext (used for IAM tokens):
  `start()` gives the authentication request to send; `receive(payload)` takes the client's
  password / SASL message and says what to send back and how the exchange stands
  (`AuthStep`).  Wrong passwords end in FAILED, never in an exception.

What stays in proxy/pg_frontend.py is the Twisted part: TLS, timers, the secrets store,
admission and cancel routing, and acting on these results.
"""

import enum

from txrdsproxy.wire.pg import auth as pgauth
from txrdsproxy.wire.pg import errors
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import PROTOCOL_3_0

__all__ = ["SESSION_PARAMS", "REPORTED_PARAMS", "ACCEPTED_STARTUP", "StartupRequest", "StartupRefused",
           "read_startup", "AuthStep", "PasswordExchange"]

# Runtime parameters each client session owns.  None means "the server's default".
SESSION_PARAMS = ("application_name", "client_encoding", "DateStyle", "TimeZone", "extra_float_digits")
# extra_float_digits is not GUC_REPORT: the server sends no ParameterStatus for it.
REPORTED_PARAMS = frozenset(SESSION_PARAMS) - {"extra_float_digits"}
ACCEPTED_STARTUP = frozenset(("user", "database", "replication") + SESSION_PARAMS)
# Parameter names are case-insensitive (libpq sends PGTZ as "timezone", PGDATESTYLE as "datestyle").
_CANONICAL = {name.lower(): name for name in ACCEPTED_STARTUP}
_NOT_REPLICATION = ("false", "off", "no", "0")


class StartupRequest:
    """A StartupMessage the proxy accepts."""

    __slots__ = ("user", "database", "desired", "negotiate")

    def __init__(self, user, database, desired, negotiate):
        self.user = user
        self.database = database
        self.desired = desired  # {SESSION_PARAMS name: value or None}
        self.negotiate = negotiate  # NegotiateProtocolVersion to send before anything, or b""


class StartupRefused(Exception):
    """A StartupMessage the proxy refuses; `error` is the encoded FATAL ErrorResponse."""

    def __init__(self, error, why):
        super().__init__(why)
        self.error = error


def read_startup(code, payload):
    """StartupMessage (protocol *code*, body) -> StartupRequest; raises StartupRefused, or
    ProtocolViolation for parameters that are not UTF-8."""
    params = {_CANONICAL.get(k.lower(), k): v for k, v in msg.parse_startup_params(payload).items()}
    ignored = [k for k in params if k.startswith("_pq_.")]
    # A newer minor version or protocol options: say what we speak, as PostgreSQL does.
    negotiate = msg.negotiate_protocol_version(0, ignored) if code != PROTOCOL_3_0 or ignored else b""
    if params.get("replication", "false").lower() not in _NOT_REPLICATION:
        raise StartupRefused(negotiate + errors.REPLICATION, "replication connection")
    user = params.get("user")
    if not user:
        raise StartupRefused(negotiate + errors.MISSING_USER, "no user")
    for name in params:
        if name not in ACCEPTED_STARTUP and not name.startswith("_pq_."):
            raise StartupRefused(negotiate + errors.unsupported_option(name), f"unsupported option {name}")
    return StartupRequest(user, params.get("database") or user,
                          {name: params.get(name) for name in SESSION_PARAMS}, negotiate)


class AuthStep(enum.Enum):
    """How a password exchange stands after a client message."""

    CONTINUE = "continue"  # send the answer, wait for the next message (SASL)
    OK = "ok"              # authenticated; the answer (SASL final, or b"") precedes AuthenticationOk
    FAILED = "failed"      # wrong password / bad SASL message
    TOKEN = "token"        # cleartext: `token` holds what the client sent (an IAM token) to check


class PasswordExchange:
    """The server side of one client's password exchange.

    *method*: "md5" (with *credentials* and a 4-byte *salt*), "scram" (with a
    `pgauth.ScramVerifier` as *verifier*) or "cleartext" (the password is handed back as
    `token` for the caller to verify: IAM).
    """

    __slots__ = ("method", "credentials", "salt", "token", "_scram", "_step")

    def __init__(self, method, credentials=None, salt=None, verifier=None):
        if method not in ("md5", "scram", "cleartext"):
            raise ValueError(f"unknown password method {method!r}")
        self.method = method
        self.credentials = credentials
        self.salt = salt
        self.token = None
        self._scram = pgauth.ScramServer(verifier) if method == "scram" else None
        self._step = 0  # SCRAM: messages taken so far

    def start(self):
        """-> the authentication request to send the client."""
        if self.method == "md5":
            return msg.auth_request(msg.AUTH_MD5, self.salt)
        if self.method == "scram":
            return msg.auth_sasl(["SCRAM-SHA-256"])
        return msg.auth_request(msg.AUTH_CLEARTEXT)

    def receive(self, payload):
        """The body of the client's PasswordMessage / SASLInitialResponse / SASLResponse
        -> (bytes to send, AuthStep)."""
        method = self.method
        try:
            if method == "md5":
                creds = self.credentials
                ok = pgauth.md5_check(creds.username, creds.password, self.salt, payload)
                return b"", (AuthStep.OK if ok else AuthStep.FAILED)
            if method == "cleartext":
                self.token = bytes(payload).rstrip(b"\0").decode("ascii", "replace")
                return b"", AuthStep.TOKEN
            self._step += 1
            if self._step == 1:
                mech, data = msg.parse_sasl_initial(payload)
                if mech != "SCRAM-SHA-256":
                    raise pgauth.AuthError(f"unsupported SASL mechanism {mech}")
                return msg.auth_request(msg.AUTH_SASL_CONTINUE, self._scram.client_first(data)), AuthStep.CONTINUE
            if self._step == 2:
                final = self._scram.client_final(payload)
                return msg.auth_request(msg.AUTH_SASL_FINAL, final), AuthStep.OK
            raise pgauth.AuthError("SASL message after the exchange ended")
        except pgauth.AuthError:
            return b"", AuthStep.FAILED
