"""Track where each server response ends, for multiplexing backend connections.

The proxy forwards a client command to a pooled MariaDB/MySQL connection and
relays the reply.  It may hand the connection back to the pool only when
(a) the reply is complete and (b) the last OK/EOF status says no transaction
is open.  :class:`ResponseTracker` answers both while looking at no more than
the first byte and length of each packet; only OK, ERR and EOF packets (a few
per response) are decoded.

Driving it (backend side)::

    tracker = ResponseTracker(backend_capabilities, status=handshake.status)
    tracker.expect(command_byte)          # when forwarding a client command
    end = tracker.consume(buf, pos)       # server bytes; forward buf[pos:end]
    if tracker.awaiting_client_data:      # LOCAL INFILE: relay client packets,
        tracker.client_packet(length)     # telling the tracker each length
    if tracker.idle and not tracker.in_transaction: release the lease

``consume`` walks complete *physical* packets in place and stops just after the
packet that completes the last outstanding response (bytes after that are
unsolicited).  ``feed(payload)`` is the same for one logical packet.

``capabilities`` must be those negotiated on the *backend* connection, and
the client's must agree on CLIENT_DEPRECATE_EOF, CLIENT_SESSION_TRACK,
CLIENT_MULTI_RESULTS/PS_MULTI_RESULTS and CLIENT_LOCAL_FILES, since the bytes
are relayed unchanged.  MariaDB's MARIADB_CLIENT_CACHE_METADATA and MySQL's
CLIENT_OPTIONAL_RESULTSET_METADATA must not be negotiated.

Not handled here: COM_CHANGE_USER (an auth exchange; the proxy intercepts it
and never forwards it), replication commands (COM_BINLOG_DUMP*,
COM_REGISTER_SLAVE) and other obsolete commands.  ``expect`` raises
:class:`UnsupportedCommand` for them.  MariaDB progress reports
(ERR 0xFFFF) only arrive when MARIADB_CLIENT_PROGRESS is negotiated; don't.
"""

from collections import deque

from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.packets import ProtocolError


class UnsupportedCommand(ProtocolError):
    """A command whose response the tracker cannot follow (see module doc)."""


# states
IDLE = 0
FIRST = 1          # first packet of a (possibly result-set) response
COLDEFS = 2        # counting column/parameter definitions
DEFS_EOF = 3       # the EOF after a definitions block (no DEPRECATE_EOF)
ROWS = 4           # rows (text or binary) until EOF/OK-0xFE or ERR
INFILE = 5         # LOCAL INFILE: the client is sending file data
PREPARE_FIRST = 6  # COM_STMT_PREPARE_OK or ERR
ONE_PACKET = 7     # COM_STATISTICS: one raw string packet

# what a definitions block belongs to
_RESULTSET, _PARAMS, _COLUMNS = 0, 1, 2

NO_RESPONSE = frozenset({P.COM_QUIT, P.COM_STMT_CLOSE, P.COM_STMT_SEND_LONG_DATA})
UNSUPPORTED = frozenset({P.COM_CHANGE_USER, P.COM_BINLOG_DUMP, P.COM_BINLOG_DUMP_GTID,
                         P.COM_REGISTER_SLAVE, P.COM_TABLE_DUMP, P.COM_CONNECT_OUT,
                         P.COM_DAEMON})
_EOF_REPLIES = frozenset({P.COM_SET_OPTION, P.COM_DEBUG, P.COM_SHUTDOWN})


