"""Moving a pinned session off a former writer (switchover), the engine-neutral part.

A pinned session keeps its database connection for its whole life.  When the writer changes and
the old one stays up, `ClientSession.drain("writer changed")` reaches the session at its next
transaction boundary.  If its engine still has a movable replay log (what pinned it can be made
again: wire/pg/replay.py), the session is not ended: the engine stops relaying on the old
connection (the client's next bytes are held), reads the session's state there
(`capture_state`), and the old connection is closed.  The session is then IDLE with the
engine's replay plan in `_move`; its next request borrows a connection to the new writer as any
request does, and the engine's `prepare_lease` runs the plan there (`take_move`) before anything
of the client is forwarded; that connection is the session's alone, and pinned.  A replay that
fails raises ReplayFailed: the session ends with the engine's error (docs/errors.md).  A capture
that fails, or finds state that cannot move, ends the session as before.
"""


MOVING = "moving"  # ClientSession._move while the old connection is read for a move


class ReplayFailed(Exception):
    """Replaying a moved pinned session's state on the new writer failed (the text says how):
    the session ends with the engine's "replay failed" error (docs/errors.md)."""


class PinMove:
    """The move flow, mixed into ClientSession (whose slots hold `_move`)."""

    __slots__ = ()

    def _begin_move(self):
        log = self.replay_log()
        if log is None:
            return False
        lease = self.lease
        self._draining = False
        self._drain_why = None
        self._move = MOVING
        self.detach_for_move(lease.conn)
        self.log.info("{s}: pinned on a former writer; reading its session state to move it", s=self)
        d = self.capture_state(lease.conn, log)
        d.addCallbacks(self._captured, self._capture_failed, callbackArgs=(lease,),
                       errbackArgs=(lease,)).addErrback(self.unexpected, "moving")
        return True

    def _captured(self, plan, lease):
        from txrdsproxy.proxy.session import SessionState  # (session.py imports this module)
        self._move = None
        if self.lease is lease:
            self.lease = None
        lease.release(clean=False, reason="its pinned session moved to the new writer")
        if self.state is SessionState.CLOSED:
            return
        self._move = plan
        self.set_state(SessionState.IDLE)
        self.log.info("{s}: pinned session moves to the new writer with its next request", s=self)
        self.after_move()

    def _capture_failed(self, failure, lease):
        from txrdsproxy.proxy.session import SessionState
        self._move = None
        if self.lease is lease:
            self.lease = None
        lease.release(clean=False, reason="former writer")
        if self.state is SessionState.CLOSED:
            return
        self.log.info("{s}: ending the session: writer changed, and it cannot move ({e})", s=self,
                      e=failure.getErrorMessage())
        self.writer_changed_now()

    def take_move(self):
        """The replay plan waiting for the next connection (and forget it), or None."""
        move = self._move
        if move is None or move is MOVING:
            return None
        self._move = None
        return move

    def replay_log(self):
        """Engine question: the session's replay log when its pin can be replayed, else None."""
        return None

    def detach_for_move(self, conn):
        """Engine action: stop relaying on *conn* (the client's bytes wait) without releasing it."""
        raise NotImplementedError

    def capture_state(self, conn, log):
        """Engine action: read the session's state on *conn* -> Deferred firing with the plan
        that `prepare_lease` replays, or failing (the session then ends as before)."""
        raise NotImplementedError

    def after_move(self):
        """Engine action: the session is IDLE and holds no connection: go on with what waits."""

    def replay_failed(self, why):
        """Engine action: tell the client replaying its state failed (docs/errors.md), close."""
        self.writer_changed_now()
