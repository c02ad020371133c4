"""Real PostgreSQL and MariaDB servers for tests, the demo and the bench.

Plain Python (no pytest import), part of the package so that ``scripts/demo.py``,
``bench/run.py``, the project's tests and applications embedding the proxy (their own
integration tests) import the same helpers: ``from txrdsproxy.testing.servers import
PostgresServer``.  Every server lives in a directory we
are given, listens on 127.0.0.1 on a free port, uses password authentication
and is tuned for speed, not durability (fsync off and friends).

Both databases refuse to run as root, so when we are root the server processes
run as an unprivileged system user (``postgres`` / ``mysql``, else ``nobody``)
via ``setpriv``, which execs in place: the ``Popen`` pid is the server's pid.
"""

import atexit
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = [
    "HOST",
    "PG_BINARIES",
    "MARIADB_BINARIES",
    "ServerError",
    "MissingBinary",
    "find_free_port",
    "find_binary",
    "pg_bindir",
    "require_binaries",
    "stop_process",
    "run_user_for",
    "as_user",
    "prepare_dir",
    "check_output",
    "PostgresServer",
    "MariaDBServer",
]

HOST = "127.0.0.1"
PG_BINARIES = ("initdb", "postgres", "pg_basebackup", "psql")
MARIADB_BINARIES = ("mariadb-install-db", "mariadbd", "mariadb")

_running = set()  # servers started and not yet stopped; stopped at exit


class ServerError(RuntimeError):
    """A server could not be set up, started or queried."""


class MissingBinary(ServerError):
    """A required server binary is not installed (raised only when CI=true)."""


# --------------------------------------------------------------------------
# binaries, ports, users


def _ephemeral_low():
    """The first port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED_OUT = set()  # ports find_free_port gave in this process


def find_free_port(host=HOST):
    """Return a TCP port that is free on ``host`` right now.

    Chosen at random below the kernel's ephemeral range when there is room there: a port of the
    ephemeral range (what binding to port 0 gives) is also where every outgoing connection on the
    machine takes its local port, so between this check and the bind of the process the port is
    for (a twistd or a database starting takes seconds on a loaded machine) any connect() could
    take it; below the range only an explicit bind can.
    """
    low = _ephemeral_low()
    for _ in range(50 if low > 11000 else 0):
        port = random.randrange(10000, low)
        if port in _HANDED_OUT:  # two calls in a row (a proxy and its admin port) never get one port
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pg_bindir():
    """The PostgreSQL server binary directory, or None.

    Order: $TXRDSPROXY_PG_BINDIR, ``pg_config --bindir``, the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps server binaries off PATH).
    """
    candidates = []
    if os.environ.get("TXRDSPROXY_PG_BINDIR"):
        candidates.append(os.environ["TXRDSPROXY_PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True,
                                 text=True, timeout=10)
            if out.returncode == 0:
                candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if p.name.isdigit()),
                          key=lambda p: int(p.name), reverse=True)
        candidates.extend(str(p / "bin") for p in versions)
    for cand in candidates:
        if cand and os.access(os.path.join(cand, "initdb"), os.X_OK):
            return cand
    return None


def find_binary(name):
    """Path of an executable: the PostgreSQL bindir first, then PATH and sbin dirs."""
    bindir = pg_bindir()
    if bindir and os.access(os.path.join(bindir, name), os.X_OK):
        return os.path.join(bindir, name)
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin:/usr/local/sbin"
    found = shutil.which(name, path=path)
    if found is None and name == "mariadbd":
        found = shutil.which("mysqld", path=path)
    if found is None and name == "mariadb-install-db":
        found = shutil.which("mysql_install_db", path=path)
    if found is None and name == "mariadb":
        found = shutil.which("mysql", path=path)
    return found


def stop_process(proc, sig=signal.SIGTERM, timeout=30):
    """Signal one process we started and wait for it; SIGKILL if it outlives *timeout*."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    except ProcessLookupError:
        pass


