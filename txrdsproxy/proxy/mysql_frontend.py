"""The client-facing side of a MySQL/MariaDB proxy: one protocol instance per client session.

Phases: greeting, authentication and the check of the initial database (`mysql_login`), then
the command phase (here).

Command phase: one client command at a time.  Local commands (COM_PING, COM_QUIT,
COM_RESET_CONNECTION, COM_CHANGE_USER) never borrow.  Others borrow a connection (if the session
holds none), bring it to the session's tracked values (`mysql_state`), and are relayed; the
response is relayed unchanged while `ResponseTracker` finds its end.  The connection goes back to
the pool when the response is complete, the server status says no transaction is open, and the
session is not pinned.  Client bytes of a command that arrive while the previous one is being
answered wait (pipelining clients are served in order).

Isolation by construction: the client's bytes go through one `CommandScanner`, which always knows
whether the stream stands at a command boundary.  A connection goes back to the pool only when the
response is complete, no transaction is open, the session is not pinned *and* every command begun
on that connection was written to it whole (`_maybe_release`), so a command the client cuts short
can never be completed by the bytes of another session.  Commands up to WHOLE_LIMIT are read whole
before anything is borrowed; larger ones are relayed as they arrive.

Prepared statements belong to the session that prepared them: COM_STMT_* naming another id are
refused (or, for those the server never answers, dropped) and never reach a database connection.
"""

import enum
import re

from twisted.internet import protocol
from twisted.logger import Logger
from zope.interface import implementer

from txrdsproxy.failover.readers import NoReaderAvailable
from txrdsproxy.proxy import mysql_move
from txrdsproxy.proxy import mysql_state as mstate
from txrdsproxy.proxy.interfaces import IEngineSession, IMySQLSessionEvents
from txrdsproxy.proxy.mysql_login import MAX_LOCAL_COMMAND, MySQLLogin
from txrdsproxy.proxy.mysql_statements import PENDING_ID, SessionStatements, StatementRouting
from txrdsproxy.proxy.relay import direct_write
from txrdsproxy.proxy.session import BorrowFailure, Phase, SessionState
from txrdsproxy.wire.mysql import errors
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql import pinning
from txrdsproxy.wire.mysql.statements import with_statement_id
from txrdsproxy.wire.mysql.commands import NO_RESPONSE, UNSUPPORTED
from txrdsproxy.wire.mysql.lexer import version_id
from txrdsproxy.wire.mysql.packets import ProtocolError
from txrdsproxy.wire.mysql.replay import MOVABLE_REASONS, ReplayLog
from txrdsproxy.wire.mysql.scanner import CommandScanner, StreamPosition

PENDING_PAUSE = 4 * 1024 * 1024  # unforwarded client bytes past which reading pauses
WHOLE_LIMIT = MAX_LOCAL_COMMAND  # commands up to this size are read whole before borrowing
_LOCAL_WHOLE = frozenset((P.COM_QUIT, P.COM_PING, P.COM_RESET_CONNECTION, P.COM_CHANGE_USER,
                          P.COM_INIT_DB))
# Commands naming a prepared statement by the id the server gave (int<4> after the command byte).
STATEMENT_COMMANDS = frozenset((P.COM_STMT_EXECUTE, P.COM_STMT_SEND_LONG_DATA, P.COM_STMT_CLOSE,
                                P.COM_STMT_RESET, P.COM_STMT_FETCH, P.COM_STMT_BULK_EXECUTE))
LAST_STATEMENT = 0xFFFFFFFF  # MariaDB: the statement prepared last on this connection
BOUNDARY = StreamPosition.BOUNDARY


class Wait(enum.Enum):
    """What the command phase waits for before the next command may start."""
    NOTHING = "nothing"
    BORROW = "borrow"      # a connection from the pool (and its sync)
    RESPONSE = "response"  # the database's answer to the command sent
    PEER = "peer"          # `Workers: N`: another worker's answer to a KILL (workers/peer.py)
    PREPARE = "prepare"    # a statement prepared on the connection before the command naming it
    DISCARD = "discard"    # the rest of a LOCAL INFILE whose database connection was lost


