"""Every API operation while 100 sessions (real psycopg and PyMySQL connections) stay open on the
proxies: after each operation every session still answers; changes take effect live (a created
proxy listens, a lower cap applies, a registered target serves, a deregistered one is left after
the open transaction on it commits); and the file holds every change for the next start."""

import socket

import psycopg
import pymysql
import pytest
import yaml

try:
    from rdsapi_util import ACCOUNT, client, start
    from proxyutil import HOST, SCRAM_ARN, InProcessProxy
except ImportError:
    from tests.integration.rdsapi_util import ACCOUNT, client, start
    from tests.integration.proxyutil import HOST, SCRAM_ARN, InProcessProxy

PG_SESSIONS, MY_SESSIONS = 70, 30


def test_100_sessions_survive_every_operation(pg_server, mariadb_server, tmp_path):
    pg_server.psql("DROP TABLE IF EXISTS live_log; CREATE TABLE live_log (n int);"
                   " GRANT ALL ON live_log TO appdb_owner", dbname="appdb")
    proxy, endpoint, path = start(tmp_path, pg_server, mariadb_server=mariadb_server)
    rds = client(endpoint)
    registry = proxy.service.registry
    pg_port, my_port = proxy.ports
    pg_sessions, my_sessions = [], []
    try:
        for _ in range(PG_SESSIONS):
            pg_sessions.append(psycopg.connect(
                host=HOST, port=pg_port, user="app_scram", password=pg_server.users["app_scram"],
                dbname="appdb", autocommit=True, prepare_threshold=None))  # (prepared: pinned)
        for _ in range(MY_SESSIONS):
            my_sessions.append(pymysql.connect(
                host=HOST, port=my_port, user="app_native", password=mariadb_server.users["app_native"],
                database="appdb", autocommit=True))

        def all_work(step):
            for i, conn in enumerate(pg_sessions):
                try:
                    assert conn.execute("select %s::int", (i,)).fetchone() == (i,), step
                except Exception:
                    pool = registry.get(name).ctx.pool
                    print(step, i, proxy.call(lambda: [(c, c.state) for c in pool.connections()]),
                          proxy.call(lambda: (pool.max_connections, pool.waiting, pool._stalled)))
                    print(proxy.logs.text()[-6000:])
                    raise
            for i, conn in enumerate(my_sessions):
                with conn.cursor() as cur:
                    cur.execute("select %s", (i,))
                    assert cur.fetchone() == (i,), step
            assert proxy.call(lambda: len(registry.get(name).ctx.sessions)) == PG_SESSIONS
            assert proxy.call(lambda: len(registry.get("test-my").ctx.sessions)) == MY_SESSIONS

        name = "test-pg"
        all_work("start")
        auth = [{"AuthScheme": "SECRETS", "SecretArn": SCRAM_ARN,
                 "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256"}]
        rds.create_db_proxy(DBProxyName="extra-pg", EngineFamily="POSTGRESQL", Auth=auth,
                            RoleArn=f"arn:aws:iam::{ACCOUNT}:role/proxy", VpcSubnetIds=["s-1"])
        rds.register_db_proxy_targets(DBProxyName="extra-pg", DBInstanceIdentifiers=["pg-2"])
        extra_port = proxy.call(lambda: registry.get("extra-pg").port.getHost().port)
        with psycopg.connect(host=HOST, port=extra_port, user="app_scram",
                             password=pg_server.users["app_scram"], dbname="appdb") as extra:
            assert extra.execute("select 7").fetchone() == (7,)
        all_work("create-db-proxy")
        assert len(rds.describe_db_proxies()["DBProxies"]) == 3
        all_work("describe")
        rds.modify_db_proxy(DBProxyName=name, IdleClientTimeout=900, DebugLogging=True)
        all_work("modify-db-proxy")
        rds.modify_db_proxy_target_group(DBProxyName=name, TargetGroupName="default",
                                         ConnectionPoolConfig={"MaxConnectionsPercent": 20,
                                                               "MaxIdleConnectionsPercent": 10})
        assert proxy.call(lambda: registry.get(name).ctx.pool.max_connections) == 20
        all_work("modify-db-proxy-target-group")
        # the lower cap holds: every connection came back under it
        assert proxy.call(lambda: len(registry.get(name).ctx.pool.connections())) <= 20
        rds.modify_db_proxy_target_group(DBProxyName="test-my", TargetGroupName="default",
                                         ConnectionPoolConfig={"ConnectionBorrowTimeout": 60})
        all_work("modify the MySQL target group")

        # register pg-2 (the same server under another id), then deregister the writer pg-1
        # while a session has a transaction open on it: that transaction commits
        rds.register_db_proxy_targets(DBProxyName=name, DBInstanceIdentifiers=["pg-2"])
        # two targets now: the health checks probe the new one at once and it joins
        proxy.wait_for(lambda: {t["RdsResourceId"]: t["TargetHealth"]["State"] for t in
                                rds.describe_db_proxy_targets(DBProxyName=name)["Targets"]}.get("pg-2")
                       == "AVAILABLE", what="pg-2 AVAILABLE")
        all_work("register-db-proxy-targets")
        pinned = psycopg.connect(host=HOST, port=pg_port, user="app_scram", autocommit=True,
                                 password=pg_server.users["app_scram"], dbname="appdb")
        pinned.execute("SET application_name = 'pinned'")  # pins: holds its pg-1 connection
        in_txn = pg_sessions[0]
        in_txn.execute("BEGIN")
        in_txn.execute("INSERT INTO live_log VALUES (1)")
        held = proxy.call(lambda: registry.get(name).ctx.pool.connections())
        rds.deregister_db_proxy_targets(DBProxyName=name, DBInstanceIdentifiers=["pg-1"])
        in_txn.execute("INSERT INTO live_log VALUES (2)")
        in_txn.execute("COMMIT")
        assert pg_server.psql("SELECT count(*) FROM live_log", dbname="appdb").strip() == "2"
        # the pinned session on the deregistered target was ended with the shutdown error
        with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
            pinned.execute("select 1")
        pinned.close()
        targets = proxy.call(lambda: {getattr(c, "target", None) and c.target.rds_resource_id
                                      for c in registry.get(name).ctx.pool.connections()})
        assert "pg-1" not in targets  # no connection to the deregistered target is kept
        assert all(c.state == "closed" for c in held if getattr(c, "target", None) is not None
                   and c.target.rds_resource_id == "pg-1")
        all_work("deregister-db-proxy-targets")

        rds.modify_db_proxy(DBProxyName=name, NewDBProxyName="renamed-pg")
        name = "renamed-pg"
        all_work("rename")
        rds.delete_db_proxy(DBProxyName="extra-pg")
        proxy.wait_for(lambda: not proxy.call(lambda: registry.name_taken("extra-pg")) and
                       _closed(extra_port), what="extra-pg gone")
        all_work("delete-db-proxy")
    finally:
        for conn in pg_sessions + my_sessions:
            try:
                conn.close()
            except Exception:
                pass
        proxy.stop()

    # -- persistence: the file holds every change; a new process starts with them --------------------
    data = yaml.safe_load(open(path))
    proxies = {p["DBProxyName"]: p for p in data["DBProxies"]}
    assert sorted(proxies) == ["renamed-pg", "test-my"]
    renamed = proxies["renamed-pg"]
    assert renamed["IdleClientTimeout"] == 900 and renamed["DebugLogging"] is True
    assert renamed["TargetGroups"][0]["ConnectionPoolConfig"]["MaxConnectionsPercent"] == 20
    assert [t["RdsResourceId"] for t in renamed["TargetGroups"][0]["Targets"]] == ["pg-2"]
    again = InProcessProxy(path)
    try:
        assert again.call(lambda: sorted(r.name for r in again.service.registry)) == ["renamed-pg", "test-my"]
        with psycopg.connect(host=HOST, port=again.ports[0], user="app_scram",
                             password=pg_server.users["app_scram"], dbname="appdb") as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        again.stop()


