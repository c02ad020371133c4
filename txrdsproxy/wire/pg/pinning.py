"""Which PostgreSQL client requests pin a session to its database connection, and why.

The proxy hands a database connection to another client at each transaction boundary.
That is only safe if the client left no session state behind on it (RDS Proxy user guide,
"Avoiding Pinning").  This module looks at SQL text, extended-protocol names and fast-path
function calls and answers with the ``PinReason`` that forbids reuse, or ``None``.

It fails closed.  Text is split into statements, comments, strings and identifiers exactly as
PostgreSQL 15's scanner splits it (``lexer.py``), so no disguise (``--`` ended by ``\\r``,
``U&"\\0073et_config"``, ``"pg_catalog"."set_config"``, ...) hides a statement; state changed
indirectly pins too (``set_config`` and the sequence, advisory-lock and other session-state
functions by any spelling, ``UPDATE pg_settings``, ``EXPLAIN ANALYZE`` of a pinning statement,
objects in ``pg_temp``, ``SELECT ... INTO TEMP``); and code the proxy cannot read pins whole
(``DO`` blocks, ``CALL``).  What no proxy can see: a user-defined function, trigger, rule or
view that changes session state when called (docs/security.md).

Fast: ``classify_query`` runs on every Query and Parse.  A verdict cache answers repeated texts;
a literal pre-filter answers the rest of the common case (a text in which no rule's keyword
occurs cannot pin; every rule below names its keywords in ``_LITERALS``/``_CANDIDATE_WORDS``).
"""

from __future__ import annotations

import enum
import re
from typing import List, Optional

from txrdsproxy.wire.pg.lexer import IDENT, OP, STRING, WORD, Token, statements

