"""One health monitor for `Workers: N` (failover/follower.py, workers/hub.py, peer.py b"V") and the
fencing decision on disk (failover/fencing.py).  task.Clock, fake probes, fake pools; no sockets.

The "hub" below is a real WriterMonitor whose rounds are turned into verdicts (verdict_of) and
handed to FollowerMonitors, as the supervisor's hub pushes them to the workers."""

import json
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from txrdsproxy.config.load import ConfigError, parse_config
from txrdsproxy.config.model import ConnectionPoolConfig, DBProxyTarget
from txrdsproxy.failover import monitor as mon
from txrdsproxy.failover.fencing import STATE_FILE, FenceStore
from txrdsproxy.failover.follower import FollowerMonitor, verdict_of
from txrdsproxy.failover.monitor import TargetHealth, WriterMonitor
from txrdsproxy.failover.topology import ProbeResult, Topology
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy.connector import BackendGone, TargetUnreachable
from txrdsproxy.testing.deferreds import result

try:
    from test_failover import INTERVAL, KEY, RO, RW, FakeConnector, FakeProbes, S, W, retries_done
except ImportError:
    from tests.unit.test_failover import INTERVAL, KEY, RO, RW, FakeConnector, FakeProbes, S, W, retries_done

PRIMARY = ProbeResult(RW, replica=False)
STANDBY = ProbeResult(RO, replica=True)


class Hub:
    """A WriterMonitor as the supervisor runs it: each round's verdict goes to `sent`."""

    def __init__(self, clock, answers, fences=None, targets=(W, S)):
        self.clock = clock
        self.topology = Topology(targets)
        self.health = TargetHealth(clock)
        self.probes = FakeProbes(answers)
        self.monitor = WriterMonitor(clock, self.topology, self.health, self.probes, INTERVAL,
                                     unreachable=(TargetUnreachable,), fences=fences)
        self.monitor.proxy_name = "p"
        self.seq, self.sent, self.moves, self.cut, self.why = 0, [], [], [], None
        self.monitor.writer_listeners.append(self._moved)
        self.monitor.vanished_listeners.append(lambda t, why: self.cut.append((t, why)))
        self.monitor.round_listeners.append(self._round)

    def _moved(self, old, new, why):
        self.moves.append((old, new, why))
        self.why = why

    def _round(self, results):
        self.seq += 1
        self.sent.append(verdict_of(self.monitor, results, self.seq, self.moves, self.cut, self.why))
        self.moves, self.cut = [], []

    @property
    def last(self):
        return json.loads(json.dumps(self.sent[-1]))  # as it travels: JSON


class Worker:
    """One worker's side: its own topology, health, pool and a FollowerMonitor."""

    def __init__(self, clock, hub=None, targets=(W, S)):
        self.clock = clock
        self.topology = Topology(targets)
        self.health = TargetHealth(clock)
        self.connector = FakeConnector(self.topology)
        self.pool = BackendPool("p", self.connector, ConnectionPoolConfig(connection_borrow_timeout=30),
                                clock)
        self.asks = []
        self.hub = hub
        self.monitor = FollowerMonitor(clock, "p", self.topology, self.health, INTERVAL, pool=self.pool,
                                       ask=self.ask)
        self.pool.failover = self.monitor
        self.moved, self.vanished, self.rounds = [], [], []
        self.monitor.writer_listeners.append(lambda old, new, why: self.moved.append((old, new, why)))
        self.monitor.vanished_listeners.append(lambda t, why: self.vanished.append(t))
        self.monitor.round_listeners.append(self.rounds.append)

    def ask(self, name):
        """The hub answers at once with its last verdict ({} before its first round); with no
        hub, the request hangs (cancelled by the follower's stop)."""
        self.asks.append(name)
        if self.hub is None:
            return defer.Deferred()
        return defer.succeed(self.hub.last if self.hub.sent else {})

    def lend(self):
        d = self.pool.borrow(KEY)
        conn = self.connector.complete()
        return result(d), conn


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events, level=None):
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events if level is None or e.get("log_level") == level]


