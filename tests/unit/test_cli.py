"""cli.py: commands and options from botocore's RDS model, shorthand values, defaults from the
local config, output formats and exit statuses (no server: the API side is
tests/integration/test_admin.py)."""

import io
import json
import os
import subprocess
import sys

import pytest

from txrdsproxy import cli


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_commands_and_options_are_the_aws_commands():
    args = parse("modify-db-proxy-target-group", "--db-proxy-name", "p", "--target-group-name", "default",
                 "--connection-pool-config",
                 "MaxConnectionsPercent=50,MaxIdleConnectionsPercent=10,SessionPinningFilters=EXCLUDE_VARIABLE_SETS")
    op = cli._model().operation_model(args.operation)
    assert cli.build_params(op, args) == {
        "DBProxyName": "p", "TargetGroupName": "default",
        "ConnectionPoolConfig": {"MaxConnectionsPercent": 50, "MaxIdleConnectionsPercent": 10,
                                 "SessionPinningFilters": ["EXCLUDE_VARIABLE_SETS"]}}
    args = parse("register-db-proxy-targets", "--db-proxy-name", "p", "--db-instance-identifiers", "a", "b")
    assert cli.build_params(cli._model().operation_model(args.operation), args)["DBInstanceIdentifiers"] == ["a", "b"]
    args = parse("create-db-proxy-endpoint", "--db-proxy-name", "p", "--db-proxy-endpoint-name", "p-ro",
                 "--vpc-subnet-ids", "s-1", "--target-role", "READ_ONLY")
    assert cli.build_params(cli._model().operation_model(args.operation), args) == {
        "DBProxyName": "p", "DBProxyEndpointName": "p-ro", "VpcSubnetIds": ["s-1"],
        "TargetRole": "READ_ONLY"}
    args = parse("modify-db-proxy", "--db-proxy-name", "p", "--no-require-tls", "--debug-logging",
                 "--idle-client-timeout", "60", "--new-db-proxy-name", "q")
    assert cli.build_params(cli._model().operation_model(args.operation), args) == {
        "DBProxyName": "p", "RequireTLS": False, "DebugLogging": True, "IdleClientTimeout": 60,
        "NewDBProxyName": "q"}


def test_shorthand_list_of_structures_and_json():
    args = parse("create-db-proxy", "--db-proxy-name", "p", "--engine-family", "POSTGRESQL",
                 "--role-arn", "arn:aws:iam::000000000000:role/r", "--vpc-subnet-ids", "s1", "s2",
                 "--auth", "AuthScheme=SECRETS,SecretArn=arn:a,IAMAuth=DISABLED",
                 '{"SecretArn": "arn:b", "Description": "two"}')
    params = cli.build_params(cli._model().operation_model(args.operation), args)
    assert params["Auth"] == [{"AuthScheme": "SECRETS", "SecretArn": "arn:a", "IAMAuth": "DISABLED"},
                              {"SecretArn": "arn:b", "Description": "two"}]
    args = parse("describe-db-proxies", "--filters", "Name=db-proxy-name,Values=a,b")
    assert cli.build_params(cli._model().operation_model(args.operation), args)["Filters"] == [
        {"Name": "db-proxy-name", "Values": ["a", "b"]}]


def test_bad_shorthand_exits_252(capsys):
    status = cli.main(["--endpoint-url", "http://127.0.0.1:9", "modify-db-proxy-target-group",
                       "--db-proxy-name", "p", "--target-group-name", "default",
                       "--connection-pool-config", "Bogus=1"])
    assert status == 252 and "Bogus" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["describe-db-proxy-targets"],
                                  ["describe-db-proxies", "--output", "yaml"]])
def test_usage_errors_exit_252(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 252


def test_endpoint_from_the_local_config(tmp_path, monkeypatch):
    config = tmp_path / "rdsproxy.yaml"
    config.write_text("Admin:\n  Listen: tcp:18089:interface=127.0.0.2\nIAM: {Region: eu-west-1}\n")
    data = cli.local_config(str(config))
    assert cli.endpoint_from_config(data) == "http://127.0.0.2:18089"
    assert cli.endpoint_from_config({"Admin": {"Listen": "tcp:8089"}}) == "http://127.0.0.1:8089"
    assert cli.endpoint_from_config({}) is None


def test_unreachable_endpoint_exits_255(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE000000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    err = io.StringIO()
    status = cli.main(["--endpoint-url", "http://127.0.0.1:9", "describe-db-proxies"], stderr=err)
    assert status == 255 and "Could not connect to the endpoint URL" in err.getvalue()


def test_output_formats():
    result = {"DBProxies": [{"DBProxyName": "p", "Status": "available", "Auth": [{"SecretArn": "a"}],
                             "VpcSubnetIds": ["s1", "s2"]}], "ResponseMetadata": {"RequestId": "x"}}
    assert json.loads(cli.render(result, "json", "DescribeDBProxies")) == {"DBProxies": result["DBProxies"]}
    assert cli.render(result, "json", "T").startswith('{\n    "DBProxies": [\n')  # aws layout
    text = cli.render(result, "text", "DescribeDBProxies").splitlines()
    assert text == ["DBPROXIES\tp\tavailable", "AUTH\ta", "VPCSUBNETIDS\ts1\ts2"]
    table = cli.render(result, "table", "DescribeDBProxies")
    assert "DescribeDBProxies" in table.splitlines()[1] and "| DBProxies[0].DBProxyName" in table


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "txrdsproxy.cli", "--help"], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0 and "describe-db-proxies" in out.stdout and "deploy" in out.stdout
