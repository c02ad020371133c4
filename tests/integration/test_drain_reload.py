"""`twistd -n rdsproxy` as an operator runs it: SIGTERM drains under pgbench load (open
transactions finish, idle clients get the server's shutdown error, exit 0), and SIGHUP /
`rdsproxy reload` apply a changed file without dropping anyone it does not concern."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import yaml

try:
    from proxyutil import MD5_ARN, PGBENCH, TwistdProxy, client_env, find_free_port, write_proxy_config
except ImportError:
    from tests.integration.proxyutil import (MD5_ARN, PGBENCH, TwistdProxy, client_env, find_free_port,
                                             write_proxy_config)

SCRIPT = """\\set pause random(1, 30)
BEGIN;
INSERT INTO drain_log VALUES (:client_id, 1);
SELECT pg_sleep(:pause / 1000.0);
INSERT INTO drain_log VALUES (:client_id, 2);
COMMIT;
"""


def edit_config(path, change):
    data = yaml.safe_load(Path(path).read_text())
    change(data)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def test_sigterm_drains_under_pgbench(pg_server, tmp_path):
    pg_server.psql("DROP TABLE IF EXISTS drain_log; CREATE TABLE drain_log (client int, step int);"
                   " GRANT ALL ON drain_log TO appdb_owner", dbname="appdb")
    port = find_free_port()
    config = write_proxy_config(tmp_path, pg_server, listen=f"tcp:{port}:interface=127.0.0.1")
    edit_config(config, lambda d: d.update(DrainTimeout=20))
    proxy = TwistdProxy(config, port).start()
    script = tmp_path / "txn.sql"
    script.write_text(SCRIPT)
    bench = subprocess.Popen(
        [PGBENCH, "-n", "-c", "8", "-T", "60", "-f", str(script), "-h", "127.0.0.1", "-p", str(port),
         "-U", "app_scram", "appdb"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=client_env(pg_server.users["app_scram"]))
    try:
        deadline = time.monotonic() + 60
        while int(pg_server.psql("SELECT count(*) FROM drain_log WHERE step = 2", dbname="appdb").strip() or 0) < 40:
            assert bench.poll() is None, bench.stdout.read()
            assert time.monotonic() < deadline, "pgbench made no progress"
            time.sleep(0.1)
        status = proxy.stop(timeout=60)
        out, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
        proxy.stop()
    log = proxy.log()
    assert status == 0, log  # an orderly stop exits 0 (not -SIGTERM)
    assert "Received SIGTERM, draining" in log and "Traceback" not in log, log
    counted = pg_server.psql("SELECT step, count(*) FROM drain_log GROUP BY step", dbname="appdb")
    rows = dict(tuple(map(int, line.split("|"))) for line in counted.split())
    # Every transaction that began committed whole: the drain let it finish.
    assert rows[1] == rows[2], rows
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    failed = re.search(r"number of failed transactions: (\d+)", out)
    print(f"drain under pgbench: {processed} transactions committed, "
          f"{failed.group(1) if failed else 0} failed, {rows[1]} begun")
    # pgbench counts every transaction whose COMMIT it saw: none lost, none failed
    assert processed == rows[2], out
    assert failed is None or int(failed.group(1)) == 0, out
    # the clients were told, between transactions, with the server's own shutdown error
    assert "terminating connection due to administrator command" in out, out


def test_sighup_and_rdsproxy_reload(pg_server, tmp_path):
    port, admin = find_free_port(), find_free_port()
    config = write_proxy_config(tmp_path, pg_server, listen=f"tcp:{port}:interface=127.0.0.1")
    md5_auth = []

    def start_without_md5(d):
        d.update(Admin={"Listen": f"tcp:{admin}:interface=127.0.0.1"})
        auth = d["DBProxies"][0]["Auth"]
        md5_auth.extend(a for a in auth if a["SecretArn"] == MD5_ARN)
        d["DBProxies"][0]["Auth"] = [a for a in auth if a["SecretArn"] != MD5_ARN]
    edit_config(config, start_without_md5)
    assert md5_auth
    proxy = TwistdProxy(config, port).start()
    dsn = f"host=127.0.0.1 port={port} user=app_scram password={pg_server.users['app_scram']} dbname=appdb"
    md5_dsn = f"host=127.0.0.1 port={port} user=app_md5 password={pg_server.users['app_md5']} dbname=appdb"
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(md5_dsn).close()  # not an Auth entry of the proxy yet
        with psycopg.connect(dsn, autocommit=True) as kept:
            kept.execute("SET application_name = 'kept'")  # a pinned session the change does not concern
            # 1. SIGHUP: a new proxy starts and the idle timeout changes; the open session stays
            port2 = find_free_port()

            def add_proxy(d):
                second = yaml.safe_load(yaml.safe_dump(d["DBProxies"][0]))
                second["DBProxyName"] = "second-pg"
                second["Listen"] = f"tcp:{port2}:interface=127.0.0.1"
                d["DBProxies"].append(second)
                d["DBProxies"][0]["IdleClientTimeout"] = 600
                d["DBProxies"][0]["Auth"].extend(md5_auth)  # a new Auth entry
            edit_config(config, add_proxy)
            proxy.proc.send_signal(signal.SIGHUP)
            dsn2 = dsn.replace(f"port={port}", f"port={port2}")
            deadline = time.monotonic() + 20
            while True:
                try:
                    with psycopg.connect(dsn2) as conn:
                        assert conn.execute("select 2").fetchone() == (2,)
                    break
                except psycopg.OperationalError:
                    assert time.monotonic() < deadline, proxy.log()
                    time.sleep(0.1)
            assert kept.execute("show application_name").fetchone() == ("kept",)
            with psycopg.connect(md5_dsn) as conn:  # the new Auth entry works without a restart
                assert conn.execute("select current_user").fetchone() == ("app_md5",)

            # 2. an invalid file changes nothing and names the key path
            good = Path(config).read_text()
            edit_config(config, lambda d: d["DBProxies"][0].update(IdleClientTimeout="soon"))
            env = dict(os.environ, AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
            env.pop("AWS_ACCESS_KEY_ID")
            env.pop("AWS_SECRET_ACCESS_KEY")
            rdsproxy = [os.path.join(os.path.dirname(TwistdProxy.twistd()), "rdsproxy"),
                        "--endpoint-url", f"http://127.0.0.1:{admin}", "reload",
                        "--pidfile", str(tmp_path / "nope.pid")]
            out = subprocess.run(rdsproxy, capture_output=True, text=True, timeout=60, env=env)
            assert out.returncode == 255  # no such pid file
            proxy.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while "DBProxies[0].IdleClientTimeout: must be a number" not in proxy.log():
                assert time.monotonic() < deadline, proxy.log()
                time.sleep(0.1)
            assert "nothing changed" in proxy.log()
            assert kept.execute("select 1").fetchone() == (1,)

            # 3. the good file again through SIGHUP: all as before
            Path(config).write_text(good)
            proxy.proc.send_signal(signal.SIGHUP)
            with psycopg.connect(dsn2) as conn:
                assert conn.execute("select 3").fetchone() == (3,)
            assert kept.execute("show application_name").fetchone() == ("kept",)
    finally:
        status = proxy.stop()
    assert status == 0, proxy.log()
    assert "Traceback" not in proxy.log(), proxy.log()
