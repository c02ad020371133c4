"""TLS from the proxy to the databases (DatabaseTLS), against real PostgreSQL (ssl = on) and
MariaDB (--ssl-cert/--ssl-key) with a test CA: every mode, a wrong CA, a certificate that does
not name the Endpoint, a database without TLS, the pool never mixing TLS and plaintext
connections, and a wire capture between proxy and database that sees no plaintext.

The database's own view is the proof that a connection is encrypted: pg_stat_ssl / Ssl_cipher,
asked through the proxy on the very connection the proxy opened.
"""

import os

import psycopg
import pymysql
import pytest

try:
    from proxyutil import InProcessProxy, write_config
    from servers import MariaDBServer, PostgresServer, require_binaries
    from test_tls import Tap
except ImportError:  # tests/ became a package
    from tests.integration.proxyutil import InProcessProxy, write_config
    from tests.integration.servers import MariaDBServer, PostgresServer, require_binaries
    from tests.integration.test_tls import Tap

from txrdsproxy.testing.certs import TestCA, write_self_signed
from txrdsproxy.testing.secretscan import SecretScan

PG_USER, PG_PASSWORD = "tls_app", "tls-app-pass-3e9c"
PG_CLEAR_USER, PG_CLEAR_PASSWORD = "tls_clear", "tls-clear-pass-77d1"
MY_USER, MY_PASSWORD = "tls_native", "tls-native-pass-5a0b"
PG_ARN = "arn:aws:secretsmanager:local:000000000000:secret:tls_app"
PG_CLEAR_ARN = "arn:aws:secretsmanager:local:000000000000:secret:tls_clear"
MY_ARN = "arn:aws:secretsmanager:local:000000000000:secret:tls_native"
MARKER = "db-side-marker-91c4"
DB_NAME = "db.test.internal"  # the only DNS name in the database certificate (plus 127.0.0.1)


SCAN = SecretScan()


@pytest.fixture(scope="module", autouse=True)
def no_secret_in_any_log_line():
    """Every log event of this module's tests is scanned for the secrets they use (item 13)."""
    SCAN.install()
    SCAN.add(PG_PASSWORD, PG_CLEAR_PASSWORD, MY_PASSWORD)
    yield SCAN
    SCAN.uninstall()
    SCAN.check()


def _skip_unless(*binaries):
    reason = require_binaries(*binaries)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The test CA, a CA nobody trusts, and the database certificate (db.test.internal, 127.0.0.1)."""
    folder = str(tmp_path_factory.mktemp("pki"))
    ca = TestCA(folder, "db-ca")
    other = TestCA(folder, "other-ca")
    cert, key = ca.issue("db", dns_names=(DB_NAME,), ip_addresses=("127.0.0.1",))
    return {"ca": ca.cert_path, "other_ca": other.cert_path, "cert": cert, "key": key, "folder": folder}


def _server_files(server, pki, names=("cert", "key")):
    """Copy the certificate and key where the server's user can read them (key 0600)."""
    out = {}
    for name in names:
        path = server.base_dir / f"server.{name}"
        path.write_bytes(open(pki[name], "rb").read())
        os.chmod(path, 0o600)
        if server.run_user:
            os.chown(path, server.run_user.pw_uid, server.run_user.pw_gid)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def pg_tls(tmp_path_factory, pki, request):
    """PostgreSQL with ssl = on; users tls_app (scram) and tls_clear (pg_hba 'password')."""
    _skip_unless("initdb", "postgres")
    server = PostgresServer(tmp_path_factory.mktemp("pgtls"))
    request.addfinalizer(server.stop)
    server.base_dir.mkdir(parents=True, exist_ok=True)
    files = _server_files(server, pki)
    server.settings.update({"ssl": "on", "ssl_cert_file": files["cert"], "ssl_key_file": files["key"]})
    server.start()
    server.create_user(PG_USER, PG_PASSWORD)
    server.create_user(PG_CLEAR_USER, PG_CLEAR_PASSWORD, method="password")
    return server


