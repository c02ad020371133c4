"""TLS from the proxy to its databases (`DatabaseTLS`).

Per proxy, a mode says whether a database connection uses TLS and what it verifies:

=============  ===========================================================================
follow-client  TLS when the client's own connection is TLS (RDS Proxy's behaviour); verified
               as verify-full when a CAFile is configured, encrypted only otherwise
disable        never TLS
prefer         TLS when the database offers it, else plaintext; not verified
require        TLS or no connection; not verified (encryption against a passive listener)
verify-ca      TLS, the chain must lead to CAFile (or the system's roots)
verify-full    as verify-ca, and the certificate must name the target's Endpoint (DNS name or
               IP address, checked with service_identity)
=============  ===========================================================================

Only `prefer` ever falls back to plaintext.  A verification failure closes that connection with
its reason (`DatabaseTLSError`), which the connector records in TargetHealth.
"""

import os

from cryptography import x509

from txrdsproxy.tls import TLSFilesError

__all__ = ["TLSFilesError", "load_ca_file"]


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