# -- the fencing state file ---------------------------------------------------------------------------
def test_fence_store_round_trip_is_atomic_and_writes_only_changes(tmp_path):
    store = FenceStore.in_directory(str(tmp_path / "state"))
    assert store.read("p") == (None, {})
    assert store.save("p", "db-2", {"db-1": "db-2"}) is True
    assert store.save("p", "db-2", {"db-1": "db-2"}) is False  # unchanged: not rewritten
    store.save("q", "x", {})
    assert sorted(os.listdir(tmp_path / "state")) == [STATE_FILE]  # no temporary file left
    again = FenceStore.in_directory(str(tmp_path / "state"))  # a new process
    assert again.read("p") == ("db-2", {"db-1": "db-2"}) and again.read("q") == ("x", {})
    data = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    assert data["version"] == 1 and data["proxies"]["p"] == {"writer": "db-2", "fenced": {"db-1": "db-2"}}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"proxies": 3}'])
def test_a_state_file_that_cannot_be_read_is_logged_and_empty(tmp_path, logged, content):
    (tmp_path / STATE_FILE).write_text(content)
    store = FenceStore.in_directory(str(tmp_path))
    assert store.read("p") == (None, {})
    assert any(STATE_FILE in t for t in texts(logged, LogLevel.error))
    assert store.save("p", "db-1", {}) is True  # and it is replaced by a good one
    assert FenceStore.in_directory(str(tmp_path)).read("p") == ("db-1", {})


def test_a_state_file_that_cannot_be_written_keeps_the_fence_in_memory(tmp_path, logged):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = FenceStore(str(blocker / STATE_FILE))  # its folder is a file
    assert store.save("p", "db-2", {"db-1": "db-2"}) is False
    assert store.read("p") == ("db-2", {"db-1": "db-2"})
    assert any("cannot be written" in t for t in texts(logged, LogLevel.error))


def test_state_directory_config_and_default(tmp_path):
    from txrdsproxy.service import state_directory
    base = parse_config({"DBProxies": []}, "x.yaml", str(tmp_path))
    assert base.state_directory == "" and state_directory(base) is None  # no file: memory only
    assert state_directory(base, str(tmp_path / "proxy.yaml")) == str(tmp_path)
    own = parse_config({"DBProxies": [], "StateDirectory": "state"}, "x.yaml", str(tmp_path))
    assert own.state_directory == os.path.join(str(tmp_path), "state") == state_directory(own)
    with pytest.raises(ConfigError, match="StateDirectory"):
        parse_config({"DBProxies": [], "StateDirectory": ""}, "x.yaml", str(tmp_path))


def _failover_fencing(store, clock):
    """A monitor over W (writer) and S; W vanishes, S is promoted: W is fenced (saved)."""
    hub = Hub(clock, {W: PRIMARY, S: STANDBY}, fences=store.for_proxy("p"))
    hub.monitor.start()
    hub.probes.answers[W] = TargetUnreachable("connection refused")
    hub.probes.answers[S] = PRIMARY
    clock.advance(INTERVAL)
    retries_done(clock)
    assert hub.topology.current_writer() is S and W in hub.monitor.fenced
    hub.monitor.stop()
    return hub


def test_a_restarted_monitor_keeps_the_fence_and_the_promoted_writer(tmp_path):
    store = FenceStore.in_directory(str(tmp_path))
    _failover_fencing(store, Clock())
    assert FenceStore.in_directory(str(tmp_path)).read("p") == ("db-2", {"db-1": "db-2"})

    # The restart: a new process, the configuration still names W first (the writer at start
    # without the file).  W is back read-write (a split brain), S too.
    clock = Clock()
    after = Hub(clock, {W: PRIMARY, S: PRIMARY}, fences=FenceStore.in_directory(str(tmp_path)).for_proxy("p"))
    assert after.topology.current_writer() is W
    after.monitor.start()
    assert after.topology.current_writer() is S
    assert after.health.health_of(W).reason == mon.INVALID_REPLICATION_STATE
    assert after.health.health_of(S).state == mon.AVAILABLE
    for _ in range(3):
        clock.advance(INTERVAL)
        assert after.topology.current_writer() is S
    # S goes away: the proxy stays without a writer rather than go back to W.
    after.probes.answers[S] = TargetUnreachable("connection refused")
    clock.advance(INTERVAL)
    retries_done(clock)
    assert after.topology.current_writer() is None
    assert after.health.health_of(W).reason == mon.INVALID_REPLICATION_STATE


