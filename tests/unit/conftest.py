"""Fixtures the unit tests share."""

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture
def failures():
    """Every logged failure (log.failure events) while the test runs: a protocol callback that
    raised shows up here even when the session it broke was closed cleanly."""
    seen = []

    def observer(event):
        if "log_failure" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def endpoints(monkeypatch):
    """The connectors' HostnameEndpoint replaced by testing.fakes.RecordingEndpoint: -> the list
    of (endpoint, factory, Deferred) of every connect, in order."""
    from txrdsproxy.proxy import connector
    from txrdsproxy.testing.fakes import RecordingEndpoint
    RecordingEndpoint.made = []
    monkeypatch.setattr(connector, "HostnameEndpoint", RecordingEndpoint)
    return RecordingEndpoint.made
