"""Logging: JSON lines with twisted.logger's named fields; DebugLogging masks literals, for both
engines, for 24 hours from when it was switched on; factories are not noisy."""

import io
import json

from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from tests.unit import test_mysql_frontend as my
from tests.unit import test_pg_frontend as pg
from tests.unit.test_runtime import running  # noqa: F401  (fixture)
from txrdsproxy.logs import JSONLinesObserver, json_observer
from txrdsproxy.proxy.connector import SingleUseFactory
from txrdsproxy.proxy.mysql_frontend import MySQLFrontendFactory
from txrdsproxy.proxy.pg_frontend import PgFrontendFactory
from txrdsproxy.proxy.session import DEBUG_LOGGING_SECONDS


class Session:
    def __repr__(self):
        return "<session p#7 app@db idle>"


def test_json_lines_carry_the_named_fields():
    out = io.StringIO()
    log = Logger(namespace="txrdsproxy.test", observer=JSONLinesObserver(out))
    log.info("pool {pool}: closing {conn}: {reason}", pool="p", conn=Session(), reason="idle",
             n=3, data=b"\xff")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("unexpected in {s}", Failure(), s=Session())
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["message"] == "pool p: closing <session p#7 app@db idle>: idle"
    assert first["level"] == "info" and first["namespace"] == "txrdsproxy.test"
    assert first["pool"] == "p" and first["n"] == 3 and first["conn"] == "<session p#7 app@db idle>"
    assert first["data"] == "\ufffd" and first["time"].endswith("+00:00")
    assert not any(k.startswith("log_") for k in first)
    assert second["level"] == "critical" and second["error"] == "division by zero"
    assert "ZeroDivisionError" in second["traceback"]


def test_twistd_logger_factory_writes_to_the_file_it_is_given(tmp_path, monkeypatch):
    path = tmp_path / "proxy.jsonl"
    monkeypatch.setenv("TXRDSPROXY_JSON_LOG", str(path))
    observer = json_observer()
    Logger(namespace="x", observer=observer).warn("hello {who}", who="you")
    observer.out.close()
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["message"] == "hello you" and record["who"] == "you" and record["level"] == "warn"


def test_factories_are_not_noisy():
    assert PgFrontendFactory.noisy is False and MySQLFrontendFactory.noisy is False
    assert SingleUseFactory.noisy is False


def _statements():
    lines = []

    def observer(event):
        if "sql" in event:
            lines.append(event["sql"])
    globalLogPublisher.addObserver(observer)
    return lines, lambda: globalLogPublisher.removeObserver(observer)


def test_mysql_debug_logging_masks_literals_and_stops_after_24_hours():
    lines, done = _statements()
    try:
        h = my.Harness(DebugLogging=True)
        h.login()
        h.send(my.query("SELECT * FROM t WHERE secret = 'hunter2' AND n = 42"))
        assert lines == ["SELECT * FROM t WHERE secret = ? AND n = ?"]
        h.clock.advance(DEBUG_LOGGING_SECONDS + 1)
        h.send(my.query("SELECT 'later'"))
        assert lines == ["SELECT * FROM t WHERE secret = ? AND n = ?"]
    finally:
        done()


def test_debug_literals_can_be_asked_for():
    lines, done = _statements()
    try:
        h = pg.Harness(DebugLogging=True)
        h.ctx.debug_literals = True
        h.login()
        h.send(pg.msg.query("SELECT 'shown'"))
        h.pool.give()
        assert lines == ["SELECT 'shown'"]
    finally:
        done()


def test_the_24_hours_run_from_when_debug_logging_was_switched_on(running):  # noqa: F811
    registry, reactor = running
    reactor.advance(5 * 3600)  # the process has run for 5 hours
    registry.modify_proxy("p1", debug_logging=True)
    ctx = registry.get("p1").ctx
    assert ctx.debug_until == 5 * 3600 + DEBUG_LOGGING_SECONDS
