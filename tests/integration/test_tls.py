"""Client-side TLS termination: real clients (psql, psycopg, PyMySQL, the mariadb CLI) over TLS
to the proxy, RequireTLS refusals with RDS Proxy's texts, the TLS gauges, and a byte tap that
would see any plaintext leaking past the TLS layer."""

import socket
import ssl
import threading

import pymysql
import psycopg  # test extras: a missing driver must fail, not skip
import pytest

try:
    from mysql_harness import start_mysql_proxy
    from proxyutil import error_fields, raw_connect, read_messages, run_psql, startup_packet
    from test_mysql_clients import USER as MYSQL_USER, mariadb_cli
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy
    from tests.integration.proxyutil import (error_fields, raw_connect, read_messages, run_psql,
                                             startup_packet)
    from tests.integration.test_mysql_clients import USER as MYSQL_USER, mariadb_cli

from txrdsproxy.metrics.collector import proxy_figures
from txrdsproxy.testing.certs import write_self_signed

REQUIRES_TLS = "This RDS Proxy requires TLS connections."
MARKER = "plaintext-marker-7f3a"


@pytest.fixture
def cert(tmp_path):
    """(certificate, key) paths of a fresh self-signed certificate for localhost/127.0.0.1."""
    return write_self_signed(str(tmp_path))


def _tls(cert):
    """Client-side TLS with *cert*; the test databases offer no TLS, so the proxy's side is
    plaintext (DatabaseTLS: tests/integration/test_database_tls.py)."""
    return {"TLS": {"CertificateFile": cert[0], "PrivateKeyFile": cert[1]},
            "DatabaseTLS": {"Mode": "disable"}}


def _gauge(proxy, name):
    rows = proxy.call(lambda: {(n, tuple(labels)): v for n, labels, v in proxy_figures(proxy.ctx)})
    return rows[(name, (proxy.ctx.name,))]


