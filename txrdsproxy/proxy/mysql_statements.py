"""Prepared statements of a multiplexed MySQL session (SessionPinningFilters:
EXCLUDE_PREPARED_STATEMENTS): the part of MySQLFrontend that maps the ids its client knows to
the statements of whichever database connection serves it (wire/mysql/statements.py says how).

- COM_STMT_PREPARE goes to the database as any command, does not pin, and its answer reaches
  the client with an id of the proxy's (`_prepare_reply`); the statement is remembered by the
  session (text, parse context, parameter count, what executing it pins) and by the connection.
- COM_STMT_EXECUTE / RESET / FETCH / SEND_LONG_DATA name the statement by that id: on the
  connection that serves the command, the statement is prepared first when it is not there
  (an internal COM_STMT_PREPARE while the connection is detached; an error there answers the
  command), then the command goes with the connection's id, and an execute whose flag says
  "types as last bound" gets the session's types when the connection's statement had others.
- COM_STMT_CLOSE forgets the session's id (the connection keeps the statement for others).
- What keeps state on one connection pins, as without the filter: an execute that opens a cursor
  (and COM_STMT_FETCH), COM_STMT_SEND_LONG_DATA, an execute too large to read whole, and
  executing a statement whose text the classifier says pins (SET, temporary tables, ...).

A statement is prepared again only in the context it was first prepared in (database,
sql_mode, character sets): a session that changed them since gets an error rather than a
statement read differently (docs/errors.md).
"""

from twisted.python.failure import Failure

from txrdsproxy.proxy.connector import BackendGone
from txrdsproxy.proxy.mysql_backend import DatabaseError
from txrdsproxy.wire.mysql import errors
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql import pinning
from txrdsproxy.wire.mysql import statements as S
from txrdsproxy.wire.mysql.commands import NO_RESPONSE

MAX_PER_SESSION = 16382  # statements one session may hold (MariaDB's max_prepared_stmt_count default)
# Bytes of statement texts one session keeps to prepare them elsewhere.  Without it a client
# could make the proxy hold MAX_PER_SESSION texts of up to 64 KiB (1 GiB) while the server holds
# 64 of them; past it the session's next prepare pins it, as a text too long to keep does.
MAX_TEXT_BYTES = 1 << 20
LAST_STATEMENT = 0xFFFFFFFF  # MariaDB: the statement prepared last on this connection
PENDING_ID = object()  # MySQLFrontend._prep_id: the next PREPARE_OK relayed gets an id of ours
UNKNOWN_TYPES = b"?"  # the types a large execute may have bound (not read): same on both sides
# Commands that leave state on the connection's statement (a cursor, long data) or bind types
# the proxy does not read (bulk): they pin.
_PINNING_COMMANDS = (P.COM_STMT_FETCH, P.COM_STMT_SEND_LONG_DATA, P.COM_STMT_BULK_EXECUTE)


class SessionStatements:
    """The statements of one multiplexed session: client id -> S.Statement."""

    __slots__ = ("by_id", "next_id", "last_id", "preparing", "text_bytes")

    def __init__(self):
        self.by_id = {}
        self.text_bytes = 0     # sum of the kept texts' lengths (MAX_TEXT_BYTES)
        self.next_id = 1
        self.last_id = None     # the id of the last successful prepare (LAST_STATEMENT)
        self.preparing = None   # (sql or None, pin) of the COM_STMT_PREPARE on the wire

    def new_id(self):
        stmt_id = self.next_id
        self.next_id = stmt_id + 1 if stmt_id < 0xFFFFFFFE else 1
        return stmt_id

    def clear(self):
        self.by_id.clear()
        self.last_id = None
        self.text_bytes = 0

    def forget(self, stmt_id):
        st = self.by_id.pop(stmt_id)
        if st.sql is not None:
            self.text_bytes -= len(st.sql)


