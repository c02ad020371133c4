"""Admission limits for client connections: a count cap and a rate cap (token bucket)."""


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
