"""The login side of a MySQL/MariaDB client session: greeting, authentication, the initial
database, and the session-level commands that authenticate again or reset (COM_CHANGE_USER,
COM_RESET_CONNECTION).  `MySQLFrontend` (mysql_frontend.py) adds the command phase.

The greeting repeats the database's (version, capabilities, charset) from
`MySQLConnector.probe()`, which costs no database work once any greeting is known.  Bytes a
client pipelines behind its login are kept in the session's `CommandScanner`, bounded (reading
pauses), and served in order once logged in.
"""

from twisted.internet import defer
from twisted.logger import Logger

from txrdsproxy.proxy import mysql_state as mstate
from txrdsproxy.proxy.limits import Refusal
from txrdsproxy.proxy.mysql_auth import ClientAuth, parse_change_user
from txrdsproxy.proxy.mysql_backend import CAPABILITY_PROFILE, DatabaseError
from txrdsproxy.proxy.relay import direct_write
from txrdsproxy.pool.states import ConnState
from txrdsproxy.proxy.session import ClientSession, Phase, SessionState
from txrdsproxy.wire.mysql import errors
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql import pinning

DEFAULT_VERSION = "5.7.0-txrdsproxy"
MAX_LOCAL_COMMAND = 1 << 16  # handshake/auth packets, COM_CHANGE_USER, COM_INIT_DB: read whole


def _header(buf):
    return buf[0] | (buf[1] << 8) | (buf[2] << 16)