class ResponseTracker:
    """Follows server responses on one backend connection.

    Attributes read by the proxy (valid when ``idle``):

    ``status``: last server status flags seen in an OK/EOF.
    ``in_transaction``: ``status & SERVER_STATUS_IN_TRANS``.
    ``session_state_changes``: ``(type, value)`` entries from OK packets since
        the last :meth:`take_session_state_changes` (see packets.parse_session_state).
    ``last_error``: the last ERR seen (``packets.ERR``) or None.
    ``last_prepare``: ``(statement_id, num_columns, num_params)`` of the last
        successful COM_STMT_PREPARE.
    ``completed``: number of responses completed so far.
    """

    def __init__(self, capabilities, status=P.SERVER_STATUS_AUTOCOMMIT):
        self.capabilities = capabilities
        self.deprecate_eof = bool(capabilities & P.CLIENT_DEPRECATE_EOF)
        # A 0xFE packet shorter than this ends a result set.  Legacy EOF is
        # 5 bytes, and a row can only begin with 0xFE (8-byte length) if it
        # is >= 9 bytes.  A DEPRECATE_EOF terminator is an OK packet that may
        # carry info/session state, so any length below 0xFFFFFF counts (a
        # row starting with 0xFE is then >= 16 MiB, i.e. a continued packet).
        self._eof_limit = P.MAX_PACKET_CHUNK if self.deprecate_eof else 9
        # OK packets have status and warnings after the two ids (consume reads short ones inline)
        self._ok_inline = bool(capabilities & P.CLIENT_PROTOCOL_41)
        self.status = status
        self.session_state_changes = []
        self.last_error = None
        # IN_TRANS set by an ERR under autocommit off (`_error`), not read from the server;
        # cleared by the next status the server sends.
        self.presumed_open = False
        self.last_prepare = None
        self.completed = 0
        self._state = IDLE
        self._command = None
        self._queue = deque()
        self._remaining = 0
        self._defs_kind = _RESULTSET
        self._prep_columns = 0
        self._cont = False          # inside a continued (0xFFFFFF) server packet
        self._row_left = 0          # bytes of a row packet (or continuation) still to stream
        self._client_cont = False   # same, for LOCAL INFILE client data

    # --- public properties -------------------------------------------------------------
    @property
    def idle(self):
        """No response outstanding (and not mid-packet)."""
        return self._state == IDLE and not self._cont and not self._row_left

    @property
    def in_transaction(self):
        return bool(self.status & P.SERVER_STATUS_IN_TRANS)

    @property
    def awaiting_client_data(self):
        """LOCAL INFILE in progress: the client's packets go to the server."""
        return self._state == INFILE

    @property
    def command(self):
        """The command whose response is being read, or None."""
        return self._command if self._state != IDLE else None

    def take_session_state_changes(self):
        changes, self.session_state_changes = self.session_state_changes, []
        return changes

    # --- driving ---------------------------------------------------------------------------
    def expect(self, command, payload_prefix=b""):
        """Note that the client command ``command`` was sent to the server.

        Commands may be pipelined: responses are matched in order.  Commands
        without a response (COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA)
        change nothing.  ``payload_prefix`` is accepted for callers that have
        it; the tracker needs only the command byte.
        """
        if command in NO_RESPONSE:
            return
        if command in UNSUPPORTED:
            raise UnsupportedCommand("command 0x%02x is not relayed" % command)
        self.presumed_open = False
        if self._state != IDLE:
            self._queue.append(command)
        elif command == P.COM_QUERY or command == P.COM_STMT_EXECUTE:  # (_begin, inline)
            self._command = command
            self._state = FIRST
        else:
            self._begin(command)

    def _begin(self, command):
        self._command = command
        if command == P.COM_STMT_PREPARE:
            self._state = PREPARE_FIRST
        elif command in (P.COM_FIELD_LIST, P.COM_STMT_FETCH):
            self._state = ROWS
        elif command == P.COM_STATISTICS:
            self._state = ONE_PACKET
        else:
            self._state = FIRST

    def _complete(self):
        self.completed += 1
        if self._queue:
            self._begin(self._queue.popleft())
        else:
            self._state = IDLE
            self._command = None

    def feed(self, payload):
        """Process one *logical* server packet; returns ``self.idle``."""
        if self._state == IDLE:
            raise ProtocolError("unexpected packet from server while idle")
        self._packet(payload, 0, len(payload))
        return self.idle

    def consume(self, buf, pos=0, end=None):
        """Process complete physical packets in ``buf[pos:end]``.

        Returns the offset just past the last byte processed: everything
        before it belongs to the outstanding responses and can be forwarded.
        Stops after the packet that leaves the tracker idle.  Allocates
        nothing per row packet.  Rows (and continuation fragments) are
        streamed: once a row packet's header and first byte are here, what is
        here of it is returned as processed, so a 16 MiB row never has to sit
        whole in the proxy.  Raises :class:`ProtocolError` for packets that
        cannot belong to the expected response (close the connection).
        """
        if end is None:
            end = len(buf)
        eof_limit = self._eof_limit
        ok_inline = self._ok_inline
        while True:
            if self._row_left:
                step = min(self._row_left, end - pos)
                pos += step
                self._row_left -= step
                if self._row_left:
                    break
                if self._state == IDLE and not self._cont:
                    break
                continue
            if end - pos < 4:
                break
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            nxt = pos + 4 + length
            if nxt > end:
                if self._cont or (self._state == ROWS and end - pos > 4 and not (
                        (buf[pos + 4] == 0xFE and length < eof_limit) or buf[pos + 4] == 0xFF)):
                    # A row (or a fragment of one) only part of which is here: stream it.
                    self._cont = length == P.MAX_PACKET_CHUNK
                    self._row_left = nxt - end
                    pos = end
                break
            if self._cont:
                self._cont = length == P.MAX_PACKET_CHUNK
            else:
                state = self._state
                self._cont = length == P.MAX_PACKET_CHUNK
                first = buf[pos + 4] if length else -1
                # The packets of every result set are handled inline (no call per packet):
                # rows, column definitions, a one-byte column count, legacy EOFs.  Everything
                # else (OK, ERR, LOCAL INFILE, PREPARE_OK, ...) goes through _packet.
                if length == 7 and ok_inline and buf[pos + 5] < 0xFB and buf[pos + 6] < 0xFB and (
                        (first == 0xFE and state == ROWS and self.deprecate_eof)
                        or (first == 0x00 and state == FIRST)):
                    # The usual end of a response: an OK (or DEPRECATE_EOF terminator) of one-
                    # byte affected rows and insert id, status and warnings, and nothing else
                    # (no info, no session state): what `_ok` reads of it, read inline.
                    status = self.status = buf[pos + 7] | (buf[pos + 8] << 8)
                    if status & P.SERVER_MORE_RESULTS_EXISTS:
                        self._state = FIRST
                    elif self._queue:
                        self._complete()
                    else:  # (_complete, inline)
                        self.completed += 1
                        self._state = IDLE
                        self._command = None
                elif state == ROWS:
                    if first == 0xFE and length < eof_limit:
                        if self.deprecate_eof:
                            self._packet(buf, pos + 4, length)
                        else:  # legacy EOF (_end_of_resultset)
                            if length >= 5:
                                self.status = buf[pos + 7] | (buf[pos + 8] << 8)
                            if self.status & P.SERVER_MORE_RESULTS_EXISTS:
                                self._state = FIRST
                            elif self._queue:
                                self._complete()
                            else:  # (_complete, inline)
                                self.completed += 1
                                self._state = IDLE
                                self._command = None
                    elif first == 0xFF:
                        self._packet(buf, pos + 4, length)
                    # else: a row, nothing to do
                elif state == COLDEFS and first != 0xFF:
                    self._remaining -= 1
                    if self._remaining == 0:
                        if self.deprecate_eof:
                            self._after_defs(None)
                        else:
                            self._state = DEFS_EOF
                elif state == DEFS_EOF and first == 0xFE and length < 9:
                    status = self.status if length < 5 else buf[pos + 7] | (buf[pos + 8] << 8)
                    if self._defs_kind == _RESULTSET and not status & P.SERVER_STATUS_CURSOR_EXISTS:
                        self.status = status  # (_after_defs, inline: the rows come next)
                        self._state = ROWS
                    else:
                        self._after_defs(status)
                elif state == FIRST and 0 < first < 0xFB:
                    # a result set of < 251 columns (_start_defs, inline)
                    self._defs_kind = _RESULTSET
                    self._remaining = first
                    self._state = COLDEFS
                elif state == IDLE:
                    raise ProtocolError("unexpected packet from server while idle")
                else:
                    self._packet(buf, pos + 4, length)
            pos = nxt
            if self._state == IDLE and not self._cont:
                break
        return pos

    def client_packet(self, length):
        """Report one physical client packet relayed during LOCAL INFILE."""
        if self._state != INFILE:
            raise ProtocolError("client data outside LOCAL INFILE")
        if length == 0 and not self._client_cont:
            self._state = FIRST  # now the server answers OK or ERR
        self._client_cont = length == P.MAX_PACKET_CHUNK

    # --- the state machine ---------------------------------------------------------------
    def _packet(self, buf, start, length):
        state = self._state
        first = buf[start] if length else -1
        if state == ROWS:
            if first == 0xFE and length < self._eof_limit:
                self._end_of_resultset(buf, start, length)
            elif first == 0xFF:
                self._error(buf, start, length)
        elif state == COLDEFS:
            if first == 0xFF:
                self._error(buf, start, length)
                return
            self._remaining -= 1
            if self._remaining == 0:
                if self.deprecate_eof:
                    self._after_defs(None)
                else:
                    self._state = DEFS_EOF
        elif state == DEFS_EOF:
            if first == 0xFE and length < 9:
                status = self._eof_status(buf, start, length)
                self._after_defs(status)
            elif first == 0xFF:
                self._error(buf, start, length)
            else:
                raise ProtocolError("expected EOF after definitions")
        elif state == FIRST:
            self._first(buf, start, length, first)
        elif state == PREPARE_FIRST:
            if first == 0x00:
                self._prepare_ok(buf, start, length)
            elif first == 0xFF:
                self._error(buf, start, length)
            else:
                raise ProtocolError("unexpected COM_STMT_PREPARE response")
        elif state == ONE_PACKET:
            self._complete()
        elif state == INFILE:
            raise ProtocolError("server packet while client sends LOCAL INFILE data")
        else:
            raise ProtocolError("unexpected packet from server while idle")

    def _first(self, buf, start, length, first):
        if first == 0x00:
            self._ok(buf, start, length)
        elif first == 0xFF:
            self._error(buf, start, length)
        elif first == 0xFB:
            if self._command != P.COM_QUERY:
                raise ProtocolError("LOCAL INFILE request outside COM_QUERY")
            self._state = INFILE
            self._client_cont = False
        elif first == 0xFE:
            if self._command in _EOF_REPLIES and length < 9:
                self.status = self._eof_status(buf, start, length)
                self._complete()
            else:
                raise ProtocolError("unexpected 0xFE packet at start of response")
        elif first == -1:
            raise ProtocolError("empty packet at start of response")
        else:
            count, _ = P.read_lenenc_int(bytes(buf[start:start + min(length, 9)]), 0)
            if not count:
                raise ProtocolError("bad column count")
            self._start_defs(count, _RESULTSET)

    def _start_defs(self, count, kind):
        self._defs_kind = kind
        self._remaining = count
        self._state = COLDEFS

    def _after_defs(self, eof_status):
        if eof_status is not None:
            self.status = eof_status
        kind = self._defs_kind
        if kind == _RESULTSET:
            if (eof_status is not None and eof_status & P.SERVER_STATUS_CURSOR_EXISTS
                    and self._command == P.COM_STMT_EXECUTE):
                self._complete()  # cursor opened: rows come via COM_STMT_FETCH
            else:
                self._state = ROWS
        elif kind == _PARAMS and self._prep_columns:
            self._start_defs(self._prep_columns, _COLUMNS)
        else:
            self._complete()

    def _prepare_ok(self, buf, start, length):
        if length < 12:
            raise ProtocolError("truncated COM_STMT_PREPARE_OK")
        b = buf
        stmt_id = b[start + 1] | b[start + 2] << 8 | b[start + 3] << 16 | b[start + 4] << 24
        columns = b[start + 5] | b[start + 6] << 8
        params = b[start + 7] | b[start + 8] << 8
        self.last_prepare = (stmt_id, columns, params)
        self._prep_columns = columns
        if params:
            self._start_defs(params, _PARAMS)
        elif columns:
            self._start_defs(columns, _COLUMNS)
        else:
            self._complete()

    def _eof_status(self, buf, start, length):
        if length < 5:
            return self.status
        return buf[start + 3] | (buf[start + 4] << 8)

    def _ok(self, buf, start, length):
        ok = P.parse_ok(bytes(buf[start:start + length]), self.capabilities)
        self.status = ok.status
        if ok.session_state_changes:
            self.session_state_changes.extend(ok.session_state_changes)
        if ok.status & P.SERVER_MORE_RESULTS_EXISTS:
            self._state = FIRST
        else:
            self._complete()

    def _end_of_resultset(self, buf, start, length):
        if self.deprecate_eof:
            self._ok(buf, start, length)  # OK packet with a 0xFE header
            return
        self.status = self._eof_status(buf, start, length)
        if self.status & P.SERVER_MORE_RESULTS_EXISTS:
            self._state = FIRST
        else:
            self._complete()

    def _error(self, buf, start, length):
        self.last_error = P.parse_err(bytes(buf[start:start + length]))
        # An ERR carries no status.  With autocommit off, the failed statement may have started
        # a transaction that stays open (a query killed in its rows, a failed INSERT as the
        # first statement); the status seen before it says nothing of that.  Count it as open
        # until the next OK/EOF says otherwise, so the connection is neither released to
        # another session nor returned to the pool without its ROLLBACK.
        if not self.status & P.SERVER_STATUS_AUTOCOMMIT and not self.status & P.SERVER_STATUS_IN_TRANS:
            self.status |= P.SERVER_STATUS_IN_TRANS
            self.presumed_open = True
        self._complete()  # an ERR ends the whole response, more results or not
