"""Run the proxy for integration tests: in the test process, or as `twistd -n rdsproxy`.

Integration tests drive blocking client drivers (psql, psycopg, asyncpg, pgbench) from the
test thread, so the proxy cannot share that thread: `InProcessProxy` runs it on the global
reactor in one daemon thread for the whole pytest session.  Everything that touches proxy
objects goes through `InProcessProxy.call`, which runs in the reactor thread.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

SCRAM_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_scram"
MD5_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_md5"
HOST = "127.0.0.1"

# Keys of ConnectionPoolConfig; any other override goes on the DBProxy itself.
POOL_KEYS = frozenset(("MaxConnectionsPercent", "MaxIdleConnectionsPercent",
                       "ConnectionBorrowTimeout", "SessionPinningFilters", "InitQuery",
                       "IdleConnectionTimeout"))


def find_free_port():
    """A port free on 127.0.0.1 now, outside the ephemeral range (see testing/servers.py)."""
    from txrdsproxy.testing.servers import find_free_port
    return find_free_port(HOST)


def write_proxy_config(dir, pg_server, listen="tcp:0:interface=127.0.0.1", secrets=None,
                       name="test-pg", targets=None, **overrides):
    """Write secrets.json and proxy.yaml into *dir* for pg_server's app users; -> yaml path.

    Users: app_scram (clients use SCRAM-SHA-256) and app_md5 (clients use MD5).  *secrets*
    adds/replaces secrets: {arn: (username, password, ClientPasswordAuthType)}.  Overrides named
    after ConnectionPoolConfig keys go there; others (IdleClientTimeout, MaxClientConnections,
    MaxConnectionRate, ...) go on the proxy.  *targets*: the servers of the target group, in
    order (pg-1, pg-2, ...; default [pg_server]); a server may be given as (server, Role).
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    if "app_scram" in pg_server.users:
        entries[SCRAM_ARN] = ("app_scram", pg_server.users["app_scram"], "POSTGRES_SCRAM_SHA_256")
    if "app_md5" in pg_server.users:
        entries[MD5_ARN] = ("app_md5", pg_server.users["app_md5"], "POSTGRES_MD5")
    entries.update(secrets or {})
    return write_config(dir, "POSTGRESQL", name, listen, entries,
                        [_target(i, t) for i, t in enumerate(targets or [pg_server], 1)], overrides)


def write_config(dir, engine, name, listen, entries, targets, overrides):
    """Write secrets.json and proxy.yaml for one proxy of *engine*; -> yaml path.

    *entries*: {arn: (username, password, ClientPasswordAuthType)}; *targets*: Target mappings.
    Overrides named after ConnectionPoolConfig keys go there, the others on the proxy.
    """
    dir = Path(dir)
    write_secrets(dir / "secrets.json", {arn: (u, p) for arn, (u, p, _) in entries.items()})
    pool = {"MaxConnectionsPercent": 100, "MaxIdleConnectionsPercent": 50,
            "ConnectionBorrowTimeout": 30}
    proxy = {
        "DBProxyName": name,
        "EngineFamily": engine,
        "Listen": listen,
        "Auth": [{"SecretArn": arn, "ClientPasswordAuthType": kind}
                 for arn, (_, _, kind) in entries.items()],
    }
    for key, value in overrides.items():
        (pool if key in POOL_KEYS else proxy)[key] = value
    if "MaxIdleConnectionsPercent" not in overrides:
        pool["MaxIdleConnectionsPercent"] = min(50, pool["MaxConnectionsPercent"])
    elif pool["MaxIdleConnectionsPercent"] is None:  # not set: the RDS default (half)
        del pool["MaxIdleConnectionsPercent"]
    proxy["TargetGroups"] = [{"TargetGroupName": "default", "ConnectionPoolConfig": pool,
                              "Targets": targets}]
    config = {"Secrets": {"Backend": "file", "Path": "secrets.json"}, "DBProxies": [proxy]}
    path = dir / "proxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _target(index, server):
    role = None
    if isinstance(server, tuple):
        server, role = server
    target = {"RdsResourceId": f"pg-{index}", "Endpoint": server.host, "Port": server.port}
    if role:
        target["Role"] = role
    return target