class MySQLLogin(ClientSession):
    """Greeting, authentication and login of a MySQL session (see the module docstring)."""

    log = Logger()
    __slots__ = ()  # MySQLFrontend declares the slots of both
    key_charset = None  # the charset id of the last handshake/COM_CHANGE_USER
    _unread = ()  # (seq, payload) the client sent after the packet that ended authentication

    def connectionMade(self):
        super().connectionMade()
        ctx = self.ctx
        # Refused at accept (limits.Admission): MySQL clients read the server first, so the
        # error goes out now, in place of the greeting.
        if self.refusal is Refusal.TOO_MANY_CONNECTIONS:
            return self._fatal(errors.too_many_connections(ctx.config.max_client_connections), 0)
        if self.refusal is Refusal.CONNECTION_RATE:
            return self._fatal(errors.rate_limit(_number(ctx.config.max_connection_rate)), 0)
        ctx.connector.probe().addCallbacks(self._greet, self._probe_failed)

    def _probe_failed(self, failure):
        self.log.warn("{s}: cannot reach the database for its greeting: {e}", s=self,
                      e=failure.getErrorMessage())
        self._fatal(errors.unknown_error(), 0)

    def _greet(self, server):
        if self._phase is not Phase.GREETING:
            return
        tls = self.ctx.tls is not None
        self._server_caps = hs.proxy_server_capabilities(tls) & (server.capabilities | ~CAPABILITY_PROFILE)
        self._server_caps &= ~P.CLIENT_COMPRESS
        self._phase = Phase.HANDSHAKE
        self._auth = ClientAuth(self)
        key = (server, self._server_caps)
        template = _GREETINGS.get(key)
        if template is None:  # once per server greeting and capability set
            if len(_GREETINGS) >= 64:
                _GREETINGS.clear()
            template = _GREETINGS[key] = hs.GreetingTemplate(
                server.server_version or DEFAULT_VERSION, self._server_caps,
                server.charset or 45, P.SERVER_STATUS_AUTOCOMMIT, hs.NATIVE_PASSWORD)
        direct_write(self.transport, template.packet(self.id, self._auth.scramble))
        self.arm_first_packet_timer()  # the client's turn starts now

    def auth_timed_out(self):
        self._close_client()

    def _ssl_request(self, data):
        """With TLS configured: look for the 32-byte SSLRequest in the raw bytes, because what
        follows it (the client does not wait for an answer) is TLS, not packets.  -> the bytes
        to read as packets (b"" while undecided or once TLS started)."""
        buf = self._before_tls
        buf += data
        if len(buf) < 4:
            return b""
        size = 4 + hs.SSL_REQUEST_LENGTH
        if _header(buf) == hs.SSL_REQUEST_LENGTH:
            if len(buf) < size:
                return b""
            response = hs.parse_handshake_response41(bytes(buf[4:size]), self._server_caps)
            if isinstance(response, hs.SSLRequest):
                self.first_packet_seen()
                rest = bytes(buf[size:])
                del buf[:]
                self.tls = True  # the HandshakeResponse41 (seq 2) follows, decrypted
                self.ctx.tls.start(self.transport, rest)
                return b""
        data = bytes(buf)
        del buf[:]
        return data

    def _handshake_response(self, seq, payload):
        self.first_packet_seen()
        response = hs.parse_handshake_response41(payload, self._server_caps)
        if isinstance(response, hs.SSLRequest):
            # Without TLS configured, or a second one inside TLS (a first one with TLS
            # configured was taken by _ssl_request).
            return self._fatal(P.err_packet(2026, "HY000", "TLS is not enabled on this proxy"),
                               seq + 1)
        if self.ctx.config.require_tls and not self.tls:
            self.setup_failed("TLS required")
            return self._fatal(errors.requires_tls(), seq + 1)
        if response.capabilities & P.CLIENT_COMPRESS:
            return self._fatal(errors.compression_not_supported(), seq + 1)
        self.client_caps = response.capabilities & self._server_caps
        self._phase = Phase.AUTH
        self._auth.start(response.user, response.auth_plugin, response.auth_response,
                         response.database, response.charset, seq + 1, switch=False)

    def auth_succeeded(self, user, database, charset_id, seq):
        """ClientAuth: *user* proved its password; *seq* is the next sequence id to send."""
        self.user = user
        self.key = (user, self.client_caps & CAPABILITY_PROFILE, self.ctx.database_tls_for(self.tls))
        self.desired = {}
        self.charset_id = self.key_charset = charset_id
        self.database = database or None
        self.pin_reason = self.pin_statement = None
        known = _known_databases(self.ctx)
        if self.database is None or (user, self.database) in known:
            # A database this user has entered before: don't borrow just to check it again (a
            # dropped database shows as an error on the first command instead).
            return self._welcome(seq)
        self._phase = Phase.LOGIN
        key = self.pool_key()
        self._borrow_d = d = self.pool_for(key).borrow(key)
        d.addCallback(self._login_lease, seq)
        d.addErrback(self._login_failed, seq)

    def auth_failed(self, user, why, seq, error=None):
        """ClientAuth: refuse *user* (*why* is logged) with *error* (an ERR payload; default
        Access denied)."""
        self.setup_failed(f"authentication failed for {user}: {why}")
        if error is None:
            error = errors.access_denied(user, using_password=self._auth.used_password)
        self._fatal(error, seq)

    @property
    def closed(self):
        """The session ended (ClientAuth asks after an asynchronous IAM check)."""
        return self.state is SessionState.CLOSED or self._phase is Phase.CLOSING

    def write_packet(self, payload, seq):
        # Sent at once when nothing is queued (relay.direct_write): the greeting, the login's OK
        # and the proxy's own answers then cost no reactor write cycle (epoll add, write, remove).
        direct_write(self.transport, P.encode_packet(payload, seq))

    @defer.inlineCallbacks
    def _login_lease(self, lease, seq):
        self._borrow_d = None
        conn = lease.conn
        self._resolve_charset(conn)
        try:
            yield conn.sync(self.desired, self.database)
        except DatabaseError as e:
            lease.release(clean=conn.state == ConnState.BORROWED and not conn.busy)
            self._fatal(e.payload, seq)
            return
        except Exception:
            lease.release(clean=False, reason="sync failed at login")
            raise
        lease.release(clean=True)
        known = _known_databases(self.ctx)
        if len(known) >= 4096:
            known.clear()
        known.add((self.user, self.database))
        if self.state is not SessionState.CLOSED:
            self._welcome(seq)

    def _login_failed(self, failure, seq):
        self._borrow_d = None
        if self.state is SessionState.CLOSED or failure.check(defer.CancelledError):
            return
        self._fatal(self.client_error(failure), seq)

    def _welcome(self, seq):
        self.write_packet(P.ok_packet(status=self._status()), seq)
        leftover = b"".join(P.encode_packet(p, n) for n, p in self._unread) \
            + self._reader.take_buffer()
        self._unread = ()
        self._phase = Phase.COMMAND
        self.set_state(SessionState.IDLE)
        self.start_idle_timer()
        if self.ctx.metrics is not None:
            self.ctx.metrics.client_connections_setup_succeeded.inc(self.ctx.name)
        if leftover:
            self._stream.buf[:0] = leftover
        if self._stream.buffered:
            self._pump_safely()

    def _resolve_charset(self, conn):
        self._resolve_charset_with(conn.connector.collations,
                                   conn.handshake.charset if conn.handshake else None)

    def _resolve_charset_with(self, collations, handshake_charset):
        """The handshake's (or COM_CHANGE_USER's) charset id becomes tracked values when it
        differs from the database connections' own (their greeting's charset)."""
        if self.charset_id is None or collations is None:
            return
        if self.charset_id != handshake_charset:
            for name, value in collations.for_id(self.charset_id).items():
                self.desired.setdefault(name, value)
        self.charset_id = None
        self._check_charset()

    def _check_charset(self, charset=None):
        """sjis, big5 & co. as character_set_client (the session's, or *charset* about to be set):
        pin, because the classifier cannot lex them (a multi-byte character may end in a quote
        or backslash byte); see pinning.UNSAFE_CLIENT_CHARSETS."""
        charset = charset or self.desired.get("character_set_client")
        if pinning.unsafe_charset_client(charset) and self.pin_reason is None:
            self.log.info("{s}: client charset {cs} cannot be classified statement by statement"
                          " (its multi-byte characters can contain quote and backslash bytes):"
                          " the session is pinned", s=self, cs=charset)
            self._pin(pinning.PinReason.CLIENT_CHARSET)

    def _status(self):
        if self.lease is not None and self.lease.conn.tracker is not None:
            status = self.lease.conn.tracker.status
            return status & ~(P.SERVER_SESSION_STATE_CHANGED | P.SERVER_MORE_RESULTS_EXISTS)
        # No connection: the flags a server keeps in every OK, from the session's values, or
        # the connections' baseline (login + InitQuery) for those it never set.  Clients escape
        # strings by SERVER_STATUS_NO_BACKSLASH_ESCAPES of the last OK.
        baseline = getattr(self.ctx.connector, "baseline", None) or {}
        desired = self.desired
        autocommit = desired["autocommit"] if "autocommit" in desired else baseline.get("autocommit")
        status = 0 if autocommit == "0" else P.SERVER_STATUS_AUTOCOMMIT
        if mstate.no_backslash_escapes(desired["sql_mode"] if "sql_mode" in desired
                                       else baseline.get("sql_mode")):
            status |= P.SERVER_STATUS_NO_BACKSLASH_ESCAPES
        return status

    def _reset_session(self, charset_id=None):
        """COM_RESET_CONNECTION / COM_CHANGE_USER: drop session state; unpin (reset the connection)."""
        if self.lease is not None:
            conn = self.lease.conn
            dirty = self.pin_reason is not None or conn.tracker.in_transaction
            if self.pin_reason is not None:
                conn.session_dirty = True
            self._release(needs_reset=dirty)
        self.pin_reason = self.pin_statement = None
        self.desired = {}
        self._statements.clear()
        if self._ps is not None:
            self._ps.clear()
        self.charset_id = charset_id if charset_id is not None else self.key_charset
        self.set_state(SessionState.IDLE)

    def _change_user(self, seq, payload):
        request = parse_change_user(payload, self.client_caps)
        self._reset_session(request.charset)
        self.key_charset = request.charset if request.charset is not None else self.key_charset
        self._phase = Phase.AUTH
        # Bytes already buffered belong after the authentication: hand them to the reader.
        leftover = self._stream.take_rest()
        self._reader = P.PacketReader(MAX_LOCAL_COMMAND)
        self._auth = ClientAuth(self)
        self._auth.start(request.user, request.auth_plugin, request.auth_response,
                         request.database, request.charset, seq + 1, switch=True)
        if leftover:
            self.dataReceived(leftover)

    def _fatal(self, payload, seq):
        if self.state is SessionState.CLOSED or self._phase is Phase.CLOSING:
            return
        self._phase = Phase.CLOSING
        self.write_packet(payload, seq)
        self.transport.loseConnection()


_GREETINGS = {}  # (server greeting, capabilities) -> hs.GreetingTemplate


def _known_databases(ctx):
    """(user, database) pairs a login has validated on this proxy."""
    known = getattr(ctx, "mysql_known_databases", None)
    if known is None:
        known = ctx.mysql_known_databases = set()
    return known


def _number(value):
    return int(value) if float(value).is_integer() else value
