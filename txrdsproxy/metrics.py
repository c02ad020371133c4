"""Prometheus metrics named after RDS Proxy's CloudWatch metrics.

One `Metrics` object is built by the service and injected.  Counters count events (connections
received, setups failed, pins by reason...).  Gauges are not stored: they are read at scrape time
from the sessions' and connections' own states (`collect(contexts)`), so there is no second
bookkeeping to drift.  Label names follow the CloudWatch dimensions: ProxyName, TargetGroup,
Target; pins add Reason.
"""

import collections


class Counter:
    __slots__ = ("name", "help", "labels", "values")

    def __init__(self, name, help_text, labels):
        self.name, self.help, self.labels = name, help_text, labels
        self.values = collections.defaultdict(int)

    def inc(self, *label_values, amount=1):
        self.values[label_values] += amount


class Summary:
    """Sum and count (Prometheus summary without quantiles): enough for an average."""

    __slots__ = ("name", "help", "labels", "sums", "counts")

    def __init__(self, name, help_text, labels):
        self.name, self.help, self.labels = name, help_text, labels
        self.sums = collections.defaultdict(float)
        self.counts = collections.defaultdict(int)

    def observe(self, *args):
        *label_values, value = args
        key = tuple(label_values)
        self.sums[key] += value
        self.counts[key] += 1


P = ("ProxyName",)
PT = ("ProxyName", "TargetGroup", "Target")


class Metrics:
    def __init__(self):
        c = self._counter
        self.client_connections_received = c("ClientConnectionsReceived", "Client connection requests received.", P)
        self.client_connections_setup_succeeded = c(
            "ClientConnectionsSetupSucceeded", "Client connections successfully established.", P)
        self.client_connections_setup_failed_auth = c(
            "ClientConnectionsSetupFailedAuth", "Client connection attempts that failed authentication.", P)
        self.client_connections_closed = c("ClientConnectionsClosed", "Client connections closed.", P)
        self.db_connection_requests = c("DatabaseConnectionRequests", "Requests to create a database connection.",
                                        ("ProxyName", "Target"))
        self.db_connection_requests_tls = c(
            "DatabaseConnectionRequestsWithTLS", "Requests to create a database connection with TLS.",
            ("ProxyName", "Target"))
        self.db_connections_setup_succeeded = c(
            "DatabaseConnectionsSetupSucceeded", "Database connections successfully established.",
            ("ProxyName", "Target"))
        self.db_connections_setup_failed = c(
            "DatabaseConnectionsSetupFailed", "Database connection requests that failed.", ("ProxyName", "Target"))
        self.pins = c("SessionPins", "Sessions pinned to their database connection, by reason.",
                      ("ProxyName", "Reason"))
        self.borrow_timeouts = c("ConnectionBorrowTimeouts", "Borrows that timed out (ConnectionBorrowTimeout).", P)
        self.borrow_latency = Summary(
            "DatabaseConnectionsBorrowLatency", "Microseconds to get a database connection from the pool.", P)

    def _counter(self, name, help_text, labels):
        counter = Counter(name, help_text, labels)
        setattr(self, "_c_" + name, counter)
        return counter

    def counters(self):
        return [v for k, v in vars(self).items() if k.startswith("_c_")]

    # -- exposition -------------------------------------------------------------------------------
    def render(self, contexts, prefix="rdsproxy_"):
        """Prometheus text format (version 0.0.4) for every counter plus the state gauges."""
        out = []
        for counter in self.counters():
            out.append(f"# HELP {prefix}{counter.name} {counter.help}")
            out.append(f"# TYPE {prefix}{counter.name} counter")
            for values, n in sorted(counter.values.items()):
                out.append(f"{prefix}{counter.name}{_labels(counter.labels, values)} {n}")
        s = self.borrow_latency
        out.append(f"# HELP {prefix}{s.name} {s.help}")
        out.append(f"# TYPE {prefix}{s.name} summary")
        for values in sorted(s.counts):
            lab = _labels(s.labels, values)
            out.append(f"{prefix}{s.name}_sum{lab} {s.sums[values]:.1f}")
            out.append(f"{prefix}{s.name}_count{lab} {s.counts[values]}")
        out.append(f"# HELP {prefix}QueryRequests Queries received (a multi-statement query or a Sync'd batch counts once).")
        out.append(f"# TYPE {prefix}QueryRequests counter")
        for ctx in contexts:
            total = ctx.queries_closed + sum(getattr(s, "queries", 0) for s in list(ctx.sessions))
            out.append(f'{prefix}QueryRequests{{ProxyName="{_escape(ctx.name)}"}} {total}')
        for name, tls in (("QueryRequestsTLS", True), ("QueryRequestsNoTLS", False)):
            out.append(f"# HELP {prefix}{name} Queries received on client connections "
                       f"{'with' if tls else 'without'} TLS.")
            out.append(f"# TYPE {prefix}{name} counter")
            for ctx in contexts:
                n = sum(s.queries for s in list(ctx.sessions) if bool(s.tls) is tls)
                n += ctx.queries_closed_tls if tls else ctx.queries_closed - ctx.queries_closed_tls
                out.append(f'{prefix}{name}{{ProxyName="{_escape(ctx.name)}"}} {n}')
        for name, help_text, labels, rows in gauges(contexts):
            out.append(f"# HELP {prefix}{name} {help_text}")
            out.append(f"# TYPE {prefix}{name} gauge")
            for values, n in rows:
                out.append(f"{prefix}{name}{_labels(labels, values)} {n}")
        return "\n".join(out) + "\n"


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names, values):
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


