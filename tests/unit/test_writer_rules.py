"""The WriterMonitor's decision rules (issue 11 items 3 and 4): retry with backoff before the
proxy goes writer-less, never two writers (fencing of a former writer), a writer made read-only
while up, checks that answered (AUTH_FAILURE, PENDING_PROXY_CAPACITY), the probe result's lag.
task.Clock and fake probes only; the World of test_failover is reused."""

from twisted.internet import defer

from tests.unit.test_failover import INTERVAL, RO, RW, S, W, World
from txrdsproxy.testing.deferreds import result
from txrdsproxy.config.model import DBProxyTarget
from txrdsproxy.failover import monitor as mon
from txrdsproxy.failover.topology import ProbeResult
from txrdsproxy.pool.pool import BorrowTimeout
from txrdsproxy.proxy.connector import BackendGone

R = DBProxyTarget("db-3", "10.0.0.3", 5432)


class Refused(Exception):
    pass


def reasons(reason_of):
    """failure -> TargetHealth reason, from a {exception class: reason} map."""
    def failure_reason(failure):
        for cls, reason in reason_of.items():
            if failure.check(cls):
                return reason
        return mon.CONNECTION_FAILED
    return failure_reason


class Answers:
    """probe(target) whose answers for one target come from a list, one per call (the last one
    repeats), so a test can say "fails once, then answers"."""

    def __init__(self, **lists):
        self.lists = lists
        self.calls = []

    def __call__(self, target):
        self.calls.append(target)
        answers = self.lists[target.rds_resource_id]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if answer is None:
            return defer.Deferred()
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def world_with(answers, targets=(W, S), **monitor):
    world = World(targets=targets)
    world.monitor.probe = answers
    for name, value in monitor.items():
        setattr(world.monitor, name, value)
    world.changes = []
    world.monitor.writer_listeners.append(lambda old, new, why: world.changes.append((old, new, why)))
    return world


def checks_of(world, target):
    return world.monitor.probe.calls.count(target)


# -- retry with backoff before going writer-less ---------------------------------------------------
def test_one_failed_check_of_the_only_writer_is_checked_again_not_given_up():
    world = world_with(Answers(**{"db-1": [RW, BackendGone("connection reset"), RW], "db-2": [RO]}))
    world.monitor.start()
    lease, conn = world.lend()
    lease.release()
    world.clock.advance(INTERVAL)  # the second round: the writer's check fails once
    assert world.topology.current_writer() is W  # not writer-less while it is checked again
    assert world.health.health_of(W).state == mon.AVAILABLE  # no verdict yet
    world.clock.advance(0.4)
    assert checks_of(world, W) == 2
    world.clock.advance(0.1)  # 0.5 s later: checked again, answers
    assert checks_of(world, W) == 3 and world.monitor.retried == 1
    assert world.topology.writer() is W and world.monitor.last_writer is W
    assert conn.state == "idle" and world.changes == []  # nothing retired, nobody told
    assert world.health.health_of(W).state == mon.AVAILABLE
    # the round is over: the next one comes INTERVAL after it ended, not earlier
    world.clock.advance(INTERVAL - 0.1)
    assert checks_of(world, W) == 3
    world.clock.advance(0.1)
    assert checks_of(world, W) == 4


def test_retries_back_off_double_and_stop_after_the_configured_number():
    world = world_with(Answers(**{"db-1": [RW, BackendGone("refused")], "db-2": [RO]}), retries=3)
    world.monitor.start()
    world.clock.advance(INTERVAL)
    times = []
    for step in (0.5, 1.0, 2.0):
        world.clock.advance(step)
        times.append((checks_of(world, W), world.topology.current_writer()))
    assert times == [(3, W), (4, W), (5, None)]  # 0.5, 1, 2 s apart; then the writer is lost
    assert world.monitor.retried == 3
    h = world.health.health_of(W)
    assert (h.state, h.reason, h.description) == (mon.UNAVAILABLE, mon.CONNECTION_FAILED, "refused")
    world.clock.advance(10)
    assert world.monitor.retried == 3  # no writer to check again while none is known


def test_retries_never_run_past_the_next_round():
    world = world_with(Answers(**{"db-1": [RW, BackendGone("refused")], "db-2": [RO]}),
                       retries=10, retry_backoff=1.5)
    world.monitor.start()
    world.clock.advance(INTERVAL)
    for step in (1.5, 3.0):
        world.clock.advance(step)
    # 1.5 s, then 3 s (4.5 s into the round); 6 s more would pass the interval: given up
    assert world.monitor.retried == 2 and world.topology.current_writer() is None


