"""txrdsproxy benchmark: prints figures, never asserts timing.

PostgreSQL: a real PostgreSQL 15 (max_connections 100) initialised with
`pgbench -i -s 10`, then pgbench select-only (-S, 20 clients, -j 2) against
the database directly, through txrdsproxy (a twistd subprocess, pool of 20)
and through Debian's PgBouncer (transaction mode, pool of 20), run side by
side for each scenario: persistent connections (-M simple, -M extended),
reconnect per transaction (-C) with md5 clients and with SCRAM clients, and
-M prepared as an informational row (named prepared statements pin sessions
in the proxy; the pool of 20 covers the 20 clients).

MySQL (when `txrdsproxy/proxy/mysql_frontend.py` and MariaDB exist): sysbench
oltp_point_select and oltp_read_write (20 threads) direct vs through the
proxy, and a connection-churn figure (PyMySQL connect / SELECT 1 / close in 4
threads) direct vs proxy.

    .venv/bin/python bench/run.py [--quick] [--only pg|mysql|iam|failover] [--profile] [-T SECONDS]

Failover (bench/failover.py): for each engine, the time from a standby's/replica's promotion to
the first write through the proxy, and the share of idle client sessions kept across it.

--profile runs extra phases with the proxy under cProfile (CPU time, only
while pgbench runs; the proxy is stopped with SIGTERM and writes the profile)
and prints the top functions by tottime for the persistent run and for the
-C md5 run.

Everything started (servers, proxy, PgBouncer, temp dirs) is stopped and
removed on exit, on Ctrl-C and on SIGTERM.
"""

import argparse
import atexit
import contextlib
import io
import json
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
import idle_clients  # noqa: E402  (bench/idle_clients.py, beside this file)
import iam as iam_bench  # noqa: E402  (bench/iam.py: IAM token verification rate)
import workers as workers_bench  # noqa: E402  (bench/workers.py: Workers 1 vs 2)
import failover as failover_bench  # noqa: E402  (bench/failover.py: promotion -> first write)
import pypy as pypy_bench  # noqa: E402  (bench/pypy.py: the proxy on PyPy beside CPython)
from txrdsproxy.testing import servers  # noqa: E402
from txrdsproxy.testing.servers import (MariaDBServer, PostgresServer, find_binary,  # noqa: E402
                                        find_free_port, stop_process)

# The venv's bin directory: the one this interpreter was started from (not resolved:
# .venv/bin/python is a symlink to the system python).
VENV_BIN = Path(os.path.abspath(sys.executable)).parent
HOST = "127.0.0.1"
PG_DB = "bench"
PG_USERS = {"scram": ("bench_scram", "scram-pw-1", "scram-sha-256"),
            "md5": ("bench_md5", "md5-pw-1", "md5")}
MY_DB = "sbtest"
MY_USER, MY_PASSWORD = "bench_my", "my-pw-1"
POOL_PERCENT = 20          # of max_connections 100 -> 20 pooled connections
TRACKED_POOL_PERCENT = 5   # -> 5 pooled connections for 20 clients (prepared statements tracked)
MAX_CONNECTIONS = 100
CLIENTS = 20

failures = []              # (what, detail) for the report at the end


def say(*args):
    print(*args, flush=True)


def tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_port(port, proc, timeout, what, log_path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s during startup; log tail:\n%s"
                               % (what, proc.returncode, tail(log_path)))
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s not listening on %s after %ss; log tail:\n%s"
                       % (what, port, timeout, tail(log_path)))


# --------------------------------------------------------------------------
# the proxy and PgBouncer


PROFILED_TWISTD = """
import cProfile, signal, sys, time
from twisted.scripts.twistd import run
out, sys.argv = sys.argv[1], ["twistd"] + sys.argv[2:]
profile = cProfile.Profile(time.process_time)  # CPU time: the machine is shared and busy

def stop(*args):
    profile.disable()
    profile.dump_stats(out)  # written now: twistd ends a SIGTERMed run by that signal

signal.signal(signal.SIGUSR1, lambda *a: profile.enable())
signal.signal(signal.SIGUSR2, stop)
run()
"""


