"""Which PostgreSQL client requests pin a session to its database connection, and why.

The proxy hands a database connection to another client at each transaction boundary.
That is only safe if the client left no session state behind on it (RDS Proxy user guide,
"Avoiding Pinning"). This module looks at SQL text and extended-protocol names and
answers with the ``PinReason`` that forbids reuse, or ``None``.

Pure and cheap: ``classify_query`` runs on every simple Query. A single regex search
rejects the vast majority of statements (plain SELECT/INSERT/...) before any tokenizing.
The careful scanner understands comments, string literals, dollar quotes and quoted
identifiers, so that ``SELECT 'set x'`` does not pin. It is a classifier, not a parser:
state changed inside function bodies or DO blocks is not seen (as with RDS Proxy and
stored procedures), and ``standard_conforming_strings`` is assumed on (the default).
"""

from __future__ import annotations

import enum
import re
from typing import Iterator, List, Optional, Tuple

__all__ = [
    "PinReason",
    "MAX_STATEMENT_BYTES",
    "classify_query",
    "classify_parse",
    "classify_bind",
]

MAX_STATEMENT_BYTES = 16384  # RDS Proxy pins on any statement text larger than 16 KB


class PinReason(enum.Enum):
    """Why a session was pinned; values are metric labels."""

    SET_VARIABLE = "set_variable"
    RESET = "reset"
    PREPARED_STATEMENT = "prepared_statement"  # SQL PREPARE and named protocol statements
    NAMED_PORTAL = "named_portal"
    TEMPORARY_OBJECT = "temporary_object"
    HOLD_CURSOR = "hold_cursor"
    DISCARD = "discard"
    LISTEN = "listen"
    LOAD = "load"
    SEQUENCE_FUNCTION = "sequence_function"
    ADVISORY_LOCK = "advisory_lock"
    STATEMENT_TOO_LARGE = "statement_too_large"


# Cheap pre-check: every rule below needs one of these words somewhere in the text, so a
# query without any of them cannot pin. It may over-match (words inside literals, UPDATE
# ... SET); the scanner decides. Session advisory lock names all contain "advisory_lock"
# (the *_xact_* ones and unlocks do not), and "pg_temp" has no word boundary before "temp".
# Verdicts of recent statement texts (pure function of the text, so safe to share).
_seen = {}
_SEEN_MAX = 4096
_SEEN_TEXT_MAX = 2048

# A cheaper first filter on the lower-cased text: a literal alternation is ~6x faster than the
# case-insensitive, word-bounded _CANDIDATE, and every _CANDIDATE match contains one of these.
_LITERALS = re.compile(rb"set|prepar|temp|declare|discard|listen|load|val|advisory")
_CANDIDATE = re.compile(
    rb"(?i)\b(?:set|reset|prepare|temp|temporary|declare|discard|listen|load"
    rb"|nextval|setval|currval|lastval|set_config)\b|advisory_lock|pg_temp"
)

# Functions whose call pins wherever it appears in a statement.
_PINNING_FUNCTIONS = {
    b"nextval": PinReason.SEQUENCE_FUNCTION,
    b"setval": PinReason.SEQUENCE_FUNCTION,
    b"currval": PinReason.SEQUENCE_FUNCTION,
    b"lastval": PinReason.SEQUENCE_FUNCTION,
    b"pg_advisory_lock": PinReason.ADVISORY_LOCK,
    b"pg_advisory_lock_shared": PinReason.ADVISORY_LOCK,
    b"pg_try_advisory_lock": PinReason.ADVISORY_LOCK,
    b"pg_try_advisory_lock_shared": PinReason.ADVISORY_LOCK,
    b"set_config": PinReason.SET_VARIABLE,  # unless its is_local argument is true
}

# Boolean input spellings PostgreSQL reads as true (boolin accepts unique prefixes).
_TRUE_TEXTS = {b"t", b"tr", b"tru", b"true", b"y", b"ye", b"yes", b"on", b"1"}

# --- tokenizer -------------------------------------------------------------------------

_WORD, _QUOTED, _STRING, _PUNCT = "word", "quoted", "string", "punct"
Token = Tuple[str, Optional[bytes]]
# word: lowercased unquoted identifier/keyword/number; quoted: "identifier" (exact case);
# string: literal's value (None when unknown or unterminated); punct: one byte.

