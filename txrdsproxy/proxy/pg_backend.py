"""One database connection to PostgreSQL, as the pool holds it and a session borrows it.

Two ways of reading the server:
- *internal* (not lent to a session): whole messages are decoded; used for the login, InitQuery,
  `SHOW max_connections`, bringing session parameters in line, and the reset after a pinned
  session (ROLLBACK / DISCARD ALL).  One internal operation runs at a time and fires a Deferred.
- *forwarding* (lent): bytes go straight to the session's client transport.  Only message headers
  are walked, with an offset; ReadyForQuery and ParameterStatus are the only messages looked at.
  A large DataRow is forwarded as it arrives without being buffered.
"""

import struct

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from txrdsproxy.backend_tls import PgSSLNegotiation
from txrdsproxy.failover import lag
from txrdsproxy.failover.topology import ProbeResult
from txrdsproxy.proxy.connector import BackendConnection, BackendGone, Connector, DatabaseRefused
from txrdsproxy.proxy.interfaces import IBackendConnection
from txrdsproxy.wire.pg import auth as pgauth
from txrdsproxy.wire.pg.backend_login import BackendLogin, LoginStep
from txrdsproxy.wire.pg.client_login import REPORTED_PARAMS, SESSION_PARAMS
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg.framing import ProtocolViolation
from txrdsproxy.wire.pg.scanner import DROP, HALT, MessageScanner, limits_table, maxima_table, uniform_maxima
from txrdsproxy.pool.states import ConnState

_R, _S, _K, _E, _Z, _D = (ord(c) for c in "RSKEZD")
_READY_HEAD = b"Z\0\0\0\x05"  # a ReadyForQuery's header (its status byte follows)
STREAM_MAX = 0x7FFFFFFF  # forwarded messages may be any length: they stream
# Lent: the session's client gets everything; the proxy reads only these (body bytes needed).
LENT_LIMITS = limits_table({b"Z": 1, b"S": 65536, b"E": 65536}, default=0)
LENT_TRACKED_LIMITS = limits_table({b"Z": 1, b"S": 65536, b"E": 65536, b"1": 1}, default=0)
# Not lent: every message is read whole (bounded by MaxMessageSize).
WHOLE_LIMITS = limits_table({}, default=STREAM_MAX)
MAX_TRACKED_STATEMENTS = 1000  # per connection; above this, DEALLOCATE ALL on the next return

# SESSION_PARAMS: the runtime parameters each client session owns (None: the server's default);
# REPORTED_PARAMS: those the server reports with ParameterStatus.  Defined with the startup.


class DatabaseError(DatabaseRefused):
    """The database answered with an ErrorResponse; `fields` holds its S/C/M... fields."""

    def __init__(self, fields):
        self.fields = fields
        super().__init__(fields.get("M", "database error"))

    @property
    def sqlstate(self):
        return self.fields.get("C", "XX000")


def quote_literal(value):
    return "'" + value.replace("'", "''") + "'"


def param_sync_sql(current, desired):
    """SQL that brings a connection's session parameters from *current* to *desired*, or b''."""
    parts = []
    for name in SESSION_PARAMS:
        want = desired.get(name)
        if current.get(name) != want:
            if want is None:
                parts.append(f"RESET {name}")
            else:
                parts.append(f"SET {name} = {quote_literal(want)}")
    return "; ".join(parts).encode()


