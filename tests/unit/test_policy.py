"""pool/policy.py: the pure decision on a returned connection."""

import pytest

from txrdsproxy.pool.policy import Disposition, on_release


def test_clean_release_is_reused():
    assert on_release("borrowed", True, False, 3, 10) == (Disposition.REUSE, None)


def test_needs_reset_is_reset():
    assert on_release("borrowed", True, True, 3, 10) == (Disposition.RESET, None)


def test_unclean_is_closed_even_when_a_reset_is_asked():
    assert on_release("borrowed", False, True, 3, 10) == (Disposition.CLOSE, "returned in an unknown state")
    assert on_release("borrowed", False, False, 3, 10)[0] is Disposition.CLOSE


@pytest.mark.parametrize("state", ["idle", "resetting", "closed", "connecting"])
def test_not_borrowed_is_closed_with_its_state_in_the_reason(state):
    assert on_release(state, True, False, 1, 10) == (Disposition.CLOSE, f"returned while {state}")


def test_above_the_cap_is_closed():
    assert on_release("borrowed", True, False, 11, 10) == (Disposition.CLOSE, "above MaxConnectionsPercent")
    assert on_release("borrowed", True, True, 11, 10)[0] is Disposition.CLOSE


def test_at_the_cap_is_kept():
    assert on_release("borrowed", True, False, 10, 10)[0] is Disposition.REUSE


def test_no_limit_known_yet():
    assert on_release("borrowed", True, False, 500, None)[0] is Disposition.REUSE
