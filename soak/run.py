"""`make soak`: mixed load on both engines through one txrdsproxy process, checking isolation,
the pool cap and the proxy's memory throughout.  Prints figures; not part of `make test`.

    SOAK_SECONDS=600 .venv/bin/python soak/run.py      (default 600 s; SOAK_SECONDS=60 for a quick look)
    SOAK_HOSTILE=2                                       (hostile PostgreSQL sessions, +1 MySQL; 0 = none)
    SOAK_TRACEMALLOC=10                                  (the proxy under tracemalloc, N frames:
                                                          prints what grew from warm-up to the end)
    SOAK_MEMPROBE=1                                      (no tracing; after the warm-up, every
                                                          SOAK_PROBE_EVERY s and at the end: the
                                                          proxy's RSS after a full collection and
                                                          malloc_trim, pymalloc arenas, malloc in use)

Runs, against a real PostgreSQL 15 and MariaDB started in a temp dir, through
`twistd -n rdsproxy` (one PostgreSQL and one MySQL proxy, pools capped at 20 connections each):
- pgbench (TPC-B-like, -M extended, 8 clients) and sysbench oltp_read_write (4 threads);
- psycopg and PyMySQL sessions that tag their state (SET, temporary tables, prepared
  statements, user variables, a tracked time_zone) with their own id and verify on every step
  that they see their own state and nobody else's; 20% of them are killed at a random point;
- hostile sessions: raw-protocol PostgreSQL (messages split at every byte, a message split
  across the end of a transaction, disguised SETs) and PyMySQL (disguised user-variable
  assignments and temporary tables);
- a monitor that counts, from the databases' side, the proxy's connections (must stay within
  the cap) and samples the proxy's RSS.

Prints transactions, errors by kind, leaks found (must be 0), the highest connection counts
and RSS at start and end.  Exit status 1 when a leak was found or the cap was exceeded.
"""

import contextlib
import json
import os
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
sys.path.insert(0, str(REPO))
from soak.sessions import MyHostile, MyTagged, PgHostile, PgTagged, Tally  # noqa: E402
from txrdsproxy.testing.servers import (MariaDBServer, PostgresServer, find_binary,  # noqa: E402
                                        find_free_port, stop_process)
from txrdsproxy.testing import servers  # noqa: E402

VENV_BIN = Path(os.path.abspath(sys.executable)).parent
HOST = "127.0.0.1"
MAX_CONNECTIONS = 100
POOL_PERCENT = 20
CAP = MAX_CONNECTIONS * POOL_PERCENT // 100
PG_USER, PG_PASSWORD, PG_DB = "soak_pg", "soak-pg-pw", "soak"
MY_USER, MY_PASSWORD, MY_DB = "soak_my", "soak-my-pw", "sbtest"


def say(*args):
    print(*args, flush=True)


def rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def start_pg(root):
    pg = PostgresServer(root / "pg", max_connections=MAX_CONNECTIONS).start()
    pg.create_user(PG_USER, PG_PASSWORD, method="md5")
    pg.create_database(PG_DB, owner=PG_USER)
    servers.check_output([find_binary("pgbench"), "-i", "-s", "1", "-q", "-h", HOST, "-p", str(pg.port),
                          "-U", PG_USER, PG_DB], env=pg._env(PG_PASSWORD), timeout=300,
                         what="pgbench -i")
    pg.psql("create table soak_killed (tag text)", user=PG_USER, dbname=PG_DB)
    return pg


def start_mariadb(root):
    db = MariaDBServer(root / "mariadb", max_connections=MAX_CONNECTIONS).start()
    db.create_user(MY_USER, MY_PASSWORD, plugin="mysql_native_password")
    db.create_database(MY_DB)
    sysbench(db.port, 1, "prepare")
    db.mariadb("create table soak_killed (tag varchar(40)) engine=InnoDB", database=MY_DB)
    return db


