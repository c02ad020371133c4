"""Reading Deferreds in tests that run on `task.Clock` and fakes (everything fires synchronously):
what a fired Deferred holds, how it failed, whether it is still waiting."""

from twisted.python.failure import Failure

__all__ = ["result", "failure_of", "pending"]


def result(d):
    """The value a fired Deferred holds; raises its failure, or AssertionError if it has not fired."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure_of(d):
    """The Failure a Deferred fired with; AssertionError if it has not failed."""
    out = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), f"expected a failure, got {out}"
    return out[0]


def pending(d):
    """Whether *d* has not fired yet (its result, if any, stays in it)."""
    out = []
    d.addBoth(lambda r: out.append(r) or r)
    return not out
