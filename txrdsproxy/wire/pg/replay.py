"""Moving a pinned PostgreSQL session to a new writer (switchover), sans-IO.

A pinned session keeps its database connection for its whole life.  When the writer changes
while the old one stays up, the session can go on on the new writer only if the state that
pinned it can be made again there.  Three parts:

- `ReplayLog`: recorded while the session is pinned (the pinning path only: an unpinned session
  records nothing).  Each statement of a pinned session is classified again, statement by
  statement, with every reason it has (not only the first): one that pins for a reason that
  cannot be replayed (temporary objects, hold cursors, advisory locks, LISTEN, LOAD, DISCARD,
  sequence state, procedural code, function calls by OID, anything not seen whole...) makes
  the log refuse for good, and the session is ended at the switchover as before.  What is
  kept: the text of each SQL ``PREPARE`` (sent as a query of its own) and the body of each
  named protocol Parse, by statement name, within a byte budget (MaxSessionReplaySize).  A
  setting changed after a statement was kept refuses too: the replay makes the final settings
  first and prepares after them, so a statement prepared under an earlier search_path or
  DateStyle would be read differently.
  ``SET``/``RESET``/``set_config`` values are not kept: they are read from the server.
- `CAPTURE_SQL`: run at the transaction boundary on the old connection (still up, read-only).
  It asks the server what the session holds: temporary objects, hold cursors, advisory locks
  and LISTEN channels (each one forbids the move: this also catches state the classifier
  cannot see, such as a function creating a temporary table), the settings whose source is
  the session, and the prepared statements.  `ReplayLog.plan` checks it against the log:
  every prepared statement must be one the log kept, with the same text.
- `Replay`: what runs on the new connection before the client's next request: ``RESET ALL``
  and one ``set_config`` per captured setting, the kept ``PREPARE`` texts, the kept Parse
  messages (with their parameter types), then the capture again, which must show the same
  settings and statements (`Replay.check`).

Not moved, by decision: LISTEN (notifications sent on the new writer between the promotion
and the move would be lost without the client knowing; ending the session tells it to
re-read what it watches).
"""

import json

from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import ProtocolViolation, cstring
from txrdsproxy.wire.pg.lexer import IDENT, OP, STRING, WORD
from txrdsproxy.wire.pg.pinning import (MAX_STATEMENT_BYTES, PinReason, classify_query, classify_tokens,
                                        statement_reasons)
from txrdsproxy.wire.pg.statements import mentions_proxy_names

__all__ = ["MOVABLE_REASONS", "CAPTURE_SQL", "NotMovable", "ReplayLog", "Replay", "quote_e"]

# Pin reasons whose state can be made again on another connection (or that leave none at a
# transaction boundary: a named portal dies with its transaction).
MOVABLE_REASONS = frozenset({PinReason.SET_VARIABLE, PinReason.RESET, PinReason.PREPARED_STATEMENT,
                             PinReason.NAMED_PORTAL})
PROXY_PREFIX = "txrds_"  # statements.StatementTracker's server-side names: never the client's
# Settings whose session value is not replayed: privileges (SET ROLE, SET SESSION AUTHORIZATION).
UNMOVABLE_SETTINGS = frozenset({"role", "session_authorization"})

_EQ = "OPERATOR(pg_catalog.=)"
_TEMP = "pg_catalog.pg_my_temp_schema()"
CAPTURE_SQL = (
    "SELECT pg_catalog.json_build_object("
    f"'temp', (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class WHERE relnamespace {_EQ} {_TEMP})"
    f" OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_proc WHERE pronamespace {_EQ} {_TEMP})"
    f" OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_type WHERE typnamespace {_EQ} {_TEMP}),"
    " 'cursors', (SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable),"
    " 'locks', (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks"
    f" WHERE pid {_EQ} pg_catalog.pg_backend_pid() AND locktype {_EQ} 'advisory'),"
    " 'listen', (SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels()),"
    " 'settings', (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(name, setting) ORDER BY name)"
    f" FROM pg_catalog.pg_settings WHERE source {_EQ} 'session'),"
    " 'statements', (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(name, statement, from_sql)"
    " ORDER BY name) FROM pg_catalog.pg_prepared_statements))"
).encode()

_CHECKS = (("temp", "temporary objects"), ("cursors", "WITH HOLD cursors"),
           ("locks", "advisory locks"), ("listen", "LISTEN"))


class NotMovable(Exception):
    """The session holds state that cannot be made again on another connection (the text
    says which)."""


