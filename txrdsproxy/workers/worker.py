"""One worker process of `Workers: N` (started by supervisor.py; not a command for users).

    python -m txrdsproxy.workers.worker --config FILE --index I --count N --rundir DIR
                                        [--listen NAME=ENDPOINT ...] [--inherit FD ...]
                                        [--shared-monitor]

It runs the ordinary proxy service (service.make_service) with:
- its listeners bound with SO_REUSEPORT (listen.py); `--listen` gives the port the parent
  picked for a proxy whose file says port 0; `--inherit` names listening sockets the parent
  hands down when twistd dropped privileges (`--uid`), adopted instead of bound;
- the admin endpoint, when the file has one, on `DIR/admin-I.sock` (the parent serves the
  public one and merges or forwards, see admin.py);
- the peer socket `DIR/peer-I.sock` for cancel requests other workers pass on, and the
  verdicts of the supervisor's health monitor (`--shared-monitor`: peer.py, hub.py);
- SIGHUP (reload) and SIGTERM (drain, exit 0) as twistd's process has (tap.SignalHandlers);
- its stdin as a lifeline: when the parent is gone (EOF), it drains and exits.

Log events go to stderr, one JSON object a line ({"level", "text"}), which the parent logs as
its own with the worker's index; "ready" on stdout says every listener is bound.
"""

import argparse
import dataclasses
import json
import os
import sys

from twisted.internet import protocol, stdio
from twisted.logger import Logger, formatEvent, globalLogBeginner

__all__ = ["main"]

log = Logger()

EXIT_CANNOT_START = 3  # the supervisor does not restart a worker that exits with it at once


def _observer(event):
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    level = event.get("log_level")
    try:
        sys.stderr.write(json.dumps({"level": level.name if level else "info", "text": text}) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # the parent is gone: the lifeline ends this process
        pass


class _Lifeline(protocol.Protocol):
    """stdin from the parent: nothing is sent on it; its end means the parent has gone."""

    def __init__(self, on_lost):
        self.on_lost = on_lost

    def connectionLost(self, reason=None):
        self.on_lost()


def worker_config(config, listens, admin_socket):
    """The file's Config as this worker runs it: *listens* ({proxy name: endpoint}) where the
    file asks for port 0, and the admin endpoint on the worker's private UNIX socket."""
    from txrdsproxy.runtime import _PORT_ZERO
    proxies = tuple(
        dataclasses.replace(p, listen=listens[p.name])
        if p.name in listens and _PORT_ZERO.match(p.listen) else p
        for p in config.proxies)
    admin = dataclasses.replace(config.admin, listen=f"unix:{admin_socket}:mode=600"
                                if config.admin.listen else "")
    return dataclasses.replace(config, proxies=proxies, admin=admin)


def _unlink(path):
    try:
        os.unlink(path)  # left by this worker's previous life
    except FileNotFoundError:
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(prog="txrdsproxy.workers.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rundir", required=True)
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--inherit", action="append", type=int, default=[],
                        help="a listening socket the parent opened (file descriptor)")
    parser.add_argument("--shared-monitor", action="store_true",
                        help="apply the supervisor's health monitor verdicts (workers/hub.py)")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([_observer], redirectStandardIO=False)

    from twisted.internet import reactor

    from txrdsproxy import fastpoll
    fastpoll.install(reactor)  # socket events without the legacy log context (fastpoll's doc)
    from txrdsproxy.config.load import ConfigError, load_config
    from txrdsproxy.runtime import ListenFailed, bind_now
    from txrdsproxy.service import make_service
    from txrdsproxy.tap import SignalHandlers
    from txrdsproxy.workers import WorkerIdentity
    from txrdsproxy.workers.hub import receive_verdict
    from txrdsproxy.workers.peer import PeerFactory

    from txrdsproxy.workers.listen import inherited_sockets
    worker = WorkerIdentity(args.index, args.count, args.rundir, inherited_sockets(args.inherit),
                            shared_monitor=args.shared_monitor)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        log.critical("worker {index}: configuration error: {error}", index=args.index, error=str(e))
        return EXIT_CANNOT_START
    listens = dict(item.split("=", 1) for item in args.listen)
    config = worker_config(config, listens, worker.admin_socket())
    _unlink(worker.admin_socket())
    _unlink(worker.peer_socket(worker.index))
    top, _ = make_service(config, reactor, config_path=args.config, worker=worker)
    try:
        top.privilegedStartService()
        top.startService()
        peer = bind_now(f"unix:{worker.peer_socket(worker.index)}:mode=600",
                        PeerFactory(top.registry.cancel_registry, reactor,
                                    top.registry.contexts,
                                    lambda payload: receive_verdict(top.registry.contexts, payload)),
                        reactor, "peer socket")
    except ListenFailed as e:
        log.critical("worker {index}: cannot start: {error}", index=args.index, error=str(e))
        return EXIT_CANNOT_START
    signals = SignalHandlers(top.control, reactor)
    signals.startService()

    def parent_gone():
        if reactor.running:
            log.info("worker {index}: the supervisor is gone; draining", index=args.index)
            reactor.stop()

    stdio.StandardIO(_Lifeline(parent_gone), stdin=0, stdout=os.dup(1))
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.addSystemEventTrigger("before", "shutdown", peer.stopListening)
    os.write(1, b"ready\n")
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
