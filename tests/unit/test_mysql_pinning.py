"""Table-driven tests of the MySQL pinning classifier."""

import pytest

from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.pinning import (
    MAX_STATEMENT_BYTES, PinReason, TrackedSet, classify_command, classify_query,
    invalid_charset_client)

R = PinReason


def T(**kw):
    return TrackedSet(kw)


def NAMES(cs, collation=None):
    d = dict(character_set_client=cs, character_set_connection=cs, character_set_results=cs)
    if collation:
        d["collation_connection"] = collation
    return TrackedSet(d)


CASES = [
    # --- no pin ---------------------------------------------------------------------------------
    ("SELECT 1", None),
    ("select * from t where id = 5", None),
    ("INSERT INTO t VALUES (1)", None),
    ("BEGIN", None),
    ("START TRANSACTION READ ONLY", None),
    ("COMMIT", None),
    ("USE shop", None),
    ("CALL my_proc(1, 2)", None),
    ("SELECT @@session.autocommit, @@sql_mode", None),
    ("SELECT @x", None),
    ("SELECT * FROM t FOR UPDATE", None),
    ("SELECT * FROM t LOCK IN SHARE MODE", None),
    ("UPDATE t SET a = 1 WHERE b = 2", None),
    ("INSERT INTO t SET a = 1", None),
    ("SELECT 'SET @x = 1', \"LOCK TABLES t\"", None),
    ("SELECT 'it''s GET_LOCK(1)' AS x", None),
    ("SELECT 'a\\' GET_LOCK(1) ' AS x", None),
    ("SELECT 1 -- SET @x = 1\n", None),
    ("SELECT 1 # LOCK TABLES t\n", None),
    ("SELECT /* FOUND_ROWS() */ 1", None),
    ("SELECT /*+ MAX_EXECUTION_TIME(1000) */ * FROM t", None),
    ("SELECT email FROM users WHERE email = 'a@b.c'", None),
    ("SET GLOBAL max_connections = 100", None),
    ("SET @@global.sql_mode = ''", None),
    ("SET PERSIST max_connections = 10", None),
    ("SET GLOBAL TRANSACTION ISOLATION LEVEL READ COMMITTED", None),
    ("SET PASSWORD = 'secret'", None),
    ("SET PASSWORD FOR 'u'@'%' = 'x'", None),
    ("SET DEFAULT ROLE ALL TO u", None),
    ("DROP TEMPORARY TABLE IF EXISTS tmp", None),
    ("SET STATEMENT max_statement_time=1 FOR SELECT * FROM t", None),
    ("CREATE PROCEDURE p() SET @x = 1", None),  # the body runs when called, not now
    ("CREATE DEFINER=`root`@`localhost` TRIGGER tr BEFORE INSERT ON t "
     "FOR EACH ROW SET NEW.a = @x := 1", None),
    ("FLUSH TABLES", None),
    ("SELECT offset_set, reset, setting FROM t", None),
    ("SELECT 1 --1", None),
    # --- pins -------------------------------------------------------------------------------------
    ("x" * (MAX_STATEMENT_BYTES + 1), R.STATEMENT_TOO_LARGE),
    ("SELECT '" + "y" * MAX_STATEMENT_BYTES + "'", R.STATEMENT_TOO_LARGE),
    ("PREPARE s FROM 'SELECT ?'", R.PREPARED_STATEMENT),
    ("  prepare s from @q", R.PREPARED_STATEMENT),
    ("EXECUTE IMMEDIATE 'SELECT 1'", R.PREPARED_STATEMENT),
    ("LOCK TABLES t READ", R.LOCK_TABLES),
    ("lock table t write", R.LOCK_TABLES),
    ("/* hi */ LOCK TABLES t READ", R.LOCK_TABLES),
    ("FLUSH TABLES WITH READ LOCK", R.FLUSH_WITH_READ_LOCK),
    ("flush tables t1, t2 with read lock", R.FLUSH_WITH_READ_LOCK),
    ("FLUSH TABLES t FOR EXPORT", R.FLUSH_WITH_READ_LOCK),
    ("SELECT GET_LOCK('lock1', 10)", R.GET_LOCK),
    ("DO get_lock ('x', 1)", R.GET_LOCK),
    ("SELECT IS_USED_LOCK('x')", None),
    ("SET @x = 1", R.USER_VARIABLE),
    ("set @`weird name` := 5", R.USER_VARIABLE),
    ("SET @x = 1, sql_mode = ''", R.USER_VARIABLE),
    ("SELECT a INTO @x FROM t LIMIT 1", R.USER_VARIABLE),
    ("SELECT a FROM t LIMIT 1 INTO @x", R.USER_VARIABLE),
    ("SELECT @n := @n + 1 FROM t", R.USER_VARIABLE),
    ("SET sql_select_limit = 10", R.SET_VARIABLE),
    ("SET SESSION wait_timeout = 10", R.SET_VARIABLE),
    ("SET autocommit = 1, max_join_size = 5", R.SET_VARIABLE),
    ("SET sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES')", R.SET_VARIABLE),
    ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", R.SET_VARIABLE),
    ("SET SESSION TRANSACTION READ ONLY", R.SET_VARIABLE),
    ("SET ROLE r1", R.SET_VARIABLE),
    ("SET @@session.sql_log_bin = 0", R.SET_VARIABLE),
    ("CREATE TEMPORARY TABLE tmp (a INT)", R.TEMPORARY_TABLE),
    ("create or replace temporary table tmp select 1", R.TEMPORARY_TABLE),
    ("SELECT LAST_INSERT_ID()", R.LAST_INSERT_ID),
    ("INSERT INTO t2 VALUES (LAST_INSERT_ID())", R.LAST_INSERT_ID),
    ("SELECT FOUND_ROWS()", R.FOUND_ROWS),
    ("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 10", R.FOUND_ROWS),
    ("SELECT ROW_COUNT()", R.ROW_COUNT),
    ("HANDLER t OPEN", R.HANDLER),
    ("XA START 'x'", R.XA),
    ("/*!40101 SET @OLD_SQL_MODE=@@SQL_MODE */", R.USER_VARIABLE),
    ("/*!40014 SET FOREIGN_KEY_CHECKS=0 */", R.SET_VARIABLE),
    ("/*M!100100 SET @x = 1 */", R.USER_VARIABLE),
    ("SELECT 1 /*!50000 , GET_LOCK('a', 1) */", R.GET_LOCK),
    ("SELECT 1; SELECT GET_LOCK('a', 1)", R.GET_LOCK),
    ("SET NAMES utf8mb4; SET @x = 1", R.USER_VARIABLE),
    ("SET STATEMENT max_statement_time=1 FOR SELECT GET_LOCK('a',1)", R.GET_LOCK),
    # --- tracked ------------------------------------------------------------------------------
    ("SET autocommit = 0", T(autocommit="0")),
    ("SET autocommit=ON", T(autocommit="ON")),
    ("SET @@autocommit = 1", T(autocommit="1")),
    ("SET SESSION sql_mode = 'ANSI_QUOTES,STRICT_TRANS_TABLES'",
     T(sql_mode="ANSI_QUOTES,STRICT_TRANS_TABLES")),
    ("SET @@session.time_zone = '+00:00'", T(time_zone="+00:00")),
    ("SET LOCAL time_zone = \"Europe/Paris\"", T(time_zone="Europe/Paris")),
    ("set @@local.session_track_schema = OFF", T(session_track_schema="OFF")),
    ("SET `autocommit` = 1", T(autocommit="1")),
    ("SET Character_Set_Client = latin1", T(character_set_client="latin1")),
    ("SET collation_connection = utf8mb4_bin", T(collation_connection="utf8mb4_bin")),
    ("SET NAMES utf8mb4", NAMES("utf8mb4")),
    ("SET NAMES 'utf8mb4' COLLATE 'utf8mb4_unicode_ci'",
     NAMES("utf8mb4", "utf8mb4_unicode_ci")),
    ("/*!40101 SET NAMES utf8 */", NAMES("utf8")),
    ("SET NAMES DEFAULT", R.SET_VARIABLE),  # the global value: not known to the proxy
    ("SET CHARACTER SET latin1", T(character_set_client="latin1", character_set_results="latin1")),
    ("SET CHARSET 'utf8'", T(character_set_client="utf8", character_set_results="utf8")),
    ("SET autocommit = 0, time_zone = 'UTC'", T(autocommit="0", time_zone="UTC")),
    ("SET GLOBAL max_connections = 5, SESSION autocommit = 1", T(autocommit="1")),
    ("SET SESSION autocommit = 1, GLOBAL sql_mode = ''", T(autocommit="1")),
    ("SET autocommit = 0; SET time_zone = '-05:00'",
     TrackedSet({"autocommit": "0", "time_zone": "-05:00"}, multi=True)),
    ("SET sql_mode = ''", T(sql_mode="")),
    ("SET time_zone = -1", T(time_zone="-1")),
]


