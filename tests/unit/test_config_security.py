"""Config keys of the security area: IAM (principal store), Secrets backends, DBProxyResourceId."""

import pytest

from txrdsproxy.auth.policy import Decision, evaluate
from txrdsproxy.config.load import ConfigError, parse_config

ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"


def base(**top):
    proxy = {
        "DBProxyName": "app-pg", "EngineFamily": "POSTGRESQL", "Listen": "tcp:6432",
        "Auth": [{"SecretArn": ARN}],
        "TargetGroups": [{"Targets": [{"RdsResourceId": "pg-1", "Endpoint": "127.0.0.1", "Port": 5432}]}],
    }
    data = {"Secrets": {"Path": "s.json"}, "DBProxies": [proxy]}
    data.update(top)
    return data


IAM = {
    "Region": "us-east-1", "AccountId": "000000000000",
    "Principals": [{
        "Arn": "arn:aws:iam::000000000000:user/app",
        "AccessKeys": [{"AccessKeyId": "AKIAEXAMPLEAPP00001", "SecretArn": "arn:key"}],
        "Policies": [{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "rds-db:connect",
             "Resource": "arn:aws:rds-db:us-east-1:000000000000:dbuser:prx-*/app"}]}],
    }],
}


def fails(data, words):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yaml", "/base")
    assert words in str(info.value), str(info.value)
    return str(info.value)


def test_iam_principal_store_is_parsed_with_its_policies():
    config = parse_config(base(IAM=IAM), "cfg.yaml", "/base")
    (principal,) = config.iam.principals
    assert principal.arn == "arn:aws:iam::000000000000:user/app"
    assert principal.access_keys[0].secret_arn == "arn:key"
    resource = "arn:aws:rds-db:us-east-1:000000000000:dbuser:prx-0123456789abcdef0/app"
    assert evaluate(principal.policies, "rds-db:connect", resource) is Decision.ALLOW
    assert config.iam.max_concurrent_authentications == 256


def test_iam_errors_name_the_key_path():
    bad = dict(IAM, Principals=[dict(IAM["Principals"][0], Policies=[{"Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*", "Condition": {}}]}])])
    assert fails(base(IAM=bad), "IAM.Principals[0].Policies[0]").endswith("conditions are not supported (refused rather than ignored)")
    fails(base(IAM=dict(IAM, AccountId=123)), "IAM.AccountId: must be a string")
    fails(base(IAM=dict(IAM, AccountId="123")), "IAM.AccountId: must be 12 digits")
    twice = dict(IAM, Principals=IAM["Principals"] * 2)
    fails(base(IAM=twice), "IAM.Principals[1].AccessKeys[0].AccessKeyId: already belongs to")
    fails(base(IAM=dict(IAM, Principals=[dict(IAM["Principals"][0], Arn="app")])), "IAM.Principals[0].Arn")
    fails(base(IAM=dict(IAM, Bogus=1)), "IAM.Bogus: unknown key")


def test_proxy_resource_id_derived_or_configured():
    config = parse_config(base(), "cfg.yaml", "/base")
    rid = config.proxies[0].resource_id
    assert rid.startswith("prx-") and len(rid) == 21
    assert parse_config(base(), "cfg.yaml", "/base").proxies[0].resource_id == rid  # stable
    data = base()
    data["DBProxies"][0]["DBProxyResourceId"] = "prx-0123456789abcdef0"
    assert parse_config(data, "cfg.yaml", "/base").proxies[0].resource_id == "prx-0123456789abcdef0"
    data["DBProxies"][0]["DBProxyResourceId"] = "prx-XYZ"
    fails(data, "DBProxies[0].DBProxyResourceId: must be prx- followed by 17 lowercase hexadecimal")


