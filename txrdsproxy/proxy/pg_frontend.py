"""The client-facing side of a PostgreSQL proxy: one protocol instance per client session.

Phases: startup (SSLRequest/GSSENCRequest/CancelRequest/StartupMessage), authentication against
the secrets store, then the session, where client messages are relayed to a borrowed database
connection.  The connection is borrowed when the client sends something and returned when the
database's ReadyForQuery says idle with nothing outstanding and the session is not pinned.

Counting what is outstanding: every Query, Sync and FunctionCall gets exactly one ReadyForQuery;
extended-protocol messages after the last Sync mean a batch is still open.
"""

import os
import struct

from twisted.internet import defer, protocol
from twisted.logger import Logger
from zope.interface import implementer

from txrdsproxy.auth.iam import AuthenticationFailed, TooManyAuthentications, verify_login
from txrdsproxy.proxy.interfaces import IEngineSession, IPgSessionEvents
from txrdsproxy.proxy import pg_move
from txrdsproxy.proxy.limits import Refusal
from txrdsproxy.proxy.relay import direct_write
from txrdsproxy.proxy.session import READ_ONLY_KEY, BorrowFailure, ClientSession, Phase, SessionState
from txrdsproxy.wire.pg import auth as pgauth
from txrdsproxy.wire.pg import errors
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg import pinning
from txrdsproxy.wire.pg.client_login import (
    REPORTED_PARAMS, AuthStep, PasswordExchange, StartupRefused, read_startup,
)
from txrdsproxy.wire.pg.framing import (
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, ProtocolViolation,
    split_startup,
)
from txrdsproxy.wire.pg.frontend import ClientStream, StreamState
from txrdsproxy.wire.pg.scanner import HALT, MessageScanner, limits_table
from txrdsproxy.wire.pg.statements import StatementTracker
from txrdsproxy.pool.states import ConnState

_X = ord("X")
_AUTH_OK = msg.auth_request(msg.AUTH_OK)
_READY_IDLE = msg.ready_for_query(msg.IDLE)
# Client input not yet forwarded (held while there is no connection, in any phase) above this
# pauses reading; the largest message the proxy holds whole is far below it.
PENDING_PAUSE = 1024 * 1024
AUTH_MAX = 65536  # a password / SASL message
AUTH_LIMITS = limits_table({b"p": AUTH_MAX})


