"""DescribeDBProxySessions: the client sessions of a proxy, as the `DBProxySession` shape.

RDS Proxy only counts pinned sessions; here an operator can see each one: who, from where, with
or without TLS, in which state, how old, on which database connection (target, the database's
own session id, whether it is inside a transaction), and for a pinned session why, with the
start of the statement that pinned it.  That statement is shown with its literals masked and cut
to 200 characters (txrdsproxy.sqlmask): values typed by users never leave the proxy.

Read in the reactor thread from the sessions' own states, like the metrics.  Member names are
those of the model extension (admin/model/...sdk-extras.json), which the codec checks.
"""

import datetime

from txrdsproxy.proxy.interfaces import IBackendConnection
from txrdsproxy.proxy.session import SessionState
from txrdsproxy.sqlmask import mask_literals

PIN_STATEMENT_CHARS = 200


def _peer(session):
    transport = getattr(session, "transport", None)
    try:
        peer = transport.getPeer() if transport is not None else None
    except Exception:  # a closing transport may not know its peer any more
        peer = None
    return getattr(peer, "host", None), getattr(peer, "port", None)


def _connection(conn):
    if not IBackendConnection.providedBy(conn):
        return None
    target = conn.target
    out = {"RdsResourceId": target.rds_resource_id, "Endpoint": target.endpoint,
           "Port": int(target.port), "State": conn.state,
           "InTransaction": bool(conn.in_transaction), "TLS": bool(conn.tls)}
    if conn.backend_id is not None:
        out["BackendId"] = int(conn.backend_id)
    return out


def db_proxy_session(ctx, session, now):
    """-> the DBProxySession dict of one live session of *ctx* (a ProxyContext)."""
    host, port = _peer(session)
    item = {
        "SessionId": int(session.id),
        "DBProxyName": ctx.name,
        "TLS": bool(session.tls),
        "State": session.state.value,
        "CreatedDate": datetime.datetime.fromtimestamp(session.connected_at, datetime.timezone.utc),
        "AgeSeconds": max(0, int(now - session.connected_at)),
        "IdleSeconds": max(0, int(now - session.last_active)),
        "QueryRequests": int(session.queries),
    }
    if session.user is not None:
        item["UserName"] = str(session.user)
    if session.database is not None:
        item["DatabaseName"] = str(session.database)
    if host is not None:
        item["ClientAddress"] = str(host)
        if port is not None:
            item["ClientPort"] = int(port)
    lease = session.lease
    if lease is not None:
        conn = _connection(lease.conn)
        if conn is not None:
            item["DatabaseConnection"] = conn
    if session.pin_reason is not None:
        item["PinReason"] = session.pin_reason.value
        if session.pin_statement:
            item["PinStatement"] = mask_literals(session.pin_statement, ctx.config.engine_family,
                                                 limit=PIN_STATEMENT_CHARS)
    return item


def describe_sessions(ctx, pinned=None):
    """-> [DBProxySession] of *ctx*'s live sessions, oldest first.  *pinned*: True for pinned
    sessions only, False for the others, None for all."""
    now = ctx.clock.seconds()
    out = []
    for session in sorted(list(ctx.sessions), key=lambda s: s.id):
        if session.state is SessionState.CLOSED:
            continue
        if pinned is not None and (session.pin_reason is not None) is not bool(pinned):
            continue
        out.append(db_proxy_session(ctx, session, now))
    return out