def write_config(root, pg, db):
    secrets = {"arn:soak:pg": {"username": PG_USER, "password": PG_PASSWORD},
               "arn:soak:my": {"username": MY_USER, "password": MY_PASSWORD}}
    (root / "secrets.json").write_text(json.dumps(secrets))
    os.chmod(root / "secrets.json", 0o600)
    pg_port, my_port = find_free_port(), find_free_port()

    def proxy(name, engine, port, arn, kind, target, filters):
        return f"""  - DBProxyName: {name}
    EngineFamily: {engine}
    Listen: "tcp:{port}:interface=127.0.0.1"
    Auth: [{{SecretArn: "{arn}", ClientPasswordAuthType: {kind}}}]
    TargetGroups:
      - TargetGroupName: default
        ConnectionPoolConfig: {{MaxConnectionsPercent: {POOL_PERCENT}, MaxIdleConnectionsPercent: 10,
                               ConnectionBorrowTimeout: 60, SessionPinningFilters: {filters}}}
        Targets: [{{RdsResourceId: {name}-1, Endpoint: 127.0.0.1, Port: {target}}}]
"""
    text = "Secrets: {Backend: file, Path: secrets.json}\nDBProxies:\n"
    text += proxy("soak-pg", "POSTGRESQL", pg_port, "arn:soak:pg", "POSTGRES_MD5", pg.port,
                  "[EXCLUDE_PREPARED_STATEMENTS]")
    text += proxy("soak-my", "MYSQL", my_port, "arn:soak:my", "MYSQL_NATIVE_PASSWORD", db.port, "[]")
    (root / "proxy.yaml").write_text(text)
    return root / "proxy.yaml", pg_port, my_port


# SOAK_TRACEMALLOC / SOAK_MEMPROBE: twistd in a wrapper; SIGUSR1 runs a full collection, writes a
# tracemalloc snapshot (when tracing) to <prefix>.<n>.snap, then to <prefix>.<n>.done: the RSS (KiB)
# before, after the collection and after glibc's malloc_trim(0) (memory that malloc_trim gives
# back was free in the allocator, not held by the proxy), and where the rest is: pymalloc's arenas
# (sys._debugmallocstats: arenas held, bytes in live blocks), glibc malloc's bytes in use
# (mallinfo2: large objects, buffers, C extensions), and the number of objects the gc tracks.
TRACED_TWISTD = """
import ctypes, ctypes.util, gc, os, re, signal, sys, tracemalloc
from twisted.scripts.twistd import run
prefix, frames, sys.argv = sys.argv[1], int(sys.argv[2]), ["twistd"] + sys.argv[3:]
if frames:
    tracemalloc.start(frames)
taken = [0]
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
class mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
def malloc_in_use():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = mallinfo2
        info = libc.mallinfo2()
        return (info.uordblks + info.hblkhd) // 1024
    except (OSError, AttributeError):
        return -1
def pymalloc():
    path = "%s.%d.pymalloc" % (prefix, taken[0])
    fd, saved = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), os.dup(2)
    try:
        os.dup2(fd, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    text = open(path).read()
    def field(name):
        m = re.search(re.escape(name) + r"\\s*=\\s*([0-9,]+)", text)
        return int(m.group(1).replace(",", "")) if m else -1
    return field("# arenas allocated current"), field("# bytes in allocated blocks") // 1024
def snapshot(*args):
    before = rss()
    gc.collect()
    collected = rss()
    taken[0] += 1
    if frames:
        tracemalloc.take_snapshot().dump("%s.%d.snap" % (prefix, taken[0]))
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    arenas, live = pymalloc()
    with open("%s.%d.done" % (prefix, taken[0]), "w") as f:
        f.write("%d %d %d %d %d %d %d" % (before, collected, rss(), arenas, live, malloc_in_use(),
                                          len(gc.get_objects())))
signal.signal(signal.SIGUSR1, snapshot)
run()
"""

PROBE_FIELDS = ("RSS KiB", "after gc", "after trim", "pymalloc arenas", "pymalloc live KiB",
                "malloc in use KiB", "gc objects")


