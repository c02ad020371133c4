"""Moving a pinned MySQL/MariaDB session to a new writer (switchover), sans-IO.

The MySQL side of wire/pg/replay.py, narrower: only sessions pinned by variables move
(SET_VARIABLE: SET of session system variables; USER_VARIABLE: user variables), on MariaDB
(whose information_schema.SYSTEM_VARIABLES and USER_VARIABLES tell a session's values and
types).  Prepared statements (SQL or COM_STMT_PREPARE), temporary tables, GET_LOCK, LOCK TABLES,
XA, HANDLER, LAST_INSERT_ID()/FOUND_ROWS()/ROW_COUNT() (their answer would change silently),
SET TRANSACTION (pending for the next transaction), SET ROLE, session-only variables
(timestamp, insert_id...) and anything unclassifiable keep the session where it is: it is ended
as before.

- `ReplayLog.record` gets each pinning statement of the pinned session (the pinning path only):
  it refuses for good on any reason but variables, and keeps the names of the session system
  variables the session SET (so that one set to the server's global value moves too),
  within MaxSessionReplaySize bytes.
- `capture_queries` / `Plan`: read on the old connection, at the transaction boundary, the
  session variables that differ from the server's or that the session set, and its user
  variables with their types, character sets and collations (user variables of type REAL are
  refused: their text is not exact).
- `Plan.replay_sql`: one SET on the new connection; `Plan.check` compares what the new
  connection then reports with what was read.
"""

import re

from txrdsproxy.wire.mysql import pinning
from txrdsproxy.wire.mysql.lexer import Ambiguous, Lexer

__all__ = ["MOVABLE_REASONS", "NotMovable", "ReplayLog", "Plan", "TRACKED", "SESSION_ONLY"]

MOVABLE_REASONS = frozenset({pinning.PinReason.SET_VARIABLE, pinning.PinReason.USER_VARIABLE})
# Kept by the proxy itself and synced before every command (proxy/mysql_state.py).
TRACKED = frozenset(n.upper() for n in pinning.TRACKED_VARIABLES)
# MariaDB's SESSION ONLY variables: per connection by nature (or replication internals); a
# session that sets one does not move.
SESSION_ONLY = frozenset((
    "timestamp", "insert_id", "last_insert_id", "identity", "rand_seed1", "rand_seed2",
    "pseudo_thread_id", "pseudo_slave_mode", "gtid_seq_no", "wsrep_gtid_seq_no",
    "skip_replication", "skip_parallel_replication", "default_master_connection",
    "gtid_domain_id", "server_id", "sql_log_bin"))
_NAME = re.compile(r"[a-z0-9_]+\Z")
_INT = re.compile(r"-?[0-9]+\Z")
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?\Z")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?(e[-+]?[0-9]+)?\Z", re.IGNORECASE)
_NUMERIC_TYPES = frozenset(("BIGINT", "BIGINT UNSIGNED", "INT", "INT UNSIGNED", "DOUBLE"))


class NotMovable(Exception):
    """The session holds state that cannot be made again on another connection."""


