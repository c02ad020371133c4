"""The example configurations in etc/ load with the proxy's own loader, and etc/rdsproxy.yaml
(which README.md presents as naming every key) names every key the loader reads.

A key added to the loader without a line in the example (or an example left behind by a changed
loader) fails here instead of in a new user's `twistd --check-config`."""

import glob
import os
import re
import shutil

import pytest

from txrdsproxy.config import load
from txrdsproxy.testing.certs import TestCA, write_self_signed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "etc", "*.yaml")))


def _copy_etc(tmp_path):
    """etc/ copied into *tmp_path*, with the certificate files etc/gateway.yaml names (the
    examples do not ship keys), so that loading never reads or writes the repository."""
    for name in os.listdir(os.path.join(ROOT, "etc")):
        shutil.copy(os.path.join(ROOT, "etc", name), tmp_path / name)
    write_self_signed(str(tmp_path), "gateway")
    TestCA(str(tmp_path), "db-ca")
    return tmp_path


def test_there_are_examples():
    names = [os.path.basename(p) for p in EXAMPLES]
    assert "rdsproxy.yaml" in names and "gateway.yaml" in names, names


@pytest.mark.parametrize("example", EXAMPLES, ids=os.path.basename)
def test_every_example_loads(example, tmp_path):
    folder = _copy_etc(tmp_path)
    config = load.load_config(str(folder / os.path.basename(example)))
    assert config.proxies, example
    for proxy in config.proxies:
        assert proxy.target_group.targets, proxy.name


def test_rdsproxy_example_names_every_key_the_loader_reads(tmp_path, monkeypatch):
    """Every key allowed in a mapping the loader checks while reading etc/rdsproxy.yaml appears
    in the file as `Key:` (set, or shown in a comment)."""
    seen = set()
    original = load._Node.mapping

    def recording(node, allowed):
        seen.update(allowed)
        return original(node, allowed)

    monkeypatch.setattr(load._Node, "mapping", recording)
    folder = _copy_etc(tmp_path)
    load.load_config(str(folder / "rdsproxy.yaml"))
    assert {"DBProxies", "StateDirectory", "MaxSessionReplaySize", "SessionPinningFilters"} <= seen
    with open(os.path.join(ROOT, "etc", "rdsproxy.yaml")) as f:
        text = f.read()
    missing = sorted(k for k in seen if not re.search(r"\b%s:" % re.escape(k), text))
    assert missing == [], "keys the loader reads but etc/rdsproxy.yaml never names: %s" % missing
