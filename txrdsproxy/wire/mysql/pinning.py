"""What in a MySQL query pins a client session to its database connection.

Rules follow the RDS Proxy guide ("Avoiding Pinning"): statements over 16 KB,
prepared statements (SQL PREPARE and COM_STMT_PREPARE), LOCK TABLE(S),
FLUSH TABLES WITH READ LOCK, user and most system variables, temporary
tables, and calls to ROW_COUNT / FOUND_ROWS / LAST_INSERT_ID pin.  SET
statements that only touch the variables RDS Proxy *tracks* (character set,
collation, time zone, autocommit, SQL mode, session_track_schema) do not pin;
:func:`classify_query` returns a :class:`TrackedSet` with the new values so
the proxy can give the session connections with matching settings.  The
current database (USE / COM_INIT_DB) is tracked from COM_INIT_DB and from
session-state tracking in OK packets, not here.

Choices beyond the guide, all on the side of pinning when unsure:

* ``SET TRANSACTION ...`` (next transaction only) pins as SET_VARIABLE: if the
  client releases the connection before starting that transaction the setting
  would leak to another client.  ``SET GLOBAL``/``PERSIST`` never pin (not
  session state).  ``SET PASSWORD`` and ``SET DEFAULT ROLE`` don't pin;
  ``SET ROLE`` does.
* A tracked variable set to anything but a single literal (an expression, a
  function, a subquery) pins as SET_VARIABLE: its value is unknown.
* GET_LOCK(), HANDLER, XA and EXECUTE IMMEDIATE pin (GET_LOCK, HANDLER, XA,
  PREPARED_STATEMENT).  ``LOCK`` as the first word covers LOCK TABLE(S) and
  LOCK INSTANCE FOR BACKUP; ``FLUSH ... FOR EXPORT`` holds locks like WITH
  READ LOCK.
* Statements defining stored routines/triggers/events end the scan: their
  bodies run later (calling them doesn't pin, as in RDS Proxy).
* ``exclude_variable_sets`` (the EXCLUDE_VARIABLE_SETS filter) suppresses the
  USER_VARIABLE and SET_VARIABLE reasons; tracked values are still returned.

Comments (``#``, ``-- ``, ``/* */``), quoted strings and backticked names
never trigger; ``/*! ... */`` and MariaDB ``/*M! ... */`` executable comments
are scanned as code.  Backslash escapes in strings are honoured unless
``no_backslash_escapes`` (the NO_BACKSLASH_ESCAPES sql_mode) is given.
Multibyte client charsets whose trailing bytes may be 0x5C (GBK, SJIS, BIG5)
can fool the string scanner; utf8/latin1 cannot.
"""

import enum
import re
import types
from dataclasses import dataclass, field

from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.lexer import Ambiguous, Lexer

MAX_STATEMENT_BYTES = 16 * 1024


class PinReason(enum.Enum):
    STATEMENT_TOO_LARGE = "statement_too_large"
    PREPARED_STATEMENT = "prepared_statement"
    LOCK_TABLES = "lock_tables"
    FLUSH_WITH_READ_LOCK = "flush_with_read_lock"
    GET_LOCK = "get_lock"
    USER_VARIABLE = "user_variable"
    SET_VARIABLE = "set_variable"
    TEMPORARY_TABLE = "temporary_table"
    LAST_INSERT_ID = "last_insert_id"
    FOUND_ROWS = "found_rows"  # includes SQL_CALC_FOUND_ROWS
    ROW_COUNT = "row_count"
    HANDLER = "handler"
    XA = "xa"
    COMPOUND_STATEMENT = "compound_statement"  # BEGIN NOT ATOMIC, IF, ... outside a routine
    UNCLASSIFIABLE = "unclassifiable"  # the server could read the text in more than one way
    UNKNOWN_DATABASE = "unknown_database"  # a USE the proxy cannot follow (no schema tracking)
    # character_set_client is a multi-byte charset whose second bytes can be 0x5C ('\\') or
    # 0x27/0x22: the server reads quotes and backslashes differently from a byte-wise lexer.
    CLIENT_CHARSET = "client_charset"


TRACKED_VARIABLES = frozenset({
    "character_set_client", "character_set_connection", "character_set_results",
    "collation_connection", "time_zone", "autocommit", "sql_mode", "session_track_schema",
})
INVALID_CLIENT_CHARSETS = frozenset({"ucs2", "utf16", "utf16le", "utf32"})
# Client-only charsets in which the second byte of a character can be an ASCII quote or backslash
# (the server lexes them character by character; the classifier cannot): a session using one is
# pinned from that moment (PinReason.CLIENT_CHARSET).
UNSAFE_CLIENT_CHARSETS = frozenset({"big5", "sjis", "cp932", "gbk", "gb18030"})