MARIADB_10_11 = 101106


@pytest.mark.parametrize("sql,expected", CASES, ids=[c[0][:60] for c in CASES])
def test_classify(sql, expected):
    assert classify_query(sql.encode("utf-8"), server_version=MARIADB_10_11) == expected
    assert classify_query(sql, server_version=MARIADB_10_11) == expected  # str accepted too


def test_case_count():
    assert len(CASES) >= 60


EXCLUDED = [
    ("SET @x = 1", None),
    ("SET sql_select_limit = 10", None),
    ("SELECT a INTO @x FROM t", None),
    ("SELECT @n := 1", None),
    ("SET autocommit = 0, wait_timeout = 10", T(autocommit="0")),
    ("SET @x = 1, NAMES latin1", NAMES("latin1")),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
    # Non-variable pins are not affected by the filter.
    ("LOCK TABLES t READ", R.LOCK_TABLES),
    ("SET @x = GET_LOCK('a', 1)", R.GET_LOCK),
    ("CREATE TEMPORARY TABLE t (a int)", R.TEMPORARY_TABLE),
    ("PREPARE s FROM 'SELECT 1'", R.PREPARED_STATEMENT),
]


@pytest.mark.parametrize("sql,expected", EXCLUDED)
def test_exclude_variable_sets(sql, expected):
    assert classify_query(sql, exclude_variable_sets=True) == expected