class Proxy:
    """txrdsproxy as `twistd -n --pidfile= rdsproxy --config FILE`, optionally under cProfile."""

    def __init__(self, workdir, engine, target_port, auth, secrets, profile_path=None,
                 pool_percent=None, filters=(), workers=None, venv_bin=None):
        self.venv_bin = venv_bin or VENV_BIN   # another venv's twistd: the PyPy figures
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = find_free_port()
        self.log_path = self.dir / "proxy.log"
        self.config_path = self.dir / "proxy.yaml"
        self.profile_path = profile_path
        self.proc = None
        (self.dir / "secrets.json").write_text(json.dumps(secrets))
        auth_lines = "".join('      - {SecretArn: "%s", ClientPasswordAuthType: %s}\n' % a for a in auth)
        self.config_path.write_text(
            ("Workers: %d\n" % workers if workers else "") +
            "Secrets: {Backend: file, Path: secrets.json}\n"
            "DBProxies:\n"
            "  - DBProxyName: bench-%s\n"
            "    EngineFamily: %s\n"
            '    Listen: "tcp:%d:interface=%s"\n'
            "    Auth:\n%s"
            "    TargetGroups:\n"
            "      - TargetGroupName: default\n"
            "        ConnectionPoolConfig: {MaxConnectionsPercent: %d, SessionPinningFilters: [%s]}\n"
            "        Targets:\n"
            "          - {RdsResourceId: db-1, Endpoint: %s, Port: %d}\n"
            % (engine.lower(), engine, self.port, HOST, auth_lines, pool_percent or POOL_PERCENT,
               ", ".join(filters), HOST, target_port))

    def argv(self):
        twistd = [str(self.venv_bin / "twistd"), "-n", "--pidfile=", "rdsproxy",
                  "--config", str(self.config_path)]
        if self.profile_path is None:
            return twistd
        # Not `python -m cProfile twistd ...`: on SIGTERM twistd stops the reactor and then
        # kills itself with the same signal, so cProfile never gets to write its file.  This
        # wrapper profiles what runs between SIGUSR1 and SIGUSR2 (see profiling()) and writes
        # the file at SIGUSR2, before the stop.
        return [sys.executable, "-c", PROFILED_TWISTD, str(self.profile_path)] + twistd[1:]

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), cwd=str(REPO), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            log.close()
        atexit.register(stop_process, self.proc, signal.SIGKILL, 5)  # if cleanup is cut short
        wait_port(self.port, self.proc, 30, "proxy", self.log_path)
        return self

    @contextlib.contextmanager
    def profiling(self):
        """Profile the proxy (started with profile_path) while the block runs."""
        self.proc.send_signal(signal.SIGUSR1)
        try:
            yield
        finally:
            if self.alive():
                self.proc.send_signal(signal.SIGUSR2)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        # twistd stops the reactor on SIGTERM and returns; cProfile then writes its file.
        stop_process(self.proc, signal.SIGTERM, 30)


