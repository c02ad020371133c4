"""deploy.py: the template's intrinsic functions and the change set, without an API (the
end-to-end run is tests/integration/test_deploy.py)."""

import pytest

from txrdsproxy.deploy import Resolver, TemplateError, load_template, plan

TEMPLATE = """\
Parameters:
  Env: {Type: String, Default: dev}
  Size: {Type: Number, Default: 40}
  Subnets: {Type: CommaDelimitedList, Default: "a,b"}
Resources:
  Proxy:
    Type: AWS::RDS::DBProxy
    Properties:
      DBProxyName: !Sub "${Env}-proxy"
      EngineFamily: POSTGRESQL
      RoleArn: !Join [":", ["arn:aws:iam:", !Ref "AWS::AccountId", "role/r"]]
      Auth:
        - {SecretArn: !Sub ["arn:${Part}", {Part: !ImportValue secret-part}]}
      VpcSubnetIds: !Ref Subnets
      IdleClientTimeout: !Ref Size
      DebugLogging: true
  Group:
    Type: AWS::RDS::DBProxyTargetGroup
    Properties:
      DBProxyName: !Ref Proxy
      TargetGroupName: default
      ConnectionPoolConfigurationInfo: {MaxConnectionsPercent: !Ref Size}
      DBInstanceIdentifiers: [!Select [1, !Split [",", "pg-1,pg-2"]]]
"""


def resolver(tmp_path, params=None, exports=None):
    path = tmp_path / "t.yaml"
    path.write_text(TEMPLATE)
    template = load_template(str(path))
    exports = {"secret-part": "s1"} if exports is None else exports
    return template, Resolver(template, params or {}, exports, "eu-west-1",
                              "123456789012")


def test_intrinsics_resolve(tmp_path):
    template, r = resolver(tmp_path, {"Env": "prod"})
    props = r.resolve(template["Resources"]["Proxy"]["Properties"], "Proxy")
    assert props["DBProxyName"] == "prod-proxy"
    assert props["RoleArn"] == "arn:aws:iam::123456789012:role/r"
    assert props["Auth"] == [{"SecretArn": "arn:s1"}]
    assert props["VpcSubnetIds"] == ["a", "b"] and props["IdleClientTimeout"] == 40
    group = r.resolve(template["Resources"]["Group"]["Properties"], "Group")
    assert group["DBProxyName"] == "prod-proxy" and group["DBInstanceIdentifiers"] == ["pg-2"]


def test_errors_name_where(tmp_path):
    template, r = resolver(tmp_path, exports={})
    with pytest.raises(TemplateError, match=r"Proxy.Auth\[0\].SecretArn: Fn::ImportValue secret-part"):
        r.resolve(template["Resources"]["Proxy"]["Properties"], "Proxy")
    with pytest.raises(TemplateError, match="Ref Nope"):
        r.resolve({"Ref": "Nope"}, "X")
    with pytest.raises(TemplateError, match="not a Number"):
        resolver(tmp_path, {"Size": "big"})


def test_plan_creates_then_converges(tmp_path):
    template, r = resolver(tmp_path)
    changes = plan(template, r, lambda name: None, lambda n, g: None, lambda n, g: [])
    assert [op for _, op, _ in changes] == ["CreateDBProxy", "ModifyDBProxyTargetGroup", "RegisterDBProxyTargets"]
    existing = {"DBProxyName": "dev-proxy", "EngineFamily": "POSTGRESQL", "IdleClientTimeout": 40,
                "DebugLogging": True, "RoleArn": "arn:aws:iam::123456789012:role/r",
                "Auth": [{"SecretArn": "arn:s1", "AuthScheme": "SECRETS", "IAMAuth": "DISABLED",
                          "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256"}]}
    group = {"ConnectionPoolConfig": {"MaxConnectionsPercent": 40}}
    assert plan(template, r, lambda name: existing, lambda n, g: group, lambda n, g: ["pg-2"]) == []
    existing["IdleClientTimeout"] = 1800
    changes = plan(template, r, lambda name: existing, lambda n, g: group, lambda n, g: ["pg-1", "pg-2"])
    assert [d for d, _, _ in changes] == ["Modify DBProxy dev-proxy: IdleClientTimeout 1800 -> 40",
                                          "Deregister targets pg-1 from dev-proxy/default"]