@implementer(IEngineSession, IMySQLSessionEvents)
class MySQLFrontend(MySQLLogin, StatementRouting):
    log = Logger()
    SESSION_PHASE = Phase.COMMAND
    WAIT_NOTHING, WAIT_PREPARE, PHASE_COMMAND = Wait.NOTHING, Wait.PREPARE, Phase.COMMAND
    __slots__ = ("desired", "charset_id", "client_caps", "_reader", "_auth", "_stream", "_wait",
                 "_relaying", "_statements", "_cmd", "_cmd_classified", "_server_caps",
                 "_before_tls", "_exclude_sets", "key_charset", "_unread", "_cmd_seq",
                 "_answered", "_lost_infile", "_replay", "_ps", "_stmt", "_stmt_packet",
                 "_stmt_id", "_prep_id")  # see ClientSession

    def __init__(self, ctx):
        super().__init__(ctx, Phase.GREETING)
        self.key_charset, self._unread = None, ()  # MySQLLogin's class defaults, now slots
        self.desired = {}        # tracked variables this session set
        self.charset_id = None   # from the handshake / COM_CHANGE_USER, resolved at first borrow
        self.client_caps = 0
        self._reader = P.PacketReader(MAX_LOCAL_COMMAND)
        self._auth = None
        self._stream = CommandScanner()  # client bytes of the login and command phases
        self._wait = Wait.NOTHING
        self._relaying = False   # the stream's current command goes to the lease's connection
        self._statements = set()  # ids of the prepared statements this session made
        self._cmd = None
        self._cmd_classified = None  # what classify_query said of the command on the wire
        self._cmd_seq = None     # sequence id of the command on the wire (one packet), else None
        self._answered = False   # some of the answer to the command on the wire was relayed
        self._lost_infile = None  # Wait.DISCARD: the lost connection's tracker, fed the client's packets
        self._replay = None  # pinned and still movable to another writer: its wire.mysql.replay.ReplayLog
        self._server_caps = 0
        self._before_tls = bytearray()  # handshake bytes while an SSLRequest is possible
        pool_config = ctx.config.target_group.connection_pool_config
        self._exclude_sets = pool_config.exclude_variable_sets
        # EXCLUDE_PREPARED_STATEMENTS: statements under ids of the proxy's (mysql_statements)
        self._ps = SessionStatements() if pool_config.exclude_prepared_statements else None
        self._stmt = None         # (Statement, command, pins) of the statement command at the head
        self._stmt_packet = None  # that command as it goes to the connection (None: streamed)
        self._stmt_id = None      # the statement's id on that connection
        self._prep_id = None      # PENDING_ID: the answer to a prepare gets an id of ours

    # -- ClientSession's questions and actions ----------------------------------------------------
    @property
    def busy(self):
        """Waiting for the pool or the database (not for the client: a client that stops in the
        middle of a command or of LOCAL INFILE data is idle, and IdleClientTimeout ends it)."""
        if self._wait is Wait.BORROW:
            return True
        if self._wait is Wait.RESPONSE and not self._relaying:
            return not self.lease.conn.tracker.awaiting_client_data
        return self._wait is Wait.PEER or self._wait is Wait.PREPARE

    def left_cleanly(self, conn):
        return (self._wait is Wait.NOTHING and not self._relaying and not _strayed(conn)
                and not conn.busy and conn.tracker is not None and conn.tracker.idle)

    def pool_key(self):
        """The pool key of the next borrow.  Sessions without a current database get connections
        of their own kind (NO_DATABASE): MySQL cannot unset a connection's database (COM_INIT_DB
        needs a name; COM_RESET_CONNECTION keeps it), so a connection another session left in
        its database must never serve a session that has none."""
        return self.key if self.database is not None else self.key + (NO_DATABASE,)

    def needs_reset(self, conn):
        return self.pin_reason is not None or conn.tracker.in_transaction

    def transaction_open(self, conn):
        return conn.tracker is None or conn.tracker.in_transaction

    def shutdown_now(self):
        # What the server sends a connection it ends at shutdown: an unsolicited ERR (seq 0).
        self._fatal(P.err_packet(1053, "08S01", "Server shutdown in progress"), 0)

    def writer_changed_now(self):
        self._fatal(errors.writer_changed(), 0)

    def lost_database(self, conn, why):
        if self._answer_lost_command(conn, why):
            return
        self._close_client()  # as a crashed server would: the client sees the connection drop

    def _answer_lost_command(self, conn, why):
        """The database connection broke while a command waited for its answer (the writer
        vanished, crashed, or was failed over).  When the session loses nothing but that
        command (no pin, no open transaction before it, nothing of its answer relayed yet, the
        command sent whole in one packet), the command is answered with ERR 2013 "Lost
        connection to the database during the command" and the session goes on: its next
        command borrows a connection to whatever is the writer then (waiting for one, up to
        ConnectionBorrowTimeout).  -> False otherwise: the client connection is closed, as a
        crashed server would close it (its transaction or session state is gone).  Whether the
        lost command took effect is unknown, as for any connection lost mid-command."""
        tracker = conn.tracker
        seq = self._cmd_seq
        if (self._wait is Wait.RESPONSE and tracker is not None and tracker.awaiting_client_data
                and self.state is not SessionState.CLOSED):
            self._discard_infile(conn, why)
            return True
        if (self._wait is not Wait.RESPONSE or self._relaying or self._answered or seq is None
                or self.pin_reason is not None or tracker is None or tracker.in_transaction
                or self.state is SessionState.CLOSED or self._phase != "command"):
            return False
        self.log.info("{s}: the command's database connection was lost ({why}); answered with"
                      " an error, the session goes on", s=self, why=why)
        self._detach(conn)
        if self._paused:  # uncoupling resumed the client: its own backlog still says pause
            self.transport.pauseProducing()
        self._wait = Wait.NOTHING
        self._cmd = self._cmd_classified = self._cmd_seq = None
        self.request_started = None
        self.set_state(SessionState.IDLE)
        self.write_packet(errors.lost_during_command(), (seq + 1) & 0xFF)
        self._pump_safely()
        return True

    def _discard_infile(self, conn, why):
        """The connection broke while the client streams a LOCAL INFILE file to it.  The client
        cannot be interrupted (it reads no answer before its empty end-of-file packet), so, as
        MariaDB does when a LOAD DATA fails midway, the rest of the file is read and dropped, and
        its end is answered with ERR 2013: nothing of the file reached a database (the
        statement was not committed where it ran).  The client keeps its connection unless the
        session lost more than the statement (a pin, an open transaction): then the connection
        is closed after the error, as `_answer_lost_command` would close it, but only once the
        client has sent its file (a client cut off while it uploads sees a broken pipe, which
        some drivers do not handle).  The wait is the client's, so IdleClientTimeout bounds
        it."""
        self.log.info("{s}: the database connection was lost during LOCAL INFILE ({why}); the"
                      " rest of the file is dropped and answered with an error", s=self, why=why)
        self._detach(conn)
        if self._paused:
            self.transport.pauseProducing()
        self._relaying = False  # the packet being relayed now is dropped as it arrives
        self._lost_infile = conn.tracker
        self._wait = Wait.DISCARD
        self._pump_safely()

    def _discard_next(self, stream):
        """Wait.DISCARD at a packet boundary: drop the client's next file packet; at the file's
        end answer it.  -> False until that packet's header is here."""
        if stream.buffered < 4:
            return False
        tracker = self._lost_infile
        seq = stream.buf[3]
        tracker.client_packet(stream.begin(single_packet=True))  # its bytes: dropped by _pump
        if not tracker.awaiting_client_data:  # the empty packet that ends the file
            stream.take()
            self._lost_infile = None
            self._wait = Wait.NOTHING
            self._cmd = self._cmd_classified = self._cmd_seq = None
            self.request_started = None
            self.set_state(SessionState.IDLE)
            self.write_packet(errors.lost_during_command(), (seq + 1) & 0xFF)
            if tracker.in_transaction or self.pin_reason is not None:
                self._close_client()  # its transaction (or pinned state) is gone
        return True

    def dataReceived(self, data):
        try:  # (_safely, inline: this runs for every read)
            if (self._wait is Wait.NOTHING and self.lease is not None and not self._stream.buf
                    and self._phase is Phase.COMMAND and self._execute_whole(data)):
                return
            self._received(data)
        except ProtocolError as e:
            self.log.info("{s}: protocol violation from client: {e}", s=self, e=e)
            self._close_client()
        except Exception:
            self.log.failure("{s}: unexpected error; closing this session", s=self)
            self._close_client()

    def _execute_whole(self, data):
        """The read of a session that holds its connection (pinned, or in a transaction) is
        exactly one whole COM_STMT_EXECUTE of a statement it prepared: sent as it came, in
        one write, without going through the stream (what `_command` and `_dispatch` do for
        it, inline).  -> False, nothing done, for anything else (the general path).

        The stream is empty and at a boundary, no command is outstanding, and *data* is one
        physical packet whose length says exactly len(data): nothing of another command
        travels with it, and the connection stays at a message boundary."""
        n = len(data)
        if (n < 9 or data[4] != P.COM_STMT_EXECUTE or n != 4 + (data[0] | (data[1] << 8) | (data[2] << 16))
                or n - 4 >= P.MAX_PACKET_CHUNK or self._relaying or self._paused
                or self._inline_sync is not None or self._stream.position is not BOUNDARY
                or (data[5] | (data[6] << 8) | (data[7] << 16) | (data[8] << 24))
                not in self._statements):
            return False
        conn = self.lease.conn
        tracker = conn.tracker
        if not tracker.idle:
            return False
        self.last_active = now = self.clock.seconds()
        self._cmd_classified = None
        self.queries += 1  # QueryRequests
        self.request_started = now
        self._cmd = P.COM_STMT_EXECUTE
        tracker.last_error = None
        if tracker.session_state_changes:
            tracker.session_state_changes = []
        tracker.expect(P.COM_STMT_EXECUTE)
        self._answered = False
        self._cmd_seq = data[3]
        self._wait = Wait.RESPONSE
        conn.write(data)
        return True

    def _pump_safely(self):
        """_pump from a database or pool callback: the client's bytes may be bad there too."""
        self._safely(self._pump)

    def _safely(self, step, *args):
        """Run *step*; nothing it raises leaves a protocol callback: a protocol violation, or
        anything unexpected, ends this one session with the reason logged."""
        try:
            step(*args)
        except ProtocolError as e:
            self.log.info("{s}: protocol violation from client: {e}", s=self, e=e)
            self._close_client()
        except Exception:
            self.log.failure("{s}: unexpected error; closing this session", s=self)
            self._close_client()

    def _received(self, data):
        phase = self._phase
        if phase is Phase.COMMAND:
            self.last_active = self.clock.seconds()
            self._stream.feed(data)
            self._pump()
        elif phase is Phase.HANDSHAKE or phase is Phase.AUTH:
            if phase is Phase.HANDSHAKE and self.ctx.tls is not None and not self.tls:
                data = self._ssl_request(data)
                if not data:
                    return
            packets = self._reader.feed(data)
            for i, (seq, payload) in enumerate(packets):
                self._unread = packets[i + 1:]  # pipelined after the auth: see _welcome
                if self._phase is Phase.HANDSHAKE:
                    self._handshake_response(seq, payload)
                else:
                    self._auth.feed(seq, payload)
                if self._phase is not Phase.HANDSHAKE and self._phase is not Phase.AUTH:
                    break
        elif phase is Phase.LOGIN:
            self._stream.feed(data)  # commands pipelined behind the login: kept, bounded
            self._flow_control()
        # greeting/closing: ignore

    # -- command phase: client -> database --------------------------------------------------------
    def _pump(self):
        """Relay or answer client commands, one at a time, in the order they came."""
        stream = self._stream
        while self._phase is Phase.COMMAND:
            if stream.position is not BOUNDARY:  # inside a streamed command (or LOCAL INFILE packet)
                chunk = stream.take()
                if not chunk and not stream.at_boundary:
                    break
                if chunk and self._relaying:
                    self.lease.conn.write(chunk)
                if stream.at_boundary:
                    self._relaying = False
                    self._maybe_release()
                continue
            if self._wait is Wait.RESPONSE:
                tracker = self.lease.conn.tracker
                if not tracker.awaiting_client_data or stream.buffered < 4:
                    break
                seq = stream.buf[3]
                tracker.client_packet(stream.begin(single_packet=True))  # LOCAL INFILE data
                self._relaying = True
                if not tracker.awaiting_client_data:
                    # the file's end: the server's OK or ERR comes next, in sequence after it
                    # (and a connection lost from here on is answered as for any command)
                    self._cmd_seq = seq
                    self._answered = False
                continue
            if self._wait is not Wait.NOTHING:
                if self._wait is Wait.DISCARD and self._discard_next(stream):
                    continue
                break
            buf = stream.buf  # the next command's header (CommandScanner.head, inline)
            if len(buf) < 5:
                if len(buf) == 4 and not (buf[0] or buf[1] or buf[2]):
                    raise ProtocolError("empty command packet")
                break
            length = buf[0] | (buf[1] << 8) | (buf[2] << 16)
            if not length:
                raise ProtocolError("empty command packet")
            cmd = buf[4]
            if length > WHOLE_LIMIT:
                if cmd in _LOCAL_WHOLE:
                    raise ProtocolError(f"command 0x{cmd:02x} too long ({length} bytes)")
                if cmd in STATEMENT_COMMANDS and not stream.has(5):
                    break  # the statement id decides whether it may go anywhere
            elif len(buf) < 4 + length:  # not whole yet
                break
            self._command(cmd, length)
        if self._paused or len(stream.buf) > PENDING_PAUSE:
            self._flow_control()

    def _flow_control(self):
        """Pause reading from the client while its unforwarded bytes pass PENDING_PAUSE."""
        buffered = self._stream.buffered
        if buffered > PENDING_PAUSE and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and buffered < PENDING_PAUSE // 4:
            self._paused = False
            self.transport.resumeProducing()

    def _command(self, cmd, length):
        """The command at the head of the stream (whole when length <= WHOLE_LIMIT)."""
        stream = self._stream
        if cmd == P.COM_QUIT:
            stream.take_packet()
            self._close_client()
            return
        if cmd == P.COM_PING:
            seq, _ = stream.take_packet()
            self.write_packet(P.ok_packet(status=self._status()), seq + 1)
            return
        if cmd == P.COM_RESET_CONNECTION:
            seq, _ = stream.take_packet()
            self._reset_session()
            self.write_packet(P.ok_packet(status=self._status()), seq + 1)
            return
        if cmd == P.COM_CHANGE_USER:
            seq, payload = stream.take_packet()
            self._change_user(seq, payload[1:])
            return
        self._cmd_classified = None
        if self._ps is not None:  # nothing of an earlier command's statement work applies
            self._stmt = self._prep_id = self._ps.preparing = None
        if cmd == P.COM_QUERY or cmd == P.COM_STMT_EXECUTE:
            self.queries += 1  # QueryRequests
            self.request_started = self.last_active  # read at this data's arrival (latencies)
        else:
            self.request_started = None
        if cmd == P.COM_QUERY:
            if length > pinning.MAX_STATEMENT_BYTES:
                self._pin(pinning.PinReason.STATEMENT_TOO_LARGE)
            elif self._query(stream.peek(1, length)):
                return  # answered here
        elif cmd == P.COM_INIT_DB:
            self._cmd_classified = pinning.TrackedSet(
                {}, database=stream.peek(1, length).decode("utf-8", "replace"))
        elif cmd == P.COM_STMT_PREPARE:
            if self._ps is None:
                self._pin(pinning.PinReason.PREPARED_STATEMENT)
            else:
                if self._prepare_command(length, WHOLE_LIMIT):
                    return
                self._prep_id = PENDING_ID
        elif cmd == P.COM_SET_OPTION:
            self._pin(pinning.PinReason.SET_VARIABLE)
        elif cmd in STATEMENT_COMMANDS and self._ps is not None:
            if self._statement_command(cmd, length, WHOLE_LIMIT):
                return
        elif cmd in STATEMENT_COMMANDS:
            b = stream.buf
            if length >= 5:  # (all here: see _pump)
                stmt_id = b[5] | (b[6] << 8) | (b[7] << 16) | (b[8] << 24)
            else:  # a command shorter than its id: only its own bytes, never the next command's
                stmt_id = int.from_bytes(stream.peek(1, length).ljust(4, b"\x00"), "little")
            if stmt_id not in self._statements and not self._owns_statement(stmt_id):
                if cmd in NO_RESPONSE:  # COM_STMT_CLOSE/SEND_LONG_DATA: the server answers nothing
                    self._drop_command()
                else:
                    self._fail_command(errors.unknown_statement(stmt_id, cmd))
                return
            if cmd == P.COM_STMT_CLOSE:
                self._statements.discard(stmt_id)
        elif cmd in UNSUPPORTED:
            self._fail_command(P.err_packet(1047, "08S01", "Unknown command"))
            return
        self._cmd = cmd
        if self.lease is not None and self._wait is Wait.NOTHING:
            self._dispatch()
        else:
            self._borrow()

    def _query(self, sql):
        """Classify a COM_QUERY's text (here whole); -> True when it was answered here."""
        if self.ctx.debug_until:
            self.ctx.debug_statement(self, sql)
        kill = _KILL.match(sql) if b"ill" in sql[:16] or b"ILL" in sql[:16] else None
        if kill is not None:
            return self._kill(kill)  # KILL <id> alone: nothing in it to classify
        track_use = not self._schema_tracked()
        result = pinning.classify_query(sql, self._exclude_sets, track_use=track_use,
                                        **self._lexing())
        if isinstance(result, pinning.TrackedSet):
            bad = result.invalid_charset_client
            if bad is not None:
                seq, _ = self._stream.take_packet()
                self.write_packet(errors.bad_charset_client(bad), seq + 1)
                return True
            if self._set_here(result):
                seq, _ = self._stream.take_packet()
                self.write_packet(P.ok_packet(status=self._status()), seq + 1)
                self.request_done(self.last_active)  # answered in the read it arrived in
                return True
            self._cmd_classified = result
            if result.unsafe_charset_client is not None:
                self._check_charset(result.unsafe_charset_client)
        elif result is not None:
            if self.pin_reason is None:
                self.pin_statement = bytes(sql[:1024])  # shown masked by DescribeDBProxySessions
            self._pin(result, sql)
        return False

    def _pin(self, reason, sql=None):
        """Pin (ClientSession._pin), and keep the session's replay log (proxy/pin_move.py): a
        first pin by variables in a query starts one, any later pin is recorded in it or, when
        it is not a query (*sql* None: COM_STMT_PREPARE, a charset, ...), ends it.  Pinning
        paths only."""
        if self.pin_reason is None:
            super()._pin(reason)
            log = None
            limit = self.ctx.config.max_session_replay_size
            if sql is not None and limit and reason in MOVABLE_REASONS:
                log = ReplayLog(limit)
                if not log.record(sql, self._lexing()):
                    log = None
            self._replay = log
        elif self._replay is not None and (sql is None or not self._replay.record(sql, self._lexing())):
            self._replay = None

    def _set_here(self, tracked):
        """Whether a SET (classified *tracked*) is answered here, without a database: drivers
        send ``SET NAMES x`` and ``SET autocommit=N`` on every connect, and each cost a
        borrow and a database round trip.  The session's values are the proxy's to keep while
        it holds no connection; they reach a connection with the sync before its next command
        (autocommit alone travels with that command, `sync_inline`).

        Only when the server's answer is known in advance, byte for byte: one statement, no
        connection held (no transaction, not pinned), a client without CLIENT_SESSION_TRACK
        (else the server's OK would list the variables set), and every value either autocommit
        (0/1: always valid, no side effect outside a transaction) or exactly what the session
        has already (a no-op SET cannot fail).  Anything else goes to the database."""
        if (self.lease is not None or tracked.multi or tracked.database is not None
                or self.client_caps & P.CLIENT_SESSION_TRACK or not tracked.assignments):
            return False
        connector = self.ctx.connector
        collations = getattr(connector, "collations", None)
        server = getattr(connector, "server_info", None)
        if collations is None or server is None:
            return False
        self._resolve_charset_with(collations, server.charset)
        applied = mstate.apply_assignments({}, tracked.assignments, collations)
        for name, value in applied.items():
            if value is None:
                return False
            if name == "autocommit":
                if value not in ("0", "1"):
                    return False
            elif value != self._tracked_value(name):
                return False
        self.desired.update(applied)
        return True

    def _tracked_value(self, name):
        if name in self.desired:
            return self.desired[name]
        return (getattr(self.ctx.connector, "baseline", None) or {}).get(name)

    def _schema_tracked(self):
        """Whether the server reports this session's changes of database in its OK packets
        (CLIENT_SESSION_TRACK negotiated and session_track_schema on).  Otherwise USE is parsed
        here, and a change of database the proxy cannot follow pins the session."""
        return bool(self.client_caps & P.CLIENT_SESSION_TRACK) \
            and self._tracked_value("session_track_schema") != "0"

    def _lexing(self):
        """How the server will lex this session's next statement: its sql_mode and version
        (remembered while both stay the same: this runs for every query)."""
        mode = self._tracked_value("sql_mode")
        server = getattr(self.ctx.connector, "server_info", None)
        cached = self._lex_cache
        if cached is not None and cached[0] == mode and cached[1] is server:
            return cached[2]
        shared = _LEXINGS.get((mode, id(server)))  # the same for every session: once per proxy
        if shared is None or shared[0] is not server:
            ansi_quotes, no_backslash_escapes = pinning.sql_mode_flags(mode)
            options = {"ansi_quotes": ansi_quotes, "no_backslash_escapes": no_backslash_escapes,
                       "oracle": pinning.other_grammar(mode),
                       "server_version": version_id(server.server_version) if server else None}
            if len(_LEXINGS) >= 256:
                _LEXINGS.clear()
            shared = _LEXINGS[(mode, id(server))] = (server, options)
        self._lex_cache = (mode, server, shared[1])
        return shared[1]

    _lex_cache = None  # (sql_mode, greeting, classify_query's lexing arguments)

    def _owns_statement(self, stmt_id):
        if stmt_id == LAST_STATEMENT:  # MariaDB: "the statement prepared last on this connection"
            return bool(self._statements)
        return stmt_id in self._statements

    def _dispatch(self):
        """Send the command at the head of the stream to the leased connection."""
        conn = self.lease.conn
        stmt = self._stmt
        if stmt is not None:
            if not self._statement_ready(conn):
                return  # prepared there first (Wait.PREPARE), or answered
            self._stmt = None
        tracker = conn.tracker
        tracker.last_error = None
        if tracker.session_state_changes:
            tracker.session_state_changes = []
        tracker.expect(self._cmd)
        stream = self._stream
        self._answered = False
        seq = stream.buf[3] if stream.buf else None
        data = stream.take_if_whole()
        if data is not None:
            self._cmd_seq = seq  # one packet: a lost command can be answered in its place
            if stmt is not None:
                data = self._stmt_packet  # under the connection's id
        else:  # streamed: what is here now, the rest as it comes (_pump)
            self._cmd_seq = None
            stream.begin()
            self._relaying = True
            data = stream.take()
            if stream.at_boundary:
                self._relaying = False
            if stmt is not None:  # (_pump waited for its first 9 bytes)
                data = with_statement_id(data, self._stmt_id)
        if self._inline_sync is not None:
            inline, self._inline_sync = self._inline_sync, None
            data = inline + data
        conn.write(data)  # header and what is here of the body: one write
        if self._cmd in NO_RESPONSE:  # the lease stays until the next response completes
            self._wait = Wait.NOTHING
            self._cmd = None
        else:
            self._wait = Wait.RESPONSE

    def _kill(self, match):
        """`KILL [QUERY|CONNECTION] id` naming one of this proxy's sessions (the id a client got
        in the greeting).  -> True when handled here; False to forward the command unchanged
        (an id the proxy doesn't know is the server's business, or the command was rewritten).

        KILL QUERY becomes `KILL QUERY <thread id>` of the database connection serving that
        session now; KILL CONNECTION ends that client session.  As in MySQL, without privileges
        of its own a user may only kill its own sessions: here, sessions of the same user.
        """
        target_id = int(match.group(2))  # at most 20 digits (see _KILL)
        target = next((s for s in self.ctx.sessions if s.id == target_id), None)
        stream = self._stream
        if target is None:
            worker = self.ctx.worker
            if worker is None or worker.owner(target_id) == worker.index:
                return False
            self._kill_elsewhere(worker, target_id, (match.group(1) or b"").strip().lower() == b"query")
            return True
        if target.user != self.user:
            seq, _ = stream.take_packet()
            self.write_packet(P.err_packet(1095, "HY000", f"You are not owner of thread {target_id}"),
                              seq + 1)
            return True
        query_only = (match.group(1) or b"").strip().lower() == b"query"
        if not query_only:
            seq, _ = stream.take_packet()
            if target is self:
                self._close_client()
                return True
            self.log.info("{s}: KILL CONNECTION {t}", s=self, t=target)
            target._close_client()
            self.write_packet(P.ok_packet(status=self._status()), seq + 1)
            return True
        conn = target.lease.conn if target.lease is not None else None
        if conn is None or conn.handshake is None or target is self:
            seq, _ = stream.take_packet()  # nothing running there: nothing to kill
            self.write_packet(P.ok_packet(status=self._status()), seq + 1)
            return True
        # Rewrite the command in place; it then goes to the database like any query.
        seq, _ = stream.take_packet()
        payload = bytes((P.COM_QUERY,)) + b"KILL QUERY %d" % conn.handshake.connection_id
        stream.buf[:0] = P.encode_packet(payload, seq)
        return False

    def _kill_elsewhere(self, worker, target_id, query_only):
        """`Workers: N`: the id names a session of another worker process: ask that worker
        (workers/peer.py, bounded by its PEER_TIMEOUT); this session's next commands wait for
        the answer.  Never sent to the database as a thread id."""
        from txrdsproxy.workers.peer import forward_kill
        seq, _ = self._stream.take_packet()
        self._wait = Wait.PEER
        d = forward_kill(worker, worker.owner(target_id), query_only, target_id, self.ctx.name,
                         self.user, self.clock)
        d.addCallback(lambda answer: self._safely(self._killed_elsewhere, answer, target_id, seq))

    def _killed_elsewhere(self, answer, target_id, seq):
        if self._phase is not Phase.COMMAND or self._wait is not Wait.PEER:
            return  # the session ended meanwhile
        self._wait = Wait.NOTHING
        if answer.startswith(b"THREAD "):
            # KILL QUERY of the thread serving it there, on a connection of this session's
            # user, as for a session of this worker (see _kill).
            payload = bytes((P.COM_QUERY,)) + b"KILL QUERY %d" % int(answer[7:])
            self._stream.buf[:0] = P.encode_packet(payload, seq)
            self._cmd = P.COM_QUERY
            if self.lease is not None:
                self._dispatch()
            else:
                self._borrow()
            return
        if answer == b"OK":
            self.write_packet(P.ok_packet(status=self._status()), seq + 1)
        elif answer == b"NOT_OWNER":
            self.write_packet(P.err_packet(1095, "HY000", f"You are not owner of thread {target_id}"),
                              seq + 1)
        else:  # UNKNOWN, or the worker could not be asked (restarting)
            self.write_packet(errors.unknown_thread(target_id), seq + 1)
        self._pump()

    def _drop_command(self):
        """Drop the command at the head of the stream (as it arrives, when it is large)."""
        self._stream.begin()
        self._relaying = False
        self._stream.take()

    def _fail_command(self, err_payload):
        """Answer the command at the head of the stream with an error and drop it."""
        seq = self._stream.head()[2]
        self._drop_command()
        self._wait = Wait.NOTHING
        self._cmd = None
        self.write_packet(err_payload, seq + 1)

    # -- getting a connection: ClientSession.borrow's engine hooks -----------------------------------
    def _borrow(self):
        """The command at the head of the stream needs a connection: the held one (pinned, in a
        transaction) or one from the pool, brought to the session's tracked values first."""
        self._wait = Wait.BORROW
        self.borrow()

    def prepare_lease(self, conn):
        """Bring the connection to the session's tracked values (database, character set,
        variables); None when it has them already (no Deferred per command).  A pinned
        session moving off a former writer has its variables set there first (pin_move.py)."""
        if self._move is not None:
            move = self.take_move()
            if move is not None:
                return mysql_move.replay(conn, move, self._sync_moved)
        if self.charset_id is not None:  # (the handshake's, resolved at the first borrow only)
            self._resolve_charset(conn)
        desired = self._sync_values(conn)
        if not conn.needs_sync(desired, self.database):
            return None
        if self._cmd not in NO_RESPONSE:  # (its answer keeps the connection until the SET's)
            self._inline_sync = conn.sync_inline(desired, self.database)
            if self._inline_sync is not None:  # written with the command: no round trip
                return None
        return conn.sync(desired, self.database)

    def _sync_moved(self, conn):
        """The tracked values after a move's replay (never inline: the check follows)."""
        self._resolve_charset(conn)
        desired = self._sync_values(conn)
        if not conn.needs_sync(desired, self.database):
            return None
        return conn.sync(desired, self.database)

    def _sync_values(self, conn):
        """The tracked values *conn* must hold before the command at the head of the stream.

        The session's values, except those the command itself assigns when it is one SET of
        variables whose old value changes nothing about how the statement is read or answered
        (OVERWRITTEN): ``SET autocommit=0`` on a connection another session left at 0 needs no
        ``SET autocommit=1`` first (drivers send it on every connect: one database round trip
        per connect).  What the connection then holds is still known: an OK's status gives
        autocommit, and a SET that fails changes nothing (`mstate.learn`); a session that
        goes on sees its values synced before its next command as always."""
        self._overwritten = frozenset()
        classified = self._cmd_classified
        if (type(classified) is not pinning.TrackedSet or classified.multi
                or classified.database is not None):
            return self.desired
        skip = OVERWRITTEN.intersection(classified.assignments)
        if not skip:
            return self.desired
        self._overwritten = skip
        desired = dict(self.desired)
        current = conn.current
        for name in skip:
            desired[name] = current.get(name)  # None: not set at all by the sync
        return desired

    _overwritten = frozenset()  # variables the command on the wire sets, not synced before it
    _inline_sync = None  # a SET packet (conn.sync_inline) to write ahead of the command

    def attach_connection(self, conn, waited):
        conn.attach(self)
        self._dispatch()
        if waited:
            self._pump_safely()

    def refuse_request(self, error):
        self._fail_command(error)
        self._pump_safely()

    _ERRORS = {
        BorrowFailure.TIMEOUT: errors.borrow_timeout(),
        BorrowFailure.UNREACHABLE: P.err_packet(2013, "HY000", "Lost connection to the database"),
        BorrowFailure.SHUTTING_DOWN: P.err_packet(1053, "08S01", "Server shutdown in progress"),
        BorrowFailure.UNKNOWN: errors.unknown_error(),
    }

    def error_bytes(self, kind, failure):
        if kind is BorrowFailure.DATABASE_ERROR:
            return failure.value.payload
        if kind is BorrowFailure.UNREACHABLE and failure.check(NoReaderAvailable):
            return P.err_packet(1105, "HY000", failure.getErrorMessage())  # a READ_ONLY endpoint
        return self._ERRORS[kind]

    # -- database -> client (called by the backend connection) ---------------------------------------
    def backend_data(self, data):
        if self._prep_id is PENDING_ID:
            data = self._prepare_reply(data)
        self._answered = True
        if not direct_write(self.transport, data) and self.lease is not None:
            self.write_queued(self.lease.conn)

    def infile_requested(self):
        self._answered = True
        self._pump_safely()

    def response_complete(self, data=None):
        """*data*: the last bytes of the response, relayed first (the database connection's
        usual read: a whole response, relayed and ended in one call)."""
        conn = self.lease.conn
        if data is not None:
            if self._prep_id is PENDING_ID:
                data = self._prepare_reply(data)
            self._answered = True
            if not direct_write(self.transport, data):
                self.write_queued(conn)
        tracker = conn.tracker
        ok = tracker.last_error is None
        if (self._cmd_classified is None and not tracker.session_state_changes
                and not self._overwritten and self._cmd != P.COM_STMT_PREPARE):
            # The common case (a query that set nothing tracked): of what `mstate.learn`
            # reads, only autocommit (from the server status) can have changed.
            autocommit = "1" if tracker.status & P.SERVER_STATUS_AUTOCOMMIT else "0"
            if self.desired.get("autocommit") != autocommit:
                self.desired["autocommit"] = autocommit
            if conn.current.get("autocommit") != autocommit:
                conn.current["autocommit"] = autocommit
            self._wait = Wait.NOTHING
            self._cmd = None
            if self.request_started is not None:
                self.request_done(self.clock.seconds())
            if self.pin_reason is None or self._draining:  # (else _maybe_release does nothing)
                self._maybe_release()
            if self._stream.buf or self._paused:  # else _pump has nothing to do
                self._pump_safely()
            return
        learned = mstate.learn(self._cmd_classified, not ok, tracker.take_session_state_changes(),
                               tracker.status, conn.connector.collations)
        overwritten, self._overwritten = self._overwritten, frozenset()
        for name, value in learned.values.items():
            if ok or name not in overwritten:
                # (a failed SET the connection was not synced for: the value there is another
                # session's, which this one must not adopt)
                self.desired[name] = value
            if value is None:
                conn.current.pop(name, None)
            else:
                conn.current[name] = value
        if "character_set_client" in learned.values:
            self._check_charset()
        if learned.database is not mstate.UNCHANGED:
            self.database = conn.database = learned.database
        if learned.pin is not None:
            self._pin(learned.pin)
        if self._cmd == P.COM_STMT_PREPARE:
            if self._ps is not None:
                self._prepare_answered(conn, tracker, ok)
            elif ok and tracker.last_prepare is not None:
                self._statements.add(tracker.last_prepare[0])
        self._wait = Wait.NOTHING
        self._cmd = self._cmd_classified = None
        if self.request_started is not None:
            self.request_done(self.clock.seconds())
        self._maybe_release()
        self._pump_safely()

    # -- moving off a former writer (proxy/pin_move.py; what moves: wire/mysql/replay.py) ------
    def replay_log(self):
        return self._replay

    def detach_for_move(self, conn):
        self._detach(conn)
        self._wait = Wait.BORROW  # the client's next command waits for the new connection

    def capture_state(self, conn, log):
        return mysql_move.capture(conn, log)

    def after_move(self):
        self._wait = Wait.NOTHING
        self._pump_safely()

    def replay_failed(self, why):
        self._fatal(errors.replay_failed(why), 0)

    def _maybe_release(self):
        """Give the connection back when nothing ties the session to it: no pin, no open
        transaction, no response outstanding, and no command begun on it but not written whole."""
        lease = self.lease
        if lease is None or self._wait is not Wait.NOTHING or self._relaying:
            return
        if self.pin_reason is not None:
            if self._draining:
                # asked to end (proxy stopping, former writer): at this boundary, in the turn
                # that forwarded the answer, when no transaction is open (drain decides)
                self.drain()
            return
        tracker = lease.conn.tracker
        if tracker.idle and not tracker.in_transaction:
            self._release()
        elif tracker.presumed_open and tracker.idle and self.desired.get("autocommit", "1") == "1":
            # An ERR on a connection at autocommit=0 that this session never chose (its own
            # `SET autocommit=0` failed on a connection another session left at 0): nothing of
            # this session ran there as a transaction.
            tracker.status &= ~P.SERVER_STATUS_IN_TRANS
            self._release()

    def _release(self, needs_reset=False):
        lease, self.lease = self.lease, None
        conn = lease.conn
        self._detach(conn)
        if self._paused:  # uncoupling resumed the client: its own backlog still says pause
            self.transport.pauseProducing()
        if _strayed(conn):
            lease.release(clean=False, reason="a database was selected on a connection of"
                                              " sessions without one")
        else:
            lease.release(clean=True, needs_reset=needs_reset)
        self.set_state(SessionState.IDLE)

# At most 20 digits: a longer number is no session id of ours (and int() of thousands of digits
# raises); such statements go to the server, which answers them itself.
_KILL = re.compile(rb"^\s*kill\s+(query\s+|connection\s+)?(\d{1,20})\s*;?\s*$", re.IGNORECASE)


# (sql_mode, id(greeting)) -> (greeting, classify_query's lexing arguments); never mutated
_LEXINGS = {}

# Tracked variables a single SET may assign without the connection being synced to the session's
# value first: neither the statement's parsing (sql_mode, character sets) nor the format of its
# answer (session_track_schema) depends on them.
OVERWRITTEN = frozenset(("autocommit", "time_zone"))

NO_DATABASE = "no-database"  # last element of the pool key of sessions without a database


def _strayed(conn):
    """A connection of sessions without a database now has one (cannot be undone)."""
    return NO_DATABASE in conn.key and conn.database is not None


class MySQLFrontendFactory(protocol.Factory):
    noisy = False  # no "Starting factory" log line per client connection

    def __init__(self, ctx):
        self.ctx = ctx

    def buildProtocol(self, addr):
        return MySQLFrontend(self.ctx)