@pytest.fixture(scope="module")
def mariadb_tls(tmp_path_factory, pki, request):
    _skip_unless("mariadbd", "mariadb-install-db", "mariadb")
    server = MariaDBServer(tmp_path_factory.mktemp("mytls"))
    request.addfinalizer(server.stop)
    server.base_dir.mkdir(parents=True, exist_ok=True)
    files = _server_files(server, pki)
    server.settings.update({"ssl_cert": files["cert"], "ssl_key": files["key"]})
    server.start()
    server.create_user(MY_USER, MY_PASSWORD)
    return server


def _proxy(tmp_path, engine, server, database_tls=None, endpoint=None, port=None, client_tls=True,
           extra_secrets=None, **overrides):
    """An in-process proxy in front of *server* (Endpoint/Port overridable: a tap, a name)."""
    if engine == "POSTGRESQL":
        entries = {PG_ARN: (PG_USER, PG_PASSWORD, "POSTGRES_SCRAM_SHA_256")}
    else:
        entries = {MY_ARN: (MY_USER, MY_PASSWORD, "MYSQL_NATIVE_PASSWORD")}
    entries.update(extra_secrets or {})
    if database_tls is not None:
        overrides["DatabaseTLS"] = database_tls
    if client_tls:
        cert, key = write_self_signed(str(tmp_path), "proxy")
        overrides["TLS"] = {"CertificateFile": cert, "PrivateKeyFile": key}
    target = {"RdsResourceId": "db-1", "Endpoint": endpoint or server.host, "Port": port or server.port}
    path = write_config(tmp_path, engine, "tls-test", "tcp:0:interface=127.0.0.1", entries, [target],
                        overrides)
    return InProcessProxy(path)


@pytest.fixture
def make_proxy(tmp_path, request):
    made = []

    def make(*args, **kwargs):
        folder = tmp_path / f"p{len(made)}"
        folder.mkdir()
        proxy = _proxy(folder, *args, **kwargs)
        made.append(proxy)
        request.addfinalizer(proxy.stop)
        return proxy

    return make


# -- helpers ---------------------------------------------------------------------------------------

def pg_connect(proxy, sslmode="require", user=PG_USER, password=PG_PASSWORD):
    return psycopg.connect(host=proxy.host, port=proxy.port, user=user, password=password,
                           dbname="postgres", sslmode=sslmode, autocommit=True, connect_timeout=20)


def pg_db_ssl(conn):
    """Whether the database sees the proxy's connection as TLS (pg_stat_ssl of this backend)."""
    return conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]


def pg_failure(proxy, sslmode="require", **kw):
    with pytest.raises(psycopg.OperationalError) as info:
        pg_connect(proxy, sslmode, **kw).close()
    return str(info.value)


def pool_tls(proxy):
    return proxy.call(lambda: sorted(bool(c.tls) for c in proxy.ctx.pool.connections()))


def health(proxy):
    """(State, Reason, Description) of the one target."""
    def read():
        record = proxy.ctx.health.health_of(proxy.ctx.topology.targets[0])
        return record.state, record.reason, record.description or ""
    return proxy.call(read)


def my_connect(proxy, tls=True):
    kw = {"ssl": {"check_hostname": False}} if tls else {"ssl_disabled": True}
    if tls:
        import ssl as ssl_module
        context = ssl_module.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
        kw = {"ssl": context}
    return pymysql.connect(host=proxy.host, port=proxy.port, user=MY_USER, password=MY_PASSWORD,
                           autocommit=True, connect_timeout=20, **kw)


def my_db_cipher(conn):
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        return cur.fetchone()[1]


# -- PostgreSQL ------------------------------------------------------------------------------------