@implementer(IBackendConnection)
class PgBackendConnection(BackendConnection):
    log = Logger()
    tls = False  # IBackendConnection: set True once the database connection is TLS
    # A whole lent reply ending with its ReadyForQuery skips the scanner (dataReceived); the
    # tests turn it off to compare both paths byte for byte.
    fast_replies = True

    @property
    def in_transaction(self):
        """IBackendConnection: the last ReadyForQuery said the session is not idle (T or E)."""
        return self.txn_status != b"I"

    @property
    def backend_id(self):
        """IBackendConnection: the PostgreSQL backend pid (BackendKeyData)."""
        return self.backend_pid

    def __init__(self, key, target, credentials, init_query, max_message_size, on_connection_made=None):
        self.key = key
        self.target = target
        self.credentials = credentials
        self.init_query = init_query
        self._sink = None
        self._scanner = MessageScanner(WHOLE_LIMITS, max_message_size, self._login_scanned)
        self.max_message_size = max_message_size
        self.state = ConnState.CONNECTING
        self.idle_since = 0.0
        self.pool_listener = None
        self.server_params = {}
        self.initial_params = {}  # as reported at login: what a new client is told
        self.client_params = dict.fromkeys(SESSION_PARAMS)  # what *we* set; None = default
        self.server_max_connections = None
        self.backend_pid = self.backend_secret = None
        self.txn_status = b"I"
        self.session_dirty = False  # a pinned session ran here: DISCARD ALL before reuse
        self.cancel_in_flight = None  # Deferred: a CancelRequest for this connection is under way
        self.fatal_error = None  # fields of a FATAL/PANIC ErrorResponse forwarded to a session
        self.prepared = set()  # server-side names of tracked statements prepared here
        self.pending = set()  # ... sent, ParseComplete not yet seen
        self.statement_tracker = None  # the lending session's StatementTracker, if it has one
        self.ready = defer.Deferred()  # fires with self once logged in and initialised
        self._after = None  # what to do once the scanner halted (after a ReadyForQuery)
        self._op = None  # (Deferred, collected rows, first error) of the running internal op
        self._login = None  # wire.pg.backend_login.BackendLogin while logging in
        self._sink = None
        self._closing_reason = None
        self._on_made = on_connection_made

    @property
    def max_message_size(self):
        """The longest message read whole while not lent (MaxMessageSize)."""
        return self._max_message_size

    @max_message_size.setter
    def max_message_size(self, value):
        self._max_message_size = value
        # Lent: any length streams, except what the proxy reads (a ReadyForQuery is 5 bytes, a
        # ParameterStatus at most 64 KB, an ErrorResponse at most MaxMessageSize).
        self._lent_maxima = maxima_table(STREAM_MAX, {b"Z": 5, b"S": 65536 + 4, b"E": value, b"1": 4})
        self._whole_maxima = uniform_maxima(value)
        if self._sink is None:
            self._scanner.max_size = value
        else:
            self._scanner.set_maxima(self._lent_maxima)

    def __repr__(self):
        return f"<pg {self.target.rds_resource_id} {self.key[0]}@{self.key[1]} pid={self.backend_pid} {self.state}>"

    # -- login ----------------------------------------------------------------------------------
    def connectionMade(self):
        # key: (user, database, TLS to the database (backend_tls))
        self.transport.setTcpNoDelay(True) if hasattr(self.transport, "setTcpNoDelay") else None
        self._login = BackendLogin(self.key[0], self.key[1], self.credentials)
        self.server_params = self._login.server_params  # filled by the login, then kept up to date
        self.transport.write(self._login.startup())

    def _login_scanned(self, kind, payload):
        """A whole message during the login: the sans-IO BackendLogin decides; this sends its
        answers and acts on the end (HALT: the scanner changes mode after it)."""
        login = self._login
        login.cleartext_allowed = self.tls or self.tls_plan.allow_cleartext_password
        reply = login.message(kind, payload)
        if reply:
            self.transport.write(reply)
        step = login.step
        if step is LoginStep.FAILED:
            self._fail_login(DatabaseError(login.error))
            return HALT
        if step is LoginStep.READY:
            self.backend_pid, self.backend_secret = login.backend_pid, login.backend_secret
            self.txn_status = login.txn_status
            self.initial_params = dict(self.server_params)
            self.state = ConnState.INITIALISING
            self._use_internal()
            self._after = self._initialise
            return HALT
        return None

    @defer.inlineCallbacks
    def _initialise(self):
        try:
            rows = yield self.run_internal(b"SHOW max_connections")
            self.server_max_connections = int(rows[0][0])
            if self.init_query.strip():
                yield self.run_internal(self.init_query.encode())
        except Exception as e:
            self._fail_login(e)
            return
        self.state = ConnState.IDLE
        d, self.ready = self.ready, None
        d.callback(self)

    def _fail_login(self, error):
        if self.ready is not None:
            d, self.ready = self.ready, None
            d.errback(error)
        self.close(f"login failed: {error}")

    # -- internal operations ------------------------------------------------------------------
    def run_internal(self, sql):
        """Run *sql* as a simple query on this (not lent) connection.

        Fires with the DataRows' columns as [[str or None,...]] or fails with DatabaseError (the
        first error) / BackendGone.  The connection is idle again when it fires.
        """
        return self.run_messages(msg.query(sql))

    def run_messages(self, data):
        """As `run_internal`, for *data*: encoded messages that get exactly one ReadyForQuery
        (one Query, or extended-protocol messages ending with one Sync)."""
        if self._op is not None:
            return defer.fail(RuntimeError("internal operation already running"))
        d = defer.Deferred()
        self._op = [d, [], None]
        self.transport.write(data)
        return self.bounded(d, "internal query")

    def _internal_scanned(self, kind, payload):
        op = self._op
        if kind == _S:
            name, value = msg.parse_parameter_status(payload)
            self.server_params[name] = value
            return None
        if op is None:
            if kind == _E:
                fields = msg.parse_error_fields(payload)
                self.close(f"database error on an idle connection: {fields.get('M')}")
                return HALT
            return None  # notices on an idle connection
        if kind == _D:
            op[1].append(_data_row(payload))
        elif kind == _E:
            if op[2] is None:
                op[2] = DatabaseError(msg.parse_error_fields(payload))
        elif kind == _Z:
            if self._scanner.length != 5:
                raise ProtocolViolation(f"bad length {self._scanner.length} for ReadyForQuery")
            self.txn_status = payload[:1]
            self._op = None
            self._after = lambda: self._op_done(op)
            return HALT
        return None

    def _op_done(self, op):
        """An internal operation's ReadyForQuery: fire its Deferred (whose callbacks may lend
        the connection: what the server sends next then goes to that session)."""
        if op[2] is not None:
            op[0].errback(op[2])
        else:
            op[0].callback(op[1])

    def sync_params(self, desired):
        """Bring this connection's session parameters to *desired*; Deferred fires when done."""
        sql = param_sync_sql(self.client_params, desired)
        if not sql:
            return defer.succeed(None)
        d = self.run_internal(sql)

        def done(result):
            for name in SESSION_PARAMS:
                self.client_params[name] = desired.get(name)
            return result

        def failed(f):
            # Part of the batch may have applied: forget what we knew, so the next borrower
            # sets every value it needs.
            self.client_params = dict.fromkeys(SESSION_PARAMS, "?")
            return f

        return d.addCallbacks(done, failed)

    def reset(self):
        """Make the connection fit for another session: ROLLBACK if in a transaction, DISCARD ALL
        if a pinned session ran here.  Fires when done; fails (and the pool closes it) if not."""
        d = defer.succeed(None)
        if self.txn_status != b"I":
            d.addCallback(lambda _: self.run_internal(b"ROLLBACK"))
        if self.session_dirty:
            d.addCallback(lambda _: self.run_internal(b"DISCARD ALL"))

            def clean(_):
                self.session_dirty = False
                self.client_params = dict.fromkeys(SESSION_PARAMS)
                self.prepared.clear()
                self.pending.clear()

            d.addCallback(clean)
        elif self.too_many_statements:
            d.addCallback(lambda _: self.run_internal(b"DEALLOCATE ALL"))
            d.addCallback(lambda _: (self.prepared.clear(), self.pending.clear()))
        return d

    @property
    def too_many_statements(self):
        """Tracked statements of sessions long gone pile up: time for a DEALLOCATE ALL."""
        return len(self.prepared) > MAX_TRACKED_STATEMENTS

    # -- lending --------------------------------------------------------------------------------
    def attach(self, sink):
        """Forward everything the server sends to *sink* (a session) until `detach`; with a
        `statement_tracker` set, ParseCompletes answering injected Parses are swallowed."""
        self._sink = sink
        sc = self._scanner
        sc.limits = LENT_TRACKED_LIMITS if self.statement_tracker is not None else LENT_LIMITS
        sc.maxima = self._lent_maxima
        sc.inspect = self._lent_scanned
        sc.emit = sink.backend_data

    def detach(self):
        self._sink = None
        self.statement_tracker = None
        # _use_internal, inline (once per transaction): lent means logged in, so internal reads
        sc = self._scanner
        sc.limits = WHOLE_LIMITS
        sc.maxima = self._whole_maxima
        sc.inspect = self._login_scanned if self.state == ConnState.CONNECTING else self._internal_scanned
        sc.emit = None

    def _use_internal(self):
        """Not lent: whole messages are read and decoded (login, internal operations)."""
        sc = self._scanner
        sc.limits = WHOLE_LIMITS
        sc.maxima = self._whole_maxima  # every kind: MaxMessageSize (the scanner's max_size)
        sc.inspect = self._login_scanned if self.state == ConnState.CONNECTING else self._internal_scanned
        sc.emit = None

    @property
    def mid_message(self):
        """A server message has been partly passed on to the session's client."""
        return self._scanner.mid_message

    def write(self, data):
        self.transport.write(data)

    # -- reading --------------------------------------------------------------------------------
    def dataReceived(self, data):
        sc = self._scanner
        sink = self._sink
        if sink is not None and data[-6:-1] == _READY_HEAD and self.fast_replies and sc.idle:
            # The common reply, lent: whole messages the proxy does not look at, ending with
            # the ReadyForQuery.  Forwarded in one write, then the session is told, as the
            # scanner would have done (with HALT) -- without its per-message work.  Equivalence
            # with the scanner path for any cut of the server's stream: tests/unit/
            # test_pg_reply_fast_path.py.
            if sc.plain_run(data) == len(data) - 6:
                status = self.txn_status = data[-1:]
                try:
                    sink.backend_data(data)
                    if self._sink is sink:
                        sink.ready_for_query(status)
                except Exception as e:
                    self.log.failure("{c}: unexpected error reading from the database", c=self)
                    self.close(f"unexpected error: {e!r}")
                return
        try:
            sc.feed(data)
            while sc.halted:
                after, self._after = self._after, None
                if after is not None:
                    after()
                if self.state == ConnState.CLOSED:
                    return
                sc.scan()
        except (ProtocolViolation, pgauth.AuthError) as e:
            if self.ready is not None:
                self._fail_login(e)
            else:
                self.close(f"protocol violation from the database: {e}")
        except Exception as e:
            # A bug, here or in the session this connection serves: this connection's state is
            # unknown, so it closes (its session is told through backend_lost); nothing else is hit.
            self.log.failure("{c}: unexpected error reading from the database", c=self)
            if self.ready is not None:
                self._fail_login(e)
            else:
                self.close(f"unexpected error: {e!r}")

    def _lent_scanned(self, kind, body):
        """A message the session's client is sent (the scanner forwards it): look at the few
        that matter."""
        if kind == _Z:
            if self._scanner.length != 5:
                raise ProtocolViolation(f"bad length {self._scanner.length} for ReadyForQuery")
            self.txn_status = body
            self._after = self._ready_lent
            return HALT
        if kind == _S:
            if not self._scanner.whole:
                raise ProtocolViolation("ParameterStatus too long")
            name, value = msg.parse_parameter_status(body)
            self.server_params[name] = value
            if name in REPORTED_PARAMS:
                self.client_params[name] = value
                self._sink.parameter_changed(name, value)
            return None
        if kind == _E:
            self._error_forwarded(body if self._scanner.whole else body + b"\0\0")
            tracker = self.statement_tracker
            if tracker is not None:
                tracker.error(self)
                if self._scanner.whole:
                    named = tracker.client_error(body)
                    if named is not None:
                        return msg.message(b"E", named)
            return None
        # ParseComplete (inspected only with a statement tracker)
        if self._scanner.length != 4:
            raise ProtocolViolation("bad length for ParseComplete")
        return DROP if self.statement_tracker.parse_completed(self) else None

    def _ready_lent(self):
        """A ReadyForQuery reached the client: tell the session (which may release us)."""
        sink = self._sink
        if sink is not None:
            sink.ready_for_query(self.txn_status)

    def _error_forwarded(self, payload):
        """An ErrorResponse went to the client: remember a FATAL/PANIC, the server's last word."""
        fields = msg.parse_error_fields(payload)
        if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
            self.fatal_error = fields

    # -- closing --------------------------------------------------------------------------------
    def goodbye(self):
        return msg.TERMINATE

    def fail_pending(self, error):
        if self._op is not None:
            op, self._op = self._op, None
            op[0].errback(error)

    def lost_reason(self, reason):
        if self.fatal_error is not None:
            return f"database ended the session: {self.fatal_error.get('M', '')}"
        return super().lost_reason(reason)


