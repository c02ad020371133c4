#!/usr/bin/env python3
"""`make demo`: a local PostgreSQL 15 (and MariaDB) with txrdsproxy in front of it.

Starts the databases in a fresh directory under `.state/demo/`, writes a secrets file and a proxy
configuration there, runs `twistd -n rdsproxy --config ...` as a child process and prints the
command lines that connect through the proxy.  Ctrl-C (or SIGTERM) stops the proxy and every
server this script started, then removes the directory.

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


class Stop(Exception):
    """SIGINT/SIGTERM/SIGHUP arrived: shut everything down."""


def _on_signal(signum, frame):
    raise Stop(signal.Signals(signum).name)


def say(text=""):
    print(text, flush=True)


def port_or_free(preferred):
    """*preferred* if nothing listens there and we can bind it, else a free port."""
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
        self.maria = None
        self.proxy = None
        self.pg_port = self.mysql_port = None
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
        self.print_tour()
        self.wait()

    def start_postgres(self):
        say("demo: starting PostgreSQL (initdb, max_connections=100) ...")
        self.pg = servers.PostgresServer(os.path.join(self.state_dir, "pg"), max_connections=100)
        self.pg.start()
        self.pg.create_user(USER, self.password, method="scram-sha-256")
        self.pg.create_database(DATABASE, owner=USER)
        say("demo: PostgreSQL listening on %s:%d" % (HOST, self.pg.port))

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
            maria = servers.MariaDBServer(os.path.join(self.state_dir, "mariadb"), max_connections=100)
            self.maria = maria
            maria.start()
            maria.create_user(USER, self.password, grant_all=False)
            maria.create_database(DATABASE)
            maria.mariadb("GRANT ALL PRIVILEGES ON `%s`.* TO '%s'@'%%'" % (DATABASE, USER))
        except servers.ServerError as e:
            say("demo: MariaDB did not start; going on without the MYSQL proxy:\n%s" % e)
            if self.maria is not None:
                self.maria.stop()
            self.maria = None
            return
        say("demo: MariaDB listening on %s:%d" % (HOST, maria.port))

    def write_config(self):
        secrets = {PG_ARN: {"username": USER, "password": self.password}}
        self.pg_port = port_or_free(self.args.pg_port)
        proxies = [self._proxy("demo-pg", "POSTGRESQL", self.pg_port, PG_ARN, "POSTGRES_SCRAM_SHA_256",
                               "pg-1", self.pg.port)]
        if self.maria is not None:
            secrets[MYSQL_ARN] = {"username": USER, "password": self.password}
            self.mysql_port = port_or_free(self.args.mysql_port)
            proxies.append(self._proxy("demo-mysql", "MYSQL", self.mysql_port, MYSQL_ARN,
                                       "MYSQL_NATIVE_PASSWORD", "mariadb-1", self.maria.port))
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
    def _proxy(name, engine, port, arn, auth_type, target_id, target_port):
        return {
            "DBProxyName": name,
            "EngineFamily": engine,
            "Listen": "tcp:%d:interface=%s" % (port, HOST),
            "RequireTLS": False,
            "IdleClientTimeout": 1800,
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
                "Targets": [{"RdsResourceId": target_id, "Endpoint": HOST, "Port": target_port}],
            }],
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
        ports = [p for p in (self.pg_port, self.mysql_port) if p is not None]
        deadline = time.monotonic() + 30
        while not all(accepts(p) for p in ports):
            if self.proxy.poll() is not None:
                raise SystemExit("demo: the proxy exited with status %s; its log:\n%s"
                                 % (self.proxy.returncode, self._log_tail()))
            if time.monotonic() > deadline:
                raise SystemExit("demo: the proxy does not accept connections after 30 s; its log:\n%s"
                                 % self._log_tail())
            time.sleep(0.1)

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
        say(" * See it from the outside (management API, Prometheus metrics):")
        say("       .venv/bin/rdsproxy --endpoint-url http://%s:%d describe-db-proxies" % (HOST, self.admin_port))
        say("       .venv/bin/rdsproxy --endpoint-url http://%s:%d describe-db-proxy-targets --db-proxy-name demo-pg"
            % (HOST, self.admin_port))
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
        if self.maria is not None:
            say("demo: stopping MariaDB")
            self.maria.stop()
        if self.pg is not None:
            say("demo: stopping PostgreSQL")
            self.pg.stop()
        if self.state_dir is not None:
            if self.args.keep:
                say("demo: kept %s" % os.path.relpath(self.state_dir, REPO))
            else:
                shutil.rmtree(self.state_dir, ignore_errors=True)


def main(argv=None):
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