def traced_snapshot(proc, prefix, n, timeout=120):
    """Ask the traced proxy for snapshot n; -> (snapshot path, [figures of PROBE_FIELDS]), or
    None if it did not come."""
    proc.send_signal(signal.SIGUSR1)
    done, deadline = Path("%s.%d.done" % (prefix, n)), time.monotonic() + timeout
    while not done.exists() or not done.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            return None
        time.sleep(0.2)
    figures = [int(v) for v in done.read_text().split()]
    say(f"proxy memory at probe {n}: " + ", ".join(f"{k} {v}" for k, v in zip(PROBE_FIELDS, figures)))
    return Path("%s.%d.snap" % (prefix, n)), figures


def print_probes(probes, t0):
    """The probes side by side: how each part of the proxy's memory moved over the run."""
    say("memory probes (after the warm-up, then every SOAK_PROBE_EVERY s, then at the end):")
    say("  %6s " % "min" + " ".join("%17s" % k for k in PROBE_FIELDS))
    for at, got in probes:
        if got is not None:
            say("  %6.1f " % ((at - t0) / 60) + " ".join("%17d" % v for v in got[1]))
    got = [(at, g[1]) for at, g in probes if g is not None]
    if len(got) >= 3:
        (ta, a), (tm, m), (tb, b) = got[0], got[len(got) // 2], got[-1]
        rate = lambda x, y, t1, t2: (y - x) / 1024 / max((t2 - t1) / 60, 1e-9)  # noqa: E731
        say("  RSS after trim, MB/min: first half %+.3f, second half %+.3f"
            % (rate(a[2], m[2], ta, tm), rate(m[2], b[2], tm, tb)))


def print_growth(first, last, minutes, top=15):
    """What grew between two tracemalloc snapshots, by allocation site (with its callers)."""
    import tracemalloc
    old, new = tracemalloc.Snapshot.load(str(first)), tracemalloc.Snapshot.load(str(last))
    stats = new.compare_to(old, "traceback")
    total = sum(s.size_diff for s in stats)
    say(f"traced memory grew {total / 1024:.0f} KiB in {minutes:.1f} min "
        f"({total / 1024 / max(minutes, 1e-9):.0f} KiB/min); largest growth by site:")
    for stat in stats[:top]:
        say(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+8d} blocks")
        for line in stat.traceback.format(limit=-6):
            say("      " + line.replace(str(REPO) + "/", ""))


def start_proxy(root, config, ports, trace_frames=0, probe=False):
    log = open(root / "proxy.log", "wb")
    argv = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "rdsproxy", "--config", str(config)]
    if trace_frames or probe:
        argv = [sys.executable, "-c", TRACED_TWISTD, str(root / "trace"), str(trace_frames)] + argv[1:]
    proc = subprocess.Popen(argv, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + (300 if trace_frames else 30)  # tracemalloc slows imports
    for port in ports:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"proxy exited {proc.returncode}:\n{(root / 'proxy.log').read_text()}")
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("proxy not listening")
                time.sleep(0.05)
    return proc


def sysbench(port, seconds, command, threads=4):
    argv = ["sysbench", "oltp_read_write", "--db-driver=mysql", f"--mysql-host={HOST}",
            f"--mysql-port={port}", f"--mysql-user={MY_USER}", f"--mysql-password={MY_PASSWORD}",
            f"--mysql-db={MY_DB}", "--tables=1", "--table-size=10000", f"--threads={threads}",
            f"--time={seconds}", "--report-interval=0", "--mysql-ignore-errors=all", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 300)


class Monitor(threading.Thread):
    """Counts the proxy's connections from each database's side, and samples the proxy's RSS."""

    def __init__(self, pg, db, proxy_pid, stop, tally):
        super().__init__(daemon=True)
        self.pg, self.db, self.pid, self.stop, self.tally = pg, db, proxy_pid, stop, tally
        self.max_pg = self.max_my = 0
        self.rss = []  # (seconds since start, KiB)
        self.t0 = time.monotonic()

    def run(self):
        import psycopg
        import pymysql
        pgc = psycopg.connect(self.pg.dsn(dbname="postgres"), autocommit=True)
        myc = pymysql.connect(host=HOST, port=self.db.port, user="root",
                              password=self.db.root_password, autocommit=True)
        try:
            while not self.stop.wait(0.5):
                n = pgc.execute("select count(*) from pg_stat_activity where usename = %s",
                                (PG_USER,)).fetchone()[0]
                self.max_pg = max(self.max_pg, n)
                with myc.cursor() as cur:
                    cur.execute("select count(*) from information_schema.processlist where user = %s",
                                (MY_USER,))
                    m = cur.fetchone()[0]
                self.max_my = max(self.max_my, m)
                if n > CAP or m > CAP:
                    self.tally.leak("pool cap exceeded", f"pg={n} mysql={m} cap={CAP}")
                rss = rss_kib(self.pid)
                if rss is not None:
                    self.rss.append((time.monotonic() - self.t0, rss))
        finally:
            pgc.close()
            myc.close()


