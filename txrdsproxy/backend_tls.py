"""TLS from the proxy to its databases (`DatabaseTLS`).

Per proxy, a mode says whether a database connection uses TLS and what it verifies:

=============  ===========================================================================
follow-client  TLS when the client's own connection is TLS (RDS Proxy's behaviour); verified
               as verify-full when a CAFile is configured, encrypted only otherwise
disable        never TLS
prefer         TLS when the database offers it, else plaintext; not verified
require        TLS or no connection; not verified (protects against a passive listener only)
verify-ca      TLS, the chain must lead to CAFile (or the system's roots)
verify-full    as verify-ca, and the certificate must name the target's Endpoint (DNS name or
               IP address, checked with service_identity)
=============  ===========================================================================

Only `prefer` ever falls back to plaintext.  A failed handshake or verification closes that
connection; its reason (`tls_failure_text`) is what the connector logs and records in
TargetHealth.  The pool key carries `DatabaseTLS.wants_tls(client_tls)`, so a session never
borrows a connection of the other kind where the mode makes the difference.

How the upgrade happens is the engine's: PostgreSQL sends an SSLRequest before anything else
(`PgSSLNegotiation`, a pre-phase that then hands the transport to the backend connection), MySQL
sets CLIENT_SSL in its handshake response (the backend connection calls `start_client_tls`).

TLS 1.2 is the minimum; with TLS 1.2 only ECDHE key exchange with AEAD ciphers is offered.  The
CA file is read again when it changes on disk (a CA rotation needs no restart).
"""

import enum
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet import protocol, ssl
from twisted.logger import Logger

from txrdsproxy.pool.states import ConnState
from txrdsproxy.tls import TLS12_CIPHERS, TLSFilesError, start_tls

__all__ = ["TLSFilesError", "load_ca_file", "DatabaseTLS", "TLSPlan", "DatabaseTLSError",
           "PgSSLNegotiation", "start_client_tls", "tls_failure_text"]

PG_SSL_REQUEST = struct.pack("!II", 8, 80877103)


class DatabaseTLSError(Exception):
    """TLS to the database was required and could not be had (the message says why)."""


class Verify(enum.Enum):
    NONE = "none"  # encrypted, the certificate is not checked
    CA = "ca"  # chain to the trusted roots
    FULL = "full"  # chain and host name / IP address


@dataclass(frozen=True)
class TLSPlan:
    """What one database connection does about TLS."""

    use_tls: bool  # ask the database for TLS
    required: bool  # no TLS -> no connection (False only for prefer)
    verify: Verify
    creator: Any  # the Twisted client TLS options (IOpenSSLClientConnectionCreator) or None
    allow_cleartext_password: bool = False  # a cleartext password may go over plaintext
    server_public_key: Optional[bytes] = None  # MySQL caching_sha2 full auth without TLS


NO_TLS = TLSPlan(False, False, Verify.NONE, None)


def load_ca_file(path):
    """-> [cryptography x509.Certificate] from a PEM file of one or more CA certificates; raises
    TLSFilesError("ca", path, why)."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise TLSFilesError("ca", path, f"cannot read: {e.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TLSFilesError("ca", path, "not a PEM certificate bundle") from None
    return certs


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _client_options(verify, hostname, trust_root):
    extra = dict(raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
                 acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS))
    if verify is Verify.FULL:
        return ssl.optionsForClientTLS(hostname, trustRoot=trust_root, extraCertificateOptions=extra)
    if verify is Verify.CA:
        return ssl.CertificateOptions(trustRoot=trust_root, **extra)
    return ssl.CertificateOptions(verify=False, **extra)


class DatabaseTLS:
    """One proxy's `DatabaseTLS` settings turned into plans (see the module docstring)."""

    log = Logger()

    def __init__(self, config):
        self.config = config
        self.mode = config.mode
        self._ca_stamp = None
        self._trust_root = None
        self._options = {}  # (verify, hostname) -> client options, for the current CA file
        self._server_key = None
        if config.server_public_key_file:
            with open(config.server_public_key_file, "rb") as f:
                self._server_key = f.read()
        if config.ca_file:
            self._trust()  # validated at load; read now so a later bad file keeps this one

    def wants_tls(self, client_tls):
        """The pool-key element for a session whose client connection is (not) TLS."""
        if self.mode == "disable":
            return False
        if self.mode == "follow-client":
            return bool(client_tls)
        return True

    def _trust(self):
        """The trust root: the CA file (reloaded when it changed) or the platform's roots."""
        path = self.config.ca_file
        if not path:
            if self._trust_root is None:
                self._trust_root = ssl.platformTrust()
            return self._trust_root
        stamp = _stamp(path)
        if stamp != self._ca_stamp:
            try:
                certs = load_ca_file(path)
            except TLSFilesError as e:
                if self._trust_root is None:
                    raise DatabaseTLSError(f"CA file {e.path}: {e.message}") from None
                self.log.warn("database CA file {path} changed but cannot be used ({why}); keeping "
                              "the previous one", path=path, why=e.message)
            else:
                self._trust_root = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certs])
                self._options.clear()
                if self._ca_stamp is not None:
                    self.log.info("database CA file {path} reloaded", path=path)
            self._ca_stamp = stamp
        return self._trust_root

    def _creator(self, verify, hostname):
        trust = self._trust() if verify is not Verify.NONE else None
        key = (verify, hostname if verify is Verify.FULL else None)
        creator = self._options.get(key)
        if creator is None:
            creator = self._options[key] = _client_options(verify, hostname, trust)
        return creator

    def plan(self, db_tls, target, probe=False):
        """-> TLSPlan for a connection to *target* (a DBProxyTarget) whose pool key says
        *db_tls*; *probe*: a health check (no client: follow-client probes prefer TLS)."""
        mode, cfg = self.mode, self.config
        extras = dict(allow_cleartext_password=cfg.allow_cleartext_password,
                      server_public_key=self._server_key)
        if mode == "follow-client":
            verify = Verify.FULL if cfg.ca_file else Verify.NONE
            if probe:
                return TLSPlan(True, False, verify, self._creator(verify, target.endpoint), **extras)
            if not db_tls:
                return TLSPlan(False, False, Verify.NONE, None, **extras)
            return TLSPlan(True, True, verify, self._creator(verify, target.endpoint), **extras)
        if mode == "disable":
            return TLSPlan(False, False, Verify.NONE, None, **extras)
        if mode == "prefer":
            return TLSPlan(True, False, Verify.NONE, self._creator(Verify.NONE, None), **extras)
        verify = {"require": Verify.NONE, "verify-ca": Verify.CA, "verify-full": Verify.FULL}[mode]
        return TLSPlan(True, True, verify, self._creator(verify, target.endpoint), **extras)