def test_a_timed_out_check_is_not_repeated():
    world = world_with(Answers(**{"db-1": [RW, None], "db-2": [RO]}))
    world.monitor.start()
    world.clock.advance(INTERVAL)
    world.clock.advance(world.monitor.probe_timeout)
    # it already waited probe_timeout: a writer that vanished is not waited for again
    assert world.monitor.retried == 0 and world.topology.current_writer() is None
    h = world.health.health_of(W)
    assert h.reason == mon.CONNECTION_FAILED and "no answer within" in h.description


def test_no_retry_when_another_target_already_answers_as_the_writer():
    world = world_with(Answers(**{"db-1": [RW, BackendGone("refused")], "db-2": [RO, RW]}))
    world.monitor.start()
    world.clock.advance(INTERVAL)
    assert world.monitor.retried == 0 and world.topology.writer() is S
    assert world.changes == [(W, S, "failover")]


def test_retries_zero_gives_the_writer_up_at_once():
    world = world_with(Answers(**{"db-1": [RW, BackendGone("refused")], "db-2": [RO]}), retries=0)
    world.monitor.start()
    world.clock.advance(INTERVAL)
    assert world.topology.current_writer() is None and world.monitor.retried == 0


def test_borrows_during_the_retries_wait_and_then_go_to_the_writer():
    world = world_with(Answers(**{"db-1": [RW, BackendGone("refused"), RW], "db-2": [RO]}))
    world.monitor.start()
    world.clock.advance(INTERVAL)
    d = world.pool.borrow(("app", "appdb"))
    world.connector.fail(error=BackendGone("cannot connect: refused"))  # the pool hits the same blip
    assert not d.called and world.pool.stalled
    world.clock.advance(0.5)
    assert not world.pool.stalled  # the writer answered again: the waiter's connect is retried
    conn = world.connector.complete()
    assert conn.target is W and result(d).conn is conn


# -- checks that answered: the writer is up ------------------------------------------------------
def test_writer_refusing_the_check_login_stays_the_writer():
    world = world_with(Answers(**{"db-1": [RW, Refused("password authentication failed")],
                                  "db-2": [RO]}))
    world.monitor.failure_reason = reasons({Refused: mon.AUTH_FAILURE})
    world.monitor.start()
    lease, conn = world.lend()
    lease.release()
    world.clock.advance(INTERVAL * 3)
    assert world.topology.writer() is W and world.monitor.retried == 0
    h = world.health.health_of(W)
    assert (h.state, h.reason) == (mon.UNAVAILABLE, mon.AUTH_FAILURE)
    assert conn.state == "idle" and world.changes == []  # the proxy keeps serving through it


def test_writer_without_a_free_slot_for_the_check_stays_the_writer():
    world = world_with(Answers(**{"db-1": [RW, Refused("sorry, too many clients already")],
                                  "db-2": [RO]}))
    world.monitor.failure_reason = reasons({Refused: mon.PENDING_PROXY_CAPACITY})
    world.monitor.start()
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is W
    assert world.health.health_of(W).reason == mon.PENDING_PROXY_CAPACITY


def test_a_check_that_answered_does_not_hold_back_a_promoted_target():
    world = world_with(Answers(**{"db-1": [RW, Refused("password authentication failed")],
                                  "db-2": [RO, RW]}))
    world.monitor.failure_reason = reasons({Refused: mon.AUTH_FAILURE})
    world.monitor.start()
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S and world.changes == [(W, S, "failover")]
    assert W in world.monitor.fenced  # it could not say it is read-only now


# -- never two writers ------------------------------------------------------------------------
def test_a_former_writer_back_read_write_is_not_trusted_over_the_promoted_one():
    answers = Answers(**{"db-1": [RW, BackendGone("refused")], "db-2": [RO, RW]})
    world = world_with(answers, retries=0)
    world.monitor.start()
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S
    assert world.monitor.fenced == {W: S}

    answers.lists["db-1"] = [RW]  # the old primary comes back, still read-write (split brain)
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S and world.monitor.last_writer is S
    assert world.topology.role_of(W) == RO
    h = world.health.health_of(W)
    assert (h.state, h.reason) == (mon.UNAVAILABLE, mon.INVALID_REPLICATION_STATE)
    assert "db-2 was promoted" in h.description
    assert world.changes == [(W, S, "failover")]  # no move back

    # the promoted writer goes away: the fenced one is still not trusted, borrows wait
    answers.lists["db-2"] = [BackendGone("refused")]
    world.clock.advance(INTERVAL)
    assert world.topology.current_writer() is None
    d = world.pool.borrow(("app", "appdb"))
    assert world.connector.pending == []  # nothing is opened to the fenced former writer
    world.clock.advance(world.pool.config.connection_borrow_timeout)
    assert d.called and world.connector.pending == []
    d.addErrback(lambda f: f.trap(BorrowTimeout))


