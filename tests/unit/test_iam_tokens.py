"""RDS IAM auth tokens made by botocore's own generate_db_auth_token, checked by auth/iam.py:
signature, host, port, user, action, expiry on an injected clock, policies, session tokens,
the concurrency limit, and the management API's Authorization-header form."""

import datetime
import functools
from unittest import mock

import botocore.auth
import botocore.session
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as AwsCredentials
from twisted.internet import defer
from twisted.internet.task import Clock

from txrdsproxy.auth.iam import (AuthenticationFailed, DbTokenVerifier, PrincipalStore,
                                 TooManyAuthentications, db_user_arn, proxy_resource_id)
from txrdsproxy.auth.policy import parse_policy
from txrdsproxy.auth.secrets import StaticSecretsStore
from txrdsproxy.auth.sigv4 import SignatureError, SigningKey, verify_authorization, verify_presigned
from txrdsproxy.config import model as m

REGION, ACCOUNT = "us-east-1", "000000000000"
AKID, SECRET = "AKIAEXAMPLEAPP00001", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TMP_AKID, TMP_SECRET, TMP_TOKEN = "ASIAEXAMPLETMP00001", "tmp/secret+key", "FwoGZXIvYXdzEXAMPLE//token=="
DENIED_AKID = "AKIAEXAMPLEDENY0001"
HOST, PORT, USER = "proxy.example.internal", 6432, "app"
SIGNED = datetime.datetime(2026, 12, 3, 10, 0, 0)
SIGNED_TS = SIGNED.replace(tzinfo=datetime.timezone.utc).timestamp()
RESOURCE_ID = proxy_resource_id("app-pg")


@functools.lru_cache(maxsize=None)
def rds_client(akid, secret, token=None, region=REGION):
    return botocore.session.get_session().create_client(
        "rds", region_name=region, aws_access_key_id=akid, aws_secret_access_key=secret,
        aws_session_token=token)


def make_token(host=HOST, port=PORT, user=USER, when=SIGNED, akid=AKID, secret=SECRET, token=None,
               region=REGION):
    """A token from botocore's generate_db_auth_token, signed at *when*."""
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
        return rds_client(akid, secret, token, region).generate_db_auth_token(
            DBHostname=host, Port=port, DBUsername=user)


def allow(resource):
    return parse_policy({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "rds-db:connect", "Resource": resource}]})


IAM = m.IAMConfig(region=REGION, account_id=ACCOUNT, principals=(
    m.IAMPrincipal("arn:aws:iam::000000000000:user/app",
                   (m.IAMAccessKey(AKID, "arn:secret:app-key"),),
                   (allow(f"arn:aws:rds-db:{REGION}:{ACCOUNT}:dbuser:prx-*/app"),)),
    m.IAMPrincipal("arn:aws:iam::000000000000:role/temp",
                   (m.IAMAccessKey(TMP_AKID, "arn:secret:tmp-key"),),
                   (allow("arn:aws:rds-db:*:*:dbuser:*/*"),)),
    m.IAMPrincipal("arn:aws:iam::000000000000:user/denied",
                   (m.IAMAccessKey(DENIED_AKID, "arn:secret:deny-key"),),
                   (allow("*"), parse_policy({"Statement": [
                       {"Effect": "Deny", "Action": "rds-db:*", "Resource": "arn:aws:rds-db:*:*:dbuser:*/app"}]}))),
    m.IAMPrincipal("arn:aws:iam::000000000000:user/nopolicy",
                   (m.IAMAccessKey("AKIAEXAMPLENONE0001", "arn:secret:none-key"),), ()),
))
SECRETS = {
    "arn:secret:app-key": {"secret_access_key": SECRET},
    "arn:secret:tmp-key": {"secret_access_key": TMP_SECRET, "session_token": TMP_TOKEN},
    "arn:secret:deny-key": {"secret_access_key": SECRET},
    "arn:secret:none-key": {"secret_access_key": SECRET},
}