class StatementRouting:
    """Mixed into MySQLFrontend (which holds `_ps`, `_stmt`, `_stmt_packet`, `_prep_id`)."""

    __slots__ = ()

    # -- COM_STMT_PREPARE -------------------------------------------------------------------------
    def _prepare_command(self, length, whole_limit):
        """A multiplexed session's COM_STMT_PREPARE at the head of the stream.  -> True when
        it was answered here (the session holds MAX_PER_SESSION statements)."""
        if len(self._ps.by_id) >= MAX_PER_SESSION:
            self._fail_command(errors.too_many_statements(MAX_PER_SESSION))
            return True
        if length > whole_limit or self._ps.text_bytes + length > MAX_TEXT_BYTES:
            # text too long to keep for a prepare elsewhere (or past the session's budget): stay here
            self._ps.preparing = (None, None)
            self._pin(pinning.PinReason.PREPARED_STATEMENT)
            return False
        sql = self._stream.peek(1, length)
        verdict = pinning.classify_query(sql, self._exclude_sets,
                                         track_use=not self._schema_tracked(), **self._lexing())
        if verdict is not None and not isinstance(verdict, pinning.PinReason):
            verdict = pinning.PinReason.SET_VARIABLE  # a SET (or USE) of values not known yet
        self._ps.preparing = (sql, verdict)
        return False

    def _prepare_reply(self, data):
        """The first bytes of a COM_STMT_PREPARE's answer: the PREPARE_OK (whole: the tracker
        reads it whole) gets an id of the proxy's."""
        self._prep_id = None
        if len(data) >= 9 and data[4] == 0x00:
            self._prep_id = self._ps.new_id()
            data = S.with_statement_id(data, self._prep_id)
        return data

    def _prepare_answered(self, conn, tracker, ok):
        ps = self._ps
        if ps.preparing is None:
            return
        sql, verdict = ps.preparing
        ps.preparing = None
        stmt_id, self._prep_id = self._prep_id, None
        if not ok or tracker.last_prepare is None or stmt_id is None:
            ps.last_id = None  # "the last prepared" names none after a failed prepare
            return
        server_id, columns, params = tracker.last_prepare
        key = S.prepare_key(sql, conn.database, conn.current) if sql is not None \
            else (None, server_id)  # kept on this (pinned) connection only
        ps.by_id[stmt_id] = S.Statement(sql, key, params, columns, verdict)
        if sql is not None:
            ps.text_bytes += len(sql)
        ps.last_id = stmt_id
        conn.remember_statement(key, server_id, params)

    # -- commands naming a statement --------------------------------------------------------------
    def _statement_command(self, cmd, length, whole_limit):
        """A multiplexed session's COM_STMT_* at the head of the stream.  -> True when it was
        handled here (refused, dropped, closed); else it goes to a connection (`_dispatch`)."""
        stream = self._stream
        buf = stream.buf
        stmt_id = (buf[5] | (buf[6] << 8) | (buf[7] << 16) | (buf[8] << 24)) if length >= 5 \
            else None
        if stmt_id == LAST_STATEMENT:
            stmt_id = self._ps.last_id
        st = self._ps.by_id.get(stmt_id)
        if st is None:
            if cmd in NO_RESPONSE:
                self._drop_command()
            else:
                shown = stmt_id if stmt_id is not None else 0
                self._fail_command(errors.unknown_statement(shown, cmd))
            return True
        if cmd == P.COM_STMT_CLOSE:
            self._ps.forget(stmt_id)
            self._drop_command()
            return True
        pin = None
        if cmd in _PINNING_COMMANDS or length > whole_limit:
            pin = pinning.PinReason.PREPARED_STATEMENT
        elif cmd == P.COM_STMT_EXECUTE:
            if length < 6 or buf[9]:  # a cursor (or a flag the proxy does not know)
                pin = pinning.PinReason.PREPARED_STATEMENT
            elif st.pin is not None:
                pin = st.pin
        if pin is not None and self.pin_reason is None:
            self._pin(pin)
        self._stmt = (st, cmd, pin is not None)
        return False

    def _statement_ready(self, conn):
        """Before `_dispatch` sends the statement command at the head of the stream on *conn*:
        -> True with `_stmt_packet` set (the whole command to send, or None for a streamed one
        whose id `_dispatch` rewrites); False when it waits for a prepare there or was answered."""
        st, cmd, keep = self._stmt
        entry = conn.statements.get(st.key)
        if entry is None:
            if st.sql is None or S.prepare_key(st.sql, conn.database, conn.current) != st.key:
                self._statement_failed(errors.statement_context_changed())
                return False
            self._wait = self.WAIT_PREPARE
            conn.detach()  # the answer is read as an internal command's
            d = conn.prepare_statement(st.key, st.sql)
            d.addCallbacks(self._statement_prepared, self._statement_not_prepared,
                           callbackArgs=(conn,), errbackArgs=(conn,))
            d.addErrback(self.unexpected, "preparing a statement")
            return False
        if keep:
            entry.keep = True
        stream = self._stream
        buf = stream.buf
        length = buf[0] | (buf[1] << 8) | (buf[2] << 16)
        whole = stream.whole()
        if (cmd == P.COM_STMT_EXECUTE and not whole) or cmd == P.COM_STMT_BULK_EXECUTE:
            # types this command may bind are not read: those the server holds must be the
            # session's already, and are unknown on both sides afterwards (pinned here)
            if st.params:
                if st.types is not None and entry.types != st.types:
                    self._statement_failed(errors.statement_types_unknown())
                    return False
                st.types = entry.types = UNKNOWN_TYPES
        self._stmt_id = entry.server_id
        if not whole:  # streamed (large): `_dispatch` rewrites the id in its first bytes
            self._stmt_packet = None
            return True
        packet = bytes(buf[:4 + length])
        out = S.with_statement_id(packet, entry.server_id)
        if cmd == P.COM_STMT_EXECUTE and st.params and st.types is not UNKNOWN_TYPES:
            bound = S.bound_types(packet, st.params)
            if bound is None:
                pass  # too short to read: the server refuses it as it is
            elif bound[0] == 1:
                st.types = entry.types = bound[1]
            elif st.types is not None and entry.types != st.types:
                out = S.with_types(out, st.params, st.types)
                if out is None:
                    self._statement_failed(errors.statement_types_unknown())
                    return False
                entry.types = st.types
        self._stmt_packet = out
        return True

    def _statement_prepared(self, entry, conn):
        if not self._still_preparing(conn):
            return
        conn.attach(self)
        self._wait = self.WAIT_NOTHING
        self._safely(self._dispatch)

    def _statement_not_prepared(self, failure, conn):
        if not self._still_preparing(conn):
            return
        if failure.check(DatabaseError):  # the database refused the text (table gone, ...)
            conn.attach(self)
            self._wait = self.WAIT_NOTHING
            self._safely(self._statement_failed, failure.value.payload)
            self._pump_safely()
            return
        if not isinstance(failure, Failure) or not failure.check(BackendGone):
            self.log.failure("{s}: preparing a statement failed", failure, s=self)
        self.backend_lost(conn, failure.getErrorMessage())

    def _still_preparing(self, conn):
        lease = self.lease
        return (self._wait is self.WAIT_PREPARE and lease is not None and lease.conn is conn
                and self._phase is self.PHASE_COMMAND)

    def _statement_failed(self, err_payload):
        """Answer the statement command at the head of the stream with *err_payload* (dropped
        unanswered when the server would not answer it either)."""
        _, cmd, _ = self._stmt
        self._stmt = None
        self._cmd = None
        if self._inline_sync is not None:  # the SET that was to go with it stays unsent
            self._inline_sync = None
            self.lease.conn.cancel_inline_sync()
        self.request_started = None
        if cmd in NO_RESPONSE:
            self._drop_command()
        else:
            self._fail_command(err_payload)
        self._maybe_release()