def write_secrets(path, users):
    """Atomically write a secrets file: {arn: (username, password)}."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({arn: {"username": u, "password": p} for arn, (u, p) in users.items()}))
    os.replace(tmp, path)


# -- the reactor thread ------------------------------------------------------------------------

_reactor_lock = threading.Lock()
_reactor = None


def reactor_thread():
    """The proxy's reactor, running in a daemon thread (started once per process).

    A reactor instance of our own rather than the global one: pytest-twisted (installed for the
    unit tests) owns the global reactor and runs it in a greenlet of the main thread, where the
    blocking client drivers of these tests would stop it.  Nothing in txrdsproxy uses the
    global reactor when `make_service` is given one.
    """
    global _reactor
    with _reactor_lock:
        if _reactor is None:
            from twisted.internet.epollreactor import EPollReactor
            reactor = EPollReactor()
            from txrdsproxy import fastpoll
            fastpoll.install(reactor)  # the dispatch and inline reads twistd runs the proxy with
            started = threading.Event()
            reactor.callWhenRunning(started.set)
            thread = threading.Thread(
                target=reactor.run, kwargs={"installSignalHandlers": False},
                name="proxy-reactor", daemon=True)
            thread.start()
            if not started.wait(30):
                raise RuntimeError("the reactor thread did not start")
            _reactor = reactor
    return _reactor


def wait_for(predicate, timeout=30, interval=0.1, what="condition"):
    """Poll predicate() until it returns something true (-> that value); AssertionError naming
    *what* after *timeout* seconds: every wait of a test is bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def pg_running(pg_server, query, wait_event=None):
    """Whether a backend of PostgreSQL *pg_server* is running *query* (its exact text) right now,
    as pg_stat_activity shows it; with *wait_event* ('PgSleep', 'advisory'...), only while it
    waits on that."""
    def literal(text):
        return "'" + text.replace("'", "''") + "'"
    sql = "select count(*) from pg_stat_activity where state = 'active' and query = " + literal(query)
    if wait_event:
        sql += " and wait_event = " + literal(wait_event)
    return int(pg_server.psql(sql).strip()) > 0


def wait_pg_running(pg_server, query, wait_event=None, timeout=30):
    """Wait until *query* runs on *pg_server* (see pg_running): what a test does to a running query
    (cancel it, kill its client, terminate its backend) must not race with the query's way there
    through the proxy, which a loaded machine can make take any time."""
    return wait_for(lambda: pg_running(pg_server, query, wait_event), timeout,
                    what=f"{query!r} running on the database")


def mariadb_running(mariadb_server, query):
    """Whether a connection of *mariadb_server* is running *query* (its exact text) right now."""
    sql = "SELECT COUNT(*) FROM information_schema.processlist WHERE info = '%s'" % query.replace(
        "\\", "\\\\").replace("'", "\\'")
    return int(mariadb_server.mariadb(sql).strip()) > 0


class LogCapture:
    """Formatted Twisted log lines, collected in the reactor thread."""

    def __init__(self):
        from twisted.logger import formatEvent
        self._format = formatEvent
        self.lines = []
        self._lock = threading.Lock()

    def __call__(self, event):
        try:
            text = self._format(event)
        except Exception:  # never break logging
            text = repr(event)
        with self._lock:
            self.lines.append(text)

    def text(self):
        with self._lock:
            return "\n".join(self.lines)


class InProcessProxy:
    """The proxy of a config file, running on the reactor thread of this process.

    `.port` is the bound port, `.ctx` the (first) ProxyContext, `.contexts` all of them.
    `call(fn, *a)` runs fn in the reactor thread (Deferreds are waited for) and returns its result.
    """

    def __init__(self, config_path):
        from twisted.logger import globalLogPublisher
        from txrdsproxy.config.load import load_config

        self.config_path = config_path
        self.config = load_config(config_path)
        self.reactor = reactor_thread()
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self._stopped = False

        def start():
            from txrdsproxy.service import make_service
            top, contexts = make_service(self.config, self.reactor)
            top.startService()
            return top, contexts

        self.service, self.contexts = self.call(start)
        self.ctx = self.contexts[0]
        deadline = time.monotonic() + 60  # against a hang (a loaded CI), not a promise of speed
        ports = []
        while time.monotonic() < deadline:
            ports = self.call(lambda: [r.port for r in self.service.registry])
            if all(p is not None for p in ports):
                break
            time.sleep(0.01)
        else:
            self.stop()
            raise RuntimeError("the proxy did not start listening")
        self.ports = [p.getHost().port for p in ports]
        self.port = self.ports[0]
        self.host = HOST

    def call(self, fn, *args, **kwargs):
        from twisted.internet.threads import blockingCallFromThread
        return blockingCallFromThread(self.reactor, fn, *args, **kwargs)

    def pool_state(self):
        """{state: count} over the pool's database connections (connecting, idle, borrowed...)."""
        def read():
            out = {}
            for conn in self.ctx.pool.connections():
                out[conn.state] = out.get(conn.state, 0) + 1
            return out
        return self.call(read)

    def session_states(self):
        return self.call(lambda: sorted(s.state.value for s in self.ctx.sessions))

    def wait_for(self, predicate, timeout=30, interval=0.05, what="condition"):
        """Poll predicate() (called in the test thread) until true; AssertionError on timeout.
        The default bound only guards against a hang (CI runs on 2 cores under other load: 10 s
        was tight); a test whose behaviour is a time bound passes its own."""
        return wait_for(predicate, timeout, interval, what)

    def dsn(self, pg_server, user="app_scram", password=None, dbname="appdb", **extra):
        """A libpq DSN for *user* through this proxy."""
        if password is None:
            password = pg_server.users[user]
        parts = {"host": self.host, "port": self.port, "user": user, "password": password,
                 "dbname": dbname}
        parts.update(extra)
        return " ".join(f"{k}={_quote(v)}" for k, v in parts.items() if v is not None)

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        from twisted.logger import globalLogPublisher
        try:
            self.call(self.service.stopService)
        finally:
            globalLogPublisher.removeObserver(self.logs)


