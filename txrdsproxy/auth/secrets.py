"""Credentials kept out of the application: a secrets store keyed by SecretArn.

The `file` backend reads a JSON object mapping SecretArn -> {"username": ..., "password": ...}
(the shape of a Secrets Manager database secret).  The file is re-read when its modification time
changes, so rotating a password needs no restart.  Derived verifiers (SCRAM keys, MySQL double
SHA1) are cached per secret *value*, so a rotation invalidates them by itself.
"""

import json
import os

from twisted.logger import Logger


class SecretError(Exception):
    """The store could not be read or a secret is malformed; the message never holds a value."""


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


class FileSecretsStore:
    log = Logger()

    def __init__(self, path):
        self.path = path
        self._mtime = None
        self._by_arn = {}

    def _refresh(self):
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise SecretError(f"cannot read secrets file {self.path}: {e.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._mtime:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise SecretError(f"cannot parse secrets file {self.path}: {type(e).__name__}") from None
        if not isinstance(data, dict):
            raise SecretError(f"secrets file {self.path} must hold a JSON object")
        by_arn = {}
        for arn, value in data.items():
            if not (isinstance(value, dict) and isinstance(value.get("username"), str)
                    and isinstance(value.get("password"), str)):
                self.log.warn("secret {arn} ignored: needs string username and password", arn=arn)
                continue
            old = self._by_arn.get(arn)
            if old is not None and (old.username, old.password) == (value["username"], value["password"]):
                by_arn[arn] = old  # keep derived keys
            else:
                by_arn[arn] = Credentials(value["username"], value["password"], arn)
        self._by_arn = by_arn
        self._mtime = stamp

    def get(self, arn):
        """The Credentials for *arn*, or None when the store has no such secret."""
        self._refresh()
        return self._by_arn.get(arn)

    def find_user(self, arns, username):
        """The first secret among *arns* whose username is *username* -> (arn, Credentials) or None."""
        self._refresh()
        for arn in arns:
            creds = self._by_arn.get(arn)
            if creds is not None and creds.username == username:
                return arn, creds
        return None


def check_secrets(config):
    """Problems with the secrets every proxy's Auth entries name -> list of messages.

    Run at load (and by --check-config) so a missing file, bad JSON or a SecretArn that is not in
    the store is reported with the config file and key path, not at the first client login.
    """
    if not config.secrets.path:
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
                    f"with a string username and password in {config.secrets.path}")
    return problems
