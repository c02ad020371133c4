"""A blocking MySQL client built from the proxy's own sans-I/O pieces, for tests that need exact
control of the bytes (split commands) or see what the proxy sees (session-state tracking).

`RawMySQL(host, port, user, password, database=None)` logs in (mysql_native_password, with
CLIENT_SESSION_TRACK, DEPRECATE_EOF and multi-statements); `query(sql)` returns the text rows of
the last result set and keeps the OK packets' session-state changes in `changes`; `send(raw)`
writes raw bytes.  A DatabaseError carries the server's ERR.
"""

import socket

from txrdsproxy.proxy.mysql_backend import DatabaseError, _InternalOp, _Part
from txrdsproxy.wire.mysql import auth as myauth
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.commands import ResponseTracker

CAPS = (P.CLIENT_LONG_PASSWORD | P.CLIENT_LONG_FLAG | P.CLIENT_PROTOCOL_41 | P.CLIENT_TRANSACTIONS
        | P.CLIENT_SECURE_CONNECTION | P.CLIENT_PLUGIN_AUTH | P.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | P.CLIENT_MULTI_STATEMENTS | P.CLIENT_MULTI_RESULTS | P.CLIENT_SESSION_TRACK
        | P.CLIENT_DEPRECATE_EOF)


class RawMySQL:
    def __init__(self, host, port, user, password, database=None, caps=CAPS, timeout=30):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = P.PacketReader(1 << 26)
        self.pending = []
        seq, payload = self.packet()
        greeting = hs.parse_handshake_v10(payload)
        self.server_version = greeting.server_version
        self.thread_id = greeting.connection_id
        self.caps = caps & greeting.capabilities
        if database:
            self.caps |= P.CLIENT_CONNECT_WITH_DB
        response = myauth.auth_response_for(hs.NATIVE_PASSWORD, password, greeting.scramble)
        packet = hs.build_handshake_response41(self.caps, user, response, database=database,
                                               auth_plugin=hs.NATIVE_PASSWORD)
        self.sock.sendall(P.encode_packet(packet, seq + 1))
        while True:
            seq, payload = self.packet()
            if payload[:1] == b"\x00":
                self.status = P.parse_ok(payload, self.caps).status
                break
            if payload[:1] == b"\xff":
                raise DatabaseError(payload)
            if payload[:1] == b"\xfe":
                switch = hs.parse_auth_switch_request(payload)
                answer = myauth.auth_response_for(switch.plugin, password, switch.data)
                self.sock.sendall(P.encode_packet(answer, seq + 1))
                continue
            raise AssertionError(f"unexpected login packet {payload[:1]!r}")
        self.changes = []

    def packet(self):
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("connection closed")
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def send(self, raw):
        self.sock.sendall(raw)

    def command(self, cmd, arg=b""):
        self.send(P.encode_packet(bytes((cmd,)) + arg, 0))
        return self.read_response(cmd)

    def query(self, sql):
        return self.command(P.COM_QUERY, sql.encode() if isinstance(sql, str) else sql)

    def read_response(self, cmd=P.COM_QUERY):
        """Rows of the response to *cmd* (multi-results: of the last result set); raises
        DatabaseError for an ERR.  OK packets' session-state changes go to `changes`."""
        op = _InternalOp(None, bool(self.caps & P.CLIENT_DEPRECATE_EOF))
        tracker = ResponseTracker(self.caps)
        tracker.expect(cmd)
        rows_seen = []
        while True:
            _, payload = self.packet()
            tracker.feed(payload)
            if op.phase is _Part.FIRST and op.rows:
                rows_seen, op.rows = op.rows, []
            done = op.feed(payload, self.caps)
            if done:
                break
        self.status = tracker.status
        self.changes.extend(tracker.take_session_state_changes())
        if op.error is not None:
            raise DatabaseError(op.error)
        return op.rows or rows_seen

    def close(self):
        try:
            self.send(P.encode_packet(bytes((P.COM_QUIT,)), 0))
        except OSError:
            pass
        self.sock.close()