def test_pg_follow_client_keys_the_pool_by_tls(make_proxy, pg_tls, pki):
    proxy = make_proxy("POSTGRESQL", pg_tls, {"CAFile": pki["ca"]}, endpoint="127.0.0.1")
    with pg_connect(proxy, "require") as secure, pg_connect(proxy, "disable") as plain:
        assert pg_db_ssl(secure) is True
        assert pg_db_ssl(plain) is False
        assert pool_tls(proxy) == [False, True]
    # Both connections are idle in the pool now: each kind of client gets its own kind back.
    for _ in range(3):
        with pg_connect(proxy, "disable") as plain:
            assert pg_db_ssl(plain) is False
        with pg_connect(proxy, "require") as secure:
            assert pg_db_ssl(secure) is True
    assert pool_tls(proxy) == [False, True]
    assert health(proxy)[0] == "AVAILABLE"


@pytest.mark.parametrize("mode, ca, expect_tls", [
    ("disable", None, False),
    ("prefer", None, True),
    ("require", None, True),
    ("verify-ca", "ca", True),
    ("verify-full", "ca", True),
])
def test_pg_modes_that_connect(make_proxy, pg_tls, pki, mode, ca, expect_tls):
    database_tls = {"Mode": mode}
    if ca:
        database_tls["CAFile"] = pki[ca]
    proxy = make_proxy("POSTGRESQL", pg_tls, database_tls, endpoint="127.0.0.1")
    for sslmode in ("require", "disable"):  # fixed modes do not depend on the client's TLS
        with pg_connect(proxy, sslmode) as conn:
            assert pg_db_ssl(conn) is expect_tls
    assert set(pool_tls(proxy)) == {expect_tls}


def test_pg_verify_ca_with_the_wrong_ca(make_proxy, pg_tls, pki):
    proxy = make_proxy("POSTGRESQL", pg_tls, {"Mode": "verify-ca", "CAFile": pki["other_ca"]})
    text = pg_failure(proxy)
    assert "Request returned an error" in text and "certificate verify failed" in text
    state, reason, description = health(proxy)
    assert (state, reason) == ("UNAVAILABLE", "CONNECTION_FAILED")
    assert "TLS with the database failed" in description and "certificate verify failed" in description
    assert pool_tls(proxy) == []
    assert "TLS with the database failed: certificate verify failed" in proxy.logs.text()


def test_pg_verify_full_with_a_certificate_for_another_name(make_proxy, pg_tls, pki):
    # The certificate names db.test.internal and 127.0.0.1, not localhost.
    proxy = make_proxy("POSTGRESQL", pg_tls, {"Mode": "verify-full", "CAFile": pki["ca"]},
                       endpoint="localhost")
    text = pg_failure(proxy)
    assert "does not name localhost" in text
    state, reason, description = health(proxy)
    assert reason == "CONNECTION_FAILED" and "its certificate does not name localhost" in description
    # verify-ca checks the chain only: the same certificate is fine there.
    proxy = make_proxy("POSTGRESQL", pg_tls, {"Mode": "verify-ca", "CAFile": pki["ca"]}, endpoint="localhost")
    with pg_connect(proxy) as conn:
        assert pg_db_ssl(conn) is True


