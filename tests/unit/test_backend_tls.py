"""backend_tls.py and the TLS policy on both sides: plans per mode, the PostgreSQL SSLRequest
pre-phase (answers, injected bytes, hand-over), failure texts, and the cipher policy (TLS 1.2:
ECDHE with AEAD only) of the proxy's server and client contexts."""

import pytest
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from txrdsproxy.backend_tls import (NO_TLS, PG_SSL_REQUEST, DatabaseTLS, DatabaseTLSError,
                                    PgSSLNegotiation, TLSPlan, Verify, tls_failure_text)
from txrdsproxy.config.model import DatabaseTLSConfig, DBProxyTarget
from txrdsproxy.testing.certs import TestCA, write_self_signed
from txrdsproxy.tls import build_context
from txrdsproxy.testing.handshake import memory_handshake

TARGET = DBProxyTarget("db-1", "127.0.0.1", 5432)


@pytest.fixture
def ca(tmp_path):
    return TestCA(str(tmp_path), "ca")


@pytest.mark.parametrize("mode, client_tls, want, use, required, verify", [
    ("follow-client", True, True, True, True, Verify.NONE),
    ("follow-client", False, False, False, False, Verify.NONE),
    ("disable", True, False, False, False, Verify.NONE),
    ("prefer", False, True, True, False, Verify.NONE),
    ("require", False, True, True, True, Verify.NONE),
    ("verify-ca", False, True, True, True, Verify.CA),
    ("verify-full", True, True, True, True, Verify.FULL),
])
def test_plans_per_mode(ca, mode, client_tls, want, use, required, verify):
    policy = DatabaseTLS(DatabaseTLSConfig(mode=mode, ca_file=ca.cert_path if verify is not Verify.NONE else ""))
    assert policy.wants_tls(client_tls) is want
    plan = policy.plan(want, TARGET)
    assert (plan.use_tls, plan.required, plan.verify) == (use, required, verify)
    assert (plan.creator is not None) is use


def test_follow_client_verifies_fully_when_a_ca_is_configured_and_probes_prefer(ca):
    policy = DatabaseTLS(DatabaseTLSConfig(ca_file=ca.cert_path))
    assert policy.plan(True, TARGET).verify is Verify.FULL
    probe = policy.plan(False, TARGET, probe=True)
    assert probe.use_tls and not probe.required and probe.verify is Verify.FULL


