"""The server fixtures start real servers with working password authentication."""

import time

import pytest

try:
    from servers import ServerError
except ImportError:
    from tests.integration.servers import ServerError


@pytest.mark.parametrize("user", ["app_scram", "app_md5"])
def test_pg_password_login(pg_server, user):
    password = pg_server.users[user]
    out = pg_server.psql("SELECT current_user", user=user, dbname="appdb", password=password)
    assert out.strip() == user


@pytest.mark.parametrize("user", ["app_scram", "app_md5"])
def test_pg_wrong_password_fails(pg_server, user):
    with pytest.raises(ServerError, match="password authentication failed"):
        pg_server.psql("SELECT 1", user=user, password="wrong-password")


def test_pg_users_use_their_auth_method(pg_server):
    hashes = pg_server.psql(
        "SELECT rolname || ' ' || split_part(rolpassword, '$', 1) FROM pg_authid "
        "WHERE rolname IN ('app_scram', 'app_md5') ORDER BY rolname")
    lines = hashes.split()
    assert lines[0] == "app_md5" and lines[1].startswith("md5")
    assert lines[2:] == ["app_scram", "SCRAM-SHA-256"]
    hba = pg_server.psql(
        "SELECT user_name[1] || ' ' || auth_method FROM pg_hba_file_rules "
        "WHERE user_name[1] IN ('app_scram', 'app_md5') ORDER BY 1")
    assert hba.splitlines() == ["app_md5 md5", "app_scram scram-sha-256"]


def test_pg_app_users_own_appdb(pg_server):
    pg_server.psql("CREATE TABLE IF NOT EXISTS t_scram (x int)", user="app_scram", dbname="appdb")
    pg_server.psql("CREATE TABLE IF NOT EXISTS t_md5 (x int)", user="app_md5", dbname="appdb")
    assert pg_server.psql("SELECT current_setting('max_connections')").strip() == "100"


def test_pg_dsn_is_usable_by_a_driver(pg_server):
    import psycopg  # test extras: a missing driver must fail, not skip
    with psycopg.connect(pg_server.dsn("app_scram", dbname="appdb")) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "app_scram"


def test_pg_server_factory_max_connections(pg_server_factory):
    server = pg_server_factory(max_connections=7)
    assert server.psql("SHOW max_connections").strip() == "7"
    server.set_max_connections(9)
    assert server.psql("SHOW max_connections").strip() == "9"


def test_pg_standby_replicates_and_promotes(pg_server_factory, tmp_path):
    primary = pg_server_factory(max_connections=20)
    primary.create_user("app_scram", "standby-pass", method="scram-sha-256")
    primary.psql("CREATE TABLE replicated (x int); INSERT INTO replicated VALUES (42)")
    standby = primary.start_standby(tmp_path / "standby")
    try:
        assert standby.psql("SELECT pg_is_in_recovery()").strip() == "t"
        deadline = time.monotonic() + 30
        while True:
            try:
                if standby.psql("SELECT x FROM replicated").strip() == "42":
                    break
            except ServerError:
                pass
            assert time.monotonic() < deadline, "row never reached the standby"
            time.sleep(0.1)
        with pytest.raises(ServerError, match="read-only"):
            standby.psql("INSERT INTO replicated VALUES (1)")
        # Users and their auth methods come along with the base backup.
        assert standby.psql("SELECT current_user", user="app_scram").strip() == "app_scram"

        primary.stop()
        standby.promote()
        assert standby.psql("SELECT pg_is_in_recovery()").strip() == "f"
        standby.psql("INSERT INTO replicated VALUES (43)")
        assert standby.psql("SELECT count(*) FROM replicated").strip() == "2"
    finally:
        standby.stop()


def test_mariadb_native_login(mariadb_server):
    out = mariadb_server.mariadb("SELECT CURRENT_USER(), DATABASE()", user="app_native",
                                 database="appdb")
    assert out.strip().split("\t") == ["app_native@%", "appdb"]
    plugin = mariadb_server.mariadb(
        "SELECT plugin FROM mysql.user WHERE user = 'app_native'").strip()
    assert plugin == "mysql_native_password"


def test_mariadb_wrong_password_fails(mariadb_server):
    with pytest.raises(ServerError, match="Access denied"):
        mariadb_server.mariadb("SELECT 1", user="app_native", password="wrong-password")


def test_mariadb_root_and_driver(mariadb_server):
    import pymysql
    assert mariadb_server.mariadb("SELECT @@max_connections").strip() == "100"
    conn = pymysql.connect(host=mariadb_server.host, port=mariadb_server.port,
                           user="app_native", password=mariadb_server.users["app_native"],
                           database="appdb")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 + 1")
            assert cur.fetchone()[0] == 2
    finally:
        conn.close()


def test_mariadb_replica_replicates_promotes_and_demotes(mariadb_replication_factory):
    import pymysql
    primary, (replica,) = mariadb_replication_factory()
    status = replica.slave_status()
    assert (status["Slave_IO_Running"], status["Slave_SQL_Running"], status["Using_Gtid"]) == (
        "Yes", "Yes", "Slave_Pos")
    assert replica.mariadb("SELECT @@global.read_only, @@global.log_bin").split() == ["1", "1"]
    assert primary.mariadb("SELECT @@global.read_only").strip() == "0"
    primary.mariadb("CREATE TABLE appdb.rep (x int primary key); INSERT INTO appdb.rep VALUES (1)",
                    user="app_native")
    replica.sync_with(primary)
    assert replica.mariadb("SELECT x FROM appdb.rep", user="app_native").split() == ["1"]
    # the application account cannot write to the replica (no READ_ONLY ADMIN)
    conn = pymysql.connect(host=replica.host, port=replica.port, user="app_native",
                           password=replica.users["app_native"], database="appdb")
    try:
        with conn.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as e:
            cur.execute("INSERT INTO rep VALUES (2)")
        assert e.value.args[0] == 1290  # ER_OPTION_PREVENTS_STATEMENT (--read-only)
    finally:
        conn.close()

    # failover: the replica becomes the writer, the old primary replicates from it
    replica.promote()
    assert replica.slave_status() == {}
    replica.mariadb("INSERT INTO appdb.rep VALUES (3)", user="app_native")
    primary.demote(replica)
    primary.sync_with(replica)
    assert primary.mariadb("SELECT x FROM appdb.rep ORDER BY x").split() == ["1", "3"]
    assert primary.mariadb("SELECT @@global.read_only").strip() == "1"
    assert primary.slave_status()["Master_Port"] == str(replica.port)

    # and back again (the seed's example fails over twice)
    primary.promote()
    replica.demote(primary)
    primary.mariadb("INSERT INTO appdb.rep VALUES (4)", user="app_native")
    replica.sync_with(primary)
    assert replica.mariadb("SELECT x FROM appdb.rep ORDER BY x").split() == ["1", "3", "4"]
    replica.restart()  # read-only and replicating after a restart too
    replica.sync_with(primary)
    assert replica.mariadb("SELECT @@global.read_only").strip() == "1"
    assert replica.slave_status()["Slave_SQL_Running"] == "Yes"
