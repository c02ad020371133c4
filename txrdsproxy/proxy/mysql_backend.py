"""One database connection to MySQL/MariaDB, as the pool holds it and a session borrows it.

Pool key: ``(user, capability profile)``.  The profile is the part of the client's negotiated
capabilities that changes the bytes of responses or the meaning of commands (DEPRECATE_EOF,
SESSION_TRACK, MULTI_RESULTS, MULTI_STATEMENTS, LOCAL_FILES, FOUND_ROWS, ...): responses are
relayed unchanged, so a connection must have negotiated exactly what its client did.  The
current database and the tracked session variables are *not* in the key: before a session's
command is forwarded, `sync()` brings the connection to the session's values (COM_INIT_DB and one
``SET``), see `mysql_state`.

Two ways of reading the server, as for PostgreSQL:
- *internal* (not lent): logical packets are decoded (login, ``SELECT @@max_connections``,
  InitQuery, sync, reset); one internal command at a time, each fires a Deferred;
- *forwarding* (lent): `ResponseTracker.consume` walks packet headers in place and the bytes
  go to the session's client unchanged; only OK/ERR/EOF are decoded.
"""

import enum

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txrdsproxy.backend_tls import DatabaseTLSError, start_client_tls
from txrdsproxy.failover import lag
from txrdsproxy.failover.topology import NoWriter, ProbeResult
from txrdsproxy.pool.states import ConnState
from txrdsproxy.proxy import mysql_state as state
from txrdsproxy.proxy.connector import (BackendConnection, BackendGone, Connector, DatabaseRefused,
                                        SingleUseFactory, TargetUnreachable)
from txrdsproxy.proxy.interfaces import IBackendConnection
from txrdsproxy.proxy.relay import direct_write
from txrdsproxy.wire.mysql import auth as myauth
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.commands import ResponseTracker
from txrdsproxy.wire.mysql.packets import ProtocolError
from txrdsproxy.wire.mysql import statements as stmts
from txrdsproxy.wire.mysql.statements import ConnStatements

# Client capabilities that must be the same on both sides of the relay.
CAPABILITY_PROFILE = (
    P.CLIENT_FOUND_ROWS | P.CLIENT_IGNORE_SPACE | P.CLIENT_INTERACTIVE | P.CLIENT_LOCAL_FILES
    | P.CLIENT_MULTI_STATEMENTS | P.CLIENT_MULTI_RESULTS | P.CLIENT_PS_MULTI_RESULTS
    | P.CLIENT_SESSION_TRACK | P.CLIENT_DEPRECATE_EOF)
# What the proxy always asks of the database, whatever the client negotiated.
BASE_CAPABILITIES = (
    P.CLIENT_LONG_PASSWORD | P.CLIENT_LONG_FLAG | P.CLIENT_PROTOCOL_41 | P.CLIENT_TRANSACTIONS
    | P.CLIENT_SECURE_CONNECTION | P.CLIENT_PLUGIN_AUTH | P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)

COLLATIONS_QUERY = (b"SELECT ID, COLLATION_NAME, CHARACTER_SET_NAME, IS_DEFAULT"
                    b" FROM information_schema.COLLATIONS")


class DatabaseError(DatabaseRefused):
    """The database answered with ERR; `payload` is the raw ERR payload (relayable)."""

    def __init__(self, payload):
        self.payload = bytes(payload)
        self.err = P.parse_err(self.payload)
        super().__init__(f"{self.err.code} ({self.err.sqlstate}): {self.err.message}")


class _Part(enum.Enum):
    """Which part of an internal command's response `_InternalOp` expects next."""
    FIRST = "first"        # OK, ERR or a result set's column count
    DEFS = "defs"          # column definitions
    DEFS_EOF = "defs_eof"  # the EOF after them (without CLIENT_DEPRECATE_EOF)
    ROWS = "rows"          # text rows, up to EOF/OK (or ERR)


