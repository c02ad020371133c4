"""Pinning: what ties a session to its database connection, and the reset before reuse."""

import pytest

import psycopg  # test extras: a missing driver must fail, not skip


def _pins(proxy):
    return proxy.call(lambda: dict(proxy.ctx.pin_counts))


def _one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def test_set_is_visible_to_its_session_only(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2)  # cap 2
    a = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=None)
    b = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=None)
    try:
        default = _one(b, "show work_mem")
        a.execute("set work_mem = '7MB'")
        assert _pins(proxy) == {"set_variable": 1}
        assert sorted(proxy.session_states()) == ["idle", "pinned"]
        for _ in range(5):
            assert _one(a, "show work_mem") == "7MB"
            assert _one(b, "show work_mem") == default
            with b.transaction():
                assert _one(b, "show work_mem") == default
        a_pid = _one(a, "select pg_backend_pid()")
        assert all(_one(a, "select pg_backend_pid()") == a_pid for _ in range(3))
    finally:
        a.close()
        b.close()


def test_pinned_session_keeps_the_only_connection(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1,
                             ConnectionBorrowTimeout=1)
    a = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    b = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    try:
        a.execute("set work_mem = '9MB'")
        with pytest.raises(psycopg.OperationalError, match="Timed-out waiting to acquire"):
            b.execute("select 1")
        assert _one(a, "show work_mem") == "9MB"
        a.close()  # the pin ends with the session; the connection is reset and lent again
        assert _one(b, "show work_mem") == "4MB"
    finally:
        a.close()
        b.close()


def test_exclude_variable_sets_cap_1_alternating(pg_proxy_factory, pg_server):
    """With EXCLUDE_VARIABLE_SETS a SET does not pin; session parameters the server reports
    (TimeZone, DateStyle, application_name...) still follow each session over one connection."""
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1,
                             SessionPinningFilters=["EXCLUDE_VARIABLE_SETS"])
    a = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    b = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    try:
        a.execute("set timezone = 'UTC'")
        b.execute("set timezone = 'America/New_York'")
        b.execute("set application_name = 'bee'")
        assert _pins(proxy) == {}
        for _ in range(5):
            assert _one(a, "show timezone") == "UTC"
            assert _one(a, "select now()::text").endswith("+00")
            assert _one(b, "show timezone") == "America/New_York"
            assert _one(b, "select now()::text")[-3:] in ("-04", "-05")
            assert _one(a, "show application_name") == ""
            assert _one(b, "show application_name") == "bee"
        assert proxy.session_states() == ["idle", "idle"]
        assert proxy.call(lambda: len(proxy.ctx.pool.connections())) == 1
    finally:
        a.close()
        b.close()


def test_temp_table_pins_and_survives_transactions(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2)
    a = psycopg.connect(proxy.dsn(pg_server), prepare_threshold=None)
    b = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=None)
    try:
        a.execute("create temp table scratch (x int)")
        a.commit()
        assert _pins(proxy) == {"temporary_object": 1}
        for i in range(3):
            a.execute("insert into scratch values (%s)", (i,))
            a.commit()
            assert _one(b, "select to_regclass('scratch') is null") is True
        assert _one(a, "select sum(x) from scratch") == 3
        a.commit()
    finally:
        a.close()
        b.close()


def test_unnamed_extended_protocol_does_not_pin(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1)
    a = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=None)
    b = psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=None)
    try:
        for i in range(20):  # well past psycopg's default prepare threshold
            assert _one(a, "select %s::int * 2", (i,)) == 2 * i
            assert _one(b, "select %s::text", (str(i),)) == str(i)
        assert _pins(proxy) == {}
        assert proxy.session_states() == ["idle", "idle"]
    finally:
        a.close()
        b.close()


def test_named_prepared_statements_pin(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2)
    with psycopg.connect(proxy.dsn(pg_server), autocommit=True, prepare_threshold=0) as a:
        assert _one(a, "select %s::int", (1,)) == 1
        assert _pins(proxy) == {"prepared_statement": 1}
        for i in range(5):
            assert _one(a, "select %s::int", (i,)) == i


def test_pinned_connection_is_reset_before_reuse(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1)
    with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as a:
        pid = _one(a, "select pg_backend_pid()")
        a.execute("set work_mem = '11MB'")
        a.execute("create temp table leftover (x int)")
        a.execute("prepare leftover_stmt as select 1")
        a.execute("listen leftover_channel")
        a.execute("select pg_advisory_lock(4242)")
    proxy.wait_for(lambda: proxy.pool_state() == {"idle": 1}, what="reset and idle")
    with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as b:
        assert _one(b, "select pg_backend_pid()") == pid  # the same database connection
        assert _one(b, "show work_mem") == "4MB"
        assert _one(b, "select to_regclass('leftover') is null") is True
        assert _one(b, "select count(*) from pg_prepared_statements") == 0
        assert _one(b, "select count(*) from pg_listening_channels()") == 0
        assert _one(b, "select count(*) from pg_locks where locktype = 'advisory'"
                       " and pid = pg_backend_pid()") == 0
        assert _one(b, "select now() = statement_timestamp()") is True  # not in a transaction
