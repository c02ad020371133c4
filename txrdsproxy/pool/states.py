"""The named states of a pooled database connection (DESIGN rule 3).

One enum for both engines' connections; the pool and the connection change it, metrics and the
admin API read it.  Members are `str` too and equal to their value ("idle"), so readers that
count or compare by name (Counter keys, JSON output, older code) see the same thing.
"""

import enum


class ConnState(str, enum.Enum):
    CONNECTING = "connecting"      # TCP connect or login under way (not yet in the pool)
    INITIALISING = "initialising"  # logged in, the proxy's own queries (InitQuery, limits) running
    IDLE = "idle"                  # in the pool, lendable
    BORROWED = "borrowed"          # lent to a session for a transaction (or for good, when pinned)
    RESETTING = "resetting"        # given back dirty: DISCARD ALL / COM_RESET_CONNECTION running
    CLOSED = "closed"

    def __str__(self):
        return self.value

    __format__ = str.__format__
