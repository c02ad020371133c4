"""The MySQL/MariaDB side of moving a pinned session off a former writer (proxy/pin_move.py):
read its variables on the old connection, set them on the new one.  What moves and why each
check is there: wire/mysql/replay.py."""

from twisted.internet import defer

from txrdsproxy.proxy.pin_move import ReplayFailed
from txrdsproxy.wire.mysql.replay import USER_QUERY, system_query, value_query


@defer.inlineCallbacks
def read_state(conn, names):
    """-> (system rows, user rows, value rows) of the session on *conn* (not lent)."""
    system = yield conn.query(system_query(names))
    users = yield conn.query(USER_QUERY)
    values = []
    query = value_query(users)
    if query is not None:
        values = yield conn.query(query)
    return system, users, values


def capture(conn, log):
    """Deferred[wire.mysql.replay.Plan] read on the old connection; fails with NotMovable,
    DatabaseError (MySQL without MariaDB's information_schema tables) or BackendGone."""
    return read_state(conn, log.names).addCallback(lambda rows: log.plan(*rows))


@defer.inlineCallbacks
def replay(conn, plan, sync):
    """Set *plan* on *conn* (the new writer's, this session's alone), then *sync*(conn) (the
    session's tracked values: a Deferred or None), then check.  Fails with ReplayFailed."""
    conn.session_dirty = True  # the session's state goes on it: reset before anyone else gets it
    try:
        sql = plan.replay_sql
        if sql is not None:
            yield conn.query(sql)
        d = sync(conn)
        if d is not None:
            yield d
        plan.check(*(yield read_state(conn, plan.names)))
    except Exception as e:
        raise ReplayFailed(str(e) or type(e).__name__) from e
