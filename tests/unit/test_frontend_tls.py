"""The frontends' side of client TLS: when they answer S / advertise CLIENT_SSL, when they call
`ctx.tls.start(transport)`, sequence ids around the MySQL SSLRequest, and RequireTLS refusals.

The TLS layer itself is a recording fake here (StringTransport has none); tests/integration/
test_tls.py runs real handshakes and checks that no plaintext reaches the wire."""

import pytest

from tests.unit import test_mysql_frontend as my
from tests.unit import test_pg_frontend as pg
from txrdsproxy.testing.certs import write_self_signed
from txrdsproxy.wire.mysql import auth as myauth
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
REQUIRES_TLS = "This RDS Proxy requires TLS connections."


class FakeTLS:
    """Stands for tls.ServerTLS: records the transports it was asked to switch."""

    def __init__(self):
        self.started = []
        self.received = []

    def start(self, transport, received=b""):
        self.started.append(transport)
        self.received.append(received)


@pytest.fixture(scope="module")
def tls_keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    cert, key = write_self_signed(str(folder))
    return {"CertificateFile": cert, "PrivateKeyFile": key}


def _with_tls(harness):
    harness.ctx.tls = FakeTLS()
    return harness


# -- PostgreSQL ---------------------------------------------------------------------------------
def test_pg_ssl_request_with_tls_answers_s_and_starts_tls(tls_keys):
    h = _with_tls(pg.Harness(TLS=tls_keys))
    h.send(SSL_REQUEST)
    assert h.sent() == b"S"
    assert h.ctx.tls.started == [h.transport]
    assert h.frontend.tls is True
    h.startup()  # (decrypted by the TLS layer)
    assert h.messages()[0][0] == b"R"


def test_pg_second_ssl_request_inside_tls_gets_n(tls_keys):
    h = _with_tls(pg.Harness(TLS=tls_keys))
    h.send(SSL_REQUEST)
    h.sent()
    h.send(SSL_REQUEST)
    assert h.sent() == b"N"
    assert len(h.ctx.tls.started) == 1


def test_pg_gssenc_request_is_still_n_with_tls(tls_keys):
    h = _with_tls(pg.Harness(TLS=tls_keys))
    h.send(b"\x00\x00\x00\x08\x04\xd2\x16\x30")
    assert h.sent() == b"N"
    assert h.ctx.tls.started == [] and h.frontend.tls is False


def test_pg_data_after_ssl_request_is_a_protocol_violation_not_tls(tls_keys):
    h = _with_tls(pg.Harness(TLS=tls_keys))
    h.send(SSL_REQUEST + b"\x16\x03\x01")  # a ClientHello sent before our answer
    assert pg.fatal(h.sent())["C"] == "08P01"
    assert h.ctx.tls.started == []


def test_pg_require_tls_refuses_a_plaintext_startup(tls_keys):
    h = _with_tls(pg.Harness(TLS=tls_keys, RequireTLS=True))
    h.startup()
    fields = pg.fatal(h.sent())
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28000", REQUIRES_TLS)
    assert h.closed


def test_pg_require_tls_after_n_is_refused_too(tls_keys):
    h = pg.Harness(TLS=tls_keys, RequireTLS=True)
    h.send(b"\x00\x00\x00\x08\x04\xd2\x16\x30")  # GSSENC: N, then plaintext
    assert h.sent() == b"N"
    h.startup()
    assert pg.fatal(h.sent())["M"] == REQUIRES_TLS


def test_pg_require_tls_accepts_a_tls_startup(tls_keys):
    h = _with_tls(pg.Harness(TLS=tls_keys, RequireTLS=True))
    h.send(SSL_REQUEST)
    h.sent()
    h.startup()
    assert h.messages()[0][0] == b"R"


# -- MySQL --------------------------------------------------------------------------------------
def _my(**extra):
    """A MySQL harness whose ctx has the fake TLS before the greeting is sent."""
    base = my.Harness(**extra)  # builds the ctx (and one greeted session we drop)
    base.lose()
    base.ctx.tls = FakeTLS()
    return my.Harness(ctx=base.ctx)


