"""The epoll reactor's event dispatch without the legacy log context, for the relay's hot path.

For every ready socket, Twisted's `EPollReactor.doPoll` calls
`twisted.python.log.callWithLogger(selectable, _doReadOrWrite, ...)`, which asks the selectable
for its `logPrefix()`, copies the legacy log context dict, pushes it on the context stack and
pops it after the read: six Python calls per socket event, whose only use is the `system` field
of *legacy* `twisted.python.log.msg`/`err` events emitted during the read.  The proxy logs with
`twisted.logger`, whose events never read that context.  On the PostgreSQL relay path (two
socket events per pgbench -S transaction) these calls were about a tenth of the proxy's CPU.

`install(reactor)` replaces the reactor's `doIteration` (an instance attribute, nothing of the
class is touched) with `_do_poll`, the same loop calling `_doReadOrWrite` directly.  What is lost:
a legacy log line emitted inside a read (Twisted's own "Unhandled Error" when a protocol raises)
carries `system` "-" instead of the connection's prefix; the error itself is still logged, and an
exception escaping `_doReadOrWrite` is logged as `callWithLogger` would and does not stop the
loop.

Guard (the loop reads private reactor attributes): installed only on an `EPollReactor` whose
`doPoll` is Twisted's own and still dispatches through `callWithLogger`, and which has the
`_poller`, `_selectables` and `_doReadOrWrite` it reads; otherwise the reactor is left as it is
and a warning says why.  tests/unit/test_fastpoll.py checks both against the installed Twisted.
"""

import errno
import types

from twisted.logger import Logger

__all__ = ["install", "installable"]

log = Logger()
_FIELDS = ("_poller", "_selectables", "_doReadOrWrite")


def installable(reactor):
    """-> None when `install` may replace *reactor*'s dispatch, else why not (a sentence)."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return "no epoll reactor here"
    if not isinstance(reactor, EPollReactor):
        return f"the reactor is {type(reactor).__name__}, not EPollReactor"
    cls = type(reactor)
    if cls.doPoll is not EPollReactor.doPoll or cls.doIteration is not EPollReactor.doPoll:
        return "the reactor's doPoll is not Twisted's EPollReactor.doPoll"
    if "callWithLogger" not in EPollReactor.doPoll.__code__.co_names:
        return "EPollReactor.doPoll no longer dispatches through callWithLogger"
    missing = [name for name in _FIELDS if not hasattr(reactor, name)]
    if missing:
        return "EPollReactor lacks " + ", ".join(missing)
    return None


def install(reactor):
    """Dispatch *reactor*'s socket events without the legacy log context (see the module doc).
    -> True when installed, False when the guard refused (logged)."""
    why = installable(reactor)
    if why is not None:
        log.warn("socket events keep Twisted's dispatch: {why}", why=why)
        return False
    reactor.doIteration = types.MethodType(_do_poll, reactor)
    return True


def _do_poll(self, timeout):
    """EPollReactor.doPoll, dispatching each event straight to `_doReadOrWrite`."""
    if timeout is None:
        timeout = -1  # wait indefinitely
    selectables = self._selectables
    try:
        events = self._poller.poll(timeout, len(selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    dispatch = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is not None:
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:  # as callWithLogger: logged, the loop goes on
                log.failure("unexpected error dispatching a socket event of {s!r}", s=selectable)
