"""auth/policy.py: IAM identity-policy evaluation (wildcards, Not*, explicit Deny wins, refusals)."""

import pytest

from txrdsproxy.auth.policy import Decision, PolicyError, evaluate, parse_policy

ARN = "arn:aws:rds-db:us-east-1:000000000000:dbuser:prx-0123456789abcdef0/app"


def policy(*statements):
    return parse_policy({"Version": "2012-10-17", "Statement": list(statements)})


def allow(action="rds-db:connect", resource=ARN, **extra):
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def deny(action="rds-db:connect", resource=ARN):
    return {"Effect": "Deny", "Action": action, "Resource": resource}


def test_exact_allow_and_implicit_deny():
    p = [policy(allow())]
    assert evaluate(p, "rds-db:connect", ARN) is Decision.ALLOW
    assert evaluate(p, "rds-db:connect", ARN + "x") is Decision.IMPLICIT_DENY
    assert evaluate(p, "rds:DescribeDBProxies", ARN) is Decision.IMPLICIT_DENY
    assert evaluate([], "rds-db:connect", ARN) is Decision.IMPLICIT_DENY


def test_action_matching_is_case_insensitive_with_wildcards():
    assert evaluate([policy(allow("RDS-DB:Connect"))], "rds-db:connect", ARN).allowed
    assert evaluate([policy(allow("rds-db:*"))], "rds-db:connect", ARN).allowed
    assert evaluate([policy(allow("rds-db:conn?ct"))], "rds-db:connect", ARN).allowed
    assert evaluate([policy(allow("*"))], "rds-db:connect", ARN).allowed
    assert not evaluate([policy(allow("rds:*"))], "rds-db:connect", ARN).allowed


@pytest.mark.parametrize("pattern, allowed", [
    ("arn:aws:rds-db:us-east-1:000000000000:dbuser:prx-*/app", True),
    ("arn:aws:rds-db:*:*:dbuser:*/*", True),
    ("arn:aws:rds-db:us-east-?:000000000000:dbuser:prx-0123456789abcdef0/app", True),
    ("*", True),
    ("arn:aws:rds-db:us-east-1:000000000000:dbuser:prx-*/APP", False),  # resources: case-sensitive
    ("arn:aws:rds-db:us-east-1:000000000000:dbuser:prx-*/ap", False),   # whole match only
    ("arn:aws:rds-db:us-*:dbuser:prx-*/app", False),                     # * does not cross segment colons
    ("arn:aws:rds-db:us-west-2:000000000000:dbuser:prx-*/app", False),
    ("arn:aws:rds-db:us-east-1:111111111111:dbuser:prx-*/app", False),
])
def test_resource_wildcards(pattern, allowed):
    assert evaluate([policy(allow(resource=pattern))], "rds-db:connect", ARN).allowed is allowed


def test_resource_part_wildcard_spans_slashes_and_colons():
    arn = "arn:aws:rds-db:us-east-1:000000000000:dbuser:prx-1/a:b/c"
    assert evaluate([policy(allow(resource="arn:aws:rds-db:us-east-1:000000000000:*"))],
                    "rds-db:connect", arn).allowed


def test_explicit_deny_wins_over_any_allow_in_any_policy():
    p = [policy(allow("*", "*")), policy(deny(resource="arn:aws:rds-db:*:*:dbuser:*/app"))]
    assert evaluate(p, "rds-db:connect", ARN) is Decision.EXPLICIT_DENY
    other = ARN[:-3] + "bob"
    assert evaluate(p, "rds-db:connect", other) is Decision.ALLOW


def test_not_action_and_not_resource():
    p = [policy({"Effect": "Allow", "NotAction": "rds:*", "Resource": "*"})]
    assert evaluate(p, "rds-db:connect", ARN).allowed
    assert not evaluate(p, "rds:DeleteDBProxy", ARN).allowed
    p = [policy(allow(resource="*"), {"Effect": "Deny", "Action": "*", "NotResource": ARN})]
    assert evaluate(p, "rds-db:connect", ARN).allowed
    assert evaluate(p, "rds-db:connect", ARN + "2") is Decision.EXPLICIT_DENY


def test_lists_and_single_statement_mapping():
    p = parse_policy({"Statement": {"Effect": "Allow", "Action": ["rds:Describe*", "rds-db:connect"],
                                    "Resource": [ARN, "arn:aws:rds:*:*:db-proxy:*"]}})
    assert evaluate([p], "rds:DescribeDBProxies", "arn:aws:rds:us-east-1:000000000000:db-proxy:prx-1").allowed
    assert evaluate([p], "rds-db:connect", ARN).allowed


@pytest.mark.parametrize("doc, words", [
    ({"Statement": [allow(Condition={"IpAddress": {"aws:SourceIp": "1.2.3.4"}})]}, "Condition"),
    ({"Statement": [allow(Principal="*")]}, "Principal"),
    ({"Statement": [{"Effect": "Maybe", "Action": "*", "Resource": "*"}]}, "Effect"),
    ({"Statement": [{"Effect": "Allow", "Resource": "*"}]}, "Action"),
    ({"Statement": [{"Effect": "Allow", "Action": "*", "NotAction": "x:y", "Resource": "*"}]}, "Action"),
    ({"Statement": [{"Effect": "Allow", "Action": "*"}]}, "Resource"),
    ({"Statement": [allow(resource="not-an-arn")]}, "ARN"),
    ({"Statement": [allow(action="connect")]}, "service:action"),
    ({"Statement": [allow(action=[])]}, "non-empty"),
    ({"Statement": []}, "Statement"),
    ({"Version": "2020-01-01", "Statement": [allow()]}, "Version"),
    ({"Statement": [allow(Bogus=1)]}, "Bogus"),
    ("not a mapping", "mapping"),
])
def test_malformed_or_unsupported_documents_are_refused(doc, words):
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert words in str(info.value)
