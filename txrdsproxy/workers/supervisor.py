"""The parent process of `Workers: N` (twistd's process when N > 1).

It holds no pool and no client: it checks and reserves the listening ports (listen.py), starts
N worker processes (worker.py), restarts one that dies, passes SIGHUP (reload) and SIGTERM
(drain) on to them, and serves the admin endpoint for the whole proxy (admin.py).

Restarts: a worker that exits while the supervisor runs is started again after a delay that
doubles (from RESTART_DELAY up to RESTART_DELAY_MAX) while workers keep dying within
STABLE_AFTER seconds of their start.  Only the dead worker's clients lose their connections:
each client connection lives in the worker that accepted it.
"""

import json
import os
import shutil
import signal
import sys
import tempfile

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger, LogLevel

from txrdsproxy.runtime import with_backlog
from txrdsproxy.workers.listen import parse_tcp, reserve

__all__ = ["WorkerSupervisor", "WorkerState"]

log = Logger()

RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 10.0
KILL_MARGIN = 15.0  # seconds after DrainTimeout before a worker that has not exited is killed


class _WorkerProcess(protocol.ProcessProtocol):
    """One worker's pipes: its log lines (stderr, JSON) and its "ready" (stdout)."""

    def __init__(self, state):
        self.state = state
        self._err = b""
        self._out = b""

    def outReceived(self, data):
        self._out += data
        while b"\n" in self._out:
            line, self._out = self._out.split(b"\n", 1)
            if line.strip() == b"ready":
                self.state.ready()

    def errReceived(self, data):
        self._err += data
        while b"\n" in self._err:
            line, self._err = self._err.split(b"\n", 1)
            self._log(line)
        if len(self._err) > 1 << 20:  # a line without end: log what there is
            self._log(self._err)
            self._err = b""

    def _log(self, line):
        text = line.decode("utf-8", "replace")
        level = LogLevel.error
        try:
            event = json.loads(text)
            text = event["text"]
            level = LogLevel.levelWithName(event["level"])
        except (ValueError, KeyError, TypeError, Exception):
            pass  # not one of ours (an interpreter crash): logged as an error, as it came
        log.emit(level, "worker {index}: {text}", index=self.state.index, text=text)

    def processEnded(self, reason):
        if self._err:
            self._log(self._err)
        self.state.ended(reason)


class WorkerState:
    """What the supervisor knows of worker *index*: its process, whether it is up, restarts."""

    def __init__(self, supervisor, index):
        self.supervisor = supervisor
        self.index = index
        self.process = None
        self.pid = None
        self.up = False  # listening (said "ready") and not ended
        self.restarts = 0
        self.started_at = None
        self.delay = RESTART_DELAY
        self.exited = None  # Deferred while a stop waits for this worker
        self._restart = None

    def as_dict(self):
        return {"index": self.index, "pid": self.pid, "up": self.up, "restarts": self.restarts}

    def start(self):
        self._restart = None
        sup = self.supervisor
        self.started_at = sup.reactor.seconds()
        self.process = sup.reactor.spawnProcess(
            _WorkerProcess(self), sys.executable, sup.worker_argv(self.index), env=sup.worker_env(),
            childFDs={0: "w", 1: "r", 2: "r", **sup.child_fds(self.index)})
        self.pid = self.process.pid
        log.info("worker {index} started (pid {pid})", index=self.index, pid=self.pid)

    def ready(self):
        self.up = True
        log.info("worker {index} (pid {pid}) is listening", index=self.index, pid=self.pid)

    def ended(self, reason):
        self.up = False
        self.process = None
        status = reason.value
        how = (f"signal {status.signal}" if getattr(status, "signal", None)
               else f"status {getattr(status, 'exitCode', '?')}")
        sup = self.supervisor
        if self.exited is not None:
            d, self.exited = self.exited, None
            log.info("worker {index} (pid {pid}) exited ({how})", index=self.index, pid=self.pid, how=how)
            d.callback(None)
            return
        if not sup.running:
            return
        lived = sup.reactor.seconds() - (self.started_at or 0)
        self.delay = RESTART_DELAY if lived >= STABLE_AFTER else min(self.delay * 2, RESTART_DELAY_MAX)
        log.warn("worker {index} (pid {pid}) died ({how}); its clients were disconnected; "
                 "restarting it in {delay}s", index=self.index, pid=self.pid, how=how,
                 delay=self.delay)
        self.restarts += 1
        self._restart = sup.reactor.callLater(self.delay, self.start)

    def signal(self, signo):
        if self.process is not None:
            try:
                self.process.signalProcess(signo)
            except Exception:  # already gone: processEnded follows
                pass

    def stop(self, timeout):
        """SIGTERM (drain) -> Deferred firing when the process has exited; SIGKILL after
        *timeout* seconds.  A pending restart is cancelled."""
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        if self.process is None:
            return defer.succeed(None)
        self.exited = defer.Deferred()
        done = self.exited
        self.signal(signal.SIGTERM)
        killer = self.supervisor.reactor.callLater(timeout, self.signal, signal.SIGKILL)
        done.addBoth(lambda r: (killer.cancel() if killer.active() else None, r)[1])
        return done


