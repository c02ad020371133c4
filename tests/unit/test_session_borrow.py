"""The borrow / prepare / attach / refuse flow written once in ClientSession (proxy/session.py).

First the flow itself, driven through a minimal engine that records the hooks it is asked to
run (fake pool, fake connection, task.Clock); then the two real engines' hooks (PgFrontend,
MySQLFrontend): what each client is told for every kind of failure (docs/errors.md), and what
happens to a connection whose preparation failed.
"""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tests.unit import test_mysql_frontend as myfe
from tests.unit import test_pg_frontend as pgfe
from txrdsproxy.auth.secrets import Credentials
from txrdsproxy.pool.pool import BackendPool, BorrowTimeout, PoolClosed
from txrdsproxy.pool.states import ConnState
from txrdsproxy.proxy.connector import BackendGone, DatabaseRefused
from txrdsproxy.proxy.mysql_backend import DatabaseError as MySQLDatabaseError
from txrdsproxy.proxy.pg_backend import DatabaseError as PgDatabaseError
from txrdsproxy.proxy.session import BorrowFailure, ClientSession, Phase, ProxyContext, SessionState
from txrdsproxy.testing.fakes import ClientTransport, FakePgBackendConn, FakePool, FakeSecrets
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.wire.pg import pinning

KEY = pgfe.KEY


class RecordingSession(ClientSession):
    """The smallest engine: every hook the shared flow calls is recorded in `events`."""

    busy = False

    def __init__(self, ctx):
        super().__init__(ctx, Phase.SESSION)
        self.key = KEY
        self.events = []
        self.prepare = None  # conn -> None | Deferred (what prepare_lease returns)

    def left_cleanly(self, conn):
        return True

    def needs_reset(self, conn):
        return False

    def transaction_open(self, conn):
        return conn.txn_status != b"I"

    def prepare_lease(self, conn):
        self.events.append(("prepare", conn))
        return None if self.prepare is None else self.prepare(conn)

    def attach_connection(self, conn, waited):
        self.events.append(("attach", conn, waited))

    def refuse_request(self, error):
        self.events.append(("refuse", error))

    def error_bytes(self, kind, failure):
        return kind  # what the engine would turn into its error


class Flow:
    def __init__(self, session_class=RecordingSession):
        self.clock = Clock()
        self.pool = FakePool(FakePgBackendConn, default_key=KEY, clock=self.clock)
        self.ctx = ProxyContext(pgfe.proxy_config(), self.pool,
                                FakeSecrets({pgfe.ARN: Credentials(pgfe.USER, pgfe.PASSWORD, pgfe.ARN)}),
                                self.clock)
        self.session = session_class(self.ctx)
        self.transport = ClientTransport()
        self.session.makeConnection(self.transport)
        self.session.set_state(SessionState.IDLE)

    def idle_lease(self):
        lease = self.pool.new_lease()
        self.pool.idle.append(lease)
        return lease

    def lose(self):
        self.session.connectionLost(Failure(ConnectionError("gone")))


@pytest.fixture
def f():
    return Flow()


# -- the flow -------------------------------------------------------------------------------------
def test_an_idle_connection_is_attached_at_once_without_a_deferred(f):
    lease = f.idle_lease()
    f.session.borrow()
    assert f.session.events == [("prepare", lease.conn), ("attach", lease.conn, False)]
    assert f.session.lease is lease and f.session.state is SessionState.BORROWED
    assert f.pool.requests == []  # the pool's queue (a Deferred) was never used
    assert not f.session.borrowing


def test_borrow_if_idle_starts_nothing_when_no_connection_is_idle(f):
    assert f.session.borrow_if_idle() is False
    assert f.pool.requests == [] and f.session.events == [] and f.session.state is SessionState.IDLE
    lease = f.idle_lease()
    assert f.session.borrow_if_idle() is True
    assert f.session.lease is lease