def test_without_the_file_the_restarted_monitor_would_take_the_former_writer():
    # What the state file prevents (the same restart, memory only).
    clock = Clock()
    after = Hub(clock, {W: PRIMARY, S: PRIMARY})
    after.monitor.start()
    assert after.topology.current_writer() is W


def test_a_remembered_fence_on_the_configured_writer_without_a_remembered_writer(tmp_path):
    store = FenceStore.in_directory(str(tmp_path))
    store.save("p", None, {"db-1": "db-2"})
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: None}, fences=FenceStore.in_directory(str(tmp_path)).for_proxy("p"))
    hub.monitor.start()  # S's check hangs: no writer yet, and never W
    assert hub.topology.current_writer() is None
    hub.probes.answers[S] = PRIMARY
    clock.advance(hub.monitor.probe_timeout)  # the hanging check times out: still no writer
    assert hub.topology.current_writer() is None
    clock.advance(INTERVAL)
    assert hub.topology.current_writer() is S
    assert hub.health.health_of(W).reason == mon.INVALID_REPLICATION_STATE


def test_unfencing_is_written_too(tmp_path):
    store = FenceStore.in_directory(str(tmp_path))
    clock = Clock()
    hub = _failover_fencing(store, clock)
    hub.monitor.unfence(W)  # registered again
    assert FenceStore.in_directory(str(tmp_path)).read("p") == ("db-2", {})
    # ... and a former writer that rejoined as a standby is trusted again, on disk as well.
    store2 = FenceStore.in_directory(str(tmp_path / "b"))
    hub = _failover_fencing(store2, Clock())
    hub.monitor._running = True
    hub.probes.answers[W] = STANDBY
    hub.monitor._run_round()
    assert W not in hub.monitor.fenced
    assert FenceStore.in_directory(str(tmp_path / "b")).read("p") == ("db-2", {})


# -- followers ----------------------------------------------------------------------------------------------
def test_followers_have_no_writer_until_the_first_verdict_then_follow_it():
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    worker = Worker(clock, hub)
    worker.monitor.start()  # the hub has no verdict yet: {}
    assert worker.asks == ["p"] and worker.topology.current_writer() is None
    waiting = worker.pool.borrow(KEY)  # waits for a writer, as during a failover
    assert not waiting.called and not worker.connector.pending
    hub.monitor.start()
    assert worker.monitor.apply(hub.last)
    assert worker.topology.current_writer() is W
    worker.connector.complete()  # the waiting borrow went on to W
    assert result(waiting).conn.target is W
    assert worker.topology.probed_role(S) == RO
    assert worker.health.health_of(W) == hub.health.health_of(W)
    assert worker.health.health_of(S) == hub.health.health_of(S)
    assert not worker.monitor.apply(hub.last)  # the same verdict again: nothing to do
    assert len(worker.rounds) == 1 and set(worker.rounds[0]) == {W, S}


def test_every_follower_switches_on_the_verdict_that_promotes():
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    hub.monitor.start()
    workers = [Worker(clock, hub) for _ in range(2)]
    held = []
    for worker in workers:
        worker.monitor.start()  # takes the hub's last verdict at once
        lease, conn = worker.lend()
        held.append((lease, conn))
        assert conn.target is W
    hub.probes.answers[W] = TargetUnreachable("connection refused")
    hub.probes.answers[S] = PRIMARY
    clock.advance(INTERVAL)
    retries_done(clock)
    verdict = hub.last
    assert verdict["writer"] == "db-2" and verdict["moves"] == [["db-1", "db-2", "failover"]]
    assert verdict["fenced"] == {"db-1": "db-2"} and verdict["promoted"] == {"db-2": "db-1"}
    for worker, (lease, conn) in zip(workers, held):
        worker.monitor.apply(verdict)
        assert worker.topology.current_writer() is S
        assert worker.moved == [(W, S, "failover")]
        assert worker.monitor.fenced == {W: S}
        assert worker.health.health_of(S).reason == mon.PROMOTED
        lease.release()  # retired by the failover: closed, not lent again
        assert conn.state == "closed"
        d = worker.pool.borrow(KEY)
        assert worker.connector.complete().target is S and result(d)