def require_binaries(*names):
    """None if every binary is installed, else a skip reason.

    With CI=true a missing binary is a failure: raises MissingBinary instead.
    """
    missing = [name for name in names if find_binary(name) is None]
    if not missing:
        return None
    reason = "missing server binaries: %s (run `make setup`)" % ", ".join(missing)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise MissingBinary(reason + " [CI=true: not skipping]")
    return reason


def run_user_for(preferred):
    """The pwd entry to run a server as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerError("running as root and no %r or 'nobody' user exists" % preferred)


def as_user(user, argv):
    if user is None:
        return list(argv)
    return ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid,
            "--init-groups", "--"] + list(argv)


def prepare_dir(path, user):
    """Create ``path``; when root, hand it to ``user`` and let it reach it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if user is None:
        return path
    # The server user must be able to traverse every ancestor (pytest's
    # /tmp/pytest-of-root is 0700): add o+x where it is missing.
    for parent in reversed(path.resolve().parents):
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, (mode & 0o7777) | 0o001)
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, user.pw_uid, user.pw_gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)
    return path


def check_output(argv, env=None, cwd=None, timeout=120, what=None):
    try:
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ServerError("%s timed out after %ss" % (what or argv[0], timeout)) from exc
    if proc.returncode != 0:
        raise ServerError("%s failed (exit %s):\n%s%s" % (
            what or " ".join(argv), proc.returncode, proc.stdout, proc.stderr))
    return proc.stdout


