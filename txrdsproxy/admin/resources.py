"""The admin endpoint: the RDS Query API (`POST /`), /metrics (Prometheus text) and /healthz.

Each resource reads the registry (runtime.ProxyRegistry, or any iterable of objects with `.ctx`
and `.port`) at request time, so proxies added or removed while running are seen at once.
"""

import json

from prometheus_client.exposition import choose_encoder
from twisted.web import resource


class MetricsResource(resource.Resource):
    """GET /metrics: prometheus_client's exposition of `Metrics.registry(contexts)`.

    Rendered in the reactor thread (not prometheus_client's threaded twisted resource): the
    collectors read sessions and pools, which only the reactor thread may touch.  The format
    follows the scraper's Accept header (Prometheus text 0.0.4, or OpenMetrics)."""

    isLeaf = True

    def __init__(self, metrics, registry):
        super().__init__()
        self.metrics = metrics
        # The proxy registry is read at each scrape: proxies added or removed live show up.
        self.prometheus = metrics.registry(lambda: [r.ctx for r in registry])

    def render_GET(self, request):
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode())
        return encoder(self.prometheus)


class HealthResource(resource.Resource):
    """200 with each proxy's pool summary; 503 while a proxy is not listening."""

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        body = {}
        ok = True
        for runtime in self.registry:
            ctx = runtime.ctx
            listening = runtime.port is not None
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


class AdminRoot(resource.Resource):
    """`/` is the Query API; named children (metrics, healthz, ...) are served as usual."""

    def __init__(self, query=None):
        super().__init__()
        self.query = query

    def getChild(self, path, request):
        if path == b"" and self.query is not None:
            return self.query
        return resource.NoResource()

    def render(self, request):
        if self.query is not None:
            return self.query.render(request)
        return resource.NoResource().render(request)


def admin_root(metrics, registry, query=None):
    """-> the admin site's root: *query* (admin.query.QueryResource) at `/`."""
    root = AdminRoot(query)
    root.putChild(b"metrics", MetricsResource(metrics, registry))
    root.putChild(b"healthz", HealthResource(registry))
    return root
