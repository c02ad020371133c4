"""Fakes shared by the project's unit tests and by applications testing code around the proxy.

They stand in for the objects a client session talks to (the pool, its leases, a lent database
connection, the secrets store) so a frontend can be driven byte by byte with a StringTransport
and `twisted.internet.task.Clock`, without sockets.  Each fake records what it was asked, and the
test decides when (and how) a pending operation completes: `FakePool.give()` hands the oldest
waiting borrow a lease, `FakePool.refuse(error)` fails it.
"""

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from txrdsproxy.config.model import DBProxyTarget
from txrdsproxy.pool.interfaces import ILease, ILeaseSource
from txrdsproxy.pool.states import ConnState
from txrdsproxy.proxy.interfaces import IBackendConnection

__all__ = ["ClientTransport", "FakeSecrets", "FakeLease", "FakePool", "FakePgBackendConn",
           "FakePooledConn", "RecordingEndpoint"]


class ClientTransport(StringTransport):
    """A client's TCP transport: resuming reading after loseConnection is a no-op, not an error.

    (StringTransport raises there; a real transport does not, and frontends resume reading from
    callbacks that may run after they decided to close.)
    """

    def resumeProducing(self):
        if not self.disconnecting:
            super().resumeProducing()


class FakeSecrets:
    """A secrets store over a mapping {arn: Credentials}; `find_user` as FileSecretsStore's."""

    def __init__(self, by_arn):
        self.by_arn = dict(by_arn)

    def get(self, arn):
        return self.by_arn.get(arn)

    def find_user(self, arns, username):
        for arn in arns:
            creds = self.by_arn.get(arn)
            if creds is not None and creds.username == username:
                return arn, creds
        return None

    def get_value(self, arn):
        creds = self.by_arn.get(arn)
        return None if creds is None else {"username": creds.username, "password": creds.password}

    def fetch(self, arn):
        from twisted.internet import defer
        return defer.succeed(self.get_value(arn))

    def watch(self, arns):
        from twisted.internet import defer
        return defer.succeed(None)


@implementer(ILease)
class FakeLease:
    """A pool lease: records how (and whether) the session gave the connection back."""

    def __init__(self, conn, borrowed_at=0.0):
        self.conn = conn
        self.borrowed_at = borrowed_at  # clock time it was lent (as Lease.borrowed_at)
        self.released = False
        self.release_args = None
        self.retired = False  # the pool will close the connection once given back

    def release(self, clean=True, needs_reset=False, reason=None):
        if self.released:
            return
        self.released = True
        self.release_args = dict(clean=clean, needs_reset=needs_reset, reason=reason)


@implementer(ILeaseSource)
class FakePool:
    """The pool as a session sees it: `try_borrow` (the fast path) and `borrow` (a Deferred).

    *make_conn(key)* builds the connection a lease carries.  `idle` holds leases `try_borrow`
    hands out at once (it returns None when empty); `borrow` queues (key, Deferred) in
    `requests` until the test calls `give()` or `refuse()`; cancelling the Deferred removes it.
    """

    def __init__(self, make_conn, default_key=None, clock=None):
        self.make_conn = make_conn
        self.clock = clock  # when given, leases record the time they were lent
        self.default_key = default_key  # new_lease()'s key when none is given
        self.requests = []  # [(key, Deferred)]
        self.leases = []    # every lease handed out, in order
        self.idle = []      # leases try_borrow hands out at once
        self.try_borrows = 0

    # -- what metrics and the admin API read ---------------------------------------------------
    max_connections = None
    oldest_wait_since = None

    @property
    def waiting(self):
        return len(self.requests)

    def connections(self):
        """The connections of leases still held, and of idle leases."""
        return [lease.conn for lease in self.leases if not lease.released] + [
            lease.conn for lease in self.idle]

    def try_borrow(self, key):
        self.try_borrows += 1
        if self.idle:
            lease = self.idle.pop(0)
            self.leases.append(lease)
            return lease
        return None

    def borrow(self, key):
        d = defer.Deferred(lambda d: self.requests.remove((key, d)))
        self.requests.append((key, d))
        return d

    def new_lease(self, key=None):
        conn = self.make_conn(self.default_key if key is None else key)
        return FakeLease(conn, self.clock.seconds() if self.clock is not None else 0.0)

    def give(self, **conn_attrs):
        """Fire the oldest waiting borrow with a new lease (*conn_attrs* set on its connection)."""
        key, d = self.requests.pop(0)
        lease = self.new_lease(key)
        for name, value in conn_attrs.items():
            setattr(lease.conn, name, value)
        self.leases.append(lease)
        d.callback(lease)
        return lease

    def refuse(self, error):
        """Fail the oldest waiting borrow with *error* (BorrowTimeout, PoolClosed, ...)."""
        key, d = self.requests.pop(0)
        d.errback(error)