class WorkerSupervisor(service.Service):
    """Starts and keeps `config.workers` worker processes for the configuration file
    *config_path* (already validated into *config*)."""

    def __init__(self, config, config_path, reactor):
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.reactor = reactor
        self.count = config.workers
        self.workers = [WorkerState(self, i) for i in range(self.count)]
        self.rundir = None
        self.listens = {}  # proxy name -> the endpoint its workers bind (port 0 resolved)
        self._reserved = []  # per proxy: [socket per worker] (root) or [the one reservation]
        self._reserved_euid = None  # who reserved the ports (twistd may drop privileges after)
        self.handed_down = False  # True: each worker accepts on its own reserved socket
        # The one health monitor of every proxy (hub.py): the workers apply its verdicts.
        from txrdsproxy.workers.hub import MonitorHub
        self.hub = MonitorHub(config, self.config_path, reactor,
                              live=lambda: [w.index for w in self.live()])

    # -- what workers are started with ---------------------------------------------------------------
    def worker_argv(self, index):
        argv = [sys.executable, "-m", "txrdsproxy.workers.worker", "--config", self.config_path,
                "--index", str(index), "--count", str(self.count), "--rundir", self.rundir]
        if self.hub is not None:
            argv += ["--shared-monitor"]
        for name, listen in sorted(self.listens.items()):
            argv += ["--listen", f"{name}={listen}"]
        for fd in self.child_fds(index):
            argv += ["--inherit", str(fd)]
        return argv

    def child_fds(self, index):
        """{file descriptor in worker *index*: the parent's}: that worker's own reserved socket of
        each proxy, when handed down."""
        if not self.handed_down:
            return {}
        return {3 + n: socks[index].fileno() for n, socks in enumerate(self._reserved)}

    def worker_env(self):
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    # -- life ------------------------------------------------------------------------------------------
    def privilegedStartService(self):
        """Check every proxy's address and keep it (ListenFailed stops twistd, exit 1)."""
        super().privilegedStartService()
        if self._reserved:
            return
        self._reserved_euid = os.geteuid()
        # As root, twistd may drop privileges (--uid) before startService, after which the
        # workers could not bind the port themselves: reserve one socket per worker now, so
        # that each worker gets its own member of the SO_REUSEPORT group and the kernel
        # balances over the workers exactly as when they bind themselves (one shared socket
        # would leave the balance to whichever worker wakes first).
        per_proxy = self.count if self._reserved_euid == 0 else 1
        for proxy in self.config.proxies:
            sock, listen = reserve(proxy.listen, f"proxy {proxy.name}")
            socks = [sock]
            try:
                for _ in range(per_proxy - 1):
                    socks.append(reserve(listen, f"proxy {proxy.name}")[0])
            except BaseException:
                for s in socks:
                    s.close()
                raise
            self._reserved.append(socks)
            self.listens[proxy.name] = listen

    def startService(self):
        if not self._reserved:
            self.privilegedStartService()
        # Made here, after twistd has dropped privileges (--uid): the workers run as we do.
        self.rundir = tempfile.mkdtemp(prefix="rdsproxy-")  # 0700: peers and admin sockets
        if os.geteuid() != self._reserved_euid:
            # twistd dropped privileges (--uid) after the ports were reserved: the workers can
            # neither join a group of sockets another user opened nor bind a port below 1024,
            # so they get the reserved sockets themselves (listen.py says what this changes).
            self.handed_down = True
            for socks, name in zip(self._reserved, (p.name for p in self.config.proxies)):
                for sock in socks:
                    sock.listen(parse_tcp(with_backlog(self.listens[name]))[3])
        else:
            # The workers bind their own sockets: keep one bound, never listening, per proxy
            # (the port stays ours while a worker restarts).
            for socks in self._reserved:
                for sock in socks[1:]:
                    sock.close()
                del socks[1:]
        log.info("{n} workers; listeners {how}; run directory {dir}", n=self.count,
                 how="handed down by the supervisor (privileges dropped)" if self.handed_down
                 else "shared with SO_REUSEPORT", dir=self.rundir)
        super().startService()
        if self.hub is not None:
            self.hub.start(self.rundir)  # listening before any worker asks it
        for state in self.workers:
            state.start()

    def stopService(self):
        """SIGTERM every worker (each drains within DrainTimeout) -> Deferred firing once all
        have exited (a worker still there after DrainTimeout + KILL_MARGIN is killed)."""
        super().stopService()
        timeout = self.config.drain_timeout + KILL_MARGIN
        d = defer.DeferredList([w.stop(timeout) for w in self.workers], consumeErrors=True)

        def cleanup(_):
            if self.hub is not None:
                self.hub.stop()
            for socks in self._reserved:
                for sock in socks:
                    sock.close()
            self._reserved = []
            if self.rundir is not None:
                shutil.rmtree(self.rundir, ignore_errors=True)
                self.rundir = None
            return None

        return d.addCallback(cleanup)

    def reload(self):
        """SIGHUP: every worker re-reads the file (each applies the difference and logs it).
        `Workers` and `Admin` are read at start only.  -> Deferred[[str]]."""
        self.signal_workers(signal.SIGHUP)
        if self.hub is not None:
            self.hub.reload()
        return defer.succeed([f"reload passed on to {sum(1 for w in self.workers if w.process)} workers"])

    def signal_workers(self, signo, but=None):
        for state in self.workers:
            if state.index != but:
                state.signal(signo)

    def file_changed(self, but=None):
        """A worker (*but*) wrote an API change into the file: the others and the health
        monitor re-read it."""
        self.signal_workers(signal.SIGHUP, but=but)
        if self.hub is not None:
            self.hub.reload()

    def live(self):
        """-> the WorkerStates that are up, lowest index first."""
        return [w for w in self.workers if w.up]
