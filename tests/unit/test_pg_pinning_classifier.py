"""Tests for txrdsproxy.wire.pg.pinning: what SQL pins a PostgreSQL session."""

import pytest

from txrdsproxy.wire.pg import pinning
from txrdsproxy.wire.pg.pinning import (
    MAX_STATEMENT_BYTES,
    PinReason,
    classify_bind,
    classify_function_call,
    classify_parse,
    classify_query,
    unsafe_client_encoding,
)

P = PinReason
SET, RESET, PREP, TEMP = P.SET_VARIABLE, P.RESET, P.PREPARED_STATEMENT, P.TEMPORARY_OBJECT
SEQ, LOCK = P.SEQUENCE_FUNCTION, P.ADVISORY_LOCK
PROC, SFUNC = P.PROCEDURAL_CODE, P.SESSION_FUNCTION

# (sql, reason with exclude_variable_sets=False, reason with exclude_variable_sets=True)
CASES = [
    # plain statements: no pin
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = $1", None, None),
    (b"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 2", None, None),
    (b"INSERT INTO pgbench_history (tid, bid) VALUES ($1, $2)", None, None),
    (b"BEGIN", None, None),
    (b"", None, None),
    (b"   ;;  ; ", None, None),
    (b"ALTER TABLE t ALTER COLUMN c SET DEFAULT 1", None, None),
    (b"ALTER ROLE r SET search_path = x", None, None),
    (b"CREATE FUNCTION f() RETURNS int SET search_path = x AS 'select 1' LANGUAGE sql", None, None),
    (b"select offset, settings, loaded, reset_at from t", None, None),
    # SET and friends
    (b"SET search_path = x", SET, None),
    (b"sEt search_path = x", SET, None),
    (b"set\ttimezone to 'UTC'", SET, None),
    (b"SET SESSION statement_timeout = 0", SET, None),
    (b"SET SESSION AUTHORIZATION bob", SET, SET),
    (b"SET transaction_isolation = 'serializable'", SET, None),
    (b"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", SET, None),
    (b"SET LOCAL search_path = x", None, None),
    (b"set local statement_timeout = 5", None, None),
    (b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None, None),
    (b"SET CONSTRAINTS ALL DEFERRED", None, None),
    (b"BEGIN; SET LOCAL work_mem = '64MB'; COMMIT", None, None),
    (b"/* leading comment */ SET x.y = 1", SET, None),
    (b"-- line\nSET x.y = 1", SET, None),
    (b"/* outer /* nested; select 1 */ still comment */ SET x.y = 1", SET, None),
    (b"RESET ALL", RESET, None),
    (b"reset search_path", RESET, None),
    (b"select set_config('a.b', 'c', false)", SET, None),
    (b"select set_config('a.b', 'c', true)", None, None),
    (b"select set_config('a.b', 'c', 'on')", None, None),
    (b"select pg_catalog.set_config('a.b', 'c', false)", SET, None),
    (b"select set_config('a.b', 'c', $1)", SET, None),
    (b"select set_config('a.b', lower('C'), 'true'::bool)", SET, None),
    (b"select set_config('a.b', 'c'", SET, None),
    (b"select set_config('a.b', 'c', true), nextval('s')", SEQ, SEQ),
    (b"select myschema.set_config('a.b', 'c', false)", None, None),
    # prepared statements
    (b"PREPARE q (int) AS SELECT $1", PREP, PREP),
    (b"prepare q as select 1", PREP, PREP),
    (b"PREPARE TRANSACTION 'gid-1'", None, None),
    (b"EXECUTE q(1)", None, None),
    (b"DEALLOCATE q", None, None),
    (b"DEALLOCATE ALL", None, None),
    # temporary objects
    (b"CREATE TEMP TABLE t (id int)", TEMP, TEMP),
    (b"CREATE TEMPORARY TABLE t (id int)", TEMP, TEMP),
    (b"create temp sequence s", TEMP, TEMP),
    (b"CREATE TEMP VIEW v AS SELECT 1", TEMP, TEMP),
    (b"CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1", TEMP, TEMP),
    (b"CREATE OR REPLACE TEMP VIEW v AS SELECT 1", TEMP, TEMP),
    (b"CREATE GLOBAL TEMPORARY TABLE t (id int)", TEMP, TEMP),
    (b"CREATE LOCAL TEMP TABLE t (id int)", TEMP, TEMP),
    (b"CREATE TABLE pg_temp.t (id int)", TEMP, TEMP),
    (b'CREATE TABLE "pg_temp".t (id int)', TEMP, TEMP),
    (b"SELECT * INTO TEMP t FROM x", TEMP, TEMP),
    (b"SELECT * INTO TEMPORARY TABLE t FROM x", TEMP, TEMP),
    (b"SELECT 1 AS a INTO pg_temp.t", TEMP, TEMP),
    (b"CREATE UNLOGGED TABLE t (id int)", None, None),
    (b"CREATE TABLE temp (id int)", None, None),
    (b"INSERT INTO temp VALUES (1)", None, None),
    (b"SELECT * INTO t FROM x", None, None),
    (b"SELECT * FROM temp", None, None),
    # cursors
    (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", P.HOLD_CURSOR, P.HOLD_CURSOR),
    (b"declare c no scroll cursor with hold for select 1", P.HOLD_CURSOR, P.HOLD_CURSOR),
    (b"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", None, None),
    (b"DECLARE c CURSOR FOR SELECT 1", None, None),
    (b"DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold", None, None),
    (b"DECLARE c CURSOR FOR SELECT nextval('s')", SEQ, SEQ),
    # discard, listen, load
    (b"DISCARD ALL", P.DISCARD, P.DISCARD),
    (b"discard temp", P.DISCARD, P.DISCARD),
    (b"LISTEN channel", P.LISTEN, P.LISTEN),
    (b"UNLISTEN *", None, None),
    (b"NOTIFY channel, 'set x'", None, None),
    (b"LOAD 'auto_explain'", P.LOAD, P.LOAD),
    # sequence functions
    (b"SELECT nextval('s')", SEQ, SEQ),
    (b"select NEXTVAL ( 's' )", SEQ, SEQ),
    (b"SELECT setval('s', 42)", SEQ, SEQ),
    (b"SELECT currval('s')", SEQ, SEQ),
    (b"SELECT lastval()", SEQ, SEQ),
    (b"SELECT pg_catalog.nextval('s')", SEQ, SEQ),
    (b"SELECT pg_catalog . nextval('s')", SEQ, SEQ),
    (b'SELECT "nextval"(\'s\')', SEQ, SEQ),
    (b"WITH x AS (SELECT nextval('s')) SELECT * FROM x", SEQ, SEQ),
    (b"INSERT INTO t (id) VALUES (nextval('t_id_seq'))", SEQ, SEQ),
    (b"SELECT nextval_count FROM t", None, None),
    (b"SELECT nextval FROM t", None, None),
    (b'SELECT "NEXTVAL"(1)', None, None),
    (b"SELECT t.nextval FROM t", None, None),
    (b"SELECT myschema.nextval('s')", None, None),
    (b"SELECT my_nextval('s')", None, None),
    # advisory locks
    (b"SELECT pg_advisory_lock(1)", LOCK, LOCK),
    (b"SELECT pg_advisory_lock_shared(1, 2)", LOCK, LOCK),
    (b"SELECT pg_try_advisory_lock(1)", LOCK, LOCK),
    (b"select PG_TRY_ADVISORY_LOCK_SHARED(1)", LOCK, LOCK),
    (b"SELECT pg_advisory_xact_lock(1)", None, None),
    (b"SELECT pg_try_advisory_xact_lock(1)", None, None),
    (b"SELECT pg_advisory_xact_lock_shared(1)", None, None),
    (b"SELECT pg_advisory_unlock(1)", None, None),
    (b"SELECT pg_advisory_unlock_all()", None, None),
    # keywords in literals, identifiers and comments never count
    (b"SELECT 'set x=1'", None, None),
    (b"SELECT 'it''s; SET x = 1'", None, None),
    (b"SELECT E'it\\'s; SET x = 1'", None, None),
    (b"SELECT e'\\\\'; SET x = 1", SET, None),
    (b"SELECT 'a\\'; SET x = 1", SET, None),
    (b"SELECT $$ set $$", None, None),
    (b"SELECT $tag$ ; SET x = 1; $notag$ $tag$", None, None),
    (b"SELECT $a$ nextval('s') $a$, $1", None, None),
    (b'SELECT "set" FROM t', None, None),
    (b'SELECT 1 AS "x; SET y = 1"', None, None),
    (b"/* set */ select 1", None, None),
    (b"-- set\nselect 1", None, None),
    (b"select 1 -- ; set x = 1", None, None),
    (b"select 1 /* nextval( */", None, None),
    (b"SELECT 'nextval(' || 'x'", None, None),
    # multi-statement strings: first reason in statement order
    (b"SELECT 1; SET x.y = 2", SET, None),
    (b"SELECT 1; LISTEN c; SET x.y = 2", P.LISTEN, P.LISTEN),
    (b"SET x.y = 2; LISTEN c", SET, P.LISTEN),
    (b"RESET x; SELECT nextval('s')", RESET, SEQ),
    (b"BEGIN; SELECT 1; COMMIT", None, None),
    (b"select 1;set x.y=1", SET, None),
    # unterminated quotes and comments swallow the rest, and never raise
    (b"SELECT 'unterminated; SET x = 1", None, None),
    (b"SELECT E'unterminated\\'; SET x = 1", None, None),
    (b'SELECT "unterminated; SET x = 1', None, None),
    (b"SELECT $q$ unterminated; SET x = 1", None, None),
    (b"SELECT 1 /* unterminated; SET x = 1", None, None),
    (b"SELECT 1 /* a /* b */ SET x = 1", None, None),
    (b"-- only a comment; SET x = 1", None, None),
    (b"SET", SET, None),
    (b"DECLARE", None, None),
    (b"select nextval(", SEQ, SEQ),
    # bytes that are not UTF-8
    (b"SELECT '\xff\xfe' ; SET x = 1", SET, None),
    (b"SELECT \xc3\x28 FROM t WHERE set_x = 1", None, None),
    (b"\xff\xfeSET x = 1", None, None),
    (b"SELECT \xe2nextval('s')", None, None),
    (b"SELECT nextval('\x80\x81')", SEQ, SEQ),
    # the five leaks of issue 6, each verified against PostgreSQL 15 through the pool
    (b"-- comment\rSET search_path = evil", SET, None),
    (b"SELECT 1; -- comment\rSET search_path = evil", SET, None),
    (b"SELECT 1 -- comment\r; CREATE TEMP TABLE t (i int)", TEMP, TEMP),
    (b'SELECT U&"\\0073et_config"(\'search_path\', \'evil\', false)', SET, None),
    (b'SELECT U&"!0073et_config" UESCAPE \'!\' (\'search_path\', \'evil\', false)', SET, None),
    (b'SELECT U&"\\+00006Eextval"(\'s\')', SEQ, SEQ),
    (b"UPDATE pg_settings SET setting = 'evil' WHERE name = 'search_path'", SET, SET),
    (b"update PG_CATALOG.\"pg_settings\" set setting = 'x' where name = 'work_mem'", SET, SET),
    (b"WITH u AS (UPDATE pg_settings SET setting = 'x' WHERE name = 'y' RETURNING 1) SELECT 1", SET, SET),
    (b"SELECT setting FROM pg_settings WHERE name = 'search_path'", None, None),
    (b"EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", TEMP, TEMP),
    (b"explain (analyze, buffers) create temporary table t as select 1", TEMP, TEMP),
    (b"EXPLAIN ANALYZE VERBOSE SELECT pg_advisory_lock(1)", LOCK, LOCK),
    (b"EXPLAIN ANALYZE DECLARE c CURSOR WITH HOLD FOR SELECT 1", P.HOLD_CURSOR, P.HOLD_CURSOR),
    (b"EXPLAIN SELECT 1", None, None),
    (b"DO $$ BEGIN PERFORM set_config('search_path', 'evil', false); END $$", PROC, PROC),
    (b"do language plpgsql $x$ begin end $x$", PROC, PROC),
    (b"CALL my_procedure(1)", PROC, PROC),
    # quoted, schema-qualified and otherwise disguised names
    (b'SELECT "pg_catalog"."set_config"(\'a.b\', \'c\', false)', SET, None),
    (b"SELECT pg_catalog /* x */ . set_config('a.b', 'c', false)", SET, None),
    (b'SELECT U&"pg\\005fcatalog".U&"set\\005fconfig"(\'a.b\', \'c\', false)', SET, None),
    (b"SELECT appdb.pg_catalog.nextval('s')", SEQ, SEQ),
    (b'SELECT "Set_Config"(\'a.b\', \'c\', false)', None, None),
    (b"SELECT set_config(setting_name => 'a.b', new_value => 'c', is_local => true)", SET, SET),
    (b"SELECT set_config($1, 'c', false)", SET, SET),
    # settings that change how the server lexes pin even when local or excluded
    (b"SET LOCAL standard_conforming_strings = off", SET, SET),
    (b"SET SESSION client_encoding = 'SJIS'", SET, SET),
    (b"set names 'BIG5'", SET, SET),
    (b'SET "Standard_Conforming_Strings" TO on', SET, SET),
    (b"SELECT set_config('standard_conforming_strings', 'off', true)", SET, SET),
    (b"SELECT set_config(' Client_Encoding', 'GBK', true)", SET, SET),
    # and so does a change of role, which would hand its privileges to the next session
    (b"SET ROLE admin", SET, SET),
    (b"set session authorization bob", SET, SET),
    (b"SET LOCAL ROLE admin", SET, SET),
    (b"SELECT set_config('role', 'admin', false)", SET, SET),
    # more indirect state
    (b"SELECT setseed(0.5)", SFUNC, SFUNC),
    (b"SELECT pg_catalog.pg_backup_start('label')", SFUNC, SFUNC),
    (b"SELECT * FROM pg_create_logical_replication_slot('s', 'test_decoding', true)", SFUNC, SFUNC),
    (b"SELECT public.dblink_connect('c', 'dbname=x')", SFUNC, SFUNC),
    (b"CREATE FUNCTION pg_temp.f() RETURNS int AS 'select 1' LANGUAGE sql", TEMP, TEMP),
    (b"CREATE TABLE pg_temp_7.t (i int)", TEMP, TEMP),
    (b'create table U&"pg\\005ftemp".t (i int)', TEMP, TEMP),
    (b"SELECT pg_temp.f()", TEMP, TEMP),
    (b"SELECT 1 INTO LOCAL TEMP t", TEMP, TEMP),
    (b"SELECT 1 INTO GLOBAL TEMPORARY TABLE t", TEMP, TEMP),
    (b"SELECT temp FROM weather", None, None),
    (b"SELECT pg_temp FROM t", None, None),
    # lexical rules of PostgreSQL 15 that move statement boundaries
    (b"SELECT $a$ $b$ ; SET x.y = 1; $a$", None, None),
    (b"SELECT a$b$ ; SET x.y = 1; $b$", SET, None),
    (b"SELECT 1$b$ ; SET x.y = 1; $b$", None, None),
    (b"SELECT $1$b$ ; SET x.y = 1; $b$", None, None),
    (b"SELECT B'\\'; SET x.y = 1; --'", SET, None),
    (b"SELECT X'\\'; LISTEN c; --'", P.LISTEN, P.LISTEN),
    (b"SELECT 'a'\n'\\'; LISTEN c; --'", P.LISTEN, P.LISTEN),
    (b"SELECT E'a'\n'\\'; LISTEN c; --'", None, None),
    (b"SELECT E'a' '\\'; LISTEN c; --'", P.LISTEN, P.LISTEN),
    (b"SELECT 1 +/* c */ 1; LISTEN c", P.LISTEN, P.LISTEN),
    (b"SELECT 1 =-- c\nLISTEN c", None, None),
    (b"SELECT 1 /* a /* b */ c */; LISTEN c", P.LISTEN, P.LISTEN),
    (b"SELECT \"a\"\"; LISTEN c; --\"", None, None),
    (b"SELECT U&'\\'; LISTEN c; --'", P.LISTEN, P.LISTEN),
]


@pytest.mark.parametrize("sql,reason,excluded_reason", CASES, ids=[repr(c[0])[:60] for c in CASES])
def test_classify_query(sql, reason, excluded_reason):
    assert classify_query(sql) is reason
    assert classify_query(sql, exclude_variable_sets=False) is reason
    assert classify_query(sql, exclude_variable_sets=True) is excluded_reason


def test_case_table_covers_every_reason():
    seen = {r for _, a, b in CASES for r in (a, b)}
    protocol_only = {P.STATEMENT_TOO_LARGE, P.NAMED_PORTAL, P.FUNCTION_CALL, P.CLIENT_ENCODING}
    expected = set(PinReason) - protocol_only
    assert expected <= seen
    assert len(CASES) >= 60


def test_statement_size_limit():
    head = b"SELECT "
    at_limit = head + b"1" * (MAX_STATEMENT_BYTES - len(head))
    assert len(at_limit) == 16384
    assert classify_query(at_limit) is None
    assert classify_query(at_limit + b"1") is P.STATEMENT_TOO_LARGE
    assert classify_query(at_limit + b"1", exclude_variable_sets=True) is P.STATEMENT_TOO_LARGE
    # size wins over anything else in the text
    big_set = b"SET x = '" + b"a" * 16384 + b"'"
    assert classify_query(big_set) is P.STATEMENT_TOO_LARGE


def test_large_statement_under_limit_with_pin_at_the_end():
    sql = b"SELECT '" + b"x;" * 8000 + b"'; SELECT pg_advisory_lock(1)"
    assert len(sql) <= 16384
    assert classify_query(sql) is P.ADVISORY_LOCK


def test_bytes_like_inputs():
    assert classify_query(bytearray(b"SET x = 1")) is SET
    assert classify_query(memoryview(b"LISTEN c")) is P.LISTEN


def test_precheck_skips_tokenizer(monkeypatch):
    """Statements with no candidate keyword never reach the scanner."""

    def boom(sql):
        raise AssertionError("tokenizer ran")

    monkeypatch.setattr(pinning, "statements", boom)
    assert classify_query(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1") is None
    assert classify_query(b"INSERT INTO pgbench_history VALUES (1, 2, 3)") is None
    assert classify_query(b"SELECT pg_advisory_xact_lock(1)") is None
    # the SET of UPDATE ... SET in a single statement (pgbench's commonest text)
    assert classify_query(b"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7;") is None
    assert classify_query(b" update t set v = 'random' where id = 1 ;\n") is None


def test_random_bytes_never_raise():
    import random

    rng = random.Random(16384)
    alphabet = b"setSET nextval( ' \" $ $a$ -- /* */ ; \\ E' \n\xff\x80 temp into hold with"
    for _ in range(500):
        sql = bytes(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        result = classify_query(sql)
        assert result is None or isinstance(result, PinReason)


def test_classify_parse():
    assert classify_parse(b"", b"SELECT 1") is None
    assert classify_parse(b"stmt1", b"SELECT 1") is PREP
    assert classify_parse(b"stmt1", b"SELECT 1", True) is PREP
    assert classify_parse(b"", b"SET x = 1") is SET
    assert classify_parse(b"", b"SET x = 1", exclude_variable_sets=True) is None
    assert classify_parse(b"", b"SELECT nextval($1)", True) is SEQ


def test_classify_bind():
    assert classify_bind(b"") is None
    assert classify_bind(b"portal") is P.NAMED_PORTAL


def test_reason_values_are_snake_case_labels():
    for reason in PinReason:
        assert reason.value == reason.name.lower()