def _tls_login(h, **kw):
    greeting = h.greeting()
    assert greeting.capabilities & P.CLIENT_SSL
    caps = (my.CLIENT_CAPS | P.CLIENT_SSL) & greeting.capabilities
    h.send(P.encode_packet(_ssl_packet(caps), 1))
    assert h.sent() == b""
    assert h.ctx.tls.started == [h.transport] and h.frontend.tls is True
    auth = myauth.auth_response_for(hs.NATIVE_PASSWORD, my.PASSWORD, greeting.scramble)
    h.send(P.encode_packet(hs.build_handshake_response41(caps, my.USER, auth,
                                                         auth_plugin=hs.NATIVE_PASSWORD), 2))
    return greeting


def _ssl_packet(caps):
    import struct
    return struct.pack("<IIB", caps, 1 << 24, 45) + b"\0" * 23


def test_mysql_greeting_advertises_ssl_with_tls(tls_keys):
    h = _my(TLS=tls_keys)
    assert h.greeting().capabilities & P.CLIENT_SSL


def test_mysql_ssl_request_then_login_over_tls_with_seq_2_and_ok_seq_3(tls_keys):
    h = _my(TLS=tls_keys)
    _tls_login(h)
    assert h.packets() == [(3, P.ok_packet(status=my.AC))]
    assert h.frontend.state.value == "idle"


def test_mysql_require_tls_without_ssl_request_is_3159(tls_keys):
    h = _my(TLS=tls_keys, RequireTLS=True)
    h.handshake()
    [(seq, payload)] = h.packets()
    assert seq == 2
    assert my.err(payload) == (3159, "HY000", REQUIRES_TLS)
    assert h.closed


def test_mysql_require_tls_with_tls_logs_in(tls_keys):
    h = _my(TLS=tls_keys, RequireTLS=True)
    _tls_login(h)
    assert h.packets() == [(3, P.ok_packet(status=my.AC))]


def test_mysql_bytes_behind_the_ssl_request_go_to_the_tls_layer(tls_keys):
    """MySQL clients send the ClientHello without waiting: those bytes are TLS, not packets."""
    h = _my(TLS=tls_keys)
    greeting = h.greeting()
    caps = (my.CLIENT_CAPS | P.CLIENT_SSL) & greeting.capabilities
    hello = b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03"
    data = P.encode_packet(_ssl_packet(caps), 1) + hello
    for b in data[:-len(hello)]:  # one byte at a time up to the end of the SSLRequest
        h.send(bytes([b]))
    assert h.ctx.tls.started == [h.transport] and h.ctx.tls.received == [b""]
    h2 = _my(TLS=tls_keys)
    h2.greeting()
    h2.send(data)
    assert h2.ctx.tls.received == [hello]
    assert not h2.closed and h2.sent() == b""


def test_mysql_ssl_request_inside_tls_is_2026(tls_keys):
    h = _my(TLS=tls_keys)
    greeting = h.greeting()
    caps = (my.CLIENT_CAPS | P.CLIENT_SSL) & greeting.capabilities
    h.send(P.encode_packet(_ssl_packet(caps), 1))
    h.send(P.encode_packet(_ssl_packet(caps), 2))
    [(seq, payload)] = h.packets()
    assert seq == 3 and my.err(payload)[0] == 2026


def test_mysql_plain_handshake_response_with_tls_configured_logs_in(tls_keys):
    h = _my(TLS=tls_keys)
    h.login()
    assert h.frontend.tls is False


def test_mysql_ssl_request_without_tls_is_still_2026():
    h = my.Harness()
    h.greeting()
    h.send(P.encode_packet(_ssl_packet(my.CLIENT_CAPS | P.CLIENT_SSL), 1))
    [(seq, payload)] = h.packets()
    assert seq == 2 and my.err(payload)[0] == 2026
