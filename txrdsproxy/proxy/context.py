"""The per-proxy context every client session of one proxy shares (`ProxyContext`): its config,
pool, secrets, clock, counts, session ids and DebugLogging.

It used to live in proxy/session.py (which still re-exports it); it has its own module because
it is what the registry, the runtime, the metrics and the admin API build and read, while
session.py holds what a session does.
"""

import itertools
import os

from twisted.logger import Logger

from txrdsproxy.auth.secrets import ISecretsLoading
from txrdsproxy.proxy.idle_sweep import IdleSweep
from txrdsproxy.proxy.limits import Admission
from txrdsproxy.sqlmask import mask_literals

__all__ = ["DEBUG_LOGGING_SECONDS", "ProxyContext"]

DEBUG_LOGGING_SECONDS = 24 * 3600


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
        self.tls = None  # tls.ServerTLS when the proxy terminates client TLS
        self.database_tls = None  # backend_tls.DatabaseTLS (the connector's); None: never TLS
        self.iam = None  # auth.iam.DbTokenVerifier (the registry's) for IAMAuth REQUIRED users
        self.monitor = None  # failover.monitor.WriterMonitor when the target group has several targets
        self.fence_store = None  # failover.fencing.FenceStore where the monitor keeps its fences
        self.readers = None  # failover.readers.ReaderSet (endpoints.wire_readers)
        self.replica_pools = None  # pool.targets.TargetPools of the READ_ONLY endpoints
        self.sessions = set()
        self.idle_sweep = IdleSweep(self)  # IdleClientTimeout of every logged-in session: one timer
        self.cancel_registry = cancel_registry if cancel_registry is not None else {}
        self.admission = Admission(proxy_config, clock)  # pre-authentication limits
        self.arns = [a.secret_arn for a in proxy_config.auth]
        self._ids = itertools.count(1)
        self.welcome = {}  # pool key -> server parameters reported at login (engine specific)
        self.normalized = {}  # (param, requested value) -> the value the server reports
        self.login_replies = {}  # (pool key, session params) -> encoded ParameterStatus block
        self.pin_counts = {}  # PinReason value -> sessions pinned for it
        self.queries_closed = 0  # QueryRequests of sessions that have ended
        self.queries_closed_tls = 0  # ... of those, sessions whose client connection was TLS
        # DebugLogging logs statement text, for 24 hours from start (RDS Proxy turns it off
        # by itself too: statement text can hold secrets).
        self.debug_until = clock.seconds() + DEBUG_LOGGING_SECONDS if proxy_config.debug_logging else 0.0
        self.debug_literals = os.environ.get("TXRDSPROXY_DEBUG_LITERALS", "") in ("1", "true", "yes")

    def next_id(self):
        return next(self._ids)

    worker = None  # workers.WorkerIdentity when this process is one worker of several

    def join_worker(self, worker):
        """This process is *worker* (workers.WorkerIdentity) of several: session ids become
        `index + count * k` (so a cancel request or KILL names the worker holding the session)
        and the pool takes this worker's share of the connection cap."""
        self.worker = worker
        self._ids = itertools.count(worker.first_id(), worker.count)
        self.pool.share = (worker.index, worker.count)
        if self.replica_pools is not None:  # the reader endpoints' pools share the same way
            self.replica_pools.share = (worker.index, worker.count)

    def database_tls_for(self, client_tls):
        """The pool key's TLS element for a session whose client connection is (not) TLS:
        whether its database connections use TLS (backend_tls.DatabaseTLS.wants_tls)."""
        if self.database_tls is None:
            return False
        return self.database_tls.wants_tls(client_tls)

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

    def secrets_loading(self):
        """-> None (the usual case), or a Deferred[None] firing once the secrets store's first
        read of this proxy's secrets has ended: a login arriving before waits for it (within
        ClientAuthTimeout) instead of being refused as if its user had no secret."""
        secrets = self.secrets  # replaced when a reload changes the Secrets backend
        if not ISecretsLoading.providedBy(secrets):
            return None
        return secrets.loading(self.arns)

    def credentials_for(self, username):
        found = self.find_user(username)
        return None if found is None else found[1]

    def debug_statement(self, session, text):
        """DebugLogging: log one statement's text (bytes), while the 24 hours last (counted from
        when it was switched on: at load, or by the API / a reload, see runtime.py).

        Literals (strings, numbers) and comments are masked unless `debug_literals` is set
        ($TXRDSPROXY_DEBUG_LITERALS=1 at start): statement text is where passwords and personal
        data appear, and a log is read by more people than the database."""
        if self.clock.seconds() > self.debug_until:
            if self.debug_until:
                self.log.info("proxy {name}: DebugLogging ended after 24 hours", name=self.name)
                self.debug_until = 0.0
            return
        text = bytes(text[:4096])
        if self.debug_literals:
            sql = text.decode("utf-8", "replace")
        else:
            sql = mask_literals(text, self.config.engine_family)
        self.log.info("{s}: statement: {sql}", s=session, sql=sql)

    def count_pin(self, reason):
        self.pin_counts[reason] = self.pin_counts.get(reason, 0) + 1

    def sessions_in(self, state):
        return sum(1 for s in self.sessions if s.state is state)
