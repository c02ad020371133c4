"""IAM principals, their policies, and the checks an RDS IAM auth token has to pass.

The principal store is configured top-level (``IAM: {Region, AccountId, Principals: [...]}``):
each principal has an ARN, access keys (an id plus the SecretArn of a secret holding
``{"secret_access_key": ..., "session_token": ...optional}``) and ordinary IAM policy documents.
It is engine-neutral: database logins (`DbTokenVerifier`) and the management API
(`PrincipalStore.verify_request`) both use it.

A database login with an IAM token (`DbTokenVerifier.verify`) passes when:
- the token is a SigV4 presigned URL whose signature botocore reproduces with the key's secret
  (`sigv4.verify_presigned`: dated at most 60 s ahead of the proxy's clock, X-Amz-Expires at most
  900 s and not past), for service ``rds-db`` in the configured Region;
- ``Action=connect``, ``DBUser`` is the login user, the host and port are the proxy's;
- the principal's policies allow ``rds-db:connect`` on
  ``arn:aws:rds-db:<Region>:<AccountId>:dbuser:<proxy resource id>/<db user>`` (explicit Deny wins).

Why a login failed is logged (access key id, principal, reason), never the token itself.
"""

import hashlib
import ipaddress
import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from txrdsproxy.auth.policy import Decision, evaluate
from txrdsproxy.auth.sigv4 import (SignatureError, SigningKey, presigned_access_key,
                                   verify_authorization, verify_presigned)

RESOURCE_ID_RE = re.compile(r"^prx-[0-9a-f]{17}$")
DB_CONNECT_ACTION = "rds-db:connect"
DEFAULT_MAX_CONCURRENT = 256


def proxy_resource_id(name, configured=""):
    """The proxy's resource id: *configured* (DBProxyResourceId) or ``prx-`` + 17 hex characters
    derived from its name, so it stays the same across restarts and hosts."""
    if configured:
        return configured
    return "prx-" + hashlib.sha256(f"txrdsproxy:db-proxy:{name}".encode()).hexdigest()[:17]


def db_user_arn(region, account_id, resource_id, db_user):
    return f"arn:aws:rds-db:{region}:{account_id}:dbuser:{resource_id}/{db_user}"


def db_proxy_arn(region, account_id, resource_id):
    return f"arn:aws:rds:{region}:{account_id}:db-proxy:{resource_id}"


class AuthenticationFailed(Exception):
    """The IAM check failed; `reason` is for the log (never secret material), not for the client.
    `unauthorized`: the token was valid but the principal may not connect as that user."""

    def __init__(self, reason, principal=None, unauthorized=False):
        super().__init__(reason)
        self.reason = reason
        self.principal = principal
        self.unauthorized = unauthorized


class TooManyAuthentications(Exception):
    """More IAM authentications are in progress than the configured limit allows."""


class PrincipalStore:
    """Principals by access key id, resolving each key's secret through an ISecretsStore.

    *iam*: the config's `IAMConfig` (region, account_id, principals with access_keys and parsed
    policies).  *secrets*: any ISecretsStore; `get_value(arn)` must give the mapping holding
    ``secret_access_key``.  The store keeps no copy of secret material: a rotated key secret is
    seen at the next request.
    """

    log = Logger()

    def __init__(self, iam, secrets):
        self.region = iam.region
        self.account_id = iam.account_id
        self.secrets = secrets
        self._by_key = {}
        for principal in iam.principals:
            for key in principal.access_keys:
                self._by_key[key.access_key_id] = (principal, key)

    def principal_for(self, access_key_id):
        found = self._by_key.get(access_key_id)
        return None if found is None else found[0]

    def secret_arn_for(self, access_key_id):
        """-> the SecretArn holding *access_key_id*'s secret, or None for an unknown key."""
        found = self._by_key.get(access_key_id)
        return None if found is None else found[1].secret_arn

    def secret_arns(self):
        """Every SecretArn the store needs (a remote secrets store loads these ahead)."""
        return sorted({key.secret_arn for _, key in self._by_key.values()})

    def signing_key(self, access_key_id):
        """-> SigningKey for *access_key_id*, or None (unknown key, or its secret missing/malformed)."""
        found = self._by_key.get(access_key_id)
        if found is None:
            return None
        _, key = found
        value = self.secrets.get_value(key.secret_arn)
        secret = value.get("secret_access_key") if value is not None else None
        if not isinstance(secret, str) or not secret:
            self.log.warn("access key {akid}: secret {arn} has no secret_access_key",
                          akid=access_key_id, arn=key.secret_arn)
            return None
        token = value.get("session_token")
        return SigningKey(access_key_id, secret, token if isinstance(token, str) and token else None)

    def authorize(self, principal, action, resource):
        """-> Decision of *principal*'s policies for *action* on *resource*."""
        return evaluate(principal.policies, action, resource)

    def verify_request(self, method, url, headers, body, now, service="rds"):
        """Authorization-header SigV4 (management API) -> (principal, VerifiedRequest).

        Raises AuthenticationFailed (reason for the log) when the signature is not valid, it was
        made for another region or service, or the key belongs to no principal.  Deciding what
        the principal may do is the caller's: `authorize(principal, "rds:Action", arn)`.
        """
        try:
            verified = verify_authorization(method, url, headers, body, self.signing_key, now)
        except SignatureError as e:
            raise AuthenticationFailed(e.reason) from None
        if verified.region != self.region or verified.service != service:
            raise AuthenticationFailed(f"signed for {verified.service} in {verified.region}")
        return self.principal_for(verified.access_key_id), verified


