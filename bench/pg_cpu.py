"""Proxy CPU time per pgbench transaction: a fixed number of transactions, counted in CPU seconds
of the proxy process (/proc/<pid>/stat), so that the figure holds on a machine others share.

    .venv/bin/python bench/pg_cpu.py [-t TX_PER_CLIENT] [--rounds N] [--mode simple,extended]
                                     [--tree DIR ...] [--profile [--profile-dir DIR]]
                                     [--connect [--connect-user scram|md5]]
                                     [--venv-bin .venv-pypy3/bin --warmup N]

Starts one PostgreSQL (pgbench -i -s 1) and, per round and per source tree, a proxy (RDS
defaults but a pool of 20 of max_connections 100), then runs pgbench -S -c 20 -j 2 -t N through
it and prints the proxy's CPU per transaction and the database sessions it opened.  With
several --tree folders (other checkouts of this repository, e.g. `git worktree add /tmp/base
926e124`) the trees run alternately, round after round, so that a load change on the machine
hits both alike; the summary gives each tree's minimum and median.  With --profile the proxy
runs under cProfile (CPU time) and the top functions and the Python calls per transaction are
printed.  --connect makes each transaction a new client login (pgbench -C), so the figures are
per login; --venv-bin runs the proxy as another venv's twistd (PyPy), after --warmup
transactions per client.
"""

import argparse
import contextlib
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run as bench  # noqa: E402  (bench/run.py: servers, Proxy, pgbench helpers)

CONNECT_USER = "scram"  # --connect: whose logins (bench.PG_USERS key; --connect-user)


def pgbench_count(pg, port, mode, per_client, connect=False):
    """pgbench -S -c 20 -j 2 -t *per_client* (-C: a new connection per transaction);
    -> transactions processed (0 on failure)."""
    name, password, _ = bench.PG_USERS[CONNECT_USER if connect else "scram"]
    argv = [bench.find_binary("pgbench"), "-n", "-S", "-c", str(bench.CLIENTS), "-j", "2",
            *(["-C"] if connect else []),
            "-t", str(per_client), "-M", mode, "-h", bench.HOST, "-p", str(port), "-U", name,
            bench.PG_DB]
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(pg._env(password)),
                          timeout=600)
    processed = bench.PROCESSED_RE.search(proc.stdout)
    if proc.returncode != 0 or processed is None:
        bench.say("pgbench failed (exit %s):\n%s\n%s" % (proc.returncode, proc.stdout[-800:],
                                                        proc.stderr[-800:]))
        return 0
    return int(processed.group(1))


