"""tls.py: contexts from PEM files, TLS >= 1.2, reload when the files change, no key in logs."""

import os

import pytest
from OpenSSL import SSL
from twisted.logger import globalLogPublisher

from txrdsproxy.testing.certs import write_self_signed
from txrdsproxy.tls import ServerTLS, TLSFilesError, build_context
from txrdsproxy.testing.handshake import memory_handshake


def _served_cert(tls):
    conn = tls.serverConnectionForTLS(None)
    from cryptography.x509.oid import NameOID
    subject = conn.get_certificate().to_cryptography().subject
    return subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _bump(*paths):
    for path in paths:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_context_offers_tls12_and_later_only(tmp_path):
    cert, key = write_self_signed(str(tmp_path))
    ctx = build_context(cert, key)
    # OpenSSL 3 has no getter for the minimum: a 1.1-only client must fail against it.
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
    client_ctx.set_min_proto_version(SSL.TLS1_1_VERSION)
    with pytest.raises(SSL.Error):
        memory_handshake(ctx, client_ctx, rounds=10)


def test_reload_when_the_files_change(tmp_path):
    cert, key = write_self_signed(str(tmp_path), common_name="first")
    tls = ServerTLS(cert, key)
    assert _served_cert(tls) == "first"
    assert _served_cert(tls) == "first" and tls.reloads == 0  # unchanged: no reload
    write_self_signed(str(tmp_path), common_name="second")
    _bump(cert, key)
    assert _served_cert(tls) == "second"
    assert tls.reloads == 1


def test_a_bad_reload_keeps_the_previous_certificate_and_logs_no_key(tmp_path):
    cert, key = write_self_signed(str(tmp_path), common_name="good")
    other_cert, other_key = write_self_signed(str(tmp_path), "other", common_name="other")
    tls = ServerTLS(cert, key)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        with open(other_key, "rb") as f, open(key, "wb") as g:  # a key of another certificate
            g.write(f.read())
        _bump(key)
        assert _served_cert(tls) == "good"
        assert tls.reloads == 0
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = repr(events)
    assert "does not match" in text
    assert "PRIVATE KEY" not in text
    # The matching certificate arrives: the pair loads.
    with open(other_cert, "rb") as f, open(cert, "wb") as g:
        g.write(f.read())
    _bump(cert)
    assert _served_cert(tls) == "other"


def test_missing_files_at_start_fail_loudly(tmp_path):
    with pytest.raises(TLSFilesError) as info:
        ServerTLS(str(tmp_path / "nope.crt"), str(tmp_path / "nope.key"))
    assert info.value.which == "certificate"


def test_start_points_the_write_aggregator_at_the_injected_clock(tmp_path):
    """Twisted's startTLS flushes small writes on the global reactor; the proxy may run on
    another (the integration tests' reactor thread), where writes would never leave."""
    from twisted.internet.task import Clock

    class Aggregator:
        _clock = object()

    class Transport:
        def startTLS(self, creator):
            self.creator = creator
            self.protocol = type("P", (), {"_aggregator": Aggregator()})()

    cert, key = write_self_signed(str(tmp_path))
    clock = Clock()
    tls = ServerTLS(cert, key, clock=clock)
    transport = Transport()
    tls.start(transport)
    assert transport.creator is tls
    assert transport.protocol._aggregator._clock is clock
