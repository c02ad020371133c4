"""The admin endpoint of `Workers: N`, served by the parent for the whole proxy.

- `/metrics`: each worker's exposition (read from its private admin socket) merged into one:
  counters, histograms and additive gauges (connections, sessions, caps: each worker's share
  of the cap adds up to the proxy's) are summed; gauges that are not additive take the least
  (`*_percentage`, `target_available`) or the greatest (`*longest_wait*`) value; the `process_*`
  families keep one series per worker (label `worker`).  Added: `rdsproxy_workers`,
  `rdsproxy_worker_up{worker}`, `rdsproxy_worker_restarts_total{worker}`,
  `rdsproxy_worker_client_connections{worker,proxy_name}`, and the supervisor's health monitor
  (hub.py): `rdsproxy_health_check_rounds_total{proxy_name}` and
  `rdsproxy_health_checks_total{proxy_name,target}`.
- `/healthz`: the workers' answers summed per proxy, plus each worker's state.  200 "ok" when
  every worker listens, 200 "degraded" while some (not all) are down or restarting, 503 when
  none answers.
- `/console/data.json`: each worker's view merged per proxy (figures combined by the rules of
  /metrics, the borrow latency summed, the pinned sessions of every worker, the workers' state);
  the worker checks the client's address (loopback only) as it does alone.
- `DescribeDBProxySessions`: the signed request goes to every worker that is up, each answers
  all its sessions that pass the request's filters (X-Rdsproxy-Unpaged, believed on the private
  sockets only); the parent reads the answers with botocore's own parser, puts the sessions in
  one list (oldest first), cuts the page (MaxRecords, Marker) and writes the XML.  A worker that
  refuses the request (signature, policy, unknown proxy) answers for all; one that is up but
  does not answer makes the whole answer a 503, never a silent partial list.
- everything else (`POST /` the Query API, `/reload`, `/console`) is forwarded unchanged (the
  SigV4 signature covers the Host header, which is kept) to the first worker that is up.  A
  change (an Action other than Describe*/List*, or /reload) that succeeded there is then
  passed on to the other workers as a reload: that worker wrote it into the configuration
  file, which they re-read.  The client's address travels in X-Rdsproxy-Client, which only
  the workers' private UNIX sockets (reachable by the proxy's user alone) believe.

Every fetch from a worker is bounded by FETCH_TIMEOUT.
"""

import json
import uuid
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
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
        b"proxy-connection", CLIENT_HEADER, b"x-rdsproxy-unpaged"}


class ForwardedRequest(server.Request):
    """A worker's admin request: the parent forwards the client's address in a header (the
    worker's admin socket is a UNIX socket only the proxy's user can reach)."""

    def getClientAddress(self):
        forwarded = self.requestHeaders.getRawHeaders(CLIENT_HEADER)
        if forwarded:
            return IPv4Address("TCP", forwarded[0].decode("ascii", "replace"), 0)
        return super().getClientAddress()

    @property
    def unpaged(self):
        """True when the parent asks for every record of a paginated answer (it cuts the page
        itself from all workers' records: DescribeDBProxySessions)."""
        return bool(self.requestHeaders.getRawHeaders(b"x-rdsproxy-unpaged"))


@implementer(IAgentEndpointFactory)
class _WorkerSockets:
    """http://worker-<i>/... -> worker i's admin UNIX socket."""

    def __init__(self, reactor, supervisor):
        self.reactor, self.supervisor = reactor, supervisor

    def endpointForURI(self, uri):
        index = int(uri.host.decode("ascii").rsplit("-", 1)[1])
        return _Quiet(UNIXClientEndpoint(self.reactor, f"{self.supervisor.rundir}/admin-{index}.sock",
                                         timeout=FETCH_TIMEOUT))


