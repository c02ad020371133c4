"""TLS for the proxy's clients: pyOpenSSL server contexts built from PEM files.

`ServerTLS` is what a frontend passes to ``transport.startTLS`` once a client asked for TLS
(PostgreSQL SSLRequest, MySQL SSLRequest).  It provides Twisted's
`IOpenSSLServerConnectionCreator`, so it is asked for a new connection at every handshake; that
is when it looks at the files' mtimes and, when they changed, loads them again (a certificate
rotated on disk is picked up without a restart, as RDS Proxy's ACM certificates are).  A reload
that fails keeps the previous context and logs which file was wrong; key material is never
logged.  Only TLS 1.2 and later are offered, and with TLS 1.2 only ECDHE key exchange with AEAD
ciphers (AES-GCM, ChaCha20-Poly1305): forward secrecy and no CBC/RC4/3DES (TLS 1.3's suites are
all of that kind already).

Backend TLS (proxy -> database) is in `backend_tls.py`; both use `start_tls`.
"""

import os

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer


# OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are configured separately and all AEAD).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def start_tls(transport, creator, clock=None):
    """Switch a TCP *transport* to TLS with *creator* (server or client side, as the transport
    is), queueing what is written until the handshake is done.

    Twisted's `startTLS` builds its TLS layer with a small-write aggregator that flushes on the
    *global* reactor; point it at our injected clock, or writes would wait forever when the
    proxy runs on another reactor (the integration tests' reactor thread).  The aggregator is a
    private attribute: looked up defensively, and tests/unit/test_tls_context.py checks it.
    """
    transport.startTLS(creator)
    aggregator = getattr(getattr(transport, "protocol", None), "_aggregator", None)
    if clock is not None and getattr(aggregator, "_clock", None) is not None:
        aggregator._clock = clock


class TLSFilesError(Exception):
    """A certificate or key file cannot be used; ``which`` is "certificate" or "key"."""

    def __init__(self, which, path, message):
        super().__init__(f"{path}: {message}")
        self.which, self.path, self.message = which, path, message


def _reason(e):
    """A short text for an OpenSSL error (never the file's contents)."""
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        parts = [str(item[-1]) for item in e.args[0] if item]
        if parts:
            return "; ".join(parts)
    return str(e) or e.__class__.__name__


def build_context(cert_path, key_path):
    """-> a new server `OpenSSL.SSL.Context` from PEM files; raises TLSFilesError naming the
    file that could not be read or used."""
    for which, path in (("certificate", cert_path), ("key", key_path)):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise TLSFilesError(which, path, f"cannot read: {e.strerror}") from None
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                    | SSL.OP_SINGLE_DH_USE | SSL.OP_SINGLE_ECDH_USE)
    ctx.set_cipher_list(TLS12_CIPHERS.encode())
    try:
        ctx.use_certificate_chain_file(os.fsencode(cert_path))
    except SSL.Error as e:
        raise TLSFilesError("certificate", cert_path,
                            f"not a PEM certificate (chain): {_reason(e)}") from None
    try:
        ctx.use_privatekey_file(os.fsencode(key_path))
    except SSL.Error as e:
        why = _reason(e)
        if "mismatch" in why:
            raise TLSFilesError("key", key_path, f"does not match the certificate in {cert_path}") from None
        raise TLSFilesError("key", key_path, f"not an unencrypted PEM private key: {why}") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSFilesError("key", key_path, f"does not match the certificate in {cert_path}") from None
    return ctx


def _stamp(path):
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A reloading server TLS connection creator for `transport.startTLS`."""

    log = Logger()

    def __init__(self, cert_path, key_path, clock=None):
        self.cert_path, self.key_path = cert_path, key_path
        self.clock = clock
        self._stamps = self._read_stamps()
        self._context = build_context(cert_path, key_path)  # fails loudly at start
        self.reloads = 0

    def _read_stamps(self):
        try:
            return (_stamp(self.cert_path), _stamp(self.key_path))
        except OSError:
            return None

    def context(self):
        """-> the current SSL.Context, reloaded first if either file changed on disk."""
        stamps = self._read_stamps()
        if stamps is not None and stamps != self._stamps:
            self._stamps = stamps
            try:
                self._context = build_context(self.cert_path, self.key_path)
            except TLSFilesError as e:
                self.log.warn("TLS files changed but cannot be loaded ({which} {path}: {why}); "
                              "keeping the previous certificate", which=e.which, path=e.path,
                              why=e.message)
            else:
                self.reloads += 1
                self.log.info("TLS certificate reloaded from {path}", path=self.cert_path)
        return self._context

    def start(self, transport, received=b""):
        """Switch *transport* (a server TCP transport) to TLS now; what is written after this
        goes out encrypted, what arrives is decrypted before the protocol sees it.

        *received*: bytes that already arrived after the request for TLS (MySQL clients send
        their ClientHello right behind the SSLRequest, without waiting for an answer); they
        are the start of the TLS stream and go to the TLS layer.
        """
        start_tls(transport, self, self.clock)
        if received:
            transport.protocol.dataReceived(received)

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.context(), None)
