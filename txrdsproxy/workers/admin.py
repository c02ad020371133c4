"""The admin endpoint of `Workers: N`, served by the parent for the whole proxy.

- `/metrics`: each worker's exposition (read from its private admin socket) merged into one:
  counters, histograms and additive gauges (connections, sessions, caps: each worker's share
  of the cap adds up to the proxy's) are summed; gauges that are not additive take the least
  (`*_percentage`, `target_available`) or the greatest (`*longest_wait*`) value; the `process_*`
  families keep one series per worker (label `worker`).  Added: `rdsproxy_workers`,
  `rdsproxy_worker_up{worker}`, `rdsproxy_worker_restarts_total{worker}` and
  `rdsproxy_worker_client_connections{worker,proxy_name}`.
- `/healthz`: the workers' answers summed per proxy, plus each worker's state.  200 "ok" when
  every worker listens, 200 "degraded" while some (not all) are down or restarting, 503 when
  none answers.
- everything else (`POST /` the Query API, `/reload`, `/console`) is forwarded unchanged (the
  SigV4 signature covers the Host header, which is kept) to the first worker that is up.  A
  change (an Action other than Describe*/List*, or /reload) that succeeded there is then
  passed on to the other workers as a reload: that worker wrote it into the configuration
  file, which they re-read.  The client's address travels in X-Rdsproxy-Client, which only
  the workers' private UNIX sockets (reachable by the proxy's user alone) believe.

Every fetch from a worker is bounded by FETCH_TIMEOUT.
"""

import json
import signal
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

__all__ = ["ForwardedRequest", "parent_admin_site", "merge_metrics"]

log = Logger()

FETCH_TIMEOUT = 10.0
CLIENT_HEADER = b"x-rdsproxy-client"
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te", b"upgrade",
        b"proxy-connection", CLIENT_HEADER}


class ForwardedRequest(server.Request):
    """A worker's admin request: the parent forwards the client's address in a header (the
    worker's admin socket is a UNIX socket only the proxy's user can reach)."""

    def getClientAddress(self):
        forwarded = self.requestHeaders.getRawHeaders(CLIENT_HEADER)
        if forwarded:
            return IPv4Address("TCP", forwarded[0].decode("ascii", "replace"), 0)
        return super().getClientAddress()


@implementer(IAgentEndpointFactory)
class _WorkerSockets:
    """http://worker-<i>/... -> worker i's admin UNIX socket."""

    def __init__(self, reactor, supervisor):
        self.reactor, self.supervisor = reactor, supervisor

    def endpointForURI(self, uri):
        index = int(uri.host.decode("ascii").rsplit("-", 1)[1])
        return UNIXClientEndpoint(self.reactor, f"{self.supervisor.rundir}/admin-{index}.sock",
                                  timeout=FETCH_TIMEOUT)


class _Workers:
    """HTTP to the workers' private admin sockets."""

    def __init__(self, supervisor):
        self.supervisor = supervisor
        self.reactor = supervisor.reactor
        self.agent = Agent.usingEndpointFactory(self.reactor, _WorkerSockets(self.reactor, supervisor))

    def request(self, index, method, path, headers=None, body=None):
        """-> Deferred[(code, [(name, value)], body bytes)]; fails on error or FETCH_TIMEOUT."""
        from twisted.web.client import FileBodyProducer
        from io import BytesIO
        producer = FileBodyProducer(BytesIO(body)) if body else None
        d = self.agent.request(method, b"http://worker-%d%s" % (index, path), headers, producer)
        d.addCallback(lambda r: readBody(r).addCallback(
            lambda data: (r.code, list(r.headers.getAllRawHeaders()), data)))
        return d.addTimeout(FETCH_TIMEOUT, self.reactor)

    def gather(self, path):
        """GET *path* from every worker that is up -> Deferred[[(WorkerState, body or None)]]."""
        live = self.supervisor.live()
        ds = [self.request(w.index, b"GET", path, Headers({b"accept": [b"text/plain"]}))
              for w in live]
        d = defer.DeferredList(ds, consumeErrors=True)
        return d.addCallback(lambda results: [
            (w, r[2] if ok and r[0] == 200 else None) for w, (ok, r) in zip(live, results)])


# -- /metrics --------------------------------------------------------------------------------------

def _combine(name):
    if name.endswith("_created"):
        return min
    if name.endswith("_percentage") or "target_available" in name:
        return min
    if "longest_wait" in name:
        return max
    return sum


def merge_metrics(texts):
    """[(worker index, Prometheus text)] -> [Metric], merged as the module docstring says."""
    families = {}  # name -> Metric
    values = {}  # name -> {(sample name, labels): [values]}
    order = []
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            per_worker = family.name.startswith("process_")
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
                order.append(family.name)
            for sample in family.samples:
                labels = dict(sample.labels)
                if per_worker:
                    labels["worker"] = str(index)
                key = (sample.name, tuple(sorted(labels.items())))
                values[family.name].setdefault(key, []).append(sample.value)
    out = []
    for name in order:
        metric = families[name]
        for (sample_name, labels), vals in values[name].items():
            metric.add_sample(sample_name, dict(labels), _combine(sample_name)(vals))
        out.append(metric)
    return out


class _Collected:
    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        return iter(self.metrics)