class _InternalOp:
    """Reads the response to one internal command; collects text rows as lists of str/None."""

    def __init__(self, deferred, deprecate_eof):
        self.deferred = deferred
        self.eof_limit = P.MAX_PACKET_CHUNK if deprecate_eof else 9
        self.deprecate_eof = deprecate_eof
        self.phase = _Part.FIRST
        self.remaining = 0
        self.rows = []
        self.error = None
        self.status = None

    def feed(self, payload, caps):
        """-> True when the response is complete."""
        first = payload[0] if payload else -1
        if self.phase is _Part.FIRST:
            if first == 0x00:
                ok = P.parse_ok(payload, caps)
                self.status = ok.status
                return not ok.status & P.SERVER_MORE_RESULTS_EXISTS
            if first == 0xFF:
                self.error = payload
                return True
            count, _ = P.read_lenenc_int(payload, 0)
            if not count:
                raise ProtocolError("bad column count in an internal result")
            self.remaining = count
            self.phase = _Part.DEFS
            return False
        if self.phase is _Part.DEFS:
            self.remaining -= 1
            if self.remaining == 0:
                self.phase = _Part.ROWS if self.deprecate_eof else _Part.DEFS_EOF
            return False
        if self.phase is _Part.DEFS_EOF:
            self.phase = _Part.ROWS
            return False
        # rows
        if first == 0xFE and len(payload) < self.eof_limit:
            if self.deprecate_eof:
                status = P.parse_ok(payload, caps).status
            else:
                status = P.parse_eof(payload).status
            self.status = status
            if status & P.SERVER_MORE_RESULTS_EXISTS:
                self.phase = _Part.FIRST
                return False
            return True
        if first == 0xFF:
            self.error = payload
            return True
        self.rows.append(_text_row(payload))
        return False


class _PrepareOp:
    """Reads the answer to an internal COM_STMT_PREPARE with the connection's tracker; fires
    with (statement id, columns, params) or fails with the server's ERR."""

    status = None

    def __init__(self, deferred, tracker):
        self.deferred = deferred
        self.tracker = tracker
        self.error = None
        self.rows = None
        self._first = True

    def feed(self, payload, caps):
        if self._first:
            self._first = False
            if payload[:1] == b"\xff":
                self.error = bytes(payload)
        done = self.tracker.feed(payload)
        if done and self.error is None:
            self.rows = self.tracker.last_prepare
        return done


def _text_row(payload):
    out = []
    pos = 0
    while pos < len(payload):
        if payload[pos] == 0xFB:
            out.append(None)
            pos += 1
        else:
            value, pos = P.read_lenenc_str(payload, pos)
            out.append(value.decode("utf-8", "replace"))
    return out


