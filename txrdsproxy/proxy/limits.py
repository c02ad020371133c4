"""Admission limits for client connections, enforced before authentication.

Everything here is decided at accept, before a client has proved anything, so it must be cheap and
hold no per-client state beyond the socket (see docs/security.md, "Limits and timeouts"):

- `MaxClientConnections`: sockets open to the proxy, authenticated or not;
- `MaxConnectionRate`: new sockets per second (token bucket), counted at accept so that sockets
  which never send anything use up the rate too;
- `MaxCancelRate`: PostgreSQL CancelRequests per second, each of which would open a socket to the
  database (and guess at a 64-bit key).

A refused client is told why with the engine's documented error (docs/errors.md), sent when the
protocol lets it be read: MySQL at once (the server speaks first), PostgreSQL in answer to the
first packet (bounded by ClientFirstPacketTimeout).
"""

import enum


class Refusal(enum.Enum):
    """Why a client connection was refused at accept."""

    TOO_MANY_CONNECTIONS = "MaxClientConnections"
    CONNECTION_RATE = "MaxConnectionRate"


class ConnectionRateLimiter:
    """At most *rate* new connections per second, with a burst of one second's worth.

    Uses the injected clock so tests drive it with `task.Clock`.  rate 0 disables the limit.
    """

    def __init__(self, rate, clock):
        self.rate = rate
        self.clock = clock
        self._tokens = float(rate)
        self._stamp = clock.seconds()

    def admit(self):
        if not self.rate:
            return True
        now = self.clock.seconds()
        self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Admission:
    """The pre-authentication limits of one proxy (built from its DBProxy config)."""

    def __init__(self, proxy_config, clock):
        self.max_client_connections = proxy_config.max_client_connections
        self.connection_rate = ConnectionRateLimiter(proxy_config.max_connection_rate, clock)
        self.cancel_rate = ConnectionRateLimiter(getattr(proxy_config, "max_cancel_rate", 0), clock)
        self.refused = {r: 0 for r in Refusal}  # counts, for logs and metrics
        self.cancels_dropped = 0

    def admit(self, open_connections):
        """A socket was accepted while *open_connections* (itself included) are open.
        -> None to go on, or the Refusal to tell the client."""
        if open_connections > self.max_client_connections:
            refusal = Refusal.TOO_MANY_CONNECTIONS
        elif not self.connection_rate.admit():
            refusal = Refusal.CONNECTION_RATE
        else:
            return None
        self.refused[refusal] += 1
        return refusal

    def admit_cancel(self):
        """-> True when a CancelRequest may be passed on to the database now."""
        if self.cancel_rate.admit():
            return True
        self.cancels_dropped += 1
        return False