class ReplayLog:
    """Whether a pinned MySQL session can move, and the system variables it SET."""

    __slots__ = ("limit", "names", "size", "why_not")

    def __init__(self, limit):
        self.limit = limit
        self.names = set()  # lower-case names of session system variables the session SET
        self.size = 0
        self.why_not = None

    @property
    def movable(self):
        return self.why_not is None

    def refuse(self, why):
        if self.why_not is None:
            self.why_not = why
            self.names = set()
            self.size = 0
        return False

    def record(self, sql, lexing):
        """A COM_QUERY text of the pinned session that pins (its first one included); *lexing*:
        the session's classify_query lexing arguments.  -> whether it is still movable."""
        if self.why_not is not None:
            return False
        if len(sql) > pinning.MAX_STATEMENT_BYTES:
            return self.refuse("a statement the proxy did not see whole")
        reason = pinning.classify_query(sql, True, **lexing)  # what pins besides variables
        if isinstance(reason, pinning.PinReason):
            return self.refuse(f"pinned by {reason.value}")
        try:
            return self._sets(sql, lexing)
        except Ambiguous:
            return self.refuse("a statement the proxy could not read")

    def _sets(self, sql, lexing):
        if lexing.get("oracle"):
            return self.refuse("the Oracle grammar")
        lexer = Lexer(bytes(sql).decode("latin-1"), lexing.get("ansi_quotes", False),
                      lexing.get("no_backslash_escapes", False), lexing.get("server_version"))
        while True:
            toks = lexer.statement()
            if toks is None:
                return True
            if pinning._word(toks, 0) != "SET":
                continue
            w1, w2 = pinning._word(toks, 1), pinning._word(toks, 2)
            if w1 == "STATEMENT":
                continue  # SET STATEMENT ... FOR: for that one statement (classified above)
            if w1 in ("TRANSACTION", "ROLE") or (w1 in pinning._SCOPES and w2 == "TRANSACTION"):
                return self.refuse(f"SET {w1 if w1 != 'SESSION' and w1 != 'LOCAL' else 'TRANSACTION'}")
            scope = "session"
            for item in pinning._split_items(toks[1:]):
                j = 0
                while pinning._word(item, j) in pinning._SCOPES:
                    scope = pinning._SCOPES[pinning._word(item, j)]
                    j += 1
                if j >= len(item):
                    return self.refuse("a SET the proxy could not read")
                kind, value, raw = item[j]
                if kind == "uv":
                    continue  # read from the server
                head = pinning._word(item, j)
                if head in ("NAMES", "CHARSET", "CHARACTER", "PASSWORD", "DEFAULT"):
                    continue  # tracked by the proxy / not session state
                var_scope = scope
                if kind == "sv":
                    name = value
                    if "." in name:
                        prefix, name = name.split(".", 1)
                        var_scope = pinning._SCOPES.get(prefix.upper(), "session")
                    else:
                        var_scope = "session"
                elif kind in ("w", "q"):
                    name = raw if kind == "w" else value
                else:
                    return self.refuse("a SET the proxy could not read")
                name = name.lower()
                if var_scope == "global":
                    continue
                if name in SESSION_ONLY:
                    return self.refuse(f"SET {name}")
                if not _NAME.match(name):
                    return self.refuse("a SET of a variable the proxy could not read")
                if name not in self.names:
                    self.names.add(name)
                    self.size += len(name) + 3
                    if self.size > self.limit:
                        return self.refuse(f"its replay log passed MaxSessionReplaySize ({self.limit} bytes)")

    # -- the capture, on the old connection ----------------------------------------------------
    def system_query(self):
        """The session system variables to move: those that differ from the server's, and
        those the session SET (one set to the global value is moved too)."""
        return system_query(self.names)

    def plan(self, system_rows, user_rows, value_rows):
        """-> the Plan from the answers to system_query(), USER_QUERY and value_query(...);
        raises NotMovable."""
        if self.why_not is not None:
            raise NotMovable(self.why_not)
        return Plan(_system(system_rows), _users(user_rows, value_rows))


# An explicit LIMIT: a session's sql_select_limit would otherwise cut the capture's lists (and
# the check's, the same way: the variables past it would not move, silently).
_ALL_ROWS = " LIMIT 18446744073709551615"


def system_query(names):
    listed = "".join(f", '{n.upper()}'" for n in sorted(names))  # names: [a-z0-9_] only
    return ("SELECT VARIABLE_NAME, HEX(SESSION_VALUE), VARIABLE_TYPE FROM information_schema.SYSTEM_VARIABLES"
            " WHERE VARIABLE_SCOPE = 'SESSION' AND READ_ONLY = 'NO' AND (NOT (SESSION_VALUE <=> GLOBAL_VALUE)"
            f" OR VARIABLE_NAME IN (''{listed})) ORDER BY VARIABLE_NAME{_ALL_ROWS}").encode()


# Names as hex: read in the session's character_set_results a name could come back as another
# (latin1 '?' for what it cannot show) or as bytes that are not UTF-8.
USER_QUERY = (b"SELECT HEX(VARIABLE_NAME), VARIABLE_TYPE, CHARACTER_SET_NAME FROM information_schema.USER_VARIABLES"
              b" ORDER BY VARIABLE_NAME" + _ALL_ROWS.encode())
# A name the capture and the check can send in whatever character_set_client the session has:
# printable ASCII reads the same in all of them, while UTF-8 sent on a gbk/sjis/big5 connection
# can swallow the closing backtick (a name chosen so becomes SQL of the proxy's making) and on a
# latin1 one names another variable.  Other names do not move (the session is ended as before).
_ASCII_NAME = re.compile(r"[\x20-\x7e]+\Z")