def test_a_follower_that_missed_verdicts_still_moves_off_the_former_writer():
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    hub.monitor.start()
    worker = Worker(clock, hub)
    worker.monitor.start()
    lease, conn = worker.lend()
    lease.release()
    hub.probes.answers[W] = ProbeResult(RO, replica=False)  # demoted: made read-only
    clock.advance(INTERVAL)
    demoted = hub.last
    assert demoted["writer"] is None and demoted["why"] == "writer demoted"
    hub.probes.answers[S] = PRIMARY
    clock.advance(INTERVAL)
    # The worker did not get the first verdict; the second still moves it (and its pool) off W.
    worker.monitor.apply(hub.last)
    assert worker.topology.current_writer() is S and worker.moved == [(W, S, "failover")]
    assert conn.state == "closed"


def test_a_follower_applies_demotion_and_vanished_targets():
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    hub.monitor.start()
    worker = Worker(clock, hub)
    worker.monitor.start()
    lease, conn = worker.lend()
    lease.release()
    hub.probes.answers[W] = ProbeResult(RO, replica=False)
    clock.advance(INTERVAL)
    worker.monitor.apply(hub.last)
    assert worker.topology.current_writer() is None
    assert worker.moved == [(W, None, "writer demoted")] and conn.state == "closed"
    # S stops answering: after VANISHED_AFTER silent rounds its connections are cut everywhere.
    hub.probes.answers[S] = None
    for _ in range(WriterMonitor.VANISHED_AFTER):
        clock.advance(INTERVAL)
        clock.advance(hub.monitor.probe_timeout)
        worker.monitor.apply(hub.last)
    assert worker.vanished == [S]


def test_a_follower_restarted_mid_failover_never_takes_the_configured_writer():
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    hub.monitor.start()
    hub.probes.answers[W] = TargetUnreachable("connection refused")
    hub.probes.answers[S] = PRIMARY
    clock.advance(INTERVAL)
    retries_done(clock)
    hub.probes.answers[W] = PRIMARY  # the former writer is back read-write: fenced
    clock.advance(INTERVAL)
    late = Worker(clock, hub)  # a worker (re)started now: its configuration names W first
    assert late.topology.current_writer() is W
    late.monitor.start()
    assert late.topology.current_writer() is S
    assert late.health.health_of(W).reason == mon.INVALID_REPLICATION_STATE
    assert late.moved == []  # nothing to move: it never had W


def test_a_follower_that_hears_nothing_keeps_its_last_verdict_and_says_so(logged):
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    hub.monitor.start()
    worker = Worker(clock, hub)
    worker.monitor.start()
    assert worker.topology.current_writer() is W
    worker.hub = None  # the monitor cannot be reached any more: requests hang
    asks = len(worker.asks)
    clock.advance(worker.monitor.stale_after)
    assert worker.monitor.stale and worker.topology.current_writer() is W
    warnings = [t for t in texts(logged, LogLevel.warn) if "no verdict from the health monitor" in t]
    assert len(warnings) == 1 and "keeping the last one (writer db-1)" in warnings[0]
    assert len(worker.asks) == asks + 1  # asked again (one request at a time)
    clock.advance(worker.monitor.stale_after * 3)
    assert len([t for t in texts(logged, LogLevel.warn) if "no verdict" in t]) == 1  # said once
    assert len(worker.asks) == asks + 1  # the hanging request is not stacked on
    clock.advance(INTERVAL)
    worker.monitor.apply(hub.last)
    assert not worker.monitor.stale
    assert any("verdicts from the health monitor again" in t for t in texts(logged, LogLevel.info))
    worker.monitor.stop()
    assert worker.monitor._timer is None  # no staleness check left behind


