"""Prepared statements shared between sessions (SessionPinningFilters EXCLUDE_PREPARED_STATEMENTS).

Sans-I/O.  A multiplexed session's COM_STMT_PREPARE is answered with an id of the proxy's
(per session); each database connection keeps the statements prepared on it (`ConnStatements`,
bounded), keyed by the text and what its parsing depends on (`prepare_key`).  A command naming a
statement (COM_STMT_EXECUTE, RESET, FETCH, SEND_LONG_DATA) is sent with the id the statement has on
the connection that serves it, prepared there first when it is not.

COM_STMT_EXECUTE carries the parameter types only when its new-params-bound flag is 1 (drivers
send them with the first execute after binding, then 0): the server uses the types it was given
last for that statement.  So each side remembers the types last bound: the session's statement
(`Statement.types`, from its client) and the connection's (`ConnStatement.types`); when they
differ, the execute is rewritten with the flag set and the session's types (`with_types`).

Packets here are whole physical packets, header included (the relay's unit).
"""

import struct

from txrdsproxy.wire.mysql import packets as P

MAX_PER_CONNECTION = 64  # statements kept on one database connection (max_prepared_stmt_count)
# What the parsing of a statement depends on besides its text and the current database.
PARSE_VARIABLES = ("sql_mode", "character_set_client", "character_set_connection",
                   "collation_connection")


def prepare_key(sql, database, current):
    """The cache key of statement text *sql* prepared on a connection whose database is
    *database* and whose tracked values are *current*."""
    return (bytes(sql), database) + tuple(current.get(name) for name in PARSE_VARIABLES)


class Statement:
    """A statement a multiplexed session prepared, under the id the proxy gave its client."""

    __slots__ = ("sql", "key", "params", "columns", "pin", "types")

    def __init__(self, sql, key, params, columns, pin):
        self.sql = sql          # bytes, or None: too long to keep (the session is pinned)
        self.key = key          # prepare_key at prepare time
        self.params = params
        self.columns = columns
        self.pin = pin          # a PinReason executing it implies, or None
        self.types = None       # the 2*params type bytes the client bound last, or None


class ConnStatement:
    """A statement prepared on one database connection."""

    __slots__ = ("server_id", "params", "types", "keep")

    def __init__(self, server_id, params):
        self.server_id = server_id
        self.params = params
        self.types = None   # the types the server holds for it (bound last), None: none yet
        self.keep = False   # a cursor or long data of a pinned session: never evicted


class ConnStatements:
    """The statements prepared on one database connection: prepare_key -> ConnStatement, at
    most *limit*; the oldest evictable one goes first (`add` returns the server ids to close)."""

    __slots__ = ("entries", "limit")

    def __init__(self, limit=MAX_PER_CONNECTION):
        self.entries = {}
        self.limit = limit

    def get(self, key):
        return self.entries.get(key)

    def add(self, key, server_id, params):
        """Record a statement prepared here; -> (entry, [server ids to COM_STMT_CLOSE])."""
        closed = []
        old = self.entries.pop(key, None)
        if old is not None:
            closed.append(old.server_id)
        while len(self.entries) >= self.limit:
            victim = next((k for k, e in self.entries.items() if not e.keep), None)
            if victim is None:
                break
            closed.append(self.entries.pop(victim).server_id)
        entry = self.entries[key] = ConnStatement(server_id, params)
        return entry, closed

    def clear(self):
        self.entries.clear()

    def __len__(self):
        return len(self.entries)


def statement_id(packet):
    """The statement id of a COM_STMT_* packet (int<4> after the command byte)."""
    return packet[5] | (packet[6] << 8) | (packet[7] << 16) | (packet[8] << 24)


def with_statement_id(packet, stmt_id):
    """*packet* (at least 9 bytes) naming statement *stmt_id* instead."""
    return bytes(packet[:5]) + struct.pack("<I", stmt_id) + bytes(packet[9:])


def close_packet(server_id):
    return P.encode_packet(bytes((P.COM_STMT_CLOSE,)) + struct.pack("<I", server_id), 0)


def prepare_packet(sql):
    return P.encode_packet(bytes((P.COM_STMT_PREPARE,)) + bytes(sql), 0)


def _bound_at(params):
    """Offset in the packet of the new-params-bound flag of an execute with *params* > 0."""
    return 4 + 1 + 4 + 1 + 4 + (params + 7) // 8


def execute_flags(packet):
    """The flags byte of a COM_STMT_EXECUTE (cursor type), or None if the packet is short."""
    return packet[9] if len(packet) > 9 else None


def bound_types(packet, params):
    """-> (flag, types) of a whole COM_STMT_EXECUTE of a statement with *params* parameters:
    flag 1 with the 2*params type bytes, flag 0 with None; None when the packet is too short to
    say (the server will refuse it)."""
    if params == 0:
        return 0, None
    at = _bound_at(params)
    if len(packet) <= at:
        return None
    flag = packet[at]
    if flag != 1:
        return flag, None
    types = bytes(packet[at + 1:at + 1 + 2 * params])
    if len(types) != 2 * params:
        return None
    return 1, types


def with_types(packet, params, types):
    """A whole COM_STMT_EXECUTE whose new-params-bound flag is 0 sent with flag 1 and *types*
    (inserted after the flag, the packet length grown by len(types)); None when the result
    would not fit one packet."""
    at = _bound_at(params)
    body = bytes(packet[4:at]) + b"\x01" + types + bytes(packet[at + 1:])
    if len(body) >= P.MAX_PACKET_CHUNK:
        return None
    return P.encode_packet(body, packet[3])