def _user_name(hexed):
    try:
        name = bytes.fromhex(hexed or "").decode("ascii")
    except ValueError:
        name = ""
    if not _ASCII_NAME.match(name):
        raise NotMovable("a user variable whose name is not printable ASCII")
    return name


def _quote_user(name):
    return "@`" + name.replace("`", "``") + "`"


def value_query(user_rows):
    """One row: for each user variable, its bytes (hex), collation, text and NULL-ness.
    Raises NotMovable for a name `_user_name` refuses."""
    if not user_rows:
        return None
    cols = []
    for hexed, _, _ in user_rows:
        name = _user_name(hexed)
        v = _quote_user(name)
        cols.append(f"HEX({v}), COLLATION({v}), CAST({v} AS CHAR), {v} IS NULL")
    return ("SELECT " + ", ".join(cols)).encode("utf-8")


def _system(rows):
    out = []
    for name, hexed, vtype in rows:
        if name is None:
            continue
        lname = name.lower()
        if lname in SESSION_ONLY or not _NAME.match(lname):
            raise NotMovable(f"the session changed {lname}")
        out.append((lname, hexed, vtype))
    return out


def _users(user_rows, value_rows):
    if not user_rows:
        return []
    if not value_rows or len(value_rows[0]) != 4 * len(user_rows):
        raise NotMovable("the user variables could not be read")
    row = value_rows[0]
    out = []
    for i, (hexed_name, vtype, charset) in enumerate(user_rows):
        name = _user_name(hexed_name)
        hexed, collation, text, is_null = row[4 * i:4 * i + 4]
        out.append((name, vtype, charset, hexed if is_null != "1" else None, collation, text))
        if is_null == "1":
            continue
        if vtype in ("INT", "INT UNSIGNED"):
            if text is None or not _INT.match(text):
                raise NotMovable(f"user variable {name} could not be read")
        elif vtype == "DECIMAL":
            if text is None or not _DECIMAL.match(text):
                raise NotMovable(f"user variable {name} could not be read")
        elif vtype == "VARCHAR":
            if (collation is None or not _NAME.match(collation) or hexed is None
                    or charset is None or not _NAME.match(charset)):
                raise NotMovable(f"user variable {name} could not be read")
        else:  # REAL (DOUBLE): its text is not exact
            raise NotMovable(f"user variable {name} of type {vtype}")
    return out


class Plan:
    """What is made again on the new connection (`replay_sql`), and the check that it was."""

    __slots__ = ("system", "users", "names")

    def __init__(self, system, users):
        # [(lower name, hex of the session value or None, VARIABLE_TYPE)]; the tracked ones
        # (character sets, time_zone, sql_mode, autocommit...) only for the check
        self.system = system
        self.users = users  # [(name, type, charset, hex or None, collation, text)]
        self.names = {n for n, _, _ in system}

    @property
    def replay_sql(self):
        parts = []
        for name, hexed, vtype in self.system:
            if name.upper() in TRACKED:
                continue  # the proxy's sync sets them (and `check` compares them afterwards)
            if hexed is None:
                value = "NULL"
            else:
                text = bytes.fromhex(hexed).decode("utf-8", "replace")
                if vtype in _NUMERIC_TYPES and _NUMBER.match(text):
                    value = text
                else:
                    value = f"CONVERT(X'{hexed}' USING utf8mb4)"
            parts.append(f"SESSION `{name}` = {value}")
        for name, vtype, charset, hexed, collation, text in self.users:
            if hexed is None:
                value = "NULL"
            elif vtype == "VARCHAR":
                value = f"X'{hexed}'" if collation == "binary" else \
                    f"CONVERT(X'{hexed}' USING {charset}) COLLATE {collation}"
            else:
                value = text
            parts.append(f"{_quote_user(name)} = {value}")
        return ("SET " + ", ".join(parts)).encode("utf-8") if parts else None

    def check(self, system_rows, user_rows, value_rows):
        """Raise NotMovable unless the new connection now reports the same variables."""
        try:
            again = Plan(_system(system_rows), _users(user_rows, value_rows))
        except NotMovable as e:
            raise NotMovable(f"after the replay, {e}") from None
        if again.system != self.system:
            raise NotMovable("the session variables differ after the replay")
        if again.users != self.users:
            raise NotMovable("the user variables differ after the replay")