def test_a_follower_asks_for_a_round_on_a_lost_or_refused_connection():
    clock = Clock()
    worker = Worker(clock)
    worker.hub = None
    worker.monitor.start()
    assert len(worker.asks) == 1
    worker.monitor.connection_lost()  # one request under way: not another
    assert len(worker.asks) == 1
    worker.monitor.stop()
    worker.monitor._running = True
    worker.monitor.connection_lost()
    assert len(worker.asks) == 2
    from twisted.python.failure import Failure
    assert worker.monitor.connection_failed(Failure(BackendGone("refused"))) is True


def test_a_followers_own_connection_attempts_do_not_write_target_health():
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    hub.monitor.start()
    worker = Worker(clock, hub)
    worker.monitor.start()
    record = worker.health.health_of(W)
    worker.health.record_failure(W, mon.UNREACHABLE, "refused")  # the connector's attempt
    worker.health.record_promoted(S)
    assert worker.health.health_of(W) == record == hub.health.health_of(W)
    assert worker.health.health_of(S).reason is None


def test_a_verdict_naming_a_target_the_worker_does_not_have_yet():
    clock = Clock()
    other = DBProxyTarget("db-3", "10.0.0.3", 5432)
    hub = Hub(clock, {W: PRIMARY, S: STANDBY, other: STANDBY}, targets=(W, S, other))
    hub.monitor.start()
    worker = Worker(clock, hub)  # its file has not been re-read yet: W and S only
    worker.monitor.start()
    hub.probes.answers[W] = TargetUnreachable("connection refused")
    hub.probes.answers[other] = PRIMARY
    clock.advance(INTERVAL)
    retries_done(clock)
    assert hub.last["writer"] == "db-3"
    worker.monitor.apply(hub.last)
    assert worker.topology.current_writer() is None  # waits rather than guess


# -- the channel --------------------------------------------------------------------------------------------
def _peer(verdicts):
    from txrdsproxy.workers.peer import PeerFactory
    factory = PeerFactory({}, Clock(), verdicts=verdicts)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


@pytest.mark.parametrize("step", [None, 1, 7])
def test_a_verdict_request_whole_or_in_pieces(step):
    from txrdsproxy.workers.peer import _VLEN
    got = []
    body = json.dumps({"proxy": "p", "seq": 1}).encode()
    message = b"V" + _VLEN.pack(len(body)) + body
    proto, transport = _peer(lambda payload: got.append(payload) or b'{"holds": []}')
    chunks = [message] if step is None else [message[i:i + step] for i in range(0, len(message), step)]
    for chunk in chunks:
        proto.dataReceived(chunk)
    assert got == [body] and transport.value() == b'{"holds": []}' and transport.disconnecting


def test_a_verdict_request_with_a_lying_length_is_cut():
    from txrdsproxy.workers.peer import _VLEN, MAX_VERDICT
    proto, transport = _peer(lambda payload: pytest.fail("applied"))
    proto.dataReceived(b"V" + _VLEN.pack(MAX_VERDICT + 1) + b"{}")
    assert transport.disconnected or transport.disconnecting


def test_receive_verdict_applies_it_and_answers_what_the_pool_holds():
    from txrdsproxy.workers.hub import receive_verdict
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    hub.monitor.start()
    worker = Worker(clock)
    worker.monitor.start()
    lease, conn = None, None

    class Ctx:
        name, monitor, pool = "p", worker.monitor, worker.pool

    answer = json.loads(receive_verdict(lambda: [Ctx], json.dumps(hub.sent[-1]).encode()))
    assert answer == {"holds": []} and worker.topology.current_writer() is W
    lease, conn = worker.lend()
    answer = json.loads(receive_verdict(lambda: [Ctx], json.dumps(dict(hub.sent[-1], seq=2)).encode()))
    assert answer == {"holds": ["db-1"]}
    assert receive_verdict(lambda: [Ctx], json.dumps({"proxy": "other"}).encode()) == b'{"holds": []}'