def test_a_queued_borrow_attaches_when_the_pool_serves_it(f):
    f.session.borrow()
    assert f.session.state is SessionState.BORROWING and f.session.borrowing
    assert [key for key, _ in f.pool.requests] == [KEY]
    lease = f.pool.give()
    assert f.session.events == [("prepare", lease.conn), ("attach", lease.conn, True)]
    assert f.session.lease is lease and f.session.state is SessionState.BORROWED
    assert not f.session.borrowing


def test_a_client_that_leaves_while_queued_cancels_its_borrow(f):
    f.session.borrow()
    [(_, d)] = f.pool.requests
    f.lose()
    assert f.pool.requests == []  # cancelled: the pool forgot the waiter
    assert d.called
    d.addErrback(lambda failure: failure.trap(defer.CancelledError))
    assert f.session.events == []  # no error is sent to a client that is gone


def test_a_cancelled_borrow_never_swallows_a_connection_of_the_real_pool():
    """BackendPool + task.Clock: the waiter leaves before its connection is opened; the
    connection goes to the pool's idle list, the session never sees it."""
    clock = Clock()
    opening = []

    class Connector:
        def connect(self, key):
            d = defer.Deferred()
            opening.append(d)
            return d

    flow = Flow()
    pool = BackendPool("app-pg", Connector(), flow.ctx.config.target_group.connection_pool_config, clock)
    flow.ctx.pool = pool
    flow.session.borrow()
    assert pool.waiting == 1 and len(opening) == 1
    flow.lose()
    assert pool.waiting == 0
    conn = FakePgBackendConn(KEY)
    conn.state = ConnState.CONNECTING
    opening[0].callback(conn)
    assert conn.state == ConnState.IDLE and pool.try_borrow(KEY).conn is conn
    assert flow.session.events == []


def test_the_borrow_timeout_of_the_real_pool_is_refused_and_the_session_goes_on():
    clock = Clock()

    class Connector:
        def connect(self, key):
            return defer.Deferred()  # never opens

    flow = Flow()
    config = flow.ctx.config.target_group.connection_pool_config
    pool = BackendPool("app-pg", Connector(), config, clock)
    flow.ctx.pool = pool
    flow.session.borrow()
    clock.advance(config.connection_borrow_timeout)
    assert flow.session.events == [("refuse", BorrowFailure.TIMEOUT)]
    assert flow.session.state is SessionState.IDLE and not flow.session.borrowing


def test_a_pinned_session_marks_the_connection_dirty(f):
    f.session._pin(pinning.PinReason.SET_VARIABLE)
    lease = f.idle_lease()
    f.session.borrow()
    assert lease.conn.session_dirty and f.session.state is SessionState.PINNED


def test_the_connection_is_attached_once_its_preparation_is_done(f):
    syncing = defer.Deferred()
    f.session.prepare = lambda conn: syncing
    lease = f.idle_lease()
    f.session.borrow()
    assert f.session.events == [("prepare", lease.conn)]
    assert f.session.borrowing and f.session.lease is None
    syncing.callback(None)
    assert f.session.events[-1] == ("attach", lease.conn, True)
    assert f.session.lease is lease and not f.session.borrowing


@pytest.mark.parametrize("txn_status, reset", [(b"I", False), (b"T", True)])
def test_a_client_that_leaves_during_preparation_gives_the_connection_back_after_it(f, txn_status, reset):
    syncing = defer.Deferred()
    f.session.prepare = lambda conn: syncing
    lease = f.idle_lease()
    f.session.borrow()
    f.lose()
    assert not lease.released  # the sync still runs on it: not given to anybody meanwhile
    lease.conn.txn_status = txn_status
    syncing.callback(None)
    assert lease.release_args == {"clean": True, "needs_reset": reset, "reason": None}
    assert [e[0] for e in f.session.events] == ["prepare"]


def test_a_database_refusal_during_preparation_resets_the_connection_and_refuses_the_request(f):
    f.session.prepare = lambda conn: defer.fail(PgDatabaseError({"C": "22023", "M": "bad TimeZone"}))
    f.session.request_started = 5.0
    lease = f.idle_lease()
    f.session.borrow()
    assert lease.release_args == {"clean": True, "needs_reset": True, "reason": None}
    assert f.session.events[-1] == ("refuse", BorrowFailure.DATABASE_ERROR)
    assert f.session.lease is None and f.session.state is SessionState.IDLE
    assert f.session.request_started is None  # answered by the proxy: no latency recorded


