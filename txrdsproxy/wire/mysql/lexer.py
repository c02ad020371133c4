"""A lexer for MariaDB/MySQL statement text that ends comments, strings and identifiers where the
server's own lexer does (sql/sql_lex.cc), so that the pinning classifier sees the code the server
will run, and nothing hidden in what only looks like a comment or a string.

Sans-I/O, bytes in.  What it follows, as MariaDB does:

* ``#`` comments end at ``\\n``; ``--`` starts a comment only when followed by whitespace or a
  control character (``--1`` is arithmetic); ``/* */`` comments do not nest.
* ``/*! ... */`` and ``/*M! ... */``: without a version number the content is code.  With one
  (5 or 6 digits) the content is code when the version is at most the server's (MySQL-only
  versions 50700-99999 are skipped unless ``M!``), and otherwise a comment that may hold plain
  ``/* */`` comments.  So the server's version decides; without it the lexer gives up.
* strings in ``'`` and (unless ANSI_QUOTES) ``"``: a doubled quote or, unless
  NO_BACKSLASH_ESCAPES, a backslash escapes; identifiers in backticks and (with ANSI_QUOTES)
  ``"``, where only the doubled quote escapes.
* ``;`` ends a statement (multi-statements are lexed one statement at a time, each with the
  sql_mode in force after the previous one ran: see `Lexer.statement`).

It fails closed: whatever it cannot decide the way the server would (``--`` followed by a byte
above 0x7F, whose meaning depends on the client charset's ctype; a versioned comment without the
server's version; a comment opened inside an executable comment) raises `Ambiguous`, and the
classifier pins.  Client charsets whose multi-byte characters can contain quote or backslash bytes
(sjis, big5, gbk, cp932, gb18030) are not lexed at all: those sessions pin (see pinning.py).

Tokens are ``(kind, value, raw)``: w (word, value upper-cased), s (string, value unquoted),
q (quoted identifier, value unquoted), sv (``@@[scope.]name``, value lower-cased), uv (``@name``),
op (``:=``), p (any other single byte).  Text is handled as latin-1 (one char per byte).
"""

import re

_SPACE = frozenset(" \t\n\r\x0b\x0c")
_WORD = re.compile(r"[A-Za-z0-9_$\x80-\xff]+")
_HOST = re.compile(r"[A-Za-z0-9_$.\x80-\xff]*")
_DIGITS = re.compile(r"\d{5}")
_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "Z": "\x1a", "b": "\b"}


class Ambiguous(Exception):
    """The text can be read more than one way by the server: classify it as pinning."""


def version_id(server_version):
    """MYSQL_VERSION_ID of a greeting's version string ("5.5.5-10.11.6-MariaDB" -> 101106), or
    None when it cannot be read."""
    if not server_version:
        return None
    text = server_version
    if text.startswith("5.5.5-"):  # MariaDB's prefix for old replication clients
        text = text[6:]
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if m is None:
        return None
    major, minor, patch = (int(x) for x in m.groups())
    return major * 10000 + minor * 100 + patch


