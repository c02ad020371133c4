"""`make bench` scenario "workers": pgbench -S persistent (-M simple, 20 clients) through the
proxy with `Workers: 1` and `Workers: 2`, each against a direct run made just before it (the
machine is shared: ratios from runs side by side), with the proxy's CPU per transaction over
its whole process tree (supervisor and workers) and the database sessions each run opened.

On a 2-core machine a second worker competes with pgbench and PostgreSQL for the same cores, so
the figure shows the cost of the extra process more than a gain; docs/operations.md#workers says
what to expect on a larger host and how to size workers.
"""

import os
import time


def tree_cpu_seconds(pid, cpu_seconds):
    """User + system CPU of *pid* and its children (the workers) so far."""
    total = cpu_seconds(pid)
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            total += cpu_seconds(child)
        except OSError:  # exited meanwhile
            pass
    return total


def wait_workers(proxy, count, timeout=60):
    """Until *count* workers said they listen (the supervisor's log)."""
    if count == 1:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = proxy.log_path.read_text(errors="replace") if proxy.log_path.exists() else ""
        if text.count(") is listening") >= count:
            return True
        time.sleep(0.1)
    return False


def run(args, say, pg, root, bench):
    """*bench*: run.py's module (pgbench, pg_proxy, pg_sessions, ...)."""
    say("\n== PostgreSQL: Workers 1 vs 2 (pgbench -S -M simple, %d clients, -T %s) =="
        % (bench.CLIENTS, args.time))
    rows = []
    for count in (1, 2):
        proxy = bench.pg_proxy(root / ("proxy-workers-%d" % count), pg, workers=count).start()
        try:
            if not wait_workers(proxy, count):
                bench.failures.append(("Workers %d" % count, "workers not listening; log tail:\n%s"
                                       % bench.tail(proxy.log_path)))
                continue
            bench.pgbench(pg, proxy.port, "scram", ["-M", "simple"], 1, "warm-up", record=False)
            direct = bench.pgbench(pg, pg.port, "scram", ["-M", "simple"], args.time,
                                   "Workers %d: direct" % count)
            before = bench.pg_sessions(pg)
            cpu0 = tree_cpu_seconds(proxy.proc.pid, bench.idle_clients.cpu_seconds)
            tps = bench.pgbench(pg, proxy.port, "scram", ["-M", "simple"], args.time,
                                "Workers %d: proxy" % count)
            cpu = tree_cpu_seconds(proxy.proc.pid, bench.idle_clients.cpu_seconds) - cpu0
            opened = bench.pg_sessions(pg) - before
            per_tx = cpu / bench.LAST_RUN["transactions"] if bench.LAST_RUN.get("transactions") else None
            bench.check_opened("persistent, Workers %d" % count, "proxy", opened, bench.POOL_SIZE)
            rows.append((count, direct, tps, per_tx, opened))
        finally:
            proxy.stop()
    say("\nWorkers (TPS, persistent -M simple, %d clients, -T %ss, %s CPUs shared by all):"
        % (bench.CLIENTS, args.time, os.cpu_count()))
    header = "%-10s %9s %9s %13s %12s %14s" % ("workers", "direct", "proxy", "proxy/direct",
                                               "proxy CPU", "db conns")
    say(header)
    say("-" * len(header))
    for count, direct, tps, per_tx, opened in rows:
        say("%-10s %9s %9s %13s %12s %14s" % (count, bench.fmt_tps(direct), bench.fmt_tps(tps),
                                              bench.ratio(tps, direct), bench.fmt_us(per_tx), opened))
    say("proxy CPU: user+system CPU of the supervisor and its workers per transaction; db conns: "
        "database sessions opened during the run (the cap of %d is split over the workers)."
        % bench.POOL_SIZE)
