"""TargetHealth on real PostgreSQL, read with the real aws CLI and boto3 (issue 11 item 4).

One proxy, three targets over the session's PostgreSQL server and a closed port:
- pg-1: the server; no HealthCheck, and the FIRST Auth secret is a user the server does not know:
  the check must go on to the next Auth secret and find the target AVAILABLE (not AUTH_FAILURE);
- pg-2: a port nobody listens on: UNREACHABLE;
- pg-3: the same server, with a HealthCheck secret whose password is wrong: AUTH_FAILURE;
- pg-4: the same server, HealthCheck UserName app_scram and a Database that does not exist:
  CONNECTION_FAILED naming it (the check's database is the configured one);
and the proxy's own HealthCheck Database appdb, where pg-1's checks log in.
"""

import subprocess

try:
    from proxyutil import HOST, SCRAM_ARN, find_free_port
    from rdsapi_util import aws_env, client, start
    from test_admin import _script
except ImportError:
    from tests.integration.proxyutil import HOST, SCRAM_ARN, find_free_port
    from tests.integration.rdsapi_util import aws_env, client, start
    from tests.integration.test_admin import _script

GHOST_ARN = "arn:aws:secretsmanager:local:000000000000:secret:ghost"
WRONG_ARN = "arn:aws:secretsmanager:local:000000000000:secret:wrong-password"


def test_target_health_states_through_the_rds_api(pg_server, tmp_path):
    closed_port = find_free_port()

    def mutate(config, secrets):
        proxy = config["DBProxies"][0]
        secrets[GHOST_ARN] = {"username": "ghost_user", "password": "nobody-knows"}
        secrets[WRONG_ARN] = {"username": "app_scram", "password": "not-the-password"}
        proxy["Auth"].insert(0, {"SecretArn": GHOST_ARN, "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256"})
        proxy["HealthCheckInterval"] = 1
        proxy["HealthCheck"] = {"Database": "appdb"}
        targets = proxy["TargetGroups"][0]["Targets"]
        targets.append({"RdsResourceId": "pg-2", "Endpoint": HOST, "Port": closed_port})
        targets.append({"RdsResourceId": "pg-3", "Endpoint": pg_server.host, "Port": pg_server.port,
                        "HealthCheck": {"SecretArn": WRONG_ARN}})
        targets.append({"RdsResourceId": "pg-4", "Endpoint": pg_server.host, "Port": pg_server.port,
                        "HealthCheck": {"UserName": "app_scram", "Database": "no_such_db"}})

    proxy, endpoint, _ = start(tmp_path, pg_server, mutate=mutate)
    try:
        rds = client(endpoint)

        def health():
            return {t["RdsResourceId"]: t["TargetHealth"]
                    for t in rds.describe_db_proxy_targets(DBProxyName="test-pg")["Targets"]}

        proxy.wait_for(lambda: all(h["State"] != "REGISTERING" for h in health().values()),
                       timeout=20, what="every target checked")
        found = health()
        assert found["pg-1"] == {"State": "AVAILABLE"}, found
        assert found["pg-2"]["State"] == "UNAVAILABLE" and found["pg-2"]["Reason"] == "UNREACHABLE", found
        assert f"{HOST}:{closed_port}" in found["pg-2"]["Description"]
        assert found["pg-3"]["State"] == "UNAVAILABLE" and found["pg-3"]["Reason"] == "AUTH_FAILURE", found
        assert "password authentication failed" in found["pg-3"]["Description"]
        assert found["pg-4"]["Reason"] == "CONNECTION_FAILED", found  # the check's database is used
        assert 'database "no_such_db" does not exist' in found["pg-4"]["Description"]
        assert "not-the-password" not in str(found)  # secrets never appear in API output

        # The same through the real aws CLI, as the seed's "Verifying Connectivity" does.
        proc = subprocess.run(_script("aws") + ["rds", "describe-db-proxy-targets", "--db-proxy-name",
                                                "test-pg", "--endpoint-url", endpoint, "--output", "text",
                                                "--query", "Targets[].[RdsResourceId,Role,TargetHealth.State,"
                                                "TargetHealth.Reason]"],
                              capture_output=True, text=True, timeout=120, env=aws_env())
        assert proc.returncode == 0, proc.stderr
        rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
        assert rows == [["pg-1", "READ_WRITE", "AVAILABLE", "None"],
                        ["pg-2", "READ_ONLY", "UNAVAILABLE", "UNREACHABLE"],
                        ["pg-3", "READ_ONLY", "UNAVAILABLE", "AUTH_FAILURE"],
                        ["pg-4", "READ_ONLY", "UNAVAILABLE", "CONNECTION_FAILED"]]

        # The writer stays usable throughout: a client through the proxy writes on pg-1.
        import psycopg
        with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as conn:
            assert conn.execute("SELECT inet_server_port(), current_database()").fetchone() == (
                pg_server.port, "appdb")
    finally:
        proxy.stop()


def test_no_free_connection_slot_is_pending_proxy_capacity(pg_server_factory, pg_proxy_factory):
    """A database with every connection slot taken refuses the proxy with 53300: the target is
    UNAVAILABLE / PENDING_PROXY_CAPACITY (not CONNECTION_FAILED), and AVAILABLE again once a
    slot is free."""
    import psycopg
    import pytest
    server = pg_server_factory(max_connections=4, settings={"superuser_reserved_connections": 1})
    server.create_user("app_scram", "capacity-pass", method="scram-sha-256")
    server.create_database("appdb", owner="app_scram")
    proxy = pg_proxy_factory(server=server)
    ctx = proxy.ctx

    def health():
        record = ctx.health.health_of(ctx.topology.targets[0])
        return record.state, record.reason, record.description

    holders = [psycopg.connect(host=server.host, port=server.port, user="app_scram",
                               password="capacity-pass", dbname="appdb") for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(proxy.dsn(server))
        # 53300: "sorry, too many clients already", or the slots left are the superuser's
        full = ("too many clients", "remaining connection slots are reserved")
        assert any(text in str(info.value) for text in full), str(info.value)
        state, reason, description = proxy.call(health)
        assert (state, reason) == ("UNAVAILABLE", "PENDING_PROXY_CAPACITY")
        assert any(text in description for text in full), description
        holders.pop().close()
        with psycopg.connect(proxy.dsn(server)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert proxy.call(health)[0] == "AVAILABLE"
    finally:
        for conn in holders:
            conn.close()