class Tap:
    """A TCP forwarder in front of the proxy that records every byte both ways."""

    def __init__(self, port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.seen = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


# -- PostgreSQL ------------------------------------------------------------------------------------

def test_psql_sslmode_require_and_verify(pg_proxy_factory, pg_server, cert):
    proxy = pg_proxy_factory(**_tls(cert))
    out = run_psql(proxy, pg_server, ["-tAc", "select 41 + 1"], PGSSLMODE="require")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    for mode in ("verify-ca", "verify-full"):
        out = run_psql(proxy, pg_server, ["-tAc", "select 'ok'"], PGSSLMODE=mode, PGSSLROOTCERT=cert[0])
        assert out.returncode == 0, (mode, out.stderr)
        assert out.stdout.strip() == "ok"
    # Without TLS still allowed (RequireTLS off).
    out = run_psql(proxy, pg_server, ["-tAc", "select 1"], PGSSLMODE="disable")
    assert out.returncode == 0, out.stderr


def test_psycopg_tls_and_gauges(pg_proxy_factory, pg_server, cert):
    proxy = pg_proxy_factory(**_tls(cert))
    secure = psycopg.connect(proxy.dsn(pg_server, sslmode="require"), autocommit=True)
    plain = psycopg.connect(proxy.dsn(pg_server, sslmode="disable"), autocommit=True)
    try:
        assert secure.pgconn.ssl_in_use and not plain.pgconn.ssl_in_use
        assert secure.execute("select repeat('x', 200000)").fetchone()[0] == "x" * 200000
        with secure.cursor() as cur:
            cur.execute("select generate_series(1, 20000)")
            assert len(cur.fetchall()) == 20000
        assert plain.execute("select 2").fetchone()[0] == 2
        assert _gauge(proxy, "client_connections_tls") == 1
        assert _gauge(proxy, "client_connections_no_tls") == 1
    finally:
        secure.close()
        plain.close()


def test_require_tls_refuses_plaintext_with_the_rds_text(pg_proxy_factory, pg_server, cert):
    proxy = pg_proxy_factory(**_tls(cert), RequireTLS=True)
    out = run_psql(proxy, pg_server, ["-tAc", "select 1"], PGSSLMODE="disable")
    assert out.returncode != 0
    assert REQUIRES_TLS in out.stderr
    with raw_connect(proxy) as sock:
        sock.sendall(startup_packet({"user": "app_scram", "database": "appdb"}))
        msgs = read_messages(sock)
    fields = error_fields(msgs[0][1])
    assert msgs[0][0] == b"E" and fields["C"] == "28000" and fields["M"] == REQUIRES_TLS
    assert fields["S"] == "FATAL"
    with psycopg.connect(proxy.dsn(pg_server, sslmode="require"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone()[0] == 1
    # prefer (libpq's default) upgrades on its own.
    out = run_psql(proxy, pg_server, ["-tAc", "select 1"], PGSSLMODE="prefer")
    assert out.returncode == 0, out.stderr


def test_without_tls_config_sslrequest_is_still_refused(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory()
    out = run_psql(proxy, pg_server, ["-tAc", "select 1"], PGSSLMODE="require")
    assert out.returncode != 0
    assert "does not support SSL" in out.stderr


def test_no_plaintext_on_the_wire(pg_proxy_factory, pg_server, cert):
    """Replies are relayed through the TLS layer, never around it (relay.direct_write)."""
    proxy = pg_proxy_factory(**_tls(cert))
    assert proxy.call(lambda: proxy.ctx.tls is not None)
    tap = Tap(proxy.port)
    try:
        def run(mode):
            dsn = proxy.dsn(pg_server, sslmode=mode).replace(f"port={proxy.port}", f"port={tap.port}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                for _ in range(3):  # later queries are relayed on a reused, idle connection
                    value = conn.execute(f"select '{MARKER}' || repeat('y', 10)").fetchone()[0]
                    assert value == MARKER + "y" * 10
                transports = proxy.call(lambda: [(s.tls, s.transport.TLS) for s in proxy.ctx.sessions])
            return transports

        assert run("require") == [(True, True)]
        assert MARKER.encode() not in bytes(tap.seen)
        assert b"yyyyyyyyyy" not in bytes(tap.seen)
        assert run("disable") == [(False, False)]  # the control: the tap does see plaintext
        assert MARKER.encode() in bytes(tap.seen)
    finally:
        tap.close()


# -- MySQL -----------------------------------------------------------------------------------------

def _pymysql(proxy, server, port=None, **kw):
    return pymysql.connect(host=proxy.host, port=port or proxy.port, user=MYSQL_USER,
                           password=server.users[MYSQL_USER], database="appdb", autocommit=True, **kw)


def _no_verify():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_pymysql_over_tls(mariadb_server, cert, tmp_path):
    proxy = start_mysql_proxy(tmp_path / "p", mariadb_server, **_tls(cert))
    try:
        verified = _pymysql(proxy, mariadb_server, ssl={"ca": cert[0]})
        unverified = _pymysql(proxy, mariadb_server, ssl=_no_verify())
        plain = _pymysql(proxy, mariadb_server, ssl_disabled=True)
        try:
            for conn in (verified, unverified, plain):
                with conn.cursor() as cur:
                    cur.execute("SELECT 1 + 1, REPEAT('z', 100000)")
                    assert cur.fetchone() == (2, "z" * 100000)
            assert isinstance(verified._sock, ssl.SSLSocket)
            assert isinstance(unverified._sock, ssl.SSLSocket)
            assert not isinstance(plain._sock, ssl.SSLSocket)
            assert _gauge(proxy, "client_connections_tls") == 2
            assert _gauge(proxy, "client_connections_no_tls") == 1
        finally:
            for conn in (verified, unverified, plain):
                conn.close()
    finally:
        proxy.stop()


def test_mariadb_cli_ssl(mariadb_server, cert, tmp_path):
    proxy = start_mysql_proxy(tmp_path / "p", mariadb_server, **_tls(cert), RequireTLS=True)
    try:
        out = mariadb_cli(proxy, mariadb_server, ["--ssl", f"--ssl-ca={cert[0]}", "-e",
                                                  "SELECT 'over-tls'"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "over-tls"
        out = mariadb_cli(proxy, mariadb_server, ["--skip-ssl", "-e", "SELECT 1"])
        assert out.returncode != 0
        assert f"ERROR 3159 (HY000): {REQUIRES_TLS}" in out.stderr
    finally:
        proxy.stop()


def test_require_tls_mysql_3159(mariadb_server, cert, tmp_path):
    proxy = start_mysql_proxy(tmp_path / "p", mariadb_server, **_tls(cert), RequireTLS=True)
    try:
        with pytest.raises(pymysql.err.OperationalError) as info:
            _pymysql(proxy, mariadb_server, ssl_disabled=True)
        assert info.value.args == (3159, REQUIRES_TLS)
        conn = _pymysql(proxy, mariadb_server, ssl=_no_verify())
        with conn.cursor() as cur:
            cur.execute("SELECT 3")
            assert cur.fetchone() == (3,)
        conn.close()
    finally:
        proxy.stop()


def test_mysql_no_plaintext_on_the_wire(mariadb_server, cert, tmp_path):
    proxy = start_mysql_proxy(tmp_path / "p", mariadb_server, **_tls(cert))
    tap = Tap(proxy.port)
    try:
        conn = _pymysql(proxy, mariadb_server, port=tap.port, ssl=_no_verify())
        with conn.cursor() as cur:
            for _ in range(3):
                cur.execute(f"SELECT CONCAT('{MARKER}', REPEAT('y', 10))")
                assert cur.fetchone() == (MARKER + "y" * 10,)
        assert proxy.call(lambda: [(s.tls, s.transport.TLS) for s in proxy.ctx.sessions]) == [(True, True)]
        conn.close()
        assert MARKER.encode() not in bytes(tap.seen)
        assert mariadb_server.users[MYSQL_USER].encode() not in bytes(tap.seen)
    finally:
        tap.close()
        proxy.stop()


def test_require_tls_needs_tls_at_load(pg_proxy_factory):
    from txrdsproxy.config.load import ConfigError
    with pytest.raises(ConfigError, match="RequireTLS: true needs TLS"):
        pg_proxy_factory(RequireTLS=True)