def unsafe_charset_client(value):
    """True for client charsets the classifier cannot lex (see UNSAFE_CLIENT_CHARSETS)."""
    if value is None:
        return False
    return value.strip().strip("'\"`").lower() in UNSAFE_CLIENT_CHARSETS


def invalid_charset_client(value):
    """True for charsets that can't be client charsets (answer ERROR 1231)."""
    if value is None:
        return False
    return value.strip().strip("'\"`").lower() in INVALID_CLIENT_CHARSETS


@dataclass(frozen=True)
class TrackedSet:
    """A SET that only changed tracked variables: lowercase name -> literal value.

    ``SET NAMES x [COLLATE y]`` yields character_set_client/connection/results
    (and collation_connection when COLLATE is given: otherwise the server
    picks x's default collation).  ``SET CHARACTER SET x`` yields
    character_set_client/results (the server sets character_set_connection
    to the database's charset, which this scan cannot know).
    """

    assignments: dict = field(default_factory=dict)
    database: object = None  # USE's database (when asked: track_use), or None
    multi: bool = False  # from a query of several statements (an ERR leaves the values unknown)

    def __post_init__(self):
        # Read-only: classify_query hands the same verdict to every session that sends the
        # same text (its cache), so no session may change what another one reads.
        object.__setattr__(self, "assignments", types.MappingProxyType(dict(self.assignments)))

    @property
    def invalid_charset_client(self):
        """The offending value if character_set_client is set to ucs2 & co."""
        value = self.assignments.get("character_set_client")
        return value if invalid_charset_client(value) else None

    @property
    def unsafe_charset_client(self):
        """The value if character_set_client is set to sjis & co. (see UNSAFE_CLIENT_CHARSETS)."""
        value = self.assignments.get("character_set_client")
        return value if unsafe_charset_client(value) else None


def classify_command(command):
    """Pin reason implied by a command byte alone (COM_STMT_PREPARE)."""
    if command == P.COM_STMT_PREPARE:
        return PinReason.PREPARED_STATEMENT
    return None


# --- cheap pre-check ---------------------------------------------------------------------------
_PRECHECK = re.compile(
    rb"@|(?<![A-Za-z_$])(?:set|prepare|execute|deallocate|lock|flush|handler|xa|temporary"
    rb"|get_lock|last_insert_id|found_rows|sql_calc_found_rows|row_count|charset|binlog)"
    rb"(?![A-Za-z0-9_$])", re.I)
_PRECHECK_USE = re.compile(rb"(?<![A-Za-z_$])(?:use|database|schema)(?![A-Za-z0-9_$])", re.I)

# A cheaper first filter on the lower-cased text (a literal alternation, no case folding or
# look-arounds): every _PRECHECK match contains one of these.
_LITERALS = re.compile(rb"@|set|prepar|execute|deallocate|lock|flush|handler|xa|temporary"
                       rb"|found_rows|row_count|charset|last_insert_id|binlog")


# --- classification -----------------------------------------------------------------------------
_ROUTINE = object()  # a routine/trigger/event definition: its body runs later, not now
_FUNCTIONS = {
    "GET_LOCK": PinReason.GET_LOCK,
    "LAST_INSERT_ID": PinReason.LAST_INSERT_ID,
    "FOUND_ROWS": PinReason.FOUND_ROWS,
    "ROW_COUNT": PinReason.ROW_COUNT,
}
_ROUTINES = {"PROCEDURE", "FUNCTION", "TRIGGER", "EVENT", "PACKAGE"}
_SCOPES = {"GLOBAL": "global", "SESSION": "session", "LOCAL": "session",
           "PERSIST": "global", "PERSIST_ONLY": "global"}
_VARIABLE_REASONS = (PinReason.USER_VARIABLE, PinReason.SET_VARIABLE)
# Statements in which a user variable can only be read (an assignment needs := or INTO @v, both
# caught anywhere).  Elsewhere (SET, CALL with OUT parameters, LOAD DATA ... (@v), GET
# DIAGNOSTICS @v = ..., anything unknown) a user variable pins.
_READING_STATEMENTS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "DO", "WITH",
                                 "VALUES", "TABLE", "EXECUTE", "SHOW", "EXPLAIN", "DESCRIBE",
                                 "DESC", "(", "HANDLER"})
