"""Named states: backend-connection states and session phases are enums whose members read and
compare as their names (so counters, JSON and log lines keep showing "idle", "borrowed"...)."""

import collections
import json

from txrdsproxy.pool.states import ConnState
from txrdsproxy.proxy import interfaces
from txrdsproxy.proxy.session import Phase


def test_connection_states_are_one_enum_shared_with_the_interface():
    assert interfaces.STATES == tuple(ConnState)
    assert interfaces.BORROWED is ConnState.BORROWED


def test_members_compare_count_and_print_as_their_names():
    counts = collections.Counter([ConnState.IDLE, ConnState.BORROWED, ConnState.IDLE])
    assert counts["idle"] == 2 and counts.get("borrowed") == 1
    assert ConnState.CLOSED == "closed" and "closed" == ConnState.CLOSED
    assert f"{ConnState.RESETTING}" == str(ConnState.RESETTING) == "resetting"
    assert json.dumps({"s": ConnState.IDLE}) == '{"s": "idle"}'
    assert ConnState("borrowed") is ConnState.BORROWED


def test_phases_cover_both_engines():
    assert Phase("command") is Phase.COMMAND and Phase("startup") is Phase.STARTUP
    assert Phase.CLOSING == "closing" and f"{Phase.SESSION}" == "session"
