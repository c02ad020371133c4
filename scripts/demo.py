#!/usr/bin/env python3
"""`make demo`: a local PostgreSQL 15 (and MariaDB) with txrdsproxy in front of it.

Starts the databases in a fresh directory under `.state/demo/`: a PostgreSQL primary with a
streaming hot standby, and a MariaDB primary with a GTID replica; writes a secrets file and a
proxy configuration there (each proxy's target group lists the writer and its standby/replica),
runs `twistd -n rdsproxy --config ...` as a child process and prints the command lines that
connect through the proxy and to each server.  Ctrl-C (or SIGTERM) stops the proxy and every
server this script started, then removes the directory.

`scripts/demo.py failover postgresql|mysql`, run while the demo runs, causes a failover:
PostgreSQL: the primary stops (fast shutdown) and the standby is promoted (once: the old
primary stays down); MySQL: a switchover (the writer becomes read-only, the replica is promoted
and the old writer replicates from it), which may be repeated back and forth.  It finds the
running demo through `.state/demo/current.json` (written at start, removed at stop).

The MySQL side is included only when txrdsproxy has a MySQL frontend
(`txrdsproxy/proxy/mysql_frontend.py`) and MariaDB is installed.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import yaml  # noqa: E402

from txrdsproxy.testing import servers  # noqa: E402

HOST = "127.0.0.1"
USER = "app"
DATABASE = "appdb"
PG_PROXY_PORT = 6432
MYSQL_PROXY_PORT = 3307
PG_ARN = "arn:aws:secretsmanager:local:000000000000:secret:demo-app-pg"
MYSQL_ARN = "arn:aws:secretsmanager:local:000000000000:secret:demo-app-mysql"
MYSQL_FRONTEND = os.path.join(REPO, "txrdsproxy", "proxy", "mysql_frontend.py")
# Where a running demo says how to reach it (`demo.py failover` reads it).  The environment may
# move it (the automated test of the demo does, so it never touches a demo you are running).
CURRENT = os.environ.get("TXRDSPROXY_DEMO_CURRENT") or os.path.join(REPO, ".state", "demo", "current.json")
HEALTH_CHECK_INTERVAL = 2  # seconds: a failover is noticed quickly in the demo


class Stop(Exception):
    """SIGINT/SIGTERM/SIGHUP arrived: shut everything down."""


def _on_signal(signum, frame):
    raise Stop(signal.Signals(signum).name)


def say(text=""):
    print(text, flush=True)


def port_or_free(preferred):
    """*preferred* if nothing listens there and we can bind it, else a free port (also for
    0 or below: "any port", whose number must be known before the proxy binds it)."""
    if preferred <= 0 or preferred > 65535:
        return servers.find_free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, preferred))
            return preferred
        except OSError:
            pass
    return servers.find_free_port()


def accepts(port):
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Demo:
    def __init__(self, args):
        self.args = args
        self.state_dir = None
        self.pg = None
        self.pg_standby = None
        self.maria = None
        self.maria_replica = None
        self.proxy = None
        self.pg_port = self.mysql_port = None
        self.pg_reader_port = self.mysql_reader_port = None  # the READ_ONLY proxy endpoints
        self.password = args.password

    # -- setting up -----------------------------------------------------------------------------
    def run(self):
        root = os.path.join(REPO, ".state", "demo")
        os.makedirs(root, exist_ok=True)
        self.state_dir = tempfile.mkdtemp(prefix="run-", dir=root)
        say("demo: state in %s" % os.path.relpath(self.state_dir, REPO))
        self.start_postgres()
        if self.want_mariadb():
            self.start_mariadb()
        config = self.write_config()
        self.start_proxy(config)
        self.write_current()
        self.print_tour()
        self.wait()

    def start_postgres(self):
        say("demo: starting PostgreSQL (initdb, max_connections=100) ...")
        self.pg = servers.PostgresServer(os.path.join(self.state_dir, "pg"), max_connections=100)
        self.pg.start()
        self.pg.create_user(USER, self.password, method="scram-sha-256")
        self.pg.create_database(DATABASE, owner=USER)
        say("demo: PostgreSQL listening on %s:%d" % (HOST, self.pg.port))
        say("demo: starting a PostgreSQL hot standby (pg_basebackup) ...")
        self.pg_standby = self.pg.start_standby(os.path.join(self.state_dir, "pg-standby"))
        say("demo: PostgreSQL standby listening on %s:%d" % (HOST, self.pg_standby.port))

    def want_mariadb(self):
        if self.args.no_mysql:
            return False
        if not os.path.exists(MYSQL_FRONTEND):
            say("demo: no MySQL frontend in txrdsproxy yet; MariaDB and the MYSQL proxy are skipped")
            return False
        missing = [b for b in servers.MARIADB_BINARIES if servers.find_binary(b) is None]
        if missing:
            say("demo: MariaDB not installed (%s missing); the MYSQL proxy is skipped" % ", ".join(missing))
            return False
        return True

    def start_mariadb(self):
        say("demo: starting MariaDB ...")
        try:
            maria = servers.MariaDBServer(os.path.join(self.state_dir, "mariadb"), max_connections=100,
                                          binlog=True)
            self.maria = maria
            maria.start()
            maria.create_user(USER, self.password, grant_all=False)
            maria.create_database(DATABASE)
            maria.mariadb("GRANT ALL PRIVILEGES ON `%s`.* TO '%s'@'%%'" % (DATABASE, USER))
            say("demo: MariaDB listening on %s:%d; starting a GTID replica ..." % (HOST, maria.port))
            self.maria_replica = maria.start_replica(os.path.join(self.state_dir, "mariadb-replica"))
        except servers.ServerError as e:
            say("demo: MariaDB did not start; going on without the MYSQL proxy:\n%s" % e)
            for server in (self.maria_replica, self.maria):
                if server is not None:
                    server.stop()
            self.maria = self.maria_replica = None
            return
        say("demo: MariaDB replica listening on %s:%d" % (HOST, self.maria_replica.port))

    def write_config(self):
        secrets = {PG_ARN: {"username": USER, "password": self.password}}
        self.pg_port = port_or_free(self.args.pg_port)
        self.pg_reader_port = port_or_free(self.pg_port + 1)
        proxies = [self._proxy("demo-pg", "POSTGRESQL", self.pg_port, PG_ARN, "POSTGRES_SCRAM_SHA_256",
                               [("pg-1", self.pg.port), ("pg-2", self.pg_standby.port)],
                               self.pg_reader_port)]
        if self.maria is not None:
            secrets[MYSQL_ARN] = {"username": USER, "password": self.password}
            self.mysql_port = port_or_free(self.args.mysql_port)
            self.mysql_reader_port = port_or_free(self.mysql_port + 1)
            proxies.append(self._proxy("demo-mysql", "MYSQL", self.mysql_port, MYSQL_ARN,
                                       "MYSQL_NATIVE_PASSWORD",
                                       [("mariadb-1", self.maria.port),
                                        ("mariadb-2", self.maria_replica.port)],
                                       self.mysql_reader_port))
        secrets_path = os.path.join(self.state_dir, "secrets.json")
        fd = os.open(secrets_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(secrets, f, indent=2)
            f.write("\n")
        self.admin_port = port_or_free(8089)
        config = {
            # Unsigned Describe* calls from loopback (the demo prints rdsproxy commands without
            # credentials); every change through the API still needs a signed request.
            "Admin": {"Listen": "tcp:%d:interface=%s" % (self.admin_port, HOST),
                      "AllowUnauthenticatedLoopbackReads": True},
            # Relative paths resolve against this file's folder.
            "Secrets": {"Backend": "file", "Path": "secrets.json"},
            "DBProxies": proxies,
        }
        path = os.path.join(self.state_dir, "rdsproxy.yaml")
        with open(path, "w") as f:
            f.write("# Written by scripts/demo.py; removed when the demo stops.\n")
            yaml.safe_dump(config, f, sort_keys=False, default_flow_style=False)
        return path

    @staticmethod
    def _proxy(name, engine, port, arn, auth_type, targets, reader_port):
        return {
            "DBProxyName": name,
            "EngineFamily": engine,
            "Listen": "tcp:%d:interface=%s" % (port, HOST),
            "RequireTLS": False,
            "IdleClientTimeout": 1800,
            "HealthCheckInterval": HEALTH_CHECK_INTERVAL,
            "Auth": [{"AuthScheme": "SECRETS", "SecretArn": arn, "IAMAuth": "DISABLED",
                      "ClientPasswordAuthType": auth_type}],
            "TargetGroups": [{
                "TargetGroupName": "default",
                "ConnectionPoolConfig": {
                    # 20% of max_connections=100: at most 20 database connections.
                    "MaxConnectionsPercent": 20,
                    "MaxIdleConnectionsPercent": 10,
                    "ConnectionBorrowTimeout": 30,
                    "SessionPinningFilters": [],
                    "InitQuery": "",
                },
                # The first is the writer at start; the health checks follow promotions.
                "Targets": [{"RdsResourceId": target_id, "Endpoint": HOST, "Port": target_port}
                            for target_id, target_port in targets],
            }],
            # A read-only endpoint: its sessions run on the standby/replica (never the writer).
            "Endpoints": [{"DBProxyEndpointName": name + "-ro", "TargetRole": "READ_ONLY",
                           "Listen": "tcp:%d:interface=%s" % (reader_port, HOST)}],
        }

    def start_proxy(self, config):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            raise SystemExit("demo: %s not found; run `make setup` first" % twistd)
        self.log_path = os.path.join(self.state_dir, "proxy.log")
        argv = [twistd, "-n", "--pidfile=", "rdsproxy", "--config", config]
        say("demo: starting the proxy: twistd -n --pidfile= rdsproxy --config %s"
            % os.path.relpath(config, REPO))
        with open(self.log_path, "ab") as log:
            # Its own session: the terminal's Ctrl-C reaches only us, and we stop it in order.
            self.proxy = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        ports = [p for p in (self.pg_port, self.mysql_port, self.pg_reader_port,
                             self.mysql_reader_port) if p is not None]
        deadline = time.monotonic() + 30
        while not all(accepts(p) for p in ports):
            if self.proxy.poll() is not None:
                raise SystemExit("demo: the proxy exited with status %s; its log:\n%s"
                                 % (self.proxy.returncode, self._log_tail()))
            if time.monotonic() > deadline:
                raise SystemExit("demo: the proxy does not accept connections after 30 s; its log:\n%s"
                                 % self._log_tail())
            time.sleep(0.1)

    def write_current(self):
        """.state/demo/current.json: what `demo.py failover` needs to reach the servers
        (mode 0600: it holds the demo's superuser passwords)."""
        state = {"pid": os.getpid(), "state_dir": self.state_dir,
                 "postgresql": {"primary": _pg_state(self.pg), "standby": _pg_state(self.pg_standby)}}
        if self.maria is not None:
            state["mysql"] = {"servers": [_maria_state(self.maria), _maria_state(self.maria_replica)]}
        fd = os.open(CURRENT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)

    def _log_tail(self, lines=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- the tour -------------------------------------------------------------------------------
    def print_tour(self):
        pw = self.password
        psql = 'PGPASSWORD=%s psql "host=%s port=%d user=%s dbname=%s"' % (
            pw, HOST, self.pg_port, USER, DATABASE)
        direct = 'PGPASSWORD=%s psql "host=%s port=%d user=postgres dbname=postgres"' % (
            self.pg.superuser_password, HOST, self.pg.port)
        say()
        say("=" * 78)
        say("txrdsproxy is running.  Connect through the proxy with:")
        say()
        say("  " + psql)
        if self.mysql_port is not None:
            say("  mariadb -h %s -P %d -u %s -p%s %s" % (HOST, self.mysql_port, USER, pw, DATABASE))
        say()
        say("Read-only endpoints (sessions run on the standby/replica; writes get its read-only error):")
        say()
        say('  PGPASSWORD=%s psql "host=%s port=%d user=%s dbname=%s"    # demo-pg-ro'
            % (pw, HOST, self.pg_reader_port, USER, DATABASE))
        if self.mysql_port is not None:
            say("  mariadb -h %s -P %d -u %s -p%s %s    # demo-mysql-ro"
                % (HOST, self.mysql_reader_port, USER, pw, DATABASE))
        say("  then: select pg_is_in_recovery(), inet_server_port();  /  select @@read_only, @@port;")
        say()
        say("Things to try:")
        say(" * Pooling: open two or three psql sessions as above and run in each")
        say("       select pg_backend_pid();")
        say("   The sessions share a few database backends: a backend serves whichever")
        say("   session has a transaction to run.  The database itself (direct, as superuser):")
        say('       %s \\' % direct)
        say("         -c \"select pid, state, query from pg_stat_activity where usename = 'app'\"")
        say(" * Transactions keep their backend: BEGIN; select pg_backend_pid(); ... COMMIT;")
        say(" * Pinning: in one session run")
        say("       SET work_mem = '8MB';")
        say("   From then on that session keeps one backend (pg_backend_pid() stays the same),")
        say("   other sessions still see work_mem = 4MB, and the proxy log says")
        say("   \"pinned, reason=set_variable\".")
        say(" * Tracked, not pinned: PGAPPNAME=tour %s" % psql)
        say("   then `show application_name;` -- each session sees its own value.")
        if self.mysql_port is not None:
            say(" * MySQL: select connection_id(); in two mariadb sessions shows the connection")
            say("   serving each; SET time_zone = '+02:00' in one does not pin, and the other")
            say("   session keeps its own @@time_zone.")
        say(" * The servers themselves (the proxy's targets; writer first):")
        say("       PostgreSQL primary %s:%d, hot standby %s:%d (user postgres, password %s)"
            % (HOST, self.pg.port, HOST, self.pg_standby.port, self.pg.superuser_password))
        if self.mysql_port is not None:
            say("       MariaDB primary %s:%d, GTID replica %s:%d (user root, password %s)"
                % (HOST, self.maria.port, HOST, self.maria_replica.port, self.maria.root_password))
        say(" * Failover: keep a session open through the proxy and run")
        say("       select inet_server_port();      -- psql,    then in another terminal:")
        say("       .venv/bin/python scripts/demo.py failover postgresql")
        if self.mysql_port is not None:
            say("       select @@port, @@hostname;      -- mariadb, then in another terminal:")
            say("       .venv/bin/python scripts/demo.py failover mysql")
        say("   then run the select again in the same session: it answers from the new writer")
        say("   (the MySQL one may be repeated to fail back, as in the RDS Proxy guide).")
        say(" * See it from the outside (management API, Prometheus metrics):")
        say("       .venv/bin/rdsproxy --endpoint-url http://%s:%d describe-db-proxies" % (HOST, self.admin_port))
        say("       .venv/bin/rdsproxy --endpoint-url http://%s:%d describe-db-proxy-targets --db-proxy-name demo-pg"
            % (HOST, self.admin_port))
        say("       .venv/bin/rdsproxy --endpoint-url http://%s:%d describe-db-proxy-endpoints" % (HOST, self.admin_port))
        say("       curl -s http://%s:%d/metrics | grep -v '^#'" % (HOST, self.admin_port))
        say()
        say("Proxy log:  tail -f %s" % os.path.relpath(self.log_path, REPO))
        say("Press Ctrl-C to stop the proxy and the databases (the state directory is removed).")
        say("=" * 78)

    def wait(self):
        while True:
            if self.proxy.poll() is not None:
                say("demo: the proxy exited with status %s; its log:\n%s"
                    % (self.proxy.returncode, self._log_tail()))
                return
            time.sleep(0.5)

    # -- tearing down ---------------------------------------------------------------------------
    def stop(self):
        if self.proxy is not None and self.proxy.poll() is None:
            say("demo: stopping the proxy")
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(15)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(5)
        _remove_current(self.state_dir)
        if self.maria is not None:
            say("demo: stopping MariaDB")
            for server in (self.maria_replica, self.maria):
                if server is not None:
                    server.stop()
        if self.pg is not None:
            say("demo: stopping PostgreSQL")
            for server in (self.pg_standby, self.pg):
                if server is not None:
                    server.stop()
        if self.state_dir is not None:
            if self.args.keep:
                say("demo: kept %s" % os.path.relpath(self.state_dir, REPO))
            else:
                shutil.rmtree(self.state_dir, ignore_errors=True)


def _pg_state(server):
    return {"base_dir": server.base_dir.as_posix(), "port": server.port,
            "superuser_password": server.superuser_password}


def _maria_state(server):
    return {"base_dir": server.base_dir.as_posix(), "port": server.port, "server_id": server.server_id,
            "root_password": server.root_password, "repl_password": server.repl_password}


def _remove_current(state_dir):
    try:
        with open(CURRENT) as f:
            mine = json.load(f).get("state_dir") == state_dir
    except (OSError, ValueError):
        return
    if mine:
        os.unlink(CURRENT)


def _load_current():
    try:
        with open(CURRENT) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise SystemExit("demo: no demo is running (no %s); start one with `make demo`"
                         % os.path.relpath(CURRENT, REPO))
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        raise SystemExit("demo: the demo that wrote %s is gone" % os.path.relpath(CURRENT, REPO))
    return state


def _pg_from(info):
    server = servers.PostgresServer(info["base_dir"], port=info["port"])
    server.superuser_password = info["superuser_password"]
    return server


def _maria_from(info):
    server = servers.MariaDBServer(info["base_dir"], port=info["port"], binlog=True,
                                   server_id=info["server_id"])
    server.root_password = info["root_password"]
    server.repl_password = info["repl_password"]
    return server


def failover_postgresql(state):
    """The primary stops (fast shutdown, as a crash would take it away) and the standby is
    promoted: the proxy loses its writer and finds the promoted standby at its next check."""
    info = state["postgresql"]
    primary, standby = _pg_from(info["primary"]), _pg_from(info["standby"])
    if standby.psql("select pg_is_in_recovery()").strip() != "t":
        raise SystemExit("demo: the standby was promoted already (PostgreSQL fails over once per demo)")
    pid_file = primary.data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    if pid is not None:
        say("demo: stopping the PostgreSQL primary (%s:%d, fast shutdown) ..." % (HOST, primary.port))
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while pid_file.exists():
            if time.monotonic() > deadline:
                raise SystemExit("demo: the primary did not stop within 60 s")
            time.sleep(0.05)
    say("demo: promoting the standby (%s:%d) ..." % (HOST, standby.port))
    standby.promote()
    say("demo: %s:%d is the PostgreSQL writer now" % (HOST, standby.port))


def failover_mysql(state):
    """A switchover: the writer goes read-only, the replica catches up and is promoted, the old
    writer replicates from it.  Run again to switch back."""
    if "mysql" not in state:
        raise SystemExit("demo: this demo runs no MariaDB")
    first, second = (_maria_from(i) for i in state["mysql"]["servers"])
    if first.mariadb("SELECT @@global.read_only").strip() == "0":
        writer, replica = first, second
    else:
        writer, replica = second, first
    say("demo: MariaDB %s:%d goes read-only; promoting %s:%d ..."
        % (HOST, writer.port, HOST, replica.port))
    writer.mariadb("SET GLOBAL read_only = 1")
    replica.sync_with(writer)
    replica.promote()
    writer.demote(replica)
    say("demo: %s:%d is the MariaDB writer now; %s:%d replicates from it"
        % (HOST, replica.port, HOST, writer.port))


def failover_main(argv):
    parser = argparse.ArgumentParser(prog="demo.py failover",
                                     description="Cause a failover in the running demo.")
    parser.add_argument("engine", choices=("postgresql", "mysql"))
    args = parser.parse_args(argv)
    state = _load_current()
    try:
        (failover_postgresql if args.engine == "postgresql" else failover_mysql)(state)
    except servers.ServerError as e:
        say("demo: failover failed: %s" % e)
        return 1
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["failover"]:
        return failover_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-port", type=int, default=PG_PROXY_PORT,
                        help="PostgreSQL proxy port (default %(default)s; a free one if taken)")
    parser.add_argument("--mysql-port", type=int, default=MYSQL_PROXY_PORT,
                        help="MySQL proxy port (default %(default)s; a free one if taken)")
    parser.add_argument("--no-mysql", action="store_true", help="do not start MariaDB")
    parser.add_argument("--password", default="app-demo-pw",
                        help="password of the database user app (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the state directory on exit")
    args = parser.parse_args(argv)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    demo = Demo(args)
    status = 0
    try:
        demo.run()
    except Stop as e:
        say("\ndemo: %s received" % e)
    except servers.ServerError as e:
        say("demo: %s" % e)
        status = 1
    except SystemExit as e:
        if e.code not in (None, 0):
            say(str(e.code))
            status = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        demo.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