def main():
    seconds = int(os.environ.get("SOAK_SECONDS", "600"))
    for binary in ("initdb", "postgres", "pgbench", "mariadbd"):
        if find_binary(binary) is None:
            say(f"soak: missing {binary}")
            return 2
    if shutil.which("sysbench") is None:
        say("soak: missing sysbench")
        return 2
    root = Path(tempfile.mkdtemp(prefix="txrdsproxy-soak-"))
    tally, stop = Tally(), threading.Event()
    status = 0
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        say(f"txrdsproxy soak: {seconds} s of mixed load on both engines ({os.cpu_count()} CPUs)")
        pg = start_pg(root)
        stack.callback(pg.stop)
        db = start_mariadb(root)
        stack.callback(db.stop)
        config, pg_port, my_port = write_config(root, pg, db)
        trace_frames = int(os.environ.get("SOAK_TRACEMALLOC", "0"))
        probe = trace_frames > 0 or os.environ.get("SOAK_MEMPROBE", "0") not in ("", "0")
        proxy = start_proxy(root, config, (pg_port, my_port), trace_frames, probe)
        stack.callback(stop_process, proxy, signal.SIGTERM, 30)
        say(f"PostgreSQL on {pg.port}, MariaDB on {db.port}, proxy pid {proxy.pid} "
            f"(PostgreSQL {pg_port}, MySQL {my_port}), pool cap {CAP} each")

        monitor = Monitor(pg, db, proxy.pid, stop, tally)
        workers = []
        for i in range(6):
            workers.append(PgTagged(pg_port, PG_USER, PG_PASSWORD, PG_DB, tally, stop, seed=i))
        hostile = int(os.environ.get("SOAK_HOSTILE", "2"))
        for i in range(hostile):
            workers.append(PgHostile(pg_port, PG_USER, PG_PASSWORD, PG_DB, tally, stop, seed=100 + i))
        for i in range(min(hostile, 1)):
            workers.append(MyHostile(my_port, MY_USER, MY_PASSWORD, MY_DB, tally, stop, seed=300 + i))
        for i in range(4):
            workers.append(MyTagged(my_port, MY_USER, MY_PASSWORD, MY_DB, tally, stop, seed=200 + i))
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        rss_start = rss_kib(proxy.pid)
        monitor.start()
        for t in threads:
            t.start()
        results = {}

        def run_pgbench():
            out = subprocess.run(
                [find_binary("pgbench"), "-n", "-c", "8", "-j", "2", "-M", "extended", "-T",
                 str(seconds), "-h", HOST, "-p", str(pg_port), "-U", PG_USER, PG_DB],
                capture_output=True, text=True, env=pg._env(PG_PASSWORD), timeout=seconds + 300)
            results["pgbench"] = out

        def run_sysbench():
            results["sysbench"] = sysbench(my_port, seconds, "run")

        loads = [threading.Thread(target=run_pgbench), threading.Thread(target=run_sysbench)]
        for t in loads:
            t.start()
        snapshots = []
        t0 = time.monotonic()
        if probe:
            # The first snapshot after the warm-up the RSS figure uses; then every
            # SOAK_PROBE_EVERY seconds (default: a tenth of the run, at least a minute); the last
            # at the end.  tracemalloc compares the first and the last.
            stop.wait(min(60.0, seconds * 0.1))
            snapshots.append((time.monotonic(), traced_snapshot(proxy, root / "trace", 1)))
            every = float(os.environ.get("SOAK_PROBE_EVERY", "0") or 0) or max(60.0, seconds / 10)
            while any(t.is_alive() for t in loads):
                if time.monotonic() + every > t0 + seconds:
                    break
                loads[0].join(every)
                if any(t.is_alive() for t in loads):
                    snapshots.append((time.monotonic(), traced_snapshot(proxy, root / "trace",
                                                                        len(snapshots) + 1)))
        try:
            for t in loads:
                t.join()
        except KeyboardInterrupt:
            say("interrupted")
            status = 130
        stop.set()
        for t in threads:
            t.join(60)
        monitor.join(10)
        time.sleep(1)
        rss_end = rss_kib(proxy.pid)
        if probe:
            snapshots.append((time.monotonic(), traced_snapshot(proxy, root / "trace",
                                                                len(snapshots) + 1)))

        killed_pg = pg.psql("select count(*) from soak_killed", user=PG_USER, dbname=PG_DB).strip()
        killed_my = db.mariadb("select count(*) from soak_killed", database=MY_DB).strip()
        if killed_pg != "0":
            tally.leak("pg killed session committed", f"{killed_pg} rows")
        if killed_my != "0":
            tally.leak("mysql killed session committed", f"{killed_my} rows")

        say("\n== transactions ==")
        pgb = results.get("pgbench")
        if pgb is not None:
            m = re.search(r"number of transactions actually processed: (\d+)", pgb.stdout)
            f = re.search(r"number of failed transactions: (\d+)", pgb.stdout)
            say(f"pgbench (8 clients, TPC-B-like, -M extended): {m.group(1) if m else '?'} transactions,"
                f" {f.group(1) if f else '?'} failed, exit {pgb.returncode}")
            if pgb.returncode != 0:
                tally.error("pgbench", RuntimeError(pgb.stderr.strip().splitlines()[-1] if pgb.stderr.strip() else "exit"))
        sb = results.get("sysbench")
        if sb is not None:
            m = re.search(r"transactions:\s+(\d+)", sb.stdout)
            e = re.search(r"ignored errors:\s+(\d+)", sb.stdout)
            say(f"sysbench oltp_read_write (4 threads): {m.group(1) if m else '?'} transactions,"
                f" {e.group(1) if e else '?'} ignored errors, exit {sb.returncode}")
        for what, n in sorted(tally.counts.items()):
            say(f"{what}: {n}")

        say("\n== errors by kind ==")
        if not tally.errors:
            say("none")
        for what, n in tally.errors.most_common(25):
            say(f"{n:6d}  {what}")

        say("\n== leaks (must be 0) ==")
        say(f"leaks found: {sum(tally.leaks.values())}")
        for what, n in sorted(tally.leaks.items()):
            say(f"{n:6d}  {what}")
        for example in tally.leak_examples:
            say(f"        e.g. {example}")

        say("\n== pool and memory ==")
        say(f"highest database connections of the proxy: PostgreSQL {monitor.max_pg}, "
            f"MySQL {monitor.max_my} (cap {CAP} each)")
        samples = monitor.rss
        warm = [kib for t, kib in samples if t >= min(60.0, seconds * 0.1)]
        say(f"proxy RSS: start {rss_start} KiB, after warm-up {warm[0] if warm else '?'} KiB, "
            f"peak {max(k for _, k in samples) if samples else '?'} KiB, end {rss_end} KiB")
        if probe:
            print_probes(snapshots, t0)
        if trace_frames:
            (t1, first), (t2, last) = snapshots[0], snapshots[-1]
            if first is None or last is None or not first[0].exists():
                say("tracemalloc: a snapshot did not come")
            else:
                print_growth(first[0], last[0], (t2 - t1) / 60)
        if sum(tally.leaks.values()):
            status = status or 1
        log = (root / "proxy.log").read_text(errors="replace")
        tracebacks = log.count("Traceback")
        say(f"proxy log: {tracebacks} tracebacks, {log.count('Unhandled')} unhandled errors")
        if tracebacks:
            idx = log.index("Traceback")
            say(log[max(0, idx - 300):idx + 2000])
    return status


if __name__ == "__main__":
    sys.exit(main())
