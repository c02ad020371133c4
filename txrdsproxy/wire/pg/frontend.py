"""The client -> database direction of a logged-in PostgreSQL session, sans-IO.

`ClientStream` reads the client's messages with the one `MessageScanner` and answers what the
session (Twisted glue in proxy/pg_frontend.py) must know:

- what to send to the database connection, and when (bytes are held while there is none);
- how many requests will each get a ReadyForQuery (`outstanding`: Query, Sync, FunctionCall)
  and whether an extended-protocol batch is open without its Sync (`unsynced`);
- whether the connection may be given back (`releasable`): nothing outstanding, no open batch,
  and no message half passed on to it -- a message begun on a connection is finished on it;
- why the session pins (`pin_reason`), from the classifier and the statement tracker;
- whether the client said goodbye (`terminated`);
- with `gate` set (the session's connection must not take a request it does not have to: it is
  on a former writer, a replica that left the reader set, or the session is draining), a request
  that arrives while an earlier one still waits for its ReadyForQuery is held (the scanner's
  HOLD), so the session decides the boundary at that ReadyForQuery -- release and borrow again,
  or end -- before any of it is forwarded.  A client that pipelines its next query right behind
  COMMIT thus never sends it to the former writer, however the bytes are split over reads.

When no connection can be had (`refuse`), it answers queued requests itself as PostgreSQL
would after an error: one error per Query/FunctionCall, one per extended batch, a ReadyForQuery
at each Sync; messages of a batch after its error are dropped until the Sync.
"""

import enum

from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg import pinning
from txrdsproxy.wire.pg.framing import ProtocolViolation, cstring
from txrdsproxy.wire.pg.replay import ReplayLog
from txrdsproxy.wire.pg.scanner import DROP_HALT, HOLD, MessageScanner, limits_table
from txrdsproxy.wire.pg.statements import NAMES_LIMIT, PIN, QUERY_LIMIT, mentions_proxy_names

_Q, _P, _B, _D, _E, _H, _C, _S, _F, _X = (ord(c) for c in "QPBDEHCSFX")
_READY = msg.ready_for_query(msg.IDLE)
_SYNC_LENGTH = b"\0\0\0\x04"

# Every message type a client may send after login.  CopyData/CopyDone/CopyFail stream unseen
# (PostgreSQL ignores them outside COPY); anything else is refused here rather than forwarded.
SESSION_LIMITS = limits_table({
    b"Q": QUERY_LIMIT, b"P": NAMES_LIMIT, b"B": NAMES_LIMIT, b"D": NAMES_LIMIT, b"C": NAMES_LIMIT,
    b"E": 1, b"H": 1, b"S": 1, b"F": 4, b"X": 1, b"d": 0, b"c": 0, b"f": 0,
})

PIN_TEXT_BYTES = 1024  # kept of the statement that pinned (shown masked, cut to 200 chars)


class StreamState(enum.Enum):
    """Where the client's bytes go."""

    HELD = "held"          # no database connection: bytes wait in the scanner
    FORWARDING = "forwarding"  # scanned and sent to the attached connection
    REFUSING = "refusing"  # no connection could be had: answered here, dropped


