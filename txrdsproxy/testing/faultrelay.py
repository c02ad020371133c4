"""A fault-injecting TCP relay for tests: put it between the proxy and a database.

    relay = FaultRelay(reactor, "127.0.0.1", db_port)
    port = relay.listen()                      # the proxy's target becomes 127.0.0.1:port
    relay.add_rule(Rule(TO_CLIENT, b"marker", Action.STALL))

Each accepted connection (one per database connection the proxy opens) gets a `Link`: bytes from
the proxy go to the database (direction TO_SERVER) and back (TO_CLIENT).  Faults:

- *rules* fire on the first link whose stream, in one direction, contains a byte pattern (a marker
  the test put in its statement, or a protocol byte sequence); the action then applies to that
  link only, *offset* bytes after the pattern's first byte, i.e. typically in the middle of a
  message: STALL (stop forwarding that direction; `resume()` releases it), CUT (forward up to
  the point, then close both sockets with FIN), RESET (forward up to the point, then close both
  with RST);
- relay-wide settings that apply to every link: `delay` (seconds before each chunk goes on),
  `throttle` (bytes per second per direction), `stall_all()` / `resume()`, `reset_all()`.

Everything runs in the relay's reactor thread; a test on another thread calls these methods
through `blockingCallFromThread` (see tests/integration/test_faults.py).  The relay is a test
tool: it keeps whole streams' tails only as long as a pattern (no unbounded buffers besides what
a stalled direction holds back), and logs what it does.
"""

import enum
import socket
import struct
from dataclasses import dataclass, field

from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.logger import Logger

TO_SERVER = "to_server"
TO_CLIENT = "to_client"


class Action(enum.Enum):
    STALL = "stall"
    CUT = "cut"
    RESET = "reset"


@dataclass
class Rule:
    """Fire *action* on the first link whose *direction* stream contains *pattern*, *offset*
    bytes after the pattern starts (default: just past its end).  `fired` holds the Link."""

    direction: str
    pattern: bytes
    action: Action
    offset: int = None
    fired: object = field(default=None, repr=False)

    def point(self):
        return len(self.pattern) if self.offset is None else self.offset


def _reset(transport):
    """Close with RST: SO_LINGER 0 then abort (a real 'connection reset by peer')."""
    handle = transport.getHandle() if hasattr(transport, "getHandle") else None
    if handle is not None:
        try:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abortConnection()


class _Side(protocol.Protocol):
    """One socket of a link; `link.from_side(self, data)` decides what happens to its bytes."""

    def __init__(self, link, direction):
        self.link = link
        self.direction = direction  # the direction of the bytes this side *receives*

    def connectionMade(self):
        self.link.side_up(self)

    def dataReceived(self, data):
        self.link.received(self.direction, data)

    def connectionLost(self, reason):
        self.link.side_down(self)


class Link:
    """One relayed connection: client side (from the proxy) and server side (to the database)."""

    log = Logger()

    def __init__(self, relay, number):
        self.relay = relay
        self.number = number
        self.client = None  # _Side receiving TO_SERVER bytes
        self.server = None  # _Side receiving TO_CLIENT bytes
        self.pending = bytearray()  # TO_SERVER bytes received before the server side is up
        self.held = {TO_SERVER: bytearray(), TO_CLIENT: bytearray()}  # stalled bytes
        self.stalled = {TO_SERVER: False, TO_CLIENT: False}
        self.tail = {TO_SERVER: b"", TO_CLIENT: b""}  # for patterns split across reads
        self.forwarded = {TO_SERVER: 0, TO_CLIENT: 0}
        self.closed = False
        self.how = None  # how it ended: "cut", "reset", "closed by client/server"

    def __repr__(self):
        return f"<link #{self.number} {self.how or 'open'}>"

    # -- sockets ---------------------------------------------------------------------------------
    def side_up(self, side):
        if side.direction == TO_SERVER:
            self.client = side
        else:
            self.server = side
            if self.pending:
                data, self.pending = bytes(self.pending), bytearray()
                self.received(TO_SERVER, data)

    def side_down(self, side):
        if self.closed:
            return
        self.closed = True
        self.how = self.how or ("closed by client" if side is self.client else "closed by server")
        other = self.server if side is self.client else self.client
        if other is not None and other.transport is not None:
            other.transport.loseConnection()
        self.relay.link_closed(self)

    def _out(self, direction):
        side = self.server if direction == TO_SERVER else self.client
        return side.transport if side is not None else None

    # -- data ------------------------------------------------------------------------------------
    def received(self, direction, data):
        if self.closed:
            return
        if direction == TO_SERVER and self.server is None:
            self.pending += data
            return
        rule, cut_at = self._match(direction, data)
        if rule is not None:
            self.log.info("fault relay {link}: {action} {direction} after {n} bytes (pattern {p!r})",
                          link=self, action=rule.action.value, direction=direction,
                          n=self.forwarded[direction] + cut_at, p=rule.pattern)
            self._send(direction, data[:cut_at])
            rest = data[cut_at:]
            if rule.action is Action.STALL:
                self.stalled[direction] = True
                self.held[direction] += rest
            elif rule.action is Action.CUT:
                self.cut()
            else:
                self.reset()
            return
        self._send(direction, data)

    def _match(self, direction, data):
        for rule in self.relay.rules:
            if rule.fired is not None or rule.direction != direction:
                continue
            window = self.tail[direction] + data
            at = window.find(rule.pattern)
            if at < 0:
                continue
            rule.fired = self
            start = at - len(self.tail[direction])  # may be negative: began in the last read
            return rule, max(0, min(len(data), start + rule.point()))
        keep = max((len(r.pattern) for r in self.relay.rules), default=1) - 1
        self.tail[direction] = (self.tail[direction] + data)[-keep:] if keep > 0 else b""
        return None, 0

    def _send(self, direction, data):
        if not data:
            return
        if self.stalled[direction] or self.relay.all_stalled:
            self.held[direction] += data
            return
        self.relay.schedule(self, direction, data)

    def deliver(self, direction, data):
        transport = self._out(direction)
        if transport is not None and not self.closed:
            self.forwarded[direction] += len(data)
            transport.write(data)

    # -- faults ----------------------------------------------------------------------------------
    def resume(self):
        for direction in (TO_SERVER, TO_CLIENT):
            self.stalled[direction] = False
            data, self.held[direction] = bytes(self.held[direction]), bytearray()
            self._send(direction, data)

    def cut(self):
        """Close both sockets politely (FIN) after what was forwarded so far."""
        self.how = "cut"
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                side.transport.loseConnection()

    def reset(self):
        """Close both sockets with RST."""
        self.how = "reset"
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                _reset(side.transport)