def test_the_hub_ends_promoted_only_when_no_worker_holds_the_former_writer(monkeypatch):
    from txrdsproxy.workers import hub as hub_mod
    sent = []

    def fake_send(path, payload, reactor, timeout, limit, who, quiet=False):
        sent.append(path)
        return defer.Deferred()

    monkeypatch.setattr(hub_mod, "send_request", fake_send)
    clock = Clock()
    central = hub_mod.MonitorHub(parse_config({"DBProxies": []}), "x.yaml", clock, live=lambda: [0, 1])
    central.rundir = "/run"

    class Ctx:
        name = "p"

    h = Hub(clock, {W: PRIMARY, S: STANDBY})
    Ctx.monitor = h.monitor
    watched = hub_mod._Watched(central, Ctx)
    h.monitor.former_held = watched.former_held
    h.monitor.round_listeners.append(watched.round_done)
    h.monitor.start()
    assert sorted(sent) == ["/run/peer-0.sock", "/run/peer-1.sock"]  # pushed to both workers
    central._pushed(b'{"holds": ["db-1"]}', watched, 0)
    central._pushed(b'{"holds": ["db-1"]}', watched, 1)
    h.probes.answers[W] = TargetUnreachable("connection refused")
    h.probes.answers[S] = PRIMARY
    clock.advance(INTERVAL)
    retries_done(clock)
    assert h.health.health_of(S).reason == mon.PROMOTED
    central._pushed(b'{"holds": []}', watched, 0)  # worker 1 still holds a connection to W
    clock.advance(INTERVAL)
    assert h.health.health_of(S).reason == mon.PROMOTED
    central._pushed(b'{"holds": []}', watched, 1)
    clock.advance(INTERVAL)
    assert h.health.health_of(S).reason is None
    assert central.seq["p"] == watched.last["seq"] == h.monitor.rounds


# -- the hub follows the configuration file -------------------------------------------------------------
def _hub_config(path, targets, name="p"):
    import yaml
    secrets = path.parent / "secrets.json"
    secrets.write_text(json.dumps({"arn:s": {"username": "u", "password": "pw"}}))
    os.chmod(secrets, 0o600)
    path.write_text(yaml.safe_dump({
        "Secrets": {"Backend": "file", "Path": "secrets.json"}, "Workers": 2,
        "DBProxies": [{"DBProxyName": name, "EngineFamily": "POSTGRESQL", "Listen": "tcp:0",
                       "HealthCheckInterval": 5,
                       "Auth": [{"SecretArn": "arn:s"}],
                       "TargetGroups": [{"TargetGroupName": "default", "Targets": [
                           {"RdsResourceId": t, "Endpoint": "127.0.0.1", "Port": 5400 + i}
                           for i, t in enumerate(targets)]}]}]}))


def test_the_hub_follows_reloads_and_keeps_its_fences(tmp_path, logged, monkeypatch):
    from txrdsproxy.config.load import load_config
    from txrdsproxy.failover.checks import HealthChecks
    from txrdsproxy.workers.hub import MonitorHub
    answers = {"db-1": TargetUnreachable("refused"), "db-2": PRIMARY, "db-3": STANDBY}
    monkeypatch.setattr(HealthChecks, "probe", lambda self, target: (
        defer.fail(answers[target.rds_resource_id]) if isinstance(answers[target.rds_resource_id], Exception)
        else defer.succeed(answers[target.rds_resource_id])))
    path = tmp_path / "proxy.yaml"
    _hub_config(path, ["db-1", "db-2"])
    clock = Clock()
    hub = MonitorHub(load_config(str(path)), str(path), clock)
    hub.start(None)  # no run directory: nothing to push to, no socket (a Clock cannot listen)
    watched = hub.proxies["p"]
    assert watched.ctx.topology.current_writer().rds_resource_id == "db-2"  # db-1 refused
    assert {t.rds_resource_id for t in watched.monitor.fenced} == {"db-1"}
    assert hub.figures() == [("p", watched.monitor.rounds, watched.checks)]

    hub.reload()  # the file did not change: the same monitor goes on
    assert hub.proxies["p"] is watched
    _hub_config(path, ["db-1", "db-2", "db-3"])  # a target registered (written by a worker)
    hub.reload()
    rebuilt = hub.proxies["p"]
    assert rebuilt is not watched and not watched.monitor._running
    assert [t.rds_resource_id for t in rebuilt.ctx.topology.targets] == ["db-1", "db-2", "db-3"]
    # what was decided carries over (the state file): db-2 the writer, db-1 fenced
    assert rebuilt.ctx.topology.current_writer().rds_resource_id == "db-2"
    assert {t.rds_resource_id for t in rebuilt.monitor.fenced} == {"db-1"}
    assert hub.seq.get("p", 0) >= watched.last["seq"]  # verdicts keep counting up

    path.write_text("DBProxies: [")  # invalid: nothing changes
    hub.reload()
    assert hub.proxies["p"] is rebuilt
    assert any("keeps checking the configuration it had" in t for t in texts(logged, LogLevel.error))

    _hub_config(path, ["db-1"])  # one target: no monitor any more
    hub.reload()
    assert hub.proxies == {} and not rebuilt.monitor._running
    hub.stop()


