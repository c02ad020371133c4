"""The seam between database connections and the code that reads them (pool, metrics, admin).

Both engines' connections (`PgBackendConnection`, `MySQLBackendConnection`) declare
`IBackendConnection`, and the tests check each with `verifyObject`.  Metrics and the admin API read
connections only through these names, so an engine that forgets one fails a test instead of
silently reporting a default (how `DatabaseConnectionsCurrentlyInTransaction` came to read 0 for
every MySQL connection: it looked for PostgreSQL's `txn_status`).
"""

from zope.interface import Attribute, Interface

from txrdsproxy.pool.states import ConnState

# IBackendConnection.state values, in lifetime order (members of ConnState, equal to their names).
CONNECTING = ConnState.CONNECTING
INITIALISING = ConnState.INITIALISING
IDLE = ConnState.IDLE
BORROWED = ConnState.BORROWED
RESETTING = ConnState.RESETTING
CLOSED = ConnState.CLOSED

STATES = (CONNECTING, INITIALISING, IDLE, BORROWED, RESETTING, CLOSED)


class IBackendConnection(Interface):
    """One authenticated connection to a database target, as the pool lends it."""

    key = Attribute("The pool key it was opened for: (user, database) for PostgreSQL, "
                    "(user, capability profile) for MySQL.")
    target = Attribute("The config Target it is connected to (rds_resource_id, endpoint, port).")
    state = Attribute("One of interfaces.STATES; the pool and the connection change it.")
    idle_since = Attribute("Clock time it last became idle (meaningful while state is idle).")
    server_max_connections = Attribute(
        "The database's max_connections as read at login, or None before that.")
    in_transaction = Attribute(
        "True while the database session is inside a transaction block (PostgreSQL: the last "
        "ReadyForQuery status is not 'I'; MySQL: SERVER_STATUS_IN_TRANS).")
    tls = Attribute("True when the connection to the database is encrypted with TLS.")
    backend_id = Attribute(
        "The database's own id of this session (PostgreSQL backend pid, MySQL connection id), "
        "or None before login; shown by DescribeDBProxySessions and the console.")
    session_dirty = Attribute("A pinned session used it: it is reset before anyone else gets it.")
    pool_listener = Attribute("Callable(conn, reason) told once when the connection goes away.")

    def close(reason, abort=False):
        """Close with *reason*; fails any internal operation in progress; idempotent."""

    def reset():
        """Deferred[None] once the session state is back to the login's (DISCARD ALL,
        COM_RESET_CONNECTION); fails with BackendGone or the engine's DatabaseError."""

    def attach(sink):
        """Lend to a session: the database's bytes go to *sink* until `detach`."""

    def detach():
        """End the lending: bytes that arrive now are not a session's."""


class ISessionEvents(Interface):
    """What a lent database connection tells the session it is attached to (both engines):
    the sink given to `IBackendConnection.attach`."""

    def backend_data(data):
        """Bytes from the database for the client, forwarded as they are."""

    def write_queued(conn):
        """A write to *conn* had to be queued: from now on a full side pauses the other."""

    def backend_lost(conn, why):
        """*conn* closed or broke under the session (*why* is logged and may be told)."""


class IPgSessionEvents(ISessionEvents):
    """PostgreSQL: the messages of the database the session acts on."""

    def ready_for_query(status):
        """A ReadyForQuery reached the client (*status* b"I", b"T" or b"E")."""

    def parameter_changed(name, value):
        """A ParameterStatus for a parameter the session tracks reached the client."""


class IMySQLSessionEvents(ISessionEvents):
    """MySQL: where a response ends, and when the server asks for LOCAL INFILE data."""

    def response_complete(data=None):
        """The response to the command on the wire has ended (the tracker is idle); *data*, when
        given, is its last bytes, to relay first (as `backend_data` would)."""

    def infile_requested():
        """The server asked for a LOCAL INFILE: the client's next packets go to it."""


class IEngineSession(Interface):
    """What the engine-neutral `ClientSession` (proxy/session.py) asks of an engine's frontend:
    the questions and actions of its timers, borrowing, draining and ending."""

    busy = Attribute("A request is on the wire (the idle timeout must not end the session).")

    def left_cleanly(conn):
        """The client left between requests: *conn*'s state is known (given back clean)."""

    def needs_reset(conn):
        """The session left state on *conn* (pinned, open transaction): reset before reuse."""

    def transaction_open(conn):
        """A transaction is open on *conn* (drain waits for its end)."""

    def auth_timed_out():
        """ClientAuthTimeout passed before the session was logged in: tell the client, close."""

    def lost_database(conn, why):
        """Tell the client its database connection broke, and close."""

    def shutdown_now():
        """The proxy is stopping: the engine's server-shutdown error, and close."""

    def internal_error():
        """An unexpected error ended the session: the engine's "unknown error", and close."""

    def on_closed():
        """Engine bookkeeping once the client is gone (after the lease was given back)."""

    def pool_key():
        """The pool key of the next borrow."""

    def prepare_lease(conn):
        """Bring *conn* to the session's settings: None when nothing is to do, else a Deferred."""

    def attach_connection(conn, waited):
        """Relay on *conn* now (the session holds its lease)."""

    def refuse_request(error):
        """Answer the request(s) waiting for a connection with *error* (the engine's bytes)."""

    def error_bytes(kind, failure):
        """The engine's error for a session.BorrowFailure *kind* (docs/errors.md)."""
