"""What one client session costs in memory, counted, not timed (issue 7 item 11: 10,000 idle
sessions under 8 KB each; `make bench` prints the RSS figure).

- An idle session keeps its attributes in __slots__: with ~40 attributes, a per-instance dict
  was the largest single allocation of an idle session (1.6 KB of ~4.6 KB, tracemalloc).
- An idle session holds no timer of its own: IdleClientTimeout is one sweep per proxy.
- A session that ended is not reachable from the proxy's shared objects (context, pool, cancel
  registry, timers): the weak references to every ended session die.
"""

import gc
import weakref

import pytest

from txrdsproxy.proxy.mysql_frontend import MySQLFrontend
from txrdsproxy.proxy.pg_frontend import PgFrontend
from txrdsproxy.proxy.session import ClientSession, SessionState
from txrdsproxy.testing.fakes import ClientTransport
from txrdsproxy.wire.pg import messages as msg

from tests.unit import test_mysql_frontend as my
from tests.unit import test_pg_frontend as pg

# Attributes an idle session may keep outside its slots: `tls` is a class default (False) that
# only TLS sessions override.
OUTSIDE_SLOTS_ALLOWED = {"tls"}


def outside_slots(session):
    return set(getattr(session, "__dict__", {}))


class PgOnSharedContext(pg.Harness):
    """Another client of `base`'s proxy: same context, pool and clock."""

    def __init__(self, base):
        self.clock, self.pool, self.ctx = base.clock, base.pool, base.ctx
        self.frontend = PgFrontend(self.ctx)
        self.transport = ClientTransport()
        self.frontend.makeConnection(self.transport)

    def login(self):
        """As Harness.login; later logins on a context reuse its cached welcome (no borrow)."""
        self.md5_login()
        if self.pool.requests:
            self.pool.give()
        assert self.messages()[-1] == (b"Z", b"I")
        assert self.frontend.state is SessionState.IDLE


def pg_sessions():
    base = pg.Harness()
    base.login()
    return base, lambda: PgOnSharedContext(base)


def my_sessions():
    base = my.Harness()
    base.login()
    return base, lambda: my.Harness(ctx=base.ctx)


@pytest.mark.parametrize("engine", [pg.Harness, my.Harness], ids=["pg", "mysql"])
def test_an_idle_session_keeps_its_attributes_in_slots(engine):
    h = engine()
    h.login()
    extra = outside_slots(h.frontend) - OUTSIDE_SLOTS_ALLOWED
    assert not extra, ("attributes of an idle %s outside __slots__: %s (add them to the class's "
                       "__slots__: one instance dict per client session costs ~1.5 KB)"
                       % (type(h.frontend).__name__, sorted(extra)))


def test_slots_are_declared_on_every_session_class():
    for cls in (ClientSession, PgFrontend, MySQLFrontend):
        assert "__slots__" in cls.__dict__, cls


@pytest.mark.parametrize("sessions", [pg_sessions, my_sessions], ids=["pg", "mysql"])
def test_idle_sessions_hold_no_timer_of_their_own(sessions):
    """IdleClientTimeout is one sweep per proxy (proxy/idle_sweep.py): 20 idle sessions leave one
    pending call in the reactor, not one each (a DelayedCall with its bound method is ~0.5 KB,
    and live ones kept Twisted from purging the sessions' cancelled auth timers)."""
    base, new = sessions()
    others = [new() for _ in range(20)]
    for h in others:
        h.login()
    calls = base.clock.getDelayedCalls()
    assert [c.func for c in calls] == [base.ctx.idle_sweep._sweep], calls
    assert calls[0].getTime() <= base.clock.seconds() + base.ctx.config.idle_client_timeout
    assert base.ctx.idle_sweep.sessions == {base.frontend} | {h.frontend for h in others}


def _pg_cycle(h):
    """Log in, run one transaction on a lent connection, leave."""
    h.login()
    h.send(msg.query("SELECT 1"))
    if h.pool.requests:
        h.pool.give()
    assert h.frontend.state is SessionState.BORROWED
    h.frontend.ready_for_query(b"I")
    assert h.frontend.state is SessionState.IDLE
    h.lose()


def _my_cycle(h):
    h.login()
    h.send(my.query("SELECT 1"))
    h.lose()


@pytest.mark.parametrize("sessions, cycle", [(pg_sessions, _pg_cycle), (my_sessions, _my_cycle)],
                         ids=["pg", "mysql"])
def test_ended_sessions_leave_nothing_behind(sessions, cycle):
    base, new = sessions()
    refs = []
    for _ in range(50):
        h = new()
        cycle(h)
        refs.append(weakref.ref(h.frontend))
        del h
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == [], "%d of 50 ended sessions still reachable, e.g. from %s" % (
        len(alive), [type(o).__name__ for o in gc.get_referrers(alive[0])][:5] if alive else None)
    assert base.ctx.sessions == {base.frontend}
    assert len(base.clock.getDelayedCalls()) <= 2  # the base session's own timer (+ the pool's)
