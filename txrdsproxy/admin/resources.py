"""The admin endpoint: the management API (/v1/), /metrics (Prometheus text) and /healthz."""

import json

from twisted.web import resource

from txrdsproxy.admin.api import api_root


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, metrics, contexts):
        super().__init__()
        self.metrics, self.contexts = metrics, contexts

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.render(self.contexts).encode()


class HealthResource(resource.Resource):
    """200 with each proxy's pool summary; 503 while a proxy is not listening."""

    isLeaf = True

    def __init__(self, services):
        super().__init__()
        self.services = services

    def render_GET(self, request):
        body = {}
        ok = True
        for svc in self.services:
            ctx = svc.ctx
            listening = svc.port is not None
            ok = ok and listening
            body[ctx.name] = {
                "listening": listening,
                "client_connections": len(ctx.sessions),
                "database_connections": len(ctx.pool.connections()),
                "max_database_connections": ctx.pool.max_connections,
                "waiting": ctx.pool.waiting,
            }
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"status": "ok" if ok else "starting", "proxies": body}).encode()


def admin_root(metrics, services):
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(metrics, [s.ctx for s in services]))
    root.putChild(b"healthz", HealthResource(services))
    root.putChild(b"v1", api_root(services))
    return root
