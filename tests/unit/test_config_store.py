"""config/store.py and control.ProxyControl: API changes written into the file (atomically,
comments kept), refused over an unseen edit, journalled; a reload that undoes one reports it;
an invalid file changes nothing."""

import json
import os

import pytest
from twisted.internet.testing import MemoryReactorClock

from txrdsproxy.config.load import ConfigError
from txrdsproxy.config.store import ConfigConflict, ConfigStore, lookup
from txrdsproxy.control import ProxyControl, find_proxy, proxy_path
from txrdsproxy.registry import ProxyRegistry

from test_runtime import FakeSecrets

FILE = """\
# the operator's comment stays
Secrets: {Path: secrets.json}
DBProxies:
  - DBProxyName: app-pg            # inline comment
    EngineFamily: POSTGRESQL
    Listen: tcp:0:interface=127.0.0.1
    IdleClientTimeout: 1800
    Auth:
      - {SecretArn: "arn:a"}
    TargetGroups:
      - TargetGroupName: default
        Targets:
          - {RdsResourceId: pg-1, Endpoint: 127.0.0.1, Port: 5432}
"""


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "rdsproxy.yaml"
    path.write_text(FILE)
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"arn:a": {"username": "app", "password": "pw-1"}}))
    os.chmod(secrets, 0o600)
    store = ConfigStore(str(path))
    config = store.load()
    registry = ProxyRegistry(MemoryReactorClock(), FakeSecrets())
    for proxy in config.proxies:
        registry.add_proxy(proxy)
    registry.startService()
    return path, store, ProxyControl(registry, config, store), registry


def set_timeout(value):
    def edit(document):
        find_proxy(document, "app-pg")["IdleClientTimeout"] = value
    return edit


def test_an_api_change_is_written_with_comments_and_journalled(setup):
    path, store, control, registry = setup
    control.change("ModifyDBProxy", set_timeout(600), {proxy_path("app-pg", "IdleClientTimeout"): 600})
    text = path.read_text()
    assert "# the operator's comment stays" in text and "# inline comment" in text
    assert "IdleClientTimeout: 600" in text
    assert registry.get("app-pg").config.idle_client_timeout == 600
    # the bound port replaced port 0, so a restart listens where clients were told to connect
    port = registry.get("app-pg").port.getHost().port
    assert f"Listen: tcp:{port}:interface=127.0.0.1" in text
    journal = json.loads(open(store.journal_path).read())
    entry = journal["DBProxies[DBProxyName=app-pg].IdleClientTimeout"]
    assert entry["value"] == 600 and entry["operation"] == "ModifyDBProxy"
    assert not [f for f in os.listdir(path.parent) if ".tmp" in f]  # nothing left behind


def test_an_invalid_change_writes_nothing_and_changes_nothing(setup):
    path, store, control, registry = setup
    with pytest.raises(ConfigError) as e:
        control.change("ModifyDBProxy", set_timeout(0), {})
    assert "DBProxies[0].IdleClientTimeout: must be between 1 and 28800" in str(e.value)
    assert path.read_text() == FILE and registry.get("app-pg").config.idle_client_timeout == 1800


def test_an_edit_on_disk_is_never_overwritten(setup):
    path, store, control, registry = setup
    path.write_text(FILE.replace("1800", "1200"))
    with pytest.raises(ConfigConflict) as e:
        control.change("ModifyDBProxy", set_timeout(600), {})
    assert "reload it first" in str(e.value)
    assert "1200" in path.read_text() and registry.get("app-pg").config.idle_client_timeout == 1800


def test_an_unwritable_file_undoes_the_live_change(setup, monkeypatch):
    path, store, control, registry = setup

    def fail(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store, "commit", fail)
    with pytest.raises(OSError):
        control.change("ModifyDBProxy", set_timeout(600), {})
    assert registry.get("app-pg").config.idle_client_timeout == 1800


def test_reload_applies_the_file_and_reports_undone_api_changes(setup):
    path, store, control, registry = setup
    control.change("ModifyDBProxy", set_timeout(600), {proxy_path("app-pg", "IdleClientTimeout"): 600})
    path.write_text(FILE.replace("IdleClientTimeout: 1800", "IdleClientTimeout: 900"))
    lines = []
    control.reload().addCallback(lines.extend).addErrback(lines.append)
    assert "changed proxy app-pg: idle_client_timeout" in lines, lines
    undone = [line for line in lines if "undoes an API change" in line]
    assert len(undone) == 1 and "IdleClientTimeout: the file sets 900, which undoes 600 set by ModifyDBProxy" in undone[0]
    assert registry.get("app-pg").config.idle_client_timeout == 900
    # reported once: the file won, the journal forgets it
    lines = []
    control.reload().addCallback(lines.extend)
    assert not [line for line in lines if "undoes" in line]


def test_reload_of_an_invalid_file_changes_nothing(setup):
    path, store, control, registry = setup
    path.write_text(FILE.replace("IdleClientTimeout: 1800", "IdleClientTimeout: soon"))
    failures = []
    control.reload().addErrback(failures.append)
    assert "DBProxies[0].IdleClientTimeout: must be a number" in failures[0].getErrorMessage()
    assert registry.get("app-pg").config.idle_client_timeout == 1800


def test_lookup_by_name_survives_reordering():
    data = {"DBProxies": [{"DBProxyName": "b", "X": 2}, {"DBProxyName": "a", "X": 1}]}
    assert lookup(data, "DBProxies[DBProxyName=a].X") == (True, 1)
    assert lookup(data, "DBProxies[DBProxyName=c].X") == (False, None)


def test_a_proxy_of_the_file_that_cannot_start_does_not_block_api_changes(tmp_path):
    """A reload added a proxy whose port is taken (reported); API changes to another proxy
    still work, and one to that proxy still says why it cannot start."""
    from twisted.internet.error import CannotListenError
    from txrdsproxy.runtime import ListenFailed

    class Busy(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            if port == 7001:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))
            return super().listenTCP(port, factory, backlog, interface)

    path = tmp_path / "rdsproxy.yaml"
    path.write_text(FILE)
    (tmp_path / "secrets.json").write_text(json.dumps({"arn:a": {"username": "app", "password": "pw"}}))
    os.chmod(tmp_path / "secrets.json", 0o600)
    store = ConfigStore(str(path))
    config = store.load()
    registry = ProxyRegistry(Busy(), FakeSecrets())
    for proxy in config.proxies:
        registry.add_proxy(proxy)
    registry.startService()
    control = ProxyControl(registry, config, store)
    path.write_text(FILE + FILE[FILE.index("  - DBProxyName"):].replace("app-pg", "busy-pg").replace(
        "tcp:0:", "tcp:7001:"))
    lines = []
    control.reload().addCallback(lines.extend)
    assert any(line.startswith("FAILED proxy busy-pg: proxy busy-pg cannot listen on tcp:7001") for line in lines)
    control.change("ModifyDBProxy", set_timeout(300), {})
    assert registry.get("app-pg").config.idle_client_timeout == 300

    def busy_timeout(document):
        find_proxy(document, "busy-pg")["IdleClientTimeout"] = 60
    with pytest.raises(ListenFailed):
        control.change("ModifyDBProxy", busy_timeout, {})
