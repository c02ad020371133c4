"""The prometheus_client collector: event instruments plus figures read from states at scrape time.

`ProxyCollector.collect()` runs in the reactor thread (admin/resources.py calls the exposition
there), so it may read sessions, pools and connections directly: every gauge below is computed
from the objects' own states now (`SessionState`, `IBackendConnection.state`, the pool's waiters,
TargetHealth), never from a parallel count.  Connections are read through `IBackendConnection`
only; the pool's placeholders for connections still being opened do not provide it and are
counted as "opening".
"""

import collections

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from txrdsproxy.proxy.interfaces import BORROWED, IBackendConnection
from txrdsproxy.proxy.session import SessionState

PREFIX = "rdsproxy_"
DEFAULT_TARGET_GROUP = "default"

# Current figures: (family name, CloudWatch name or None, help, label names).
P = ["proxy_name"]
PG = ["proxy_name", "target_group"]
PGT = ["proxy_name", "target_group", "target"]
GAUGES = [
    ("client_connections", "ClientConnections", "Current client connections.", P),
    ("client_connections_tls", "ClientConnectionsTLS", "Current client connections with TLS.", P),
    ("client_connections_no_tls", "ClientConnectionsNoTLS",
     "Current client connections without TLS.", P),
    ("database_connections", "DatabaseConnections", "Current database connections.", PGT),
    ("database_connections_currently_borrowed", "DatabaseConnectionsCurrentlyBorrowed",
     "Database connections currently lent to a client session.", PGT),
    ("database_connections_currently_in_transaction", "DatabaseConnectionsCurrentlyInTransaction",
     "Database connections currently inside a transaction.", PGT),
    ("database_connections_currently_session_pinned", "DatabaseConnectionsCurrentlySessionPinned",
     "Database connections currently pinned to a client session.", PGT),
    ("database_connections_with_tls", "DatabaseConnectionsWithTLS",
     "Current database connections with TLS.", PGT),
    ("max_database_connections_allowed", "MaxDatabaseConnectionsAllowed",
     "The most database connections the pool may open: MaxConnectionsPercent of the writer's "
     "max_connections (absent until a connection has reported it).", PGT),
    ("availability_percentage", "AvailabilityPercentage",
     "Percent of the last minute the target group was available in the role (from the health "
     "of its targets).", ["proxy_name", "target_group", "target_role"]),
    # ours
    ("client_sessions", None, "Client sessions by state (authenticating, idle, borrowing, borrowed, "
     "pinned).", ["proxy_name", "state"]),
    ("client_connections_waiting", None,
     "Client sessions waiting for a database connection (PgBouncer's cl_waiting).", PG),
    ("client_longest_wait_seconds", None,
     "Seconds the longest-waiting client session has waited for a database connection "
     "(PgBouncer's maxwait); 0 when nobody waits.", PG),
    ("sessions_pinned", None, "Client sessions currently pinned, by pin reason.",
     ["proxy_name", "reason"]),
    ("database_connections_by_state", None,
     "Database connections of the pool by state (idle, borrowed, resetting); PgBouncer's "
     "sv_idle / sv_active.", PGT + ["state"]),
    ("database_connections_opening", None,
     "Database connections being opened (connect, login, InitQuery) for waiting sessions.", PG),
    ("target_available", None,
     "1 when the target's last health evidence is AVAILABLE, else 0; target_role is its current "
     "role.", PGT + ["target_role"]),
]
# Counters read from states (sessions' own counts plus those of ended sessions).
QUERY_COUNTERS = [
    ("query_requests", "QueryRequests",
     "Queries received; a query of several statements, or an extended-protocol batch up to "
     "Sync, counts once."),
    ("query_requests_tls", "QueryRequestsTLS", "Queries received on TLS client connections."),
    ("query_requests_no_tls", "QueryRequestsNoTLS",
     "Queries received on client connections without TLS."),
]
STATE_NAMES = [s.value for s in SessionState if s is not SessionState.CLOSED]


def state_cloudwatch_names():
    """-> {family name: CloudWatch name} of the figures read from states."""
    out = {name: cw for name, cw, _, _ in GAUGES if cw is not None}
    out.update({name: cw for name, cw, _ in QUERY_COUNTERS})
    return out


class ProxyCollector:
    """A prometheus_client custom collector over one Metrics object and the running proxies.

    *contexts*: a list of ProxyContext, or a callable returning the current list (the runtime
    registry adds and removes proxies while the process runs).
    """

    def __init__(self, metrics, contexts):
        self.metrics = metrics
        self._contexts = contexts

    def contexts(self):
        found = self._contexts() if callable(self._contexts) else self._contexts
        return list(found)

    def collect(self):
        contexts = self.contexts()
        groups = {ctx.name: _group(ctx) for ctx in contexts}
        yield from self._events(groups)
        yield from self._queries(contexts)
        yield from self._gauges(contexts)

    # -- event instruments ------------------------------------------------------------------------
    def _events(self, groups):
        for counter in self.metrics.counters():
            labels = list(counter.labels)
            with_group = labels[:1] == ["proxy_name"] and (
                "target" in labels or counter.name == "connection_borrow_timeouts")
            names = labels[:1] + ["target_group"] + labels[1:] if with_group else labels
            family = CounterMetricFamily(PREFIX + counter.name, counter.help, labels=names)
            for values, n in sorted(counter.values.items()):
                values = list(values)
                if with_group:
                    values.insert(1, groups.get(values[0], DEFAULT_TARGET_GROUP))
                family.add_metric(values, n)
            yield family
        for histogram in self.metrics.histograms():
            labels = list(histogram.labels)
            with_group = "target" in labels
            names = labels[:1] + ["target_group"] + labels[1:] if with_group else labels
            family = HistogramMetricFamily(PREFIX + histogram.name, histogram.help, labels=names)
            for values, series in sorted(histogram.items()):
                values = list(values)
                if with_group:
                    values.insert(1, groups.get(values[0], DEFAULT_TARGET_GROUP))
                family.add_metric(values, series.cumulative(), series.sum)
            yield family

    # -- QueryRequests, from the sessions' own counts ------------------------------------------------
    def _queries(self, contexts):
        families = {name: CounterMetricFamily(PREFIX + name, help_text, labels=P)
                    for name, _, help_text in QUERY_COUNTERS}
        for ctx in contexts:
            tls = getattr(ctx, "queries_closed_tls", 0)
            total = ctx.queries_closed
            for session in list(ctx.sessions):
                total += session.queries
                if session.tls:
                    tls += session.queries
            families["query_requests"].add_metric([ctx.name], total)
            families["query_requests_tls"].add_metric([ctx.name], tls)
            families["query_requests_no_tls"].add_metric([ctx.name], total - tls)
        yield from families.values()

    # -- current figures ---------------------------------------------------------------------------
    def _gauges(self, contexts):
        families = {name: GaugeMetricFamily(PREFIX + name, help_text, labels=labels)
                    for name, _, help_text, labels in GAUGES}
        for ctx in contexts:
            for name, labels, value in proxy_figures(ctx, self.metrics):
                families[name].add_metric(labels, value)
        yield from families.values()