def test_a_fenced_former_writer_that_rejoined_read_only_may_be_promoted_later():
    answers = Answers(**{"db-1": [RW, BackendGone("refused")], "db-2": [RO, RW]})
    world = world_with(answers, retries=0)
    world.monitor.start()
    world.clock.advance(INTERVAL)
    answers.lists["db-1"] = [RO]  # rebuilt as a standby of the new writer
    world.clock.advance(INTERVAL)
    assert world.monitor.fenced == {}
    assert world.health.health_of(W).state == mon.AVAILABLE
    answers.lists.update({"db-1": [RW], "db-2": [BackendGone("refused")]})  # it is promoted back
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is W
    assert world.changes == [(W, S, "failover"), (S, W, "failover")]
    assert world.monitor.fenced == {S: W}


def test_unfence_trusts_a_registered_again_target():
    answers = Answers(**{"db-1": [RW, BackendGone("refused"), RW], "db-2": [RO, RW, BackendGone("x")]})
    world = world_with(answers, retries=0)
    world.monitor.start()
    world.clock.advance(INTERVAL)
    world.clock.advance(INTERVAL)
    assert world.topology.current_writer() is None  # W fenced, S gone
    world.monitor.unfence(W)
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is W


def test_a_writer_switched_off_cleanly_is_not_fenced():
    world = world_with(Answers(**{"db-1": [RW, RO], "db-2": [RO, RW]}))
    world.monitor.start()
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S and world.monitor.fenced == {}


def test_two_read_write_targets_at_start_keep_the_configured_writer_only():
    world = world_with(Answers(**{"db-1": [RW], "db-2": [RW], "db-3": [RO]}), targets=(W, S, R))
    world.monitor.start()
    world.clock.advance(INTERVAL * 2)
    assert world.topology.writer() is W and world.changes == []
    assert world.topology.role_of(S) == RO


# -- a writer made read-only while it stays up (switchover) ----------------------------------------
def test_a_demoted_writer_has_its_connections_retired_at_once():
    answers = Answers(**{"db-1": [RW, RO], "db-2": [RO]})
    world = world_with(answers)
    world.monitor.start()
    idle_lease, idle = world.lend()
    busy_lease, busy = world.lend(("app", "other"))
    idle_lease.release()
    world.clock.advance(INTERVAL)  # W answers READ_ONLY; S not promoted yet
    assert world.topology.current_writer() is None
    assert idle.closed_reason == "writer demoted"  # never lent again
    assert busy.state == "borrowed"  # its transaction is not cut ...
    busy_lease.release()
    assert busy.closed_reason == "writer demoted"  # ... but it is not reused after
    assert world.changes == [(W, None, "writer demoted")]
    assert world.monitor.retried == 0  # an answer, not a failure: nothing to check again

    d = world.pool.borrow(("app", "appdb"))
    assert world.connector.pending == []  # waits for a writer
    answers.lists["db-2"] = [RW]
    world.clock.advance(0)  # the borrow's NoWriter asked for a round at once
    assert world.topology.writer() is S
    conn = world.connector.complete()
    assert conn.target is S and result(d).conn is conn
    assert world.monitor.fenced == {}  # W said it is read-only: no split brain to fear
    assert world.changes[-1] == (W, S, "failover")


# -- results --------------------------------------------------------------------------------------
def test_probe_results_carry_lag_to_the_topology_and_round_listeners():
    world = world_with(Answers(**{"db-1": [ProbeResult(RW)],
                                  "db-2": [ProbeResult(RO, lag=2.5, detail="replay lag 2.5 s")]}))
    rounds = []
    world.monitor.round_listeners.append(rounds.append)
    world.monitor.start()
    assert world.topology.last_probe(S) == ProbeResult(RO, lag=2.5, detail="replay lag 2.5 s")
    assert world.topology.probed_role(W) == RW
    (first,) = rounds
    assert first[S].lag == 2.5 and first[W].role == RW


def test_a_nonsense_answer_is_a_failed_check():
    world = world_with(Answers(**{"db-1": [RW], "db-2": ["PRIMARY"]}))
    world.monitor.start()
    h = world.health.health_of(S)
    assert h.state == mon.UNAVAILABLE and "PRIMARY" in h.description
    assert world.topology.last_probe(S) is None


def test_stop_during_a_retry_cancels_it():
    world = world_with(Answers(**{"db-1": [RW, BackendGone("refused")], "db-2": [RO]}))
    world.monitor.start()
    world.clock.advance(INTERVAL)
    world.monitor.stop()
    assert world.clock.getDelayedCalls() == []
    assert world.topology.writer() is W  # nothing decided after stop



# -- a primary made read-only is not a standby ------------------------------------------------------
PRIMARY_RO = ProbeResult(RO, replica=False)  # PostgreSQL: default_transaction_read_only, not in recovery
STANDBY = ProbeResult(RO, replica=True)  # PostgreSQL: in recovery