# Compound statements outside stored programs (MariaDB runs BEGIN NOT ATOMIC, IF, CASE, LOOP,
# WHILE, REPEAT at top level): procedural code can change anything, and it holds ';'.
_COMPOUND = frozenset({"IF", "CASE", "LOOP", "WHILE", "REPEAT"})


def sql_mode_flags(sql_mode):
    """-> (ansi_quotes, no_backslash_escapes) of an sql_mode value (None: the default)."""
    modes = {m.strip() for m in (sql_mode or "").upper().split(",")}
    return bool(modes & ANSI_QUOTES_MODES), "NO_BACKSLASH_ESCAPES" in modes


def other_grammar(sql_mode):
    """Whether *sql_mode* switches MariaDB to another grammar (ORACLE: its own parser, where
    BEGIN ... END is a block and ':' a token): the classifier does not know it, so anything it
    would look at pins (UNCLASSIFIABLE)."""
    return "ORACLE" in {m.strip() for m in (sql_mode or "").upper().split(",")}


# sql_mode values that include ANSI_QUOTES (MariaDB's combination modes included).
ANSI_QUOTES_MODES = frozenset({"ANSI_QUOTES", "ANSI", "ORACLE", "MSSQL", "DB2", "POSTGRESQL",
                               "MAXDB"})


def classify_query(sql, exclude_variable_sets=False, no_backslash_escapes=False,
                   ansi_quotes=False, server_version=None, track_use=False, oracle=False):
    """Classify the text of a COM_QUERY as the server will lex it.

    *no_backslash_escapes* / *ansi_quotes*: the session's sql_mode; *server_version*: the
    server's MYSQL_VERSION_ID (lexer.version_id), which decides versioned executable comments;
    *track_use*: also report USE statements (when the server does not report schema changes);
    *oracle*: the session's sql_mode selects MariaDB's Oracle grammar (see other_grammar).

    Returns a :class:`PinReason` (the first found), a :class:`TrackedSet` (only tracked
    variables changed, or USE; values merged over all statements of a multi-statement query),
    or None.  Text the server could read in more than one way pins (UNCLASSIFIABLE).
    """
    if isinstance(sql, str):
        sql = sql.encode("utf-8")
    if len(sql) > MAX_STATEMENT_BYTES:
        return PinReason.STATEMENT_TOO_LARGE
    if type(sql) is not bytes:
        sql = bytes(sql)
    # The verdict is a function of the text and of these arguments alone: applications and
    # drivers send the same few statements over and over (SET NAMES, SET autocommit on every
    # connect), and lexing them each time was a tenth of the proxy's CPU per connect.
    key = (sql, exclude_variable_sets, no_backslash_escapes, ansi_quotes, server_version,
           track_use, oracle)
    try:
        return _seen[key]
    except KeyError:
        pass
    verdict = _classify(sql, exclude_variable_sets, no_backslash_escapes, ansi_quotes,
                        server_version, track_use, oracle)
    if len(sql) <= SEEN_TEXT_MAX:  # bounded memory: SEEN_MAX texts of at most 2 KB
        if len(_seen) >= SEEN_MAX:
            _seen.clear()
        _seen[key] = verdict
    return verdict


SEEN_MAX = 4096
SEEN_TEXT_MAX = 2048
_seen = {}  # classify_query's arguments -> its verdict (PinReason, read-only TrackedSet, None)


def _classify(sql, exclude_variable_sets, no_backslash_escapes, ansi_quotes, server_version,
              track_use, oracle):
    if _LITERALS.search(sql.lower()) is None or not _PRECHECK.search(sql):
        if not track_use or _PRECHECK_USE.search(sql) is None:
            return None
    text = bytes(sql).decode("latin-1")  # 1:1 with the bytes; values re-decoded later
    lexer = Lexer(text, ansi_quotes, no_backslash_escapes, server_version)
    tracked = {}
    database = None
    count = 0
    try:
        while True:
            stmt = lexer.statement()
            if stmt is None:
                break
            if not stmt:
                continue
            count += 1
            if oracle:
                return PinReason.UNCLASSIFIABLE
            if _word(stmt, 0) == "USE":
                database = _use_target(stmt)
                continue
            if _word(stmt, 0) == "DROP" and _word(stmt, 1) in ("DATABASE", "SCHEMA"):
                database = UNKNOWN_DATABASE  # the current one may be the one dropped
                continue
            result = _statement(stmt, exclude_variable_sets)
            if result is _ROUTINE:
                continue
            if isinstance(result, PinReason):
                return result
            if result:
                tracked.update(result)
                if "sql_mode" in result:  # the next statement is lexed in the new mode
                    lexer.ansi_quotes, lexer.no_backslash_escapes = \
                        sql_mode_flags(result["sql_mode"])
                    oracle = other_grammar(result["sql_mode"])
    except Ambiguous:
        return PinReason.UNCLASSIFIABLE
    if database is UNKNOWN_DATABASE and track_use:
        return PinReason.UNKNOWN_DATABASE
    if tracked or (database is not None and track_use):
        return TrackedSet(tracked, database if track_use else None, count > 1)
    return None