class PgBouncer:
    """Debian's pgbouncer: transaction pooling, pool of 20, md5/SCRAM per user via an hba file."""

    BINARY = "/usr/sbin/pgbouncer"

    def __init__(self, workdir, pg, users):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = find_free_port()
        self.log_path = self.dir / "pgbouncer.log"
        self.proc = None
        self.run_user = servers.run_user_for("postgres")   # pgbouncer refuses to run as root
        userlist = "".join('"%s" "%s"\n' % (name, pw) for name, pw, _ in users)
        hba = "".join("host all %s %s/32 %s\n" % (name, HOST, method) for name, _, method in users)
        (self.dir / "userlist.txt").write_text(userlist)
        (self.dir / "hba.conf").write_text(hba)
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            "%s = host=%s port=%d dbname=%s\n"
            "[pgbouncer]\n"
            "listen_addr = %s\n"
            "listen_port = %d\n"
            "unix_socket_dir =\n"
            "auth_type = hba\n"
            "auth_hba_file = %s\n"
            "auth_file = %s\n"
            "pool_mode = transaction\n"
            "default_pool_size = 20\n"
            "max_client_conn = 1000\n"
            "logfile = %s\n"
            "pidfile =\n"
            % (PG_DB, HOST, pg.port, PG_DB, HOST, self.port, self.dir / "hba.conf",
               self.dir / "userlist.txt", self.log_path))
        servers.prepare_dir(self.dir, self.run_user)   # owned by (and reachable for) run_user

    def start(self):
        argv = servers.as_user(self.run_user, [self.BINARY, str(self.dir / "pgbouncer.ini")])
        out = open(self.dir / "pgbouncer.out", "ab")
        try:
            self.proc = subprocess.Popen(argv, cwd=str(self.dir), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            out.close()
        atexit.register(stop_process, self.proc, signal.SIGKILL, 5)  # if cleanup is cut short
        wait_port(self.port, self.proc, 20, "pgbouncer", self.log_path)
        return self

    def stop(self):
        stop_process(self.proc, signal.SIGINT, 20)   # SIGINT: safe shutdown

    @staticmethod
    def version():
        try:
            out = subprocess.run([PgBouncer.BINARY, "--version"], capture_output=True, text=True)
            return out.stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            return "pgbouncer ?"


# --------------------------------------------------------------------------
# PostgreSQL: pgbench


SCENARIOS = [
    # (label, user key, pgbench options, informational)
    ("persistent -M simple", "scram", ["-M", "simple"], False),
    ("persistent -M extended", "scram", ["-M", "extended"], False),
    ("-C md5 clients", "md5", ["-M", "simple", "-C"], False),
    ("-C SCRAM clients", "scram", ["-M", "simple", "-C"], False),
    ("persistent -M prepared (pins)", "scram", ["-M", "prepared"], True),
]

TPS_RE = re.compile(r"^tps = ([0-9.]+)", re.M)
PROCESSED_RE = re.compile(r"number of transactions actually processed: (\d+)")
FAILED_RE = re.compile(r"number of failed transactions: (\d+)")


LAST_RUN = {}   # what the last pgbench run processed: {"transactions": N}


def pgbench(pg, port, user_key, options, seconds, what, record=True):
    """Run pgbench -S; return tps (float) or None on failure (recorded in `failures`).
    The transactions it processed are left in LAST_RUN["transactions"]."""
    sink = failures if record else []
    LAST_RUN.clear()
    name, password, _ = PG_USERS[user_key]
    argv = [find_binary("pgbench"), "-n", "-S", "-c", str(CLIENTS), "-j", "2", "-T", str(seconds),
            "-h", HOST, "-p", str(port), "-U", name] + options + [PG_DB]
    env = dict(pg._env(password))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                              timeout=seconds + 120)
    except subprocess.TimeoutExpired as exc:
        sink.append((what, "timed out: %s\n%s" % (" ".join(argv), exc)))
        return None
    match = TPS_RE.search(proc.stdout)
    failed = FAILED_RE.search(proc.stdout)
    processed = PROCESSED_RE.search(proc.stdout)
    LAST_RUN["transactions"] = int(processed.group(1)) if processed else 0
    problem = None
    if proc.returncode != 0 or match is None:
        problem = "exit %s" % proc.returncode
    elif failed and int(failed.group(1)):
        problem = "%s failed transactions" % failed.group(1)
    if problem:
        sink.append((what, "%s: %s\nstdout tail:\n%s\nstderr tail:\n%s" % (
            problem, " ".join(argv), "".join(proc.stdout.splitlines(True)[-8:]),
            "".join(proc.stderr.splitlines(True)[-15:]))))
        return None
    return float(match.group(1))


def setup_postgres(root):
    pg = PostgresServer(root / "pg", max_connections=MAX_CONNECTIONS).start()
    for name, password, method in PG_USERS.values():
        pg.create_user(name, password, method=method)
    pg.create_database(PG_DB)
    t0 = time.monotonic()
    servers.check_output([find_binary("pgbench"), "-i", "-s", "10", "-q", "-h", HOST, "-p", str(pg.port),
                          "-U", pg.superuser, PG_DB], env=pg._env(pg.superuser_password),
                         timeout=600, what="pgbench -i -s 10")
    names = ", ".join(n for n, _, _ in PG_USERS.values())
    pg.psql("GRANT USAGE ON SCHEMA public TO %s; "
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO %s"
            % (names, names), dbname=PG_DB)
    say("pgbench -i -s 10: %.1fs" % (time.monotonic() - t0))
    return pg


def pg_proxy(root, pg, profile_path=None, **kw):
    secrets = {"arn:bench:%s" % key: {"username": name, "password": pw}
               for key, (name, pw, _) in PG_USERS.items()}
    auth = [("arn:bench:scram", "POSTGRES_SCRAM_SHA_256"), ("arn:bench:md5", "POSTGRES_MD5")]
    return Proxy(root, "POSTGRESQL", pg.port, auth, secrets, profile_path, **kw)


def pg_sessions(pg):
    """Sessions PostgreSQL has accepted into the bench database so far (pg_stat_database)."""
    out = pg.psql("SELECT sessions FROM pg_stat_database WHERE datname = '%s'" % PG_DB).strip()
    return int(out or 0)


POOL_SIZE = MAX_CONNECTIONS * POOL_PERCENT // 100
warnings = []              # scenarios that opened more database connections than their pool


