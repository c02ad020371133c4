"""The proxy's own login to PostgreSQL (the proxy is the client here), sans-IO.

`BackendLogin` is fed the server's messages one at a time (kind byte as int, body) from the
StartupMessage it produced until the first ReadyForQuery, and answers each with the bytes to
send back (a PasswordMessage / SASL response) or b"".  It knows the password methods
(cleartext, only where allowed; md5; SCRAM-SHA-256 with the server's signature checked before
AuthenticationOk is believed), records ParameterStatus and BackendKeyData, and ends in
`LoginStep.READY` or `LoginStep.FAILED` (with the server's ErrorResponse fields in `error`).

Anything the server must not send at a point raises ProtocolViolation (or auth.AuthError from
the SCRAM checks): the connection is then closed by its owner (proxy/pg_backend.py), which is
also where TLS, timeouts and the Twisted transport live.
"""

import enum

from txrdsproxy.wire.pg import auth as pgauth
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import ProtocolViolation

__all__ = ["BackendLogin", "LoginStep", "CLEARTEXT_REFUSED"]

_R, _S, _K, _E, _Z = (ord(c) for c in "RSKEZ")

CLEARTEXT_REFUSED = ("the database asked for a cleartext password on a connection without TLS "
                     "(use DatabaseTLS, or set DatabaseTLS.AllowCleartextPassword)")


class LoginStep(enum.Enum):
    """Where the login stands."""

    STARTING = "starting"            # StartupMessage not produced yet
    AUTHENTICATING = "authenticating"  # waiting for the server's authentication requests
    AUTHENTICATED = "authenticated"  # AuthenticationOk: parameters and key data follow
    READY = "ready"                  # the first ReadyForQuery: logged in
    FAILED = "failed"                # the server refused (ErrorResponse in `error`)


class BackendLogin:
    """One login of the proxy to PostgreSQL as *user* into *database*; *credentials* (with
    `username` and `password`, or None where the server is expected to ask for none) answer
    its password requests.

    `cleartext_allowed` (settable until the request comes) says whether a cleartext password
    may be sent: only over TLS or when the configuration allows it.
    """

    __slots__ = ("user", "credentials", "database", "cleartext_allowed", "step", "server_params",
                 "backend_pid", "backend_secret", "txn_status", "error", "_scram")

    def __init__(self, user, database, credentials, cleartext_allowed=False):
        self.user = user
        self.credentials = credentials
        self.database = database
        self.cleartext_allowed = cleartext_allowed
        self.step = LoginStep.STARTING
        self.server_params = {}  # ParameterStatus values as reported during the login
        self.backend_pid = self.backend_secret = None
        self.txn_status = b"I"
        self.error = None  # the ErrorResponse's fields when FAILED
        self._scram = None

    def startup(self):
        """-> the StartupMessage to send first."""
        self.step = LoginStep.AUTHENTICATING
        return msg.startup_message({"user": self.user, "database": self.database})

    @property
    def done(self):
        return self.step is LoginStep.READY or self.step is LoginStep.FAILED

    def message(self, kind, payload):
        """One whole server message -> bytes to send back (b"" for none).  Raises
        ProtocolViolation / auth.AuthError for a message that breaks the login."""
        step = self.step
        if step is LoginStep.READY or step is LoginStep.FAILED or step is LoginStep.STARTING:
            raise ProtocolViolation(f"login message {bytes((kind,))!r} in step {step.value}")
        if kind == _R:
            return self._auth_request(payload)
        if kind == _E:
            self.error = msg.parse_error_fields(payload)
            self.step = LoginStep.FAILED
            return b""
        if kind == _S:
            name, value = msg.parse_parameter_status(payload)
            self.server_params[name] = value
        elif kind == _K:
            self.backend_pid, self.backend_secret = msg.parse_backend_key_data(payload)
        elif kind == _Z:
            if step is not LoginStep.AUTHENTICATED:
                raise ProtocolViolation("ReadyForQuery before AuthenticationOk")
            if len(payload) != 1:
                raise ProtocolViolation(f"bad length {len(payload) + 4} for ReadyForQuery")
            self.txn_status = bytes(payload)
            self.step = LoginStep.READY
        # NoticeResponse and others during login are ignored, as libpq does.
        return b""

    def _auth_request(self, payload):
        if self.step is not LoginStep.AUTHENTICATING:
            raise ProtocolViolation("authentication request after AuthenticationOk")
        code, data = msg.parse_auth_request(payload)
        creds = self.credentials
        if creds is None and code in (msg.AUTH_CLEARTEXT, msg.AUTH_MD5, msg.AUTH_SASL):
            raise ProtocolViolation("the database asked for a password and the proxy has none for this user")
        if code == msg.AUTH_OK:
            if self._scram is not None and not self._scram.verified:
                raise ProtocolViolation("AuthenticationOk before the SCRAM server signature was verified")
            self.step = LoginStep.AUTHENTICATED
            return b""
        if code == msg.AUTH_CLEARTEXT:
            if not self.cleartext_allowed:
                raise ProtocolViolation(CLEARTEXT_REFUSED)
            return msg.password_message(creds.password.encode())
        if code == msg.AUTH_MD5:
            return msg.password_message(pgauth.md5_response(creds.username, creds.password, data[:4]))
        if code == msg.AUTH_SASL:
            mechanisms = data.split(b"\0")
            if b"SCRAM-SHA-256" not in mechanisms:
                raise ProtocolViolation(f"database offers no supported SASL mechanism: {mechanisms!r}")
            self._scram = pgauth.ScramClient(creds.username, creds.password)
            return msg.sasl_initial("SCRAM-SHA-256", self._scram.client_first())
        if code in (msg.AUTH_SASL_CONTINUE, msg.AUTH_SASL_FINAL) and self._scram is None:
            raise ProtocolViolation("SASL continuation from the database without a SASL exchange")
        if code == msg.AUTH_SASL_CONTINUE:
            return msg.message(b"p", self._scram.server_first(data))
        if code == msg.AUTH_SASL_FINAL:
            self._scram.server_final(data)
            return b""
        raise ProtocolViolation(f"unsupported authentication request {code} from the database")