@pytest.fixture
def verifier():
    clock = Clock()
    clock.advance(SIGNED_TS + 30)
    store = PrincipalStore(IAM, StaticSecretsStore(SECRETS))
    return DbTokenVerifier(store, clock)


def outcome(verifier, token, user=USER, hosts=(HOST,), port=PORT):
    """-> principal ARN or the AuthenticationFailed reason."""
    results = []
    verifier.verify(token, user, RESOURCE_ID, hosts, port).addBoth(results.append)
    (result,) = results
    if isinstance(result, str):
        return result
    result.trap(AuthenticationFailed)
    return "failed: " + result.value.reason


def test_resource_id_is_stable_and_shaped_like_rds():
    assert proxy_resource_id("app-pg") == proxy_resource_id("app-pg") != proxy_resource_id("app-my")
    assert len(RESOURCE_ID) == 21 and RESOURCE_ID.startswith("prx-") and int(RESOURCE_ID[4:], 16) >= 0
    assert RESOURCE_ID[4:] == RESOURCE_ID[4:].lower()
    assert proxy_resource_id("app-pg", "prx-0123456789abcdef0") == "prx-0123456789abcdef0"
    assert db_user_arn(REGION, ACCOUNT, RESOURCE_ID, "app") == \
        f"arn:aws:rds-db:us-east-1:000000000000:dbuser:{RESOURCE_ID}/app"


def test_valid_token(verifier):
    assert outcome(verifier, make_token()) == "arn:aws:iam::000000000000:user/app"
    # any of the proxy's names, case-insensitively (DNS names are)
    assert outcome(verifier, make_token(host="127.0.0.1"), hosts=("127.0.0.1", HOST)).startswith("arn:")
    assert outcome(verifier, make_token(host=HOST.upper())).startswith("arn:")
    # with its https:// prefix too (some tools keep it)
    assert outcome(verifier, "https://" + make_token()).startswith("arn:")


def test_tampered_signature(verifier):
    token = make_token()
    head, sig = token.rsplit("=", 1)
    flipped = head + "=" + ("0" if sig[0] != "0" else "1") + sig[1:]
    assert outcome(verifier, flipped) == "failed: signature mismatch"
    assert outcome(verifier, head + "=" + sig[:-2]) == "failed: signature mismatch"


def test_tampered_parameters(verifier):
    token = make_token()
    assert outcome(verifier, token.replace("DBUser=app", "DBUser=admin"), user="admin") == \
        "failed: signature mismatch"
    assert outcome(verifier, token + "&DBUser=admin") == "failed: repeated query parameter DBUser"
    assert outcome(verifier, token.replace("Action=connect&", "Action=connect&Extra=1&")) == \
        "failed: signature mismatch"
    assert outcome(verifier, token.replace("X-Amz-Expires=900", "X-Amz-Expires=899")) == \
        "failed: signature mismatch"


def test_wrong_host(verifier):
    assert outcome(verifier, make_token(host="other.example")) == \
        "failed: token names host other.example, not this proxy"


def test_wrong_port(verifier):
    assert outcome(verifier, make_token(port=5432)) == "failed: token names port 5432, not 6432"


def test_wrong_user(verifier):
    assert outcome(verifier, make_token(user="app"), user="admin") == \
        "failed: token DBUser is not the login user"


def test_expired_and_future_dated(verifier):
    clock = verifier.clock
    assert outcome(verifier, make_token(when=SIGNED - datetime.timedelta(seconds=870))).startswith("arn:")
    assert outcome(verifier, make_token(when=SIGNED - datetime.timedelta(seconds=871))) == "failed: expired"
    # dated ahead of our clock: up to 60 s of skew is allowed
    assert outcome(verifier, make_token(when=SIGNED + datetime.timedelta(seconds=90))).startswith("arn:")
    assert outcome(verifier, make_token(when=SIGNED + datetime.timedelta(seconds=91))).startswith(
        "failed: signed in the future")
    token = make_token()
    clock.advance(900 - 30)
    assert outcome(verifier, token).startswith("arn:")
    clock.advance(1)
    assert outcome(verifier, token) == "failed: expired"


