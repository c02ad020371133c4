"""Secrets from AWS Secrets Manager (`Secrets: {Backend: aws, Region, EndpointUrl, RefreshInterval}`).

`AwsSecretsStore` provides `ISecretsStore` from a cache: lookups never block and never touch the
network.  The secrets the configuration names (`watch`, called at start and after every reload)
are read with botocore's ``GetSecretValue`` in the reactor's thread pool, then every
*RefreshInterval* seconds again, in the background.  A read that fails (service unreachable,
access denied, a value that is not a JSON object) keeps the last good value of that secret and
logs why (the ARN and the error code, never a value).  Credentials come from botocore's usual
chain (environment, shared files, instance roles).

Until the first read of a secret has ended, logins for it wait (`loading`; bounded by the
session's ClientAuthTimeout) instead of being refused as if the user had no secret.

A rotation in Secrets Manager therefore reaches the proxy within one interval: new database
connections log in with the new password (the pool's open connections stay, as the database
itself keeps sessions open across a password change), and clients log in with the new password.
"""

import json

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from zope.interface import implementer

from txrdsproxy.auth.secrets import (
    ISecretsLoading, ISecretsStore, SecretValue, _Lookups, credentials_from,
)


@implementer(ISecretsStore, ISecretsLoading)
class AwsSecretsStore(_Lookups, service.Service):
    """See the module docstring.  *client_factory*() -> a botocore secretsmanager client (made
    in a pool thread, once); default: from the region and endpoint URL."""

    log = Logger()

    def __init__(self, reactor, region, endpoint_url="", refresh_interval=300.0, client_factory=None):
        self.reactor = reactor
        self.region = region
        self.endpoint_url = endpoint_url or None
        self.refresh_interval = refresh_interval
        self._client_factory = client_factory or self._default_client
        self._client = None
        self._vals = {}
        self._creds = {}
        self._arns = set()
        self._loading = {}  # arn -> Deferred of a first load in progress
        self._loop = None
        self.refreshes = 0  # background rounds done
        self.read_errors = 0  # reads that failed and kept the last good value

    # -- ISecretsStore ---------------------------------------------------------------------------
    def _values(self):
        return self._vals

    def _credentials(self):
        return self._creds

    def fetch(self, arn):
        """Deferred[SecretValue or None]: cached at once, else read now (never fails)."""
        if arn in self._vals:
            return defer.succeed(self._vals[arn])
        self._arns.add(arn)
        return self._load([arn]).addCallback(lambda _: self._vals.get(arn))

    def watch(self, arns):
        """Remember *arns* for the background refresh; read the ones not cached yet.
        -> Deferred[None] once they were tried."""
        arns = set(arns)
        new = sorted(arns - set(self._vals))
        self._arns |= arns
        return self._load(new) if new else defer.succeed(None)

    def loading(self, arns):
        """-> None, or a Deferred[None] firing once the first reads of those of *arns* never read
        yet have ended (the proxy has just started or a reload named a new secret)."""
        vals, loading = self._vals, self._loading
        first = [loading[a] for a in arns if a in loading and a not in vals]
        if not first:
            return None
        return defer.gatherResults([shared.wait() for shared in first]).addCallback(lambda _: None)

    # -- background refresh -------------------------------------------------------------------------
    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.refresh_interval, now=False).addErrback(
            lambda f: self.log.failure("secrets refresh loop stopped", f))

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def refresh(self):
        """Read every watched secret again.  -> Deferred[None] (never fails)."""
        self.refreshes += 1
        return self._load(sorted(self._arns))

    def _load(self, arns):
        waiting = [self._loading[a] for a in arns if a in self._loading]
        todo = [a for a in arns if a not in self._loading]
        if todo:
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._read_all, todo)
            d.addCallback(self._apply)
            d.addErrback(lambda f: self.log.failure("reading secrets failed", f))
            shared = _Shared(d)
            for arn in todo:
                self._loading[arn] = shared
            d.addBoth(lambda _: [self._loading.pop(a, None) for a in todo])
            waiting.append(shared)
        return defer.gatherResults([w.wait() for w in waiting]).addCallback(lambda _: None)

    def _default_client(self):
        import botocore.session
        return botocore.session.get_session().create_client(
            "secretsmanager", region_name=self.region, endpoint_url=self.endpoint_url)

    def _read_all(self, arns):
        """In a pool thread: {arn: (value dict or None, error text or None)}."""
        if self._client is None:
            self._client = self._client_factory()
        out = {}
        for arn in arns:
            try:
                reply = self._client.get_secret_value(SecretId=arn)
                value = json.loads(reply["SecretString"])
                if not isinstance(value, dict):
                    raise ValueError("not a JSON object")
                out[arn] = (value, None)
            except Exception as e:  # botocore errors, unreachable endpoint, bad JSON
                code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
                out[arn] = (None, code or type(e).__name__)
        return out

    def _apply(self, results):
        """In the reactor thread: take the good values, keep the last good one for the rest."""
        for arn, (value, error) in results.items():
            if error is not None:
                self.read_errors += 1
                kept = "keeping the last good value" if arn in self._vals else "no value yet"
                self.log.warn("secret {arn}: cannot read from Secrets Manager ({error}); {kept}",
                              arn=arn, error=error, kept=kept)
                continue
            changed = arn in self._vals and self._vals[arn] != value
            self._vals[arn] = SecretValue(value)
            creds = credentials_from(arn, value, self._creds.get(arn))
            if creds is not None:
                self._creds[arn] = creds
            else:
                self._creds.pop(arn, None)
            if changed:
                self.log.info("secret {arn} changed in Secrets Manager (rotation picked up)", arn=arn)


class _Shared:
    """One load in progress that several callers wait for."""

    def __init__(self, d):
        self._waiters = []
        self._done = False
        d.addBoth(self._fire)

    def _fire(self, result):
        self._done = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)
        return result

    def wait(self):
        if self._done:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d