def _group(ctx):
    group = getattr(ctx.config, "target_group", None)
    return getattr(group, "name", None) or DEFAULT_TARGET_GROUP


def _target_name(target):
    return target.rds_resource_id if target is not None else ""


def proxy_figures(ctx, metrics=None):
    """-> [(family name, label values, value)]: the current figures of one proxy, read now.

    Also what the console page and /healthz show, so they agree with /metrics by construction.
    """
    name, group = ctx.name, _group(ctx)
    out = []
    sessions = list(ctx.sessions)
    tls = sum(1 for s in sessions if s.tls)
    out += [("client_connections", [name], len(sessions)),
            ("client_connections_tls", [name], tls),
            ("client_connections_no_tls", [name], len(sessions) - tls)]
    by_state = collections.Counter(s.state.value for s in sessions)
    for state in STATE_NAMES:
        out.append(("client_sessions", [name, state], by_state.get(state, 0)))
    pins = collections.Counter(
        s.pin_reason.value for s in sessions
        if s.state is SessionState.PINNED and s.pin_reason is not None)
    for reason, n in sorted(pins.items()):
        out.append(("sessions_pinned", [name, reason], n))

    pool = ctx.pool
    now = ctx.clock.seconds()
    replica_pools = getattr(ctx, "replica_pools", None)  # the reader endpoints' (pool/targets.py)
    waiting = pool.waiting + (sum(p.waiting for p in replica_pools) if replica_pools is not None else 0)
    out.append(("client_connections_waiting", [name, group], waiting))
    since = getattr(pool, "oldest_wait_since", None)
    out.append(("client_longest_wait_seconds", [name, group],
                max(0.0, now - since) if since is not None else 0.0))

    topology = getattr(ctx, "topology", None)
    targets = list(topology.targets) if topology is not None else []
    rows = {_target_name(t): [0, 0, 0, 0, 0, collections.Counter()] for t in targets}
    opening = 0
    conns = pool.connections()
    if replica_pools is not None:
        conns = conns + replica_pools.connections()
    for conn in conns:
        if not IBackendConnection.providedBy(conn):
            opening += 1  # the pool's placeholder for a connection being opened
            continue
        row = rows.setdefault(_target_name(conn.target), [0, 0, 0, 0, 0, collections.Counter()])
        row[0] += 1
        row[5][conn.state] += 1
        if conn.state == BORROWED:
            row[1] += 1
            if conn.in_transaction:
                row[2] += 1
        if conn.tls:
            row[4] += 1
    for session in sessions:
        lease = session.lease
        if session.state is SessionState.PINNED and lease is not None:
            row = rows.setdefault(_target_name(lease.conn.target),
                                  [0, 0, 0, 0, 0, collections.Counter()])
            row[3] += 1
    out.append(("database_connections_opening", [name, group], opening))
    for target, (n, borrowed, in_txn, pinned, with_tls, states) in sorted(rows.items()):
        labels = [name, group, target]
        out += [("database_connections", labels, n),
                ("database_connections_currently_borrowed", labels, borrowed),
                ("database_connections_currently_in_transaction", labels, in_txn),
                ("database_connections_currently_session_pinned", labels, pinned),
                ("database_connections_with_tls", labels, with_tls)]
        for state in ("idle", "borrowed", "resetting"):
            out.append(("database_connections_by_state", labels + [state], states.get(state, 0)))

    writer = topology.current_writer() if topology is not None else None
    limit = pool.max_connections
    if limit is not None and writer is not None:
        out.append(("max_database_connections_allowed", [name, group, _target_name(writer)], limit))
    for replica in targets if replica_pools is not None else ():
        replica_pool = replica_pools.existing(replica)
        if replica is not writer and replica_pool is not None and replica_pool.max_connections is not None:
            out.append(("max_database_connections_allowed", [name, group, _target_name(replica)],
                        replica_pool.max_connections))
    health = getattr(ctx, "health", None)
    if health is not None and topology is not None:
        for target in targets:
            record = health.health_of(target)
            out.append(("target_available", [name, group, _target_name(target),
                                             topology.role_of(target)],
                        1 if record.state == "AVAILABLE" else 0))
        if metrics is not None:
            for role, percent in sorted(metrics.availability(ctx).percentages().items()):
                out.append(("availability_percentage", [name, group, role], percent))
    return out