def test_client_options_are_cached_per_host_until_the_ca_file_changes(ca, tmp_path):
    import os
    policy = DatabaseTLS(DatabaseTLSConfig(mode="verify-full", ca_file=ca.cert_path))
    first = policy.plan(True, TARGET).creator
    assert policy.plan(True, TARGET).creator is first
    assert policy.plan(True, DBProxyTarget("db-2", "db.example", 5432)).creator is not first
    TestCA(str(tmp_path), "ca")  # a new CA written over the file
    st = os.stat(ca.cert_path)
    os.utime(ca.cert_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert policy.plan(True, TARGET).creator is not first
    with open(ca.cert_path, "w") as f:
        f.write("garbage")
    kept = policy.plan(True, TARGET).creator  # a broken CA file keeps the previous trust
    assert kept is not None


class Conn:
    """Stands for a backend connection: records makeConnection, has `ready`."""

    def __init__(self):
        self.ready = defer.Deferred()
        self.failures = []
        self.ready.addErrback(self.failures.append)
        self.transport = None
        self.tls = False
        self.state = "connecting"

    def makeConnection(self, transport):
        self.transport = transport


def negotiation(required=True):
    conn = Conn()
    plan = TLSPlan(True, required, Verify.NONE, object())
    proto = PgSSLNegotiation(conn, plan, Clock())
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value() == PG_SSL_REQUEST
    return conn, proto, transport


def failure_text(conn):
    assert conn.ready is None  # fired, and let go
    (f,) = conn.failures
    assert f.check(DatabaseTLSError)
    return f.getErrorMessage()


def test_n_fails_when_tls_is_required():
    conn, proto, transport = negotiation(required=True)
    proto.dataReceived(b"N")
    assert "does not offer TLS" in failure_text(conn)
    assert transport.disconnecting or transport.disconnected or conn.state == "closed"
    assert conn.transport is None  # never handed over


def test_n_hands_over_in_plaintext_for_prefer():
    conn, proto, transport = negotiation(required=False)
    proto.dataReceived(b"N")
    assert conn.transport is transport and transport.protocol is conn and not conn.tls


@pytest.mark.parametrize("data", [b"SX", b"S\x00\x00\x00\x08", b"NE"])
def test_bytes_after_the_answer_are_refused(data):
    """CVE-2021-23222: bytes injected before the TLS handshake must not be read as TLS data."""
    conn, proto, transport = negotiation(required=False)
    proto.dataReceived(data)
    assert "sent data after its answer" in failure_text(conn)
    assert conn.transport is None


def test_other_answers_and_a_lost_connection_fail():
    conn, proto, _ = negotiation()
    proto.dataReceived(b"E")
    assert "unexpected answer" in failure_text(conn)
    conn, proto, _ = negotiation()
    proto.connectionLost(Failure(ConnectionError("reset")))
    assert "closed the connection during the SSLRequest" in failure_text(conn)
    assert proto.pending is False


def test_tls_failure_texts():
    from service_identity import VerificationError
    from service_identity.hazmat import DNS_ID, DNSMismatch
    err = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("db.example"))])
    assert tls_failure_text(Failure(err)) == \
        "TLS with the database failed: its certificate does not name db.example"
    ssl_err = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert tls_failure_text(Failure(ssl_err)) == "TLS with the database failed: certificate verify failed"
    assert tls_failure_text(Failure(ConnectionError("reset"))) is None
    assert NO_TLS.use_tls is False


@pytest.mark.parametrize("cipher, accepted", [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", True),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", True),
    ("ECDHE-ECDSA-AES128-SHA256", False),  # CBC
    ("ECDHE-ECDSA-AES256-SHA", False),  # CBC, SHA1
])
def test_server_offers_only_ecdhe_with_aead_under_tls12(tmp_path, cipher, accepted):
    cert, key = write_self_signed(str(tmp_path))
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    client_ctx.set_cipher_list(cipher.encode() + b":@SECLEVEL=0")
    if accepted:
        assert memory_handshake(build_context(cert, key), client_ctx) == cipher
    else:
        with pytest.raises(SSL.Error):
            memory_handshake(build_context(cert, key), client_ctx)


def test_database_client_options_offer_only_ecdhe_with_aead_under_tls12(tmp_path):
    cert, key = write_self_signed(str(tmp_path))
    policy = DatabaseTLS(DatabaseTLSConfig(mode="require"))
    client_ctx = policy.plan(True, TARGET).creator.getContext()
    for cipher, accepted in (("ECDHE-ECDSA-AES128-GCM-SHA256", True), ("ECDHE-ECDSA-AES128-SHA", False)):
        server_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        server_ctx.use_certificate_chain_file(cert)
        server_ctx.use_privatekey_file(key)
        server_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        server_ctx.set_cipher_list(cipher.encode() + b":@SECLEVEL=0")
        if accepted:
            assert memory_handshake(server_ctx, client_ctx) == cipher
        else:
            with pytest.raises(SSL.Error):
                memory_handshake(server_ctx, client_ctx)


def test_twisted_tls_layer_still_has_the_aggregator_clock_we_repoint():
    """tls.start_tls points a private attribute of Twisted's TLS layer at our clock: this
    fails the day Twisted renames it (then start_tls silently does nothing)."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory
    options = DatabaseTLS(DatabaseTLSConfig(mode="require")).plan(True, TARGET).creator
    factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(Protocol))
    tls_protocol = factory.buildProtocol(None)
    aggregator = getattr(tls_protocol, "_aggregator", None)
    assert aggregator is not None and hasattr(aggregator, "_clock")