def _data_row(payload):
    """DataRow body -> list of column values (str, decoded leniently, or None); internal queries only."""
    try:
        (count,) = struct.unpack_from("!H", payload)
        pos = 2
        out = []
        for _ in range(count):
            (n,) = struct.unpack_from("!i", payload, pos)
            pos += 4
            if n < 0:
                out.append(None)
            else:
                if pos + n > len(payload):
                    raise ProtocolViolation("DataRow column runs past the message")
                out.append(payload[pos:pos + n].decode("utf-8", "replace"))
                pos += n
    except struct.error:
        raise ProtocolViolation("truncated DataRow") from None
    return out


class PgConnector(Connector):
    """Opens authenticated, initialised PostgreSQL connections for a pool key
    (user, database, TLS to the database)."""

    database_error = (DatabaseError,)
    tls_negotiation = PgSSLNegotiation  # SSLRequest before the StartupMessage

    def make_connection(self, key, target, creds):
        return PgBackendConnection(key, target, creds, self.init_query, self.max_message_size)

    def no_credentials(self, user):
        return DatabaseError({"C": "28000", "M": f"no credentials for role {user}"})

    def failure_reason(self, f):
        if f.check(DatabaseError):
            if f.value.sqlstate == "3D000":  # no such database: the client's choice, not the target's health
                return None
            if f.value.sqlstate.startswith("28"):
                return "AUTH_FAILURE"
            if f.value.sqlstate == "53300":  # too many connections: no slot for us now
                return "PENDING_PROXY_CAPACITY"
        return super().failure_reason(f)

    PROBE_DATABASE = "postgres"  # health checks log in here by default (HealthCheck: Database)

    def probe_key(self, creds, database=None):
        return (creds.username, database or self.PROBE_DATABASE)

    # Read-only like libpq's target_session_attrs=read-write sees it: in recovery (a standby), or
    # default_transaction_read_only on for the whole server (a switchover that keeps the old
    # primary up: ALTER SYSTEM + reload).  A per-role or per-database setting (the health-check
    # user's own) says nothing about the server and is ignored.
    # Third column: a standby's replay lag in seconds (failover/lag.py), for the reader set.
    ROLE_QUERY = (b"SELECT pg_is_in_recovery(), (SELECT setting = 'on' AND source NOT IN ('database',"
                  b" 'user', 'database user', 'client', 'session') FROM pg_settings"
                  b" WHERE name = 'default_transaction_read_only'), " + lag.PG_REPLAY_LAG_SQL)

    def query_role(self, conn):
        def role(rows):
            if not rows or len(rows[0]) < 2:
                raise BackendGone("the health check query returned no row")
            in_recovery = rows[0][0] == "t"
            read_only = in_recovery or rows[0][1] == "t"
            replay_lag = lag.parse_seconds(rows[0][2]) if len(rows[0]) > 2 else None
            return ProbeResult("READ_ONLY" if read_only else "READ_WRITE", replica=in_recovery,
                               lag=replay_lag)

        return conn.run_internal(self.ROLE_QUERY).addCallback(role)

    def send_cancel(self, conn):
        """Ask the database to cancel what *conn* is running (a CancelRequest on a new socket).

        Returns a Deferred that fires once the server has closed the cancel socket, i.e. has
        signalled the backend; it is also kept as `conn.cancel_in_flight` so the session holds
        the connection until then.  It never fails.
        """
        if conn.backend_pid is None:
            return defer.succeed(None)
        packet = msg.cancel_request(conn.backend_pid, conn.backend_secret)
        done = self.send_oob(conn.target, packet)  # bounded: gives up after connect_timeout
        conn.cancel_in_flight = done
        return done
