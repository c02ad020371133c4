"""Engine-neutral parts of a client session: its named states and the per-proxy context.

A session is in exactly one state, changed only through `Session.set_state`; metrics and the
admin API read these states instead of keeping parallel counters.
"""

import enum
import itertools

from twisted.logger import Logger

from txrdsproxy.proxy.limits import ConnectionRateLimiter


class SessionState(enum.Enum):
    AUTHENTICATING = "authenticating"
    IDLE = "idle"          # no database connection held
    BORROWING = "borrowing"  # waiting for the pool
    BORROWED = "borrowed"  # holding a connection for the current transaction
    PINNED = "pinned"      # holding a connection until the session ends
    DRAINING = "draining"  # client gone, connection being cleaned
    CLOSED = "closed"


class ProxyContext:
    """Everything the sessions of one proxy share: its config, pool, secrets, clock and counts."""

    log = Logger()

    def __init__(self, proxy_config, pool, secrets, clock, metrics=None, cancel_registry=None,
                 connector=None):
        self.config = proxy_config
        self.name = proxy_config.name
        self.pool = pool
        self.secrets = secrets
        self.clock = clock
        self.metrics = metrics
        self.connector = connector
        self.sessions = set()
        self.cancel_registry = cancel_registry if cancel_registry is not None else {}
        self.rate_limiter = ConnectionRateLimiter(proxy_config.max_connection_rate, clock)
        self.arns = [a.secret_arn for a in proxy_config.auth]
        self._ids = itertools.count(1)
        self.welcome = {}  # pool key -> server parameters reported at login (engine specific)
        self.normalized = {}  # (param, requested value) -> the value the server reports
        self.login_replies = {}  # (pool key, session params) -> encoded ParameterStatus block
        self.pin_counts = {}  # PinReason value -> sessions pinned for it
        self.queries_closed = 0  # QueryRequests of sessions that have ended

    def next_id(self):
        return next(self._ids)

    def auth_entry(self, arn):
        for entry in self.config.auth:
            if entry.secret_arn == arn:
                return entry
        return None

    def find_user(self, username):
        """-> (UserAuthConfig, Credentials) for *username*, or None."""
        found = self.secrets.find_user(self.arns, username)
        if found is None:
            return None
        arn, creds = found
        return self.auth_entry(arn), creds

    def credentials_for(self, username):
        found = self.find_user(username)
        return None if found is None else found[1]

    def count_pin(self, reason):
        self.pin_counts[reason] = self.pin_counts.get(reason, 0) + 1

    def sessions_in(self, state):
        return sum(1 for s in self.sessions if s.state is state)
