"""Statement text with its literals masked, for what operators see (pinned sessions, DebugLogging).

Literal values are where secrets live (`SET app.token = 's3cr3t'`, `ALTER ROLE x PASSWORD '...'`,
`WHERE card = 4111...`), so every string, number and comment becomes a placeholder while the
statement's shape stays readable: `SET app.token = ?`.  One lexer for both engines' quoting
rules, which differ only in details: PostgreSQL's E'' strings and $tag$ dollar quotes, MySQL's
backslash escapes, "..." strings (outside ANSI_QUOTES), `#` comments and backticked names.
When unsure (an unterminated literal), everything from there on is masked: the masker fails
closed.  Runs only when someone asks (the admin API, a DebugLogging line), never per message.
"""

import re

POSTGRESQL, MYSQL = "POSTGRESQL", "MYSQL"
PLACEHOLDER = "?"

_SPACE_AND_COMMENTS = r"""
      (?P<space>\s+)
    | (?P<line_comment>--[^\n]*)
    | (?P<block_comment>/\*(?:.|\n)*?(?:\*/|\Z))
"""
_NUMBER_AND_WORD = r"""
    | (?P<number>(?<![A-Za-z0-9_$])(?:0[xX][0-9A-Fa-f]+|\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))
    | (?P<word>[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*)
"""
# PostgreSQL: standard strings have no backslash escapes ('a\' is complete); E'' strings do.
_PG = re.compile(_SPACE_AND_COMMENTS + r"""
    | (?P<string>[eE]'(?:''|\\.|[^'\\])*(?:'|\Z)
                |(?:[bBxXnN]|[uU]&)?'(?:''|[^'])*(?:'|\Z))
    | (?P<dollar>\$\$(?:.|\n)*?(?:\$\$|\Z)
                |\$(?P<tag>[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)\$(?:.|\n)*?(?:\$(?P=tag)\$|\Z))
    | (?P<param>\$\d+)
    | (?P<quoted>"(?:""|[^"])*(?:"|\Z))
""" + _NUMBER_AND_WORD + r"""
    | (?P<punct>.)
""", re.X)
# MySQL / MariaDB (default sql_mode): backslash escapes in '' and "" strings, # comments.
_MY = re.compile(_SPACE_AND_COMMENTS + r"""
    | (?P<hash_comment>\#[^\n]*)
    | (?P<string>(?:_[A-Za-z0-9]+)?[nNbBxX]?'(?:''|\\.|[^'\\])*(?:'|\Z)|"(?:""|\\.|[^"\\])*(?:"|\Z))
    | (?P<quoted>`(?:``|[^`])*(?:`|\Z))
""" + _NUMBER_AND_WORD + r"""
    | (?P<punct>.)
""", re.X)


def mask_literals(text, engine=POSTGRESQL, limit=None):
    """-> *text* (str or bytes) with strings, numbers and comments replaced by `?` (comments by a
    space), whitespace runs collapsed; cut to *limit* characters (after masking) when given."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", "replace")
    lexer = _MY if engine == MYSQL else _PG
    out = []
    size = 0
    pos, end = 0, len(text)
    while pos < end:
        m = lexer.match(text, pos)
        kind = m.lastgroup
        pos = m.end()
        if kind in ("space", "line_comment", "block_comment", "hash_comment"):
            piece = " " if out and out[-1] != " " else ""
        elif kind == "string" and "\\" in m.group() and (lexer is _MY or m.group()[0] not in "eE"):
            # A backslash where its meaning depends on a session setting (PostgreSQL's
            # standard_conforming_strings, MySQL's NO_BACKSLASH_ESCAPES): the literal may end
            # elsewhere than we think.  Fail closed: mask everything from here on.
            out.append(PLACEHOLDER)
            break
        elif kind in ("string", "dollar", "number"):
            piece = PLACEHOLDER
        else:
            piece = m.group()
        if piece:
            out.append(piece)
            size += len(piece)
            if limit is not None and size >= limit:
                break
    masked = "".join(out).strip()
    return masked[:limit] if limit is not None else masked
