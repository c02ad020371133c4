"""wire/mysql/lexer.py and the classifier on top of it: text the server reads as code is
classified as code, whatever disguise (sql_mode, comments, executable comments, quoting)."""

import pytest

from txrdsproxy.wire.mysql.lexer import Ambiguous, Lexer, version_id
from txrdsproxy.wire.mysql.pinning import PinReason as R
from txrdsproxy.wire.mysql.pinning import TrackedSet, classify_query, sql_mode_flags

V = 101106  # MariaDB 10.11.6


def statements(text, **kw):
    lexer = Lexer(text, **kw)
    out = []
    while True:
        s = lexer.statement()
        if s is None:
            return out
        out.append([t[1] for t in s])


def test_version_id():
    assert version_id("5.5.5-10.11.6-MariaDB-0+deb12u1") == 101106
    assert version_id("10.11.18-MariaDB") == 101118
    assert version_id("8.0.35") == 80035
    assert version_id("garbage") is None and version_id(None) is None


@pytest.mark.parametrize("text,expected", [
    ("SELECT 1 -- x\nSET", [["SELECT", "1", "SET"]]),
    ("SELECT 1 --x", [["SELECT", "1", "-", "-", "X"]]),          # '--' needs whitespace after
    ("SELECT 1 --\tx\nY", [["SELECT", "1", "Y"]]),
    ("SELECT 1 --\x01x\nY", [["SELECT", "1", "Y"]]),              # ... or a control character
    ("SELECT 1 --", [["SELECT", "1"]]),
    ("SELECT 1 # x\rSET @a=1\nY", [["SELECT", "1", "Y"]]),        # '#' ends at \n only
    ("SELECT /* a /* b */ c */", [["SELECT", "C", "*", "/"]]),     # no nesting
    ("a;b ; ;c", [["A"], ["B"], [], ["C"]]),
    ("SELECT 'x;y' ; z", [["SELECT", "x;y"], ["Z"]]),
])
def test_comments_and_statements(text, expected):
    assert statements(text, server_version=V) == expected


@pytest.mark.parametrize("text,expected", [
    ("/*! SET @a=1 */", [["SET", "@a", "=", "1"]]),                # no version: code
    ("/*!40101 SET x=1 */", [["SET", "X", "=", "1"]]),             # old version: code
    ("/*!50700 SET x=1 */ Y", [["Y"]]),                            # MySQL 5.7+ only: skipped
    ("/*M!50700 SET x=1 */", [["SET", "X", "=", "1"]]),            # ... unless MariaDB's M!
    ("/*!999999 SET x=1 */ Y", [["Y"]]),                           # future version: skipped
    ("/*!999999 /* inner */ SET x=1 */ Y", [["Y"]]),               # with one nested comment
    ("/*!100000SET x=1*/", [["SET", "X", "=", "1"]]),              # 6 digits, no space
    ("/*!1234 SET*/", [["1234", "SET"]]),                          # 4 digits: not a version
])
def test_executable_comments(text, expected):
    assert statements(text, server_version=V) == expected


def test_versioned_comment_without_the_server_version_is_ambiguous():
    with pytest.raises(Ambiguous):
        statements("/*!40101 SET x=1 */")
    assert classify_query("/*!40101 SET @x = 1 */") == R.UNCLASSIFIABLE


def test_ambiguous_dash_dash():
    with pytest.raises(Ambiguous):
        statements("SELECT 1 --\xa0x", server_version=V)


def test_ansi_quotes_and_backslashes():
    text = 'SELECT "a\\" ; SET @x = 1 ; -- "'
    # Without ANSI_QUOTES the double-quoted text is one string (the backslash escapes a quote).
    assert classify_query(text, server_version=V) is None
    # With ANSI_QUOTES it is an identifier, a backslash is just a character: SET @x runs.
    assert classify_query(text, ansi_quotes=True, server_version=V) == R.USER_VARIABLE
    text = "SELECT 'a\\' ; SET @x = 1 ; -- '"
    assert classify_query(text, server_version=V) is None
    assert classify_query(text, no_backslash_escapes=True, server_version=V) == R.USER_VARIABLE


def test_sql_mode_set_earlier_in_a_multi_statement_changes_the_lexing_of_the_rest():
    text = "SET sql_mode = 'ANSI_QUOTES'; SELECT \"a\\\"; SET @x = 1; -- \""
    assert classify_query(text, server_version=V) == R.USER_VARIABLE
    text = "SET sql_mode = 'NO_BACKSLASH_ESCAPES'; SELECT 'a\\'; SET @x = 1; -- '"
    assert classify_query(text, server_version=V) == R.USER_VARIABLE


