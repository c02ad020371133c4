"""Named prepared statements that follow a session across database connections.

With `SessionPinningFilters: [EXCLUDE_PREPARED_STATEMENTS]` a protocol-level named statement
(Parse with a name, as asyncpg, JDBC after `prepareThreshold`, psycopg after `prepare_threshold`
and `pgbench -M prepared` send) does not pin the session.  Instead the proxy tracks it:

- each client statement name is given a server-side name unique to the session
  (`txrds_<session>_<n>`), so sessions sharing a database connection never collide;
- on whichever connection serves the session, a Bind or Describe of a statement that connection
  has not prepared yet is preceded by an injected Parse, whose ParseComplete the proxy swallows;
- Close of a statement, and SQL `DEALLOCATE name` / `DEALLOCATE ALL`, are rewritten to match.

Finding which ParseComplete to swallow needs no full response tracking: only Parse produces
ParseComplete, responses come in order, and after an ErrorResponse the server skips everything up
to the next Sync.  So the tracker keeps, per batch (up to a Sync, Query or FunctionCall, i.e. per
ReadyForQuery), the Parses in the order they were sent, each marked injected or not.

Pure: bytes in, bytes out.  A connection is represented by any object with `prepared` and
`pending` sets of server-side names.
"""

import collections
import re
import struct

from txrdsproxy.wire.pg.framing import ProtocolViolation, cstring, message

_unpack_len = struct.Struct("!I").unpack_from
_P, _B, _D, _C, _S, _Q, _F = (ord(c) for c in "PBDCSQF")
_REWRITE = frozenset((_P, _B, _D, _C, _Q))
_DISCARD_ALL = re.compile(rb"^\s*discard\s+all\s*;?\s*$", re.IGNORECASE)
_NAME = rb"(\"(?:[^\"]|\"\")+\"|[A-Za-z_][\w$]*)"
_EXECUTE = re.compile(rb"^\s*execute\s+" + _NAME, re.IGNORECASE)
_DEALLOCATE = re.compile(rb"^\s*deallocate\s+(?:prepare\s+)?(all|\"(?:[^\"]|\"\")+\"|[A-Za-z_][\w$]*)\s*;?\s*$",
                         re.IGNORECASE)


