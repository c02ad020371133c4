"""IAM token logins: how many tokens per second the proxy verifies on one core.

The verification is the only work an IAM login adds to a password login in the reactor thread
(SigV4 recomputed by botocore's signer, policy evaluation); tokens are made beforehand by
botocore's generate_db_auth_token, each one distinct (signed at a different second), and checked
on an injected clock by the same DbTokenVerifier the frontends call.
"""

import datetime
import time
from unittest import mock

import botocore.auth
import botocore.session
from twisted.internet.task import Clock

from txrdsproxy.auth.iam import DbTokenVerifier, PrincipalStore, proxy_resource_id
from txrdsproxy.auth.policy import parse_policy
from txrdsproxy.auth.secrets import StaticSecretsStore
from txrdsproxy.config import model as m

AKID, SECRET = "AKIAEXAMPLEBENCH0001", "bench/secret+key0123456789abcdefghijklm"


def measure(count=2000):
    """-> (verifications per second, failures)."""
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    client = botocore.session.get_session().create_client(
        "rds", region_name="us-east-1", aws_access_key_id=AKID, aws_secret_access_key=SECRET)
    tokens = []
    for i in range(count):
        with mock.patch.object(botocore.auth, "get_current_datetime",
                               return_value=start + datetime.timedelta(seconds=i % 600)):
            tokens.append(client.generate_db_auth_token(DBHostname="127.0.0.1", Port=6432, DBUsername="app"))
    iam = m.IAMConfig(principals=(m.IAMPrincipal(
        "arn:aws:iam::000000000000:user/app", (m.IAMAccessKey(AKID, "key"),),
        (parse_policy({"Statement": [{"Effect": "Allow", "Action": "rds-db:connect",
                                      "Resource": "arn:aws:rds-db:*:*:dbuser:prx-*/app"}]}),)),))
    clock = Clock()
    clock.advance(start.replace(tzinfo=datetime.timezone.utc).timestamp() + 600)
    verifier = DbTokenVerifier(PrincipalStore(iam, StaticSecretsStore({"key": {"secret_access_key": SECRET}})),
                               clock, max_concurrent=10)
    resource = proxy_resource_id("bench")
    failures = []
    t0 = time.process_time()
    for token in tokens:
        verifier.verify(token, "app", resource, {"127.0.0.1"}, 6432).addErrback(failures.append)
    spent = time.process_time() - t0
    return count / spent, len(failures)


def run(say):
    rate, failures = measure()
    say("\n== IAM token logins (verification per login, one core) ==")
    say("  %.0f tokens verified per second of CPU (%s)" % (
        rate, "all valid" if not failures else "%d FAILED" % failures))
    return failures == 0