def quote_e(text):
    """*text* as an E'' literal: read the same whatever standard_conforming_strings says."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_set(tokens, reason):
    """A leading SET/RESET command (its value is read from the server, not replayed as text)."""
    return (reason is PinReason.SET_VARIABLE or reason is PinReason.RESET) and tokens[0] in (
        (WORD, b"set"), (WORD, b"reset"))


_DOT = (OP, b".")
_NAME_ENDS = frozenset(((OP, b"="), (WORD, b"to")))


def _sets_custom(tokens):
    """Whether one statement sets or resets a custom (dotted) parameter, or calls set_config
    with a name the proxy cannot read: placeholders of custom parameters are not in pg_settings
    (GUC_NO_SHOW_ALL), so the capture would not see them and the move would drop them."""
    if tokens[0] in ((WORD, b"set"), (WORD, b"reset")):
        for token in tokens[1:]:
            if token in _NAME_ENDS:
                return False
            if token == _DOT:
                return True
        return False
    for i, token in enumerate(tokens):
        if token == (WORD, b"set_config") and i + 2 < len(tokens) and tokens[i + 1] == (OP, b"("):
            name = tokens[i + 2]
            if name[0] != STRING or name[1] is None or b"." in name[1]:
                return True
    return False


def _prepare_parts(tokens):
    """PREPARE name [(types)] AS statement -> (name as the server stores it, the statement's
    tokens) or (None, None) when it is not that shape."""
    if len(tokens) < 4 or tokens[1][0] not in (WORD, IDENT) or tokens[1][1] is None:
        return None, None
    for i in range(2, len(tokens)):
        if tokens[i] == (WORD, b"as"):
            return tokens[1][1], tokens[i + 1:]
    return None, None


class ReplayLog:
    """What a pinned session recorded for a move (see the module docstring).  `why_not` is
    None while the session is movable, else why not (for the log)."""

    __slots__ = ("limit", "size", "kept", "why_not")

    def __init__(self, limit):
        self.limit = limit  # MaxSessionReplaySize: bytes of kept statements
        self.size = 0
        self.kept = {}  # (b"Q", name) -> PREPARE query text; (b"P", name) -> Parse body
        self.why_not = None

    @property
    def movable(self):
        return self.why_not is None

    def refuse(self, why):
        """-> False; the log is empty and refuses for good."""
        if self.why_not is None:
            self.why_not = why
            self.kept = {}
            self.size = 0
        return False

    def first(self, reason, sql, body, scs):
        """The message that pinned the session: *reason*, its SQL text (None when there is
        none: a Bind, a FunctionCall, an encoding), the body of a named Parse (else None).
        -> whether the session is still movable."""
        if reason not in MOVABLE_REASONS:
            return self.refuse(f"pinned by {reason.value}")
        if reason is PinReason.NAMED_PORTAL:
            return True
        if sql is None:
            return self.refuse(f"pinned by {reason.value} in a message the proxy does not replay")
        before = len(self.kept)
        if not self.record(sql, body, scs):
            return False
        if reason is PinReason.PREPARED_STATEMENT and body is None and len(self.kept) == before:
            return self.refuse("a prepared statement the proxy could not follow")
        return True

    def record(self, sql, body, scs):
        """A statement of the pinned session: *sql*, a Query's text or a Parse's SQL (None:
        not seen whole); *body*: the whole body of a named Parse whose statement the session
        keeps (None otherwise: the text runs now).  *scs*: standard_conforming_strings on the
        connection (None: unknown).  -> whether the session is still movable."""
        if self.why_not is not None:
            return False
        if sql is None or len(sql) > MAX_STATEMENT_BYTES:
            return self.refuse("a statement the proxy did not see whole")
        if type(sql) is not bytes:
            sql = bytes(sql)  # (a bytearray or memoryview of the client's bytes)
        if mentions_proxy_names(sql):
            return self.refuse("a statement naming the proxy's own prepared statements")
        if scs is None:
            if b"\\" in sql:
                return self.refuse("a backslash while standard_conforming_strings is unknown")
            scs = True
        if b"." in sql or b"set_config" in sql.lower():  # (a custom name needs one or the other)
            for tokens, _ in statement_reasons(sql, False, scs):
                if tokens and _sets_custom(tokens):
                    return self.refuse("a custom setting (not listed by pg_settings: not captured)")
        if self.kept or body is not None:
            # The replay sets the final settings first, then prepares: a setting changed after a
            # statement was prepared (search_path, DateStyle...) could make it read differently.
            changed = classify_query(sql, False, scs)
            if changed is PinReason.SET_VARIABLE or changed is PinReason.RESET:
                return self.refuse("a setting changed after a statement was prepared" if self.kept
                                   else "a prepared statement that changes a setting")
        # The common case, through the classifier's cache and pre-filter: nothing in the text
        # pins when SETs are left aside (their values are read from the server).
        found = [] if classify_query(sql, True, scs) is None else statement_reasons(sql, True, scs)
        for tokens, reason in found:
            if reason is None or _is_set(tokens, reason):
                continue
            if body is None and reason is PinReason.PREPARED_STATEMENT and tokens[0] == (WORD, b"prepare"):
                if len(found) != 1:
                    return self.refuse("PREPARE sent together with other statements")
                name, inner = _prepare_parts(tokens)
                if name is None or classify_tokens(inner, True) is not None:
                    return self.refuse("a PREPARE whose statement pins")
                if not self._keep((b"Q", name), bytes(sql)):
                    return False
                continue
            return self.refuse(f"pinned by {reason.value}")
        if body is not None:
            body = bytes(body)
            name, _ = cstring(body)
            if name[:6].lower() == PROXY_PREFIX.encode():
                return self.refuse("a statement named like the proxy's own")
            return self._keep((b"P", name), bytes(body))
        return True

    def _keep(self, key, value):
        old = self.kept.pop(key, None)
        if old is not None:
            self.size -= len(old) + len(key[1])
        self.size += len(value) + len(key[1])
        if self.size > self.limit:
            return self.refuse(f"its replay log passed MaxSessionReplaySize ({self.limit} bytes)")
        self.kept[key] = value
        return True

    def plan(self, captured):
        """*captured*: the text CAPTURE_SQL returned on the old connection.  -> the Replay for
        the new connection; raises NotMovable."""
        if self.why_not is not None:
            raise NotMovable(self.why_not)
        state = _read_capture(captured)
        for key, what in _CHECKS:
            if state.get(key):
                raise NotMovable(f"the session holds {what}")
        settings = state.get("settings") or []
        for name, _ in settings:
            if name in UNMOVABLE_SETTINGS:
                raise NotMovable(f"the session changed {name}")
        statements = {}
        for name, text, from_sql in state.get("statements") or []:
            if name.startswith(PROXY_PREFIX):
                continue  # the statement tracker's: it prepares them again where needed
            key = (b"Q" if from_sql else b"P", name.encode())
            kept = self.kept.get(key)
            if kept is None or _kept_text(key[0], kept) != text.encode():
                raise NotMovable(f"prepared statement {name!r} is not one the proxy recorded whole")
            statements[key] = kept
        return Replay(settings, statements)


def _kept_text(kind, kept):
    if kind == b"Q":
        return kept
    try:
        _, at = cstring(kept)
        return cstring(kept, at)[0]
    except ProtocolViolation:
        return None


def _read_capture(captured):
    if captured is None or "\ufffd" in captured:
        raise NotMovable("the session state could not be read exactly")
    try:
        state = json.loads(captured)
    except ValueError:
        raise NotMovable("the session state could not be read") from None
    if not isinstance(state, dict):
        raise NotMovable("the session state could not be read")
    return state


class Replay:
    """What runs on the new connection, in this order: `settings_sql`, each of `prepare_queries`
    (one Query per SQL PREPARE), `parse_messages` (Parse... Sync, or None), then CAPTURE_SQL, whose
    answer `check` compares with what was captured on the old connection."""

    __slots__ = ("settings", "statements", "client_params")

    def __init__(self, settings, statements):
        self.settings = [list(s) for s in settings]
        self.statements = statements
        self.client_params = None  # the old connection's client_params (the engine sets it)

    @property
    def settings_sql(self):
        calls = ", ".join(f"pg_catalog.set_config({quote_e(n)}, {quote_e(v)}, false)" for n, v in self.settings)
        return b"RESET ALL" + (f"; SELECT {calls}".encode() if calls else b"")

    @property
    def prepare_queries(self):
        # One Query each, as the client sent it: pg_prepared_statements.statement is the whole
        # query string a PREPARE came in, so texts joined in one Query would each read as all of
        # them (the check, and the next move's plan, compare it with the text kept).
        return [v for (kind, _), v in sorted(self.statements.items()) if kind == b"Q"]

    @property
    def parse_messages(self):
        parses = [msg.message(b"P", v) for (kind, _), v in sorted(self.statements.items()) if kind == b"P"]
        return b"".join(parses) + msg.message(b"S") if parses else None

    def check(self, captured):
        """Raise NotMovable unless the new connection now holds the same settings and
        statements (and nothing else of the session's)."""
        state = _read_capture(captured)
        for key, what in _CHECKS:
            if state.get(key):
                raise NotMovable(f"the new connection holds {what}")
        if [list(s) for s in state.get("settings") or []] != self.settings:
            raise NotMovable("the settings differ after the replay")
        # names and texts: a kept text sent in another client_encoding than the client's own
        # would be read otherwise by the server, under the same name
        held = {(b"Q" if from_sql else b"P", name.encode()): text.encode()
                for name, text, from_sql in state.get("statements") or [] if not name.startswith(PROXY_PREFIX)}
        if held != {key: _kept_text(key[0], kept) for key, kept in self.statements.items()}:
            raise NotMovable("the prepared statements differ after the replay")