class StatementTracker:
    """The named statements of one client session (client name -> server name, Parse body)."""

    def __init__(self, session_id):
        self.prefix = f"txrds_{session_id}_".encode()
        self.statements = {}  # client name -> (server name, Parse body after the name)
        self._counter = 0
        self._partial = b""
        self._skip = 0
        self._batches = collections.deque([[]])  # per coming ReadyForQuery: [(server name, injected)]

    # -- client -> server ---------------------------------------------------------------------
    def rewrite(self, conn, data):
        """The bytes to send to *conn* for client bytes *data* (whole messages where it matters).

        Incomplete messages that may need rewriting are kept until the rest arrives; other
        messages pass through as they come, even in pieces.
        """
        if self._partial:
            data = self._partial + data
            self._partial = b""
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            return data
        self._skip = 0
        out = []
        start = 0
        while n - pos >= 5:
            kind = data[pos]
            (length,) = _unpack_len(data, pos + 1)
            stop = pos + 1 + length
            if kind in _REWRITE:
                if stop > n:
                    break
                new = self._message(conn, kind, data[pos + 5:stop])
                if new is not None:
                    out.append(data[start:pos])
                    out.append(new)
                    start = stop
            else:
                if kind == _S or kind == _F:  # each gets one ReadyForQuery: a batch ends
                    self._batches.append([])
                if stop > n:
                    self._skip = stop - n
                    pos = n
                    break
            pos = stop
        if pos < n:
            self._partial = data[pos:]
        out.append(data[start:pos])
        return b"".join(out)

    def _message(self, conn, kind, body):
        """Rewritten bytes for one message, or None to send it unchanged."""
        if kind == _Q:
            out = self._query(conn, body)  # may inject a Parse: it belongs before this Query
            self._batches.append([])
            return out
        if kind == _P:
            name, pos = cstring(body)
            if not name:
                return self._parse(conn, None, body[pos:], injected=False)
            server = self.prefix + str(self._counter).encode()
            self._counter += 1
            rest = body[pos:]
            self.statements[name] = (server, rest)
            return self._parse(conn, server, rest, injected=False) or message(b"P", server + b"\0" + rest)
        if kind == _B:
            portal, pos = cstring(body)
            name, pos2 = cstring(body, pos)
            found = self.statements.get(name) if name else None
            if found is None:
                return None
            return self._ensure(conn, found) + message(b"B", portal + b"\0" + found[0] + b"\0" + body[pos2:])
        # Describe or Close: a kind byte then a name.
        if not body or body[0:1] != b"S":
            return None
        name, _ = cstring(body, 1)
        found = self.statements.get(name) if name else None
        if found is None:
            return None
        if kind == _D:
            return self._ensure(conn, found) + message(b"D", b"S" + found[0] + b"\0")
        del self.statements[name]
        conn.prepared.discard(found[0])
        return message(b"C", b"S" + found[0] + b"\0")

    def _ensure(self, conn, found):
        """An injected Parse when *conn* lacks the statement, else b''."""
        server, rest = found
        if server in conn.prepared or server in conn.pending:
            return b""
        return self._parse(conn, server, rest, injected=True)

    def _parse(self, conn, server, rest, injected):
        """A Parse of *rest* (query, NUL, parameter types) under *server* (None: unnamed), noted
        in the batch.  Its SQL may itself `EXECUTE` a tracked statement: that one is ensured
        first and renamed.  -> bytes, or None when an unnamed Parse can go unchanged."""
        sql, end = cstring(rest)
        rewritten = self._execute(conn, sql)
        if server is not None:
            conn.pending.add(server)
        self._batches[-1].append((server, injected))
        if rewritten is None:
            return message(b"P", server + b"\0" + rest) if server is not None else None
        ensure, sql = rewritten
        return ensure + message(b"P", (server or b"") + b"\0" + sql + b"\0" + rest[end:])

    def _query(self, conn, body):
        """SQL that names a tracked statement is rewritten: EXECUTE name (after making sure the
        connection has it), DEALLOCATE name; DEALLOCATE ALL and DISCARD ALL forget everything."""
        sql = body[:-1] if body.endswith(b"\0") else body
        if _DISCARD_ALL.match(sql):  # drops every statement of the connection (it pins, too)
            self.statements.clear()
            conn.prepared.clear()
            return None
        rewritten = self._execute(conn, sql)
        if rewritten is not None:
            ensure, sql = rewritten
            return ensure + message(b"Q", sql + b"\0")
        if b"eallocate" not in sql and b"EALLOCATE" not in sql:
            return None
        m = _DEALLOCATE.match(sql)
        if m is None:
            return None
        target = m.group(1)
        if target.lower() == b"all":
            self.statements.clear()
            conn.prepared.clear()
            return None
        found = self.statements.pop(_sql_name(target), None)
        if found is None:
            return None
        conn.prepared.discard(found[0])
        return message(b"Q", b"DEALLOCATE " + found[0] + b"\0")

    def _execute(self, conn, sql):
        """`EXECUTE name ...` of a tracked statement -> (injected Parse or b'', rewritten SQL)."""
        if b"xecute" not in sql and b"XECUTE" not in sql:
            return None
        m = _EXECUTE.match(sql)
        found = self.statements.get(_sql_name(m.group(1))) if m else None
        if found is None:
            return None
        return self._ensure(conn, found), sql[:m.start(1)] + found[0] + sql[m.end(1):]

    # -- server -> client -----------------------------------------------------------------------
    def parse_completed(self, conn):
        """A ParseComplete arrived: -> True when it answers an injected Parse (swallow it)."""
        batch = self._batches[0]
        if not batch:
            raise ProtocolViolation("ParseComplete with no Parse outstanding")
        server, injected = batch.pop(0)
        if server is not None:
            conn.pending.discard(server)
            conn.prepared.add(server)
        return injected

    def error(self, conn):
        """An ErrorResponse: the rest of this batch's Parses will not be answered."""
        batch = self._batches[0]
        for server, _ in batch:
            if server is not None:
                conn.pending.discard(server)
        batch.clear()

    def ready(self):
        """A ReadyForQuery ends the oldest batch."""
        if len(self._batches) > 1:
            self._batches.popleft()
        else:
            self._batches[0].clear()


def _sql_name(token):
    """A statement name as SQL spells it -> the name: quoted keeps its case, bare folds."""
    if token.startswith(b'"'):
        return token[1:-1].replace(b'""', b'"')
    return token.lower()
