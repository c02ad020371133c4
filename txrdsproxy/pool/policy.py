"""What to do with a database connection given back to the pool: a pure decision.

Kept apart from the pool so the rule "a connection in an unknown state is never handed to another
client" reads in one place and is tested without sockets.
"""

import enum
from txrdsproxy.pool.states import ConnState


class Disposition(enum.Enum):
    REUSE = "reuse"
    RESET = "reset"
    CLOSE = "close"


def on_release(conn_state, clean, needs_reset, open_connections, limit):
    """Decide the fate of a returned connection -> (Disposition, reason or None).

    *clean*: the session saw the transaction end and nothing outstanding on the wire.
    *needs_reset*: the session left state other sessions must not see (pinned, open transaction).
    """
    if conn_state != ConnState.BORROWED:
        return Disposition.CLOSE, f"returned while {conn_state}"
    if not clean:
        return Disposition.CLOSE, "returned in an unknown state"
    if limit is not None and open_connections > limit:
        return Disposition.CLOSE, "above MaxConnectionsPercent"
    if needs_reset:
        return Disposition.RESET, None
    return Disposition.REUSE, None
