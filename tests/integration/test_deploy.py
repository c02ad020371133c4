"""`rdsproxy deploy` against an in-process proxy: the seed's CloudFormation example as given
(Fn::ImportValue, the short !ImportValue tag, Fn::Split, its DbProxyName / InstanceIdentifiers
spellings), --dry-run, idempotence, and parameters with Ref and Fn::Sub."""

import os
import subprocess
import sys
from pathlib import Path

import pymysql
import yaml

try:
    from rdsapi_util import ACCOUNT, MYSQL_ARN, aws_env, start
    from proxyutil import HOST
except ImportError:
    from tests.integration.rdsapi_util import ACCOUNT, MYSQL_ARN, aws_env, start
    from tests.integration.proxyutil import HOST

# The user guide's example template, unchanged.
SEED_TEMPLATE = """\
Resources:
 DBProxy:
   Type: AWS::RDS::DBProxy
   Properties:
     DBProxyName: CanaryProxy
     EngineFamily: MYSQL
     RoleArn:
      Fn::ImportValue: SecretReaderRoleArn
     Auth:
       - {AuthScheme: SECRETS, SecretArn: !ImportValue ProxySecret, IAMAuth: DISABLED}
     VpcSubnetIds:
       Fn::Split: [",", "Fn::ImportValue": SubnetIds]

 ProxyTargetGroup: 
   Type: AWS::RDS::DBProxyTargetGroup
   Properties:
     DbProxyName: CanaryProxy
     TargetGroupName: default
     InstanceIdentifiers: 
       - Fn::ImportValue: DBInstanceName
   DependsOn: DBProxy
"""

PARAM_TEMPLATE = """\
Parameters:
  Env: {Type: String}
  Timeout: {Type: Number, Default: 1800}
Resources:
  Proxy:
    Type: AWS::RDS::DBProxy
    Properties:
      DBProxyName: !Sub "${Env}-proxy"
      EngineFamily: MYSQL
      RoleArn: !Sub "arn:aws:iam::${AWS::AccountId}:role/${Env}-reader"
      Auth: [{AuthScheme: SECRETS, SecretArn: !ImportValue ProxySecret}]
      VpcSubnetIds: [subnet-1]
      IdleClientTimeout: !Ref Timeout
  Group:
    Type: AWS::RDS::DBProxyTargetGroup
    Properties:
      DBProxyName: !Ref Proxy
      TargetGroupName: default
      ConnectionPoolConfigurationInfo: {MaxConnectionsPercent: 40, MaxIdleConnectionsPercent: 20}
      DBInstanceIdentifiers: [mariadb-2]
  Bucket:
    Type: AWS::S3::Bucket
"""


def deploy(endpoint, tmp_path, template, *args):
    tpl = tmp_path / "template.yaml"
    tpl.write_text(template)
    script = os.path.join(os.path.dirname(sys.executable), "rdsproxy")
    return subprocess.run([script, "--endpoint-url", endpoint, "deploy", "--template-file", str(tpl)] + list(args),
                          capture_output=True, text=True, timeout=120, env=aws_env())


def test_deploy_the_seed_example_and_parameters(pg_server, mariadb_server, tmp_path):
    instance = {"DBInstanceIdentifier": "mariadb-2", "Endpoint": mariadb_server.host, "Port": mariadb_server.port}
    proxy, endpoint, path = start(tmp_path, pg_server, mariadb_server=mariadb_server, extra_instances=[instance])
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"Exports": {
        "SecretReaderRoleArn": f"arn:aws:iam::{ACCOUNT}:role/secret-reader",
        "ProxySecret": MYSQL_ARN, "SubnetIds": "subnet-a,subnet-b", "DBInstanceName": "mariadb-2"}}))
    registry = proxy.service.registry
    try:
        out = deploy(endpoint, tmp_path, SEED_TEMPLATE, "--values-file", str(values), "--dry-run")
        assert out.returncode == 0, out.stderr
        assert "Create DBProxy CanaryProxy" in out.stdout and "Register targets mariadb-2" in out.stdout
        assert "CanaryProxy" not in proxy.call(lambda: [r.name for r in registry])  # dry run: nothing

        out = deploy(endpoint, tmp_path, SEED_TEMPLATE, "--values-file", str(values))
        assert out.returncode == 0, out.stderr
        runtime = proxy.call(lambda: registry.get("CanaryProxy"))
        assert proxy.call(lambda: runtime.config.vpc_subnet_ids) == ("subnet-a", "subnet-b")
        port = proxy.call(lambda: runtime.port.getHost().port)
        conn = pymysql.connect(host=HOST, port=port, user="app_native",
                               password=mariadb_server.users["app_native"], database="appdb")
        with conn.cursor() as cur:
            cur.execute("select 6 * 7")
            assert cur.fetchone() == (42,)
        conn.close()
        out = deploy(endpoint, tmp_path, SEED_TEMPLATE, "--values-file", str(values))
        assert out.returncode == 0 and out.stdout.strip() == "No changes.", out.stdout + out.stderr

        # parameters: Ref, Fn::Sub, a Number parameter, a resource Ref, other resource types skipped
        out = deploy(endpoint, tmp_path, PARAM_TEMPLATE, "--values-file", str(values),
                     "--parameter-overrides", "Env=stage", "Timeout=600")
        assert out.returncode == 0, out.stderr
        assert "Skipped (not a DB proxy resource): Bucket (AWS::S3::Bucket)" in out.stdout
        stage = proxy.call(lambda: registry.get("stage-proxy").config)
        assert stage.idle_client_timeout == 600 and stage.role_arn == f"arn:aws:iam::{ACCOUNT}:role/stage-reader"
        assert stage.target_group.connection_pool_config.max_connections_percent == 40
        out = deploy(endpoint, tmp_path, PARAM_TEMPLATE, "--values-file", str(values),
                     "--parameter-overrides", "Env=stage", "Timeout=700", "--dry-run")
        assert "Modify DBProxy stage-proxy: IdleClientTimeout 600 -> 700" in out.stdout, out.stdout
        assert proxy.call(lambda: registry.get("stage-proxy").config.idle_client_timeout) == 600
        out = deploy(endpoint, tmp_path, PARAM_TEMPLATE, "--values-file", str(values))
        assert out.returncode == 252 and "Ref Env" in out.stderr  # a parameter without a value
    finally:
        proxy.stop()
    # what deploy made is in the file
    names = [p["DBProxyName"] for p in yaml.safe_load(Path(path).read_text())["DBProxies"]]
    assert "CanaryProxy" in names and "stage-proxy" in names