def test_no_backslash_escapes():
    sql = "SELECT 'a\\' , GET_LOCK('x', 1)"
    assert classify_query(sql) is None  # the backslash escapes the quote
    assert classify_query(sql, no_backslash_escapes=True) == R.GET_LOCK


def test_unterminated_constructs_do_not_crash():
    for sql in ("SELECT 'unterminated SET @x=1", "SELECT /* open", "SET @", "SET",
                "SET NAMES", "SET CHARACTER SET", "SET x", "SET SESSION", "SELECT `a",
                "/*!", "SET autocommit =", "SET STATEMENT x=1", "*/ SET @x = 1"):
        classify_query(sql)


def test_utf8_values_and_binary():
    assert classify_query("SET time_zone = 'Europe/Zürich'".encode()) == T(
        time_zone="Europe/Zürich")
    classify_query(b"SELECT \xff\xfe @ \x00")


def test_exactly_16kb_is_not_too_large():
    sql = b"SELECT '" + b"y" * (MAX_STATEMENT_BYTES - 9) + b"'"
    assert len(sql) == MAX_STATEMENT_BYTES
    assert classify_query(sql) is None


@pytest.mark.parametrize("value,bad", [
    ("ucs2", True), ("UTF16", True), ("'utf16le'", True), ("utf32", True),
    ("utf8mb4", False), ("latin1", False), (None, False),
])
def test_invalid_charset_client(value, bad):
    assert invalid_charset_client(value) is bad