def _worker_metrics(supervisor, texts):
    up = Metric("rdsproxy_worker_up", "1 while the worker process is up and listening.", "gauge")
    restarts = Metric("rdsproxy_worker_restarts", "Times the worker process was restarted after "
                      "it died.", "counter")
    count = Metric("rdsproxy_workers", "Worker processes configured (Workers).", "gauge")
    count.add_sample("rdsproxy_workers", {}, supervisor.count)
    for w in supervisor.workers:
        up.add_sample("rdsproxy_worker_up", {"worker": str(w.index)}, 1 if w.up else 0)
        restarts.add_sample("rdsproxy_worker_restarts_total", {"worker": str(w.index)}, w.restarts)
    clients = Metric("rdsproxy_worker_client_connections",
                     "Current client connections, by worker process.", "gauge")
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            if family.name == "rdsproxy_client_connections":
                for s in family.samples:
                    clients.add_sample("rdsproxy_worker_client_connections",
                                       dict(s.labels, worker=str(index)), s.value)
    return [count, up, restarts, clients]


class MergedMetrics(resource.Resource):
    isLeaf = True

    def __init__(self, supervisor, workers):
        super().__init__()
        self.supervisor, self.workers = supervisor, workers

    def render_GET(self, request):
        def merged(results):
            texts = [(w.index, body.decode("utf-8")) for w, body in results if body is not None]
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collected(merge_metrics(texts) + _worker_metrics(self.supervisor, texts)))
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(generate_latest(registry))
            request.finish()

        _serve(request, self.workers.gather(b"/metrics"), merged)
        return server.NOT_DONE_YET


# -- /healthz --------------------------------------------------------------------------------------

class MergedHealth(resource.Resource):
    isLeaf = True

    def __init__(self, supervisor, workers):
        super().__init__()
        self.supervisor, self.workers = supervisor, workers

    def render_GET(self, request):
        def merged(results):
            proxies, answered, listening = {}, 0, True
            for _, body in results:
                if body is None:
                    continue
                answered += 1
                for name, figures in json.loads(body)["proxies"].items():
                    into = proxies.setdefault(name, {"listening": True})
                    into["listening"] = into["listening"] and figures.get("listening", False)
                    for key, value in figures.items():
                        if key != "listening" and isinstance(value, (int, float)):
                            into[key] = into.get(key, 0) + value
            listening = all(p["listening"] for p in proxies.values())
            if answered == self.supervisor.count and listening:
                status, code = "ok", 200
            elif answered:
                status, code = "degraded", 200
            else:
                status, code = "starting", 503
            body = {"status": status, "proxies": proxies,
                    "workers": [w.as_dict() for w in self.supervisor.workers]}
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(body).encode())
            request.finish()

        _serve(request, self.workers.gather(b"/healthz"), merged)
        return server.NOT_DONE_YET


# -- everything else: forwarded ---------------------------------------------------------------------

def _is_change(request, body):
    path = request.path.rstrip(b"/")
    if path == b"/reload":
        return request.method == b"POST"
    if path != b"":
        return False
    args = dict(request.args)
    if body and b"x-www-form-urlencoded" in (request.getHeader(b"content-type") or b""):
        args.update(parse_qs(body))
    action = (args.get(b"Action") or [b""])[0]
    return bool(action) and not action.startswith((b"Describe", b"List"))


class Forwarder(resource.Resource):
    isLeaf = True

    def __init__(self, supervisor, workers):
        super().__init__()
        self.supervisor, self.workers = supervisor, workers

    def render(self, request):
        live = self.supervisor.live()
        if not live:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain")
            return b"no proxy worker is up (starting or restarting)\n"
        target = live[0]
        body = request.content.read() if request.content is not None else b""
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _HOP:
                headers.setRawHeaders(name, values)
        client = request.getClientAddress()
        headers.setRawHeaders(CLIENT_HEADER, [getattr(client, "host", "").encode("ascii")])
        change = _is_change(request, body)
        d = self.workers.request(target.index, request.method, request.uri, headers, body)

        def answered(result):
            code, out_headers, data = result
            request.setResponseCode(code)
            for name, values in out_headers:
                if name.lower() not in _HOP:
                    request.responseHeaders.setRawHeaders(name, values)
            if change and 200 <= code < 300:
                # Applied there and written into the file: the others re-read the file.
                self.supervisor.signal_workers(signal.SIGHUP, but=target.index)
            request.write(data)
            request.finish()

        _serve(request, d, answered)
        return server.NOT_DONE_YET


def _serve(request, d, answer):
    """Answer *request* with answer(result of *d*) (which writes and finishes it); a failure
    becomes a 503; nothing is written once the client has gone."""
    gone = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(result):
        if not gone:
            answer(result)

    def failed(failure):
        if gone or request.finished:
            return
        log.error("admin: a worker did not answer: {error}", error=failure.getErrorMessage())
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"text/plain")
        request.write(b"a proxy worker did not answer\n")
        request.finish()

    d.addCallback(done).addErrback(failed)


class ParentRoot(resource.Resource):
    def __init__(self, supervisor):
        super().__init__()
        workers = _Workers(supervisor)
        self.forwarder = Forwarder(supervisor, workers)
        self.putChild(b"metrics", MergedMetrics(supervisor, workers))
        self.putChild(b"healthz", MergedHealth(supervisor, workers))

    def getChild(self, path, request):
        request.postpath.insert(0, path)
        request.prepath.pop()
        return self.forwarder

    def render(self, request):
        return self.forwarder.render(request)


def parent_admin_site(supervisor):
    site = server.Site(ParentRoot(supervisor))
    site.noisy = False
    return site