def _quote(value):
    value = str(value)
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class TwistdProxy:
    """`twistd -n rdsproxy --config FILE` as a subprocess of the venv of sys.executable.

    The config must listen on a fixed port (pass it as *port*); start() waits until it accepts.
    """

    def __init__(self, config_path, port, log_path=None, twistd_args=()):
        self.config_path = config_path
        self.twistd_args = list(twistd_args)  # before the plugin name: --uid, --gid, ...
        self.port = port
        self.host = HOST
        self.log_path = log_path or str(Path(config_path).with_name("twistd.log"))
        self.proc = None

    @staticmethod
    def twistd():
        return os.path.join(os.path.dirname(sys.executable), "twistd")

    def start(self, timeout=120):  # against a hang: twistd imports the whole proxy (slow under load)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.twistd(), "-n", "--pidfile=", *self.twistd_args, "rdsproxy", "--config",
                 self.config_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=os.path.dirname(self.config_path), start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"twistd not listening after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self):
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout=60):
        """SIGTERM and wait; -> exit status (SIGKILL if it outlives *timeout*, a bound against a
        hang: the drain and shutdown of a loaded machine can take more than 15 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise RuntimeError(f"twistd did not stop on SIGTERM within {timeout}s")

    @staticmethod
    def check_config(config_path):
        """-> CompletedProcess of `twistd -n rdsproxy --config FILE --check-config`."""
        return subprocess.run(
            [TwistdProxy.twistd(), "-n", "--pidfile=", "rdsproxy", "--config", config_path,
             "--check-config"], capture_output=True, text=True, timeout=60,
            cwd=os.path.dirname(os.path.abspath(config_path)))


PSQL = "/usr/bin/psql"
PGBENCH = "/usr/bin/pgbench"


def client_env(password, **extra):
    """Environment for psql/pgbench: no inherited PG* variables, the password, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10", "LC_ALL": "C",
                "PGSSLMODE": "disable"})
    env.update(extra)
    return env


def run_psql(proxy, pg_server, args, user="app_scram", dbname="appdb", input=None, timeout=60,
             **env):
    """Run psql against the proxy; -> CompletedProcess (text).  *args* follow the connection."""
    cmd = [PSQL, "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", user, "-d", dbname] + list(args)
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                          env=client_env(pg_server.users[user], **env))


# -- raw protocol, for what drivers will not send ----------------------------------------------

def startup_packet(params, version=196608):
    """A StartupMessage (default protocol 3.0) with *params*."""
    body = struct.pack("!I", version) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def raw_connect(proxy, timeout=10):
    sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    return sock


def read_messages(sock, until=None, timeout=10):
    """Read backend messages until the socket closes or a message of kind *until* arrives.

    -> [(kind, payload)]; kind is a one-byte bytes.
    """
    sock.settimeout(timeout)
    buf = b""
    out = []
    while True:
        while len(buf) >= 5:
            (length,) = struct.unpack("!I", buf[1:5])
            if len(buf) < 1 + length:
                break
            out.append((buf[:1], buf[5:1 + length]))
            buf = buf[1 + length:]
            if until is not None and out[-1][0] == until:
                return out
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            data = b""
        if not data:
            return out
        buf += data