class ClientStream:
    """Client messages of one session after login (see the module docstring)."""

    __slots__ = ("scanner", "outstanding", "unsynced", "requests", "pin_reason", "pin_text", "terminated",
                 "state", "conn", "tracker", "exclude_sets", "reply", "debug", "_refusal",
                 "_batch_failed", "gate", "recorder", "replay_limit")

    def __init__(self, max_size, exclude_sets=False, tracker=None, debug=None):
        self.scanner = MessageScanner(SESSION_LIMITS, max_size, self._message, hold=True)
        self.outstanding = 0  # requests sent that will each get one ReadyForQuery
        self.unsynced = False  # extended-protocol messages since the last Sync
        self.requests = 0  # QueryRequests (Query, Sync) for the metrics
        self.pin_reason = None  # pinning.PinReason once the session must keep its connection
        self.pin_text = None  # the start of the statement that pinned (bytes), when known
        self.terminated = False  # the client sent Terminate
        self.state = StreamState.HELD
        self.conn = None  # the connection bytes go to (the statement tracker's view of it)
        self.tracker = tracker  # statements.StatementTracker with EXCLUDE_PREPARED_STATEMENTS
        self.exclude_sets = exclude_sets
        self.reply = None  # callable(bytes): answers to the client while refusing
        self.debug = debug  # callable(statement text) while DebugLogging lasts, else None
        self._refusal = None  # the ERROR sent for each refused request
        self._batch_failed = False
        self.gate = False  # hold a request behind an unanswered one (see the module docstring)
        # Pinned and still movable to another writer: the replay.ReplayLog its statements go to
        # (None otherwise: an unpinned session records nothing); MaxSessionReplaySize, 0: never.
        self.recorder = None
        self.replay_limit = 0

    # -- questions -------------------------------------------------------------------------------
    @property
    def releasable(self):
        """The connection may go back: every request answered, no batch open, and the bytes sent
        to it end at a message boundary (DESIGN rule 9)."""
        # the scanner's fields rather than its properties: asked once per request
        return self.outstanding == 0 and not self.unsynced and not self.scanner._left

    @property
    def wants_connection(self):
        """Bytes wait and need a database connection (at least one whole header is here)."""
        return self.state is StreamState.HELD and len(self.scanner._buf) >= 5

    @property
    def buffered(self):
        return len(self.scanner._buf)  # MessageScanner.buffered, without the second call

    # -- driving ---------------------------------------------------------------------------------
    def take_query(self, data):
        """The common case, without the scanner: *data* (one read) is exactly one whole simple
        Query, short enough to be classified whole, and the stream stands at a boundary with
        nothing held and no statement tracker / debug log to feed.  Then it is counted and
        classified as `feed` would, and True says the caller sends *data* itself, unchanged
        (to the attached connection, or once it has attached one: `attach` then finds nothing
        held).  False: nothing was taken; use `feed`."""
        n = len(data)
        if (n < 6 or data[0] != _Q or data[-1] != 0 or int.from_bytes(data[1:5], "big") != n - 1
                or n - 5 > QUERY_LIMIT or n - 1 > self.scanner.maxima[_Q] or self.tracker is not None or self.debug is not None
                or self._refusal is not None or self.state is StreamState.REFUSING
                or not self.scanner.idle):
            return False
        self.outstanding += 1
        self.requests += 1
        if self.pin_reason is None:
            sql = data[5:-1]
            reason = pinning.classify_query(sql, self.exclude_sets, self._scs())
            if reason is not None:
                self._pin(reason, sql)
        elif self.recorder is not None:  # pinned, still movable: rare
            self._record(data[5:-1])
        return True

    def take_batch(self, data):
        """The extended-protocol request of drivers with unnamed statements (pgbench -M extended,
        asyncpg/psycopg without prepares), without the scanner: *data* (one read) is exactly
        whole Parse / Bind / Describe / Execute messages ending with one Sync, each short
        enough to be classified whole, at a boundary with no batch open and nothing held, no
        statement tracker / debug log to feed.  Counted and classified as `feed` would (a
        named statement or portal pins, the SQL of each Parse is classified), and True says
        the caller sends *data* itself, unchanged.  False: nothing was taken (also for any
        message `feed` would refuse or find malformed: it then says so); use `feed`."""
        n = len(data)
        if (n < 10 or data[n - 5] != _S or data[n - 4:] != _SYNC_LENGTH or data[0] != _P and data[0] != _B
                or self.tracker is not None or self.debug is not None or self._refusal is not None
                or self.state is StreamState.REFUSING or self.unsynced or not self.scanner.idle
                or self.gate and self.outstanding):  # held behind an unanswered request: feed
            return False
        maxima = self.scanner.maxima
        end = n - 5
        pos = 0
        found = []  # (name, sql or None, body or None) of each Parse and Bind, classified once
        # all are known good.  The C strings are found in *data* itself, within each message
        # (framing.cstring on a copy of the body, without the copy and the call).
        while pos < end:
            kind = data[pos]
            length = int.from_bytes(data[pos + 1:pos + 5], "big")
            stop = pos + 1 + length
            if length < 4 or stop > end or length > maxima[kind]:
                return False
            if kind == _P or kind == _B:
                if length - 4 > NAMES_LIMIT:
                    return False
                start = pos + 5
                at = data.find(0, start, stop)  # the statement / portal name's NUL
                if at < 0:
                    return False  # unterminated: feed finds it again and says so
                if kind == _P:
                    nul = data.find(0, at + 1, stop)  # the SQL's NUL
                    if nul < 0:
                        return False
                    name = data[start:at]
                    found.append((name, data[at + 1:nul], data[start:stop] if name else None))
                else:
                    found.append((data[start:at], None, None))
            elif kind != _E and kind != _D:
                return False
            pos = stop
        for name, sql, body in found:
            if self.pin_reason is not None:
                if self.recorder is None:
                    break
                if sql is not None:  # pinned, still movable: rare
                    self._record(sql, body)
                continue
            if sql is None:
                reason = pinning.classify_bind(name)
                if reason is not None:
                    self._pin(reason)
            else:
                reason = pinning.classify_parse(name, sql, self.exclude_sets, self._scs())
                if reason is not None:
                    self._pin(reason, sql, body)
        self.outstanding += 1
        self.requests += 1
        return True

    def feed(self, data):
        """Client bytes.  Sent on at once while FORWARDING, held while HELD, answered while
        REFUSING.  Raises ProtocolViolation for bytes that are not valid client messages."""
        self.scanner.feed(data)
        if self.state is StreamState.REFUSING:
            self._end_refusal()

    def attach(self, conn, write):
        """Send held and future bytes to *conn* with *write*(bytes)."""
        sc = self.scanner
        self.conn = conn
        self.state = StreamState.FORWARDING
        sc.emit = write
        sc.hold = False
        if sc._buf:
            sc.scan()
        else:  # what scan() does with nothing held (the usual borrow: the request follows)
            sc.halted = False

    @property
    def holding(self):
        """A request is held behind an unanswered one (`gate`): `resume` once the session has
        decided to keep its connection."""
        return self.scanner.halted and self.state is StreamState.FORWARDING

    def resume(self):
        """Forward what was held to the attached connection (the session keeps it: a
        transaction goes on).  Raises ProtocolViolation as `feed`."""
        if self.holding:
            self.scanner.scan()

    def detach(self):
        """Hold bytes again (the connection went back to the pool)."""
        sc = self.scanner
        sc.hold = True
        sc.emit = None
        self.conn = None
        self.state = StreamState.HELD

    def refuse(self, error):
        """No connection can be had: answer what is held with *error* (an encoded ErrorResponse,
        sent with severity ERROR) as PostgreSQL would, drop the rest of an open batch."""
        self._refusal = msg.error_response(*_code_and_text(error), severity="ERROR")
        self._batch_failed = False
        sc = self.scanner
        sc.emit = None
        sc.hold = False
        self.conn = None
        self.state = StreamState.REFUSING
        out = []
        self.reply, reply = out.append, self.reply
        try:
            # Requests already counted went to no database: answer them first.
            for _ in range(self.outstanding):
                out.append(self._refusal + _READY)
            self.outstanding = 0
            if self.unsynced:
                out.append(self._refusal)
                self._batch_failed = True
            sc.scan()
        finally:
            self.reply = reply
        if out:
            reply(b"".join(out))
        self._end_refusal()

    def _end_refusal(self):
        if not self.unsynced and not self.scanner.mid_message and not self.terminated:
            self._refusal = None
            self.detach()

    # -- one message (called by the scanner) -----------------------------------------------------
    def _message(self, kind, body):
        if self._refusal is not None:
            return self._refused(kind)
        if self.gate and self.outstanding and not self.unsynced and kind != _X:
            return HOLD  # a new request: after the boundary is decided (module docstring)
        tracker = self.tracker
        if kind == _Q:
            self.outstanding += 1
            self.requests += 1
            whole = self.scanner.whole
            sql = msg.query_text(body) if whole else body
            if self.pin_reason is None:
                self._pin(pinning.classify_query(sql, self.exclude_sets, self._scs()), sql)
            elif self.recorder is not None:  # pinned, still movable: rare
                self._record(sql if whole else None)
            if self.debug is not None:
                self.debug(sql)
            if tracker is not None:
                if self.pin_reason is None and mentions_proxy_names(sql):
                    self._pin(pinning.PinReason.PREPARED_STATEMENT, sql)
                out = tracker.message(self.conn, kind, body, whole)
                if out is PIN:
                    self._pin(pinning.PinReason.PREPARED_STATEMENT)
                    self.recorder = None
                    return None
                return out
            return None
        if kind == _S:
            self.outstanding += 1
            self.requests += 1
            self.unsynced = False
            if tracker is not None:
                tracker.message(self.conn, kind, body)
            return None
        if kind == _X:
            self.terminated = True
            return DROP_HALT
        if kind == _F:
            self.outstanding += 1
            if self.pin_reason is None or self.recorder is not None:  # by OID: set_config, nextval, ...
                oid = int.from_bytes(body[:4], "big") if len(body) >= 4 else -1
                reason = pinning.classify_function_call(oid)
                if self.pin_reason is None:
                    self._pin(reason)
                elif reason is not None:
                    self.recorder = None
            if tracker is not None:
                tracker.message(self.conn, kind, body)
            return None
        self.unsynced = True
        if kind == _P:
            self._parse(body)
        elif kind == _B:
            if self.pin_reason is None:
                portal, _ = cstring(body)
                self._pin(pinning.classify_bind(portal))
        elif kind == _E or kind == _H:
            return None
        if tracker is None:
            return None
        sc = self.scanner
        return tracker.message(self.conn, kind, body, sc.whole, sc.length)

    def _parse(self, body):
        whole = self.scanner.whole
        if not whole:
            # Longer than the classifier reads: it pins anyway (RDS Proxy pins above 16 KB).
            self._pin(pinning.PinReason.STATEMENT_TOO_LARGE)
            self.recorder = None
            if self.debug is not None:
                self.debug(body)
            return
        name, pos = cstring(body)
        sql, _ = cstring(body, pos)
        if self.debug is not None:
            self.debug(sql)
        if self.tracker is not None:
            name = b""  # tracked by the StatementTracker: only the SQL may pin
        if self.pin_reason is not None:
            if self.recorder is not None:  # pinned, still movable: rare
                self._record(sql, body if name else None)
            return
        if self.tracker is not None and mentions_proxy_names(sql):
            self._pin(pinning.PinReason.PREPARED_STATEMENT, sql)
            return
        self._pin(pinning.classify_parse(name, sql, self.exclude_sets, self._scs()), sql,
                  body if name else None)

    def _scs(self):
        """standard_conforming_strings on the attached connection (as its server reported it):
        it decides how the server lexes backslashes.  None when unknown: the classifier then
        pins if either reading would."""
        conn = self.conn
        value = conn.server_params.get("standard_conforming_strings") if conn is not None else None
        return None if value is None else value == "on"

    def _pin(self, reason, sql=None, body=None):
        """Pin for *reason* (None: no pin); *sql*: the statement that pinned, kept (its start)
        for DescribeDBProxySessions, where it is shown with its literals masked; *body*: a
        named Parse's whole body.  With a `replay_limit`, recording for a move starts here."""
        if reason is not None and self.pin_reason is None:
            self.pin_reason = reason
            if sql is not None:
                self.pin_text = bytes(sql[:PIN_TEXT_BYTES])
            if self.replay_limit:
                log = ReplayLog(self.replay_limit)
                self.recorder = log if log.first(reason, sql, body, self._scs()) else None

    def _record(self, sql, body=None):
        """A statement of a pinned session that is still movable (replay.ReplayLog.record)."""
        if not self.recorder.record(sql, body, self._scs()):
            self.recorder = None

    def _refused(self, kind):
        """A message while refusing: answered here, never forwarded."""
        if kind == _Q or kind == _F:
            if not self._batch_failed:
                self.reply(self._refusal + _READY)
            return None
        if kind == _S:
            self.unsynced = False
            self._batch_failed = False
            self.reply(_READY)
            return None
        if kind == _X:
            self.terminated = True
            return DROP_HALT
        self.unsynced = True
        if not self._batch_failed:
            self._batch_failed = True
            self.reply(self._refusal)
        return None


def _code_and_text(encoded):
    fields = msg.parse_error_fields(encoded[5:])
    return fields.get("C", "XX000"), fields.get("M", "")
