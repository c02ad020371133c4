"""The file secrets store: lookups, reload on change, redaction, derived-key caching, checks."""

import json
import os

import pytest

from txrdsproxy.auth.secrets import Credentials, FileSecretsStore, SecretError, check_secrets
from txrdsproxy.config.load import parse_config

ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"


def write(path, data, bump=0):
    path.write_text(json.dumps(data))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump))


def test_lookup_by_arn_and_by_user(tmp_path):
    path = tmp_path / "s.json"
    write(path, {ARN: {"username": "app", "password": "pw"}, "other": {"username": "x", "password": "y"}})
    store = FileSecretsStore(str(path))
    assert store.get(ARN).username == "app"
    assert store.get("missing") is None
    arn, creds = store.find_user([ARN, "other"], "x")
    assert arn == "other" and creds.password == "y"
    assert store.find_user([ARN], "x") is None  # only the proxy's own secrets count
    assert store.find_user([ARN], "nobody") is None


def test_password_never_in_repr():
    creds = Credentials("app", "s3cret-value", ARN)
    assert "s3cret" not in repr(creds) and "s3cret" not in str(creds)


def test_reload_on_change_and_derived_keys_follow_the_secret_value(tmp_path):
    path = tmp_path / "s.json"
    write(path, {ARN: {"username": "app", "password": "one"}})
    store = FileSecretsStore(str(path))
    calls = []
    first = store.get(ARN).derived("k", lambda pw: calls.append(pw) or pw.upper())
    again = store.get(ARN).derived("k", lambda pw: calls.append(pw) or pw.upper())
    assert first == again == "ONE" and calls == ["one"]  # computed once per secret value
    write(path, {ARN: {"username": "app", "password": "two"}}, bump=10_000_000)
    assert store.get(ARN).derived("k", lambda pw: calls.append(pw) or pw.upper()) == "TWO"
    assert calls == ["one", "two"]


def test_unchanged_secret_keeps_its_derived_keys_across_a_reload(tmp_path):
    path = tmp_path / "s.json"
    write(path, {ARN: {"username": "app", "password": "one"}})
    store = FileSecretsStore(str(path))
    before = store.get(ARN)
    write(path, {ARN: {"username": "app", "password": "one"}, "new": {"username": "n", "password": "p"}},
          bump=10_000_000)
    assert store.get(ARN) is before and store.get("new") is not None


def test_malformed_entries_are_ignored_and_bad_files_raise(tmp_path):
    path = tmp_path / "s.json"
    write(path, {ARN: {"username": "app"}, "ok": {"username": "u", "password": "p"}})
    store = FileSecretsStore(str(path))
    assert store.get(ARN) is None and store.get("ok") is not None
    path.write_text("{not json")
    os.utime(path, ns=(0, 1))
    with pytest.raises(SecretError) as info:
        FileSecretsStore(str(path)).get(ARN)
    assert "cannot parse" in str(info.value)
    with pytest.raises(SecretError):
        FileSecretsStore(str(tmp_path / "missing.json")).get(ARN)


def config_for(tmp_path, arns):
    proxy = {
        "DBProxyName": "p", "EngineFamily": "POSTGRESQL", "Listen": "tcp:6432",
        "Auth": [{"SecretArn": a} for a in arns],
        "TargetGroups": [{"Targets": [{"RdsResourceId": "db", "Endpoint": "127.0.0.1", "Port": 5432}]}],
    }
    return parse_config({"Secrets": {"Path": "s.json"}, "DBProxies": [proxy]}, "cfg.yaml", str(tmp_path))


def test_check_secrets_names_the_file_and_key_path(tmp_path):
    assert check_secrets(config_for(tmp_path, [ARN])) == [
        f"cfg.yaml: Secrets.Path: cannot read secrets file {tmp_path / 's.json'}: No such file or directory"]
    write(tmp_path / "s.json", {ARN: {"username": "app", "password": "pw"}})
    assert check_secrets(config_for(tmp_path, [ARN])) == []
    problems = check_secrets(config_for(tmp_path, [ARN, "arn:missing"]))
    assert len(problems) == 1 and problems[0].startswith("cfg.yaml: DBProxies[0].Auth[1].SecretArn: no secret")