__all__ = [
    "PinReason",
    "MAX_STATEMENT_BYTES",
    "classify_query",
    "classify_parse",
    "classify_bind",
    "classify_function_call",
    "unsafe_client_encoding",
    "statement_reasons",
    "classify_tokens",
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
    PROCEDURAL_CODE = "procedural_code"  # DO blocks and CALL: the proxy cannot see inside
    SESSION_FUNCTION = "session_function"  # setseed, pg_backup_start, temporary slots, dblink
    FUNCTION_CALL = "function_call"  # a fast-path FunctionCall message (by OID)
    CLIENT_ENCODING = "client_encoding"  # a client encoding the proxy cannot lex (SJIS, ...)


# --- fast path -------------------------------------------------------------------------
# Verdicts of recent statement texts (pure function of the arguments, so safe to share).
_seen = {}
_SEEN_MAX = 4096
_SEEN_TEXT_MAX = 2048

# First filter on the lower-cased text: every rule needs one of these substrings (a keyword or
# function name contains one), or a U& literal, which can spell any name in escapes.
_LITERALS = re.compile(
    rb"set|prepar|temp|declare|discard|listen|load|val|advisory|do|call|backup|slot|dblink|u&"
)
# Second filter: the word around each literal hit must be a rule's keyword or name.  A word is
# widened backwards over [a-z0-9_] only and forwards over [a-z0-9_$] (PostgreSQL's identifier
# characters, less "$" before and bytes >= 0x80 either side, which can only make the word
# shorter, so a hit is kept when unsure).  No pinning word can hide inside a longer identifier.
_CANDIDATE_WORDS = frozenset(
    b"set reset prepare temp temporary declare discard listen load do call nextval setval"
    b" currval lastval set_config setseed pg_settings pg_backup_start pg_start_backup"
    b" pg_replication_origin_session_setup pg_create_logical_replication_slot"
    b" pg_create_physical_replication_slot dblink_connect dblink_connect_u dblink_open".split()
)
_BACK_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")
_FORWARD_CHARS = _BACK_CHARS | {ord("$")}
# SET pins only as the first keyword of a statement.  The commonest candidate by far is the SET
# of UPDATE ... SET: a text whose only candidate word is "set", that holds one statement (no ";"
# before its end) and that starts, after plain whitespace, with a word other than SET cannot pin.
_STARTS_WITH_OTHER_WORD = re.compile(rb"[ \t\n\r\f\v]*(?!set\b)[a-z_]")
_TRAILER = b" \t\n\r\f\v;"

# --- rules -----------------------------------------------------------------------------

# Built-in functions (schema pg_catalog) whose call pins wherever it appears in a statement.
_PINNING_FUNCTIONS = {
    b"nextval": PinReason.SEQUENCE_FUNCTION,
    b"setval": PinReason.SEQUENCE_FUNCTION,
    b"currval": PinReason.SEQUENCE_FUNCTION,  # reads what an earlier nextval left
    b"lastval": PinReason.SEQUENCE_FUNCTION,
    b"pg_advisory_lock": PinReason.ADVISORY_LOCK,
    b"pg_advisory_lock_shared": PinReason.ADVISORY_LOCK,
    b"pg_try_advisory_lock": PinReason.ADVISORY_LOCK,
    b"pg_try_advisory_lock_shared": PinReason.ADVISORY_LOCK,
    b"set_config": PinReason.SET_VARIABLE,  # unless its is_local argument is true
    b"setseed": PinReason.SESSION_FUNCTION,  # the session's random() sequence
    b"pg_backup_start": PinReason.SESSION_FUNCTION,  # a backup tied to this session
    b"pg_start_backup": PinReason.SESSION_FUNCTION,  # (its name before 15)
    b"pg_create_logical_replication_slot": PinReason.SESSION_FUNCTION,  # temporary slots
    b"pg_create_physical_replication_slot": PinReason.SESSION_FUNCTION,
    b"pg_replication_origin_session_setup": PinReason.SESSION_FUNCTION,
}
# Extension functions with session state: installed in any schema, so any qualification pins.
_EXTENSION_FUNCTIONS = {
    b"dblink_connect": PinReason.SESSION_FUNCTION,  # named connections live in the backend
    b"dblink_connect_u": PinReason.SESSION_FUNCTION,
    b"dblink_open": PinReason.SESSION_FUNCTION,
}
# Settings whose change pins always, even by SET LOCAL and with EXCLUDE_VARIABLE_SETS: those that
# change how the server lexes later statements (so that every statement the classifier reads
# afterwards is read under the rules it was read with), and the role (a connection left with
# another role would hand its privileges to the next session).
_LEXER_SETTINGS = {
    b"standard_conforming_strings", b"client_encoding", b"names",
    b"role", b"authorization", b"session_authorization",
}

# Boolean input spellings PostgreSQL reads as true (boolin accepts unique prefixes).
_TRUE_TEXTS = {b"t", b"tr", b"tru", b"true", b"y", b"ye", b"yes", b"on", b"1"}
_TEMP_WORDS = (b"temp", b"temporary")
_TEMP_SCHEMA = re.compile(rb"pg_(?:toast_)?temp(?:_[0-9]+)?")
_DOT, _OPEN = (OP, b"."), (OP, b"(")


def _word(tokens: List[Token], i: int) -> Optional[bytes]:
    """The unquoted word at ``i``, if that is what is there."""
    if 0 <= i < len(tokens) and tokens[i][0] == WORD:
        return tokens[i][1]
    return None


def _ident(tokens: List[Token], i: int) -> Optional[bytes]:
    """The identifier at ``i`` as PostgreSQL resolves it (quoted ones keep case)."""
    if 0 <= i < len(tokens) and tokens[i][0] in (WORD, IDENT):
        return tokens[i][1]
    return None


def _setting_name(tokens: List[Token], i: int) -> Optional[bytes]:
    """A SET/RESET variable name at ``i``, lower-cased (GUC names ignore case, quoted too)."""
    name = _ident(tokens, i)
    return name.lower() if name is not None else None


def _skip_explain(tokens: List[Token]) -> int:
    """Index of the statement an EXPLAIN wraps (0 if ``tokens`` is not an EXPLAIN)."""
    i = 0
    while _word(tokens, i) == b"explain":
        i += 1
        if tokens[i : i + 1] == [_OPEN]:
            depth = 0
            while i < len(tokens):
                if tokens[i] == _OPEN:
                    depth += 1
                elif tokens[i] == (OP, b")"):
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            i += 1
        while _word(tokens, i) in (b"analyze", b"analyse", b"verbose"):
            i += 1
    return i


def _leading_reason(tokens: List[Token], i: int, exclude_sets: bool) -> Optional[PinReason]:
    """Rules decided by the statement's first keywords (only a leading SET is the SET command)."""
    first = _word(tokens, i)
    if first == b"set":
        scope = _word(tokens, i + 1)
        name_at = i + 2 if scope in (b"session", b"local") else i + 1
        if _setting_name(tokens, name_at) in _LEXER_SETTINGS:
            return PinReason.SET_VARIABLE
        if scope in (b"local", b"transaction", b"constraints"):
            return None  # lasts only until the end of the transaction
        return None if exclude_sets else PinReason.SET_VARIABLE
    if first == b"reset":
        return None if exclude_sets else PinReason.RESET
    if first == b"prepare":
        if _word(tokens, i + 1) == b"transaction" and [t[0] for t in tokens[i + 2 : i + 3]] == [STRING]:
            return None  # two-phase commit, not a prepared statement
        return PinReason.PREPARED_STATEMENT
    if first == b"declare":
        for j in range(i + 1, len(tokens)):
            word = _word(tokens, j)
            if word == b"for":  # the cursor's query starts here
                break
            if word == b"with" and _word(tokens, j + 1) == b"hold":
                return PinReason.HOLD_CURSOR
        return None  # cursors without HOLD die with the transaction
    if first == b"discard":
        return PinReason.DISCARD
    if first == b"listen":
        return PinReason.LISTEN
    if first == b"load":
        return PinReason.LOAD
    if first in (b"do", b"call"):
        return PinReason.PROCEDURAL_CODE
    if first == b"create":
        # OptTemp comes right after CREATE [OR REPLACE] in every statement that takes it.
        j = i + 1
        while _word(tokens, j) in (b"or", b"replace", b"global", b"local"):
            j += 1
        if _word(tokens, j) in _TEMP_WORDS:
            return PinReason.TEMPORARY_OBJECT
    return None


def _call_args(tokens: List[Token], open_paren: int) -> List[List[Token]]:
    """Top-level arguments of the call opening at ``open_paren`` (as far as the text goes)."""
    args: List[List[Token]] = [[]]
    depth = 0
    for token in tokens[open_paren + 1 :]:
        if token[0] == OP:
            if token[1] in (b"(", b"["):
                depth += 1
            elif token[1] in (b")", b"]"):
                if depth == 0:
                    return args
                depth -= 1
            elif token[1] == b"," and depth == 0:
                args.append([])
                continue
        args[-1].append(token)
    args.append([])  # unterminated: mark the last argument as incomplete
    return args


def _set_config_reason(tokens: List[Token], open_paren: int, exclude_sets: bool) -> Optional[PinReason]:
    """``set_config(name, value, is_local)``: pins unless surely local (or excluded).

    Changing a lexer setting pins whatever the scope; a name that is not a plain literal might
    be one, so with EXCLUDE_VARIABLE_SETS it pins too.
    """
    args = _call_args(tokens, open_paren)
    first = args[0]
    name = first[0][1] if len(first) == 1 and first[0][0] == STRING else None
    if name is None or name.strip().lower() in _LEXER_SETTINGS:
        return PinReason.SET_VARIABLE
    if exclude_sets:
        return None
    if len(args) == 3 and len(args[2]) == 1:
        kind, value = args[2][0]
        if kind == WORD and value == b"true":
            return None
        if kind == STRING and value is not None and value.strip().lower() in _TRUE_TEXTS:
            return None
    return PinReason.SET_VARIABLE


def _function_reason(tokens: List[Token], i: int, exclude_sets: bool) -> Optional[PinReason]:
    """The reason a call whose ``(`` is at ``i`` pins, if it is one of ours."""
    name = _ident(tokens, i - 1)
    if name is None:
        return None
    qualified = i >= 2 and tokens[i - 2] == _DOT
    reason = _EXTENSION_FUNCTIONS.get(name)
    if reason is not None:
        return reason
    reason = _PINNING_FUNCTIONS.get(name)
    if reason is None:
        return None
    if qualified and _ident(tokens, i - 3) != b"pg_catalog":
        return None  # some other schema's function of the same name (user code: not seen)
    if reason is PinReason.SET_VARIABLE:
        return _set_config_reason(tokens, i, exclude_sets)
    return reason


def _classify_statement(tokens: List[Token], exclude_sets: bool) -> Optional[PinReason]:
    start = _skip_explain(tokens)  # EXPLAIN ANALYZE runs the statement it explains
    reason = _leading_reason(tokens, start, exclude_sets)
    if reason is not None:
        return reason
    settings = update = False
    for i, (kind, value) in enumerate(tokens):
        if kind == OP:
            if value == b"(":
                reason = _function_reason(tokens, i, exclude_sets)
                if reason is not None:
                    return reason
            continue
        if kind == WORD:
            if value == b"into":
                # SELECT ... INTO [LOCAL|GLOBAL] TEMP t; INSERT/MERGE INTO temp names a table.
                if _word(tokens, i - 1) in (b"insert", b"merge"):
                    continue
                j = i + 2 if _word(tokens, i + 1) in (b"local", b"global") else i + 1
                if _word(tokens, j) in _TEMP_WORDS:
                    return PinReason.TEMPORARY_OBJECT
            elif value == b"update":
                update = True
        if kind <= IDENT and value is not None and value[:3] == b"pg_":  # WORD or IDENT
            if value == b"pg_settings":
                settings = True  # UPDATE pg_settings SET setting = ... calls set_config
            elif tokens[i + 1 : i + 2] == [_DOT] and _TEMP_SCHEMA.fullmatch(value):
                return PinReason.TEMPORARY_OBJECT  # pg_temp.t, pg_temp_3.f(), ...
    if settings and update:
        return PinReason.SET_VARIABLE  # fails closed even with EXCLUDE_VARIABLE_SETS
    return None


def _needs_lexing(lowered: bytes) -> bool:
    """Whether any rule could apply to the (lower-cased) text: the pre-filter."""
    only_set = False
    n = len(lowered)
    for m in _LITERALS.finditer(lowered):
        a, b = m.span()
        if b - a == 2 and lowered[a] == 117:  # "u&": a U& literal can spell anything
            return True
        while a and lowered[a - 1] in _BACK_CHARS:
            a -= 1
        while b < n and lowered[b] in _FORWARD_CHARS:
            b += 1
        word = lowered[a:b]
        if word == b"set":
            only_set = True
        elif (
            word in _CANDIDATE_WORDS
            or b"advisory_lock" in word
            or (word[:3] == b"pg_" and b"temp" in word)
        ):
            return True
    if only_set:  # the SET of UPDATE ... SET cannot pin; a leading SET does
        if b";" in lowered.rstrip(_TRAILER):
            return True
        return _STARTS_WITH_OTHER_WORD.match(lowered) is None
    return False


def _classify_text(sql: bytes, exclude_sets: bool, scs: bool) -> Optional[PinReason]:
    for tokens in statements(sql, scs):
        reason = _classify_statement(tokens, exclude_sets)
        if reason is not None:
            return reason
    return None


# --- public API ------------------------------------------------------------------------


def classify_query(
    sql: bytes,
    exclude_variable_sets: bool = False,
    standard_conforming_strings: Optional[bool] = None,
) -> Optional[PinReason]:
    """The first reason, in statement order, that this SQL text pins the session, or None.

    ``sql`` is a simple Query's or a Parse's text, possibly several ``;``-separated
    statements, in the server's byte structure (a client encoding for which
    :func:`unsafe_client_encoding` is true must have pinned the session already).
    ``exclude_variable_sets`` is the EXCLUDE_VARIABLE_SETS session pinning filter: SET,
    RESET and set_config() then do not pin (except for settings that change lexing).
    ``standard_conforming_strings`` is the value on the connection that will run the text
    (ParameterStatus); ``None`` when not known: the text then pins if it would under either
    value.  Never raises on odd input: unterminated quotes and comments swallow the rest
    (the server rejects such text whole, so nothing in it runs).
    """
    if len(sql) > MAX_STATEMENT_BYTES:
        return PinReason.STATEMENT_TOO_LARGE
    if not isinstance(sql, bytes):
        sql = bytes(sql)  # bytearray, memoryview and other bytes-like input
    key = (sql, exclude_variable_sets, standard_conforming_strings)
    try:
        return _seen[key]  # applications send the same few statements over and over
    except KeyError:
        pass
    reason = None
    if _needs_lexing(sql.lower()):
        if standard_conforming_strings is None:
            reason = _classify_text(sql, exclude_variable_sets, True)
            if reason is None and b"\\" in sql:  # lexing differs only around backslashes
                reason = _classify_text(sql, exclude_variable_sets, False)
        else:
            reason = _classify_text(sql, exclude_variable_sets, standard_conforming_strings)
    if len(sql) <= _SEEN_TEXT_MAX:  # bounded memory: 4096 texts of at most 2 KB
        if len(_seen) >= _SEEN_MAX:
            _seen.clear()
        _seen[key] = reason
    return reason


def statement_reasons(sql: bytes, exclude_variable_sets: bool, standard_conforming_strings: bool):
    """-> [(tokens, reason or None)] for each statement of *sql*, in order (no cache, no
    pre-filter: for the rare callers that must see every statement, not the first reason only:
    the replay log of a pinned session, wire/pg/replay.py)."""
    return [(tokens, _classify_statement(tokens, exclude_variable_sets))
            for tokens in statements(bytes(sql), standard_conforming_strings)]


def classify_tokens(tokens: List[Token], exclude_variable_sets: bool = False) -> Optional[PinReason]:
    """The reason one statement's tokens (from ``lexer.statements``) pin, or None."""
    return _classify_statement(tokens, exclude_variable_sets)


def classify_parse(
    statement_name: bytes,
    sql: bytes,
    exclude_variable_sets: bool = False,
    standard_conforming_strings: Optional[bool] = None,
) -> Optional[PinReason]:
    """A Parse message: a named statement outlives the transaction, so it pins."""
    if statement_name:
        return PinReason.PREPARED_STATEMENT
    return classify_query(sql, exclude_variable_sets, standard_conforming_strings)


def classify_bind(portal_name: bytes) -> Optional[PinReason]:
    """A Bind message: a named portal may be executed again later, so it pins."""
    return PinReason.NAMED_PORTAL if portal_name else None


# Large-object functions (pg_proc OIDs, stable across releases; libpq's lo_* API calls them
# through FunctionCall).  Their descriptors close at transaction end: no session state.
LARGE_OBJECT_FUNCTION_OIDS = frozenset(
    {
        715,  # lo_create
        764,  # lo_import
        765,  # lo_export
        767,  # lo_import(text, oid)
        952,  # lo_open
        953,  # lo_close
        954,  # loread
        955,  # lowrite
        956,  # lo_lseek
        957,  # lo_creat
        958,  # lo_tell
        964,  # lo_unlink
        1004,  # lo_truncate
        3170,  # lo_lseek64
        3171,  # lo_tell64
        3172,  # lo_truncate64
    }
)


def classify_function_call(function_oid: int) -> Optional[PinReason]:
    """A FunctionCall ('F') message calls a function by OID, which may be ``set_config``,
    ``nextval``, ``pg_advisory_lock`` or any user function: it pins, except for the
    large-object functions libpq's lo_* API uses."""
    return None if function_oid in LARGE_OBJECT_FUNCTION_OIDS else PinReason.FUNCTION_CALL


# Client encodings in which a multi-byte character may contain the bytes of '\\', "'" or '"'
# (PostgreSQL's client-only encodings; names as PostgreSQL matches them: lower case, letters
# and digits only).  The server converts them before lexing, so the proxy, which reads the
# client's bytes, would split a statement where the server does not.
_UNSAFE_ENCODINGS = frozenset(
    {
        b"sjis", b"shiftjis", b"mskanji", b"win932", b"windows932",
        b"shiftjis2004",
        b"big5", b"win950", b"windows950",
        b"gbk", b"win936", b"windows936", b"cp936",
        b"gb18030",
        b"uhc", b"win949", b"windows949",
        b"johab",
    }
)  # fmt: skip
_NOT_ALNUM = re.compile(rb"[^a-z0-9]")


def unsafe_client_encoding(name) -> bool:
    """Whether the proxy cannot lex SQL sent in client encoding ``name`` (str or bytes).

    True for SJIS, SHIFT_JIS_2004, BIG5, GBK, GB18030, UHC and JOHAB under any of the names
    PostgreSQL accepts for them.  The frontend pins a session that uses one (from its startup
    packet, or when a ParameterStatus reports it), before it classifies another statement.
    """
    if isinstance(name, str):
        name = name.encode("utf-8", "replace")
    return _NOT_ALNUM.sub(b"", bytes(name).lower()) in _UNSAFE_ENCODINGS
