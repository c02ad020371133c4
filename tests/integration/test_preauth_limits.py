"""Before authentication, against the real proxy (issue 6 item 11): a silent socket counts against
MaxClientConnections from accept and is closed at ClientFirstPacketTimeout, after which a real
client gets in; the refused client gets the documented error."""

import socket

import psycopg
import pymysql
import pytest

try:
    from mysql_harness import start_mysql_proxy
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy


def _silent(proxy):
    return socket.create_connection((proxy.host, proxy.port), timeout=30)


def _closed_by_peer(sock):
    sock.settimeout(30)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pg_silent_socket_holds_a_slot_until_the_first_packet_deadline(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxClientConnections=1, ClientFirstPacketTimeout=1)
    silent = _silent(proxy)
    try:
        proxy.wait_for(lambda: len(proxy.session_states()) == 1, what="the silent socket accepted")
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(proxy.dsn(pg_server), sslmode="disable")
        assert "The maximum number of client connections to the proxy exceeded 1." in str(e.value)
        assert _closed_by_peer(silent)  # closed by the deadline, nothing sent
    finally:
        silent.close()
    proxy.wait_for(lambda: proxy.session_states() == [], what="slot free")
    with psycopg.connect(proxy.dsn(pg_server)) as conn:  # sslmode=prefer: SSLRequest first
        assert conn.execute("select 1").fetchone()[0] == 1


def test_mysql_refused_at_accept_and_silent_socket_closed(mariadb_server, tmp_path):
    proxy = start_mysql_proxy(tmp_path, mariadb_server, MaxClientConnections=1, ClientFirstPacketTimeout=1)
    try:
        silent = _silent(proxy)
        try:
            greeting = silent.recv(4096)
            assert greeting and greeting[4] == 10  # protocol 10 greeting; then the client stays silent
            with pytest.raises(pymysql.err.OperationalError) as e:
                pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                                password=mariadb_server.users["app_native"], connect_timeout=10)
            assert e.value.args[0] == 1040, e.value.args
            assert _closed_by_peer(silent)
        finally:
            silent.close()
        proxy.wait_for(lambda: proxy.session_states() == [], what="slot free")
        conn = pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                               password=mariadb_server.users["app_native"], connect_timeout=10)
        conn.close()
    finally:
        proxy.stop()