def test_a_primary_only_made_read_only_is_fenced_and_not_trusted_when_switched_back():
    answers = Answers(**{"db-1": [RW, PRIMARY_RO], "db-2": [STANDBY, STANDBY, RW]})
    world = world_with(answers)
    world.monitor.start()
    world.clock.advance(INTERVAL)  # switchover starts: the writer is made read-only
    assert world.topology.current_writer() is None
    assert world.changes == [(W, None, "writer demoted")]
    world.clock.advance(INTERVAL)  # the standby is promoted
    assert world.topology.writer() is S
    assert world.monitor.fenced == {W: S}  # still a primary of its own: its data may diverge
    answers.lists["db-1"] = [RW]  # switched back to read-write
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S
    assert world.health.health_of(W).reason == mon.INVALID_REPLICATION_STATE
    answers.lists["db-1"] = [PRIMARY_RO]  # read-only again, still not a standby: still fenced
    world.clock.advance(INTERVAL)
    assert world.monitor.fenced == {W: S}
    answers.lists["db-1"] = [STANDBY]  # rebuilt as a standby of the new writer
    world.clock.advance(INTERVAL)
    assert world.monitor.fenced == {}


def test_a_writer_demoted_to_a_standby_is_not_fenced():
    world = world_with(Answers(**{"db-1": [RW, STANDBY], "db-2": [STANDBY, RW]}))
    world.monitor.start()
    world.clock.advance(INTERVAL)
    assert world.topology.writer() is S and world.monitor.fenced == {}


# -- property: whatever the targets answer, round after round ----------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

QUICK_FAIL = "quick-fail"  # refused / reset: retried when it is the writer's
AUTH_FAIL = "auth-fail"  # the database answered: refused the check's login
HANG = "hang"  # no answer: ProbeTimeout
ANSWERS = {"rw": RW, "primary-ro": PRIMARY_RO, "standby": STANDBY, "ro": ProbeResult(RO)}
CHOICES = sorted(ANSWERS) + [QUICK_FAIL, AUTH_FAIL, HANG]


class Scripted:
    """probe(target) answering this round's script (the same answer for retries in a round)."""

    def __init__(self):
        self.now = {}

    def __call__(self, target):
        answer = self.now[target.rds_resource_id]
        if answer == HANG:
            return defer.Deferred()
        if answer == QUICK_FAIL:
            return defer.fail(BackendGone("connection refused"))
        if answer == AUTH_FAIL:
            return defer.fail(Refused("password authentication failed"))
        return defer.succeed(ANSWERS[answer])


def one_round(world):
    """Advance the clock in steps until one more round has finished (retries and timeouts
    included)."""
    before = world.monitor.rounds
    for _ in range(200):
        world.clock.advance(0.25)
        if world.monitor.rounds > before:
            return
    raise AssertionError("a round did not finish")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(*[st.sampled_from(CHOICES)] * 3), min_size=1, max_size=12))
def test_never_two_writers_whatever_the_answers(script):
    probe = Scripted()
    probe.now = {"db-1": "rw", "db-2": "standby", "db-3": "standby"}
    world = world_with(probe, targets=(W, S, R))
    world.monitor.failure_reason = reasons({Refused: mon.AUTH_FAILURE})
    world.monitor.start()
    assert world.topology.writer() is W
    for answers in script:
        before = world.topology.current_writer()
        fenced_before = dict(world.monitor.fenced)
        probe.now = dict(zip(("db-1", "db-2", "db-3"), answers))
        one_round(world)
        said = {t: probe.now[t.rds_resource_id] for t in (W, S, R)}
        writer = world.topology.current_writer()
        if writer is not None:
            # only a target that answered read-write this round, or the writer of before whose
            # check answered without a role (login refused) and nobody else took over
            assert said[writer] == "rw" or (writer is before and said[writer] == AUTH_FAIL)
            assert writer not in world.monitor.fenced
        if before is not None and said[before] == "rw":
            assert writer is before  # a healthy writer is never moved
        if before is not None and writer is not None and writer is not before:
            assert world.changes[-1] == (before, writer, "failover")  # the pool followed
        if before is not None and writer is None and said[before] in ANSWERS:
            # it answered read-only while up: its connections are retired at once
            assert world.changes[-1] == (before, None, "writer demoted")
        for target in fenced_before:
            if target not in world.monitor.fenced:  # unfenced only by answering as a standby
                assert said[target] in ("standby", "ro"), (target, said[target])
        for target, promoted in world.monitor.fenced.items():
            assert promoted is not target
            if said[target] == "rw" and target is not writer:
                assert world.health.health_of(target).reason == mon.INVALID_REPLICATION_STATE