def test_lifetime_above_900_seconds_is_refused(verifier):
    request = AWSRequest(method="GET", url=f"https://{HOST}:{PORT}/",
                         params={"Action": "connect", "DBUser": USER})
    signer = botocore.auth.SigV4QueryAuth(AwsCredentials(AKID, SECRET), "rds-db", REGION, expires=3600)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=SIGNED):
        request.url = request.prepare().url
        request.params = {}
        signer.add_auth(request)
    token = request.url[len("https://"):]
    assert outcome(verifier, token) == "failed: X-Amz-Expires 3600 outside 1..900"


def test_wrong_region_or_service(verifier):
    assert outcome(verifier, make_token(region="eu-west-1")) == "failed: token signed for rds-db in eu-west-1"


def test_unknown_key_and_missing_key_secret(verifier):
    assert outcome(verifier, make_token(akid="AKIAUNKNOWN00000001")) == "failed: unknown access key"
    verifier.store.secrets.replace({k: v for k, v in SECRETS.items() if k != "arn:secret:app-key"})
    assert outcome(verifier, make_token()) == "failed: unknown access key"


def test_missing_policy_wildcard_policy_and_explicit_deny(verifier):
    assert outcome(verifier, make_token(akid="AKIAEXAMPLENONE0001")) == \
        f"failed: rds-db:connect on {db_user_arn(REGION, ACCOUNT, RESOURCE_ID, USER)} not allowed"
    # the app principal's policy names prx-*/app: another user is not covered
    assert outcome(verifier, make_token(user="bob"), user="bob").endswith("/bob not allowed")
    # the temp principal has arn:aws:rds-db:*:*:dbuser:*/*
    assert outcome(verifier, make_token(user="bob", akid=TMP_AKID, secret=TMP_SECRET, token=TMP_TOKEN),
                   user="bob") == "arn:aws:iam::000000000000:role/temp"
    assert outcome(verifier, make_token(akid=DENIED_AKID)).endswith(" explicitly denied")
    assert outcome(verifier, make_token(akid=DENIED_AKID, user="bob"), user="bob").startswith("arn:")


def test_session_tokens(verifier):
    good = make_token(akid=TMP_AKID, secret=TMP_SECRET, token=TMP_TOKEN)
    assert "X-Amz-Security-Token" in good
    assert outcome(verifier, good) == "arn:aws:iam::000000000000:role/temp"
    assert outcome(verifier, make_token(akid=TMP_AKID, secret=TMP_SECRET)) == \
        "failed: missing or wrong session token"
    assert outcome(verifier, make_token(akid=TMP_AKID, secret=TMP_SECRET, token="other")) == \
        "failed: missing or wrong session token"
    assert outcome(verifier, make_token(token="unexpected")) == \
        "failed: session token given for a long-term access key"


@pytest.mark.parametrize("junk", ["", "password", "a" * 9000, "host:1/?X-Amz-Signature=1",
                                  "h:99999/?Action=connect", "é:1/?a=b", "h:1/?=x&a", "h:1/#frag"])
def test_garbage_passwords_fail_cleanly(verifier, junk):
    assert outcome(verifier, junk).startswith("failed: ")


def test_failure_logs_never_hold_the_token(verifier):
    from twisted.logger import globalLogPublisher, formatEvent
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        token = make_token(port=1)
        assert outcome(verifier, token).startswith("failed")
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = " ".join(formatEvent(e) + repr(e) for e in events)
    assert "IAM authentication of app failed" in text
    assert token.rsplit("=", 1)[1] not in text and SECRET not in text


