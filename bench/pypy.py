"""`make bench`: the proxy on PyPy beside the proxy on CPython (issue 7 item 5).

When `make setup PYTHON=pypy3` has made .venv-pypy3, the bench also starts the proxy as
`.venv-pypy3/bin/twistd` (the clients, pgbench, sysbench and PyMySQL, and the databases are the
same as for the CPython rows) and prints, side by side with the CPython proxy's figures from the
runs just before:

- PostgreSQL: pgbench -S persistent (-M simple) and -C md5 clients: TPS, ratio to direct, the
  proxy's CPU time per transaction, and the TPS of its first 2 s (cold, before the JIT compiled
  the hot path);
- MariaDB: sysbench oltp_point_select and PyMySQL connection churn, same columns;
- memory: the PyPy proxy's RSS after each run, and its RSS per idle client session (the idle
  phase of run.py, as for CPython).

Every PyPy figure is measured after PYPY_WARMUP seconds of the same load on that proxy process
(the JIT compiles the hot loops in the first seconds; before that PyPy is slower than CPython).
Not when the bench itself runs on PyPy (`make bench PYTHON=pypy3`): every figure is PyPy's then.
"""

import sys

PYPY_WARMUP = 10   # seconds of the same load before each measured PyPy run
PG_SCENARIOS = ("persistent -M simple", "-C md5 clients")


def pypy_bin(repo):
    """-> .venv-pypy3/bin when it holds a twistd and this bench runs on CPython, else None."""
    path = repo / ".venv-pypy3" / "bin"
    if sys.implementation.name == "pypy" or not (path / "twistd").exists():
        return None
    return path


def _rss_mib(bench, proxy):
    try:
        return bench.idle_clients.rss_kib(proxy.proc.pid) / 1024
    except (OSError, RuntimeError):
        return None


def _mib(v):
    return "-" if v is None else "%.0f MiB" % v


def run_pg(args, bench, root, pg, rows, cpython_rss):
    """pgbench through a fresh PyPy proxy per scenario, beside the CPython rows (run.py's
    `rows`: (label, {target: tps}, opened, cpu); `cpython_rss`: {label: MiB}); then the idle
    phase (RSS per idle session, login burst) on PyPy."""
    say, fmt_tps, fmt_us, ratio = bench.say, bench.fmt_tps, bench.fmt_us, bench.ratio
    binary = pypy_bin(bench.REPO)
    say("\n== PostgreSQL: the proxy on PyPy (%s), after %ss of JIT warm-up per scenario =="
        % (binary.parent.name, PYPY_WARMUP))
    cpython = {label: (tps, cpu) for label, tps, _, cpu in rows}
    out = []
    for label, key, options, _ in bench.SCENARIOS:
        if label not in PG_SCENARIOS:
            continue
        proxy = bench.pg_proxy(root / ("proxy-pypy-%d" % len(out)), pg, venv_bin=binary).start()
        try:
            cold = bench.pgbench(pg, proxy.port, key, options, 2, "%s via proxy on PyPy (cold)" % label)
            bench.pgbench(pg, proxy.port, key, options, PYPY_WARMUP, "JIT warm-up", record=False)
            cpu0 = bench.idle_clients.cpu_seconds(proxy.proc.pid)
            tps = bench.pgbench(pg, proxy.port, key, options, args.time, "%s via proxy on PyPy" % label)
            done = bench.LAST_RUN.get("transactions")
            cpu = (bench.idle_clients.cpu_seconds(proxy.proc.pid) - cpu0) / done if done else None
            rss = _rss_mib(bench, proxy)
        finally:
            proxy.stop()
        out.append((label, cold, tps, cpu, rss))
    header = "%-24s %9s %9s %9s %12s %12s %12s %10s %10s %10s %10s" % (
        "scenario", "direct", "CPython", "PyPy", "CPython/dir", "PyPy/direct", "CPU CPython",
        "CPU PyPy", "PyPy cold", "RSS CPy", "RSS PyPy")
    say(header)
    say("-" * len(header))
    for label, cold, tps, cpu, rss in out:
        c_tps, c_cpu = cpython.get(label, ({}, None))
        d, c = c_tps.get("direct"), c_tps.get("proxy")
        say("%-24s %9s %9s %9s %12s %12s %12s %10s %10s %10s %10s" % (
            label, fmt_tps(d), fmt_tps(c), fmt_tps(tps), ratio(c, d), ratio(tps, d),
            fmt_us(c_cpu), fmt_us(cpu), fmt_tps(cold), _mib(cpython_rss.get(label)), _mib(rss)))
    say("PyPy: the proxy under %s/twistd, fresh for each scenario; 'PyPy cold': TPS of its "
        "first 2 s, before the warm-up; CPU: the proxy's CPU time per transaction; RSS: the "
        "proxy's resident memory after the run; direct and CPython figures from the runs above "
        "(the same clients, database and pool)." % binary.parent.name)
    name, password, _ = bench.PG_USERS["md5"]
    idle = bench.pg_proxy(root / "proxy-pypy-idle", pg, venv_bin=binary).start()
    try:
        bench.idle_phase("PostgreSQL, proxy on PyPy", idle, args,
                               lambda: bench.idle_clients.pg_login(bench.HOST, idle.port, name,
                                                                   password, bench.PG_DB))
    finally:
        idle.stop()


