"""Startup: per-client runtime parameters over shared connections, rejections, SSLRequest."""

import struct

import pytest

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from proxyutil import raw_connect, raw_error, raw_login, raw_query, startup_packet
except ImportError:
    from tests.integration.proxyutil import (raw_connect, raw_error, raw_login, raw_query,
                                             startup_packet)


PARAMS = ("application_name", "TimeZone", "DateStyle", "client_encoding", "extra_float_digits")


def _show_all(conn):
    return tuple(conn.execute(f"show {p}").fetchone()[0] for p in PARAMS)


def test_each_client_keeps_its_parameters_on_one_shared_connection(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1)  # cap 1
    a = psycopg.connect(proxy.dsn(pg_server, application_name="client-a"), autocommit=True)
    b = psycopg.connect(proxy.dsn(pg_server, application_name="client-b", client_encoding="LATIN1"),
                        autocommit=True)
    try:
        for _ in range(5):
            assert a.execute("show application_name").fetchone()[0] == "client-a"
            assert b.execute("show application_name").fetchone()[0] == "client-b"
            assert b.execute("show client_encoding").fetchone()[0] == "LATIN1"
            assert a.execute("show client_encoding").fetchone()[0] == "UTF8"
            assert b.execute("select 'é'").fetchone()[0] == "é"  # converted for LATIN1
        assert proxy.call(lambda: len(proxy.ctx.pool.connections())) == 1
    finally:
        a.close()
        b.close()


def test_startup_parameters_timezone_datestyle_float_digits(pg_proxy_factory, pg_server):
    """Startup-packet values (libpq env PGTZ/PGDATESTYLE, extra_float_digits from the driver)."""
    import os
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1)
    conns = {}
    old = {k: os.environ.get(k) for k in ("PGTZ", "PGDATESTYLE", "PGAPPNAME")}
    try:
        for name, tz, style in (("ny", "America/New_York", "SQL, DMY"), ("utc", "UTC", "ISO, MDY"),
                                ("tokyo", "Asia/Tokyo", "German, DMY")):
            os.environ.update({"PGTZ": tz, "PGDATESTYLE": style, "PGAPPNAME": "app-" + name})
            conns[name] = (psycopg.connect(proxy.dsn(pg_server), autocommit=True), tz, style)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        for _ in range(4):
            for name, (conn, tz, style) in conns.items():
                assert conn.execute("show timezone").fetchone()[0] == tz
                assert conn.execute("show datestyle").fetchone()[0] == style
                assert conn.execute("show application_name").fetchone()[0] == "app-" + name
                offset = conn.execute("select extract(timezone from now())::int").fetchone()[0]
                expected = {"UTC": 0}.get(tz)
                if expected is not None:
                    assert offset == expected
                assert conn.execute("select '2024-03-05'::date::text").fetchone()[0] == {
                    "SQL, DMY": "05/03/2024", "ISO, MDY": "2024-03-05", "German, DMY": "05.03.2024"}[style]
                # psycopg 3 asks for extra_float_digits? libpq does not: server default 1.
                assert conn.execute("show extra_float_digits").fetchone()[0] == "1"
        assert proxy.call(lambda: len(proxy.ctx.pool.connections())) == 1
    finally:
        for conn, _, _ in conns.values():
            conn.close()


def test_startup_packet_parameters_per_client_cap_1(pg_proxy_factory, pg_server):
    """Every session parameter from the StartupMessage, two clients alternating on one connection."""
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1)
    a_params = {"application_name": "raw-a", "TimeZone": "UTC", "DateStyle": "ISO, MDY",
                "client_encoding": "UTF8", "extra_float_digits": "3"}
    b_params = {"application_name": "raw-b", "TimeZone": "America/New_York",
                "DateStyle": "SQL, DMY", "client_encoding": "LATIN1", "extra_float_digits": "-2"}
    a, a_login = raw_login(proxy, pg_server, a_params)
    b, b_login = raw_login(proxy, pg_server, b_params)
    try:
        # ParameterStatus at login tells each client its own values.
        for login, params in ((a_login, a_params), (b_login, b_params)):
            status = dict(p.rstrip(b"\0").decode().split("\0", 1) for k, p in login if k == b"S")
            assert status["application_name"] == params["application_name"]
            assert status["TimeZone"] == params["TimeZone"]
            assert status["client_encoding"] == params["client_encoding"]
        sql = "select " + ", ".join(f"current_setting('{p}')" for p in PARAMS)
        for _ in range(3):
            for sock, params in ((a, a_params), (b, b_params)):
                (row,) = raw_query(sock, sql)
                assert row == [params[p] for p in PARAMS]
                (row,) = raw_query(sock, "select now()::text, (1/3::float8)::text")
                assert row[0].endswith("+00") == (params["TimeZone"] == "UTC"), row
                assert row[1] == {"3": "0.3333333333333333", "-2": "0.3333333333333"}[
                    params["extra_float_digits"]]
        assert proxy.call(lambda: len(proxy.ctx.pool.connections())) == 1
    finally:
        a.close()
        b.close()


# -- rejections with the seed's texts --------------------------------------------------------------

def test_protocol_2_rejected(pg_proxy):
    err = raw_error(pg_proxy, startup_packet({"user": "app_scram", "database": "appdb"},
                                             version=2 << 16))
    assert err["M"] == ("Feature not supported: RDS Proxy supports only version 3.0 of the "
                        "PostgreSQL messaging protocol.")


def test_replication_rejected(pg_proxy):
    err = raw_error(pg_proxy, startup_packet({"user": "app_scram", "database": "appdb",
                                              "replication": "database"}))
    assert err["M"] == ("Feature not supported: RDS Proxy currently doesn't support streaming "
                        "replication mode.")


def test_missing_user_rejected(pg_proxy):
    err = raw_error(pg_proxy, startup_packet({"database": "appdb"}))
    assert err["M"] == ("A user name is missing from the connection startup packet. "
                        "Provide a user name for this connection.")


def test_unsupported_option_rejected(pg_proxy, pg_server):
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(pg_proxy.dsn(pg_server, options="-c geqo=off"))
    assert "Feature not supported: RDS Proxy currently doesn't support the option options." in str(e.value)


# -- SSLRequest / GSSENCRequest ---------------------------------------------------------------------

@pytest.mark.parametrize("code", [80877103, 80877104], ids=["ssl", "gssenc"])
def test_encryption_request_answered_n(pg_proxy, code):
    with raw_connect(pg_proxy) as sock:
        sock.sendall(struct.pack("!II", 8, code))
        assert sock.recv(1) == b"N"
        # The client may go on with a plain StartupMessage on the same socket.
        sock.sendall(startup_packet({"user": "app_scram", "database": "appdb"}))
        data = sock.recv(1)
        assert data == b"R"


def test_sslmode_prefer_works_and_require_fails(pg_proxy, pg_server):
    with psycopg.connect(pg_proxy.dsn(pg_server, sslmode="prefer")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.info.pgconn.ssl_in_use is False
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(pg_proxy.dsn(pg_server, sslmode="require"))
    assert "server does not support SSL" in str(e.value)
    with psycopg.connect(pg_proxy.dsn(pg_server)) as conn:  # the proxy is fine afterwards
        assert conn.execute("select 2").fetchone() == (2,)