@implementer(IStreamClientEndpoint)
class _Quiet:
    """An endpoint whose factories do not log "Starting factory" / "Stopping factory": the
    parent opens a connection to every worker for each scrape and API call."""

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def connect(self, factory):
        factory.noisy = False
        return self.endpoint.connect(factory)


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

    def gather(self, path, headers=None):
        """GET *path* from every worker that is up -> Deferred[[(WorkerState, body or None)]]
        (None: the worker did not answer 200)."""
        live = self.supervisor.live()
        ds = [self.request(w.index, b"GET", path,
                           headers if headers is not None else Headers({b"accept": [b"text/plain"]}))
              for w in live]
        d = defer.DeferredList(ds, consumeErrors=True)
        return d.addCallback(lambda results: [
            (w, r[2] if ok and r[0] == 200 else None) for w, (ok, r) in zip(live, results)])

    def everyone(self, method, path, headers, body):
        """Send one request to every worker that is up -> Deferred[[(WorkerState, (code,
        headers, body))]]; fails (the first failure) when a worker that is up does not answer:
        an answer for the whole proxy is never made of some workers' parts silently."""
        live = self.supervisor.live()
        ds = [self.request(w.index, method, path, headers, body) for w in live]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        return d.addCallback(lambda answers: list(zip(live, answers)))


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
    rounds = Metric("rdsproxy_health_check_rounds", "Health check rounds of the one monitor the "
                    "supervisor runs for every worker.", "counter")
    checks = Metric("rdsproxy_health_checks", "Health checks (logins) of each target made by that "
                    "monitor.", "counter")
    hub = getattr(supervisor, "hub", None)
    for name, done, per_target in (hub.figures() if hub is not None else ()):
        rounds.add_sample("rdsproxy_health_check_rounds_total", {"proxy_name": name}, done)
        for target, made in sorted(per_target.items()):
            checks.add_sample("rdsproxy_health_checks_total", {"proxy_name": name, "target": target}, made)
    return [count, up, restarts, clients, rounds, checks]


class _FromWorkers(resource.Resource):
    """A parent resource answered from what the workers answer (the base of the merged views
    and of the forwarder): *supervisor* knows which workers are up, *workers* talks to them."""

    isLeaf = True

    def __init__(self, supervisor, workers):
        super().__init__()
        self.supervisor, self.workers = supervisor, workers

    def answer_with(self, request, d, answer):
        """Answer *request* with answer(result of *d*) -> NOT_DONE_YET (see `_serve`)."""
        _serve(request, d, answer)
        return server.NOT_DONE_YET


def _finish(request, code, content_type, body):
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.write(body)
    request.finish()


class MergedMetrics(_FromWorkers):
    def render_GET(self, request):
        def merged(results):
            texts = [(w.index, body.decode("utf-8")) for w, body in results if body is not None]
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collected(merge_metrics(texts) + _worker_metrics(self.supervisor, texts)))
            _finish(request, 200, b"text/plain; version=0.0.4; charset=utf-8", generate_latest(registry))

        return self.answer_with(request, self.workers.gather(b"/metrics"), merged)


# -- /healthz --------------------------------------------------------------------------------------

class MergedHealth(_FromWorkers):
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
            _finish(request, code, b"application/json", json.dumps(body).encode())

        return self.answer_with(request, self.workers.gather(b"/healthz"), merged)


# -- /console/data.json ------------------------------------------------------------------------------

_SINGLE_VALUED = ("client_connections_waiting", "client_longest_wait_seconds",
                  "database_connections_opening")