def test_pg_database_without_tls(make_proxy, pg_server):
    """pg_server has no TLS: only prefer (and follow-client for plaintext clients) connect."""
    entries = {PG_ARN: ("app_scram", pg_server.users["app_scram"], "POSTGRES_SCRAM_SHA_256")}
    for mode in ("require", "verify-ca", "verify-full"):
        proxy = make_proxy("POSTGRESQL", pg_server, {"Mode": mode}, extra_secrets=entries)
        text = pg_failure(proxy, user="app_scram", password=pg_server.users["app_scram"])
        assert "the database does not offer TLS" in text, (mode, text)
        assert health(proxy)[1] == "CONNECTION_FAILED"
    proxy = make_proxy("POSTGRESQL", pg_server, {"Mode": "prefer"}, extra_secrets=entries)
    with pg_connect(proxy, user="app_scram", password=pg_server.users["app_scram"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pool_tls(proxy) == [False]
    proxy = make_proxy("POSTGRESQL", pg_server, None, extra_secrets=entries)  # follow-client
    with pg_connect(proxy, "disable", user="app_scram", password=pg_server.users["app_scram"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    text = pg_failure(proxy, "require", user="app_scram", password=pg_server.users["app_scram"])
    assert "the database does not offer TLS" in text  # no plaintext fallback for a TLS client


def test_pg_wire_between_proxy_and_database(make_proxy, pg_tls, pki):
    tap = Tap(pg_tls.port)
    try:
        proxy = make_proxy("POSTGRESQL", pg_tls, {"Mode": "verify-full", "CAFile": pki["ca"]},
                           endpoint="127.0.0.1", port=tap.port)
        with pg_connect(proxy) as conn:
            for _ in range(3):
                value = conn.execute(f"SELECT '{MARKER}' || repeat('q', 10)").fetchone()[0]
                assert value == MARKER + "q" * 10
            assert pg_db_ssl(conn) is True
        seen = bytes(tap.seen)
        assert seen[:8] == bytes.fromhex("0000000804d2162f")  # the SSLRequest, then only TLS
        assert MARKER.encode() not in seen and PG_USER.encode() not in seen
    finally:
        tap.close()
    tap = Tap(pg_tls.port)  # the control: without TLS the tap does see the query
    try:
        proxy = make_proxy("POSTGRESQL", pg_tls, {"Mode": "disable"}, endpoint="127.0.0.1", port=tap.port)
        with pg_connect(proxy) as conn:
            conn.execute(f"SELECT '{MARKER}'").fetchone()
        assert MARKER.encode() in bytes(tap.seen)
    finally:
        tap.close()


def test_pg_cleartext_password_only_over_tls(make_proxy, pg_tls, pki):
    """pg_hba 'password' asks for the password in clear: sent over TLS, refused without it
    unless AllowCleartextPassword."""
    entries = {PG_CLEAR_ARN: (PG_CLEAR_USER, PG_CLEAR_PASSWORD, "POSTGRES_SCRAM_SHA_256")}
    proxy = make_proxy("POSTGRESQL", pg_tls, {"Mode": "require"}, extra_secrets=entries)
    with pg_connect(proxy, user=PG_CLEAR_USER, password=PG_CLEAR_PASSWORD) as conn:
        assert pg_db_ssl(conn) is True
    tap = Tap(pg_tls.port)
    try:
        proxy = make_proxy("POSTGRESQL", pg_tls, {"Mode": "disable"}, port=tap.port, extra_secrets=entries)
        text = pg_failure(proxy, user=PG_CLEAR_USER, password=PG_CLEAR_PASSWORD)
        assert "cleartext password on a connection without TLS" in text
        assert PG_CLEAR_PASSWORD.encode() not in bytes(tap.seen)
    finally:
        tap.close()
    proxy = make_proxy("POSTGRESQL", pg_tls, {"Mode": "disable", "AllowCleartextPassword": True},
                       extra_secrets=entries)
    with pg_connect(proxy, user=PG_CLEAR_USER, password=PG_CLEAR_PASSWORD) as conn:
        assert pg_db_ssl(conn) is False


def test_pg_metrics(make_proxy, pg_tls, pki):
    from prometheus_client.parser import text_string_to_metric_families

    from txrdsproxy.metrics.collector import proxy_figures
    proxy = make_proxy("POSTGRESQL", pg_tls, None)
    name = proxy.ctx.name
    target = (name, "default", "db-1")
    with pg_connect(proxy, "require") as secure, pg_connect(proxy, "disable") as plain:
        secure.execute("SELECT 1")
        secure.execute("SELECT 2")
        plain.execute("SELECT 3")
        rows = proxy.call(lambda: {(n, tuple(labels)): v for n, labels, v in proxy_figures(proxy.ctx)})
        assert rows[("database_connections_with_tls", target)] == 1
        assert rows[("database_connections", target)] == 2
    text = proxy.call(lambda: proxy.service.metrics.render(proxy.service.registry.contexts()))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("rdsproxy_database_connection_requests_with_tls_total", (
        ("proxy_name", name), ("target", "db-1"), ("target_group", "default")))] == 1
    tls_n = samples[("rdsproxy_query_requests_tls_total", (("proxy_name", name),))]
    plain_n = samples[("rdsproxy_query_requests_no_tls_total", (("proxy_name", name),))]
    assert tls_n >= 2 and plain_n >= 1
    assert tls_n + plain_n == samples[("rdsproxy_query_requests_total", (("proxy_name", name),))]


# -- MariaDB ---------------------------------------------------------------------------------------

def test_mysql_follow_client_and_modes(make_proxy, mariadb_tls, pki):
    proxy = make_proxy("MYSQL", mariadb_tls, None)
    secure, plain = my_connect(proxy, tls=True), my_connect(proxy, tls=False)
    try:
        assert my_db_cipher(secure) != "" and my_db_cipher(plain) == ""
        assert pool_tls(proxy) == [False, True]
    finally:
        secure.close()
        plain.close()
    for mode, ca, endpoint in (("require", None, None), ("verify-ca", "ca", None),
                               ("verify-full", "ca", "127.0.0.1"), ("prefer", None, None)):
        database_tls = {"Mode": mode, **({"CAFile": pki[ca]} if ca else {})}
        proxy = make_proxy("MYSQL", mariadb_tls, database_tls, endpoint=endpoint, client_tls=False)
        conn = my_connect(proxy, tls=False)
        try:
            assert my_db_cipher(conn).startswith(("ECDHE", "TLS_")), mode
        finally:
            conn.close()
    proxy = make_proxy("MYSQL", mariadb_tls, {"Mode": "disable"})
    conn = my_connect(proxy, tls=True)
    try:
        assert my_db_cipher(conn) == ""
    finally:
        conn.close()


def test_mysql_verification_failures(make_proxy, mariadb_tls, pki):
    for database_tls, endpoint, words in (
            ({"Mode": "verify-ca", "CAFile": pki["other_ca"]}, None, "certificate verify failed"),
            ({"Mode": "verify-full", "CAFile": pki["ca"]}, "localhost", "does not name localhost")):
        proxy = make_proxy("MYSQL", mariadb_tls, database_tls, endpoint=endpoint)
        with pytest.raises(pymysql.err.OperationalError) as info:
            my_connect(proxy).close()
        assert info.value.args[0] == 2013  # Lost connection to the database
        state, reason, description = health(proxy)
        assert reason == "CONNECTION_FAILED" and words in description, description


def test_mysql_database_without_tls(make_proxy, mariadb_server, tmp_path):
    entries = {MY_ARN: ("app_native", mariadb_server.users["app_native"], "MYSQL_NATIVE_PASSWORD")}
    proxy = make_proxy("MYSQL", mariadb_server, {"Mode": "require"}, extra_secrets=entries, client_tls=False)
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                        password=mariadb_server.users["app_native"], connect_timeout=20).close()
    assert "the database does not offer TLS" in health(proxy)[2]
    proxy = make_proxy("MYSQL", mariadb_server, {"Mode": "prefer"}, extra_secrets=entries, client_tls=False)
    conn = pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                           password=mariadb_server.users["app_native"], connect_timeout=20)
    conn.close()
    assert pool_tls(proxy) == [False]


def test_mysql_wire_between_proxy_and_database(make_proxy, mariadb_tls, pki):
    tap = Tap(mariadb_tls.port)
    try:
        proxy = make_proxy("MYSQL", mariadb_tls, {"Mode": "verify-full", "CAFile": pki["ca"]},
                           endpoint="127.0.0.1", port=tap.port)
        conn = my_connect(proxy)
        try:
            with conn.cursor() as cur:
                for _ in range(3):
                    cur.execute(f"SELECT CONCAT('{MARKER}', REPEAT('q', 10))")
                    assert cur.fetchone() == (MARKER + "q" * 10,)
        finally:
            conn.close()
        seen = bytes(tap.seen)
        assert MARKER.encode() not in seen and MY_USER.encode() not in seen
    finally:
        tap.close()