@implementer(IEngineSession, IPgSessionEvents)
class PgFrontend(ClientSession):
    log = Logger()
    __slots__ = ("desired", "_buf", "_auth_scanner", "_conn", "_cancel_key", "_auth", "_stmts",
                 "_max", "_stream")  # see ClientSession.__slots__

    def __init__(self, ctx):
        super().__init__(ctx, Phase.STARTUP)
        self.desired = {}
        self._buf = bytearray()  # startup packets (each at most MAX_STARTUP_PACKET)
        self._auth_scanner = None  # password messages while authenticating
        self._conn = None  # the lent connection while attached
        self._cancel_key = None
        self._auth = None
        pool_config = ctx.config.target_group.connection_pool_config
        # EXCLUDE_PREPARED_STATEMENTS: named statements follow the session instead of pinning it.
        self._stmts = StatementTracker(self.id) if pool_config.exclude_prepared_statements else None
        self._max = ctx.config.max_message_size
        debug = (lambda text: ctx.debug_statement(self, text)) if ctx.debug_until else None
        self._stream = ClientStream(self._max, pool_config.exclude_variable_sets, self._stmts, debug)
        self._stream.reply = self._reply
        self._stream.replay_limit = ctx.config.max_session_replay_size  # moving off a former writer

    @property
    def queries(self):
        """QueryRequests of this session (read by the metrics and at close): the client stream
        counts them (Query, Sync)."""
        stream = getattr(self, "_stream", None)  # unset while ClientSession.__init__ runs
        return stream.requests if stream is not None else 0

    @queries.setter
    def queries(self, value):
        """ClientSession starts the count at 0; the stream's own count is the one that holds."""

    def _reply(self, data):
        self.transport.write(data)

    @property
    def outstanding(self):
        return self._stream.outstanding

    @property
    def unsynced(self):
        return self._stream.unsynced

    # -- ClientSession's questions and actions ----------------------------------------------------
    @property
    def busy(self):
        return self._stream.outstanding > 0

    def auth_timed_out(self):
        self._fatal(errors.AUTH_TIMEOUT)

    def left_cleanly(self, conn):
        return self._stream.releasable

    def needs_reset(self, conn):
        return self.pin_reason is not None or conn.txn_status != b"I"

    def transaction_open(self, conn):
        return conn.txn_status != b"I"

    def shutdown_now(self):
        self._fatal(errors.ADMIN_SHUTDOWN)

    def writer_changed_now(self):
        self._fatal(errors.WRITER_CHANGED)

    def lost_database(self, conn, why):
        if conn.fatal_error is not None:
            # The server said why it ended the session (FATAL, already forwarded), as it does
            # before closing; a second error from us would hide that reason from the client.
            self._close_client()
            return
        if self._answer_lost_request(conn, why):
            return
        self._fatal(errors.request_error({"C": "08006", "M": f"the database connection was lost ({why})"}))

    def _answer_lost_request(self, conn, why):
        """The database connection broke while requests waited for their answers (the writer
        vanished, crashed, or was failed over).  When the session loses nothing but those
        requests (no pin, no transaction open on the connection, no prepared statements
        followed across connections, no message half passed on either way, no batch left
        open), each is answered as PostgreSQL answers a failed statement: ErrorResponse
        (08006, "The database connection was lost during the request (<why>); its outcome is
        unknown.") then ReadyForQuery idle, and the session goes on: its next request borrows
        a connection to whatever is the writer then.  -> False otherwise (the client gets
        FATAL and is closed: its transaction or session state is gone)."""
        stream = self._stream
        if (self.pin_reason is not None or self._stmts is not None or conn.txn_status != b"I"
                or conn.mid_message or stream.outstanding == 0 or stream.unsynced
                or stream.scanner.mid_message or self.state is SessionState.CLOSED
                or self._phase is not Phase.SESSION):
            return False
        self.log.info("{s}: the request's database connection was lost ({why}); answered with"
                      " an error, the session goes on", s=self, why=why)
        self._conn = None
        self._detach(conn)
        self.set_state(SessionState.IDLE)
        self.request_started = None
        try:
            stream.refuse(errors.lost_during_request(why))
        except ProtocolViolation as e:
            self._violation(e)
            return True
        self._after_input()
        return True

    def on_closed(self):
        if self._cancel_key is not None:
            self.ctx.cancel_registry.pop(self._cancel_key, None)

    # -- connection -----------------------------------------------------------------------------
    def dataReceived(self, data):
        try:
            if self._phase is Phase.SESSION:
                now = self.last_active = self.clock.seconds()
                self._session_data(data, now)
            elif self._phase is Phase.STARTUP:
                self._buf += data
                self._startup()
                self._check_pause()
            elif self._phase is Phase.AUTH:
                self._auth_scanner.feed(data)
                self._auth_data()
            elif self._phase is Phase.LOGIN:
                self._stream.feed(data)  # pipelined early: held until logged in
                self._check_pause()
            elif self._phase is Phase.SECRETS:  # held until the password is asked for
                self._buf += data
                self._check_pause()
            elif self._phase is Phase.IAM:  # the IAM token is being checked: held
                self._auth_scanner.feed(data)
                self._check_pause()
            # "closing": ignore
        except ProtocolViolation as e:
            self._violation(e)
        except Exception:
            self.unexpected(where="dataReceived")

    def internal_error(self):
        self._fatal(errors.UNKNOWN)

    def _violation(self, e):
        self.log.warn("{s}: protocol violation from client: {e}", s=self, e=e)
        self._fatal(errors.protocol_violation(str(e)))

    # -- startup -----------------------------------------------------------------------------------
    def _startup(self):
        while self._phase is Phase.STARTUP:
            packet = split_startup(self._buf)
            if packet is None:
                return
            code, payload, used = packet
            del self._buf[:used]
            if self.refusal is not None and code >> 16 == 3:
                return self._refuse()
            if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
                # The StartupMessage must follow within the same short deadline.
                self.arm_first_packet_timer()
            else:
                self.first_packet_seen()
            if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
                if self._buf:
                    # Bytes sent before our answer would be read as if they came over TLS.
                    raise ProtocolViolation("data after SSLRequest")
                if code == SSL_REQUEST_CODE and self.ctx.tls is not None and not self.tls:
                    self.transport.write(b"S")
                    self.ctx.tls.start(self.transport)
                    self.tls = True  # what follows (the StartupMessage) arrives decrypted
                else:
                    self._send(b"N")
            elif code == CANCEL_REQUEST_CODE:
                self._cancel(payload)
                return
            elif code >> 16 == 3:
                self._startup_message(code, payload)
            else:
                self._fatal(errors.PROTOCOL_VERSION)
                return

    def _refuse(self):
        """Refused at accept (limits.Admission): the error answers the StartupMessage, as
        PostgreSQL's own "too many clients" does.  Not an answer to an SSLRequest: libpq 17
        no longer shows error text received before TLS ("server sent an error response during
        SSL exchange"); the SSLRequest is answered as usual and the StartupMessage must follow
        within ClientFirstPacketTimeout."""
        config = self.ctx.config
        if self.refusal is Refusal.TOO_MANY_CONNECTIONS:
            self._fatal(errors.too_many_clients(config.max_client_connections))
        else:
            self._fatal(errors.connection_rate(config.max_connection_rate))

    def _cancel(self, payload):
        self._phase = Phase.CLOSING
        if not self.ctx.admission.admit_cancel():
            # MaxCancelRate: dropped, as a CancelRequest with a wrong key is (no answer).
            self.log.info("{s}: CancelRequest dropped (MaxCancelRate)", s=self)
            self.transport.loseConnection()
            return
        try:
            key = msg.parse_cancel(payload)
        except ProtocolViolation:
            key = None
        session = self.ctx.cancel_registry.get(key)
        if session is not None and session.lease is not None and session.ctx.connector is not None:
            self.log.info("cancel request for {s}", s=session)
            # Close only once the database has taken the cancel, as PostgreSQL itself does:
            # clients (asyncpg) wait for this close before their next query, which a cancel
            # still on its way would otherwise hit.
            done = session.ctx.connector.send_cancel(session.lease.conn)
            done.addBoth(lambda _: self.transport.loseConnection())
            return
        worker = self.ctx.worker
        if worker is not None and key is not None and worker.owner(key[0]) != worker.index:
            # `Workers: N`: the key names another worker's session; it sends the cancel.
            from txrdsproxy.workers.peer import forward_cancel
            done = forward_cancel(worker, worker.owner(key[0]), key, self.ctx.clock)
            done.addBoth(lambda _: self.transport.loseConnection())
            return
        self.transport.loseConnection()

    def _startup_message(self, code, payload):
        if self.ctx.config.require_tls and not self.tls:
            self.setup_failed("TLS required")
            return self._fatal(errors.REQUIRES_TLS)
        try:
            request = read_startup(code, payload)  # wire/pg/client_login.py
        except StartupRefused as e:
            return self._fatal(e.error)
        if request.negotiate:
            self._send(request.negotiate)
        self.user = request.user
        self.database = request.database
        # A reader endpoint's sessions (replica connections) get their own key: what the login
        # caches per key (server parameters such as in_hot_standby) differs from the writer's.
        self.key = (self.user, self.database, self.ctx.database_tls_for(self.tls)) + (
            () if self.route is None else (READ_ONLY_KEY,))
        self.desired = request.desired
        pending = self.ctx.secrets_loading()
        if pending is None:
            return self._begin_auth()
        self.log.info("{s}: waiting for the secrets store's first read", s=self)
        self._phase = Phase.SECRETS
        pending.addCallback(self._secrets_loaded).addErrback(self.unexpected, "secrets")

    def _secrets_loaded(self, _):
        if self._phase is Phase.SECRETS and self.state is not SessionState.CLOSED:
            self._begin_auth()

    # -- authentication ---------------------------------------------------------------------------
    def _begin_auth(self):
        found = self.ctx.find_user(self.user)
        if found is None:
            self._auth_failed("no credentials")
            return self._fatal(errors.no_credentials(self.user))
        entry, creds = found
        if entry.iam_auth == "REQUIRED":
            return self._begin_iam(creds)
        if entry.client_password_auth_type == "POSTGRES_MD5":
            self._auth = PasswordExchange("md5", creds, salt=os.urandom(4))
        else:
            verifier = creds.derived("pg-scram", pgauth.ScramVerifier.from_password)
            self._auth = PasswordExchange("scram", verifier=verifier)
        self._start_auth()

    def _start_auth(self):
        """Send the exchange's request; a password message sent on before it is read now."""
        self._phase = Phase.AUTH
        self._auth_scanner = MessageScanner(AUTH_LIMITS, AUTH_MAX + 4, self._auth_scanned)
        self._send(self._auth.start())
        if self._buf:  # sent on before our request: it can only be a password message
            data = bytes(self._buf)
            del self._buf[:]
            self._auth_scanner.feed(data)
            self._auth_data()

    def _auth_data(self):
        sc = self._auth_scanner
        while sc.halted and self._phase is Phase.AUTH:
            sc.scan()
        if self._phase is Phase.AUTH or self._phase is Phase.IAM:
            self._check_pause()
        elif self._phase is not Phase.CLOSING and sc.buffered:
            # Logged in (or logging in): what the client sent on belongs to the session.
            self._stream.feed(sc.take_buffered())
            if self._phase is Phase.SESSION:
                self._after_input()
            else:
                self._check_pause()

    def _auth_scanned(self, kind, payload):
        self._auth_message(payload)
        return HALT  # one message at a time: the phase may change after it

    def _begin_iam(self, creds):
        """IAMAuth REQUIRED: the password the client sends is an IAM token (auth/iam.py);
        only over TLS."""
        if not self.tls:
            self._auth_failed("IAM authentication without TLS")
            return self._fatal(errors.IAM_REQUIRES_TLS)
        self._auth = PasswordExchange("cleartext")
        self._start_auth()

    def _iam_token(self, token):
        """The token in a PasswordMessage: verified (usually at once; a key secret not yet
        loaded makes it wait, in phase "iam"), then the login goes on as after a password."""
        self._phase = Phase.IAM
        waiting = []
        d = verify_login(self.ctx, token, self.user, self.transport)
        d.addCallbacks(self._iam_passed, self._iam_refused, callbackArgs=(waiting,), errbackArgs=(waiting,))
        waiting.append(True)

    def _iam_passed(self, principal, waiting):
        if self._phase is not Phase.IAM or self.state is SessionState.CLOSED:
            return  # the client went away meanwhile
        self.log.info("{s}: IAM authentication of {user} as {principal}", s=self, user=self.user,
                      principal=principal)
        self._auth_ok()
        if waiting:  # fired later than _iam_token: what the client sent on is still buffered
            self._auth_data()

    def _iam_refused(self, failure, waiting):
        if self._phase is not Phase.IAM or self.state is SessionState.CLOSED:
            return
        self._auth_failed("IAM token refused")
        if failure.check(TooManyAuthentications):
            return self._fatal(errors.IAM_TOO_MANY)
        if failure.check(AuthenticationFailed) and failure.value.unauthorized:
            return self._fatal(errors.iam_failed_role(self.user))
        return self._fatal(errors.iam_failed_user(self.user))

    def _auth_message(self, payload):
        answer, step = self._auth.receive(payload)  # wire/pg/client_login.py
        if step is AuthStep.CONTINUE:
            self._send(answer)
        elif step is AuthStep.TOKEN:
            self._iam_token(self._auth.token)
        elif step is AuthStep.OK:
            self._auth_ok(answer)
        else:
            self._auth_failed("wrong password")
            self._fatal(errors.wrong_password(self.user))

    def _auth_ok(self, head=b""):
        """Authenticated: AuthenticationOk (after *head*, the SASL final message) goes out
        with the login's answer in one write when the server's parameters are known already
        (the usual case), else at once, before the login borrows a connection."""
        self._auth = None
        self._phase = Phase.LOGIN
        self.stop_auth_timer()  # from here the login is bounded by ConnectionBorrowTimeout
        welcome = self._known_welcome()
        if welcome is not None:
            self._finish_login(welcome, head + _AUTH_OK)
            return
        self._send(head + _AUTH_OK)
        self._login()

    def _send(self, data):
        """Write to the client now (one send, no reactor round trip) when its socket takes it."""
        direct_write(self.transport, data)

    def _auth_failed(self, why):
        self.setup_failed(f"authentication failed: {why}")

    # -- login: learn the server's parameters, check the database --------------------------------
    def _known_welcome(self):
        """The server parameters a new session of this key is told, when known for every
        parameter it asked for (no login borrow needed), else None."""
        ctx = self.ctx
        welcome = ctx.welcome.get(self.key)
        if welcome is None:
            return None
        normalized = ctx.normalized
        for kv in self.desired.items():
            if kv[1] is not None and kv not in normalized:
                return None
        return welcome

    def _login(self):
        welcome = self._known_welcome()
        if welcome is not None:
            self._finish_login(welcome)
            return
        key = self.pool_key()
        self._borrow_d = d = self.pool_for(key).borrow(key)
        d.addCallback(self._login_lease)
        d.addErrback(self._login_failed)
        d.addErrback(self.unexpected, "login")

    @defer.inlineCallbacks
    def _login_lease(self, lease):
        self._borrow_d = None
        conn = lease.conn
        try:
            yield conn.sync_params(self.desired)
        except Exception:
            lease.release(clean=conn.state == ConnState.IDLE or conn.state == ConnState.BORROWED, needs_reset=True)
            raise
        normalized = self.ctx.normalized
        if len(normalized) >= 4096:  # bounded: many distinct values just cost a borrow each
            normalized.clear()
        for name, value in self.desired.items():
            if value is not None:
                got = conn.server_params.get(name, value) if name in REPORTED_PARAMS else value
                normalized[(name, value)] = got
        welcome = self.ctx.welcome.get(self.key)
        if welcome != conn.initial_params:
            welcome = self.ctx.welcome[self.key] = dict(conn.initial_params)
        lease.release(clean=True)
        if self.state is not SessionState.CLOSED:
            self._finish_login(welcome)

    def _login_failed(self, failure):
        self._borrow_d = None
        if self.state is SessionState.CLOSED or failure.check(defer.CancelledError):
            return
        self._fatal(self.client_error(failure))

    def _finish_login(self, welcome, head=b""):
        ctx = self.ctx
        cache_key = (self.key, tuple(self.desired.values()))
        cached = ctx.login_replies.get(cache_key)
        if cached is None or cached[0] is not welcome:
            params = dict(welcome)
            for name, value in self.desired.items():
                if value is not None and name in REPORTED_PARAMS:
                    params[name] = ctx.normalized.get((name, value), value)
            block = b"".join(msg.parameter_status(name, value) for name, value in params.items())
            # The session's parameters as the server spells them, so later comparisons match.
            spelled = {name: (params[name] if value is not None and name in REPORTED_PARAMS else value)
                       for name, value in self.desired.items()}
            cached = (welcome, block, spelled)
            if len(ctx.login_replies) >= 1024:  # many distinct application_names: start over
                ctx.login_replies.clear()
            ctx.login_replies[cache_key] = cached
        _, block, spelled = cached
        self._pin_if_unlexable(self.desired.get("client_encoding"))  # as the client spelled it
        self.desired = dict(spelled)
        self._pin_if_unlexable(self.desired.get("client_encoding"))  # as the server reports it
        pid = self.id & 0x7FFFFFFF
        secret = struct.unpack("!I", os.urandom(4))[0]
        self._cancel_key = (pid, secret)
        ctx.cancel_registry[self._cancel_key] = self
        self._send(head + block + msg.backend_key_data(pid, secret) + _READY_IDLE)
        self._phase = Phase.SESSION
        self.set_state(SessionState.IDLE)
        self.start_idle_timer()
        if self.ctx.metrics is not None:
            self.ctx.metrics.client_connections_setup_succeeded.inc(self.ctx.name)
        if self._stream.buffered:  # sent during login: held until now
            self._after_input()

    # -- the session: client -> database ------------------------------------------------------------
    def _session_data(self, data, now):
        stream = self._stream
        if self.request_started is None and not stream.outstanding and not stream.unsynced:
            self.request_started = now  # once per request (latency metrics)
        if (self.lease is None and stream.state is StreamState.HELD and not stream.buffered
                and self._borrow_d is None and self._attaching is None and len(data) >= 5 and data[0] != _X):
            # Start of a transaction, the common case: an idle connection whose parameters
            # already match is attached now and *data* goes straight out, without queueing.
            if self.borrow_if_idle() and self.lease is not None:
                # Lent in this read's turn, so it waited for nothing: it starts at this read's
                # clock reading (the pool read the clock again, a moment later), and
                # request_done records both latencies alike, with one bisect.
                self.lease.borrowed_at = now
        if (self._conn is not None and stream.state is StreamState.FORWARDING and not self._paused
                and not (stream.outstanding and (self._draining or self.lease.retired))
                and (stream.take_query(data) or stream.take_batch(data))):
            # One whole simple Query, or one whole unnamed Parse/Bind/Execute/Sync batch, in
            # this read (the usual requests): counted and classified by the stream, sent as it
            # came, in one write; nothing else can have changed.  (_write_db, inline)
            conn = self._conn
            if not direct_write(conn.transport, data):
                self.write_queued(conn)
            if stream.pin_reason is not None and self.pin_reason is None:
                self.pin_statement = stream.pin_text
                self._pin(stream.pin_reason)
            return
        lease = self.lease
        # A connection that must take no more than the transaction in progress needs: a request
        # pipelined behind the one in flight is held until that one's boundary is decided.
        stream.gate = self._draining or (lease is not None and lease.retired)
        stream.feed(data)
        self._after_input()

    def _after_input(self):
        """After client bytes were taken: close, release, borrow or pause as they require."""
        stream = self._stream
        if stream.pin_reason is not None and self.pin_reason is None:
            self.pin_statement = stream.pin_text
            self._pin(stream.pin_reason)
        if stream.terminated:
            self._close_client()
            return
        state = stream.state
        if state is StreamState.FORWARDING:
            # A message finished after the last ReadyForQuery (or one that gets no answer):
            # the connection may be free now.
            if (stream.releasable and self.pin_reason is None and self.lease is not None
                    and self.lease.conn.txn_status == b"I"):
                self._release()
        elif state is StreamState.HELD and stream.wants_connection:
            if self._borrow_d is None and self._attaching is None and self.lease is None:
                try:
                    first = stream.scanner.first_kind()
                except ProtocolViolation as e:
                    return self._violation(e)
                if first == _X:
                    self._close_client()
                    return
                self.borrow()
        self._check_pause()

    def _check_pause(self):
        """Reading pauses while more than PENDING_PAUSE bytes wait unforwarded (any phase)."""
        waiting = len(self._buf) + self._stream.buffered
        if self._auth_scanner is not None:
            waiting += self._auth_scanner.buffered
        if waiting > PENDING_PAUSE:
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        elif self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _write_db(self, data):
        conn = self._conn
        if not direct_write(conn.transport, data):
            self.write_queued(conn)

    # -- getting a connection: ClientSession.borrow's engine hooks -----------------------------------
    def prepare_lease(self, conn):
        """The connection's session parameters must be this session's first (a Deferred of
        sync_params); the client's messages wait in the stream meanwhile.  A pinned session
        moving off a former writer has its state replayed there first (proxy/pin_move.py)."""
        if self._move is not None:
            move = self.take_move()
            if move is not None:
                return pg_move.replay(conn, move, self.desired)
        if conn.client_params == self.desired:
            return None
        return conn.sync_params(self.desired)

    def attach_connection(self, conn, waited):
        """Forward what the client sent meanwhile (held in the stream)."""
        self._conn = conn
        # Before attach: the connection reads it to decide whether ParseCompletes are inspected.
        conn.statement_tracker = self._stmts
        conn.attach(self)
        self._stream.gate = self._draining or self.lease.retired
        try:
            self._stream.attach(conn, self._write_db)
        except ProtocolViolation as e:  # in bytes held until now
            self._violation(e)
            return
        # The held bytes were classified just now: a pin must hold before their ReadyForQuery.
        if self._stream.pin_reason is not None and self.pin_reason is None:
            self.pin_statement = self._stream.pin_text
            self._pin(self._stream.pin_reason)
        if waited:  # called from a Deferred: no _after_input follows to do the rest
            self._after_input()

    def refuse_request(self, error):
        """Answer everything queued as PostgreSQL would after an error: one error per batch."""
        try:
            self._stream.refuse(error)
        except ProtocolViolation as e:
            return self._violation(e)
        self._after_input()

    _ERRORS = {
        BorrowFailure.TIMEOUT: errors.BORROW_TIMEOUT,
        BorrowFailure.SHUTTING_DOWN: errors.SHUTTING_DOWN,
        BorrowFailure.UNKNOWN: errors.UNKNOWN,
    }

    def error_bytes(self, kind, failure):
        if kind is BorrowFailure.DATABASE_ERROR:
            return errors.request_error(failure.value.fields)
        if kind is BorrowFailure.UNREACHABLE:
            return errors.request_error({"C": "08006", "M": failure.getErrorMessage()})
        return self._ERRORS[kind]

    # -- the session: database -> client (called by the backend connection) ------------------------
    def backend_data(self, data):
        if not direct_write(self.transport, data) and self.lease is not None:
            self.write_queued(self.lease.conn)

    def parameter_changed(self, name, value):
        self.desired[name] = value
        if name == "client_encoding":
            self._pin_if_unlexable(value)

    def _pin_if_unlexable(self, encoding):
        """SJIS, BIG5, GBK, ...: the proxy cannot split SQL sent in them (a multi-byte character
        may hold a quote or backslash byte), the server can.  Pinned, the session needs no
        classifying (docs/security.md), and cannot move to another writer."""
        if encoding and pinning.unsafe_client_encoding(encoding):
            self._stream.recorder = None
            self._stream.pin_reason = self._stream.pin_reason or pinning.PinReason.CLIENT_ENCODING
            if self.pin_reason is None:
                self._pin(pinning.PinReason.CLIENT_ENCODING)

    def ready_for_query(self, status):
        if self._stmts is not None:
            self._stmts.ready()
        now = self.last_active = self.clock.seconds()  # IdleClientTimeout counts from the request's end
        stream = self._stream
        if stream.outstanding > 0:
            stream.outstanding -= 1
        if self.request_started is not None and not stream.outstanding and not stream.unsynced:
            self.request_done(now)
        if status == b"I" and self.pin_reason is None and stream.releasable:
            # Only at a message boundary on this connection (DESIGN rule 9): a message the
            # client began here is finished here first (see _after_input).
            self._release()
        elif self._draining and status == b"I" and self.pin_reason is not None:
            # a pinned session asked to end (proxy stopping, former writer): this boundary, in
            # the turn that forwarded its ReadyForQuery, before the client can send more
            # (and before a request it pipelined behind this one, held by the gate)
            self.drain()
        if stream.scanner.halted and self.lease is not None and self._phase is Phase.SESSION:
            # the session keeps its connection (a transaction goes on, or pinned): what was held
            # behind the answered request goes to it now, one request at a time while gated
            lease = self.lease
            stream.gate = self._draining or lease.retired
            try:
                stream.resume()
            except ProtocolViolation as e:
                self._violation(e)
                return
            self._after_input()

    def _release(self):
        lease, self.lease = self.lease, None
        conn = lease.conn
        self._conn = None
        self._detach(conn)
        self._stream.detach()
        self.set_state(SessionState.IDLE)
        cancelling = conn.cancel_in_flight
        if cancelling is not None and not cancelling.called:
            # A cancel for this session's query is on its way to the server: lend the connection
            # to nobody else until the server has taken it, so it can't hit another's query.
            cancelling.addBoth(lambda _: lease.release(clean=True))
        else:
            lease.release(clean=True, needs_reset=conn.too_many_statements)
        if self._stream.wants_connection:  # the next request has begun arriving
            self._after_input()

    # -- moving off a former writer (proxy/pin_move.py; what moves: wire/pg/replay.py) ---------
    def replay_log(self):
        return self._stream.recorder

    def detach_for_move(self, conn):
        self._conn = None
        self._detach(conn)
        self._stream.detach()

    def capture_state(self, conn, log):
        return pg_move.capture(conn, log)

    def after_move(self):
        if self._stream.wants_connection:  # the next request has begun arriving
            self._after_input()

    def replay_failed(self, why):
        self._fatal(errors.replay_failed(why))

    # -- ending -------------------------------------------------------------------------------------
    def _fatal(self, error):
        if self.state is SessionState.CLOSED or self._phase is Phase.CLOSING:
            return
        self._phase = Phase.CLOSING
        self.transport.write(error)
        self.transport.loseConnection()


class PgFrontendFactory(protocol.Factory):
    noisy = False  # no "Starting factory" log line per client connection

    def __init__(self, ctx):
        self.ctx = ctx

    def buildProtocol(self, addr):
        return PgFrontend(self.ctx)