def _closed(port):
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((HOST, port)) != 0


def test_deleting_a_mysql_proxy_drains_its_sessions(pg_server, mariadb_server, tmp_path):
    """DeleteDBProxy on a MySQL proxy: an idle session gets MariaDB's own shutdown error (an
    unsolicited ERR 1053, sequence 0) and the close; a session inside a transaction commits it
    first; the PostgreSQL proxy's sessions are not touched."""
    proxy, endpoint, path = start(tmp_path, pg_server, mariadb_server=mariadb_server)
    rds = client(endpoint)
    pg_port, my_port = proxy.ports
    login = dict(host=HOST, port=my_port, user="app_native", password=mariadb_server.users["app_native"],
                 database="appdb", autocommit=True)
    try:
        with pymysql.connect(**login) as setup:
            with setup.cursor() as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS drain_my (n int)")
                cur.execute("DELETE FROM drain_my")
        idle = pymysql.connect(**login)
        busy = pymysql.connect(**login)
        other = psycopg.connect(host=HOST, port=pg_port, user="app_scram", dbname="appdb",
                                password=pg_server.users["app_scram"])
        with busy.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("INSERT INTO drain_my VALUES (1)")
        rds.delete_db_proxy(DBProxyName="test-my")
        # the idle session: an unsolicited ERR packet, sequence 0, code 1053, then EOF
        # (read from PyMySQL's socket: the driver itself reports it as a lost connection)
        sock = idle._sock
        sock.settimeout(10)
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data[3] == 0 and data[4] == 0xFF, data
        assert int.from_bytes(data[5:7], "little") == 1053 and b"Server shutdown in progress" in data
        # the session in a transaction finishes it, then is ended
        with busy.cursor() as cur:
            cur.execute("INSERT INTO drain_my VALUES (2)")
            cur.execute("COMMIT")
        with pytest.raises(pymysql.err.OperationalError):  # ended once the transaction is over
            with busy.cursor() as cur:
                cur.execute("select 1")
        direct = pymysql.connect(host=mariadb_server.host, port=mariadb_server.port, user="app_native",
                                 password=mariadb_server.users["app_native"], database="appdb")
        with direct.cursor() as cur:
            cur.execute("SELECT count(*) FROM drain_my")
            assert cur.fetchone() == (2,)
        direct.close()
        assert other.execute("select 1").fetchone() == (1,)  # another proxy: untouched
        other.close()
    finally:
        proxy.stop()