def test_a_connection_that_broke_during_preparation_is_closed(f):
    f.session.prepare = lambda conn: defer.fail(BackendGone("internal query timed out after 30 s"))
    lease = f.idle_lease()
    f.session.borrow()
    assert lease.release_args["clean"] is False
    assert lease.release_args["reason"] == "sync failed: internal query timed out after 30 s"
    assert f.session.events[-1] == ("refuse", BorrowFailure.UNREACHABLE)


def test_a_refusal_after_the_connection_closed_is_not_reused(f):
    def refused(conn):
        conn.state = ConnState.CLOSED
        return defer.fail(PgDatabaseError({"C": "57P01", "M": "terminating"}))

    f.session.prepare = refused
    lease = f.idle_lease()
    f.session.borrow()
    assert lease.release_args["clean"] is False


@pytest.mark.parametrize("error, kind", [
    (BorrowTimeout("Timed-out waiting to acquire database connection"), BorrowFailure.TIMEOUT),
    (PoolClosed("app-pg"), BorrowFailure.SHUTTING_DOWN),
    (BackendGone("cannot connect to 127.0.0.1:1: refused"), BorrowFailure.UNREACHABLE),
    (PgDatabaseError({"C": "53300", "M": "sorry, too many clients already"}), BorrowFailure.DATABASE_ERROR),
    (MySQLDatabaseError(P.err_packet(1040, "HY000", "Too many connections")), BorrowFailure.DATABASE_ERROR),
])
def test_each_pool_failure_is_refused_with_its_kind(f, error, kind):
    f.session.borrow()
    f.pool.refuse(error)
    assert f.session.events == [("refuse", kind)]
    assert f.session.state is SessionState.IDLE and not f.session.borrowing


def test_an_unforeseen_pool_failure_is_logged_and_refused_as_unknown(f, failures):
    f.session.borrow()
    f.pool.refuse(RuntimeError("pool bug"))
    assert f.session.events == [("refuse", BorrowFailure.UNKNOWN)]
    assert [e["log_failure"].type for e in failures] == [RuntimeError]


def test_both_engines_database_errors_are_database_refusals():
    assert issubclass(PgDatabaseError, DatabaseRefused) and issubclass(MySQLDatabaseError, DatabaseRefused)


def test_a_held_connection_is_prepared_again_without_the_pool(f):
    lease = f.idle_lease()
    f.session.borrow()
    f.session.events.clear()
    f.session.borrow()
    assert f.session.events == [("prepare", lease.conn), ("attach", lease.conn, False)]
    assert f.pool.try_borrows == 1 and f.pool.requests == []


def test_a_held_connection_whose_preparation_fails_is_given_back_and_detached(f):
    lease = f.idle_lease()
    f.session.borrow()
    lease.conn.attach(f.session)
    f.session.prepare = lambda conn: defer.fail(MySQLDatabaseError(P.err_packet(1049, "42000", "Unknown database 'x'")))
    f.session.borrow()
    assert f.session.lease is None and lease.conn.sink is None
    assert lease.release_args == {"clean": True, "needs_reset": True, "reason": None}
    assert f.session.events[-1] == ("refuse", BorrowFailure.DATABASE_ERROR)


def test_a_prepare_hook_that_raises_leaks_no_pool_slot(f):
    def broken(conn):
        raise KeyError("engine bug")

    f.session.prepare = broken
    lease = f.idle_lease()
    with pytest.raises(KeyError):
        f.session.borrow()
    assert lease.release_args["clean"] is False


def test_a_lease_served_after_the_client_left_goes_back(f):
    f.session.borrow()
    [(_, d)] = f.pool.requests
    f.session.set_state(SessionState.CLOSED)  # closed without the cancel reaching the pool
    f.session._borrow_d = None
    lease = f.pool.give()
    assert lease.release_args == {"clean": True, "needs_reset": False, "reason": None}
    assert f.session.events == []


