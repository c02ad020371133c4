"""Property test of the PostgreSQL pin move's capture and replay (wire/pg/replay.py) against the
real PostgreSQL 15: an "old" session sets hostile settings (custom GUCs whose names need quoting,
values with quotes, backslashes, multibyte text; search_path of odd identifiers; read-only and
isolation defaults) and SQL PREPAREs (a custom parameter, whose placeholder pg_settings does
not list, makes the session unmovable); the capture reads it there, the replay (RESET ALL,
set_config..., the PREPARE texts) runs on a fresh connection whose standard_conforming_strings
is random, the proxy's check must pass, and the settings and statements read back without the
proxy's code must be equal on both."""

import psycopg  # test extras: a missing driver must fail, not skip
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txrdsproxy.wire.pg.pinning import PinReason
from txrdsproxy.wire.pg.replay import CAPTURE_SQL, NotMovable, ReplayLog

TEXT = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FFF, exclude_categories=("Cs",)), max_size=16)
IDENT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=10)


def _ident(name):
    return '"' + name.replace('"', '""') + '"'


def _literal(value):
    return "'" + value.replace("'", "''") + "'"  # (the old session: standard_conforming_strings on)


SETTING = st.one_of(
    st.tuples(st.from_regex(r"rt\.[a-z_][a-z0-9_$]{0,8}", fullmatch=True), TEXT.map(_literal)),  # custom GUCs
    st.tuples(st.just("search_path"), st.lists(IDENT.map(_ident), min_size=1, max_size=3).map(", ".join)),
    st.tuples(st.just("default_transaction_read_only"), st.sampled_from(["on", "off"])),
    st.tuples(st.just("default_transaction_isolation"),
              st.sampled_from(["'serializable'", "'repeatable read'", "'read committed'"])),
    st.tuples(st.just("work_mem"), st.sampled_from(["'8MB'", "'65kB'", "1000"])),
    st.tuples(st.just("statement_timeout"), st.sampled_from(["'3s'", "0", "'1min'"])),
)
PREPARES = st.lists(st.tuples(st.sampled_from(["p1", "P2", "p_3"]), TEXT), max_size=2, unique_by=lambda p: p[0])


def _held(conn):
    settings_ = conn.execute("SELECT name, setting FROM pg_settings WHERE source = 'session'"
                             " ORDER BY name").fetchall()
    custom = None  # (custom parameters never move: see above)
    statements = conn.execute("SELECT name, statement, parameter_types::text FROM pg_prepared_statements"
                              " ORDER BY name").fetchall()
    return settings_, custom, statements


def _run(conn, sql):
    """The proxy's run_internal: one simple Query (libpq's PQexec), -> the last result's rows as
    text (UTF-8, as the proxy reads them)."""
    result = conn.pgconn.exec_(sql)
    if result.status not in (psycopg.pq.ExecStatus.TUPLES_OK, psycopg.pq.ExecStatus.COMMAND_OK):
        raise AssertionError(result.error_message.decode("utf-8", "replace"))
    return [[None if result.get_value(r, c) is None else result.get_value(r, c).decode("utf-8", "replace")
             for c in range(result.nfields)] for r in range(result.ntuples)]


@pytest.fixture(scope="module")
def dsn(pg_server):
    return pg_server.dsn(dbname="appdb")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=st.lists(SETTING, min_size=1, max_size=4), prepares=PREPARES, scs_new=st.booleans())
def test_what_the_replay_makes_is_what_the_old_session_held(dsn, sets, prepares, scs_new):
    with psycopg.connect(dsn, autocommit=True) as old, psycopg.connect(dsn, autocommit=True) as new:
        log = ReplayLog(65536)
        for i, (name, value) in enumerate(sets):
            sql = f"SET {name} = {value}"
            _run(old, sql.encode())
            movable = log.first(PinReason.SET_VARIABLE, sql.encode(), None, True) if i == 0 else \
                log.record(sql.encode(), None, True)
            if name.startswith("rt."):
                # a custom parameter's placeholder is not in pg_settings: never moved
                assert not movable and "custom setting" in log.why_not
                assert _run(old, f"SELECT current_setting('{name}')".encode())  # (the old one has it)
                return
            assert movable, log.why_not
        for name, text in prepares:
            sql = f"PREPARE {name} AS SELECT {_literal(text)}::text"
            _run(old, sql.encode())
            assert log.record(sql.encode(), None, True), log.why_not
        [[captured]] = _run(old, CAPTURE_SQL)
        plan = log.plan(captured)
        _run(new, f"SET standard_conforming_strings = {'on' if scs_new else 'off'}".encode())
        _run(new, plan.settings_sql)
        for query in plan.prepare_queries:
            _run(new, query)
        [[again]] = _run(new, CAPTURE_SQL)
        plan.check(again)
        assert _held(new) == _held(old)


def _held_bytes(conn):
    """Every session setting's value as UTF-8 hex (whatever the connection's client_encoding)."""
    return _run(conn, b"SELECT name, pg_catalog.encode(pg_catalog.convert_to(setting, 'UTF8'), 'hex')"
                      b" FROM pg_catalog.pg_settings WHERE source = 'session' ORDER BY name")


@pytest.mark.parametrize("value", ["\u00e9", "\u00c3\u00a9", "a'b\\c", "\u20ac"])
@pytest.mark.parametrize("new_encoding", ["UTF8", "LATIN1"])
def test_a_session_in_another_client_encoding_moves_with_its_values_or_not_at_all(dsn, value, new_encoding):
    """The capture is read in the session's client_encoding and decoded as UTF-8; the replay is
    received in whatever encoding the new connection is in.  Either the check refuses, or the
    values on the new connection are the old ones, byte for byte."""
    with psycopg.connect(dsn, autocommit=True) as old, psycopg.connect(dsn, autocommit=True) as new:
        log = ReplayLog(65536)
        sql = f"SET work_mem = 1000; SET search_path = {_ident(value)}, public".encode("utf-8")
        _run(old, sql)
        assert log.first(PinReason.SET_VARIABLE, sql, None, True)
        _run(old, b"SET client_encoding = 'LATIN1'")
        assert log.record(b"SET client_encoding = 'LATIN1'", None, True)
        try:
            [[captured]] = _run(old, CAPTURE_SQL)
            plan = log.plan(captured)
        except (AssertionError, NotMovable):
            return  # not moved: the session is ended at the switchover (fail closed)
        _run(new, f"SET client_encoding = '{new_encoding}'".encode())
        _run(new, plan.settings_sql)
        try:
            [[again]] = _run(new, CAPTURE_SQL)
            plan.check(again)
        except (AssertionError, NotMovable):
            return  # the replay fails: the session is ended
        assert _held_bytes(new) == _held_bytes(old)