def check_opened(label, target, opened, pool_size):
    if opened is not None and opened > pool_size:
        warnings.append("%s via %s opened %d database connections, more than its pool of %d"
                        % (label, target, opened, pool_size))


def ratio(a, b):
    return "%.2f" % (a / b) if a and b else "-"


def fmt_us(seconds):
    return "-" if seconds is None else "%.0f us" % (seconds * 1e6)


def fmt_tps(v, missing="FAIL"):
    return missing if v is None else "%.0f" % v


def run_pg(args, stack, root):
    say("\n== PostgreSQL: pgbench -S, %d clients, -j 2, -T %s ==" % (CLIENTS, args.time))
    pg = setup_postgres(root)
    stack.callback(pg.stop)
    say("PostgreSQL %s on port %d (max_connections %d)" % (
        pg.psql("SHOW server_version").strip(), pg.port, MAX_CONNECTIONS))
    proxy = pg_proxy(root / "proxy", pg).start()
    stack.callback(proxy.stop)
    bouncer = PgBouncer(root / "pgbouncer", pg, list(PG_USERS.values())).start()
    stack.callback(bouncer.stop)
    say("proxy on port %d (pool %d%% of %d), %s on port %d (transaction mode, pool 20)"
        % (proxy.port, POOL_PERCENT, MAX_CONNECTIONS, PgBouncer.version(), bouncer.port))
    targets = [("direct", pg.port), ("proxy", proxy.port), ("pgbouncer", bouncer.port)]

    # Warm up: backends started, pools filled, caches warm.  Not reported.
    for _, port in targets:
        for key in PG_USERS:
            pgbench(pg, port, key, ["-M", "simple"], 1, "warm-up", record=False)

    rows = []
    cpython_rss = {}  # scenario -> the CPython proxy's RSS (MiB) after it (the PyPy table)
    for label, key, options, info in SCENARIOS:
        tps, opened, cpu = {}, {}, None
        for target, port in targets:
            if info and target == "pgbouncer":
                continue   # PgBouncer 1.18 has no prepared statements in transaction mode
            what = "%s via %s" % (label, target)
            before, cpu0 = pg_sessions(pg), idle_clients.cpu_seconds(proxy.proc.pid)
            tps[target] = pgbench(pg, port, key, options, args.time, what)
            opened[target] = pg_sessions(pg) - before
            if target == "proxy" and LAST_RUN.get("transactions"):
                cpu = (idle_clients.cpu_seconds(proxy.proc.pid) - cpu0) / LAST_RUN["transactions"]
            if target != "direct":
                check_opened(label, target, opened[target], POOL_SIZE)
            if target == "proxy" and tps[target] is None and failures:
                failures[-1] = (what, failures[-1][1] + "proxy log tail (%s):\n%s" % (
                    proxy.log_path.name, tail(proxy.log_path, 20)))
            if target == "proxy" and not proxy.alive():
                failures.append((what, "the proxy exited (%s); log tail:\n%s"
                                 % (proxy.proc.returncode, tail(proxy.log_path))))
                break
        rows.append((label + (" [info]" if info else ""), tps, opened, cpu))
        if proxy.alive():
            cpython_rss[label] = idle_clients.rss_kib(proxy.proc.pid) / 1024
        say("  %-36s direct %8s  proxy %8s  pgbouncer %8s   db sessions opened %s"
            "   proxy CPU/tx %s" % (
                label, fmt_tps(tps.get("direct")), fmt_tps(tps.get("proxy")),
                fmt_tps(tps.get("pgbouncer"), "FAIL" if "pgbouncer" in tps else "n/a"),
                "/".join(str(opened.get(t, "-")) for t, _ in targets), fmt_us(cpu)))
        if not proxy.alive():
            break

    # Named statements tracked instead of pinned: 20 clients over a pool of 5.
    proxy.stop()
    tracked = pg_proxy(root / "proxy-tracked", pg, pool_percent=TRACKED_POOL_PERCENT,
                       filters=["EXCLUDE_PREPARED_STATEMENTS"]).start()
    stack.callback(tracked.stop)
    pgbench(pg, tracked.port, "scram", ["-M", "prepared"], 1, "warm-up", record=False)
    tracked_pool = MAX_CONNECTIONS * TRACKED_POOL_PERCENT // 100
    label = "-M prepared, tracked, pool %d" % tracked_pool
    before, cpu0 = pg_sessions(pg), idle_clients.cpu_seconds(tracked.proc.pid)
    tps = {"direct": next((t.get("direct") for l, t, _, _ in rows
                           if l.startswith("persistent -M prepared")), None),
           "proxy": pgbench(pg, tracked.port, "scram", ["-M", "prepared"], args.time,
                            label + " via proxy")}
    opened = {"proxy": pg_sessions(pg) - before}
    cpu = ((idle_clients.cpu_seconds(tracked.proc.pid) - cpu0) / LAST_RUN["transactions"]
           if LAST_RUN.get("transactions") else None)
    check_opened(label, "proxy", opened["proxy"], tracked_pool)
    rows.append((label + " [info]", tps, opened, cpu))
    say("  %-36s direct %8s  proxy %8s" % (label, fmt_tps(tps["direct"]), fmt_tps(tps["proxy"])))
    tracked.stop()

    say("\nPostgreSQL results (TPS, pgbench -S, %d clients, -T %ss, %s CPUs shared by all):"
        % (CLIENTS, args.time, os.cpu_count()))
    header = "%-38s %9s %9s %10s %13s %16s %16s %10s %14s" % (
        "scenario", "direct", "proxy", "pgbouncer", "proxy/direct", "proxy/pgbouncer",
        "pgbouncer/direct", "proxy CPU", "db conns p/b")
    say(header)
    say("-" * len(header))
    for label, tps, opened, cpu in rows:
        d, p, b = tps.get("direct"), tps.get("proxy"), tps.get("pgbouncer")
        say("%-38s %9s %9s %10s %13s %16s %16s %10s %14s" % (
            label, fmt_tps(d), fmt_tps(p), fmt_tps(b, "FAIL" if "pgbouncer" in tps else "n/a"),
            ratio(p, d), ratio(p, b), ratio(b, d), fmt_us(cpu),
            "%s/%s" % (opened.get("proxy", "-"), opened.get("pgbouncer", "-"))))
    say("[info]: -M prepared pins each proxy session (named prepared statements; pool 20 >= 20 "
        "clients); 'tracked': SessionPinningFilters [EXCLUDE_PREPARED_STATEMENTS], 20 clients over "
        "a pool of %d, nothing pinned; n/a: PgBouncer 1.18 has no prepared statements in "
        "transaction mode; proxy CPU: the proxy's user+system CPU time per transaction; db "
        "conns p/b: database sessions the proxy / PgBouncer opened during the run (pool %d; "
        "all runs use the RDS defaults: MaxIdleConnectionsPercent unset)."
        % (MAX_CONNECTIONS * TRACKED_POOL_PERCENT // 100, POOL_SIZE))

    # Free the proxy's and PgBouncer's database connections before the next phases.
    proxy.stop()
    bouncer.stop()
    workers_bench.run(args, say, pg, root, sys.modules[__name__])
    if pypy_bench.pypy_bin(REPO) is not None:
        pypy_bench.run_pg(args, sys.modules[__name__], root, pg, rows, cpython_rss)
    name, password, _ = PG_USERS["md5"]
    idle_proxy = pg_proxy(root / "proxy-idle", pg).start()
    stack.callback(idle_proxy.stop)
    idle_phase("PostgreSQL", idle_proxy, args,
               lambda: idle_clients.pg_login(HOST, idle_proxy.port, name, password, PG_DB))
    idle_proxy.stop()
    if args.profile:
        profile_pg(args, root, pg)


IDLE_TOTAL, IDLE_BURST = 10000, 5000
OPEN_FILES = 1024          # main() raises it (ulimit -n) to the hard limit


def raise_open_files():
    """-> the soft limit on open files after raising it to the hard one.  The idle phase holds
    IDLE_TOTAL sockets in this process and as many in the proxy, which inherits the limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def idle_phase(engine, proxy, args, login):
    """Idle client sessions: the proxy's RSS per session and the login rate of a burst.
    -> idle_clients.measure's figures, or None when it failed."""
    total, burst = (IDLE_TOTAL, IDLE_BURST) if not args.quick else (2000, 1000)
    room = OPEN_FILES - 256   # listeners, database connections, logs
    if total > room:
        say("\n%s idle clients: only %d sessions (ulimit -n is %d; raise the hard limit for %d)"
            % (engine, room, OPEN_FILES, total))
        total, burst = room, min(burst, room)
    try:
        res = idle_clients.measure(proxy.proc.pid, login, total=total, burst=burst)
    except Exception as exc:
        failures.append(("%s idle clients" % engine, repr(exc)))
        return
    if res["errors"]:
        failures.append(("%s idle clients" % engine, "%d of %d logins failed, first: %s" % (
            len(res["errors"]), total, res["errors"][0])))
    say("\n%s idle clients: %d sessions open at once: proxy RSS %s per idle session; "
        "burst of %d logins: %s logins/s, proxy CPU %s per login" % (
            engine, res["sessions"],
            "-" if res["rss_per_client"] is None else "%.1f KiB" % (res["rss_per_client"] / 1024),
            burst, fmt_tps(res["burst_rate"]), fmt_us(res["burst_cpu"])))
    if not proxy.alive():
        failures.append(("%s idle clients" % engine, "the proxy exited; log tail:\n%s"
                         % tail(proxy.log_path)))
    return res


def profile_pg(args, root, pg):
    phases = [("persistent -M simple", "scram", ["-M", "simple"]),
              ("-C md5 clients", "md5", ["-M", "simple", "-C"])]
    for i, (label, key, options) in enumerate(phases):
        prof = root / ("proxy-%d.prof" % i)
        proxy = pg_proxy(root / ("proxy-profile-%d" % i), pg, profile_path=prof).start()
        try:
            pgbench(pg, proxy.port, key, ["-M", "simple"], 1, "warm-up", record=False)
            with proxy.profiling():
                tps = pgbench(pg, proxy.port, key, options, args.time,
                              "%s via proxy (cProfile)" % label)
        finally:
            proxy.stop()
        say("\n== proxy profile (cProfile, tottime): %s, %s TPS under the profiler ==" % (
            label, fmt_tps(tps)))
        print_profile(prof, proxy)


def print_profile(prof, proxy, top=25):
    if not prof.exists():
        say("no profile written (proxy exit %s); log tail:\n%s"
            % (proxy.proc.returncode, tail(proxy.log_path)))
        return
    out = io.StringIO()
    stats = pstats.Stats(str(prof), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    # Drop pstats' preamble up to the total line; shorten paths to package-relative ones.
    text = text[text.find("function calls"):] if "function calls" in text else text
    for prefix in sorted({str(REPO) + "/", os.path.dirname(os.__file__) + "/",
                          str(VENV_BIN.parent) + "/"}, key=len, reverse=True):
        text = text.replace(prefix, "")
    text = re.sub(r"lib/python3\.\d+/site-packages/", "", text)
    say(text.rstrip())


# --------------------------------------------------------------------------
# MySQL: sysbench and connection churn


SYSBENCH_TPS_RE = re.compile(r"transactions:\s+(\d+)\s+\(([0-9.]+) per sec")
SYSBENCH_QPS_RE = re.compile(r"queries:\s+\d+\s+\(([0-9.]+) per sec")


def sysbench(test, port, seconds, command, what, extra=(), record=True):
    """-> (tps, qps) for `run` (True for other commands) or None; the transactions processed
    are left in LAST_RUN["transactions"]."""
    sink = failures if record else []
    LAST_RUN.clear()
    argv = ["sysbench", test, "--db-driver=mysql", "--mysql-host=%s" % HOST,
            "--mysql-port=%d" % port, "--mysql-user=%s" % MY_USER,
            "--mysql-password=%s" % MY_PASSWORD, "--mysql-db=%s" % MY_DB,
            "--tables=4", "--table-size=10000", "--threads=%d" % CLIENTS,
            "--time=%d" % seconds, "--report-interval=0"] + list(extra) + [command]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 300)
    except subprocess.TimeoutExpired:
        sink.append((what, "timed out: %s" % " ".join(argv)))
        return None
    if proc.returncode != 0:
        sink.append((what, "exit %s: %s\nstdout tail:\n%s\nstderr tail:\n%s" % (
            proc.returncode, " ".join(argv), "".join(proc.stdout.splitlines(True)[-10:]),
            "".join(proc.stderr.splitlines(True)[-10:]))))
        return None
    if command != "run":
        return True
    tps, qps = SYSBENCH_TPS_RE.search(proc.stdout), SYSBENCH_QPS_RE.search(proc.stdout)
    if not tps or not qps:
        sink.append((what, "no figures in sysbench output:\n" + proc.stdout[-1500:]))
        return None
    LAST_RUN["transactions"] = int(tps.group(1))
    return float(tps.group(2)), float(qps.group(1))


def churn(port, seconds, threads=4):
    """Connections per second: PyMySQL connect, SELECT 1, close, in `threads` threads."""
    import pymysql

    counts = [0] * threads
    errors = []
    deadline = time.monotonic() + seconds

    def worker(i):
        while time.monotonic() < deadline:
            try:
                conn = pymysql.connect(host=HOST, port=port, user=MY_USER, password=MY_PASSWORD,
                                       database=MY_DB, connect_timeout=10,
                                       ssl_disabled=True)  # else a new SSL context per connect
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        cur.fetchall()
                finally:
                    conn.close()
                counts[i] += 1
            except Exception as exc:  # report, keep measuring
                errors.append(repr(exc))
                if len(errors) > 50:
                    return

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.monotonic() - t0), errors


def run_mysql(args, stack, root):
    say("\n== MySQL (MariaDB): sysbench, %d threads, --time=%s; connection churn ==" % (
        CLIENTS, args.time))
    if not (REPO / "txrdsproxy" / "proxy" / "mysql_frontend.py").exists():
        say("skipped: txrdsproxy/proxy/mysql_frontend.py does not exist yet (no MYSQL engine family)")
        return
    missing = [b for b in servers.MARIADB_BINARIES if find_binary(b) is None]
    if missing or shutil.which("sysbench") is None:
        say("skipped: missing binaries: %s" % ", ".join(missing + (
            [] if shutil.which("sysbench") else ["sysbench"])))
        return
    db = MariaDBServer(root / "mariadb", max_connections=MAX_CONNECTIONS).start()
    stack.callback(db.stop)
    db.create_user(MY_USER, MY_PASSWORD, plugin="mysql_native_password")
    db.create_database(MY_DB)
    say("MariaDB %s on port %d" % (db.mariadb("SELECT VERSION()").strip(), db.port))
    if not sysbench("oltp_read_write", db.port, 1, "prepare", "sysbench prepare"):
        return
    proxy = Proxy(root / "proxy-mysql", "MYSQL", db.port,
                  [("arn:bench:my", "MYSQL_NATIVE_PASSWORD")],
                  {"arn:bench:my": {"username": MY_USER, "password": MY_PASSWORD}}).start()
    stack.callback(proxy.stop)
    targets = [("direct", db.port), ("proxy", proxy.port)]
    for _, port in targets:   # warm-up, not reported
        sysbench("oltp_point_select", port, 1, "run", "warm-up", record=False)

    def connections():
        """MariaDB's Connections status counter, less the connection that reads it."""
        return int(db.mariadb("SHOW GLOBAL STATUS LIKE 'Connections'").split()[1]) - 1

    def cpu():
        return idle_clients.cpu_seconds(proxy.proc.pid)

    rows = []
    for test in ("oltp_point_select", "oltp_read_write"):
        res, opened, per_tx = {}, {}, None
        for target, port in targets:
            before, cpu0 = connections(), cpu()
            res[target] = sysbench(test, port, args.time, "run", "%s via %s" % (test, target))
            opened[target] = connections() - before - 1   # the first reading's own connection
            if target == "proxy" and LAST_RUN.get("transactions"):
                per_tx = (cpu() - cpu0) / LAST_RUN["transactions"]
                check_opened(test, target, opened[target], POOL_SIZE)
        rows.append((test, res, opened, per_tx))
        say("  %-20s direct %8s tps  proxy %8s tps   db connections opened %s/%s   proxy CPU/tx %s"
            % (test, fmt_tps(res["direct"] and res["direct"][0]),
               fmt_tps(res["proxy"] and res["proxy"][0]), opened["direct"], opened["proxy"],
               fmt_us(per_tx)))
    churn_seconds = 2 if args.quick else 5
    churn_res, churn_opened, churn_cpu = {}, {}, None
    for target, port in targets:
        before, cpu0 = connections(), cpu()
        rate, errors = churn(port, churn_seconds)
        churn_res[target] = rate
        churn_opened[target] = connections() - before - 1
        if target == "proxy":
            check_opened("connection churn", target, churn_opened[target], POOL_SIZE)
            if rate:
                churn_cpu = (cpu() - cpu0) / (rate * churn_seconds)
        if errors:
            failures.append(("connection churn via %s" % target, "%d errors, first: %s"
                             % (len(errors), errors[0])))
    if not proxy.alive():
        failures.append(("MySQL proxy", "the proxy exited (%s); log tail:\n%s"
                         % (proxy.proc.returncode, tail(proxy.log_path))))

    say("\nMySQL results (sysbench --threads=%d --time=%s, tables 4 x 10000):" % (CLIENTS, args.time))
    header = "%-22s %12s %12s %13s %12s %12s %10s %14s" % (
        "test", "direct tps", "proxy tps", "proxy/direct", "direct qps", "proxy qps",
        "proxy CPU", "db conns d/p")
    say(header)
    say("-" * len(header))
    for test, res, opened, per_tx in rows:
        d, p = res.get("direct"), res.get("proxy")
        say("%-22s %12s %12s %13s %12s %12s %10s %14s" % (
            test, fmt_tps(d and d[0]), fmt_tps(p and p[0]), ratio(p and p[0], d and d[0]),
            fmt_tps(d and d[1]), fmt_tps(p and p[1]), fmt_us(per_tx),
            "%s/%s" % (opened.get("direct"), opened.get("proxy"))))
    d, p = churn_res.get("direct"), churn_res.get("proxy")
    say("%-22s %12s %12s %13s %12s %12s %10s %14s" % (
        "connection churn", fmt_tps(d), fmt_tps(p), ratio(p, d), "", "", fmt_us(churn_cpu),
        "%s/%s" % (churn_opened.get("direct"), churn_opened.get("proxy"))))
    say("churn: conn/s, PyMySQL connect, SELECT 1, close; 4 threads, %ss.  proxy CPU: per "
        "transaction (churn: per connection); db conns: connections MariaDB accepted during the "
        "run (pool %d, RDS defaults: MaxIdleConnectionsPercent unset)." % (churn_seconds, POOL_SIZE))
    proxy.stop()
    if pypy_bench.pypy_bin(REPO) is not None:
        def pypy_proxy(workdir, venv_bin):
            return Proxy(workdir, "MYSQL", db.port, [("arn:bench:my", "MYSQL_NATIVE_PASSWORD")],
                         {"arn:bench:my": {"username": MY_USER, "password": MY_PASSWORD}},
                         venv_bin=venv_bin).start()
        pypy_bench.run_mysql(args, sys.modules[__name__], root, rows, (p, d, churn_cpu), pypy_proxy)
    idle_proxy = Proxy(root / "proxy-mysql-idle", "MYSQL", db.port,
                       [("arn:bench:my", "MYSQL_NATIVE_PASSWORD")],
                       {"arn:bench:my": {"username": MY_USER, "password": MY_PASSWORD}}).start()
    stack.callback(idle_proxy.stop)
    idle_phase("MySQL", idle_proxy, args,
               lambda: idle_clients.mysql_login(HOST, idle_proxy.port, MY_USER, MY_PASSWORD, MY_DB))
    idle_proxy.stop()


# --------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (-T 3)")
    parser.add_argument("--only", choices=("pg", "mysql", "iam", "failover"), help="run one part only")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the proxy with cProfile (PostgreSQL runs)")
    parser.add_argument("-T", "--time", type=int, help="seconds per run (default 10, 3 with --quick)")
    args = parser.parse_args()
    global OPEN_FILES
    OPEN_FILES = raise_open_files()   # before any proxy starts: they inherit it
    if args.time is None:
        args.time = 3 if args.quick else 10

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)

    root = Path(tempfile.mkdtemp(prefix="txrdsproxy-bench-"))
    status = 0
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, root, True)
            say("txrdsproxy bench (%s, %d CPUs, runs of %ss)" % (
                "quick" if args.quick else "full", os.cpu_count(), args.time))
            if args.only in (None, "pg"):
                missing = [b for b in ("initdb", "postgres", "pgbench") if find_binary(b) is None]
                if missing or not os.access(PgBouncer.BINARY, os.X_OK):
                    say("PostgreSQL skipped: missing %s" % ", ".join(
                        missing + ([] if os.access(PgBouncer.BINARY, os.X_OK) else ["pgbouncer"])))
                else:
                    with contextlib.ExitStack() as pg_stack:
                        run_pg(args, pg_stack, root / "pg-bench")
            if args.only in (None, "mysql"):
                with contextlib.ExitStack() as my_stack:
                    run_mysql(args, my_stack, root / "mysql-bench")
            if args.only in (None, "iam"):
                if not iam_bench.run(say):
                    failures.append(("IAM token logins", "a valid token was refused"))
            if args.only in (None, "failover"):
                failures.extend(failover_bench.run(say, idle_count=20 if args.quick else 50))
    except KeyboardInterrupt:
        say("\ninterrupted; cleaning up")
        status = 130
    if warnings:
        say("\nWARNING: the pool churned (more database connections than the pool size):")
        for line in warnings:
            say("  " + line)
    if failures:
        say("\nFAILURES (functional, not timing):")
        for what, detail in failures:
            say("--- %s\n%s" % (what, detail.rstrip()))
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