class Lexer:
    """Lex one query text statement by statement.

    ``Lexer(text, ansi_quotes, no_backslash_escapes, server_version)``; then call `statement()`
    until it returns None.  The two sql_mode flags may be changed between statements (a
    statement that set sql_mode changes how the server lexes the next one).
    """

    def __init__(self, text, ansi_quotes=False, no_backslash_escapes=False, server_version=None):
        self.text = text
        self.pos = 0
        self.ansi_quotes = ansi_quotes
        self.no_backslash_escapes = no_backslash_escapes
        self.server_version = server_version
        self.in_code_comment = False  # inside /*! ... */ whose content is code

    def statement(self):
        """The tokens of the next statement (possibly empty), or None at the end of the text."""
        text, n = self.text, len(self.text)
        if self.pos >= n:
            return None
        tokens = []
        pos = self.pos
        while pos < n:
            c = text[pos]
            if c in _SPACE:
                pos += 1
            elif c == "#":
                pos = self._to_eol(pos)
            elif c == "-" and text.startswith("-", pos + 1):
                if pos + 2 >= n or text[pos + 2] <= " " or text[pos + 2] == "\x7f":
                    pos = self._to_eol(pos)
                elif text[pos + 2] >= "\x80":
                    raise Ambiguous("'--' followed by a non-ASCII byte")
                else:
                    tokens.append(("p", "-", "-"))
                    pos += 1
            elif c == "/" and text.startswith("*", pos + 1):
                pos = self._comment(pos)
            elif c == "*" and self.in_code_comment and text.startswith("/", pos + 1):
                self.in_code_comment = False
                pos += 2
            elif c == "'" or (c == '"' and not self.ansi_quotes):
                end, value = self._string(pos, c)
                tokens.append(("s", value, text[pos:end]))
                pos = end
            elif c == "`" or c == '"':
                end, value = self._quoted(pos, c)
                tokens.append(("q", value, text[pos:end]))
                pos = end
            elif c == "@":
                pos = self._variable(pos, tokens)
            elif c == ":" and text.startswith("=", pos + 1):
                tokens.append(("op", ":=", ":="))
                pos += 2
            elif c == ";":
                # The server parses the next statement afresh: an executable comment left open
                # here is not open there.
                self.pos = pos + 1
                self.in_code_comment = False
                return tokens
            else:
                m = _WORD.match(text, pos)
                if m is not None:
                    raw = m.group()
                    tokens.append(("w", raw.upper(), raw))
                    pos = m.end()
                else:
                    tokens.append(("p", c, c))
                    pos += 1
        self.pos = n
        return tokens

    # -- pieces ------------------------------------------------------------------------------
    def _to_eol(self, pos):
        end = self.text.find("\n", pos)
        return len(self.text) if end < 0 else end + 1

    def _comment(self, pos):
        """At ``/*``: -> the position after the comment, or inside an executable one."""
        text = self.text
        if text.startswith("!", pos + 2) or text.startswith("M!", pos + 2):
            maria = text[pos + 2] == "M"
            start = pos + (4 if maria else 3)
            if self.in_code_comment:
                raise Ambiguous("an executable comment inside an executable comment")
            m = _DIGITS.match(text, start)
            if m is None:  # no version: the content is code
                self.in_code_comment = True
                return start
            length = 6 if text[start + 5:start + 6].isdigit() else 5
            version = int(text[start:start + length])
            if self.server_version is None:
                raise Ambiguous("a versioned comment, and the server's version is unknown")
            if version <= self.server_version and (version < 50700 or version > 99999 or maria):
                self.in_code_comment = True
                return start + length
            return self._skip_comment(start + length, nested=True)
        return self._skip_comment(pos + 2, nested=False)  # also inside an executable comment

    def _skip_comment(self, pos, nested):
        """Skip to after the ``*/`` closing a comment (with *nested*: plain ``/* */`` comments
        inside are skipped whole, as in a versioned comment for another server version)."""
        text = self.text
        while True:
            close = text.find("*/", pos)
            if close < 0:
                return len(text)  # unclosed: a syntax error, nothing of it runs
            if nested:
                inner = text.find("/*", pos, close)
                if inner >= 0:
                    inner_close = text.find("*/", inner + 2)
                    if inner_close < 0:
                        return len(text)
                    pos = inner_close + 2
                    continue
            return close + 2

    def _string(self, pos, quote, backslashes=None):
        text, n = self.text, len(self.text)
        out = []
        i = pos + 1
        if backslashes is None:
            backslashes = not self.no_backslash_escapes
        while i < n:
            c = text[i]
            if c == "\\" and backslashes:
                if i + 1 < n:
                    out.append(_UNESCAPE.get(text[i + 1], text[i + 1]))
                i += 2
                continue
            if c == quote:
                if text.startswith(quote, i + 1):
                    out.append(quote)
                    i += 2
                    continue
                return i + 1, "".join(out)
            out.append(c)
            i += 1
        return n, "".join(out)  # unclosed: a syntax error at the end, nothing of it runs

    def _quoted(self, pos, quote):
        """A quoted identifier: doubled quotes only, a backslash is an ordinary character."""
        return self._string(pos, quote, backslashes=False)

    def _variable(self, pos, tokens):
        """At ``@``: a system variable ``@@[scope.]name`` or a user variable ``@name``."""
        text, n = self.text, len(self.text)
        if text.startswith("@", pos + 1):
            i = pos + 2
            parts = []
            while i < n:
                c = text[i]
                if c == "`" or (c == '"' and self.ansi_quotes):
                    i, part = self._quoted(i, c)
                else:
                    m = _WORD.match(text, i)
                    if m is None:
                        break
                    part, i = m.group(), m.end()
                parts.append(part)
                if not text.startswith(".", i) or len(parts) == 2:
                    break
                i += 1
            tokens.append(("sv", ".".join(parts).lower(), text[pos:i]))
            return i
        i = pos + 1
        if i < n and text[i] in "'\"`":
            quote = text[i]
            if quote == "`" or (quote == '"' and self.ansi_quotes):
                i, _ = self._quoted(i, quote)
            else:
                i, _ = self._string(i, quote)
        else:
            i = _HOST.match(text, i).end()
        tokens.append(("uv", text[pos:i], text[pos:i]))
        return i
