"""The console resources: loopback only, a self-contained page, data from the metrics collector."""

import json
from types import SimpleNamespace

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from tests.unit import test_pg_frontend as pg
from txrdsproxy.admin.console import ConsolePage, PAGE
from txrdsproxy.failover.monitor import TargetHealth
from txrdsproxy.failover.topology import Topology
from txrdsproxy.metrics import Metrics


def _runtime():
    s = pg.Harness()
    s.ctx.metrics = Metrics()
    target = s.ctx.config.target_group.targets[0]
    s.ctx.topology = Topology([target])
    s.ctx.health = TargetHealth(s.clock)
    s.ctx.health.record_success(target)
    s.login()
    s.send(pg.msg.query("SET search_path = secret_schema, 'x'"))
    s.pool.give()
    s.frontend.ready_for_query(b"I")
    runtime = SimpleNamespace(ctx=s.ctx, config=s.ctx.config, port=None,
                              status=SimpleNamespace(value="available"))
    return runtime


def _get(resource, path, host):
    request = DummyRequest(path)
    request.client = IPv4Address("TCP", host, 40000)
    child = resource
    for segment in path:
        child = child.getChildWithDefault(segment, request)
    return request, child.render(request)


def test_data_is_served_to_loopback_only():
    page = ConsolePage([_runtime()], Metrics(), Clock())
    request, body = _get(page, [b"data.json"], "10.0.0.7")
    assert request.responseCode == 403 and b"loopback" in body
    request, body = _get(page, [b"data.json"], "127.0.0.1")
    data = json.loads(body)
    [proxy] = data["proxies"]
    assert proxy["name"] == "app-pg" and proxy["figures"]["client_connections"] == 1
    [session] = proxy["pinnedSessions"]
    assert session["PinReason"] == "set_variable"
    assert session["PinStatement"] == "SET search_path = secret_schema, ?"
    assert proxy["targets"][0]["TargetHealth"]["State"] == "AVAILABLE"


def test_the_page_loads_nothing_from_elsewhere():
    html = open(PAGE, encoding="utf-8").read().replace('"http://www.w3.org/2000/svg"', "")  # a name
    for marker in ("http://", "https://", "//cdn", "src=", "@import", "url("):
        assert marker not in html, marker
    page = ConsolePage([], Metrics(), Clock())
    request, body = _get(page, [], "127.0.0.1")
    assert body.startswith(b"<!DOCTYPE html>")
    assert b"default-src 'none'" in request.responseHeaders.getRawHeaders(b"content-security-policy")[0]