UNKNOWN_DATABASE = object()


def _use_target(toks):
    """The database a USE statement's tokens name, or UNKNOWN_DATABASE."""
    if len(toks) == 2 and toks[1][0] in ("w", "q"):
        kind, value, raw = toks[1]
        name = raw if kind == "w" else value
        return name.encode("latin-1", "replace").decode("utf-8", "replace")
    return UNKNOWN_DATABASE


def _word(toks, i):
    if i < len(toks) and toks[i][0] == "w":
        return toks[i][1]
    return None


def _statement(toks, exclude):
    first = _word(toks, 0)
    if first == "SET":
        set_result = _set_statement(toks[1:], exclude)
        if isinstance(set_result, PinReason) or set_result is _ROUTINE:
            return set_result
        generic = _scan(toks, exclude)  # SET's own items handled user variables above
        return generic if generic is not None else set_result
    if first == "PREPARE" or (first == "EXECUTE" and _word(toks, 1) == "IMMEDIATE"):
        return PinReason.PREPARED_STATEMENT
    if first in ("DEALLOCATE", "DROP") and _word(toks, 1) == "PREPARE":
        return PinReason.PREPARED_STATEMENT  # only a session's own statements: it holds them
    if first == "LOCK":
        return PinReason.LOCK_TABLES
    if first == "FLUSH":
        words = [t[1] for t in toks if t[0] == "w"]
        for i in range(len(words) - 1):
            if words[i:i + 3] == ["WITH", "READ", "LOCK"] or words[i:i + 2] == ["FOR", "EXPORT"]:
                return PinReason.FLUSH_WITH_READ_LOCK
        return None
    if first == "HANDLER":
        return PinReason.HANDLER
    if first == "XA":
        return PinReason.XA
    if first == "BINLOG":
        return PinReason.SET_VARIABLE  # replayed events set session variables
    if (first in _COMPOUND or (first == "BEGIN" and _word(toks, 1) == "NOT")
            or (len(toks) > 1 and toks[0][0] in ("w", "q") and toks[1][2] == ":")):
        return PinReason.COMPOUND_STATEMENT
    if first == "CREATE":
        for t in toks[1:12]:
            if t[0] != "w":
                continue
            if t[1] == "TEMPORARY":
                return PinReason.TEMPORARY_TABLE
            if t[1] in _ROUTINES:
                return _ROUTINE
            if t[1] in ("TABLE", "VIEW", "INDEX", "DATABASE", "SCHEMA", "USER"):
                break
    reading = first in _READING_STATEMENTS or (toks[0][2] == "(")
    return _scan(toks, exclude, reading)


def _scan(toks, exclude, reading=True):
    """Pins that can appear anywhere: functions (by any spelling: backticks, schema-qualified),
    :=, INTO @var, and user variables where they may be written (*reading* False)."""
    n = len(toks)
    for i, (kind, value, _raw) in enumerate(toks):
        if kind in ("w", "q"):
            name = value if kind == "w" else value.upper()
            if name in _FUNCTIONS:
                if i + 1 < n and toks[i + 1][2] == "(":
                    return _FUNCTIONS[name]
            elif name == "SQL_CALC_FOUND_ROWS" and kind == "w":
                return PinReason.FOUND_ROWS
            elif name == "INTO" and kind == "w" and not exclude and i + 1 < n \
                    and toks[i + 1][0] == "uv":
                return PinReason.USER_VARIABLE
        elif kind == "op" and not exclude:
            return PinReason.USER_VARIABLE  # := assigns user variables only
        elif kind == "uv" and not exclude and not reading:
            return PinReason.USER_VARIABLE
    return None


