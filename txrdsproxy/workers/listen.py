"""Listening sockets shared by the workers: SO_REUSEPORT.

Why SO_REUSEPORT rather than sockets opened once in the parent and handed to each worker: a
worker binds, rebinds and adds listeners by itself when the configuration changes (a new proxy
through the API, a changed Listen, a reload), exactly as a single process does, without a file
descriptor passing protocol between parent and workers.  What the choice costs, and how it is
kept simple:

- Errors: the parent checks every address at start (`reserve`) and twistd exits 1 with the
  address and the OS error, as with one process.  A port held by another program without
  SO_REUSEPORT fails the same way (EADDRINUSE).
- `Listen: "tcp:0..."` (any free port): the parent picks the port once (`reserve`) and gives it
  to every worker; a proxy added later on port 0 gets its port in the first worker, which
  writes it into the file, and the others follow the file.
- The parent keeps each reserved socket bound but not listening: the kernel hands connections
  only to listening sockets, so it takes none, but the port stays ours while a worker restarts.
- Linux balances new connections over the workers by a hash of the client's address and port.
  A worker that dies loses the connections still in its own accept queue (the kernel resets
  them; net.ipv4.tcp_migrate_req=1 moves them to another worker on Linux 5.14+).
- Only processes of the same user can join the group (the kernel's rule for SO_REUSEPORT).

With `--uid`/`--gid` (twistd drops privileges after the parent reserved the ports as root,
before it starts the workers) the workers could neither join the root-owned group nor bind a
port below 1024, so the parent hands its sockets down instead: running as root, it reserves one
socket per worker in the group before the drop, makes them listen after it, and passes each
worker its own as an inherited file descriptor (`--inherit`), which the worker adopts
(`worker_binder`).  One socket per worker, not one shared by all: the kernel balances over the
members of the group, whereas on one shared socket whichever worker wakes first takes the
connection (on an idle machine, one worker gets all of them).  Listeners added later (a proxy
created through the API, a changed `Listen`, reader endpoints) are bound by the workers
themselves as usual, as the dropped user: ports above 1023 only (or CAP_NET_BIND_SERVICE).
What this mode changes: a dying worker's socket stays open in the parent, so its queued
connections, and those the kernel gives it until the worker is back, wait for the restarted
worker instead of being reset; and a port the configuration stops using keeps accepting into
its queues (the parent still holds them for restarts) until the proxy restarts.
"""

import os
import socket

from twisted.internet.endpoints import _parseServer  # parsing only, as config/load.py does

from txrdsproxy.runtime import ListenFailed, with_backlog

__all__ = ["parse_tcp", "reuseport_socket", "reserve", "bind_reuseport", "worker_binder"]


def parse_tcp(listen):
    """-> (family, host, port, backlog) of a `tcp:` / `tcp6:` endpoint string; ValueError for
    any other kind."""
    kind, args, kwargs = _parseServer(listen, None)
    if kind == "TCP":
        family, port = socket.AF_INET, int(args[0])
    elif listen.split(":", 1)[0].strip().lower() == "tcp6":
        family, port = socket.AF_INET6, int(args[0])
    else:
        raise ValueError(f"{listen}: workers share tcp: and tcp6: endpoints only")
    host = kwargs.get("interface", "") or ("::" if family == socket.AF_INET6 else "")
    return family, host, port, int(kwargs.get("backlog", 50))


def reuseport_socket(listen):
    """-> a socket bound (not listening) to *listen*'s address with SO_REUSEPORT set."""
    family, host, port, _ = parse_tcp(listen)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reserve(listen, what):
    """Check that the workers can listen on *listen* and keep the port: -> (socket, listen with
    the port it got).  Raises ListenFailed (address and OS error) when it cannot be bound."""
    try:
        sock = reuseport_socket(listen)
    except (OSError, ValueError) as e:
        raise ListenFailed(f"{what} cannot listen on {listen}: {getattr(e, 'strerror', None) or e}") from None
    port = sock.getsockname()[1]
    family, _, asked, _ = parse_tcp(listen)
    if asked == 0:
        kind, rest = listen.split(":", 1)
        after = rest.split(":", 1)[1] if ":" in rest else ""
        listen = f"{kind}:{port}" + (f":{after}" if after else "")
    return sock, listen


def bind_reuseport(listen, factory, reactor, what):
    """The workers' replacement of runtime.bind_now: listen on *listen* with SO_REUSEPORT and
    give the socket to *reactor* (adoptStreamPort).  -> the listening port.  Raises
    ListenFailed as bind_now does.  Non-TCP endpoints (the admin's UNIX sockets) are bound as
    usual."""
    kind = listen.split(":", 1)[0].strip().lower()
    if kind not in ("tcp", "tcp6"):
        from txrdsproxy.runtime import bind_now
        return bind_now(listen, factory, reactor, what)
    try:
        sock = reuseport_socket(listen)
        sock.listen(parse_tcp(with_backlog(listen))[3])
    except (OSError, ValueError) as e:
        raise ListenFailed(f"{what} cannot listen on {listen}: {getattr(e, 'strerror', None) or e}") from None
    try:
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        sock.close()  # the reactor holds its own duplicate


def address_of(listen):
    """-> (family, host, port) of a `tcp:` / `tcp6:` endpoint string, as `inherited_sockets`
    names a handed-down socket; ValueError for any other kind."""
    family, host, port, _ = parse_tcp(listen)
    return family, host or "0.0.0.0", port


def inherited_sockets(fds):
    """[file descriptor] handed down by the parent -> ((family, host, port), fd) pairs, read
    from each socket itself (getsockname), so a worker adopts a socket exactly where it is bound."""
    out = []
    for fd in fds:
        sock = socket.socket(fileno=os.dup(fd))
        try:
            host, port = sock.getsockname()[:2]
            out.append(((sock.family, host, port), fd))
        finally:
            sock.close()
    return tuple(out)


def worker_binder(worker):
    """The binder (runtime.bind_now's signature) of *worker* (a WorkerIdentity): a listener
    whose address the parent handed down as a socket (`worker.inherited`) is adopted from it;
    any other is bound with SO_REUSEPORT (bind_reuseport)."""
    inherited = dict(worker.inherited)
    if not inherited:
        return bind_reuseport

    def bind(listen, factory, reactor, what):
        try:
            fd = inherited.get(address_of(listen))
        except ValueError:
            fd = None
        if fd is None:
            return bind_reuseport(listen, factory, reactor, what)
        family = address_of(listen)[0]
        try:
            # The reactor accepts until EAGAIN: a blocking socket would hang the worker in accept
            # (O_NONBLOCK belongs to the socket the parent and every worker share).
            os.set_blocking(fd, False)
            # The reactor takes a duplicate: stopping this listener later leaves the handed-down
            # descriptor open, so a proxy moved back to this address adopts it again.
            port = reactor.adoptStreamPort(fd, family, factory)
            # Again after: on PyPy the socket.fromfd inside adoptStreamPort makes the shared
            # socket blocking (CPython leaves the flag alone).
            os.set_blocking(fd, False)
            return port
        except OSError as e:
            raise ListenFailed(f"{what} cannot listen on {listen} (socket from the supervisor): "
                               f"{e.strerror or e}") from None

    return bind