def cpu_times(pid):
    """(user, system) CPU seconds of *pid* so far (/proc/<pid>/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def sessions(pg):
    out = pg.psql("SELECT sessions FROM pg_stat_database WHERE datname = '%s'" % bench.PG_DB)
    return int(out.strip() or 0)


def one_run(root, pg, tree, mode, per_client, prof, connect=False, venv_bin=None, warmup=20):
    env_before = os.environ.get("PYTHONPATH")
    repo_before = bench.REPO
    if tree is not None:
        # The proxy imports txrdsproxy from *tree*: first on its path, and its working directory
        # (the profiler wrapper runs `python -c`, whose path starts with the working directory).
        os.environ["PYTHONPATH"] = str(tree)
        bench.REPO = tree
    opened0 = sessions(pg)
    try:
        extra = {} if venv_bin is None else {"venv_bin": venv_bin}
        proxy = bench.pg_proxy(root, pg, profile_path=prof, **extra).start()
    finally:
        bench.REPO = repo_before
        if tree is not None:
            if env_before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = env_before
    try:
        pgbench_count(pg, proxy.port, mode, warmup, connect)  # warm-up: logins, pool, caches (a JIT)
        user0, sys0 = cpu_times(proxy.proc.pid)
        ctx = proxy.profiling() if prof else contextlib.nullcontext()
        with ctx:
            count = pgbench_count(pg, proxy.port, mode, per_client, connect)
        user1, sys1 = cpu_times(proxy.proc.pid)
        cpu = (user1 - user0, sys1 - sys0)
    finally:
        proxy.stop()
    # pg_stat_database counts a session when it ends: read once the proxy (and its pool) is gone
    time.sleep(0.5)
    opened = sessions(pg) - opened0 - 1  # minus the first count's own session
    return count, cpu, opened


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--transactions", type=int, default=1500,
                        help="transactions per client (20 clients)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", default="simple", help="pgbench -M values, comma-separated")
    parser.add_argument("--tree", type=Path, action="append",
                        help="a checkout whose txrdsproxy the proxy runs (repeatable; default: this one)")
    parser.add_argument("--connect", action="store_true",
                        help="pgbench -C: a login per transaction (CPU per connection)")
    parser.add_argument("--connect-user", choices=sorted(bench.PG_USERS), default="scram",
                        help="whose logins with --connect (password method)")
    parser.add_argument("--venv-bin", type=Path,
                        help="run the proxy as this venv's twistd (e.g. .venv-pypy3/bin; no --profile)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="warm-up transactions per client before the measured run (PyPy: more)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-dir", type=Path, help="keep the cProfile files here")
    args = parser.parse_args()
    if args.profile and args.venv_bin:
        parser.error("--profile runs the proxy under this interpreter's cProfile: not with --venv-bin")
    trees = [t.resolve() for t in args.tree] if args.tree else [None]
    global CONNECT_USER
    CONNECT_USER = args.connect_user
    root = Path(tempfile.mkdtemp(prefix="txrdsproxy-pgcpu-"))
    results = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        pg = bench.PostgresServer(root / "pg", max_connections=bench.MAX_CONNECTIONS).start()
        stack.callback(pg.stop)
        for name, password, method in bench.PG_USERS.values():
            pg.create_user(name, password, method=method)
        pg.create_database(bench.PG_DB)
        bench.servers.check_output([bench.find_binary("pgbench"), "-i", "-s", "1", "-q", "-h", bench.HOST,
                                    "-p", str(pg.port), "-U", pg.superuser, bench.PG_DB],
                                   env=pg._env(pg.superuser_password), timeout=600, what="pgbench -i")
        names = ", ".join(n for n, _, _ in bench.PG_USERS.values())
        pg.psql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO %s" % names, dbname=bench.PG_DB)
        run_no = 0
        for r in range(args.rounds):
            for mode in args.mode.split(","):
                for tree in trees:
                    run_no += 1
                    prof = None
                    if args.profile:
                        pdir = args.profile_dir or root
                        pdir.mkdir(parents=True, exist_ok=True)
                        prof = pdir / ("%s-%s-%d.prof" % (mode, tree.name if tree else "here", r))
                    count, cpu, opened = one_run(root / ("proxy-%d" % run_no), pg, tree, mode,
                                                 args.transactions, prof, args.connect,
                                                 args.venv_bin and args.venv_bin.resolve(), args.warmup)
                    label = "%s %s%s" % (tree or "this tree", mode, " -C" if args.connect else "")
                    if count:
                        us = sum(cpu) / count * 1e6
                        user = cpu[0] / count * 1e6
                        results.setdefault(label, []).append(us)
                        results.setdefault(label + " (user)", []).append(user)
                        bench.say("round %d  %-40s %6d tx  proxy CPU %6.1f us/tx (user %5.1f, system %5.1f)"
                                  "  db sessions opened %d (warm-up included)"
                                  % (r + 1, label, count, us, user, us - user, opened))
                    if prof is not None and prof.exists() and count:
                        stats = pstats.Stats(str(prof))
                        where = {f for f, _, _ in stats.stats if f.endswith("pg_frontend.py")}
                        bench.say("   profiled code: %s" % ", ".join(sorted(where)))
                        bench.say("   Python calls per tx: %.1f" % (stats.total_calls / count))
                        if r == args.rounds - 1:
                            bench.print_profile(prof, type("P", (), {"proc": None, "log_path": None})(),
                                                top=30)
        bench.say("\nsummary (proxy CPU us per transaction):")
        for label, values in results.items():
            bench.say("  %-45s min %6.1f  median %6.1f  (%d runs)"
                      % (label, min(values), statistics.median(values), len(values)))
    return 0 if results else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
