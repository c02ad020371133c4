"""The one health monitor of `Workers: N`, run by the supervisor, and the workers' side of it.

In a single process each proxy of several targets has a WriterMonitor (failover/monitor.py).
With N workers, N monitors would probe every target N times a round and could see a failover
up to a round apart (one worker writing to the promoted target while another still writes to
the former one).  So the supervisor runs the only monitor of each proxy (`MonitorHub`): the
same WriterMonitor and reader-set lag rule, fed by the same health checks (connectors built from
the same configuration, never lending a connection), writing the fencing state file
(failover/fencing.py).  After each round it pushes the round's verdict (failover/follower.py)
to every worker that is up, on the worker's peer socket (peer.py, request b"V"); each worker's
FollowerMonitor applies it, and answers which targets its writer pool still holds connections
to, so the PROMOTED transition lasts until no worker holds one to the former writer.

A worker asks for a round now (a lost connection, a failed connect, its start) on the
supervisor's socket `<rundir>/monitor.sock`:

    b"P" + proxy name (uint16 length + UTF-8)   the hub runs a round as soon as it can and
                                                answers its last verdict (JSON; {} when it
                                                has none yet, or the proxy is unknown)
    b"U" + proxy name + target id (each uint16     the worker registered that target again (the
    length + UTF-8)                             API): the hub unfences it; answers b"OK"

Every exchange is bounded (PUSH_TIMEOUT, ASK_TIMEOUT).  A worker that cannot be reached misses
that verdict (the next round's, or its own request, brings the state again: a verdict is whole,
not a difference); a worker that cannot reach the monitor keeps its last verdict and logs it.
The hub follows the configuration file: a reload (SIGHUP, or an API change a worker wrote into
the file) rebuilds the monitor of each proxy whose settings changed; what it decided (writer,
fences) carries over through the state file.
"""

import json
import struct

from twisted.internet import protocol
from twisted.logger import Logger

from txrdsproxy.workers.peer import _VLEN, send_request

__all__ = ["MonitorHub", "ask_monitor", "tell_unfence", "receive_verdict", "PUSH_TIMEOUT",
           "ASK_TIMEOUT"]

log = Logger()

PUSH_TIMEOUT = 5.0  # seconds a worker may take to take a verdict
ASK_TIMEOUT = 5.0  # seconds the hub may take to answer a worker's request
MAX_ANSWER = 1 << 20
_LEN = struct.Struct("!H")


# -- the worker's side -----------------------------------------------------------------------------

def ask_monitor(worker, proxy_name, reactor):
    """Ask the supervisor's monitor for a round now -> Deferred[the last verdict (dict) or None].
    ({} before its first round).  Fails (RuntimeError) when it cannot be reached or its answer
    is not a verdict, after ASK_TIMEOUT at most."""
    d = send_request(worker.monitor_socket(), b"P" + _packed(proxy_name), reactor,
                     ASK_TIMEOUT, MAX_ANSWER, "the health monitor", quiet=True)

    def parsed(answer):
        if not answer:
            raise RuntimeError("no answer (not reachable, or no verdict yet)")
        verdict = json.loads(answer)
        if not isinstance(verdict, dict):
            raise RuntimeError("the answer is not a verdict")
        return verdict

    return d.addCallback(parsed)


def tell_unfence(worker, proxy_name, target_id, reactor):
    """Tell the supervisor's monitor that *target_id* was registered again (deregister and
    register: the operator trusts it) -> Deferred[bytes] (b"OK", or b"" when it could not be
    reached: its reload of the file then decides), after ASK_TIMEOUT at most."""
    return send_request(worker.monitor_socket(), b"U" + _packed(proxy_name, target_id), reactor,
                        ASK_TIMEOUT, 16, "the health monitor")


def receive_verdict(contexts, payload):
    """A verdict pushed by the hub (peer.py b"V"): -> the answer bytes (JSON: {"holds": [ids of
    the targets the proxy's writer pool holds connections to]}; none for a proxy this worker
    does not run (yet, or any more))."""
    verdict = json.loads(payload)
    ctx = next((c for c in contexts() if c.name == verdict.get("proxy")), None)
    if ctx is None:
        return b'{"holds": []}'
    monitor = ctx.monitor
    if monitor is not None and monitor.follows:
        monitor.apply(verdict)
    holds = sorted({c.target.rds_resource_id for c in ctx.pool.connections()
                    if getattr(c, "target", None) is not None})
    return json.dumps({"holds": holds}).encode()


# -- the supervisor's side ---------------------------------------------------------------------------

