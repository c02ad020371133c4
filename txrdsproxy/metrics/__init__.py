"""Prometheus metrics: RDS Proxy's CloudWatch metrics and PgBouncer-style pool figures.

One `Metrics` object is built per process (or per embedded proxy set) and injected.  It holds the
event instruments the proxy updates as things happen (counters, latency histograms; see
instruments.py).  Everything that is a *current* figure (connections, sessions, pins, waiters) is
not stored at all: the collector (collector.py) reads it from the sessions' and connections'
own states at scrape time, so there is no second bookkeeping to drift.

Exposition is prometheus_client's (`registry(contexts)` -> a CollectorRegistry; admin/resources.py
serves it), with Prometheus naming: `rdsproxy_` + snake_case, counters end in `_total`, latencies
are histograms in seconds, labels are CloudWatch's dimensions in snake_case (`proxy_name`,
`target_group`, `target`, `target_role`).  docs/metrics.md maps every name to its CloudWatch name.

Instruments are called with positional label values.  Counters that CloudWatch keys by target
are called with (proxy name, target id) and get their `target_group` label from the proxy's
configuration at scrape time.
"""

import weakref

from txrdsproxy.metrics.availability import AvailabilityTracker
from txrdsproxy.metrics.instruments import BORROW_BUCKETS, QUERY_BUCKETS, Counter, Histogram

__all__ = ["Metrics", "close_category", "CLOSE_CATEGORIES"]

P = ("proxy_name",)
PT = ("proxy_name", "target")  # + target_group, added by the collector