class DbTokenVerifier:
    """Checks RDS IAM auth tokens for every proxy of the process (see the module docstring).

    *store*: the PrincipalStore (swapped by `update` on a reload); *clock*: IReactorTime;
    *max_concurrent*: the most authentications in progress at once over all proxies; above it
    `verify` fails with TooManyAuthentications.
    """

    log = Logger()

    def __init__(self, store, clock, max_concurrent=DEFAULT_MAX_CONCURRENT):
        self.store = store
        self.clock = clock
        self.max_concurrent = max_concurrent
        self.in_progress = 0

    def update(self, iam):
        """A reload: principals, policies and the limit from the new `IAMConfig`."""
        self.store = PrincipalStore(iam, self.store.secrets)
        self.max_concurrent = iam.max_concurrent_authentications

    def check(self, token, db_user, resource_id, hosts, port):
        """Synchronous check -> principal ARN; raises AuthenticationFailed."""
        store = self.store
        try:
            verified = verify_presigned(token, store.signing_key, self.clock.seconds())
        except SignatureError as e:
            raise AuthenticationFailed(e.reason) from None
        principal = store.principal_for(verified.access_key_id)
        if principal is None:  # signing_key found it, so this cannot happen short of a reload
            raise AuthenticationFailed("access key belongs to no principal")
        where = principal.arn
        if verified.service != "rds-db" or verified.region != store.region:
            raise AuthenticationFailed(f"token signed for {verified.service} in {verified.region}", where)
        params = verified.params
        if params.get("Action") != "connect":
            raise AuthenticationFailed("token Action is not connect", where)
        if params.get("DBUser") != db_user:
            raise AuthenticationFailed("token DBUser is not the login user", where)
        if verified.host.lower() not in hosts:
            raise AuthenticationFailed(f"token names host {verified.host}, not this proxy", where)
        if verified.port != port:
            raise AuthenticationFailed(f"token names port {verified.port}, not {port}", where)
        resource = db_user_arn(store.region, store.account_id, resource_id, db_user)
        decision = store.authorize(principal, DB_CONNECT_ACTION, resource)
        if decision is not Decision.ALLOW:
            why = "explicitly denied" if decision is Decision.EXPLICIT_DENY else "not allowed"
            raise AuthenticationFailed(f"{DB_CONNECT_ACTION} on {resource} {why}", where,
                                       unauthorized=True)
        return where

    def verify(self, token, db_user, resource_id, hosts, port):
        """Deferred[principal ARN] once the token passed; fails with AuthenticationFailed or
        TooManyAuthentications.  *hosts*: the names the token may give for the proxy; *port*:
        the proxy port the client reached.

        The signature work is done in the reactor thread (a few HMACs, well under a millisecond);
        what may take time is loading the access key's secret from a remote store the first
        time, and that is what the concurrency limit bounds.  The slot is held until the
        Deferred fires.  Cancelling it (the client went away) frees the slot.
        """
        if self.in_progress >= self.max_concurrent:
            self.log.warn("IAM authentication of {user} refused: {n} already in progress",
                          user=db_user, n=self.in_progress)
            return defer.fail(TooManyAuthentications())
        self.in_progress += 1
        arn = self.store.secret_arn_for(presigned_access_key(token))
        d = self.store.secrets.fetch(arn) if arn else defer.succeed(None)
        hosts = {h.lower() for h in hosts}
        d.addCallback(lambda _: self.check(token, db_user, resource_id, hosts, port))

        def failed(f):
            if f.check(AuthenticationFailed):
                e = f.value
                self.log.info("IAM authentication of {user} failed: {reason} (principal {principal})",
                              user=db_user, reason=e.reason, principal=e.principal or "-")
            elif not f.check(defer.CancelledError):
                self.log.failure("IAM authentication of {user}: unexpected error", f, user=db_user)
                f = Failure(AuthenticationFailed("internal error"))
            return f

        def release(result):
            self.in_progress -= 1
            return result

        return d.addErrback(failed).addBoth(release)


def login_hosts(endpoint, local_host):
    """The host names an IAM token may give for this proxy: its configured Endpoint, the address
    the client connected to, and localhost when that address is a loopback one."""
    hosts = {local_host}
    if endpoint:
        hosts.add(endpoint)
    try:
        if ipaddress.ip_address(local_host).is_loopback:
            hosts.add("localhost")
    except ValueError:
        pass
    return hosts


def verify_login(ctx, token, db_user, transport):
    """What a frontend calls with the password its client sent for an `IAMAuth: REQUIRED` user:
    -> Deferred[principal ARN]; fails with AuthenticationFailed, TooManyAuthentications.

    *ctx*: the ProxyContext (`iam`: the DbTokenVerifier, `config`: resource id and Endpoint);
    *transport*: the client's, whose local address is the proxy's host and port."""
    if ctx.iam is None:
        return defer.fail(AuthenticationFailed("no IAM principal store configured"))
    local = transport.getHost()
    return ctx.iam.verify(token, db_user, ctx.config.resource_id,
                          login_hosts(ctx.config.endpoint, local.host), local.port)