_TOKEN = re.compile(
    rb"""
      (?P<space>\s+)
    | (?P<line_comment>--[^\n]*)
    | (?P<block_comment>/\*)
    | (?P<escape_string>[eE]')
    | (?P<string>')
    | (?P<quoted>")
    | (?P<dollar>\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$)
    | (?P<word>[A-Za-z0-9_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
    | (?P<punct>.)
    """,
    re.S | re.X,
)
_STRING_BODY = re.compile(rb"[^']*(?:''[^']*)*'")
_ESCAPE_STRING_BODY = re.compile(rb"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.S)
_QUOTED_BODY = re.compile(rb'[^"]*(?:""[^"]*)*"')
_COMMENT_EDGE = re.compile(rb"/\*|\*/")


def _skip_block_comment(sql: bytes, pos: int) -> int:
    """End of a (nested) block comment opened just before ``pos``; unterminated: the end."""
    depth = 1
    while depth:
        m = _COMMENT_EDGE.search(sql, pos)
        if m is None:
            return len(sql)
        depth += 1 if m.group() == b"/*" else -1
        pos = m.end()
    return pos


def _read_body(
    body: "re.Pattern[bytes]", sql: bytes, pos: int, quote: bytes
) -> Tuple[Optional[bytes], int]:
    """Value and end of a quoted run starting at ``pos``; unterminated runs to the end."""
    m = body.match(sql, pos)
    if m is None:
        return None, len(sql)
    return m.group()[:-1].replace(quote + quote, quote), m.end()


def _statements(sql: bytes) -> Iterator[List[Token]]:
    """Tokens of each ``;``-separated statement, comments and whitespace dropped."""
    stmt: List[Token] = []
    pos, end = 0, len(sql)
    while pos < end:
        m = _TOKEN.match(sql, pos)
        kind, pos = m.lastgroup, m.end()
        if kind == "word":
            stmt.append((_WORD, m.group().lower()))
        elif kind == "punct":
            if m.group() == b";":
                if stmt:
                    yield stmt
                stmt = []
            else:
                stmt.append((_PUNCT, m.group()))
        elif kind == "block_comment":
            pos = _skip_block_comment(sql, pos)
        elif kind == "string":
            value, pos = _read_body(_STRING_BODY, sql, pos, b"'")
            stmt.append((_STRING, value))
        elif kind == "escape_string":
            value, pos = _read_body(_ESCAPE_STRING_BODY, sql, pos, b"'")
            stmt.append((_STRING, None if value is None or b"\\" in value else value))
        elif kind == "quoted":
            value, pos = _read_body(_QUOTED_BODY, sql, pos, b'"')
            stmt.append((_QUOTED, value))
        elif kind == "dollar":
            close = sql.find(m.group(), pos)
            if close < 0:
                stmt.append((_STRING, None))
                pos = end
            else:
                stmt.append((_STRING, sql[pos:close]))
                pos = close + len(m.group())
        # space and line_comment: nothing to keep
    if stmt:
        yield stmt


# --- rules -----------------------------------------------------------------------------


def _word(tokens: List[Token], i: int) -> Optional[bytes]:
    """The unquoted word at ``i``, if that is what is there."""
    if 0 <= i < len(tokens) and tokens[i][0] == _WORD:
        return tokens[i][1]
    return None


def _ident(tokens: List[Token], i: int) -> Optional[bytes]:
    """The identifier at ``i`` as PostgreSQL would resolve it (quoted ones keep case)."""
    if 0 <= i < len(tokens) and tokens[i][0] in (_WORD, _QUOTED):
        return tokens[i][1]
    return None


def _is_pg_temp_name(tokens: List[Token], i: int) -> bool:
    """A ``pg_temp.`` schema-qualified name starts at ``i``."""
    return _ident(tokens, i) == b"pg_temp" and tokens[i + 1 : i + 2] == [(_PUNCT, b".")]


def _leading_reason(tokens: List[Token], exclude_variable_sets: bool) -> Optional[PinReason]:
    """Rules decided by the statement's first keywords (only a leading SET is the SET command)."""
    first = _word(tokens, 0)
    if first == b"set":
        if _word(tokens, 1) in (b"local", b"transaction", b"constraints"):
            return None  # lasts only until the end of the transaction
        return None if exclude_variable_sets else PinReason.SET_VARIABLE
    if first == b"reset":
        return None if exclude_variable_sets else PinReason.RESET
    if first == b"prepare":
        if _word(tokens, 1) == b"transaction" and tokens[2:3] and tokens[2][0] == _STRING:
            return None  # two-phase commit, not a prepared statement
        return PinReason.PREPARED_STATEMENT
    if first == b"declare":
        for i in range(1, len(tokens)):
            word = _word(tokens, i)
            if word == b"for":  # the cursor's query starts here
                break
            if word == b"with" and _word(tokens, i + 1) == b"hold":
                return PinReason.HOLD_CURSOR
        return None  # cursors without HOLD die with the transaction
    if first == b"discard":
        return PinReason.DISCARD
    if first == b"listen":
        return PinReason.LISTEN
    if first == b"load":
        return PinReason.LOAD
    if first == b"create":
        i = 1
        while _word(tokens, i) in (b"or", b"replace", b"global", b"local"):
            i += 1
        if _word(tokens, i) in (b"temp", b"temporary"):
            return PinReason.TEMPORARY_OBJECT
    return None


def _set_config_is_local(tokens: List[Token], open_paren: int) -> bool:
    """Whether ``set_config(name, value, is_local)`` surely has is_local true."""
    args: List[List[Token]] = [[]]
    depth = 0
    for token in tokens[open_paren + 1 :]:
        if token[0] == _PUNCT:
            if token[1] in (b"(", b"["):
                depth += 1
            elif token[1] in (b")", b"]"):
                if depth == 0:
                    break
                depth -= 1
            elif token[1] == b"," and depth == 0:
                args.append([])
                continue
        args[-1].append(token)
    else:
        return False  # unterminated call: can't tell
    if len(args) != 3 or len(args[2]) != 1:
        return False
    kind, value = args[2][0]
    if kind == _WORD:
        return value == b"true"
    if kind == _STRING and value is not None:
        return value.strip().lower() in _TRUE_TEXTS
    return False


def _classify_statement(tokens: List[Token], exclude_variable_sets: bool) -> Optional[PinReason]:
    reason = _leading_reason(tokens, exclude_variable_sets)
    if reason is not None:
        return reason
    is_create = _word(tokens, 0) == b"create"
    for i, (kind, value) in enumerate(tokens):
        if kind == _PUNCT and value == b"(":
            name = _ident(tokens, i - 1)
            reason = _PINNING_FUNCTIONS.get(name) if name else None
            if reason is None:
                continue
            qualified = i >= 2 and tokens[i - 2] == (_PUNCT, b".")
            if qualified and _ident(tokens, i - 3) != b"pg_catalog":
                continue  # some other schema's function of the same name
            if reason is PinReason.SET_VARIABLE and (
                exclude_variable_sets or _set_config_is_local(tokens, i)
            ):
                continue
            return reason
        if kind == _WORD and value == b"into":
            # SELECT ... INTO TEMP t; INSERT/MERGE INTO temp names a table called "temp".
            if i and _word(tokens, i - 1) in (b"insert", b"merge"):
                continue
            if _word(tokens, i + 1) in (b"temp", b"temporary") or _is_pg_temp_name(tokens, i + 1):
                return PinReason.TEMPORARY_OBJECT
        if is_create and _is_pg_temp_name(tokens, i):
            return PinReason.TEMPORARY_OBJECT
    return None


# --- public API ------------------------------------------------------------------------


def classify_query(sql: bytes, exclude_variable_sets: bool = False) -> Optional[PinReason]:
    """The first reason, in statement order, that this SQL text pins the session, or None.

    ``sql`` is a simple Query's or a Parse's text, possibly several ``;``-separated
    statements, in any encoding (only ASCII keywords matter). ``exclude_variable_sets`` is
    the EXCLUDE_VARIABLE_SETS session pinning filter: SET, RESET and set_config() then
    never pin. Never raises on odd input: unterminated quotes and comments swallow the rest.
    """
    if len(sql) > MAX_STATEMENT_BYTES:
        return PinReason.STATEMENT_TOO_LARGE
    if not isinstance(sql, bytes):
        sql = bytes(sql)  # bytearray, memoryview and other bytes-like input
    key = (sql, exclude_variable_sets)
    try:
        return _seen[key]  # applications send the same few statements over and over
    except KeyError:
        pass
    reason = None
    if _LITERALS.search(sql.lower()) is not None and _CANDIDATE.search(sql) is not None:
        for tokens in _statements(sql):
            reason = _classify_statement(tokens, exclude_variable_sets)
            if reason is not None:
                break
    if len(sql) <= _SEEN_TEXT_MAX:  # bounded memory: 4096 texts of at most 2 KB
        if len(_seen) >= _SEEN_MAX:
            _seen.clear()
        _seen[key] = reason
    return reason


def classify_parse(
    statement_name: bytes, sql: bytes, exclude_variable_sets: bool = False
) -> Optional[PinReason]:
    """A Parse message: a named statement outlives the transaction, so it pins."""
    if statement_name:
        return PinReason.PREPARED_STATEMENT
    return classify_query(sql, exclude_variable_sets)


def classify_bind(portal_name: bytes) -> Optional[PinReason]:
    """A Bind message: a named portal may be executed again later, so it pins."""
    return PinReason.NAMED_PORTAL if portal_name else None
