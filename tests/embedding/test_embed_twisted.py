"""A Twisted application embedding a proxy (txrdsproxy.embed) on pytest-twisted's reactor."""

import psycopg
import pytest
import pytest_twisted
from twisted.internet import threads
from zope.interface import implementer

from tests.embedding.conftest import APP_DB, app_secrets, proxy_dict
from txrdsproxy.auth.secrets import Credentials, ISecretsStore, SecretValue

from txrdsproxy.embed import EmbeddedProxies, build_config
from txrdsproxy.runtime import ListenFailed


def _query(host, port, password, sql):
    with psycopg.connect(host=host, port=port, user="app_scram", password=password,
                         dbname=APP_DB, sslmode="disable", autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


@implementer(ISecretsStore)
class Vault:
    """An application's own secrets store: anything providing ISecretsStore plugs in."""

    def __init__(self, values):
        self.values = values
        self.asked = []

    def get(self, arn):
        self.asked.append(arn)
        value = self.values.get(arn)
        return None if value is None else Credentials(value["username"], value["password"], arn)

    def find_user(self, arns, username):
        for arn in arns:
            creds = self.get(arn)
            if creds is not None and creds.username == username:
                return arn, creds
        return None

    def get_value(self, arn):
        value = self.values.get(arn)
        return None if value is None else SecretValue(value)

    def fetch(self, arn):
        from twisted.internet import defer
        return defer.succeed(self.get_value(arn))

    def watch(self, arns):
        from twisted.internet import defer
        return defer.succeed(None)


@pytest_twisted.inlineCallbacks
def test_start_query_stop_with_a_dict_and_a_mapping_of_secrets(pg_server):
    proxies = EmbeddedProxies(proxy_dict(pg_server), secrets=app_secrets(pg_server))
    started = yield proxies.start()
    assert started is proxies
    host, port = proxies.address("emb-pg")
    assert host == "127.0.0.1" and port > 0  # Listen port 0: the real one is known now
    assert proxies.admin_address is None  # no admin listener unless asked
    password = pg_server.users["app_scram"]
    answer = yield threads.deferToThread(_query, host, port, password, "SELECT current_user")
    assert answer == "app_scram"
    # The same registry the twistd service uses: the proxy's pool served it.
    runtime = proxies.registry.get("emb-pg")
    assert len(runtime.ctx.pool.connections()) >= 1
    yield proxies.stop()
    assert proxies.addresses() == {}
    with pytest.raises(psycopg.OperationalError):
        yield threads.deferToThread(_query, host, port, password, "SELECT 1")
    yield proxies.stop()  # twice is harmless


@pytest_twisted.inlineCallbacks
def test_config_objects_an_own_secrets_store_and_an_admin_listener(pg_server):
    config = build_config(proxy_dict(pg_server, name="emb-obj"), own_secrets=True)
    vault = Vault(app_secrets(pg_server))
    proxies = EmbeddedProxies(config.proxies[0], secrets=vault, admin="tcp:0:interface=127.0.0.1")
    yield proxies.start()
    try:
        host, port = proxies.address("emb-obj")
        answer = yield threads.deferToThread(_query, host, port, pg_server.users["app_scram"],
                                             "SELECT 41 + 1")
        assert answer == 42
        assert "arn:app" in vault.asked  # the application's store was asked
        admin_host, admin_port = proxies.admin_address
        import urllib.request
        body = yield threads.deferToThread(
            lambda: urllib.request.urlopen(f"http://{admin_host}:{admin_port}/metrics", timeout=10).read())
        assert b'rdsproxy_client_connections_received_total{proxy_name="emb-obj"} 1.0' in body
    finally:
        yield proxies.stop()


def test_bad_secrets_are_refused():
    with pytest.raises(TypeError, match="ISecretsStore"):
        EmbeddedProxies({"DBProxies": []}, secrets=42)


@pytest_twisted.inlineCallbacks
def test_a_busy_port_fails_start_with_the_address(pg_server):
    first = EmbeddedProxies(proxy_dict(pg_server, name="emb-a"), secrets=app_secrets(pg_server))
    yield first.start()
    try:
        _, port = first.address("emb-a")
        second = EmbeddedProxies(proxy_dict(pg_server, name="emb-b", listen=f"tcp:{port}:interface=127.0.0.1"),
                                 secrets=app_secrets(pg_server))
        with pytest.raises(ListenFailed, match=str(port)):
            yield second.start()
        assert second.addresses() == {}
    finally:
        yield first.stop()