class _ClientFactory(protocol.Factory):
    def __init__(self, relay):
        self.relay = relay

    def buildProtocol(self, addr):
        return self.relay.new_link()


class FaultRelay:
    """Listens on 127.0.0.1 and relays every connection to (*host*, *port*) with faults."""

    log = Logger()

    def __init__(self, reactor, host, port):
        self.reactor = reactor
        self.host, self.port = host, port
        self.rules = []
        self.links = []  # every link made, open or closed
        self.delay = 0.0
        self.throttle = 0  # bytes per second per direction; 0 = unlimited
        self.all_stalled = False
        self._listening = None
        self._count = 0
        self._busy_until = {}  # (link, direction) -> clock time its throttled bytes are through

    # -- set-up ----------------------------------------------------------------------------------
    def listen(self):
        """-> Deferred[int]: the port the relay listens on (127.0.0.1)."""
        d = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(_ClientFactory(self))

        def bound(port):
            self._listening = port
            return port.getHost().port

        return d.addCallback(bound)

    def stop(self):
        for link in self.open_links():
            link.reset()
        if self._listening is not None:
            port, self._listening = self._listening, None
            return port.stopListening()
        return None

    def new_link(self):
        self._count += 1
        link = Link(self, self._count)
        self.links.append(link)
        client = _Side(link, TO_SERVER)
        server = _Side(link, TO_CLIENT)

        def failed(f):
            self.log.info("fault relay {link}: cannot reach the database: {e}", link=link,
                          e=f.getErrorMessage())
            if client.transport is not None:
                client.transport.loseConnection()

        endpoint = TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=10)
        endpoint.connect(protocol.Factory.forProtocol(lambda: server)).addErrback(failed)
        return client

    def link_closed(self, link):
        for key in [k for k in self._busy_until if k[0] is link]:
            del self._busy_until[key]

    # -- control (from the test) -----------------------------------------------------------------
    def add_rule(self, rule):
        self.rules.append(rule)
        return rule

    def open_links(self):
        return [link for link in self.links if not link.closed]

    def stall_all(self):
        self.all_stalled = True

    def resume(self):
        """Release every stall (relay-wide and per link); held bytes go on in order."""
        self.all_stalled = False
        for link in self.open_links():
            link.resume()

    def reset_all(self):
        for link in self.open_links():
            link.reset()

    def cut_all(self):
        for link in self.open_links():
            link.cut()

    # -- pacing ----------------------------------------------------------------------------------
    def schedule(self, link, direction, data):
        """Deliver now, or after `delay`, or paced by `throttle`; order is kept per direction."""
        now = self.reactor.seconds()
        key = (link, direction)
        at = max(now + self.delay, self._busy_until.get(key, now))
        if self.throttle:
            chunk = max(1, self.throttle // 10)  # ten slices a second
            for i in range(0, len(data), chunk):
                piece = data[i:i + chunk]
                self._at(at, link, direction, piece)
                at += len(piece) / self.throttle
            self._busy_until[key] = at
            return
        if at <= now and not self._busy_until.get(key, 0) > now:
            link.deliver(direction, data)
            return
        self._busy_until[key] = at
        self._at(at, link, direction, data)

    def _at(self, when, link, direction, data):
        self.reactor.callLater(max(0.0, when - self.reactor.seconds()), link.deliver, direction, data)
