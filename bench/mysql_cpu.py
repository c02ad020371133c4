"""Proxy CPU time per MySQL operation: a fixed amount of work, counted in CPU seconds of the
proxy process (/proc/<pid>/stat), so that the figure holds on a machine others share.

    .venv/bin/python bench/mysql_cpu.py [--connects N] [--events N] [--only churn|point|rw]
                                        [--ps-mode auto|disable] [--filter NAME ...]
                                        [--tree DIR ...] [--rounds N] [--direct]
                                        [--profile [--profile-dir DIR]]

Starts a MariaDB and a proxy (RDS defaults, pool of 20 of max_connections 100), then:
- churn: N PyMySQL connect / SELECT 1 / close, 4 threads; proxy CPU per connect;
- sysbench oltp_point_select (20 threads, --events N): proxy CPU per transaction;
- sysbench oltp_read_write (20 threads, --events N/10): proxy CPU per transaction;
and prints MariaDB's Connections counter per phase and the proxy's context switches per unit
(each is a wake-up from epoll_wait: on this VM they cost more than the Python code).  With
several --tree folders (other checkouts of this repository, e.g. `git worktree add /tmp/base
main`) the trees run alternately, phase by phase, for --rounds rounds, so that a load change on
the machine hits both alike; the summary gives each tree's minimum and median.  --direct also
runs each sysbench phase against MariaDB directly (same events) and prints both rates: a ratio
on a shared machine, to read with care.  With --profile the proxy runs under cProfile (CPU time)
and the top functions of each phase are printed.
"""

import argparse
import contextlib
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import idle_clients  # noqa: E402  (beside this file)
import run as bench  # noqa: E402  (bench/run.py: servers, Proxy, sysbench helpers)


def churn_count(port, total, threads=4):
    """*total* PyMySQL connect / SELECT 1 / close, spread over *threads*; -> errors."""
    import pymysql

    errors = []
    left = [total]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                conn = pymysql.connect(host=bench.HOST, port=port, user=bench.MY_USER,
                                       password=bench.MY_PASSWORD, database=bench.MY_DB,
                                       connect_timeout=10, ssl_disabled=True)
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        cur.fetchall()
                finally:
                    conn.close()
            except Exception as exc:
                errors.append(repr(exc))

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return errors


