"""Proxy CPU time per MySQL operation: a fixed amount of work, counted in CPU seconds of the
proxy process (/proc/<pid>/stat), so that the figure holds on a machine others share.

    .venv/bin/python bench/mysql_cpu.py [--connects N] [--events N] [--only churn|point|rw]
                                        [--ps-mode auto|disable] [--profile [--profile-dir DIR]]

Starts a MariaDB and a proxy (RDS defaults, pool of 20 of max_connections 100), then:
- churn: N PyMySQL connect / SELECT 1 / close, 4 threads; proxy CPU per connect;
- sysbench oltp_point_select (20 threads, --events N): proxy CPU per transaction;
- sysbench oltp_read_write (20 threads, --events N/10): proxy CPU per transaction;
and prints MariaDB's Connections counter per phase.  With --profile the proxy runs under
cProfile (CPU time) and the top functions of each phase are printed.
"""

import argparse
import contextlib
import shutil
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
    import os
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


PS_MODE = ["--db-ps-mode=auto"]  # sysbench's default: server-side prepared statements (they pin)


def sysbench_events(test, port, events):
    return bench.sysbench(test, port, 0, "run", test, extra=["--events=%d" % events] + PS_MODE)


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
    parser.add_argument("--profile-dir", type=Path,
                        help="keep the cProfile files (<phase>.prof) in this folder")
    args = parser.parse_args()
    PS_MODE[:] = ["--db-ps-mode=%s" % args.ps_mode]
    root = Path(tempfile.mkdtemp(prefix="txrdsproxy-mycpu-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        db = bench.MariaDBServer(root / "mariadb", max_connections=bench.MAX_CONNECTIONS).start()
        stack.callback(db.stop)
        db.create_user(bench.MY_USER, bench.MY_PASSWORD, plugin="mysql_native_password")
        db.create_database(bench.MY_DB)
        bench.sysbench("oltp_read_write", db.port, 1, "prepare", "prepare")
        phases = [("churn", "connect"), ("point", "tx"), ("rw", "tx")]
        for name, unit in phases:
            if args.only not in (None, name):
                continue
            if args.profile_dir is not None:
                args.profile_dir.mkdir(parents=True, exist_ok=True)
            prof = (args.profile_dir or root) / ("%s.prof" % name) if args.profile else None
            proxy = bench.Proxy(root / ("proxy-" + name), "MYSQL", db.port,
                                [("arn:bench:my", "MYSQL_NATIVE_PASSWORD")],
                                {"arn:bench:my": {"username": bench.MY_USER,
                                                  "password": bench.MY_PASSWORD}},
                                profile_path=prof).start()
            stack.callback(proxy.stop)
            # warm-up: greeting probe, pool, collations
            churn_count(proxy.port, 20)
            if name != "churn":
                sysbench_events("oltp_point_select", proxy.port, 200)
            conns0 = int(db.mariadb("SHOW GLOBAL STATUS LIKE 'Connections'").split()[1])
            cpu0 = idle_clients.cpu_seconds(proxy.proc.pid)
            user0, sys0 = cpu_split(proxy.proc.pid)
            ctx = proxy.profiling() if prof else contextlib.nullcontext()
            with ctx:
                if name == "churn":
                    count = args.connects
                    errors = churn_count(proxy.port, count)
                    if errors:
                        bench.say("churn errors: %d, first %s" % (len(errors), errors[0]))
                elif name == "point":
                    sysbench_events("oltp_point_select", proxy.port, args.events)
                    count = bench.LAST_RUN.get("transactions") or args.events
                else:
                    sysbench_events("oltp_read_write", proxy.port, args.events // 10)
                    count = bench.LAST_RUN.get("transactions") or args.events // 10
            cpu = idle_clients.cpu_seconds(proxy.proc.pid) - cpu0
            user1, sys1 = cpu_split(proxy.proc.pid)
            conns = int(db.mariadb("SHOW GLOBAL STATUS LIKE 'Connections'").split()[1]) - conns0 - 1
            bench.say("%-6s %6d %s: proxy CPU %.1f us/%s (user %.1f, system %.1f),"
                      " db connections opened %d"
                      % (name, count, unit + "s", cpu / count * 1e6, unit,
                         (user1 - user0) / count * 1e6, (sys1 - sys0) / count * 1e6, conns))
            proxy.stop()
            if prof:
                bench.print_profile(prof, proxy, top=30)
        for what, detail in bench.failures:
            bench.say("FAILED: %s: %s" % (what, detail))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
