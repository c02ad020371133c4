"""IAMAuth REQUIRED end to end: tokens made by the real AWS tooling (boto3's
generate_db_auth_token and `aws rds generate-db-auth-token`), sent as the password by psql,
psycopg, PyMySQL and the mariadb CLI over TLS; the proxy then logs in to the database with the
secret's password.  Refusals carry RDS Proxy's texts."""

import json
import os
import shutil
import ssl
import subprocess
import sys

import boto3
import psycopg
import pymysql
import pytest
import yaml

try:
    from proxyutil import InProcessProxy, client_env
except ImportError:
    from tests.integration.proxyutil import InProcessProxy, client_env

from txrdsproxy.testing.certs import write_self_signed
from txrdsproxy.testing.secretscan import SecretScan

REGION, ACCOUNT = "us-east-1", "000000000000"
AKID, SECRET_KEY = "AKIAEXAMPLEIAMTEST01", "iam-test-secret/key+0123456789abcdefghij"
DENIED_AKID = "AKIAEXAMPLEIAMDENY01"
DB_ARN = "arn:aws:secretsmanager:local:000000000000:secret:db-user"
KEY_ARN = "arn:aws:secretsmanager:local:000000000000:secret:iam-app-key"
DENY_KEY_ARN = "arn:aws:secretsmanager:local:000000000000:secret:iam-deny-key"


SCAN = SecretScan()


@pytest.fixture(scope="module", autouse=True)
def no_secret_in_any_log_line():
    """Every log event of this module's tests is scanned for the secrets they use (item 13)."""
    SCAN.install()
    yield SCAN
    SCAN.uninstall()
    SCAN.check()


def write_iam_proxy(folder, engine, user, password, target, iam_required=True):
    SCAN.add(password, SECRET_KEY)
    """A proxy with client TLS, one Auth entry (IAMAuth REQUIRED) for *user*, and two principals:
    one allowed rds-db:connect on any proxy's *user*, one explicitly denied."""
    cert, key = write_self_signed(str(folder), "proxy")
    (folder / "secrets.json").write_text(json.dumps({
        DB_ARN: {"username": user, "password": password},
        KEY_ARN: {"secret_access_key": SECRET_KEY},
        DENY_KEY_ARN: {"secret_access_key": SECRET_KEY},
    }))
    os.chmod(folder / "secrets.json", 0o600)
    config = {
        "Secrets": {"Backend": "file", "Path": "secrets.json"},
        "IAM": {"Region": REGION, "AccountId": ACCOUNT, "Principals": [
            {"Arn": f"arn:aws:iam::{ACCOUNT}:user/app",
             "AccessKeys": [{"AccessKeyId": AKID, "SecretArn": KEY_ARN}],
             "Policies": [{"Version": "2012-10-17", "Statement": [
                 {"Effect": "Allow", "Action": "rds-db:connect",
                  "Resource": f"arn:aws:rds-db:{REGION}:{ACCOUNT}:dbuser:prx-*/{user}"}]}]},
            {"Arn": f"arn:aws:iam::{ACCOUNT}:user/denied",
             "AccessKeys": [{"AccessKeyId": DENIED_AKID, "SecretArn": DENY_KEY_ARN}],
             "Policies": [{"Version": "2012-10-17", "Statement": [
                 {"Effect": "Allow", "Action": "*", "Resource": "*"},
                 {"Effect": "Deny", "Action": "rds-db:connect", "Resource": "*"}]}]},
        ]},
        "DBProxies": [{
            "DBProxyName": "iam-" + engine.lower(),
            "EngineFamily": engine,
            "Listen": "tcp:0:interface=127.0.0.1",
            "TLS": {"CertificateFile": cert, "PrivateKeyFile": key},
            "DatabaseTLS": {"Mode": "disable"},  # the test databases have no TLS
            "Auth": [{"SecretArn": DB_ARN, "IAMAuth": "REQUIRED" if iam_required else "DISABLED"}],
            "TargetGroups": [{"TargetGroupName": "default", "Targets": [target]}],
        }],
    }
    path = folder / "proxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def token(proxy, user, akid=AKID, host="127.0.0.1", port=None):
    client = boto3.client("rds", region_name=REGION, aws_access_key_id=akid,
                          aws_secret_access_key=SECRET_KEY)
    made = client.generate_db_auth_token(DBHostname=host, Port=port or proxy.port, DBUsername=user)
    SCAN.add(SECRET_KEY, made, made.rsplit("=", 1)[1])
    return made


@pytest.fixture
def pg_iam(pg_server, tmp_path, request):
    target = {"RdsResourceId": "pg-1", "Endpoint": pg_server.host, "Port": pg_server.port}
    proxy = InProcessProxy(write_iam_proxy(tmp_path, "POSTGRESQL", "app_scram",
                                           pg_server.users["app_scram"], target))
    request.addfinalizer(proxy.stop)
    return proxy


@pytest.fixture
def my_iam(mariadb_server, tmp_path, request):
    target = {"RdsResourceId": "my-1", "Endpoint": mariadb_server.host, "Port": mariadb_server.port}
    proxy = InProcessProxy(write_iam_proxy(tmp_path, "MYSQL", "app_native",
                                           mariadb_server.users["app_native"], target))
    request.addfinalizer(proxy.stop)
    return proxy