def _tail(path, lines=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _sql_literal(value):
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _pg_ident(name):
    return '"' + name.replace('"', '""') + '"'


def _conf_value(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


class _Process:
    """Shared process handling: spawn with a log file, stop, kill at exit."""

    proc = None
    log_path = None
    start_seconds = None  # wall time of the last start(), for reports

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, argv, cwd, output_path=None):
        log = open(output_path or self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=cwd,
                                         start_new_session=True)
        finally:
            log.close()
        _running.add(self)

    def _wait_ready(self, probe, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                _running.discard(self)
                raise ServerError("%s exited with %s during startup; log tail:\n%s" % (
                    what, self.proc.returncode, _tail(self.log_path)))
            if probe():
                return
            if time.monotonic() > deadline:
                self._terminate(signal.SIGKILL, 5)
                raise ServerError("%s not ready after %ss; log tail:\n%s" % (
                    what, timeout, _tail(self.log_path)))
            time.sleep(0.05)

    def _terminate(self, sig, timeout):
        """Signal the server and wait; SIGKILL if it outlives ``timeout``."""
        if self.proc is None:
            return
        stop_process(self.proc, sig, timeout)
        _running.discard(self)


@atexit.register
def _stop_all():
    for server in list(_running):
        try:
            server._terminate(signal.SIGKILL, 5)
        except Exception:
            pass


# --------------------------------------------------------------------------
# PostgreSQL


class PostgresServer(_Process):
    """A PostgreSQL cluster in ``base_dir`` (data/, postgres.log).

    Password authentication over TCP on 127.0.0.1 only.  Each user created
    with ``create_user`` gets its own pg_hba line with the chosen method;
    everyone else falls through to scram-sha-256.
    """

    superuser = "postgres"
    HBA_METHODS = ("scram-sha-256", "md5", "password", "trust")

    def __init__(self, base_dir, port=None, max_connections=100, settings=None):
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.host = HOST
        self._auto_port = port is None
        self.port = port or find_free_port()
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.superuser_password = "pg-super-" + os.urandom(6).hex()
        self.bindir = pg_bindir()
        self.run_user = run_user_for("postgres")
        self.users = {}         # name -> password, for users made by create_user
        self.auth_methods = {}  # name -> pg_hba method
        self.is_standby = False
        self._initialized = False

    def __repr__(self):
        return "<PostgresServer %s:%s %s>" % (self.host, self.port, self.data_dir)

    # -- binaries and commands

    def _bin(self, name):
        if self.bindir is None:
            raise MissingBinary("PostgreSQL server binaries not found (initdb)")
        return os.path.join(self.bindir, name)

    def _psql_bin(self):
        local = os.path.join(self.bindir or "", "psql")
        return local if os.access(local, os.X_OK) else (shutil.which("psql") or "psql")

    def _env(self, password):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGPASSWORD"] = password
        env["PGCONNECT_TIMEOUT"] = "10"
        env["LC_ALL"] = "C"
        return env

    # -- lifecycle

    def start(self):
        """initdb on first use, then start and wait until it accepts connections."""
        t0 = time.monotonic()
        prepare_dir(self.base_dir, self.run_user)
        if not self._initialized:
            self._initdb()
        self._write_hba()
        for attempt in range(3):
            self._write_conf()
            try:
                self._start_postgres()
                break
            except ServerError as exc:
                if not (self._auto_port and "in use" in str(exc) and attempt < 2):
                    raise
                self.port = find_free_port()
        self.start_seconds = time.monotonic() - t0
        return self

    def _initdb(self):
        pwfile = self.base_dir / "superuser.pw"
        pwfile.write_text(self.superuser_password + "\n")
        if self.run_user:
            os.chown(pwfile, self.run_user.pw_uid, self.run_user.pw_gid)
        try:
            check_output(as_user(self.run_user, [
                self._bin("initdb"), "-D", str(self.data_dir), "-U", self.superuser,
                "-A", "scram-sha-256", "--pwfile=%s" % pwfile, "--no-sync",
                "-E", "UTF8", "--locale=C", "--no-instructions"]),
                cwd=str(self.base_dir), env=self._env(""), what="initdb")
        finally:
            pwfile.unlink()
        self._initialized = True

    def _write_conf(self):
        conf = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.data_dir),
            "max_connections": self.max_connections,
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "shared_buffers": "32MB",
            "password_encryption": "scram-sha-256",
            "wal_level": "replica",
            "max_wal_senders": 10,
            "wal_keep_size": "64MB",
            "logging_collector": False,
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %u@%d ",
        }
        conf.update(self.settings)
        path = self.data_dir / "postgresql.conf"
        text = path.read_text()
        marker = "\n# --- txrdsproxy test settings ---\n"
        text = text.split(marker)[0] + marker + "".join(
            "%s = %s\n" % (k, _conf_value(v)) for k, v in conf.items())
        path.write_text(text)

    def _write_hba(self):
        lines = ["# managed by txrdsproxy/testing/servers.py"]
        for name, method in self.auth_methods.items():
            lines.append("host all %s %s/32 %s" % (_pg_ident(name), self.host, method))
        lines.append("host replication all %s/32 scram-sha-256" % self.host)
        lines.append("host all all %s/32 scram-sha-256" % self.host)
        (self.data_dir / "pg_hba.conf").write_text("\n".join(lines) + "\n")

    def _start_postgres(self):
        if self.running:
            raise ServerError("%r is already running" % self)
        self._spawn(as_user(self.run_user, [self._bin("postgres"), "-D", str(self.data_dir)]),
                    cwd=str(self.base_dir))
        try:
            self._wait_ready(self._ready, 60, "postgres")
        except ServerError as exc:
            if "already in use" in str(exc):
                raise ServerError("port in use: %s" % exc) from exc
            raise

    def _ready(self):
        # postmaster.pid line 8 is "ready" once connections are accepted
        # ("standby" on a hot standby).
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() in ("ready", "standby")

    def stop(self):
        """Fast shutdown (SIGINT); SIGKILL if it takes longer than 30s."""
        self._terminate(signal.SIGINT, 30)

    def restart(self):
        self.stop()
        return self.start()

    def reload(self):
        self.psql("SELECT pg_reload_conf()")

    # -- connecting

    def dsn(self, user=None, password=None, dbname="postgres", **extra):
        """libpq keyword/value DSN; the password defaults to the user's known one."""
        user = user or self.superuser
        if password is None:
            password = self.password_for(user)
        parts = {"host": self.host, "port": self.port, "user": user,
                 "password": password, "dbname": dbname}
        parts.update(extra)
        return " ".join("%s=%s" % (k, _libpq_quote(v)) for k, v in parts.items()
                        if v is not None)

    def password_for(self, user):
        if user == self.superuser:
            return self.superuser_password
        return self.users.get(user, "")

    def psql(self, sql, user=None, dbname="postgres", password=None):
        """Run ``sql`` with psql over TCP; return stdout (-A -t: unaligned, no headers).

        Raises ServerError carrying psql's stderr if anything fails.
        """
        user = user or self.superuser
        if password is None:
            password = self.password_for(user)
        return check_output([self._psql_bin(), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                       "-h", self.host, "-p", str(self.port), "-U", user, "-d", dbname,
                       "-c", sql], env=self._env(password), timeout=60,
                      what="psql as %s" % user)

    # -- users and databases

    def create_user(self, name, password, method="scram-sha-256", superuser=False,
                    createdb=False):
        """Create a login role whose pg_hba method is ``method``.

        md5 users get an md5 password hash (so md5 auth works); "password" and
        "trust" users get a SCRAM hash.  The pg_hba line goes above the
        default line and the configuration is reloaded.
        """
        if method not in self.HBA_METHODS:
            raise ValueError("unknown auth method %r" % (method,))
        encryption = "md5" if method == "md5" else "scram-sha-256"
        attrs = ["LOGIN", "SUPERUSER" if superuser else "NOSUPERUSER",
                 "CREATEDB" if createdb else "NOCREATEDB"]
        self.psql("SET password_encryption = %s; CREATE ROLE %s %s PASSWORD %s" % (
            _sql_literal(encryption), _pg_ident(name), " ".join(attrs),
            _sql_literal(password)))
        self.users[name] = password
        self.auth_methods[name] = method
        self._write_hba()
        self.reload()

    def create_database(self, name, owner=None):
        owner_sql = " OWNER %s" % _pg_ident(owner) if owner else ""
        self.psql("CREATE DATABASE %s%s" % (_pg_ident(name), owner_sql))

    def set_max_connections(self, n):
        """ALTER SYSTEM max_connections and restart (it needs a restart)."""
        self.psql("ALTER SYSTEM SET max_connections = %d" % int(n))
        self.max_connections = int(n)
        self.restart()

    # -- replication

    def start_standby(self, base_dir, port=None):
        """A hot standby streaming from this server (pg_basebackup -R); started."""
        standby = PostgresServer(base_dir, port=port, max_connections=self.max_connections,
                                 settings=self.settings)
        standby.superuser_password = self.superuser_password
        standby.users = dict(self.users)
        standby.auth_methods = dict(self.auth_methods)
        standby.is_standby = True
        t0 = time.monotonic()
        prepare_dir(standby.base_dir, standby.run_user)
        check_output(as_user(standby.run_user, [
            self._bin("pg_basebackup"), "-h", self.host, "-p", str(self.port),
            "-U", self.superuser, "-D", str(standby.data_dir), "-R", "-X", "stream",
            "--no-sync", "-c", "fast"]),
            env=self._env(self.superuser_password), cwd=str(standby.base_dir),
            what="pg_basebackup")
        standby._initialized = True
        standby.start()
        standby.start_seconds = time.monotonic() - t0
        return standby

    def promote(self, timeout=60):
        """Promote a standby; returns once it accepts writes."""
        out = self.psql("SELECT pg_promote(true, %d)" % int(timeout)).strip()
        if out != "t":
            raise ServerError("pg_promote() returned %r" % out)
        self.is_standby = False


