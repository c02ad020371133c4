"""A lexer for PostgreSQL SQL text that splits it where the server's own scanner would.

The pinning classifier (``pinning.py``) decides from SQL text whether a statement leaves state
behind on a database connection.  A classifier is only as good as its idea of where statements,
comments, strings and identifiers begin and end: if it thinks ``SET search_path = evil`` sits
inside a comment while the server runs it, one client's setting reaches every session that
later borrows that connection.  So this module follows the rules of PostgreSQL 15's scanner
(``src/backend/parser/scan.l`` and the ``UESCAPE`` handling in ``parser.c``) for everything that
moves a boundary:

* ``--`` comments end at ``\\n`` *or* ``\\r``; ``/* */`` comments nest.
* ``'...'`` strings double their quotes; with ``standard_conforming_strings`` off they take
  backslash escapes like ``E'...'`` strings do.  ``B'...'`` / ``X'...'`` never do.  A string
  continues after a closing quote when whitespace containing a newline and another quote follow.
* ``$tag$...$tag$`` dollar quotes (a tag is an identifier without ``$``; a ``$`` right after an
  identifier character belongs to the identifier, ``$1`` is a parameter).
* ``"..."`` identifiers, ``U&"..."`` identifiers and ``U&'...'`` strings with an optional
  ``UESCAPE 'c'`` clause, decoded (``\\0073``, ``\\+000073``, surrogate pairs) into UTF-8.
* Unquoted identifiers are folded to lower case (ASCII only, as the server does for multi-byte
  server encodings; no other fold can produce an ASCII letter).

Where the server would raise a syntax error (unterminated quote or comment, bad escape, junk
after a number) the lexer does not try to agree: a simple Query or a Parse is parsed whole before
any of it runs, so text the server rejects changes nothing, whatever the classifier decides.
Vertical tab counts as whitespace (PostgreSQL 16 does; 15 rejects it outside quotes).

Input is bytes in the *server* encoding's byte structure: every multi-byte character has only
bytes >= 0x80.  Client encodings that break that (SJIS, BIG5, GBK, ...) are not lexed; see
``pinning.unsafe_client_encoding``.  Pure: no I/O, no Twisted.
"""

from __future__ import annotations

import re
from typing import Iterator, List, Optional, Tuple

__all__ = ["WORD", "IDENT", "STRING", "OP", "NUMBER", "PARAM", "Token", "statements", "tokens"]

# Token kinds.  A token is (kind, value):
WORD = 0  # unquoted identifier or keyword, lower-cased
IDENT = 1  # quoted identifier ("..." or U&"..."), decoded, exact case; None if undecodable
STRING = 2  # string constant's text; None when not known exactly (backslash escapes, bit strings)
OP = 3  # punctuation or operator: one of ,()[].; : or an operator run such as = or =>
NUMBER = 4
PARAM = 5  # $1, $2, ...
Token = Tuple[int, Optional[bytes]]

_TOKEN = re.compile(
    rb"""
      (?P<space>[ \t\n\r\f\v]+)
    | (?P<comment>--[^\n\r]*)
    | (?P<block>/\*)
    | (?P<xe>[eE]')
    | (?P<xb>[bBxX]')
    | (?P<xus>[uU]&')
    | (?P<xui>[uU]&")
    | (?P<xq>')
    | (?P<xd>")
    | (?P<dolq>\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$)
    | (?P<param>\$[0-9]+)
    | (?P<word>[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
    | (?P<number>(?:[0-9]+\.(?!\.)[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)
    | (?P<op>[~!@\#^&|`?+\-*/%<>=]+)
    | (?P<colon>::|:=|:)
    | (?P<other>.)
    """,
    re.S | re.X,
)

