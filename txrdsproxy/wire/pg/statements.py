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
from txrdsproxy.wire.pg.scanner import MessageScanner, limits_table

_unpack_len = struct.Struct("!I").unpack_from
_P, _B, _D, _C, _S, _Q, _F = (ord(c) for c in "PBDCSQF")
# Body bytes the tracker needs per message kind (names; whole SQL up to the classifier's bound).
NAMES_LIMIT = 65536
QUERY_LIMIT = 16385  # pinning.MAX_STATEMENT_BYTES + NUL: longer statements pin anyway
TRACKED_LIMITS = limits_table({b"Q": QUERY_LIMIT, b"P": NAMES_LIMIT, b"B": NAMES_LIMIT, b"D": NAMES_LIMIT,
                               b"C": NAMES_LIMIT, b"S": 1, b"F": 1}, default=0)
_DISCARD_ALL = re.compile(rb"^\s*discard\s+all\s*;?\s*$", re.IGNORECASE)
_NAME = rb"(\"(?:[^\"]|\"\")+\"|[A-Za-z_][\w$]*)"
_EXECUTE = re.compile(rb"^\s*execute\s+" + _NAME, re.IGNORECASE)
_DEALLOCATE = re.compile(rb"^\s*deallocate\s+(?:prepare\s+)?(all|\"(?:[^\"]|\"\")+\"|[A-Za-z_][\w$]*)\s*;?\s*$",
                         re.IGNORECASE)


PIN = object()  # returned by `message`: the session must pin (the name is not the session's)
# Client statement names in the proxy's own namespace are mangled so they can never name a
# statement the proxy prepared for another session ("txrds-" is never used for server names).
_OWN = b"txrds_"
_MANGLED = b"txrds-"