def test_concurrency_limit_counts_logins_waiting_for_their_key_secret():
    clock = Clock()
    clock.advance(SIGNED_TS)

    class SlowStore(StaticSecretsStore):
        pending = []

        def fetch(self, arn):
            d = defer.Deferred()
            self.pending.append((d, arn))
            return d

    store = PrincipalStore(IAM, SlowStore(SECRETS))
    verifier = DbTokenVerifier(store, clock, max_concurrent=2)
    token = make_token()
    first = verifier.verify(token, USER, RESOURCE_ID, (HOST,), PORT)
    second = verifier.verify(token, USER, RESOURCE_ID, (HOST,), PORT)
    third = []
    verifier.verify(token, USER, RESOURCE_ID, (HOST,), PORT).addErrback(lambda f: third.append(f.trap(TooManyAuthentications)))
    assert third == [TooManyAuthentications] and verifier.in_progress == 2
    for d, arn in SlowStore.pending:
        assert arn == "arn:secret:app-key"
        d.callback(None)
    results = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    assert results == ["arn:aws:iam::000000000000:user/app"] * 2 and verifier.in_progress == 0


# -- the management API's Authorization-header form ---------------------------------------------

def signed_request(body=b"Action=DescribeDBProxies&Version=2014-10-31", akid=AKID, secret=SECRET,
                   token=None, region=REGION, service="rds", url="https://127.0.0.1:8089/"):
    request = AWSRequest(method="POST", url=url, data=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=SIGNED):
        botocore.auth.SigV4Auth(AwsCredentials(akid, secret, token), service, region).add_auth(request)
    headers = dict(request.headers)
    headers["Host"] = url.split("/")[2]
    return headers, request.body


def test_authorization_header_requests():
    store = PrincipalStore(IAM, StaticSecretsStore(SECRETS))
    headers, body = signed_request()
    principal, verified = store.verify_request("POST", "https://127.0.0.1:8089/", headers, body, SIGNED_TS + 5)
    assert principal.arn == "arn:aws:iam::000000000000:user/app" and verified.service == "rds"
    with pytest.raises(AuthenticationFailed, match="signature mismatch"):
        store.verify_request("POST", "https://127.0.0.1:8089/", headers, body + b"&x=1", SIGNED_TS)
    with pytest.raises(AuthenticationFailed, match="signature mismatch"):
        store.verify_request("POST", "https://127.0.0.1:8089/", dict(headers, Host="evil:8089"), body,
                             SIGNED_TS)
    with pytest.raises(AuthenticationFailed, match="too far"):
        store.verify_request("POST", "https://127.0.0.1:8089/", headers, body, SIGNED_TS + 301)
    headers, body = signed_request(region="eu-west-1")
    with pytest.raises(AuthenticationFailed, match="signed for rds in eu-west-1"):
        store.verify_request("POST", "https://127.0.0.1:8089/", headers, body, SIGNED_TS)
    headers, body = signed_request(akid=TMP_AKID, secret=TMP_SECRET, token=TMP_TOKEN)
    assert store.verify_request("POST", "https://127.0.0.1:8089/", headers, body, SIGNED_TS)[0].arn.endswith("temp")


def test_authorization_header_body_hash_must_match_the_body():
    keys = {AKID: SigningKey(AKID, SECRET)}
    headers, body = signed_request()
    headers["X-Amz-Content-SHA256"] = "0" * 64
    with pytest.raises(SignatureError, match="does not match the body"):
        verify_authorization("POST", "https://127.0.0.1:8089/", headers, body, keys.get, SIGNED_TS)
    headers, body = signed_request()
    del headers["Authorization"]
    with pytest.raises(SignatureError, match="no Authorization"):
        verify_authorization("POST", "https://127.0.0.1:8089/", headers, body, keys.get, SIGNED_TS)


def test_presigned_verification_needs_no_network_and_reports_the_scope():
    keys = {AKID: SigningKey(AKID, SECRET)}
    verified = verify_presigned(make_token(), keys.get, SIGNED_TS)
    assert (verified.access_key_id, verified.region, verified.service, verified.host, verified.port) == \
        (AKID, REGION, "rds-db", HOST, PORT)
    assert verified.params["DBUser"] == USER and "X-Amz-Signature" not in verified.params
    assert SECRET not in repr(keys[AKID])