def _split_items(toks):
    items, cur, depth = [], [], 0
    for t in toks:
        if t[0] == "p":
            if t[2] == "(":
                depth += 1
            elif t[2] == ")":
                depth -= 1
            elif t[2] == "," and depth == 0:
                items.append(cur)
                cur = []
                continue
        cur.append(t)
    items.append(cur)
    return items


def _literal(toks):
    """The value of a single-literal expression, or None."""
    if len(toks) == 2 and toks[0][2] in ("-", "+") and toks[1][0] == "w" and toks[1][2].isdigit():
        return toks[0][2] + toks[1][2]
    if len(toks) != 1:
        return None
    kind, value, raw = toks[0]
    if kind in ("s", "q"):
        text = value
    elif kind == "w" and value not in ("DEFAULT", "NULL"):
        text = raw  # a bare word (SET sql_mode = ANSI) or a number
    else:
        return None  # DEFAULT: the global value, which the proxy does not know
    return text.encode("latin-1", "replace").decode("utf-8", "replace")


def _set_statement(toks, exclude):
    """Classify what follows SET: PinReason, dict of tracked values, or None."""
    w0, w1 = _word(toks, 0), _word(toks, 1)
    if w0 == "TRANSACTION":
        return None if exclude else PinReason.SET_VARIABLE
    if w0 in _SCOPES and w1 == "TRANSACTION":
        return None if (exclude or _SCOPES[w0] == "global") else PinReason.SET_VARIABLE
    if w0 == "PASSWORD" or (w0 == "DEFAULT" and w1 == "ROLE"):
        return None
    if w0 == "ROLE":
        return None if exclude else PinReason.SET_VARIABLE
    if w0 == "STATEMENT":  # MariaDB: SET STATEMENT v=x[, ...] FOR <statement>
        depth = 0
        for i, t in enumerate(toks):
            depth += t[2] == "("
            depth -= t[2] == ")"
            if depth == 0 and t[0] == "w" and t[1] == "FOR":
                return _statement(toks[i + 1:], exclude)
        return None
    tracked = {}
    reason = None
    scope = "session"
    for item in _split_items(toks):
        j = 0
        while _word(item, j) in _SCOPES:
            scope = _SCOPES[_word(item, j)]
            j += 1
        if j >= len(item):
            reason = reason or PinReason.SET_VARIABLE
            continue
        kind, value, raw = item[j]
        head = _word(item, j)
        if kind == "uv":
            reason = PinReason.USER_VARIABLE
            continue
        if head == "NAMES":
            rest = item[j + 1:]
            collate = None
            for k, t in enumerate(rest):
                if t[0] == "w" and t[1] == "COLLATE":
                    collate, rest = _literal(rest[k + 1:]), rest[:k]
                    break
            charset = _literal(rest)
            if charset is None:
                reason = reason or PinReason.SET_VARIABLE
                continue
            for name in ("character_set_client", "character_set_connection",
                         "character_set_results"):
                tracked[name] = charset
            if collate is not None:
                tracked["collation_connection"] = collate
            continue
        if head == "CHARSET" or (head == "CHARACTER" and _word(item, j + 1) == "SET"):
            charset = _literal(item[j + (1 if head == "CHARSET" else 2):])
            if charset is None:
                reason = reason or PinReason.SET_VARIABLE
                continue
            tracked["character_set_client"] = charset
            tracked["character_set_results"] = charset
            continue
        var_scope = scope
        if kind == "sv":
            name = value
            if "." in name:
                prefix, name = name.split(".", 1)
                var_scope = _SCOPES.get(prefix.upper(), "session")
            else:
                var_scope = "session"
        elif kind in ("w", "q"):
            name = (raw if kind == "w" else value).lower()
        else:
            reason = reason or PinReason.SET_VARIABLE
            continue
        if j + 1 >= len(item) or item[j + 1][2] not in ("=", ":="):
            reason = reason or PinReason.SET_VARIABLE
            continue
        if var_scope == "global":
            continue
        literal = _literal(item[j + 2:])
        if name == "sql_mode" and literal is not None and literal.lstrip("+-").isdigit():
            literal = None  # a numeric bit mask: which modes it holds is the server's business
        if name in TRACKED_VARIABLES and literal is not None:
            tracked[name] = literal
        else:
            reason = reason or PinReason.SET_VARIABLE
    if reason is not None and not exclude:
        return reason
    return tracked or None
