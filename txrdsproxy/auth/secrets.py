"""Credentials kept out of the application: secrets stores keyed by SecretArn.

Every store provides `ISecretsStore`.  A secret's value is a JSON object, the shape of a Secrets
Manager secret: database secrets hold ``{"username": ..., "password": ...}`` (looked up as
`Credentials`), IAM access-key secrets hold ``{"secret_access_key": ...}`` (looked up with
`get_value`).  Lookups never block: a store that reads a remote service (`auth/aws.py`) answers
from its cache and refreshes in the background.

The `file` backend reads a JSON object mapping SecretArn -> value.  It is read again when the
file's modification time, size or inode changes (a rotation by rename is noticed), so rotating a
password needs no restart.  A file that cannot be read or parsed at run time keeps the last good
contents in use and logs why, once per change; only a file that never loaded raises SecretError.
A file that others may read is warned about.  Derived verifiers (SCRAM keys, MySQL double SHA1)
are cached per secret *value*, so a rotation invalidates them by itself.
"""

import json
import os
import stat

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer


class SecretError(Exception):
    """The store could not be read or a secret is malformed; the message never holds a value."""


class ISecretsStore(Interface):
    """Where Auth entries' and IAM access keys' secrets come from (file, AWS, in memory)."""

    def get(arn):
        """-> `Credentials` of the database secret *arn*, or None.  Never blocks.  May raise
        SecretError when the store has never been readable."""

    def find_user(arns, username):
        """-> (arn, Credentials) of the first secret among *arns* for *username*, or None."""

    def get_value(arn):
        """-> the secret's whole value (a read-only `SecretValue` mapping), or None.  Never blocks."""

    def fetch(arn):
        """-> Deferred[SecretValue or None]: like `get_value`, but a remote store that has not
        loaded *arn* yet looks it up first (never fails: an unreachable service gives None)."""

    def watch(arns):
        """The configuration names these secrets (at start and after every reload: this is how a
        new Auth entry is picked up).  -> Deferred firing once they have been loaded (a local
        store: at once)."""


class ISecretsLoading(Interface):
    """A store that reads its secrets remotely after start (Backend aws): lookups made before
    a secret's first read has ended would answer "no such user".  Sessions ask it first."""

    def loading(arns):
        """-> None when none of *arns* is being read for the first time (lookups answer now, the
        usual case); else a Deferred[None] firing when those first reads have ended, well or not."""


class Credentials:
    """A database user name and password.  `repr` never shows the password."""

    __slots__ = ("username", "password", "arn", "_derived")

    def __init__(self, username, password, arn=""):
        self.username = username
        self.password = password
        self.arn = arn
        self._derived = {}

    def derived(self, kind, compute):
        """Return `compute(password)` computed once per (secret value, kind)."""
        try:
            return self._derived[kind]
        except KeyError:
            value = self._derived[kind] = compute(self.password)
            return value

    def __repr__(self):
        return f"<Credentials username={self.username!r} password=<redacted>>"

    __str__ = __repr__


class SecretValue(dict):
    """A secret's JSON object.  Its repr names the keys, never the values."""

    def __repr__(self):
        return f"<SecretValue keys={sorted(self)!r}>"

    __str__ = __repr__


def credentials_from(arn, value, old=None):
    """-> Credentials for a database secret value, *old* when it is unchanged (keeps its derived
    keys), or None when *value* is not a usable database secret (no string username, or an empty
    password: refused rather than letting a client in with an empty one)."""
    user, password = value.get("username"), value.get("password")
    if not (isinstance(user, str) and isinstance(password, str) and password):
        return None
    if old is not None and (old.username, old.password) == (user, password):
        return old
    return Credentials(user, password, arn)


class _Lookups:
    """`get`/`find_user`/`get_value` over ``self._values()`` and ``self._credentials()``."""

    def get(self, arn):
        return self._credentials().get(arn)

    def find_user(self, arns, username):
        creds_by_arn = self._credentials()
        for arn in arns:
            creds = creds_by_arn.get(arn)
            if creds is not None and creds.username == username:
                return arn, creds
        return None

    def get_value(self, arn):
        return self._values().get(arn)

    def fetch(self, arn):
        return defer.succeed(self.get_value(arn))

    def watch(self, arns):
        return defer.succeed(None)


@implementer(ISecretsStore)
class StaticSecretsStore(_Lookups):
    """Secrets held in memory (embedding, tests): *secrets* maps SecretArn -> value mapping."""

    def __init__(self, secrets):
        self.replace(secrets)

    def replace(self, secrets):
        """Swap the whole contents (a rotation); unchanged database secrets keep their derived keys."""
        old = getattr(self, "_creds", {})
        self._vals = {arn: SecretValue(v) for arn, v in secrets.items()}
        self._creds = {}
        for arn, v in self._vals.items():
            creds = credentials_from(arn, v, old.get(arn))
            if creds is not None:
                self._creds[arn] = creds

    def _values(self):
        return self._vals

    def _credentials(self):
        return self._creds


