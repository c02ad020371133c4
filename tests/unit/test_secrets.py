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


def test_stores_provide_the_interface():
    from zope.interface.verify import verifyObject

    from txrdsproxy.auth.secrets import ISecretsStore, StaticSecretsStore
    assert verifyObject(ISecretsStore, FileSecretsStore("/nonexistent"))
    assert verifyObject(ISecretsStore, StaticSecretsStore({}))
    from twisted.internet.task import Clock

    from txrdsproxy.auth.aws import AwsSecretsStore
    assert verifyObject(ISecretsStore, AwsSecretsStore(Clock(), "us-east-1"))


def test_whole_values_are_kept_and_never_shown(tmp_path):
    path = tmp_path / "s.json"
    write(path, {"key": {"secret_access_key": "AKsecret-value"}, ARN: {"username": "app", "password": "pw"}})
    store = FileSecretsStore(str(path))
    value = store.get_value("key")
    assert value["secret_access_key"] == "AKsecret-value"
    assert "AKsecret" not in repr(value) and "AKsecret" not in str(value)
    assert store.get("key") is None  # not a database secret
    fired = []
    store.fetch("key").addCallback(fired.append)
    assert fired == [value]


def test_empty_password_is_refused(tmp_path):
    write(tmp_path / "s.json", {ARN: {"username": "app", "password": ""}})
    assert FileSecretsStore(str(tmp_path / "s.json")).get(ARN) is None
    problems = check_secrets(config_for(tmp_path, [ARN]))
    assert len(problems) == 1 and "non-empty password" in problems[0]


def test_malformed_file_at_run_time_keeps_the_last_good_contents(tmp_path):
    from twisted.logger import globalLogPublisher, formatEvent
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        path = tmp_path / "s.json"
        write(path, {ARN: {"username": "app", "password": "good-pw"}})
        store = FileSecretsStore(str(path))
        assert store.get(ARN).password == "good-pw"
        path.write_text('{"half": ')
        os.utime(path, ns=(0, 5))
        for _ in range(3):
            assert store.get(ARN).password == "good-pw"
        assert store.load_errors == 1  # logged once per change, not per lookup
        path.unlink()
        assert store.get(ARN).password == "good-pw" and store.load_errors == 2
        write(path, {ARN: {"username": "app", "password": "new-pw"}})
        assert store.get(ARN).password == "new-pw"
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = [formatEvent(e) for e in events]
    assert any("cannot parse secrets file" in t and "keeping the secrets loaded before" in t for t in text)
    assert not any("good-pw" in t or "new-pw" in t for t in text)


def test_a_file_replaced_by_rename_is_noticed_by_its_inode(tmp_path):
    path = tmp_path / "s.json"
    write(path, {ARN: {"username": "app", "password": "aaaa"}})
    store = FileSecretsStore(str(path))
    assert store.get(ARN).password == "aaaa"
    st = os.stat(path)
    other = tmp_path / "new.json"
    write(other, {ARN: {"username": "app", "password": "bbbb"}})  # same size
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    os.rename(other, path)
    assert os.stat(path).st_ino != st.st_ino
    assert store.get(ARN).password == "bbbb"


def test_a_file_readable_by_others_is_warned_about(tmp_path):
    from twisted.logger import globalLogPublisher, formatEvent
    path = tmp_path / "s.json"
    write(path, {ARN: {"username": "app", "password": "pw"}})
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        os.chmod(path, 0o600)
        assert FileSecretsStore(str(path)).warn_if_readable_by_others() is False
        os.chmod(path, 0o644)
        assert FileSecretsStore(str(path)).warn_if_readable_by_others() is True
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("readable by other users" in formatEvent(e) for e in events)


def test_secret_scan_catches_a_value_in_text_or_in_a_field():
    from twisted.logger import Logger

    from txrdsproxy.testing.secretscan import SecretScan
    scan = SecretScan().install()
    try:
        scan.add("hunter2-password")
        Logger().info("login of {user}", user="app")
        scan.check()
        Logger().info("nothing shown", hidden="x hunter2-password y")
        with pytest.raises(AssertionError, match="1 log events hold a secret value"):
            scan.check()
        assert "hunter2" not in str(scan.leaks())
    finally:
        scan.uninstall()