def test_a_bug_in_the_attach_hook_closes_the_session_and_its_connection(failures):
    class Broken(RecordingSession):
        def attach_connection(self, conn, waited):
            raise ValueError("attach bug")

    flow = Flow(Broken)
    flow.session.borrow()
    lease = flow.pool.give()  # raises inside the Deferred's callback: handled by unexpected()
    assert flow.transport.disconnecting and flow.session.broken
    flow.lose()
    assert lease.release_args["clean"] is False
    assert [e["log_failure"].type for e in failures] == [ValueError]


def test_pool_for_chooses_the_pool_of_every_borrow(f):
    replica = FakePool(FakePgBackendConn, default_key=KEY)
    asked = []

    class Routed(RecordingSession):
        def pool_for(self, key):
            asked.append(key)
            return replica

    flow = Flow(Routed)
    flow.session.borrow()
    assert asked == [KEY] and [k for k, _ in replica.requests] == [KEY] and flow.pool.requests == []
    lease = replica.give()
    assert flow.session.lease is lease


def test_a_refused_request_while_draining_ends_the_session_between_transactions(f):
    f.session.borrow()
    f.session._draining = True
    f.pool.refuse(BorrowTimeout("x"))
    assert f.session.state is SessionState.IDLE
    f.clock.advance(0)
    assert f.transport.disconnecting  # drain() ran once the request was answered


# -- the engines' hooks: what the client is told ---------------------------------------------------
PG_CASES = [
    (BorrowTimeout("x"), ("53300", "Timed-out waiting to acquire database connection.")),
    (PoolClosed("app-pg"), ("57P01", "The proxy is shutting down.")),
    (BackendGone("cannot connect to 127.0.0.1:5432: Connection refused"),
     ("08006", "Request returned an error: cannot connect to 127.0.0.1:5432: Connection refused.")),
    (PgDatabaseError({"C": "53300", "M": "sorry, too many clients already"}),
     ("53300", "Request returned an error: sorry, too many clients already.")),
]


@pytest.mark.parametrize("error, expected", PG_CASES)
def test_pg_session_refuses_the_request_with_the_documented_error(error, expected):
    s = pgfe.Harness()
    s.login()
    s.send(msg.query("SELECT 1"))
    s.pool.refuse(error)
    out = s.messages()
    assert out[-1] == (b"Z", b"I")  # the session goes on
    [fields] = [msg.parse_error_fields(p) for k, p in out if k == b"E"]
    assert (fields["C"], fields["M"]) == expected and fields["S"] == "ERROR"
    assert s.frontend.state is SessionState.IDLE and not s.closed


@pytest.mark.parametrize("error, expected", PG_CASES)
def test_pg_login_check_failure_is_fatal_with_the_same_text(error, expected):
    h = pgfe.Harness()
    h.md5_login()
    h.pool.refuse(error)
    [fields] = [msg.parse_error_fields(p) for k, p in h.messages() if k == b"E"]
    assert (fields["C"], fields["M"]) == expected and fields["S"] == "FATAL"
    assert h.closed


def test_pg_unforeseen_borrow_failure_is_unknown_error(failures):
    s = pgfe.Harness()
    s.login()
    s.send(msg.query("SELECT 1"))
    s.pool.refuse(RuntimeError("pool bug"))
    [fields] = [msg.parse_error_fields(p) for k, p in s.messages() if k == b"E"]
    assert (fields["C"], fields["M"]) == ("XX000", "Unknown error.")
    assert len(failures) == 1


def test_pg_sync_refusal_resets_the_connection_and_forwards_the_database_error():
    class Refusing(FakePgBackendConn):
        def sync_params(self, desired):
            return defer.fail(PgDatabaseError({"C": "22023", "M": 'invalid value for parameter "TimeZone"'}))

    s = pgfe.Harness()
    s.login()
    s.pool.make_conn = Refusing
    s.send(msg.query("SELECT 1"))
    lease = s.pool.give()
    assert lease.release_args == {"clean": True, "needs_reset": True, "reason": None}
    [fields] = [msg.parse_error_fields(p) for k, p in s.messages() if k == b"E"]
    assert fields["C"] == "22023" and fields["M"].startswith("Request returned an error: invalid value")
    assert not s.closed and s.frontend.lease is None