def error_fields(payload):
    """ErrorResponse/NoticeResponse body -> {field code: text}."""
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def raw_error(proxy, packet):
    """Send *packet* on a new connection; -> fields of the ErrorResponse answering it."""
    with raw_connect(proxy) as sock:
        sock.sendall(packet)
        msgs = read_messages(sock)
    errors = [error_fields(p) for k, p in msgs if k == b"E"]
    assert errors, f"no ErrorResponse in {msgs!r}"
    return errors[0]


def raw_login(proxy, pg_server, params=None):
    """Raw MD5 login (app_md5) with arbitrary startup *params*; -> connected socket."""
    import hashlib
    sock = raw_connect(proxy)
    user = "app_md5"
    sock.sendall(startup_packet(dict({"user": user, "database": "appdb"}, **(params or {}))))
    msgs = read_messages(sock, until=b"R")
    kind, payload = msgs[-1]
    assert kind == b"R" and struct.unpack("!I", payload[:4])[0] == 5, msgs
    salt = payload[4:8]
    inner = hashlib.md5((pg_server.users[user] + user).encode()).hexdigest()
    outer = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    body = outer.encode() + b"\0"
    sock.sendall(b"p" + struct.pack("!I", len(body) + 4) + body)
    msgs = read_messages(sock, until=b"Z")
    assert msgs and msgs[-1][0] == b"Z", msgs
    return sock, msgs


def send_query(sock, sql):
    """Send a simple Query on a raw PostgreSQL session (the answer is left to the caller)."""
    body = sql.encode() + b"\0"
    sock.sendall(b"Q" + struct.pack("!I", len(body) + 4) + body)


def kill_socket(sock):
    """Close *sock* with a RST, as a crashed client would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def raw_query(sock, sql):
    """A simple Query on a raw session; -> rows as lists of text (asserts no error)."""
    send_query(sock, sql)
    msgs = read_messages(sock, until=b"Z")
    rows = []
    for kind, payload in msgs:
        if kind == b"D":
            (n,) = struct.unpack("!H", payload[:2])
            pos, row = 2, []
            for _ in range(n):
                (ln,) = struct.unpack("!i", payload[pos:pos + 4])
                pos += 4
                row.append(None if ln < 0 else payload[pos:pos + ln].decode())
                pos += max(ln, 0)
            rows.append(row)
        assert kind != b"E", msgs
    return rows


# -- client libraries without a build for every interpreter ----------------------------------------

ON_PYPY = sys.implementation.name == "pypy"


def client_library(name):
    """Import the client library *name* the tests drive.  On PyPy (`make test-pypy`) some have no
    build (asyncpg is Cython over CPython's C API): there a missing one gives None, and the tests
    that need it skip with `needs(...)`.  Anywhere else a missing one raises ImportError, so the
    CPython suite fails instead of skipping."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        if ON_PYPY:
            return None
        raise


def needs(library, name):
    """A skip mark for tests that drive *library* (the module, or None when client_library
    found none on PyPy)."""
    import pytest
    return pytest.mark.skipif(library is None, reason="%s has no PyPy build; the CPython suite "
                                                      "runs this test" % name)


asyncpg = client_library("asyncpg")
needs_asyncpg = needs(asyncpg, "asyncpg")


def sessions_client(port, key=None):
    """A boto3 RDS client of the admin listener on *port* that knows our DescribeDBProxySessions
    (the model extension); *key*: (access key id, secret) to sign with, None for unsigned."""
    import boto3
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    from txrdsproxy.admin.extensions import install
    session = boto3.Session(botocore_session=install(botocore.session.get_session()))
    config = Config(retries={"max_attempts": 1}, **({"signature_version": UNSIGNED} if key is None else {}))
    key = key or ("unsigned", "unsigned")
    return session.client("rds", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id=key[0], aws_secret_access_key=key[1], config=config)


def all_sessions(rds, **kwargs):
    """Every page of DescribeDBProxySessions, read 20 at a time (the smallest page RDS allows)."""
    found, marker = [], None
    while True:
        page = rds.describe_db_proxy_sessions(MaxRecords=20, **kwargs, **({"Marker": marker} if marker else {}))
        found += page["DBProxySessions"]
        marker = page.get("Marker")
        if not marker:
            return found


def free_privileged_port():
    """A port below 1024 free on the loopback interface (for tests run as root); skips the test
    when there is none."""
    import pytest
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")