class StatementTracker:
    """The named statements of one client session (client name -> server name, Parse body)."""

    def __init__(self, session_id):
        self.prefix = f"txrds_{session_id}_".encode()
        self.statements = {}  # client name -> (server name, Parse body after the name or None)
        # Server names whose client Parse the server completed: the client name is then taken,
        # and a Parse reusing it must fail as PostgreSQL fails it (42P05), not replace it.
        self._created = set()
        self._counter = 0
        self._batches = collections.deque([[]])  # per coming ReadyForQuery: [(server name, injected)]
        self._scanner = None

    # -- client -> server ---------------------------------------------------------------------
    def rewrite(self, conn, data):
        """The bytes to send to *conn* for client bytes *data*, scanned with a MessageScanner of
        the tracker's own (for callers that do not scan themselves; the session's ClientStream
        calls `message` from its scanner instead).  Incomplete messages are held until the part
        that may need rewriting is here."""
        sc = self._scanner
        if sc is None:
            sc = self._scanner = MessageScanner(TRACKED_LIMITS, inspect=None, emit=None)
        out = []
        sc.emit = out.append

        def inspect(kind, body):
            out = self.message(conn, kind, body, sc.whole, sc.length)
            return None if out is PIN else out

        sc.inspect = inspect
        sc.feed(data)
        return b"".join(out)

    def message(self, conn, kind, body, whole=True, length=0):
        """One client message seen by the scanner: -> replacement bytes (header and *body*),
        None (unchanged) or PIN.  *body* is the whole body when *whole*, else its first bytes
        and *length* the message's length field (a replacement then carries the new length)."""
        if kind == _Q:
            out = self._query(conn, body) if whole else None  # may inject a Parse before the Query
            self._batches.append([])
            return out
        if kind == _S or kind == _F:  # each gets one ReadyForQuery: a batch ends
            self._batches.append([])
            return None
        if kind == _P:
            name, pos = cstring(body)
            rest = body[pos:]
            if not name:
                if whole:
                    return self._parse(conn, None, rest, injected=False)
                self._batches[-1].append((None, False))
                return None
            found = self.statements.get(name)
            if found is not None and found[0] in self._created:
                return self._duplicate(conn, found, rest, whole, length, len(name))
            server = self.prefix + str(self._counter).encode()
            self._counter += 1
            if not whole:  # too large to keep: the session pins, the statement stays on its connection
                self.statements[name] = (server, None)
                conn.pending.add(server)
                self._batches[-1].append((server, False))
                return _header(b"P", length, len(server) - len(name)) + server + b"\0" + rest
            self.statements[name] = (server, rest)
            return self._parse(conn, server, rest, injected=False) or message(b"P", server + b"\0" + rest)
        if kind == _B:
            portal, pos = cstring(body)
            name, pos2 = cstring(body, pos)
            if not name:
                return None
            found = self.statements.get(name)
            if found is None:
                server = _foreign(name)
                if server is name:
                    return None
                ensure = b""
            else:
                server = found[0]
                ensure = self._ensure(conn, found)
            new = portal + b"\0" + server + b"\0" + body[pos2:]
            if whole:
                return ensure + message(b"B", new)
            return ensure + _header(b"B", length, len(server) - len(name)) + new
        if kind != _D and kind != _C:
            return None
        # Describe or Close: a kind byte then a name.
        if not body or body[0:1] != b"S":
            return None
        name, _ = cstring(body, 1)
        if not name:
            return None
        found = self.statements.get(name)
        if found is None:
            server = _foreign(name)
            return None if server is name else message(bytes((kind,)), b"S" + server + b"\0")
        if kind == _D:
            return self._ensure(conn, found) + message(b"D", b"S" + found[0] + b"\0")
        del self.statements[name]
        self._created.discard(found[0])
        conn.prepared.discard(found[0])
        return message(b"C", b"S" + found[0] + b"\0")

    def _duplicate(self, conn, found, rest, whole, length, name_len):
        """A Parse under a client name whose statement exists: sent under that statement's server
        name, where the connection has it (injected first if not), so the server refuses it with
        42P05 and skips to Sync as it would directly; the statement is left as it was."""
        server = found[0]
        ensure = self._ensure(conn, found)
        self._batches[-1].append((server, False))
        if whole:
            return ensure + message(b"P", server + b"\0" + rest)
        return ensure + _header(b"P", length, len(server) - name_len) + server + b"\0" + rest

    def _ensure(self, conn, found):
        """An injected Parse when *conn* lacks the statement, else b''."""
        server, rest = found
        if server in conn.prepared or server in conn.pending or rest is None:
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
            self._created.clear()
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
            self._created.clear()
            conn.prepared.clear()
            return None
        found = self.statements.pop(_sql_name(target), None)
        if found is None:
            return PIN  # not this session's: it may be another's on this connection
        self._created.discard(found[0])
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
            if not injected:
                self._created.add(server)
        return injected

    def error(self, conn):
        """An ErrorResponse: the rest of this batch's Parses will not be answered."""
        batch = self._batches[0]
        for server, _ in batch:
            if server is not None:
                conn.pending.discard(server)
        batch.clear()

    def client_error(self, body):
        """An ErrorResponse body that names this session's statements by their server names
        (`prepared statement "txrds_8_0" already exists`) -> the body with the client's names,
        as the client would read it directly; None when it names none."""
        if self.prefix not in body:
            return None
        names = {server: name for name, (server, _) in self.statements.items()}
        return re.sub(re.escape(self.prefix) + rb"[0-9]+", lambda m: names.get(m.group(0), m.group(0)), body)

    def ready(self):
        """A ReadyForQuery ends the oldest batch."""
        if len(self._batches) > 1:
            self._batches.popleft()
        else:
            self._batches[0].clear()


_MENTIONS_OWN = re.compile(rb"(?i)txrds_")


def mentions_proxy_names(sql):
    """True when SQL text may name a statement in the proxy's namespace (EXECUTE, DEALLOCATE,
    PREPARE of `txrds_...`, in any disguise): the session must pin, so that whatever it does to
    such a statement stays on a connection no other session uses until it is reset."""
    return _MENTIONS_OWN.search(sql) is not None


def _header(kind, length, delta):
    """A message header for a message whose length field changes by *delta*."""
    return kind + struct.pack("!I", length + delta)


def _foreign(name):
    """A name the session never prepared: unchanged, unless it is in the proxy's namespace."""
    if name[:6].lower() == _OWN:
        return _MANGLED + name[6:]
    return name


def _sql_name(token):
    """A statement name as SQL spells it -> the name: quoted keeps its case, bare folds."""
    if token.startswith(b'"'):
        return token[1:-1].replace(b'""', b'"')
    return token.lower()