class _Watched:
    """One proxy's monitor in the hub: what its round did, its last verdict, the workers' pools."""

    def __init__(self, hub, ctx):
        self.hub, self.ctx = hub, ctx
        self.monitor = ctx.monitor
        self.moves, self.vanished = [], []
        self.why = None  # why the writer last moved
        self.last = None  # the last verdict
        self.holds = {}  # worker index -> set of target ids its writer pool holds connections to
        self.checks = {}  # target id -> health checks made (the probe counter)

    @property
    def name(self):
        return self.ctx.name

    def moved(self, old, new, why):
        self.moves.append((old, new, why))
        self.why = why

    def cut(self, target, why):
        self.vanished.append((target, why))

    def former_held(self, former):
        live = set(self.hub.live())
        ident = former.rds_resource_id
        return any(ident in held for index, held in self.holds.items() if index in live)

    def counting(self, probe):
        def counted(target):
            ident = target.rds_resource_id
            self.checks[ident] = self.checks.get(ident, 0) + 1
            return probe(target)
        return counted

    def round_done(self, results):
        from txrdsproxy.failover.follower import verdict_of
        seq = self.hub.seq[self.name] = self.hub.seq.get(self.name, 0) + 1
        self.last = verdict_of(self.monitor, results, seq, self.moves, self.vanished, self.why)
        self.moves, self.vanished = [], []
        self.hub.push(self)


class MonitorHub:
    """The health monitors of every proxy of *config* (read from *config_path*), in the
    supervisor.  *live*() -> indexes of the workers that are up; *rundir* (given to `start`)
    holds the workers' peer sockets and the hub's own."""

    def __init__(self, config, config_path, reactor, live=lambda: ()):
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.live = live
        self.rundir = None
        self.proxies = {}  # name -> _Watched (proxies of several targets only)
        self.seq = {}  # name -> seq of its last verdict (kept across rebuilds)
        self.secrets = None
        self.store = None
        self.port = None
        self.pushed = 0  # verdicts delivered (tests)
        self._unreachable = set()  # worker indexes whose last push failed (logged once)

    # -- life ----------------------------------------------------------------------------------------------
    def start(self, rundir):
        from txrdsproxy.service import fence_store
        self.rundir = rundir
        self.store = fence_store(self.config, self.config_path)
        self.secrets = self._secrets_store(self.config)
        for proxy in self.config.proxies:
            self._add(proxy)
        if self.proxies:
            log.info("one health monitor for every worker: {n} proxies of several targets checked "
                     "in the supervisor", n=len(self.proxies))

    def _listen(self):
        """The socket the workers ask on, bound with the first monitor (no proxy of several
        targets: nothing to ask, no socket)."""
        from txrdsproxy.runtime import bind_now
        if self.port is None and self.rundir is not None:
            self.port = bind_now(f"unix:{self.rundir}/monitor.sock:mode=600", _AskFactory(self),
                                 self.reactor, "health monitor socket")

    def stop(self):
        for watched in list(self.proxies.values()):
            self._drop(watched)
        self.proxies = {}
        self._stop_secrets()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None

    def _stop_secrets(self):
        from twisted.application import service
        if isinstance(self.secrets, service.Service) and self.secrets.running:
            self.secrets.stopService()  # the aws store's background refresh

    def _secrets_store(self, config):
        from twisted.application import service

        from txrdsproxy.auth.secrets import build_secrets_store, config_secret_arns
        secrets = build_secrets_store(config.secrets, self.reactor)
        if isinstance(secrets, service.Service):
            secrets.startService()
        secrets.watch(config_secret_arns(config))
        return secrets

    def _add(self, proxy):
        from txrdsproxy.endpoints import attach_monitor
        from txrdsproxy.runtime import build_proxy
        ctx = build_proxy(proxy, self.secrets, self.reactor, {}, None)
        monitor = ctx.monitor
        if monitor is None:  # one target: its connections decide its health, in each worker
            ctx.pool.shutdown()
            return None
        if self.store is not None:
            monitor.fences = self.store.for_proxy(proxy.name)
        monitor.proxy_name = proxy.name
        watched = _Watched(self, ctx)
        monitor.probe = watched.counting(monitor.probe)
        monitor.former_held = watched.former_held
        monitor.writer_listeners[:] = [watched.moved]  # no session here to end
        monitor.vanished_listeners.append(watched.cut)
        attach_monitor(ctx.readers, monitor)  # the lag verdicts (TargetHealth)
        monitor.round_listeners.append(watched.round_done)
        self.proxies[proxy.name] = watched
        self._listen()
        monitor.start()
        return watched

    def _drop(self, watched):
        watched.monitor.stop()
        watched.ctx.readers.stop()
        watched.ctx.pool.shutdown()

    def reload(self):
        """Re-read the configuration file: proxies added, removed or changed get their monitor
        built, stopped or built again.  An invalid file changes nothing (logged)."""
        from txrdsproxy.config.load import ConfigError, load_config
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            log.error("health monitor: {error}; it keeps checking the configuration it had", error=str(e))
            return
        old, self.config = self.config, config
        rebuild_all = config.secrets != old.secrets
        if rebuild_all:
            self._stop_secrets()
            self.secrets = self._secrets_store(config)
        else:
            from txrdsproxy.auth.secrets import config_secret_arns
            self.secrets.watch(config_secret_arns(config))
        before = {p.name: p for p in old.proxies}
        now = {p.name: p for p in config.proxies}
        for name in list(self.proxies):
            if name not in now or rebuild_all or now[name] != before.get(name):
                self._drop(self.proxies.pop(name))
        for name, proxy in now.items():
            if name not in self.proxies:
                self._add(proxy)  # new, changed, or grown to several targets

    # -- verdicts --------------------------------------------------------------------------------------------
    def push(self, watched):
        """Send *watched*'s last verdict to every worker that is up (each bounded)."""
        if self.rundir is None or watched.last is None:
            return
        body = json.dumps(watched.last).encode()
        payload = b"V" + _VLEN.pack(len(body)) + body
        live = list(self.live())
        for index in list(watched.holds):
            if index not in live:
                del watched.holds[index]  # gone: its pool is gone with it
        for index in live:
            d = send_request(f"{self.rundir}/peer-{index}.sock", payload, self.reactor, PUSH_TIMEOUT,
                             MAX_ANSWER, f"worker {index}", quiet=True)
            d.addCallback(self._pushed, watched, index)

    def _pushed(self, answer, watched, index):
        if not answer:
            if index not in self._unreachable:
                self._unreachable.add(index)
                log.warn("health monitor: worker {index} did not take the verdict of proxy {name}; "
                         "it keeps its last one until it does", index=index, name=watched.name)
            return
        if index in self._unreachable:
            self._unreachable.discard(index)
            log.info("health monitor: worker {index} takes verdicts again", index=index)
        self.pushed += 1
        try:
            watched.holds[index] = set(json.loads(answer).get("holds", ()))
        except (ValueError, AttributeError, TypeError):
            pass

    def unfence(self, name, target_id):
        """A worker registered *target_id* of proxy *name* again (the API): trusted again, even
        when the hub's reload of the file sees no change (deregistered and registered between
        two reloads) -> b"OK"."""
        watched = self.proxies.get(name)
        if watched is not None:
            for target in list(watched.monitor.fenced):
                if target.rds_resource_id == target_id:
                    watched.monitor.unfence(target)
        return b"OK"

    def answer(self, name):
        """A worker asks for proxy *name*: a round now, and the last verdict -> bytes."""
        watched = self.proxies.get(name)
        if watched is None:
            return b"{}"  # not (yet) a proxy of several targets here: nothing to say
        watched.monitor.probe_now()
        return json.dumps(watched.last if watched.last is not None else {}).encode()

    # -- figures for /metrics ------------------------------------------------------------------------------
    def figures(self):
        """-> [(proxy name, rounds, {target id: checks})] of the monitors running now."""
        return [(name, w.monitor.rounds, dict(w.checks)) for name, w in self.proxies.items()]