def run_mysql(args, bench, root, rows, churn_row, new_proxy):
    """sysbench oltp_point_select and PyMySQL churn through a PyPy proxy (`new_proxy(workdir,
    venv_bin)` -> a started run.Proxy), after a warm-up of the same load, beside run.py's
    CPython rows (`rows`: (test, {target: (tps, qps)}, opened, cpu); `churn_row`: (CPython
    proxy conn/s, direct conn/s, CPython CPU per connection))."""
    say, fmt_tps, fmt_us, ratio = bench.say, bench.fmt_tps, bench.fmt_us, bench.ratio
    binary = pypy_bin(bench.REPO)
    say("\n== MySQL: the proxy on PyPy (%s), after %ss of JIT warm-up ==" % (binary.parent.name,
                                                                          PYPY_WARMUP))
    proxy = new_proxy(root / "proxy-mysql-pypy", binary)
    try:
        cpu = bench.idle_clients.cpu_seconds
        cold = bench.sysbench("oltp_point_select", proxy.port, 2, "run", "point_select via PyPy (cold)")
        bench.sysbench("oltp_point_select", proxy.port, PYPY_WARMUP, "run", "JIT warm-up", record=False)
        cpu0 = cpu(proxy.proc.pid)
        res = bench.sysbench("oltp_point_select", proxy.port, args.time, "run",
                             "oltp_point_select via proxy on PyPy")
        done = bench.LAST_RUN.get("transactions")
        per_tx = (cpu(proxy.proc.pid) - cpu0) / done if done else None
        churn_seconds = 2 if args.quick else 5
        bench.churn(proxy.port, min(PYPY_WARMUP, churn_seconds * 2))  # the handshake path's warm-up
        cpu0 = cpu(proxy.proc.pid)
        rate, errors = bench.churn(proxy.port, churn_seconds)
        churn_cpu = (cpu(proxy.proc.pid) - cpu0) / (rate * churn_seconds) if rate else None
        if errors:
            bench.failures.append(("connection churn via proxy on PyPy", "%d errors, first: %s"
                                   % (len(errors), errors[0])))
        rss = _rss_mib(bench, proxy)
    finally:
        proxy.stop()
    c_res, c_cpu = next(((r, c) for t, r, _, c in rows if t == "oltp_point_select"), ({}, None))
    d, c = c_res.get("direct"), c_res.get("proxy")
    header = "%-22s %9s %9s %9s %12s %12s %12s %10s %10s" % (
        "test", "direct", "CPython", "PyPy", "CPython/dir", "PyPy/direct", "CPU CPython",
        "CPU PyPy", "PyPy cold")
    say(header)
    say("-" * len(header))
    say("%-22s %9s %9s %9s %12s %12s %12s %10s %10s" % (
        "oltp_point_select", fmt_tps(d and d[0]), fmt_tps(c and c[0]), fmt_tps(res and res[0]),
        ratio(c and c[0], d and d[0]), ratio(res and res[0], d and d[0]), fmt_us(c_cpu),
        fmt_us(per_tx), fmt_tps(cold and cold[0])))
    c_churn, d_churn, c_churn_cpu = churn_row
    say("%-22s %9s %9s %9s %12s %12s %12s %10s %10s" % (
        "connection churn", fmt_tps(d_churn), fmt_tps(c_churn), fmt_tps(rate),
        ratio(c_churn, d_churn), ratio(rate, d_churn), fmt_us(c_churn_cpu), fmt_us(churn_cpu), "-"))
    say("tps (churn: connections/s); CPU: per transaction (churn: per connection); the PyPy "
        "proxy's RSS after these runs: %s." % _mib(rss))