def merge_console(views, workers):
    """[(worker index, the worker's console data)] -> one console data for the whole proxy:
    per proxy (by name, in the first worker's order) the settings and targets of the first
    worker that has it, its figures combined as /metrics combines them (sum, or least / greatest
    for the gauges that do not add up), the borrow latency summed and every worker's pinned
    sessions (oldest first).  *workers*: the supervisor's WorkerStates (shown as they are)."""
    proxies, order, time, refresh = {}, [], 0, None
    figures = {}  # proxy -> name -> [values] (single-valued) or {labels: [values]}
    for _, view in views:
        time = max(time, view.get("time", 0))
        refresh = refresh or view.get("refreshSeconds")
        for proxy in view.get("proxies", []):
            name = proxy["name"]
            if name not in proxies:
                proxies[name] = dict(proxy, figures={}, borrowLatency=None, pinnedSessions=[])
                figures[name] = {}
                order.append(name)
            into = proxies[name]
            for key, value in proxy.get("figures", {}).items():
                if isinstance(value, list):
                    series = figures[name].setdefault(key, {})
                    for item in value:
                        series.setdefault(tuple(item["labels"]), []).append(item["value"])
                else:
                    figures[name].setdefault(key, []).append(value)
            latency = proxy.get("borrowLatency")
            if latency is not None:
                total = into["borrowLatency"] or {"sum": 0.0, "count": 0}
                into["borrowLatency"] = {"sum": total["sum"] + latency["sum"],
                                         "count": total["count"] + latency["count"]}
            into["pinnedSessions"] = into["pinnedSessions"] + list(proxy.get("pinnedSessions", []))
    for name in order:
        out = proxies[name]["figures"]
        for key, value in figures[name].items():
            combine = _combine(key)
            if isinstance(value, dict):
                out[key] = [{"labels": list(labels), "value": combine(values)}
                            for labels, values in value.items()]
            else:
                out[key] = combine(value)
        proxies[name]["pinnedSessions"].sort(key=_oldest_first)
    return {"time": time, "refreshSeconds": refresh, "proxies": [proxies[n] for n in order],
            "workers": [w.as_dict() for w in workers]}


def _oldest_first(session):
    """Sort key of a DBProxySession (dict): its CreatedDate (a datetime, or the ISO text the
    console's JSON has), then its id."""
    created = session.get("CreatedDate")
    if hasattr(created, "timestamp"):
        created = created.timestamp()
    elif isinstance(created, str):
        import datetime
        created = datetime.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    return (created or 0, session.get("SessionId", 0))


class MergedConsoleData(_FromWorkers):
    """GET /console/data.json for the whole proxy.  The client's address goes to the workers,
    which refuse it (403) unless it is on the loopback interface, as one process does: their
    refusal is passed on as it is."""

    def render_GET(self, request):
        headers = Headers({b"accept": [b"application/json"]})
        headers.setRawHeaders(CLIENT_HEADER, [_client_host(request)])

        def merged(answers):
            views = []
            for w, (code, out_headers, data) in answers:
                if code != 200:  # refused (403): every worker refuses the same way
                    return _pass_on(request, code, out_headers, data)
                views.append((w.index, json.loads(data)))
            body = json.dumps(merge_console(views, self.supervisor.workers)).encode()
            request.setHeader(b"cache-control", b"no-store")
            _finish(request, 200, b"application/json", body)

        if not self.supervisor.live():
            return _no_worker(request)
        return self.answer_with(request, self.workers.everyone(b"GET", request.uri, headers, b""),
                                merged)


# -- DescribeDBProxySessions ---------------------------------------------------------------------------

UNPAGED_HEADER = b"x-rdsproxy-unpaged"
SESSIONS_ACTION = "DescribeDBProxySessions"


def merge_sessions(op, answers, form, request_id):
    """The DescribeDBProxySessions answer for the whole proxy, from every worker's unpaged
    answer (XML bytes): -> XML bytes of the page *form* (the request's form: its MaxRecords and
    Marker) asks for.  Raises QueryError for a MaxRecords or Marker that is not valid."""
    from botocore.parsers import QueryParser

    from txrdsproxy.admin.operations import _with_marker, paginate
    from txrdsproxy.admin.querycodec import decode_params, encode_response
    parser = QueryParser()
    items = []
    for data in answers:
        parsed = parser.parse({"body": data, "headers": {}, "status_code": 200}, op.output_shape)
        items.extend(parsed.get("DBProxySessions", []))
    items.sort(key=_oldest_first)
    params = decode_params(op, {k: v for k, v in form.items() if k not in ("Action", "Version")})
    page, marker = paginate(items, params)
    return encode_response(op, _with_marker({"DBProxySessions": page}, marker), request_id)


