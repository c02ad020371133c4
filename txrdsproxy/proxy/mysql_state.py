"""Tracked session state of MySQL sessions: what RDS Proxy tracks instead of pinning.

Design choice: database connections are pooled per (user, capability profile), not per database
or variable values.  A session keeps the values it set (`desired`: tracked variable -> value) and
its current database; before a command is forwarded on a borrowed connection, the connection is
brought to those values with COM_INIT_DB and one ``SET a=..., b=...`` (only what differs; values a
session never set go back to the connection's baseline, i.e. the values after login and
InitQuery).  So two sessions with different time_zone/sql_mode/database can share connections
without seeing each other's values, and a session changing one of them never pins.

Values are compared as text, after `normalize`; a harmless mismatch of spellings (``utf8`` vs
``utf8mb3``) only costs one redundant SET.
"""

import functools
from collections import namedtuple

from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.pinning import TRACKED_VARIABLES, PinReason, TrackedSet

# Order matters: setting character_set_connection resets collation_connection.
ORDER = ("character_set_client", "character_set_connection", "character_set_results",
         "collation_connection", "time_zone", "autocommit", "sql_mode", "session_track_schema")
assert frozenset(ORDER) == TRACKED_VARIABLES

STATE_QUERY = ("SELECT @@max_connections, DATABASE(), "
               + ", ".join("@@session.%s" % name for name in ORDER)).encode()
_BOOLEAN = {"1": "1", "ON": "1", "TRUE": "1", "0": "0", "OFF": "0", "FALSE": "0"}
NULL = "NULL"


def normalize(name, value):
    """The comparable spelling of a tracked value (booleans as 1/0, SQL NULL as 'NULL')."""
    if value is None:
        return NULL
    value = str(value)
    if name in ("autocommit", "session_track_schema"):
        return _BOOLEAN.get(value.upper(), value)
    if name.startswith("character_set") or name == "collation_connection":
        return value.lower()
    return value


def parse_state_row(row):
    """Row of STATE_QUERY -> (max_connections, database, {variable: value})."""
    values = {name: normalize(name, v) for name, v in zip(ORDER, row[2:])}
    return int(row[0]), row[1], values


@functools.lru_cache(maxsize=256)  # asked for every answer the proxy writes itself
def no_backslash_escapes(sql_mode):
    """Whether an sql_mode value (or None) includes NO_BACKSLASH_ESCAPES."""
    if not sql_mode:
        return False
    return "NO_BACKSLASH_ESCAPES" in (m.strip() for m in sql_mode.upper().split(","))


def literal(value):
    if value.upper() == NULL:
        return NULL
    if value.isdigit():
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sync_sql(current, baseline, desired):
    """-> (SET statement bytes or b"", {variable: value} it establishes)."""
    parts = []
    target = {}
    charset_set = False
    for name in ORDER:
        want = desired[name] if name in desired else baseline.get(name)
        if want is None:  # follows another variable (collation of SET NAMES x)
            continue
        if name == "collation_connection" and charset_set:
            parts.append(f"{name}={literal(want)}")  # re-apply after character_set_connection
            target[name] = want
            continue
        if current.get(name) != want:
            parts.append(f"{name}={literal(want)}")
            target[name] = want
            if name == "character_set_connection":
                charset_set = True
    if not parts:
        return b"", {}
    return ("SET " + ", ".join(parts)).encode("utf-8"), target


class Collations:
    """The server's collations: id -> (collation, charset), charset -> default collation."""

    def __init__(self, rows):
        self.by_id = {}
        self.default = {}
        for row in rows:
            ident, collation, charset, is_default = row[:4]
            if ident is None or collation is None:
                continue
            self.by_id[int(ident)] = (collation.lower(), (charset or "").lower())
            if (is_default or "").lower() == "yes" and charset:
                self.default[charset.lower()] = collation.lower()

    def for_id(self, ident):
        """Tracked values a handshake / COM_CHANGE_USER charset id stands for, or {}."""
        found = self.by_id.get(ident)
        if found is None:
            return {}
        collation, charset = found
        return {"character_set_client": charset, "character_set_connection": charset,
                "character_set_results": charset, "collation_connection": collation}

    def default_collation(self, charset):
        charset = charset.lower()
        return self.default.get(charset) or self.default.get({"utf8": "utf8mb3"}.get(charset, ""))


def apply_assignments(desired, assignments, collations):
    """Merge a TrackedSet's assignments into *desired*; -> the normalized values applied."""
    applied = {}
    for name, value in assignments.items():
        applied[name] = normalize(name, value)
    if "character_set_connection" in applied and "collation_connection" not in applied:
        # SET NAMES x without COLLATE: the server picks x's default collation.
        default = collations.default_collation(applied["character_set_connection"]) \
            if collations is not None else None
        applied["collation_connection"] = default
    desired.update(applied)
    return applied


Learned = namedtuple("Learned", "values database pin")
Learned.__doc__ = """What a completed response taught the proxy about its session.

values: tracked variable -> normalized value now in force on the connection (and wanted by the
session); database: the current database now (None: no database), or UNCHANGED; pin: a
PinReason when the session's state can no longer be known (or None)."""
UNCHANGED = object()


def learn(classified, failed, changes, status, collations):
    """-> Learned, from what the classifier said of the command (*classified*: TrackedSet,
    PinReason or None), whether the response ended in ERR (*failed*), the OK packets'
    session-state *changes* and the last server *status*.

    The one place the proxy decides what a response did to tracked state (the frontend and the
    differential test both use it).  A failed multi-statement query that set tracked values
    leaves them unknown (the statements before the error ran): the session pins.
    """
    values = {}
    database = UNCHANGED
    pin = None
    if isinstance(classified, TrackedSet):
        if not failed:
            values.update(apply_assignments({}, classified.assignments, collations))
            if classified.database is not None:
                database = classified.database
        elif classified.multi:
            pin = PinReason.SET_VARIABLE
    for kind, value in changes:
        if kind == P.SESSION_TRACK_SCHEMA:
            database = value or None
        elif kind == P.SESSION_TRACK_SYSTEM_VARIABLES and value[0] in ORDER:
            values[value[0]] = normalize(value[0], value[1])
    values["autocommit"] = "1" if status & P.SERVER_STATUS_AUTOCOMMIT else "0"
    return Learned(values, database, pin)