def test_a_target_registered_again_in_a_worker_is_unfenced_by_the_hub():
    from txrdsproxy.workers.hub import MonitorHub, _Ask, _packed, _Watched
    clock = Clock()
    h = Hub(clock, {W: PRIMARY, S: STANDBY})
    h.monitor.start()
    h.probes.answers[W] = TargetUnreachable("connection refused")
    h.probes.answers[S] = PRIMARY
    clock.advance(INTERVAL)
    retries_done(clock)
    assert W in h.monitor.fenced

    central = MonitorHub(parse_config({"DBProxies": []}), "x.yaml", clock)

    class Ctx:
        name, monitor = "p", h.monitor

    central.proxies["p"] = _Watched(central, Ctx)
    told = []
    worker = Worker(clock, h)
    worker.monitor.tell_unfence = lambda name, ident: told.append((name, ident))
    worker.monitor.start()
    worker.monitor.unfence(W)  # runtime._apply_target_group: W registered again
    assert told == [("p", "db-1")]
    # ... which reaches the hub's socket as b"U" + name + id, in pieces or whole
    message = b"U" + _packed(*told[0])
    for step in (1, len(message)):
        proto = _Ask(central)
        transport = StringTransport()
        proto.makeConnection(transport)
        for i in range(0, len(message), step):
            proto.dataReceived(message[i:i + step])
        assert transport.value() == b"OK"
    assert W not in h.monitor.fenced
    bad = _Ask(central)
    transport = StringTransport()
    bad.makeConnection(transport)
    bad.dataReceived(b"X")
    assert transport.disconnecting or transport.disconnected


def test_a_followers_reader_set_judges_lag_like_the_monitors():
    from txrdsproxy.endpoints import attach_monitor
    from txrdsproxy.failover.readers import ReaderSet
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: ProbeResult(RO, lag=0.0, replica=True)})
    hub_readers = ReaderSet(hub.topology, hub.health, clock, max_lag=1.0)
    attach_monitor(hub_readers, hub.monitor)
    hub.monitor.round_listeners.remove(hub._round)
    hub.monitor.round_listeners.append(hub._round)  # the verdict after the reader set's round
    hub.monitor.start()
    worker = Worker(clock, hub)
    readers = ReaderSet(worker.topology, worker.health, clock, max_lag=1.0)
    attach_monitor(readers, worker.monitor)
    worker.monitor.start()
    assert readers.eligible() == hub_readers.eligible() == (S,)
    for lag, member in ((30.0, True), (0.0, True), (30.0, True), (31.0, False), (0.5, True)):
        hub.probes.answers[S] = ProbeResult(RO, lag=lag, replica=True)
        clock.advance(INTERVAL)
        worker.monitor.apply(hub.last)
        assert (S in readers.eligible()) is member is (S in hub_readers.eligible()), lag
        assert worker.health.health_of(S) == hub.health.health_of(S)


def test_both_monitors_provide_the_seam_the_pool_and_runtime_use():
    from zope.interface.verify import verifyObject

    from txrdsproxy.failover.interfaces import IWriterMonitor
    clock = Clock()
    hub = Hub(clock, {W: PRIMARY, S: STANDBY})
    worker = Worker(clock, hub)
    assert verifyObject(IWriterMonitor, hub.monitor) and not hub.monitor.follows
    assert verifyObject(IWriterMonitor, worker.monitor) and worker.monitor.follows
