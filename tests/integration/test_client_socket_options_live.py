"""The client sockets of a running proxy carry TCP_NODELAY and keepalive (connector.tune_client_port
sets them on the listening socket; the kernel copies them on accept), read back with getsockopt on
the proxy's side of real client connections: PostgreSQL and MySQL, plaintext and TLS."""

import socket

import psycopg  # test extras: a missing driver must fail, not skip
import pymysql
import pytest

try:
    from mysql_harness import start_mysql_proxy
    from test_mysql_clients import USER as MYSQL_USER
    from test_tls import _no_verify, _tls, cert  # noqa: F401 (the cert fixture)
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy
    from tests.integration.test_mysql_clients import USER as MYSQL_USER
    from tests.integration.test_tls import _no_verify, _tls, cert  # noqa: F401

from txrdsproxy.proxy import connector
from tests.unit.test_client_socket_options import OPTIONS


def _socket_of(transport):
    """The TCP socket under a session's transport (a TLS layer delegates to the one below)."""
    for _ in range(4):
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
        transport = getattr(transport, "transport", None)
    raise AssertionError("no socket under the session's transport")


def _client_options(proxy):
    """-> [(whether its port was tuned, {option: value}, TLS or not)] for each session, read on
    the reactor thread."""
    def read():
        out = []
        for session in proxy.ctx.sessions:
            sock = _socket_of(session.transport)
            port = getattr(session.transport, "server", None)
            out.append((getattr(port, "client_options_inherited", False),
                        {option: sock.getsockopt(level, option) for level, option, _ in OPTIONS},
                        bool(getattr(session, "tls", False))))
        return out
    return proxy.call(read)


def _check(seen, sessions):
    assert len(seen) == sessions
    expected = {option: value for _, option, value in OPTIONS}
    for tuned, options, _ in seen:
        assert tuned is connector.INHERITS_SOCKET_OPTIONS  # the path under test: inherited
        assert options == expected


def test_pg_client_sockets_plain_and_tls(pg_proxy_factory, pg_server, cert):  # noqa: F811
    proxy = pg_proxy_factory(**_tls(cert))
    conns = [psycopg.connect(proxy.dsn(pg_server, sslmode=mode), autocommit=True)
             for mode in ("require", "disable")]
    try:
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert sorted(c.info.pgconn.ssl_in_use for c in conns) == [False, True]
        _check(_client_options(proxy), 2)
    finally:
        for conn in conns:
            conn.close()


def test_mysql_client_sockets_plain_and_tls(mariadb_server, cert, tmp_path):  # noqa: F811
    proxy = start_mysql_proxy(tmp_path / "p", mariadb_server, **_tls(cert))
    login = dict(host=proxy.host, port=proxy.port, user=MYSQL_USER,
                 password=mariadb_server.users[MYSQL_USER], database="appdb", autocommit=True)
    conns = []
    try:
        conns = [pymysql.connect(**login, ssl=_no_verify()), pymysql.connect(**login, ssl_disabled=True)]
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        _check(_client_options(proxy), 2)
    finally:
        for conn in conns:
            conn.close()
        proxy.stop()


@pytest.mark.skipif(not connector.INHERITS_SOCKET_OPTIONS,
                    reason="options are copied on accept only on Linux; elsewhere each socket is set")
def test_the_listening_socket_itself_is_tuned(pg_proxy_factory):
    proxy = pg_proxy_factory()
    port = proxy.call(lambda: [r.port for r in proxy.service.registry][0])
    values = proxy.call(lambda: {option: port.socket.getsockopt(level, option) for level, option, _ in OPTIONS})
    assert values == {option: value for _, option, value in OPTIONS}
