"""Which credentials (and database) each target's health check logs in with.

Engine-neutral: the connector runs the check (`probe_role(target, creds, database)`), this
module only chooses who logs in.  Per target, its `HealthCheck` or else the proxy's:

- SecretArn: that secret (a monitoring user of its own; it need not be one of the Auth entries);
- UserName: the Auth secret holding that user;
- neither: the proxy's Auth secrets in order, the first one the target accepts.  A check refused
  with AUTH_FAILURE tries the next secret at once (a user may exist on some targets only), and the
  secret that logged in is tried first next time, so a healthy target costs one login per round.

A target for which no credentials can be found fails its check with NoCheckCredentials (reason
AUTH_FAILURE; the description names the setting, never a secret value).
"""

from twisted.internet import defer
from twisted.logger import Logger

from txrdsproxy.failover.monitor import AUTH_FAILURE


class NoCheckCredentials(Exception):
    """No secret to log in with for a health check (its Description says which setting)."""


class HealthChecks:
    """`probe(target)` for the WriterMonitor of one proxy (*ctx*: its ProxyContext)."""

    log = Logger()

    def __init__(self, ctx):
        self.ctx = ctx
        self.working = {}  # target -> ARN of the Auth secret that last logged in there

    def settings(self, target):
        """-> the HealthCheckConfig that applies to *target*."""
        own = getattr(target, "health_check", None)
        return own if own is not None else self.ctx.config.health_check

    def candidates(self, target):
        """-> [(arn, Credentials)] to try, in order (secrets the store does not hold are left out),
        or a NoCheckCredentials saying what is missing."""
        check = self.settings(target)
        secrets = self.ctx.secrets
        if check.secret_arn:
            creds = secrets.get(check.secret_arn)
            if creds is None:
                return NoCheckCredentials(f"no secret {check.secret_arn} for health checks (HealthCheck SecretArn)")
            return [(check.secret_arn, creds)]
        arns = [entry.secret_arn for entry in self.ctx.config.auth]
        if check.user_name:
            found = secrets.find_user(arns, check.user_name)
            if found is None:
                return NoCheckCredentials(
                    f"no Auth secret for user {check.user_name} (HealthCheck UserName)")
            return [found]
        known = self.working.get(target)
        if known in arns:
            arns.remove(known)
            arns.insert(0, known)
        out = [(arn, secrets.get(arn)) for arn in arns]
        out = [(arn, creds) for arn, creds in out if creds is not None]
        return out or NoCheckCredentials("no Auth secret can be read for health checks")

    def failure_reason(self, failure):
        """TargetHealth reason of a failed check (the connector's reading, or AUTH_FAILURE for
        missing credentials)."""
        if failure.check(NoCheckCredentials):
            return AUTH_FAILURE
        return self.ctx.connector.failure_reason(failure)

    def probe(self, target):
        """-> Deferred[ProbeResult | role] of one check of *target* (see module docstring)."""
        found = self.candidates(target)
        if isinstance(found, Exception):
            return defer.fail(found)
        database = self.settings(target).database or None
        connector = self.ctx.connector
        remaining = list(found)

        def attempt():
            arn, creds = remaining.pop(0)
            d = connector.probe_role(target, creds, database)

            def worked(answer):
                self.working[target] = arn
                return answer

            def refused(failure):
                if remaining and connector.failure_reason(failure) == AUTH_FAILURE:
                    self.log.info("health check of {t} as {user} refused; trying the next Auth secret",
                                  t=target.rds_resource_id, user=creds.username)
                    return attempt()
                return failure

            return d.addCallbacks(worked, refused)

        return attempt()
