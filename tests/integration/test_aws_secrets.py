"""Secrets Backend aws against a real local Secrets Manager endpoint (moto in server mode, started
like the databases): logins with the secret's credentials, a rotation (new database connections
use the new password, open sessions stay), the last good value kept while the endpoint is down,
and a new Auth entry picked up by a reload through the internal API."""

import json
import os
import socket
import subprocess
import sys
import time

import boto3
import psycopg
import pytest
import yaml

try:
    from proxyutil import InProcessProxy
    from servers import find_free_port
except ImportError:
    from tests.integration.proxyutil import InProcessProxy
    from tests.integration.servers import find_free_port

from txrdsproxy.testing.secretscan import SecretScan

REGION = "us-east-1"


SCAN = SecretScan()


@pytest.fixture(scope="module", autouse=True)
def no_secret_in_any_log_line():
    """Every log event of this module's tests is scanned for the secrets they use (item 13)."""
    SCAN.install()
    SCAN.add("aws-rot-old-1", "aws-rot-new-2", "aws_first-pw", "aws_second-pw")
    yield SCAN
    SCAN.uninstall()
    SCAN.check()
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


class MotoServer:
    """moto_server on a free loopback port, for the duration of the module."""

    def __init__(self, log_path):
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.start()

    def start(self):
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        if not os.access(exe, os.X_OK):
            if os.environ.get("CI") == "true":
                pytest.fail("moto_server missing (the test extra installs moto[server])")
            pytest.skip("moto_server is not installed")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120  # against a hang: moto's imports are slow on a loaded CI
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def client(self):
        return boto3.client("secretsmanager", region_name=REGION, endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory, request):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    request.addfinalizer(server.stop)
    return server


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


def write_config(folder, moto, pg_server, arns):
    config = {
        "Secrets": {"Backend": "aws", "Region": REGION, "EndpointUrl": moto.url, "RefreshInterval": 1},
        "DBProxies": [{
            "DBProxyName": "aws-secrets",
            "EngineFamily": "POSTGRESQL",
            "Listen": "tcp:0:interface=127.0.0.1",
            "Auth": [{"SecretArn": arn} for arn in arns],
            "TargetGroups": [{"TargetGroupName": "default", "ConnectionPoolConfig": {
                "MaxConnectionsPercent": 100, "ConnectionBorrowTimeout": 20},
                "Targets": [{"RdsResourceId": "pg-1", "Endpoint": pg_server.host, "Port": pg_server.port}]}],
        }],
    }
    path = folder / "proxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def connect(proxy, user, password):
    return psycopg.connect(host=proxy.host, port=proxy.port, user=user, password=password,
                           dbname="postgres", sslmode="disable", connect_timeout=20)


def store_password(proxy, arn):
    creds = proxy.call(lambda: proxy.service.registry.secrets.get(arn))
    return None if creds is None else creds.password


def test_rotation_and_an_unreachable_endpoint(moto, aws_env, pg_server, tmp_path):
    user, old, new = "aws_rot", "aws-rot-old-1", "aws-rot-new-2"
    pg_server.create_user(user, old)
    arn = moto.client().create_secret(Name="aws-rot", SecretString=json.dumps(
        {"username": user, "password": old}))["ARN"]
    proxy = InProcessProxy(str(write_config(tmp_path, moto, pg_server, [arn])))
    try:
        proxy.wait_for(lambda: store_password(proxy, arn) == old, what="the secret loaded")
        open_session = connect(proxy, user, old)
        assert open_session.execute("SELECT current_user").fetchone() == (user,)
        open_session.execute("SELECT 1")  # a transaction open: holds one database connection

        # rotation: the database and the secret change; the proxy sees it within an interval
        pg_server.psql(f"ALTER ROLE {user} PASSWORD '{new}'")
        moto.client().put_secret_value(SecretId=arn, SecretString=json.dumps(
            {"username": user, "password": new}))
        proxy.wait_for(lambda: store_password(proxy, arn) == new, what="the rotation picked up")
        with connect(proxy, user, new) as second:  # needs a new database connection: new password
            assert second.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError, match="password"):
            connect(proxy, user, old).close()
        assert open_session.execute("SELECT 3").fetchone() == (3,)  # not dropped
        open_session.commit()
        open_session.close()

        # the endpoint goes away: the last good value stays in use
        errors_before = proxy.call(lambda: proxy.service.registry.secrets.read_errors)
        moto.stop()
        proxy.wait_for(lambda: proxy.call(lambda: proxy.service.registry.secrets.read_errors) > errors_before,
                       timeout=30, what="a failed refresh")
        with connect(proxy, user, new) as conn:
            assert conn.execute("SELECT 4").fetchone() == (4,)
        logs = proxy.logs.text()
        assert "cannot read from Secrets Manager" in logs and "keeping the last good value" in logs
        assert new not in logs and old not in logs
    finally:
        proxy.stop()
        if moto.proc.poll() is not None:
            moto.start()  # back (empty) for the next test


def test_new_auth_entry_is_picked_up_by_a_reload(moto, aws_env, pg_server, tmp_path):
    from txrdsproxy.config.load import load_config
    first, second = "aws_first", "aws_second"
    for name in (first, second):
        if name not in pg_server.users:
            pg_server.create_user(name, f"{name}-pw")
    client = moto.client()
    arns = [client.create_secret(Name=f"reload-{n}", SecretString=json.dumps(
        {"username": n, "password": f"{n}-pw"}))["ARN"] for n in (first, second)]
    path = write_config(tmp_path, moto, pg_server, arns[:1])
    proxy = InProcessProxy(str(path))
    try:
        proxy.wait_for(lambda: store_password(proxy, arns[0]), what="the first secret loaded")
        with pytest.raises(psycopg.OperationalError, match="no credentials for the role aws_second"):
            connect(proxy, second, f"{second}-pw").close()
        write_config(tmp_path, moto, pg_server, arns)  # the operator adds an Auth entry ...
        lines = proxy.call(lambda: proxy.service.registry.apply_config(load_config(str(path))))
        assert any("aws-secrets" in line for line in lines)
        proxy.wait_for(lambda: store_password(proxy, arns[1]), what="the new secret loaded")
        with connect(proxy, second, f"{second}-pw") as conn:  # ... and the new user gets in
            assert conn.execute("SELECT current_user").fetchone() == (second,)
    finally:
        proxy.stop()