def gauges(contexts):
    """The current-state metrics, read from sessions and connections at call time."""
    client, notls, withtls, pinned_s = [], [], [], []
    db, borrowed, in_txn, maxed, waiting, db_tls = [], [], [], [], [], []
    for ctx in contexts:
        sessions = list(ctx.sessions)
        client.append(((ctx.name,), len(sessions)))
        tls = sum(1 for s in sessions if getattr(s, "tls", False))
        notls.append(((ctx.name,), len(sessions) - tls))
        withtls.append(((ctx.name,), tls))
        by_target = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
        for conn in ctx.pool.connections():
            target = getattr(conn, "target", None)
            name = target.rds_resource_id if target is not None else "connecting"
            row = by_target[name]
            row[0] += 1
            row[4] += bool(getattr(conn, "tls", False))  # placeholders of opening connections have none
            if conn.state == "borrowed":
                row[1] += 1
                if getattr(conn, "txn_status", b"I") != b"I" or getattr(conn, "in_transaction", False):
                    row[2] += 1
        for session in sessions:
            lease = getattr(session, "lease", None)
            if session.state.value == "pinned" and lease is not None:
                by_target[lease.conn.target.rds_resource_id][3] += 1
        for target, (n, b, t, p, tls_n) in sorted(by_target.items()):
            labels = (ctx.name, "default", target)
            db.append((labels, n))
            db_tls.append((labels, tls_n))
            borrowed.append((labels, b))
            in_txn.append((labels, t))
            pinned_s.append((labels, p))
        limit = ctx.pool.max_connections
        writer = ctx.topology.current_writer()  # None during a failover
        if limit is not None and writer is not None:
            maxed.append(((ctx.name, "default", writer.rds_resource_id), limit))
        waiting.append(((ctx.name,), ctx.pool.waiting))
    return [
        ("ClientConnections", "Current client connections.", P, client),
        ("ClientConnectionsNoTLS", "Current client connections without TLS.", P, notls),
        ("ClientConnectionsTLS", "Current client connections with TLS.", P, withtls),
        ("DatabaseConnections", "Current database connections.", PT, db),
        ("DatabaseConnectionsWithTLS", "Current database connections that use TLS.", PT, db_tls),
        ("DatabaseConnectionsCurrentlyBorrowed", "Database connections borrowed by a session.", PT, borrowed),
        ("DatabaseConnectionsCurrentlyInTransaction", "Borrowed database connections inside a transaction.",
         PT, in_txn),
        ("DatabaseConnectionsCurrentlySessionPinned", "Database connections pinned to a session.", PT, pinned_s),
        ("MaxDatabaseConnectionsAllowed", "The pool's cap (MaxConnectionsPercent of max_connections).", PT, maxed),
        ("ConnectionBorrowWaiters", "Sessions waiting for a database connection.", P, waiting),
    ]