def cpu_split(pid):
    """(user, system) CPU seconds of *pid* so far (/proc/<pid>/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def context_switches(pid):
    """Voluntary + involuntary context switches of *pid* so far (/proc/<pid>/status)."""
    total = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if "ctxt_switches:" in line:
                total += int(line.split()[1])
    return total


def start_proxy(workdir, db, tree, prof, filters):
    """A proxy in front of *db*, importing txrdsproxy from *tree* (None: this checkout)."""
    env_before, repo_before = os.environ.get("PYTHONPATH"), bench.REPO
    if tree is not None:
        # first on its path, and its working directory (the profiler wrapper runs `python -c`,
        # whose path starts with the working directory)
        os.environ["PYTHONPATH"] = str(tree)
        bench.REPO = tree
    try:
        return bench.Proxy(workdir, "MYSQL", db.port, [("arn:bench:my", "MYSQL_NATIVE_PASSWORD")],
                           {"arn:bench:my": {"username": bench.MY_USER,
                                             "password": bench.MY_PASSWORD}},
                           profile_path=prof, filters=filters).start()
    finally:
        bench.REPO = repo_before
        if tree is not None:
            if env_before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = env_before


PS_MODE = ["--db-ps-mode=auto"]  # sysbench's default: server-side prepared statements (they pin)


def sysbench_events(test, port, events):
    return bench.sysbench(test, port, 0, "run", test, extra=["--events=%d" % events] + PS_MODE)


def one_phase(name, unit, args, db, proxy, prof):
    """Run phase *name* through *proxy*;
    -> (count, cpu s, user s, system s, switches, opened, tps or None)."""
    # warm-up: greeting probe, pool, collations
    churn_count(proxy.port, 20)
    if name != "churn":
        sysbench_events("oltp_point_select", proxy.port, 200)
    conns0 = int(db.mariadb("SHOW GLOBAL STATUS LIKE 'Connections'").split()[1])
    pid = proxy.proc.pid
    cpu0, (user0, sys0), sw0 = idle_clients.cpu_seconds(pid), cpu_split(pid), context_switches(pid)
    ctx = proxy.profiling() if prof else contextlib.nullcontext()
    res = None
    with ctx:
        if name == "churn":
            count = args.connects
            errors = churn_count(proxy.port, count)
            if errors:
                bench.say("churn errors: %d, first %s" % (len(errors), errors[0]))
        elif name == "point":
            res = sysbench_events("oltp_point_select", proxy.port, args.events)
            count = bench.LAST_RUN.get("transactions") or args.events
        else:
            res = sysbench_events("oltp_read_write", proxy.port, args.events // 10)
            count = bench.LAST_RUN.get("transactions") or args.events // 10
    cpu = idle_clients.cpu_seconds(pid) - cpu0
    user1, sys1 = cpu_split(pid)
    switches = context_switches(pid) - sw0
    conns = int(db.mariadb("SHOW GLOBAL STATUS LIKE 'Connections'").split()[1]) - conns0 - 1
    return count, cpu, user1 - user0, sys1 - sys0, switches, conns, res and res[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=2000)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only", choices=("churn", "point", "rw"))
    parser.add_argument("--ps-mode", choices=("auto", "disable"), default="auto",
                        help="sysbench --db-ps-mode: auto (server-side prepared statements: each"
                             " sysbench session pins) or disable (COM_QUERY: multiplexed, one"
                             " borrow and release per transaction)")
    parser.add_argument("--filter", action="append", default=[],
                        help="a SessionPinningFilters value for the proxy (repeatable)")
    parser.add_argument("--tree", type=Path, action="append",
                        help="a checkout whose txrdsproxy the proxy runs (repeatable; default: this one)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--direct", action="store_true",
                        help="also run each sysbench phase directly against MariaDB")
    parser.add_argument("--profile-dir", type=Path,
                        help="keep the cProfile files (<phase>.prof) in this folder")
    args = parser.parse_args()
    PS_MODE[:] = ["--db-ps-mode=%s" % args.ps_mode]
    trees = [t.resolve() for t in args.tree] if args.tree else [None]
    root = Path(tempfile.mkdtemp(prefix="txrdsproxy-mycpu-"))
    results = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        db = bench.MariaDBServer(root / "mariadb", max_connections=bench.MAX_CONNECTIONS).start()
        stack.callback(db.stop)
        db.create_user(bench.MY_USER, bench.MY_PASSWORD, plugin="mysql_native_password")
        db.create_database(bench.MY_DB)
        bench.sysbench("oltp_read_write", db.port, 1, "prepare", "prepare")
        phases = [("churn", "connect"), ("point", "tx"), ("rw", "tx")]
        run_no = 0
        for r in range(args.rounds):
            for name, unit in phases:
                if args.only not in (None, name):
                    continue
                if args.direct and name != "churn":
                    test = "oltp_point_select" if name == "point" else "oltp_read_write"
                    events = args.events if name == "point" else args.events // 10
                    res = bench.sysbench(test, db.port, 0, "run", test + " direct",
                                         extra=["--events=%d" % events] + PS_MODE)
                    if res:
                        bench.say("round %d  %-6s direct %8.0f tps" % (r + 1, name, res[0]))
                for tree in trees:
                    run_no += 1
                    prof = None
                    if args.profile:
                        pdir = args.profile_dir or root
                        pdir.mkdir(parents=True, exist_ok=True)
                        prof = pdir / ("%s-%s-%d.prof" % (name, tree.name if tree else "here", r))
                    proxy = start_proxy(root / ("proxy-%d" % run_no), db, tree, prof, args.filter)
                    stack.callback(proxy.stop)
                    count, cpu, user, system, switches, conns, tps = one_phase(
                        name, unit, args, db, proxy, prof)
                    proxy.stop()
                    label = "%s %s" % (name, tree or "this tree")
                    results.setdefault(label, []).append(cpu / count * 1e6)
                    bench.say("round %d  %-6s %-28s %6d %s: proxy CPU %.1f us/%s (user %.1f,"
                              " system %.1f), %.2f context switches/%s, db connections opened"
                              " %d%s"
                              % (r + 1, name, tree.name if tree else "this tree", count,
                                 unit + "s", cpu / count * 1e6, unit, user / count * 1e6,
                                 system / count * 1e6, switches / count, unit, conns,
                                 "" if tps is None else ", %.0f tps" % tps))
                    if prof and prof.exists() and count:
                        calls = pstats.Stats(str(prof)).total_calls / count
                        results.setdefault(label + " (Python calls)", []).append(calls)
                        bench.say("   Python calls per %s: %.1f" % (unit, calls))
                        if r == args.rounds - 1 and tree is trees[-1]:
                            bench.print_profile(prof, proxy, top=30)
        if args.rounds > 1 or len(trees) > 1:
            bench.say("\nsummary (proxy CPU us per unit):")
            for label, values in results.items():
                bench.say("  %-45s min %6.1f  median %6.1f  (%d runs)"
                          % (label, min(values), statistics.median(values), len(values)))
        for what, detail in bench.failures:
            bench.say("FAILED: %s: %s" % (what, detail))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