def start_client_tls(transport, plan, clock):
    """Switch a database connection's *transport* to TLS as the client, per *plan*.  What is
    written from now on is queued until the handshake is done, then sent encrypted; a failed
    handshake or verification closes the connection (see `tls_failure_text`)."""
    start_tls(transport, plan.creator, clock)


def tls_failure_text(reason):
    """A short description of why TLS with the database failed, from a connectionLost *reason*
    (Failure), or None when the connection did not fail for a TLS reason."""
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - a dependency of ours
        VerificationError = ()
    if reason.check(VerificationError):
        names = []
        for error in getattr(reason.value, "errors", ()):
            wanted = getattr(error, "mismatched_id", None)
            value = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
            if value is not None:
                names.append(value.decode() if isinstance(value, bytes) else str(value))
        what = ", ".join(names) or "the target's Endpoint"
        return f"TLS with the database failed: its certificate does not name {what}"
    if reason.check(SSL.Error):
        parts = []
        for item in reason.value.args[0] if reason.value.args and isinstance(reason.value.args[0], list) else ():
            if item and item[-1]:
                parts.append(str(item[-1]))
        return f"TLS with the database failed: {'; '.join(parts) or 'handshake error'}"
    return None


class _Phase(enum.Enum):
    ASKING = "asking"  # SSLRequest sent, waiting for S or N
    HANDED_OVER = "handed-over"
    FAILED = "failed"


class PgSSLNegotiation(protocol.Protocol):
    """The PostgreSQL pre-phase: SSLRequest, the one-byte answer, TLS, then hand over.

    The endpoint connects this protocol; it asks the database for TLS and, on ``S``, switches
    the transport to TLS and makes *conn* (the backend connection) the protocol of that
    transport, whose `connectionMade` then writes its StartupMessage (sent once the handshake is
    done).  On ``N`` it hands over in plaintext only when the plan does not require TLS; else,
    and on any other answer, *conn*'s `ready` fails with DatabaseTLSError.  A database that sends
    more than the one byte before the handshake is refused: those bytes would have been read as
    if they came over TLS (CVE-2021-23222).
    """

    log = Logger()

    def __init__(self, conn, plan, clock):
        self.conn = conn
        self.plan = plan
        self.clock = clock
        self.phase = _Phase.ASKING

    @property
    def pending(self):
        return self.phase is _Phase.ASKING

    def connectionMade(self):
        self.transport.write(PG_SSL_REQUEST)

    def dataReceived(self, data):
        if self.phase is not _Phase.ASKING:
            return
        answer, extra = data[:1], data[1:]
        if extra:
            self.fail("the database sent data after its answer to the SSLRequest")
        elif answer == b"S":
            start_client_tls(self.transport, self.plan, self.clock)
            self._hand_over(self.transport.protocol)
            self.conn.tls = True
        elif answer == b"N" and not self.plan.required:
            self._hand_over(None)
        elif answer == b"N":
            self.fail("the database does not offer TLS (it refused the SSLRequest)")
        else:
            self.fail(f"unexpected answer {answer!r} to the SSLRequest")

    def _hand_over(self, tls_layer):
        """*conn* becomes the protocol: of the TLS layer when there is one, else of the TCP
        transport itself (public attributes of Twisted's protocol wrapper and transport)."""
        self.phase = _Phase.HANDED_OVER
        if tls_layer is not None:
            tls_layer.wrappedProtocol = self.conn
        else:
            self.transport.protocol = self.conn
        self.conn.makeConnection(self.transport)

    def fail(self, why):
        """Give up before the hand-over: close and fail the connection's `ready`."""
        if self.phase is not _Phase.ASKING:
            return
        self.phase = _Phase.FAILED
        self.log.warn("database connection {conn}: {why}", conn=self.conn, why=why)
        self.transport.abortConnection()
        self._fail_conn(DatabaseTLSError(why))

    def _fail_conn(self, error):
        conn = self.conn
        conn.state = ConnState.CLOSED
        if conn.ready is not None:
            d, conn.ready = conn.ready, None
            d.errback(error)

    def connectionLost(self, reason):
        if self.phase is _Phase.ASKING:
            self.phase = _Phase.FAILED
            self._fail_conn(DatabaseTLSError(
                f"the database closed the connection during the SSLRequest ({reason.getErrorMessage()})"))