class Metrics:
    def __init__(self):
        self._instruments = []
        c, h = self._counter, self._histogram
        # -- client side (CloudWatch) ----------------------------------------------------------
        self.client_connections_received = c(
            "client_connections_received", "ClientConnectionsReceived",
            "Client connection requests received.", P)
        self.client_connections_setup_succeeded = c(
            "client_connections_setup_succeeded", "ClientConnectionsSetupSucceeded",
            "Client connections established (authenticated and logged in), with or without TLS.", P)
        self.client_connections_setup_failed_auth = c(
            "client_connections_setup_failed_auth", "ClientConnectionsSetupFailedAuth",
            "Client connection attempts that failed because of authentication or TLS "
            "(wrong password, unknown user, TLS required, TLS handshake failed).", P)
        self.client_connections_closed = c(
            "client_connections_closed", "ClientConnectionsClosed", "Client connections closed.", P)
        # -- database side (CloudWatch) --------------------------------------------------------
        self.db_connection_requests = c(
            "database_connection_requests", "DatabaseConnectionRequests",
            "Requests to create a database connection.", PT)
        self.db_connection_requests_tls = c(
            "database_connection_requests_with_tls", "DatabaseConnectionRequestsWithTLS",
            "Requests to create a database connection with TLS.", PT)
        self.db_connections_setup_succeeded = c(
            "database_connections_setup_succeeded", "DatabaseConnectionsSetupSucceeded",
            "Database connections established (logged in and initialised), with or without TLS.", PT)
        self.db_connections_setup_failed = c(
            "database_connections_setup_failed", "DatabaseConnectionsSetupFailed",
            "Database connection requests that failed.", PT)
        self.borrow_latency = h(
            "database_connections_borrow_latency_seconds", "DatabaseConnectionsBorrowLatency",
            "Seconds from asking the pool for a database connection to getting one (0 for an idle "
            "connection).", P, BORROW_BUCKETS)
        self.query_response_latency = h(
            "query_response_latency_seconds", "QueryResponseLatency",
            "Seconds from a request's arrival (a simple query, an extended-protocol batch up to "
            "Sync, a COM_QUERY or COM_STMT_EXECUTE) to the end of the proxy's response.", P,
            QUERY_BUCKETS)
        self.query_database_response_latency = h(
            "query_database_response_latency_seconds", "QueryDatabaseResponseLatency",
            "Seconds the database took to answer a request (from forwarding it on a database "
            "connection to the end of the database's response).", PT, QUERY_BUCKETS)
        # -- ours (PgBouncer users look for these) ---------------------------------------------
        self.pins = c(
            "session_pins", None, "Client sessions pinned to their database connection, by reason.",
            ("proxy_name", "reason"))
        self.borrow_timeouts = c(
            "connection_borrow_timeouts", None,
            "Borrows that ended with 'Timed-out waiting to acquire database connection' "
            "(ConnectionBorrowTimeout).", P)
        self.db_connections_closed = c(
            "database_connections_closed", None,
            "Database connections closed, by reason (see docs/metrics.md for the reasons).",
            ("proxy_name", "target", "reason"))
        self._availability = weakref.WeakKeyDictionary()

    def _counter(self, name, cloudwatch, help_text, labels):
        counter = Counter(name, help_text, labels)
        self._instruments.append((counter, cloudwatch))
        return counter

    def _histogram(self, name, cloudwatch, help_text, labels, buckets):
        histogram = Histogram(name, help_text, labels, buckets)
        self._instruments.append((histogram, cloudwatch))
        return histogram

    def counters(self):
        return [i for i, _ in self._instruments if isinstance(i, Counter)]

    def histograms(self):
        return [i for i, _ in self._instruments if isinstance(i, Histogram)]

    def cloudwatch_names(self):
        """-> {prometheus family name: CloudWatch name} of the event instruments."""
        return {i.name: cw for i, cw in self._instruments if cw is not None}

    # -- what the proxy calls ------------------------------------------------------------------
    def connection_closed(self, proxy_name, conn, reason):
        """A database connection of the pool closed (by the pool, or on its own) with *reason*."""
        target = getattr(conn, "target", None)
        self.db_connections_closed.inc(
            proxy_name, target.rds_resource_id if target is not None else "", close_category(reason))

    def availability(self, ctx):
        """The AvailabilityTracker of one proxy (made on first use, then kept with the proxy)."""
        tracker = self._availability.get(ctx)
        if tracker is None:
            tracker = self._availability[ctx] = AvailabilityTracker(ctx)
            tracker.update()
        return tracker

    def forget_proxy(self, proxy_name):
        """A proxy was removed: its counter and histogram series go (Prometheus sees them end)."""
        for instrument, _ in self._instruments:
            instrument.forget(proxy_name)

    # -- exposition -----------------------------------------------------------------------------
    def registry(self, contexts, process=True):
        """-> a prometheus_client CollectorRegistry exposing these metrics for *contexts* (a list
        of ProxyContext, or a callable returning the current list: proxies come and go).  With
        *process*, the standard process_* metrics (CPU, memory, open files) too."""
        from prometheus_client import CollectorRegistry, ProcessCollector

        from txrdsproxy.metrics.collector import ProxyCollector
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ProxyCollector(self, contexts))
        if process:
            ProcessCollector(registry=registry)
        return registry

    def render(self, contexts):
        """Prometheus text exposition (0.0.4) of *contexts* now -> str."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry(contexts, process=False)).decode()


# -- why database connections close: a small fixed set of label values ------------------------------
# The pool and the connections give free-text reasons (they go to the log as they are); the label
# must be one of a few values, or every distinct error message would make a new series.
CLOSE_CATEGORIES = (
    # (category, substrings of the reason texts that mean it), first match wins
    ("proxy_stopping", ("proxy stopping", "pool closed", "proxy removed", "draining")),
    ("failover", ("failover", "writer changed")),
    ("target_vanished", ("vanished",)),
    ("target_deregistered", ("deregistered", "retired")),
    ("idle_limit", ("above maxidleconnectionspercent",)),
    ("max_connections", ("above maxconnectionspercent",)),
    ("idle_timeout", ("idle too long", "max_idle", "idle for")),
    ("evicted", ("evicted", "making room")),
    ("reset_failed", ("reset failed",)),
    ("client_disconnected", ("client disconnected", "client left")),
    ("timeout", ("timed out",)),
    ("unknown_state", ("unknown state", "returned while", "mid-request")),
    ("database_closed", ("database closed", "database ended", "connection lost", "lost:",
                         "connection reset", "terminating connection", "fatal")),
)


def close_category(reason):
    """Free-text close reason -> one of the CLOSE_CATEGORIES names, or "other"."""
    text = (reason or "").lower()
    for category, needles in CLOSE_CATEGORIES:
        for needle in needles:
            if needle in text:
                return category
    return "other"
