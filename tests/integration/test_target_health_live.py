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