def test_tracked_set_flags_invalid_client_charset():
    r = classify_query("SET NAMES ucs2")
    assert isinstance(r, TrackedSet)
    assert r.invalid_charset_client == "ucs2"
    assert classify_query("SET character_set_client = 'utf32'").invalid_charset_client == "utf32"
    assert classify_query("SET NAMES utf8").invalid_charset_client is None


def test_classify_command():
    assert classify_command(P.COM_STMT_PREPARE) == R.PREPARED_STATEMENT
    assert classify_command(P.COM_QUERY) is None


def test_reason_values_are_snake_case():
    for r in PinReason:
        assert r.value == r.name.lower()


# --- the verdict cache ------------------------------------------------------------------------------
def _fresh(sql, **kw):
    """classify_query's verdict computed now, bypassing the cache."""
    from txrdsproxy.wire.mysql import pinning
    args = dict(exclude_variable_sets=False, no_backslash_escapes=False, ansi_quotes=False,
                server_version=None, track_use=False, oracle=False)
    args.update(kw)
    if len(sql) > MAX_STATEMENT_BYTES:
        return R.STATEMENT_TOO_LARGE
    return pinning._classify(sql, **args)


def test_cached_verdicts_equal_fresh_ones_for_every_option():
    """Every argument that changes how the server reads a text is part of the cache key: the
    same text under other options (sql_mode, version, USE tracking, the exclude filter) never
    gets another session's verdict."""
    import itertools
    from txrdsproxy.wire.mysql import pinning
    texts = [c[0] for c in CASES] + [c[0] for c in EXCLUDED] + [
        "SELECT 'a\\' , GET_LOCK('x', 1)", 'SELECT "a" , @x := 1', "USE shop",
        "/*!100000 SET @x = 1 */ SELECT 1", "SET sql_mode = 'ANSI_QUOTES'; SELECT \"@x := 1\""]
    options = list(itertools.product((False, True), (False, True), (False, True),
                                     (None, MARIADB_10_11), (False, True), (False, True)))
    pinning._seen.clear()
    for rounds in range(2):  # cold, then answered from the cache (where it fits)
        for sql in texts:
            raw = sql.encode("utf-8")
            for exclude, nbe, ansi, version, use, oracle in options:
                kw = dict(exclude_variable_sets=exclude, no_backslash_escapes=nbe,
                          ansi_quotes=ansi, server_version=version, track_use=use, oracle=oracle)
                assert classify_query(raw, **kw) == _fresh(raw, **kw), (sql, kw, rounds)


def test_options_never_share_a_cached_verdict():
    sql = b"SELECT 'a\\' , GET_LOCK('x', 1)"
    assert classify_query(sql) is None
    assert classify_query(sql, no_backslash_escapes=True) == R.GET_LOCK
    assert classify_query(sql) is None
    use = b"USE shop"
    assert classify_query(use, track_use=True) == TrackedSet({}, "shop")
    assert classify_query(use) is None


def test_a_cached_tracked_set_cannot_be_changed_by_its_reader():
    """Two sessions sending the same SET get the same verdict object: neither can alter it."""
    first = classify_query(b"SET NAMES latin1, time_zone = '+01:00'")
    again = classify_query(bytearray(b"SET NAMES latin1, time_zone = '+01:00'"))
    assert again is first
    with pytest.raises(TypeError):
        first.assignments["time_zone"] = "+02:00"
    with pytest.raises(AttributeError):
        first.assignments = {}
    assert classify_query(b"SET NAMES latin1, time_zone = '+01:00'").assignments["time_zone"] \
        == "+01:00"


def test_verdict_cache_is_bounded():
    from txrdsproxy.wire.mysql import pinning
    pinning._seen.clear()
    for i in range(pinning.SEEN_MAX + 50):
        classify_query(b"SET time_zone = '+%02d:00'" % (i % 24) + b" /* %d */" % i)
    assert 0 < len(pinning._seen) <= pinning.SEEN_MAX
    pinning._seen.clear()
    big = b"SELECT '" + b"x" * pinning.SEEN_TEXT_MAX + b"'"
    assert classify_query(big) is None
    assert not pinning._seen  # long texts are classified every time, never kept
