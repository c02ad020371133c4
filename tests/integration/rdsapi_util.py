"""An in-process proxy with the admin listener, IAM principals and a DBInstances catalog, and
boto3 clients for it (shared by the RDS API tests)."""

import json
import os
import socket
from pathlib import Path

import pytest
import yaml
from botocore.exceptions import ClientError

try:
    from proxyutil import HOST, InProcessProxy, write_proxy_config
except ImportError:
    from tests.integration.proxyutil import HOST, InProcessProxy, write_proxy_config

REGION = "us-east-1"
ACCOUNT = "123456789012"
KEYS = {  # principal -> (access key id, secret)
    "admin": ("AKIAADMIN0000000001", "admin-secret-key-0001"),
    "reader": ("AKIAREADER000000001", "reader-secret-key-001"),
    "nomodify": ("AKIANOMODIFY0000001", "nomodify-secret-key-1"),
}
POLICIES = {
    "admin": [{"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "rds:*", "Resource": "*"}]}],
    "reader": [{"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "rds:Describe*", "Resource": "*"}]}],
    "nomodify": [{"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "rds:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "rds:ModifyDBProxy", "Resource": "*"}]}],
}


MYSQL_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_native"


def start(tmp_path, pg_server, anonymous_reads=False, extra_instances=(), mariadb_server=None,
          mutate=None, **overrides):
    """-> (InProcessProxy, admin endpoint URL, config path).  Proxies: test-pg, and test-my in
    front of *mariadb_server* when given.  *mutate*(config, secrets): change the parsed YAML and
    the secrets mapping in place before the proxy starts."""
    path = write_proxy_config(tmp_path, pg_server, name="test-pg", **overrides)
    config = yaml.safe_load(Path(path).read_text())
    secrets_path = Path(tmp_path) / "secrets.json"
    secrets = json.loads(secrets_path.read_text())
    if mariadb_server is not None:
        secrets[MYSQL_ARN] = {"username": "app_native", "password": mariadb_server.users["app_native"]}
        config["DBProxies"].append({
            "DBProxyName": "test-my", "EngineFamily": "MYSQL", "Listen": f"tcp:0:interface={HOST}",
            "Auth": [{"SecretArn": MYSQL_ARN, "ClientPasswordAuthType": "MYSQL_NATIVE_PASSWORD"}],
            "TargetGroups": [{"TargetGroupName": "default", "Targets": [
                {"RdsResourceId": "mariadb-1", "Endpoint": mariadb_server.host, "Port": mariadb_server.port}]}]})
    principals = []
    for name, (akid, secret) in KEYS.items():
        arn = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:key-{name}"
        secrets[arn] = {"secret_access_key": secret}
        principals.append({"Arn": f"arn:aws:iam::{ACCOUNT}:user/{name}",
                           "AccessKeys": [{"AccessKeyId": akid, "SecretArn": arn}],
                           "Policies": POLICIES[name]})
    secrets_path.write_text(json.dumps(secrets))
    os.chmod(secrets_path, 0o600)
    config["IAM"] = {"Region": REGION, "AccountId": ACCOUNT, "Principals": principals}
    config["Admin"] = {"Listen": f"tcp:0:interface={HOST}",
                       "AllowUnauthenticatedLoopbackReads": anonymous_reads}
    config["DBInstances"] = [{"DBInstanceIdentifier": "pg-2", "Endpoint": pg_server.host,
                              "Port": pg_server.port}] + list(extra_instances)
    config["DrainTimeout"] = 5
    if mutate is not None:
        mutate(config, secrets)
        secrets_path.write_text(json.dumps(secrets))
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    proxy = InProcessProxy(path)
    try:
        port = proxy.wait_for(lambda: proxy.call(lambda: proxy.service.admin.port), what="admin port")
    except BaseException:
        proxy.stop()
        raise
    return proxy, f"http://{HOST}:{port.getHost().port}", path


def client(endpoint, who="admin", secret=None, **kw):
    import boto3
    from botocore.config import Config
    akid, key = KEYS[who] if who else (None, None)
    return boto3.client("rds", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=akid, aws_secret_access_key=secret or key,
                        config=Config(retries={"max_attempts": 1}, **kw))


def aws_env(who="admin"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    akid, key = KEYS[who]
    env.update(AWS_ACCESS_KEY_ID=akid, AWS_SECRET_ACCESS_KEY=key, AWS_DEFAULT_REGION=REGION,
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


def fault(call, **params):
    """-> (AWS error code, HTTP status) of a call that must fail."""
    with pytest.raises(ClientError) as e:
        call(**params)
    return e.value.response["Error"]["Code"], e.value.response["ResponseMetadata"]["HTTPStatusCode"]


def listening(port):
    """Whether something accepts TCP connections on the loopback *port*."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((HOST, port)) == 0
