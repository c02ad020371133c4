"""IdleClientTimeout through one sweep per proxy (proxy/idle_sweep.py), on task.Clock.

The sweep replaces one DelayedCall per idle session; what must still hold: a session idle for
IdleClientTimeout is closed, never before its deadline and at most MIN_INTERVAL after it; a busy
session is left alone and its idle time counts from its request's end; a reload that shortens the
timeout applies at once; no timer is left once no session is logged in; a bug in one session ends
that session only.  The frontends' own tests (test_pg_frontend, test_mysql_frontend) run the same
rules through real sessions.
"""

import types

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock

from txrdsproxy.proxy.idle_sweep import MAX_INTERVAL, MIN_INTERVAL, IdleSweep

from tests.unit import test_pg_frontend as pg
from tests.unit.test_session_memory import PgOnSharedContext


class FakeSession:
    """What the sweep reads and calls on a session."""

    def __init__(self, clock, name):
        self.clock, self.name = clock, name
        self.last_active = clock.seconds()
        self.busy = False
        self.closed_at = None
        self.failures = []

    def idle_timed_out(self, timeout):
        assert self.closed_at is None, "%s closed twice" % self.name
        self.closed_at = self.clock.seconds()

    def unexpected(self, failure, where):
        self.failures.append((failure, where))


class BrokenSession(FakeSession):
    @property
    def busy(self):
        raise RuntimeError("a bug in this session")

    @busy.setter
    def busy(self, value):
        pass


def new_sweep(timeout):
    clock = Clock()
    ctx = types.SimpleNamespace(clock=clock, config=types.SimpleNamespace(idle_client_timeout=timeout))
    return clock, ctx, IdleSweep(ctx)


def run_until(clock, end, step=None):
    """Advance *clock* to *end*, stopping at every pending call's time (or every *step*)."""
    while clock.seconds() < end:
        stop = end
        if step is not None:
            stop = min(stop, clock.seconds() + step)
        pending = [c.getTime() for c in clock.getDelayedCalls()]
        if pending:
            stop = min(stop, max(min(pending), clock.seconds()))
        clock.advance(stop - clock.seconds())


@settings(max_examples=60, deadline=None)
@given(timeout=st.integers(1, 120),
       logins=st.lists(st.tuples(st.integers(0, 300), st.lists(st.integers(0, 300), max_size=4)),
                       min_size=1, max_size=12))
def test_every_idle_session_closes_between_its_deadline_and_one_interval_later(timeout, logins):
    """Sessions log in at spread times and are active now and then: each is closed no earlier
    than its last activity + IdleClientTimeout and no later than MIN_INTERVAL after that."""
    clock, ctx, sweep = new_sweep(float(timeout))
    events = sorted([(at, 0, i) for i, (at, _) in enumerate(logins)]  # 0: login, 1: activity
                    + [(at + a, 1, i) for i, (at, acts) in enumerate(logins) for a in acts])
    sessions = {}
    for at, what, i in events:
        run_until(clock, at)
        if what == 0:
            sessions[i] = s = FakeSession(clock, i)
            sweep.track(s)
        elif sessions[i].closed_at is None:
            sessions[i].last_active = clock.seconds()
    run_until(clock, 300 * 2 + timeout + 2 * MAX_INTERVAL)
    for s in sessions.values():
        deadline = s.last_active + timeout
        assert s.closed_at is not None, s.name
        assert deadline <= s.closed_at <= deadline + MIN_INTERVAL, (s.name, deadline, s.closed_at)
    assert clock.getDelayedCalls() == [] and sweep.sessions == set()


def test_one_timer_for_all_sessions_and_none_once_they_left():
    clock, ctx, sweep = new_sweep(1800.0)
    sessions = [FakeSession(clock, i) for i in range(100)]
    for s in sessions:
        sweep.track(s)
        clock.advance(0.5)
    assert len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() - clock.seconds() <= MAX_INTERVAL
    for s in sessions:
        sweep.forget(s)
    assert clock.getDelayedCalls() == []
    assert [s.closed_at for s in sessions] == [None] * 100


def test_walks_at_most_once_per_min_interval_and_once_per_max_interval_at_least():
    """Many sessions with deadlines a fraction of a second apart: at most one walk per
    MIN_INTERVAL; a long timeout: a walk every MAX_INTERVAL (so a reload or a busy session's
    end is looked at soon)."""
    clock, ctx, sweep = new_sweep(5.0)
    looked = []  # clock times at which the sweep asked a session whether it is busy

    class Watched(FakeSession):
        @property
        def busy(self):
            looked.append(self.clock.seconds())
            return False

        @busy.setter
        def busy(self, value):
            pass

    for i in range(50):
        sweep.track(Watched(clock, i))
        clock.advance(0.1)
    run_until(clock, 20, step=0.05)
    walks = sorted(set(looked))
    assert len(walks) >= 2
    assert all(b - a >= MIN_INTERVAL - 1e-9 for a, b in zip(walks, walks[1:])), walks
    clock2, ctx2, sweep2 = new_sweep(3600.0)
    s = FakeSession(clock2, "long")
    sweep2.track(s)
    times = []
    for _ in range(4):
        times.append(clock2.getDelayedCalls()[0].getTime())
        clock2.advance(MAX_INTERVAL)
    assert [b - a for a, b in zip(times, times[1:])] == [MAX_INTERVAL] * 3


def test_a_busy_session_is_left_alone_and_its_idle_time_counts_from_the_request_end():
    clock, ctx, sweep = new_sweep(100.0)
    s = FakeSession(clock, "busy")
    sweep.track(s)
    s.busy = True
    clock.advance(500)
    assert s.closed_at is None
    s.busy, s.last_active = False, clock.seconds()
    run_until(clock, 599.75)
    assert s.closed_at is None
    run_until(clock, 600 + MIN_INTERVAL)
    assert 600 <= s.closed_at <= 600 + MIN_INTERVAL


def test_a_reload_that_shortens_the_timeout_applies_at_once():
    clock, ctx, sweep = new_sweep(1800.0)
    s = FakeSession(clock, "a")
    sweep.track(s)
    clock.advance(100)
    ctx.config.idle_client_timeout = 60.0
    sweep.reschedule()
    clock.advance(0)
    assert s.closed_at == 100
    assert clock.getDelayedCalls() == []


def test_a_session_whose_checks_raise_is_ended_alone():
    clock, ctx, sweep = new_sweep(10.0)
    broken, fine = BrokenSession(clock, "broken"), FakeSession(clock, "fine")
    sweep.track(broken)
    sweep.track(fine)
    run_until(clock, 10 + MIN_INTERVAL)
    assert [w for _, w in broken.failures] == ["the idle sweep"]
    assert broken.failures[0][0].check(RuntimeError)
    assert 10 <= fine.closed_at <= 10 + MIN_INTERVAL
    assert clock.getDelayedCalls() == []


def test_real_sessions_share_the_sweep_and_leave_it():
    """PgFrontends of one proxy: logged in, they are tracked by the context's sweep and hold no
    timer of their own; gone, they are forgotten (no reference kept)."""
    base = pg.Harness(IdleClientTimeout=100)
    base.login()
    others = [PgOnSharedContext(base) for _ in range(5)]
    for h in others:
        h.login()
    sweep = base.ctx.idle_sweep
    assert sweep.sessions == {base.frontend} | {h.frontend for h in others}
    assert [c.func for c in base.clock.getDelayedCalls()] == [sweep._sweep]
    others[0].lose()
    assert others[0].frontend not in sweep.sessions
    base.clock.advance(100)
    assert base.closed and all(h.closed for h in others[1:])