@pytest.mark.parametrize("mode,flags", [
    (None, (False, False)), ("", (False, False)), ("ANSI_QUOTES", (True, False)),
    ("ansi", (True, False)), ("ORACLE", (True, False)),
    ("STRICT_TRANS_TABLES,NO_BACKSLASH_ESCAPES", (False, True)),
])
def test_sql_mode_flags(mode, flags):
    assert sql_mode_flags(mode) == flags


@pytest.mark.parametrize("sql,reason", [
    ("SELECT `get_lock`('a', 0)", R.GET_LOCK),
    ("SELECT `GET_LOCK` ('a', 0)", R.GET_LOCK),
    ("SELECT mydb.get_lock('a', 0)", R.GET_LOCK),
    ("SELECT `mydb`.`last_insert_id`()", R.LAST_INSERT_ID),
    ("SELECT GET_LOCK/**/('a', 0)", R.GET_LOCK),
    ("SELECT 1 /*! , GET_LOCK('a', 0) */", R.GET_LOCK),
    ("SELECT 1 /*M!100000 , GET_LOCK('a', 0) */", R.GET_LOCK),
    ("SELECT @a := 1", R.USER_VARIABLE),
    ("SELECT 1 INTO @a", R.USER_VARIABLE),
    ("CALL p(@out)", R.USER_VARIABLE),
    ("GET DIAGNOSTICS @n = NUMBER", R.USER_VARIABLE),
    ("LOAD DATA LOCAL INFILE 'f' INTO TABLE t (@a) SET c = @a", R.USER_VARIABLE),
    ("DO @a := 2", R.USER_VARIABLE),
    ("BEGIN NOT ATOMIC SET @a = 1; END", R.COMPOUND_STATEMENT),
    ("IF 1 THEN SET sql_mode = 'ANSI_QUOTES'; END IF", R.COMPOUND_STATEMENT),
    ("lbl: LOOP SET @a = 1; LEAVE lbl; END LOOP", R.COMPOUND_STATEMENT),
    ("SET sql_mode = 4", R.SET_VARIABLE),
    ("SET time_zone = DEFAULT", R.SET_VARIABLE),
    ("DROP PREPARE s", R.PREPARED_STATEMENT),
    ("SELECT 1; CREATE TEMPORARY TABLE t (a INT)", R.TEMPORARY_TABLE),
    ("sElEcT 1;\tcReAtE/**/tEmPoRaRy tAbLe t (a INT)", R.TEMPORARY_TABLE),
    ("BINLOG 'AAAA'", R.SET_VARIABLE),
])
def test_disguises_pin(sql, reason):
    assert classify_query(sql, server_version=V) == reason


@pytest.mark.parametrize("sql", [
    "SELECT @a", "SELECT @a = 1", "INSERT INTO t VALUES (@a)", "EXECUTE s USING @a",
    "SELECT 'GET_LOCK(1)'", "SELECT `x`.`y` FROM t", "SELECT 1 --1",
    "SELECT /*!999999 GET_LOCK('a', 0) */ 1",
])
def test_harmless(sql):
    assert classify_query(sql, server_version=V) is None


def test_use_is_reported_only_when_asked():
    assert classify_query("USE shop") is None
    assert classify_query("USE shop", track_use=True) == TrackedSet({}, "shop")
    assert classify_query("SELECT 1; USE `we``ird`", track_use=True) == TrackedSet(
        {}, "we`ird", multi=True)
    assert classify_query("USE", track_use=True) == R.UNKNOWN_DATABASE
    assert classify_query("DROP DATABASE IF EXISTS x", track_use=True) == R.UNKNOWN_DATABASE
    assert classify_query("DROP DATABASE IF EXISTS x") is None  # the server reports it
    assert classify_query("SET NAMES utf8; USE a", track_use=True) == TrackedSet(
        {"character_set_client": "utf8", "character_set_connection": "utf8",
         "character_set_results": "utf8"}, "a", multi=True)


def test_unsafe_client_charsets_are_flagged():
    assert classify_query("SET NAMES sjis").unsafe_charset_client == "sjis"
    assert classify_query("SET character_set_client = gbk").unsafe_charset_client == "gbk"
    assert classify_query("SET NAMES utf8mb4").unsafe_charset_client is None


def test_oracle_grammar_pins_whatever_the_classifier_would_look_at():
    assert classify_query("BEGIN SET sql_mode = ''; END", oracle=True) == R.UNCLASSIFIABLE
    assert classify_query("SELECT 1", oracle=True) is None  # nothing to look at
    assert classify_query("SET sql_mode = 'ORACLE'; BEGIN SET time_zone = '+01:00'; END") \
        == R.UNCLASSIFIABLE