@implementer(ISecretsStore)
class FileSecretsStore(_Lookups):
    """The `file` backend (see the module docstring)."""

    log = Logger()

    def __init__(self, path):
        self.path = path
        self._stamp = None  # (mtime_ns, size, inode) of the contents in use
        self._bad_stamp = None  # the last stamp that failed to load (logged once)
        self._vals = None  # None until the file loaded once
        self._creds = {}
        self.load_errors = 0  # run-time reads that failed and kept the last good contents

    def warn_if_readable_by_others(self):
        """Log a warning when the file's mode lets users other than its owner (and group) read it."""
        try:
            mode = os.stat(self.path).st_mode
        except OSError:
            return False
        if mode & stat.S_IROTH:
            self.log.warn("secrets file {path} is readable by other users (mode {mode}); "
                          "chmod 600 it", path=self.path, mode=oct(stat.S_IMODE(mode)))
            return True
        return False

    def _refresh(self):
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._failed(("missing", e.errno), f"cannot read secrets file {self.path}: {e.strerror}")
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp or stamp == self._bad_stamp:
            if self._vals is None:
                raise SecretError(self._last_error)
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            self._failed(stamp, f"cannot read secrets file {self.path}: {e.strerror}")
            return
        except ValueError as e:
            self._failed(stamp, f"cannot parse secrets file {self.path}: {type(e).__name__}")
            return
        if not isinstance(data, dict):
            self._failed(stamp, f"secrets file {self.path} must hold a JSON object")
            return
        values, creds = {}, {}
        for arn, value in data.items():
            if not isinstance(value, dict):
                self.log.warn("secret {arn} ignored: its value must be a JSON object", arn=arn)
                continue
            values[arn] = SecretValue(value)
            found = credentials_from(arn, value, self._creds.get(arn))
            if found is not None:
                creds[arn] = found
            elif "username" in value or "password" in value:
                self.log.warn("secret {arn} ignored: needs a string username and a non-empty "
                              "string password", arn=arn)
        if self._vals is not None:
            self.log.info("secrets file {path} reloaded ({n} secrets)", path=self.path, n=len(values))
        self._vals, self._creds = values, creds
        self._stamp, self._bad_stamp = stamp, None

    def _failed(self, stamp, message):
        """A read failed: before the first good load it is an error; after it, the last good
        contents stay in use and the failure is logged once per file change."""
        self._last_error = message
        if self._vals is None:
            raise SecretError(message)
        if stamp != self._bad_stamp:
            self.load_errors += 1
            self.log.error("{message}; keeping the secrets loaded before", message=message)
        self._bad_stamp = stamp

    def _values(self):
        self._refresh()
        return self._vals

    def _credentials(self):
        self._refresh()
        return self._creds


def check_secrets(config):
    """Problems with the secrets every proxy's Auth entries (and IAM access keys) name -> messages.

    Run at load (and by --check-config) so a missing file, bad JSON, a SecretArn that is not in
    the store or a database secret with an empty password is reported with the config file and
    key path, not at the first client login.  Only the file backend can be checked offline.
    """
    if config.secrets.backend != "file" or not config.secrets.path:
        return []
    store = FileSecretsStore(config.secrets.path)
    try:
        store.get("")
    except SecretError as e:
        return [f"{config.source}: Secrets.Path: {e}"]
    problems = []
    for i, proxy in enumerate(config.proxies):
        for j, entry in enumerate(proxy.auth):
            if store.get(entry.secret_arn) is None:
                problems.append(
                    f"{config.source}: DBProxies[{i}].Auth[{j}].SecretArn: no secret {entry.secret_arn!r} "
                    f"with a string username and a non-empty password in {config.secrets.path}")
    iam = getattr(config, "iam", None)
    for i, principal in enumerate(iam.principals if iam is not None else ()):
        for j, key in enumerate(principal.access_keys):
            value = store.get_value(key.secret_arn)
            if value is None or not isinstance(value.get("secret_access_key"), str) \
                    or not value["secret_access_key"]:
                problems.append(
                    f"{config.source}: IAM.Principals[{i}].AccessKeys[{j}].SecretArn: no secret "
                    f"{key.secret_arn!r} with a non-empty secret_access_key in {config.secrets.path}")
    return problems


def config_secret_arns(config):
    """Every SecretArn a Config names: the proxies' Auth entries, their HealthCheck secrets and
    the IAM access keys."""
    arns = {entry.secret_arn for proxy in config.proxies for entry in proxy.auth}
    for proxy in config.proxies:
        checks = [proxy.health_check] + [t.health_check for t in proxy.target_group.targets]
        arns.update(c.secret_arn for c in checks if c is not None and c.secret_arn)
    arns.update(key.secret_arn for p in config.iam.principals for key in p.access_keys)
    return sorted(arns)


def build_secrets_store(secrets_config, reactor):
    """-> the ISecretsStore a configuration's `Secrets` section asks for (the composition root
    calls this once; a reload keeps the store and calls its `watch` with the new ARNs).  The aws
    store is a twisted Service (its background refresh): the caller parents it."""
    if secrets_config.backend == "aws":
        from txrdsproxy.auth.aws import AwsSecretsStore
        return AwsSecretsStore(reactor, secrets_config.region, secrets_config.endpoint_url,
                               secrets_config.refresh_interval)
    store = FileSecretsStore(secrets_config.path)
    if secrets_config.path:
        store.warn_if_readable_by_others()
    return store