@implementer(IBackendConnection)
class MySQLBackendConnection(BackendConnection):
    log = Logger()
    tls = False  # IBackendConnection: set True once the database connection is TLS

    @property
    def in_transaction(self):
        """IBackendConnection: the server status of its last reply has SERVER_STATUS_IN_TRANS."""
        return self.tracker is not None and self.tracker.in_transaction

    @property
    def backend_id(self):
        """IBackendConnection: the MySQL connection (thread) id from the server's greeting."""
        return self.handshake.connection_id if self.handshake is not None else None

    def __init__(self, key, target, credentials, init_query, max_message_size, connector):
        self.key = key
        self.target = target
        self.credentials = credentials
        self.init_query = init_query
        self.connector = connector
        self.state = ConnState.CONNECTING
        self.idle_since = 0.0
        self.pool_listener = None
        self.server_max_connections = None
        self.handshake = None
        self.capabilities = 0
        self.tracker = None
        self.baseline = {}   # tracked variables right after login (+ InitQuery)
        self.current = {}    # tracked variables as they are now
        self.database = None
        self.session_dirty = False  # a pinned session ran here: COM_RESET_CONNECTION before reuse
        self.ready = defer.Deferred()  # fires with self once logged in and initialised
        self._reader = P.PacketReader(max_message_size)
        self._sha2 = None
        self._op = None
        self._sink = None
        self._fbuf = bytearray()
        self._closing_reason = None
        self._inline = None  # {variable: value} of a SET sent ahead of a command, until its OK
        self.statements = ConnStatements()  # prepared here for multiplexed sessions
        self._in_step = None  # (desired, current, baseline) last found needing no sync

    def __repr__(self):
        tid = self.handshake.connection_id if self.handshake else None
        return f"<mysql {self.target.rds_resource_id} {self.key[0]} id={tid} {self.state}>"

    @property
    def busy(self):
        """An internal command is running (or the answer of an inline sync is awaited)."""
        return self._op is not None or self._inline is not None

    # -- login ----------------------------------------------------------------------------------
    def connectionMade(self):
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)

    def _login_packet(self, seq, payload):
        password = self.credentials.password
        if self.handshake is None:
            if payload[:1] == b"\xff":
                raise DatabaseError(payload)
            greeting = self.handshake = hs.parse_handshake_v10(payload)
            self.connector.note_greeting(greeting)
            self.capabilities = (BASE_CAPABILITIES | (self.key[1] & CAPABILITY_PROFILE)) \
                & greeting.capabilities
            plan = self.tls_plan
            if plan.use_tls and greeting.capabilities & P.CLIENT_SSL:
                # CLIENT_SSL: a short SSLRequest, TLS, then the real response (queued until the
                # handshake is done) with the next sequence id.
                self.capabilities |= P.CLIENT_SSL
                self.transport.write(P.encode_packet(
                    hs.build_ssl_request(self.capabilities, greeting.charset or 45), seq + 1))
                start_client_tls(self.transport, plan, self.clock)
                self.tls = True
                seq += 1
            elif plan.required:
                self._fail_login(DatabaseTLSError("the database does not offer TLS (no CLIENT_SSL)"))
                return
            plugin = greeting.auth_plugin
            if plugin not in (myauth.NATIVE_PASSWORD, myauth.CACHING_SHA2_PASSWORD):
                plugin = myauth.NATIVE_PASSWORD  # the server will switch us if it must
            self._start_plugin(plugin, greeting.scramble)
            response = myauth.auth_response_for(plugin, password, greeting.scramble)
            packet = hs.build_handshake_response41(
                self.capabilities, self.credentials.username, response, auth_plugin=plugin,
                charset=greeting.charset or 45)
            self.transport.write(P.encode_packet(packet, seq + 1))
            return
        first = payload[0] if payload else -1
        if first == 0x00:
            ok = P.parse_ok(payload, self.capabilities)
            self.tracker = ResponseTracker(self.capabilities, ok.status)
            self.state = ConnState.INITIALISING
            self._initialise()
        elif first == 0xFF:
            raise DatabaseError(payload)
        elif first == 0xFE:
            switch = hs.parse_auth_switch_request(payload)
            self._start_plugin(switch.plugin, switch.data)
            response = myauth.auth_response_for(switch.plugin, password, switch.data,
                                                tls=self.tls or self.tls_plan.allow_cleartext_password)
            self.transport.write(P.encode_packet(response, seq + 1))
        elif first == 0x01 and self._sha2 is not None:
            out = self._sha2.feed(payload)
            if out is not None:
                self.transport.write(P.encode_packet(out, seq + 1))
        else:
            raise ProtocolError(f"unexpected packet 0x{first:02x} during login")

    def _start_plugin(self, plugin, nonce):
        self._sha2 = None
        if plugin == myauth.CACHING_SHA2_PASSWORD:
            self._sha2 = myauth.CachingSha2ClientAuth(
                self.credentials.password, nonce, tls=self.tls,
                server_public_key=self.tls_plan.server_public_key)

    @defer.inlineCallbacks
    def _initialise(self):
        try:
            if self.init_query.strip():
                yield self.query(self.init_query.encode())
            yield self._read_state()
            if self.connector.collations is None:
                rows = yield self.query(COLLATIONS_QUERY)
                self.connector.collations = state.Collations(rows)
        except Exception as e:
            self._fail_login(e)
            return
        self.baseline = dict(self.current)
        self.connector.baseline = self.baseline
        self.state = ConnState.IDLE
        d, self.ready = self.ready, None
        d.callback(self)

    @defer.inlineCallbacks
    def _read_state(self):
        rows = yield self.query(state.STATE_QUERY)
        self.server_max_connections, self.database, self.current = state.parse_state_row(rows[0])

    def _fail_login(self, error):
        if self.ready is not None:
            d, self.ready = self.ready, None
            d.errback(error)
        self.close(f"login failed: {error}")

    # -- internal commands ---------------------------------------------------------------------
    def command(self, command, arg=b""):
        """Run one command on this (not lent) connection.

        Fires with the text rows of a result set ([[str|None, ...]]; [] for OK) or fails with
        DatabaseError (the server's ERR) / BackendGone.  The server status is kept in
        `tracker.status` so transaction state stays known.
        """
        if self._op is not None:
            return defer.fail(RuntimeError("internal command already running"))
        if self.state is ConnState.CLOSED:
            return defer.fail(BackendGone("connection closed"))
        d = defer.Deferred()
        self._op = _InternalOp(d, bool(self.capabilities & P.CLIENT_DEPRECATE_EOF))
        self.transport.write(P.encode_packet(bytes((command,)) + bytes(arg), 0))
        return self.bounded(d, "internal command")

    def query(self, sql):
        return self.command(P.COM_QUERY, sql)

    def prepare_statement(self, key, sql):
        """Prepare *sql* on this connection (not lent) for multiplexed sessions.  Fires with the
        ConnStatement now kept under *key*, or fails with DatabaseError (the server's ERR) /
        BackendGone."""
        if self._op is not None:
            return defer.fail(RuntimeError("internal command already running"))
        if self.state is ConnState.CLOSED:
            return defer.fail(BackendGone("connection closed"))
        d = defer.Deferred()
        self.tracker.last_error = None
        self.tracker.expect(P.COM_STMT_PREPARE)
        self._op = _PrepareOp(d, self.tracker)
        self.transport.write(stmts.prepare_packet(sql))
        d.addCallback(lambda prepared: self.remember_statement(key, prepared[0], prepared[2]))
        return self.bounded(d, "statement prepare")

    def remember_statement(self, key, server_id, params):
        """A statement prepared here (by `prepare_statement` or a session's own prepare):
        kept under *key*; the oldest ones past the bound are closed on the server (no answer
        comes).  -> its ConnStatement."""
        entry, closed = self.statements.add(key, server_id, params)
        if closed:
            self.transport.write(b"".join(stmts.close_packet(sid) for sid in closed))
        return entry

    def _internal_packet(self, seq, payload):
        op = self._op
        if op is None:
            raise ProtocolError("unexpected packet from the server on an idle connection")
        if op.feed(payload, self.capabilities):
            self._op = None
            if op.status is not None and self.tracker is not None:
                self.tracker.status = op.status
            if op.error is not None:
                op.deferred.errback(DatabaseError(op.error))
            else:
                op.deferred.callback(op.rows)

    @defer.inlineCallbacks
    def sync(self, desired, database):
        """Bring this connection to a session's tracked values before its command is forwarded.

        *desired*: tracked variable -> value the session set (others: the connection baseline).
        *database*: the session's current database, or None.  Fires when done; fails with
        DatabaseError (then what is known of the connection is forgotten, so the next sync
        sets everything).
        """
        if database is not None and database != self.database:
            yield self.command(P.COM_INIT_DB, database.encode("utf-8"))
            self.database = database
        sql, target = state.sync_sql(self.current, self.baseline, desired)
        if sql:
            try:
                yield self.query(sql)
            except DatabaseError:
                self.current = {}
                raise
            self.current.update(target)

    def sync_inline(self, desired, database):
        """-> the packet of a SET to write just ahead of the session's command, in the same
        write, when that is all a sync needs; None when it must be a round trip of its own
        (`sync`).  The SET's answer is read here before anything is relayed (`dataReceived`).

        Only a change of autocommit alone goes inline: ``SET autocommit=N`` (a literal the
        server accepted before) does not fail on a connection between transactions, so the
        command after it never runs in a state the proxy did not choose.  Should it fail
        anyway, that command already ran in the wrong state: the connection is closed, and its
        session with it (`_inline_answer`)."""
        if database is not None and database != self.database:
            return None
        sql, target = state.sync_sql(self.current, self.baseline, desired)
        if not sql or len(target) != 1 or "autocommit" not in target:
            return None
        self._inline = target
        return P.encode_packet(bytes((P.COM_QUERY,)) + sql, 0)

    def cancel_inline_sync(self):
        """The command a `sync_inline` SET was to go with was answered by the proxy instead:
        the SET is not sent (what the connection holds is unchanged: `current` learns a value
        only from its answer)."""
        self._inline = None

    def _inline_answer(self, buf):
        """Read the answer to an inline sync from the head of *buf*; -> False while it has not
        arrived (or when it closed the connection)."""
        if len(buf) < 4:
            return False
        length = buf[0] | (buf[1] << 8) | (buf[2] << 16)
        if len(buf) < 4 + length:
            return False
        payload = bytes(buf[4:4 + length])
        del buf[:4 + length]
        target, self._inline = self._inline, None
        if payload[:1] == b"\x00" and length < P.MAX_PACKET_CHUNK:
            self.current.update(target)
            if self.tracker is not None:  # the server status now has the new autocommit
                self.tracker.status = P.parse_ok(payload, self.tracker.capabilities).status
            return True
        why = (DatabaseError(payload).args[0] if payload[:1] == b"\xff"
               else f"unexpected packet 0x{payload[:1].hex()}")
        self.log.warn("{c}: the SET sent ahead of a session's command failed ({why}); closing",
                      c=self, why=why)
        self.close(f"inline sync failed: {why}")
        return False

    def reset(self):
        """Make the connection fit for another session.

        Pinned session ran here: COM_RESET_CONNECTION (rolls back, drops temporary tables, user
        variables and prepared statements, restores session variables), then re-read the
        tracked values.  Otherwise, an open transaction: ROLLBACK.  Fails (the pool closes the
        connection) when the server refuses.
        """
        if self.session_dirty:
            self.statements.clear()  # COM_RESET_CONNECTION closes them all
            d = self.command(P.COM_RESET_CONNECTION)
            d.addCallback(lambda _: self._read_state())

            def clean(_):
                self.session_dirty = False

            return d.addCallback(clean)
        if self.tracker.in_transaction:
            return self.query(b"ROLLBACK")
        return defer.succeed(None)

    # -- lending --------------------------------------------------------------------------------
    def attach(self, sink):
        """Forward every server byte to *sink* (a session) until `detach`."""
        self._sink = sink
        self._fbuf = bytearray()

    def detach(self):
        self._sink = None

    def write(self, data):
        """Send now if possible; tell the session when bytes had to be queued (backpressure)."""
        if not direct_write(self.transport, data) and self._sink is not None:
            self._sink.write_queued(self)

    def needs_sync(self, desired, database):
        """Whether `sync` has anything to do (checked first, to skip a Deferred per borrow).

        `sync_sql` is a function of the connection's values, its baseline and the session's
        values alone: when those equal the last ones found in step (copies compared by value;
        the baseline is never changed in place), the answer is the same, without building the
        statement again (a borrow per transaction of a multiplexed session asks this)."""
        if database is not None and database != self.database:
            return True
        current = self.current
        seen = self._in_step
        if (seen is not None and seen[2] is self.baseline and seen[0] == desired
                and seen[1] == current):
            return False
        if state.sync_sql(current, self.baseline, desired)[0]:
            return True
        self._in_step = (dict(desired), dict(current), self.baseline)
        return False

    # -- reading --------------------------------------------------------------------------------
    def _internal_data(self, data):
        try:
            packets = self._reader.feed(data)
            for i, (seq, payload) in enumerate(packets):
                if self.state is ConnState.CONNECTING:
                    self._login_packet(seq, payload)
                else:
                    self._internal_packet(seq, payload)
                if self._sink is not None:  # lent from a callback of the last internal command
                    if i + 1 < len(packets) or self._reader.buffered:
                        self.close("the database sent data nobody asked for")
                    return
        except DatabaseError as e:
            self._fail_login(e)
        except (ProtocolError, myauth.UnsupportedAuthPlugin) as e:
            if self.ready is not None:
                self._fail_login(e)
            else:
                self.close(f"protocol violation from the database: {e}")

    def dataReceived(self, data):
        """Lent: relay *data* to the sink and tell it when the response is complete (the
        forwarding path, inline).  Otherwise `_internal_data`."""
        if self._sink is None:
            self._internal_data(data)
            return
        buf = self._fbuf
        if buf or self._inline is not None:  # a partial packet is held back: join it first
            buf += data
            if self._inline is not None and (not self._inline_answer(buf) or not buf):
                return
            data = buf
        # else the new bytes are read in place: the common whole answer is relayed as it came
        tracker = self.tracker
        try:
            end = tracker.consume(data, 0)
        except ProtocolError as e:
            self.close(f"protocol violation from the database: {e}")
            return
        if data is buf:
            if end == len(buf):
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[:end])
                del buf[:end]
        elif end != len(data):  # what is not relayed now waits for the rest of its packet
            buf += data[end:]
            data = data[:end]
        sink = self._sink
        try:
            if tracker.idle:
                if buf:
                    if end:
                        sink.backend_data(data)
                    self.close("the database sent data nobody asked for")
                    return
                sink.response_complete(data if end else None)  # relays, then ends
                return
            if end:
                sink.backend_data(data)
            if tracker.awaiting_client_data:
                sink.infile_requested()
        except Exception:
            # Never out of a protocol callback.  The session's state is unknown: close this
            # connection (the session is told, and its client with it).
            self.log.failure("{c}: unexpected error relaying to {s}", c=self, s=sink)
            self.close("unexpected error in the proxy while relaying")

    # -- closing --------------------------------------------------------------------------------
    def goodbye(self):
        if self.handshake is not None and self.tracker is not None:
            return P.encode_packet(bytes((P.COM_QUIT,)), 0)
        return b""

    def fail_pending(self, error):
        if self._op is not None:
            op, self._op = self._op, None
            op.deferred.errback(error)