class MergedSessions(_FromWorkers):
    """`Action=DescribeDBProxySessions` for the whole proxy (see the module docstring)."""

    def render_with(self, request, body, form):
        from txrdsproxy.admin.querycodec import QueryError, encode_error, operation
        headers = _forwarded_headers(request)
        headers.setRawHeaders(UNPAGED_HEADER, [b"1"])

        def merged(answers):
            for _, (code, out_headers, data) in answers:
                if code != 200:  # refused: the first refusal speaks for all
                    return _pass_on(request, code, out_headers, data)
            request_id = next((values[0].decode("latin-1") for name, values in answers[0][1][1]
                               if name.lower() == b"x-amzn-requestid"), None) or str(uuid.uuid4())
            request.setHeader(b"x-amzn-requestid", request_id.encode())
            op = operation(SESSIONS_ACTION)
            try:
                out = merge_sessions(op, [data for _, (_, _, data) in answers], form, request_id)
            except QueryError as e:
                return _finish(request, e.status, b"text/xml",
                               encode_error(e.code, e.message, request_id, e.sender))
            _finish(request, 200, b"text/xml", out)

        if not self.supervisor.live():
            return _no_worker(request)
        return self.answer_with(request, self.workers.everyone(request.method, request.uri, headers,
                                                                body), merged)


# -- everything else: forwarded ---------------------------------------------------------------------

def _form(request, body):
    """The Query API form of *request* ({str: str}, the last value of a repeated key) -- for
    routing only: the worker reads and checks it."""
    args = dict(request.args)
    if body and b"x-www-form-urlencoded" in (request.getHeader(b"content-type") or b""):
        args.update(parse_qs(body))
    return {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace") for k, v in args.items() if v}


def _is_change(request, body):
    path = request.path.rstrip(b"/")
    if path == b"/reload":
        return request.method == b"POST"
    if path != b"":
        return False
    action = _form(request, body).get("Action", "")
    return bool(action) and not action.startswith(("Describe", "List"))


def _client_host(request):
    return getattr(request.getClientAddress(), "host", "").encode("ascii")


def _forwarded_headers(request):
    """The client's request headers a worker gets: hop-by-hop ones left out, the client's
    address added (X-Rdsproxy-Client)."""
    headers = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        if name.lower() not in _HOP:
            headers.setRawHeaders(name, values)
    headers.setRawHeaders(CLIENT_HEADER, [_client_host(request)])
    return headers


def _pass_on(request, code, out_headers, data):
    """Answer *request* with a worker's answer as it came (hop-by-hop headers left out)."""
    request.setResponseCode(code)
    for name, values in out_headers:
        if name.lower() not in _HOP:
            request.responseHeaders.setRawHeaders(name, values)
    request.write(data)
    request.finish()


def _no_worker(request):
    request.setResponseCode(503)
    request.setHeader(b"content-type", b"text/plain")
    return b"no proxy worker is up (starting or restarting)\n"


class Forwarder(_FromWorkers):
    """Everything the parent does not merge: to the first worker that is up."""

    def __init__(self, supervisor, workers):
        super().__init__(supervisor, workers)
        self.console = MergedConsoleData(supervisor, workers)
        self.sessions = MergedSessions(supervisor, workers)

    def render(self, request):
        if request.method == b"GET" and request.path.rstrip(b"/") == b"/console/data.json":
            return self.console.render_GET(request)
        live = self.supervisor.live()
        if not live:
            return _no_worker(request)
        target = live[0]
        body = request.content.read() if request.content is not None else b""
        if request.path.rstrip(b"/") == b"":
            form = _form(request, body)
            if form.get("Action") == SESSIONS_ACTION:
                return self.sessions.render_with(request, body, form)
        change = _is_change(request, body)
        d = self.workers.request(target.index, request.method, request.uri,
                                 _forwarded_headers(request), body)

        def answered(result):
            code, out_headers, data = result
            if change and 200 <= code < 300:
                # Applied there and written into the file: the others re-read the file.
                self.supervisor.file_changed(but=target.index)
            _pass_on(request, code, out_headers, data)

        return self.answer_with(request, d, answered)


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