def test_secrets_backends():
    config = parse_config(base(Secrets={"Backend": "aws", "Region": "us-east-1",
                                        "EndpointUrl": "http://127.0.0.1:5000", "RefreshInterval": 60}),
                          "cfg.yaml", "/base")
    s = config.secrets
    assert (s.backend, s.region, s.endpoint_url, s.refresh_interval, s.path) == \
        ("aws", "us-east-1", "http://127.0.0.1:5000", 60.0, "")
    fails(base(Secrets={"Backend": "aws"}), "Secrets.Region: is required")
    fails(base(Secrets={"Backend": "aws", "Region": "x", "Path": "s.json"}), "Secrets.Path: applies to Backend aws only"[:12])
    fails(base(Secrets={"Backend": "aws", "Region": "x", "EndpointUrl": "ftp://x"}), "Secrets.EndpointUrl")
    fails(base(Secrets={"Path": "s.json", "Region": "x"}), "Secrets.Region: applies to Backend aws only")
    fails(base(Secrets={"Backend": "vault", "Path": "s"}), "Secrets.Backend: must be one of file, aws")


def test_database_tls(tmp_path):
    from txrdsproxy.testing.certs import TestCA
    ca = TestCA(str(tmp_path), "ca")
    data = base()
    data["DBProxies"][0]["DatabaseTLS"] = {"Mode": "verify-full", "CAFile": "ca.crt",
                                           "AllowCleartextPassword": True}
    tls = parse_config(data, "cfg.yaml", str(tmp_path)).proxies[0].database_tls
    assert (tls.mode, tls.ca_file, tls.allow_cleartext_password) == ("verify-full", ca.cert_path, True)
    assert parse_config(base(), "cfg.yaml", str(tmp_path)).proxies[0].database_tls.mode == "follow-client"
    data["DBProxies"][0]["DatabaseTLS"] = {"Mode": "sometimes"}
    fails(data, "DBProxies[0].DatabaseTLS.Mode: must be one of follow-client, disable, prefer")
    data["DBProxies"][0]["DatabaseTLS"] = {"CAFile": "missing.crt"}
    fails(data, "DBProxies[0].DatabaseTLS.CAFile: /base/missing.crt: cannot read")
    (tmp_path / "junk.crt").write_text("junk")
    data["DBProxies"][0]["DatabaseTLS"] = {"CAFile": "junk.crt"}
    with pytest.raises(ConfigError, match="DatabaseTLS.CAFile: .*not a PEM certificate bundle"):
        parse_config(data, "cfg.yaml", str(tmp_path))
    data["DBProxies"][0]["DatabaseTLS"] = {"ServerPublicKeyFile": "k.pem"}
    fails(data, "DatabaseTLS.ServerPublicKeyFile: applies to MYSQL proxies only")


def test_iam_auth_required_needs_principals(tmp_path):
    from txrdsproxy.testing.certs import write_self_signed
    cert, key = write_self_signed(str(tmp_path))
    data = base()
    data["DBProxies"][0]["TLS"] = {"CertificateFile": cert, "PrivateKeyFile": key}
    data["DBProxies"][0]["Auth"][0]["IAMAuth"] = "REQUIRED"
    fails(data, "IAM: must list Principals when a proxy (app-pg) has IAMAuth REQUIRED")
    data["IAM"] = IAM
    config = parse_config(data, "cfg.yaml", "/base")
    assert config.proxies[0].auth[0].iam_auth == "REQUIRED"


def test_the_gateway_example_loads(tmp_path):
    """etc/gateway.yaml (docs/gateway.md) is a valid configuration once its files exist."""
    import shutil
    from pathlib import Path

    from txrdsproxy.config.load import load_config
    from txrdsproxy.testing.certs import TestCA, write_self_signed
    example = Path(__file__).resolve().parents[2] / "etc" / "gateway.yaml"
    shutil.copy(example, tmp_path / "gateway.yaml")
    write_self_signed(str(tmp_path), "gateway")
    TestCA(str(tmp_path), "db-ca")
    config = load_config(str(tmp_path / "gateway.yaml"))
    assert [p.database_tls.mode for p in config.proxies] == ["verify-full", "verify-full"]
    assert all(p.require_tls and p.auth[0].iam_auth == "REQUIRED" for p in config.proxies)
    assert config.secrets.backend == "aws" and config.iam.principals
