"""The console page on the admin listener: a view like the RDS console's "Proxies" page.

    GET /console            the page (one HTML file with its CSS and JavaScript: no external
                            asset, it works offline and behind any firewall)
    GET /console/data.json  what the page shows, read now: per proxy its settings, target group,
                            targets with health and role, the figures of the metrics collector
                            (`proxy_figures`: the same numbers /metrics serves), the borrow latency
                            histogram's sum and count, and the pinned sessions
                            (DescribeDBProxySessions' shape, statements masked)

The page polls data.json every few seconds and draws the graphs itself (client and database
connections, borrow latency, pins by reason) from the successive answers.

The data names users, client addresses and pinned statements (masked), which the RDS API only
gives to an authorised principal; a browser cannot sign requests, so the console answers only
clients on the loopback interface (reach it through an SSH tunnel), and 403 otherwise.
"""

import ipaddress
import json
import os

from twisted.web import pages, resource

from txrdsproxy.admin import shapes
from txrdsproxy.admin.sessions import describe_sessions
from txrdsproxy.metrics.collector import proxy_figures

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "console", "index.html")
REFRESH_SECONDS = 3


def _loopback(request):
    try:
        return ipaddress.ip_address(request.getClientAddress().host).is_loopback
    except (AttributeError, ValueError):
        return False


def _refuse(request):
    request.setResponseCode(403)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return (b"The console answers clients on the loopback interface only "
            b"(for example through: ssh -L 8089:127.0.0.1:8089 proxy-host).\n")


def proxy_view(runtime, metrics):
    """-> the console's JSON object for one ProxyRuntime (read in the reactor thread)."""
    ctx = runtime.ctx
    config = runtime.config
    arns = shapes.Arns(None)
    figures = {}
    for name, labels, value in proxy_figures(ctx, metrics):
        key = name if len(labels) <= 1 or name in ("client_connections_waiting",
                                                   "client_longest_wait_seconds",
                                                   "database_connections_opening") else None
        if key is not None:
            figures[key] = value
        else:
            figures.setdefault(name, []).append({"labels": labels[1:], "value": value})
    borrow = None
    if metrics is not None:
        series = dict(metrics.borrow_latency.items()).get((ctx.name,))
        if series is not None:
            borrow = {"sum": series.sum, "count": series.count}
    return {
        "name": config.name,
        "engine": config.engine_family,
        "status": runtime.status.value if hasattr(runtime.status, "value") else str(runtime.status),
        "port": runtime.port.getHost().port if runtime.port is not None else None,
        "requireTLS": bool(config.require_tls),
        "idleClientTimeout": config.idle_client_timeout,
        "targetGroup": shapes.db_proxy_target_group(runtime, arns)
        if hasattr(runtime, "created") else {"TargetGroupName": config.target_group.name},
        "targets": shapes.db_proxy_targets(runtime, arns),
        "figures": figures,
        "borrowLatency": borrow,
        "pinnedSessions": describe_sessions(ctx, pinned=True),
    }


def console_data(registry, metrics, now):
    return {"time": now, "refreshSeconds": REFRESH_SECONDS,
            "proxies": [proxy_view(r, metrics) for r in list(registry)]}


class ConsoleData(resource.Resource):
    isLeaf = True

    def __init__(self, registry, metrics, clock):
        super().__init__()
        self.registry, self.metrics, self.clock = registry, metrics, clock

    def render_GET(self, request):
        if not _loopback(request):
            return _refuse(request)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(console_data(self.registry, self.metrics, self.clock.seconds()),
                          default=_json_default).encode()


def _json_default(value):
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


class ConsolePage(resource.Resource):
    """GET /console (the page) and /console/data.json."""

    def __init__(self, registry, metrics, clock):
        super().__init__()
        self.putChild(b"data.json", ConsoleData(registry, metrics, clock))

    def getChild(self, path, request):
        if path == b"":
            return self
        return pages.notFound()

    def render_GET(self, request):
        if not _loopback(request):
            return _refuse(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # The page's script may only talk to this listener: no external asset can load.
        request.setHeader(b"content-security-policy",
                          b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                          b"connect-src 'self'; img-src 'self' data:")
        with open(PAGE, "rb") as f:
            return f.read()