def _libpq_quote(value):
    value = str(value)
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------
# MariaDB


class MariaDBServer(_Process):
    """A MariaDB server in ``base_dir`` (data/, mariadb.err, socket, pid).

    Real password authentication over TCP on 127.0.0.1 with name resolution
    off, so accounts are created at host '%' (and root also at 127.0.0.1).

    Replication (GTID): a server made with ``binlog=True`` writes a binary log from its first
    start, so its whole history (users, databases, data) can be replayed;
    ``start_replica(dir)`` starts a read-only replica of it (CHANGE MASTER TO ...
    MASTER_USE_GTID=slave_pos), ``replica.sync_with(primary)`` waits until it has applied
    everything the primary wrote, ``replica.promote()`` makes it a writer (STOP SLAVE; RESET
    SLAVE ALL; SET GLOBAL read_only=0) and ``old.demote(new_primary)`` turns a running former
    primary into a read-only replica of the new one.  ``replica.primary`` names the server it
    replicates from (None for a primary).
    """

    REPL_USER = "repl"

    def __init__(self, base_dir, port=None, max_connections=100, settings=None, binlog=False,
                 server_id=1):
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "mariadb.err"
        self.socket_path = self.base_dir / "mariadb.sock"
        self.pid_path = self.base_dir / "mariadb.pid"
        # Its own tmpdir: mariadbd deletes every "#sql*" file of its tmpdir as it starts, so with
        # the shared /tmp one server starting (of this run, a demo, another run on the machine)
        # could delete the temporary tables of another's bootstrap (mariadb-install-db failed:
        # "Error on delete of '/tmp/#sql-temptable-...'") or of its running queries.
        self.tmp_dir = self.base_dir / "tmp"
        self.host = HOST
        self._auto_port = port is None
        self.port = port or find_free_port()
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.root_password = "maria-root-" + os.urandom(6).hex()
        self.run_user = run_user_for("mysql")
        self.users = {}    # name -> password
        self.plugins = {}  # name -> auth plugin
        self.binlog = binlog        # log-bin + log-slave-updates (a primary, or a replica)
        self.server_id = server_id  # unique within one replication topology
        self.read_only = False      # --read-only at start (replicas; kept across restarts)
        self.primary = None         # the MariaDBServer this one replicates from, if any
        self.repl_password = None   # the replication account's password (set on a primary)
        self._next_server_id = server_id + 1  # handed to replicas made by start_replica
        self._initialized = False

    def __repr__(self):
        return "<MariaDBServer %s:%s %s>" % (self.host, self.port, self.data_dir)

    def _bin(self, name):
        path = find_binary(name)
        if path is None:
            raise MissingBinary("%s not found" % name)
        return path

    def _user_opt(self):
        return ["--user=%s" % self.run_user.pw_name] if self.run_user else []

    def start(self):
        t0 = time.monotonic()
        prepare_dir(self.tmp_dir, self.run_user)
        prepare_dir(self.base_dir, self.run_user)
        fresh = not self._initialized
        if fresh:
            check_output([self._bin("mariadb-install-db"), "--no-defaults",
                    "--datadir=%s" % self.data_dir, "--auth-root-authentication-method=normal",
                    "--skip-test-db", "--skip-name-resolve",
                    "--tmpdir=%s" % self.tmp_dir] + self._user_opt(),
                   cwd=str(self.base_dir), what="mariadb-install-db")
            self._initialized = True
        for attempt in range(3):
            try:
                self._start_mariadbd()
                break
            except ServerError as exc:
                if not (self._auto_port and "in use" in str(exc) and attempt < 2):
                    raise
                self.port = find_free_port()
        if fresh:
            self._secure_root()
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_mariadbd(self):
        if self.running:
            raise ServerError("%r is already running" % self)
        try:
            self.log_path.unlink()  # mariadbd opens it itself (as run_user)
        except FileNotFoundError:
            pass
        argv = [self._bin("mariadbd"), "--no-defaults",
                "--datadir=%s" % self.data_dir, "--port=%d" % self.port,
                "--bind-address=%s" % self.host, "--socket=%s" % self.socket_path,
                "--pid-file=%s" % self.pid_path, "--log-error=%s" % self.log_path,
                "--tmpdir=%s" % self.tmp_dir,
                "--max-connections=%d" % self.max_connections,
                "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M",
                "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0",
                "--skip-name-resolve", "--skip-external-locking",
                "--character-set-server=utf8mb4"] + self._user_opt()
        if self.binlog:
            argv += ["--log-bin=mariadb-bin", "--log-slave-updates", "--binlog-format=ROW",
                     "--server-id=%d" % self.server_id, "--sync-binlog=0",
                     # a replica notices a vanished primary within seconds, not a minute
                     "--slave-net-timeout=5"]
        else:
            argv += ["--skip-log-bin"]
        if self.read_only:
            argv += ["--read-only=1"]
        argv += ["--%s=%s" % (k.replace("_", "-"), v) for k, v in self.settings.items()]
        # stdout/stderr go to a side file; the real log is --log-error.
        self._spawn(argv, cwd=str(self.base_dir), output_path=self.base_dir / "mariadbd.out")
        try:
            self._wait_ready(self._ready, 60, "mariadbd")
        except ServerError as exc:
            if "already in use" in str(exc) or "Address in use" in str(exc):
                raise ServerError("port in use: %s" % exc) from exc
            raise

    def _ready(self):
        # A listening socket file appears only after the server is ready
        # for connections (after InnoDB recovery and the grant tables).
        if not self.socket_path.exists():
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.settimeout(1)
                return len(s.recv(4)) == 4  # the server greeting's header
        except OSError:
            return False

    def _secure_root(self):
        # Fresh install: root@localhost has an empty password over the socket.  A replica does
        # this outside its binary log (its primary's own setup arrives through replication).
        pw = _sql_literal(self.root_password)
        sql = ("SET SESSION sql_log_bin = 0; " if self.primary is not None else "") + (
               "ALTER USER root@localhost IDENTIFIED BY %s; "
               "CREATE USER IF NOT EXISTS root@'127.0.0.1'; "
               "ALTER USER root@'127.0.0.1' IDENTIFIED BY %s; "
               "GRANT ALL PRIVILEGES ON *.* TO root@'127.0.0.1' WITH GRANT OPTION; "
               "DROP USER IF EXISTS ''@'localhost'; "
               "FLUSH PRIVILEGES;" % (pw, pw))
        env = self._env("")
        check_output([self._bin("mariadb"), "--no-defaults", "--socket=%s" % self.socket_path,
                "-u", "root", "--batch", "-e", sql], env=env, what="mariadb (set root password)")

    def stop(self):
        """Clean shutdown (SIGTERM); SIGKILL if it takes longer than 60s."""
        self._terminate(signal.SIGTERM, 60)

    def restart(self):
        self.stop()
        return self.start()

    def _env(self, password):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MYSQL")}
        env["MYSQL_PWD"] = password
        return env

    def mariadb(self, sql, user="root", database=None, password=None, column_names=False):
        """Run ``sql`` with the mariadb CLI over TCP; return stdout (tab separated, no headers
        unless *column_names*)."""
        if password is None:
            password = self.root_password if user == "root" else self.users.get(user, "")
        argv = [self._bin("mariadb"), "--no-defaults", "--protocol=TCP", "-h", self.host,
                "-P", str(self.port), "-u", user, "--batch", "--connect-timeout=10"]
        if not column_names:
            argv.append("--skip-column-names")
        if database:
            argv += ["-D", database]
        return check_output(argv + ["-e", sql], env=self._env(password), timeout=60,
                      what="mariadb as %s" % user)

    def create_user(self, name, password, plugin="mysql_native_password", grant_all=True):
        """CREATE USER name@'%' IDENTIFIED VIA plugin; optionally GRANT ALL ON *.*.

        On a server with a binary log (replication) ALL is granted without READ_ONLY ADMIN, as
        an application account on RDS has it: the account cannot write to a read-only replica
        (it gets the server's ER_OPTION_PREVENTS_STATEMENT, 1290)."""
        if plugin == "ed25519":
            installed = self.mariadb(
                "SELECT COUNT(*) FROM information_schema.plugins "
                "WHERE plugin_name = 'ed25519'").strip()
            if installed == "0":
                self.mariadb("INSTALL SONAME 'auth_ed25519'")
        sql = "CREATE USER %s@'%%' IDENTIFIED VIA %s USING PASSWORD(%s);" % (
            _sql_literal(name), plugin, _sql_literal(password))
        if grant_all:
            sql += " GRANT ALL PRIVILEGES ON *.* TO %s@'%%';" % _sql_literal(name)
            if self.binlog:
                sql += " REVOKE READ_ONLY ADMIN ON *.* FROM %s@'%%';" % _sql_literal(name)
        self.mariadb(sql)
        self.users[name] = password
        self.plugins[name] = plugin

    def create_database(self, name):
        self.mariadb("CREATE DATABASE `%s`" % name.replace("`", "``"))


    # -- replication (GTID) -----------------------------------------------------------------------

    def _ensure_repl_user(self):
        if self.repl_password is None:
            password = "maria-repl-" + os.urandom(6).hex()
            # Logged in the binary log: replicas get the account too, so that a promoted
            # replica can serve the former primary after demote().
            self.mariadb("CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s; "
                         "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO %s@'%%';" % (
                             _sql_literal(self.REPL_USER), _sql_literal(password),
                             _sql_literal(self.REPL_USER)))
            self.repl_password = password
        return self.repl_password

    def _change_master(self, primary, password):
        self.mariadb(
            "CHANGE MASTER TO MASTER_HOST=%s, MASTER_PORT=%d, MASTER_USER=%s, "
            "MASTER_PASSWORD=%s, MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos; "
            "START SLAVE;" % (_sql_literal(primary.host), primary.port,
                              _sql_literal(self.REPL_USER), _sql_literal(password)))
        self.primary = primary

    def start_replica(self, base_dir, port=None):
        """A read-only replica of this server (GTID replication from the start of its binary
        log, so everything it ever did is replayed); started, its users known.  Needs a server
        made with ``binlog=True``.  Returns once the replica has caught up."""
        if not self.binlog:
            raise ServerError("%r has no binary log (make it with binlog=True)" % self)
        t0 = time.monotonic()
        password = self._ensure_repl_user()
        replica = MariaDBServer(base_dir, port=port, max_connections=self.max_connections,
                                settings=self.settings, binlog=True,
                                server_id=self._next_server_id)
        self._next_server_id += 1
        replica._next_server_id = replica.server_id + 100  # its own replicas, later
        replica.root_password = self.root_password
        replica.users = dict(self.users)
        replica.plugins = dict(self.plugins)
        replica.repl_password = password
        replica.read_only = True
        replica.primary = self  # before start(): its root setup stays out of its binlog
        replica.start()
        replica.mariadb("SET GLOBAL gtid_slave_pos = ''")
        replica._change_master(self, password)
        replica.sync_with(self)
        replica.start_seconds = time.monotonic() - t0
        return replica

    def gtid_position(self):
        """This server's @@gtid_binlog_pos (what a replica must have applied to be in sync)."""
        return self.mariadb("SELECT @@global.gtid_binlog_pos").strip()

    def sync_with(self, primary, timeout=60):  # a bound against a hang (loaded CI)
        """Wait (MASTER_GTID_WAIT) until this replica has applied everything *primary* wrote
        so far; ServerError after *timeout* seconds, with the replica's SHOW SLAVE STATUS."""
        position = primary.gtid_position()
        if not position:
            return
        out = self.mariadb("SELECT MASTER_GTID_WAIT(%s, %s)" % (
            _sql_literal(position), float(timeout))).strip()
        if out != "0":
            raise ServerError("%r did not reach %s within %ss:\n%s" % (
                self, position, timeout, self.slave_status()))

    def slave_status(self):
        """SHOW SLAVE STATUS as {column: value} ({} when this server replicates from nothing)."""
        lines = self.mariadb("SHOW SLAVE STATUS", column_names=True).splitlines()
        if len(lines) < 2:
            return {}
        return dict(zip(lines[0].split("\t"), lines[1].split("\t")))

    def promote(self):
        """Make this replica a writer: STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only=0.
        Returns once it accepts writes."""
        self.mariadb("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0;")
        self.read_only = False
        self.primary = None

    def demote(self, new_primary):
        """Turn this (running) former primary into a read-only replica of *new_primary*: it
        continues from the last transaction in its own binary log."""
        password = new_primary.repl_password or self.repl_password
        if password is None:
            password = new_primary._ensure_repl_user()
        new_primary.repl_password = password
        self.mariadb("SET GLOBAL read_only = 1; STOP SLAVE; RESET SLAVE ALL; "
                     "SET GLOBAL gtid_slave_pos = @@global.gtid_binlog_pos;")
        self.read_only = True
        self.repl_password = password
        self._change_master(new_primary, password)
