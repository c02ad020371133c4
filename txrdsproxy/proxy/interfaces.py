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
