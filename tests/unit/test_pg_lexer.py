"""Tests for txrdsproxy.wire.pg.lexer: statement, comment, string and identifier boundaries as
PostgreSQL 15's scanner draws them, and the pinning classifier's use of them (pre-filter and
verdict cache soundness, standard_conforming_strings, client encodings, FunctionCall)."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txrdsproxy.wire.pg import lexer, pinning
from txrdsproxy.wire.pg.lexer import IDENT, NUMBER, OP, PARAM, STRING, WORD, statements
from txrdsproxy.wire.pg.pinning import PinReason, classify_query


# Fixed and quick in CI; `make fuzz` sets TXRDSPROXY_FUZZ_EXAMPLES for a long run with random seeds.
FUZZ_EXAMPLES = int(os.environ.get("TXRDSPROXY_FUZZ_EXAMPLES", "2000")) if os.environ.get("TXRDSPROXY_FUZZ") else 0


def fuzz_settings(examples):
    return settings(max_examples=FUZZ_EXAMPLES * 10 or examples, derandomize=not FUZZ_EXAMPLES,
                    database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stmts(sql, scs=True):
    return list(statements(sql, scs))


def test_line_comment_ends_at_cr_or_lf():
    assert stmts(b"-- x\rSET a = 1") == [[(WORD, b"set"), (WORD, b"a"), (OP, b"="), (NUMBER, b"1")]]
    assert stmts(b"-- x\nlisten c") == [[(WORD, b"listen"), (WORD, b"c")]]
    assert stmts(b"-- x; listen c") == []


def test_block_comments_nest():
    assert stmts(b"/* a /* b */ listen c */ select") == [[(WORD, b"select")]]
    assert stmts(b"/* a /* b */ c") == []  # unterminated: the server rejects it whole
    assert stmts(b"/*/ listen c */ x") == [[(WORD, b"x")]]
    assert stmts(b"1 */* c */ 2") == [[(NUMBER, b"1"), (OP, b"*"), (NUMBER, b"2")]]


def test_strings_and_standard_conforming_strings():
    assert stmts(b"'it''s'") == [[(STRING, b"it's")]]
    assert stmts(b"'a\\'; listen c") == [[(STRING, b"a\\")], [(WORD, b"listen"), (WORD, b"c")]]
    # off: plain strings take backslash escapes, so the same text is one string
    assert stmts(b"'a\\'; listen c", scs=False) == [[(STRING, None)]]
    assert stmts(b"e'a\\'; listen c'") == [[(STRING, None)]]
    assert stmts(b"E'a\\\\'; listen c") == [[(STRING, None)], [(WORD, b"listen"), (WORD, b"c")]]
    # bit and hex strings never take escapes, whatever the setting
    assert stmts(b"B'\\'; listen c", scs=False)[1] == [(WORD, b"listen"), (WORD, b"c")]
    assert stmts(b"x'\\'; listen c", scs=False)[1] == [(WORD, b"listen"), (WORD, b"c")]
    # N'' is the word n followed by an ordinary string
    assert stmts(b"N'x'") == [[(WORD, b"n"), (STRING, b"x")]]


def test_string_continuation_needs_a_newline_and_keeps_the_escape_mode():
    assert stmts(b"'a'\n'b'") == [[(STRING, b"ab")]]
    assert stmts(b"'a' -- c\r  'b'") == [[(STRING, b"ab")]]
    assert stmts(b"'a' 'b'") == [[(STRING, b"a"), (STRING, b"b")]]
    assert stmts(b"'a'/**/\n'b'") == [[(STRING, b"a"), (STRING, b"b")]]
    # the continuation of an E'' string is read with escapes too
    assert stmts(b"E'a'\n'\\'; listen c; --'") == [[(STRING, None)]]
    assert stmts(b"'a'\n'\\'; listen c") == [[(STRING, b"a\\")], [(WORD, b"listen"), (WORD, b"c")]]


def test_dollar_quotes():
    assert stmts(b"$$a;b$$") == [[(STRING, b"a;b")]]
    assert stmts(b"$t$ $u$ ; $t$") == [[(STRING, b" $u$ ; ")]]
    assert stmts(b"$t$ $$ $tt$ $t$x") == [[(STRING, b" $$ $tt$ "), (WORD, b"x")]]
    assert stmts(b"$\xc3\xa9$x$\xc3\xa9$") == [[(STRING, b"x")]]
    # a $ right after an identifier character belongs to the identifier
    assert stmts(b"a$b$; c") == [[(WORD, b"a$b$")], [(WORD, b"c")]]
    # after a number or a parameter it may open a quote; a digit cannot start a tag
    assert stmts(b"1$b$;$b$") == [[(NUMBER, b"1"), (STRING, b";")]]
    assert stmts(b"$1$b$;$b$") == [[(PARAM, b"$1"), (STRING, b";")]]
    assert stmts(b"$1a$; x") == [[(PARAM, b"$1"), (WORD, b"a$")], [(WORD, b"x")]]
    # "$abc" without a closing $ is the character $ and then a word
    assert stmts(b"$abc x") == [[(OP, b"$"), (WORD, b"abc"), (WORD, b"x")]]


def test_quoted_identifiers():
    assert stmts(b'"Set""x"') == [[(IDENT, b'Set"x')]]
    assert stmts(b'"a;b"; c') == [[(IDENT, b"a;b")], [(WORD, b"c")]]
    assert stmts(b"SeLeCt") == [[(WORD, b"select")]]


@pytest.mark.parametrize(
    "sql,value",
    [
        (b'U&"\\0073et"', b"set"),
        (b'u&"\\+000073et"', b"set"),
        (b'U&"d\\0061t\\+000061"', b"data"),
        (b'U&"\\\\x"', b"\\x"),
        (b'U&"!0073et" UESCAPE \'!\'', b"set"),
        (b'U&"!0073et" /* c */ uescape\n\'!\'', b"set"),
        (b'U&"\\00e9"', "\u00e9".encode()),
        (b'U&"\\D83D\\DE00"', "\U0001F600".encode()),
        (b'U&"\\D83Dx"', None),  # lone high surrogate: the server rejects it
        (b'U&"\\DE00"', None),
        (b'U&"\\0000"', None),
        (b'U&"\\12"', None),
        (b'U&"x" UESCAPE \'a\'', None),  # a hex digit cannot be the escape
        (b'U&"x" UESCAPE \'ab\'', None),
    ],
)
def test_unicode_identifiers(sql, value):
    assert stmts(sql) == [[(IDENT, value)]]


def test_unicode_strings():
    assert stmts(b"U&'\\0074rue'") == [[(STRING, b"true")]]
    # U&'' bodies are standard strings: a backslash does not escape the quote
    assert stmts(b"U&'\\'; listen c")[1] == [(WORD, b"listen"), (WORD, b"c")]


def test_operators_stop_at_comment_starts():
    assert stmts(b"a<--b\nc") == [[(WORD, b"a"), (OP, b"<"), (WORD, b"c")]]
    assert stmts(b"a=>b::int") == [[(WORD, b"a"), (OP, b"=>"), (WORD, b"b"), (OP, b"::"), (WORD, b"int")]]


def test_vertical_tab_is_whitespace():
    assert stmts(b"set\va = 1")[0][:2] == [(WORD, b"set"), (WORD, b"a")]


# --- classifier over the lexer ------------------------------------------------------------


def test_standard_conforming_strings_parameter():
    hidden_when_off = b"SELECT 'x\\''; LISTEN c; --'"
    assert classify_query(hidden_when_off, standard_conforming_strings=True) is None
    assert classify_query(hidden_when_off, standard_conforming_strings=False) is PinReason.LISTEN
    assert classify_query(hidden_when_off) is PinReason.LISTEN  # unknown: either lexing pins
    hidden_when_on = b"SELECT 'a\\'; LISTEN c; SELECT '"
    assert classify_query(hidden_when_on, standard_conforming_strings=True) is PinReason.LISTEN
    assert classify_query(hidden_when_on, standard_conforming_strings=False) is None
    assert classify_query(hidden_when_on) is PinReason.LISTEN
    assert pinning.classify_parse(b"", hidden_when_off, False, False) is PinReason.LISTEN


@pytest.mark.parametrize(
    "name",
    ["SJIS", "sjis", "Shift_JIS", "MSKANJI", "WIN932", "SHIFT_JIS_2004", "BIG5", "win950",
     "GBK", "Windows936", "GB18030", "UHC", "WIN949", "JOHAB", b"SJIS"],
)
def test_unsafe_client_encodings(name):
    assert pinning.unsafe_client_encoding(name) is True


@pytest.mark.parametrize(
    "name", ["UTF8", "utf-8", "UNICODE", "LATIN1", "EUC_JP", "EUC_CN", "SQL_ASCII", "WIN1252",
             "KOI8R", "EUC_JIS_2004", "MULE_INTERNAL", ""],
)
def test_safe_client_encodings(name):
    assert pinning.unsafe_client_encoding(name) is False


def test_function_call_messages_pin_except_large_objects():
    assert pinning.classify_function_call(2078) is PinReason.FUNCTION_CALL  # set_config
    assert pinning.classify_function_call(1574) is PinReason.FUNCTION_CALL  # nextval
    assert pinning.classify_function_call(952) is None  # lo_open
    assert pinning.classify_function_call(955) is None  # lowrite


# --- the fast path is sound: it never answers None for a text the full rules pin ----------

_FRAGMENTS = [
    b"SET", b"set", b"search_path", b"=", b"x", b"RESET", b"LISTEN", b"c", b"DO", b"CALL",
    b"p", b"(", b")", b",", b".", b";", b" ", b"\n", b"\r", b"\t", b"--", b"/*", b"*/", b"'",
    b"E'", b"B'", b"\\", b"\"", b"$$", b"$a$", b"$1", b"U&\"", b"U&'", b"\\0073", b"UESCAPE",
    b"'!'", b"!0073", b"set_config", b"pg_catalog", b"nextval", b"pg_advisory_lock",
    b"pg_settings", b"UPDATE", b"EXPLAIN", b"ANALYZE", b"CREATE", b"TEMP", b"TABLE", b"t",
    b"SELECT", b"INTO", b"pg_temp", b"pg_temp_3", b"DECLARE", b"CURSOR", b"WITH", b"HOLD",
    b"FOR", b"PREPARE", b"LOAD", b"DISCARD", b"setseed", b"false", b"true", b"1", b"\xc3\xa9",
    b"\x80", b"0", b"e", b"_", b"a", b"SESSION", b"LOCAL", b"standard_conforming_strings",
    b"$", b"x$", b"reset", b"pg_toast_temp_1", b"CALL", b"do$", b"u&", b"setval", b"\x0b", b"\x0c",
]


@fuzz_settings(300)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=24).map(b"".join), st.booleans())
def test_prefilter_and_cache_never_hide_a_pin(sql, exclude):
    for scs in (True, False):
        full = pinning._classify_text(sql, exclude, scs)
        pinning._seen.clear()
        assert classify_query(sql, exclude, scs) is full
        assert classify_query(sql, exclude, scs) is full  # from the cache
    either = pinning._classify_text(sql, exclude, True) or pinning._classify_text(sql, exclude, False)
    pinning._seen.clear()
    assert (classify_query(sql, exclude) is None) == (either is None)


@fuzz_settings(300)
@given(st.binary(max_size=80), st.booleans())
def test_arbitrary_bytes_never_raise(sql, scs):
    for stmt in lexer.statements(sql, scs):
        assert stmt and all(kind in (WORD, IDENT, STRING, OP, NUMBER, PARAM) for kind, _ in stmt)
    reason = classify_query(sql, standard_conforming_strings=scs)
    assert reason is None or isinstance(reason, PinReason)