FAKE_TARGET = DBProxyTarget(rds_resource_id="db-1", endpoint="127.0.0.1", port=5432)


@implementer(IBackendConnection)
class FakePgBackendConn:
    """A lent PgBackendConnection: the attributes and methods a PgFrontend session uses.

    `sink` is the session while attached; the test plays the database by calling the
    session's backend_data / ready_for_query.  `synced` records every sync_params request.
    Provides IBackendConnection (verified in tests) so metrics and admin code can read it.
    """

    tls = False
    backend_id = 4242
    server_max_connections = 100
    idle_since = 0.0
    pool_listener = None

    def __init__(self, key, target=FAKE_TARGET):
        self.key = key
        self.target = target
        self.transport = StringTransport()
        self.closed_reason = None
        self.state = ConnState.BORROWED
        self.session_dirty = False
        self.cancel_in_flight = None
        self.fatal_error = None
        self.too_many_statements = False
        self.prepared, self.pending = set(), set()
        self.statement_tracker = None
        self.txn_status = b"I"
        self.mid_message = False  # a server message partly passed on to the client
        self.server_params = {"client_encoding": "UTF8", "TimeZone": "UTC", "application_name": ""}
        self.initial_params = {"server_version": "15.4", "client_encoding": "UTF8", "TimeZone": "UTC"}
        self.client_params = None  # never equal to a session's: sync_params is always asked
        self.sink = None
        self.synced = []
        self.internal = []  # [(encoded messages, Deferred)] of run_internal / run_messages

    def attach(self, sink):
        self.sink = sink

    def run_internal(self, sql):
        from txrdsproxy.wire.pg import messages as msg
        return self.run_messages(msg.query(sql))

    def run_messages(self, data):
        """An internal operation: recorded with its Deferred, which the test fires (rows:
        [[str or None, ...]]) or fails."""
        d = defer.Deferred()
        self.internal.append((data, d))
        return d

    def detach(self):
        self.sink = None

    @property
    def in_transaction(self):
        return self.txn_status != b"I"

    def sync_params(self, desired):
        self.synced.append(dict(desired))
        return defer.succeed(None)

    def close(self, reason, abort=False):
        if self.state != "closed":
            self.state, self.closed_reason = "closed", reason

    def reset(self):
        self.session_dirty = False
        return defer.succeed(None)


class RecordingEndpoint:
    """Stands for HostnameEndpoint (in place of `txrdsproxy.proxy.connector.HostnameEndpoint`):
    connect() records (endpoint, factory, Deferred) in the class's `made` list and leaves the
    Deferred to the test, which builds the protocol from the factory and fires it."""

    made = []

    def __init__(self, reactor, host, port, timeout=None):
        self.host, self.port, self.timeout = host, port, timeout

    def connect(self, factory):
        d = defer.Deferred()
        RecordingEndpoint.made.append((self, factory, d))
        return d


class FakePooledConn:
    """A database connection as pool.BackendPool sees it (the pool's, failover's and readers'
    tests): it starts "connecting", the pool sets its state and `pool_listener`; `lose()` is the
    database ending it.  `reset()` succeeds at once, or with *manual_reset* returns a Deferred
    the test fires (kept in `resets`).  Closing it twice is a bug the fake catches."""

    def __init__(self, key, target=None, server_max_connections=10, manual_reset=False):
        self.key, self.target = key, target
        self.state = "connecting"
        self.idle_since = 0.0
        self.server_max_connections = server_max_connections
        self.pool_listener = None
        self.closed_reason = None
        self.aborted = False
        self.manual_reset = manual_reset
        self.resets = []

    def close(self, reason, abort=False):
        assert self.state != "closed", "closed twice"
        self.closed_reason = reason
        self.aborted = abort
        self.state = "closed"

    def reset(self):
        if not self.manual_reset:
            return defer.succeed(None)
        d = defer.Deferred()
        self.resets.append(d)
        return d

    def lose(self, reason="terminating connection due to administrator command"):
        self.state = "closed"
        self.pool_listener(self, reason)

    def __repr__(self):
        return f"<FakePooledConn {self.key} {self.state}>"