def test_pg_statement_tracker_is_set_before_the_connection_is_attached():
    """EXCLUDE_PREPARED_STATEMENTS: the connection decides at attach() whether it inspects
    ParseComplete (to swallow those answering injected Parses), from `statement_tracker`."""
    seen = []

    class Recording(FakePgBackendConn):
        def attach(self, sink):
            seen.append(self.statement_tracker)
            super().attach(sink)

    s = pgfe.Harness(TargetGroups=[{
        "ConnectionPoolConfig": {"SessionPinningFilters": ["EXCLUDE_PREPARED_STATEMENTS"]},
        "Targets": [{"RdsResourceId": "pg-1", "Endpoint": "127.0.0.1", "Port": 5432}]}])
    s.login()
    s.pool.make_conn = Recording
    s.send(msg.query("SELECT 1"))
    s.pool.give()
    assert seen == [s.frontend._stmts] and seen[0] is not None


MYSQL_CASES = [
    (BorrowTimeout("x"), (9501, "HY000", "Timed-out waiting to acquire database connection")),
    (PoolClosed("app-my"), (1053, "08S01", "Server shutdown in progress")),
    (BackendGone("cannot connect"), (2013, "HY000", "Lost connection to the database")),
    (MySQLDatabaseError(P.err_packet(1040, "HY000", "Too many connections")),
     (1040, "HY000", "Too many connections")),
]


@pytest.mark.parametrize("error, expected", MYSQL_CASES)
def test_mysql_command_is_refused_with_the_documented_error(error, expected):
    s = myfe.Harness()
    s.login()
    s.send(myfe.query("SELECT 1"))
    s.pool.refuse(error)
    [(seq, payload)] = s.packets()
    assert seq == 1 and myfe.err(payload) == expected
    assert s.frontend.state is SessionState.IDLE and not s.closed
    s.send(myfe.command(P.COM_PING))  # the session goes on
    assert s.packets() == [(1, P.ok_packet(status=myfe.AC))]


@pytest.mark.parametrize("error, expected", MYSQL_CASES)
def test_mysql_login_check_failure_is_fatal_with_the_same_text(error, expected):
    h = myfe.Harness()
    h.handshake(database="shop")
    h.pool.refuse(error)
    [(seq, payload)] = h.packets()
    assert myfe.err(payload) == expected and h.closed


def test_mysql_sync_refusal_resets_the_connection_and_forwards_the_database_error():
    s = myfe.Harness()
    s.login()
    s.frontend.database = "shop"  # the session's database: the sync sets it first
    lease = s.pool.new_lease()
    lease.conn.sync_error = P.err_packet(1049, "42000", "Unknown database 'shop'")
    s.pool.idle.append(lease)  # served at once (try_borrow): the sync fails synchronously
    s.send(myfe.query("SELECT 1"))
    assert s.packets() == [(1, P.err_packet(1049, "42000", "Unknown database 'shop'"))]
    assert lease.release_args == {"clean": True, "needs_reset": True, "reason": None}
    assert lease.conn.writes == []
    assert not s.closed


def test_mysql_a_connection_that_broke_during_sync_is_closed():
    s = myfe.Harness()
    s.login()
    s.frontend.desired["time_zone"] = "+01:00"  # the next connection needs a sync
    s.send(myfe.query("SELECT 1"))
    [(_, d)] = s.pool.requests
    lease = s.pool.new_lease()
    lease.conn.sync = lambda desired, database: defer.fail(BackendGone("internal command timed out after 30 s"))
    s.pool.requests.clear()
    d.callback(lease)
    assert lease.release_args["clean"] is False
    assert lease.release_args["reason"] == "sync failed: internal command timed out after 30 s"
    assert s.packets() == [(1, P.err_packet(2013, "HY000", "Lost connection to the database"))]
    assert lease.conn.writes == [] and not s.closed and s.frontend.lease is None
