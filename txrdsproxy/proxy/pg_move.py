"""The PostgreSQL side of moving a pinned session off a former writer (proxy/pin_move.py):
read its state on the old connection, replay it on the new one.  What is read and replayed,
and why each check is there: wire/pg/replay.py."""

from twisted.internet import defer

from txrdsproxy.proxy.pin_move import ReplayFailed
from txrdsproxy.wire.pg.replay import CAPTURE_SQL, NotMovable


def _one_value(rows):
    if len(rows) != 1 or len(rows[0]) != 1:
        raise NotMovable("the session state could not be read")
    return rows[0][0]


def capture(conn, log):
    """Read the session's state on *conn* (the old connection, not lent, between transactions).
    -> Deferred[wire.pg.replay.Replay]; fails with NotMovable, DatabaseError or BackendGone."""
    def planned(rows):
        plan = log.plan(_one_value(rows))
        plan.client_params = dict(conn.client_params)
        return plan

    return conn.run_internal(CAPTURE_SQL).addCallback(planned)


@defer.inlineCallbacks
def replay(conn, plan, desired):
    """Make *plan* on *conn* (a connection to the new writer, given to this session only), then
    check it took; finally bring the session parameters to *desired*.  Fires with None; fails
    with ReplayFailed whatever went wrong (the session ends)."""
    conn.session_dirty = True  # the session's state goes on it: reset before anyone else gets it
    try:
        yield conn.run_internal(plan.settings_sql)
        for query in plan.prepare_queries:
            yield conn.run_internal(query)
        if plan.parse_messages is not None:
            yield conn.run_messages(plan.parse_messages)
        plan.check(_one_value((yield conn.run_internal(CAPTURE_SQL))))
        # RESET ALL and the old connection's session settings: its parameters are the old ones
        conn.client_params = dict(plan.client_params)
        if conn.client_params != desired:
            yield conn.sync_params(desired)
    except Exception as e:
        raise ReplayFailed(str(e) or type(e).__name__) from e