# Bodies after the opening quote, up to and including the closing quote.
_XQ_BODY = re.compile(rb"[^']*(?:''[^']*)*'")  # standard string, U&'' string
_XE_BODY = re.compile(rb"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.S)  # backslash escapes
_XB_BODY = re.compile(rb"[^']*'")  # bit/hex strings: no escapes, no doubling
_XD_BODY = re.compile(rb'[^"]*(?:""[^"]*)*"')  # quoted identifier
# After a closing quote: whitespace with at least one newline, then a quote, continues the
# string (SQL's continuation rule; scan.l's {quotecontinue}).
_CONTINUE = re.compile(
    rb"(?:[ \t\f\v]|--[^\n\r]*)*[\n\r](?:[ \t\n\r\f\v]|--[^\n\r]*[\n\r])*'"
)
_COMMENT_EDGE = re.compile(rb"/\*|\*/")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_BAD_UESCAPE = frozenset(b"0123456789abcdefABCDEF+'\" \t\n\r\f\v")


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


def _quoted(body, sql: bytes, pos: int, doubled: bytes) -> Tuple[Optional[bytes], int]:
    """A quoted run's text and end (with continuations for strings); unterminated: None, end."""
    parts = []
    while True:
        m = body.match(sql, pos)
        if m is None:
            return None, len(sql)
        parts.append(m.group()[:-1])
        pos = m.end()
        if doubled == b'"':
            break
        more = _CONTINUE.match(sql, pos)
        if more is None:
            break
        pos = more.end()
    text = b"".join(parts)
    return (text.replace(doubled + doubled, doubled) if doubled else text), pos


def _unicode_decode(text: bytes, escape: int) -> Optional[bytes]:
    """Decode a U& literal's body as the server does (str_udeescape); None where it errors."""
    if escape not in text:
        return text
    out = bytearray()
    i, n = 0, len(text)
    pending_high = None
    while i < n:
        c = text[i]
        if c != escape:
            if pending_high is not None:
                return None
            out.append(c)
            i += 1
            continue
        if i + 1 < n and text[i + 1] == escape:
            if pending_high is not None:
                return None
            out.append(escape)
            i += 2
            continue
        if i + 4 < n + 0 and all(b in _HEX for b in text[i + 1 : i + 5]):
            code, i = int(text[i + 1 : i + 5], 16), i + 5
        elif (
            i + 7 < n
            and text[i + 1] == ord("+")
            and all(b in _HEX for b in text[i + 2 : i + 8])
        ):
            code, i = int(text[i + 2 : i + 8], 16), i + 8
        else:
            return None
        if pending_high is not None:
            if not 0xDC00 <= code <= 0xDFFF:
                return None
            code = 0x10000 + ((pending_high - 0xD800) << 10) + (code - 0xDC00)
            pending_high = None
        elif 0xD800 <= code <= 0xDBFF:
            pending_high = code
            continue
        elif 0xDC00 <= code <= 0xDFFF:
            return None
        if not 0 < code <= 0x10FFFF:
            return None
        out += chr(code).encode("utf-8")
    if pending_high is not None:
        return None
    return bytes(out)


def tokens(sql: bytes, standard_conforming_strings: bool = True) -> List[Token]:
    """The tokens of ``sql`` in order, whitespace and comments dropped, ``;`` included.

    ``U&`` literals come out as ``(IDENT, raw)`` / ``(STRING, raw)`` marked by a preceding
    ``(OP, b"U&")`` token; :func:`statements` decodes them (it needs the ``UESCAPE`` after them).
    One loop with local names: this runs on every statement the pre-filter lets through.
    """
    out: List[Token] = []
    add = out.append
    pos, end = 0, len(sql)
    match = _TOKEN.match
    plain_body = _XQ_BODY if standard_conforming_strings else _XE_BODY
    while pos < end:
        m = match(sql, pos)
        kind, pos = m.lastgroup, m.end()
        if kind == "space" or kind == "comment":
            continue
        if kind == "word":
            add((WORD, m.group().lower()))
        elif kind == "op":
            op = m.group()
            if len(op) > 1 and (b"--" in op or b"/*" in op):
                # An operator never swallows a comment start ("+/*", "=--").
                cut = min(i for i in (op.find(b"--"), op.find(b"/*")) if i > 0)
                op, pos = op[:cut], m.start() + cut
            add((OP, op))
        elif kind == "other" or kind == "colon":
            add((OP, m.group()))
        elif kind == "number":
            add((NUMBER, m.group()))
        elif kind == "xq":
            value, pos = _quoted(plain_body, sql, pos, b"'")
            if not standard_conforming_strings and value is not None and b"\\" in value:
                value = None
            add((STRING, value))
        elif kind == "block":
            pos = _skip_block_comment(sql, pos)
        elif kind == "xd":
            value, pos = _quoted(_XD_BODY, sql, pos, b'"')
            add((IDENT, value))
        elif kind == "param":
            add((PARAM, m.group()))
        elif kind == "xe":
            value, pos = _quoted(_XE_BODY, sql, pos, b"'")
            add((STRING, None if value is None or b"\\" in value else value))
        elif kind == "xb":
            _, pos = _quoted(_XB_BODY, sql, pos, b"")
            add((STRING, None))
        elif kind == "xus":
            value, pos = _quoted(_XQ_BODY, sql, pos, b"'")
            add((OP, b"U&"))
            add((STRING, value))
        elif kind == "xui":
            value, pos = _quoted(_XD_BODY, sql, pos, b'"')
            add((OP, b"U&"))
            add((IDENT, value))
        else:  # dolq
            delim = m.group()
            close = sql.find(delim, pos)
            if close < 0:
                add((STRING, None))
                pos = end
            else:
                add((STRING, sql[pos:close]))
                pos = close + len(delim)
    return out


def _resolve_unicode(stmt: List[Token]) -> List[Token]:
    """Replace each U& marker + literal (+ UESCAPE 'c') by the decoded literal."""
    out: List[Token] = []
    i, n = 0, len(stmt)
    while i < n:
        token = stmt[i]
        if token != (OP, b"U&") or i + 1 >= n:
            out.append(token)
            i += 1
            continue
        kind, raw = stmt[i + 1]
        i += 2
        escape = ord("\\")
        if i + 1 < n and stmt[i] == (WORD, b"uescape"):
            esc = stmt[i + 1]
            i += 2
            if esc[0] != STRING or esc[1] is None or len(esc[1]) != 1 or esc[1][0] in _BAD_UESCAPE:
                raw = None  # the server rejects the clause
            else:
                escape = esc[1][0]
        out.append((kind, None if raw is None else _unicode_decode(raw, escape)))
    return out


def statements(sql: bytes, standard_conforming_strings: bool = True) -> Iterator[List[Token]]:
    """Tokens of each ``;``-separated statement (empty statements skipped)."""
    stmt: List[Token] = []
    unicode = False
    for token in tokens(sql, standard_conforming_strings):
        if token[0] == OP:
            value = token[1]
            if value == b";":
                if stmt:
                    yield _resolve_unicode(stmt) if unicode else stmt
                stmt, unicode = [], False
                continue
            if value == b"U&":
                unicode = True
        stmt.append(token)
    if stmt:
        yield _resolve_unicode(stmt) if unicode else stmt