def _strings(buf, offset, count):
    """-> *count* strings (uint16 length + UTF-8 each) from *buf* at *offset*, or None while
    they are not whole."""
    out = []
    for _ in range(count):
        if len(buf) < offset + _LEN.size:
            return None
        (n,) = _LEN.unpack_from(buf, offset)
        offset += _LEN.size
        if len(buf) < offset + n:
            return None
        out.append(bytes(buf[offset:offset + n]).decode("utf-8", "replace"))
        offset += n
    return out


def _packed(*texts):
    out = b""
    for text in texts:
        data = text.encode("utf-8")[:1024]
        out += _LEN.pack(len(data)) + data
    return out


class _Ask(protocol.Protocol):
    def __init__(self, hub):
        self.hub = hub
        self._buf = b""
        self._timer = None

    def connectionMade(self):
        self._timer = self.hub.reactor.callLater(ASK_TIMEOUT, self.transport.abortConnection)

    def dataReceived(self, data):
        if self._buf is None:
            return
        self._buf += data
        kind = self._buf[:1]
        if kind not in (b"P", b"U") or len(self._buf) > 1 + 2 * (_LEN.size + 1024):
            self._buf = None
            self.transport.abortConnection()
            return
        fields = _strings(self._buf, 1, 1 if kind == b"P" else 2)
        if fields is None:
            return  # not whole yet
        self._buf = None
        try:
            answer = self.hub.answer(fields[0]) if kind == b"P" else self.hub.unfence(*fields)
        except Exception:
            log.failure("health monitor: answering a worker failed")
            answer = b""
        self.transport.write(answer)
        self.transport.loseConnection()

    def connectionLost(self, reason=None):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _AskFactory(protocol.Factory):
    noisy = False

    def __init__(self, hub):
        self.hub = hub

    def buildProtocol(self, addr):
        return _Ask(self.hub)