def pg_connect(proxy, password, sslmode="require"):
    return psycopg.connect(host=proxy.host, port=proxy.port, user="app_scram", password=password,
                           dbname="appdb", sslmode=sslmode, autocommit=True, connect_timeout=20)


def pg_refusal(proxy, password, sslmode="require"):
    with pytest.raises(psycopg.OperationalError) as info:
        pg_connect(proxy, password, sslmode).close()
    return str(info.value)


# -- PostgreSQL ------------------------------------------------------------------------------------

def test_psycopg_with_a_boto3_token(pg_iam, pg_server):
    with pg_connect(pg_iam, token(pg_iam, "app_scram")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app_scram",)
        assert conn.pgconn.ssl_in_use
    # localhost is one of the proxy's names on loopback
    with pg_connect(pg_iam, token(pg_iam, "app_scram", host="localhost")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "IAM authentication of app_scram as arn:aws:iam::000000000000:user/app" in pg_iam.logs.text()


def test_psql_with_an_aws_cli_token(pg_iam, pg_server):
    beside = os.path.join(os.path.dirname(sys.executable), "aws")  # the test extra's awscli
    aws = beside if os.access(beside, os.X_OK) else shutil.which("aws")
    if aws is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the aws CLI is missing (pip install awscli)")
        pytest.skip("the aws CLI is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=AKID, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION,
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    made = subprocess.run([aws, "rds", "generate-db-auth-token", "--hostname", "127.0.0.1",
                           "--port", str(pg_iam.port), "--username", "app_scram", "--region", REGION],
                          capture_output=True, text=True, timeout=60, env=env)
    assert made.returncode == 0, made.stderr
    cli_token = made.stdout.strip()
    SCAN.add(cli_token, cli_token.rsplit("=", 1)[1])
    out = subprocess.run(["psql", "-X", "-h", pg_iam.host, "-p", str(pg_iam.port), "-U", "app_scram",
                          "-d", "appdb", "-tAc", "SELECT 'iam-ok'"], capture_output=True, text=True,
                         timeout=60, env=client_env(cli_token, PGSSLMODE="require"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "iam-ok"


def test_pg_refusals_carry_the_rds_texts(pg_iam, pg_server):
    good = token(pg_iam, "app_scram")
    text = pg_refusal(pg_iam, good, sslmode="disable")
    assert "IAM authentication is allowed only with SSL connections." in text
    # the database password is not a token: an IAM user cannot use it
    text = pg_refusal(pg_iam, pg_server.users["app_scram"])
    assert "IAM authentication failed for user app_scram. Check the IAM token for this user and try again." in text
    text = pg_refusal(pg_iam, token(pg_iam, "app_scram", port=pg_iam.port + 1))
    assert "IAM authentication failed for user app_scram" in text
    text = pg_refusal(pg_iam, token(pg_iam, "app_scram", akid=DENIED_AKID))
    assert "The IAM authentication failed for the role app_scram. Check the IAM token for this role" in text
    logs = pg_iam.logs.text()
    assert "explicitly denied" in logs and good.rsplit("=", 1)[1] not in logs


def test_pg_too_many_competing_requests(pg_iam, pg_server):
    pg_iam.call(lambda: setattr(pg_iam.service.registry.iam, "max_concurrent", 0))
    text = pg_refusal(pg_iam, token(pg_iam, "app_scram"))
    assert "The IAM authentication failed because of too many competing requests." in text


# -- MySQL -----------------------------------------------------------------------------------------

def _tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def my_connect(proxy, password, tls=True):
    kw = {"ssl": _tls()} if tls else {"ssl_disabled": True}
    return pymysql.connect(host=proxy.host, port=proxy.port, user="app_native", password=password,
                           database="appdb", autocommit=True, connect_timeout=20, **kw)


def test_pymysql_with_a_token(my_iam, mariadb_server):
    conn = my_connect(my_iam, token(my_iam, "app_native"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER() LIKE 'app_native@%'")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


def test_mariadb_cli_with_a_token(my_iam, mariadb_server):
    cmd = ["mariadb", "--no-defaults", "--protocol=TCP", "-h", my_iam.host, "-P", str(my_iam.port),
           "-u", "app_native", "--ssl", "--batch", "--skip-column-names",
           "-e", "SELECT 'iam-cli-ok'"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, MYSQL_PWD=token(my_iam, "app_native")))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "iam-cli-ok"


def test_mysql_refusals(my_iam, mariadb_server):
    with pytest.raises(pymysql.err.OperationalError) as info:
        my_connect(my_iam, token(my_iam, "app_native"), tls=False).close()
    assert info.value.args[0] == 1045 and "allowed only with SSL connections" in info.value.args[1]
    with pytest.raises(pymysql.err.OperationalError) as info:
        my_connect(my_iam, mariadb_server.users["app_native"]).close()
    assert info.value.args == (1045, "Access denied for user 'app_native'@'%' (using password: YES)")
    my_iam.call(lambda: setattr(my_iam.service.registry.iam, "max_concurrent", 0))
    with pytest.raises(pymysql.err.OperationalError) as info:
        my_connect(my_iam, token(my_iam, "app_native")).close()
    assert info.value.args == (1040, "IAM authentication rate limit exceeded")