class _GreetingProbe(protocol.Protocol):
    """Reads the server greeting and hangs up: how the proxy learns the version to announce."""

    def __init__(self):
        self.done = defer.Deferred()
        self._reader = P.PacketReader(1 << 16)

    def timed_out(self, seconds):
        if self.done is not None:
            self._finish(failure=f"no greeting from the database within {seconds:g} s")
            if self.transport is not None:
                self.transport.abortConnection()

    def dataReceived(self, data):
        try:
            packets = self._reader.feed(data)
        except ProtocolError as e:
            packets = None
            self._finish(failure=e)
        if packets:
            try:
                self._finish(hs.parse_handshake_v10(packets[0][1]))
            except ProtocolError as e:
                self._finish(failure=e)

    def _finish(self, greeting=None, failure=None):
        if self.transport is not None:
            self.transport.loseConnection()
        if self.done is None:
            return
        d, self.done = self.done, None
        d.errback(BackendGone(str(failure))) if failure else d.callback(greeting)

    def connectionLost(self, reason):
        if self.done is not None:
            d, self.done = self.done, None
            d.errback(BackendGone(f"no greeting from the database: {reason.getErrorMessage()}"))


class MySQLConnector(Connector):
    """Opens authenticated, initialised MySQL/MariaDB connections for a pool key (user, profile).

    Also remembers the last server greeting (version, capabilities, charset) that the proxy
    repeats to its clients, and the server's collations (to resolve client charset ids).
    """

    database_error = (DatabaseError,)

    PROBE_RETRY = 5.0  # seconds a failed greeting probe is remembered (no new probe meanwhile)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.server_info = None
        self.collations = None
        self.baseline = {}  # tracked values of the last connection opened (login + InitQuery)
        self.probes_opened = 0  # greeting probes opened (each is one TCP connection)
        self._probing = None    # the probe in flight: every accepted socket waits on it
        self._waiting = []
        self._failed = None     # (Failure, until): the last probe's failure, for PROBE_RETRY s

    def note_greeting(self, greeting):
        self.server_info = greeting

    def probe(self):
        """Deferred[Handshake]: the writer's greeting, as the proxy repeats it to its clients.

        Accepting a client socket must cost the database nothing: once a greeting is known (from
        a probe or from any login) it is reused; while none is, one probe runs for all the
        sockets that arrive meanwhile, bounded by the connect timeout; a failure is remembered
        for PROBE_RETRY seconds, during which new sockets fail at once (BackendGone) instead of
        each opening a connection.  Cancelling the returned Deferred only drops that waiter.
        """
        if self.server_info is not None:
            return defer.succeed(self.server_info)
        if self._failed is not None:
            failure, until = self._failed
            if self.reactor.seconds() < until:
                return defer.fail(failure)
            self._failed = None
        d = defer.Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        if self._probing is None:
            self._probing = self._probe_once()
            self._probing.addBoth(self._probed)
        return d

    def _probed(self, result):
        self._probing = None
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure):
            self._failed = (result, self.reactor.seconds() + self.PROBE_RETRY)
        for d in waiting:
            d.errback(result) if isinstance(result, Failure) else d.callback(result)

    def _probe_once(self):
        try:
            target = self.topology.writer()
        except NoWriter:
            return defer.fail()
        self.probes_opened += 1
        proto = _GreetingProbe()
        done = proto.done
        timeout = self.connect_timeout
        connected = []

        def on_timeout():
            if connected:
                proto.timed_out(timeout)  # connected, but no greeting: close, fail `done`
            else:
                d.cancel()  # still connecting

        def on_connect(_):
            connected.append(True)
            return done

        timer = self.reactor.callLater(timeout, on_timeout)
        d = self.endpoint(target).connect(SingleUseFactory(proto))
        d.addCallback(on_connect)

        def got(greeting):
            self.server_info = greeting
            return greeting

        def failed(f):
            if not f.check(BackendGone):
                gone = BackendGone if connected else TargetUnreachable
                f = Failure(gone(f"cannot connect to {target.endpoint}:{target.port}:"
                                 f" {f.getErrorMessage()}"))
            self.record_failure(target, f)
            return f

        def stop_timer(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(stop_timer).addCallbacks(got, failed)

    def failure_reason(self, f):
        err = f.value.err if f.check(DatabaseError) else None
        if err is not None and err.code == 1049:  # unknown database: the client's doing
            return None
        if err is not None and (err.sqlstate == "28000" or err.code in (1044, 1045, 1698)):
            return "AUTH_FAILURE"
        if err is not None and err.code == 1040:  # too many connections: no slot for us now
            return "PENDING_PROXY_CAPACITY"
        return super().failure_reason(f)

    def probe_key(self, creds, database=None):
        return (creds.username, 0)  # no capability profile, no database (MySQL needs none)

    ROLE_QUERY = b"SELECT @@global.read_only, @@global.innodb_read_only"

    def query_role(self, conn):
        """Deferred[ProbeResult]: the writer is the server that takes writes: neither
        `read_only` (a MariaDB/MySQL replica, or a demoted writer) nor `innodb_read_only` (how
        Aurora MySQL marks its readers; set at start on a read-only data directory) is on.  A
        read-only server's replay lag comes from SHOW SLAVE STATUS (failover/lag.py; a second
        query on the same connection, bounded like the first by the caller)."""
        def replica_status(status):
            # a row: replication is configured (replica=True).  None: no row (a read-only server
            # following nobody, e.g. a demoted writer) is left unknown, not False, because the
            # monitor trusts a MySQL former writer again on read_only alone (health's rule;
            # False would keep it fenced for good: see docs/operations.md).
            return ProbeResult("READ_ONLY", lag=lag.mysql_lag(status), replica=True if status else None)

        def status_refused(failure):
            # a check user without REPLICATION CLIENT / SLAVE MONITOR: the role stands, the lag
            # and whether it replicates are unknown
            failure.trap(DatabaseError)
            return ProbeResult("READ_ONLY")

        def role(rows):
            off = ("0", "OFF")
            if rows and len(rows[0]) >= 2 and rows[0][0] in off and rows[0][1] in off:
                return ProbeResult("READ_WRITE")
            return conn.query(lag.MYSQL_REPLICA_STATUS_SQL).addCallbacks(replica_status, status_refused)

        return conn.query(self.ROLE_QUERY).addCallback(role)

    def make_connection(self, key, target, creds):
        return MySQLBackendConnection(key, target, creds, self.init_query, self.max_message_size, self)

    def no_credentials(self, user):
        return DatabaseError(P.err_packet(1045, "28000", f"no credentials for user {user}"))
