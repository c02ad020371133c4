"""Top-level pytest configuration: engine neutral, kept minimal."""

import os

from hypothesis import HealthCheck, settings

# Property tests are part of `make test`: the same examples every run (a CI failure reproduces,
# and a run never fails by the luck of its seed), no per-example deadline and no "too slow" data
# generation check (both measure the machine's load, not the code).  A test's own @settings wins
# for what it sets; `make fuzz` (TXRDSPROXY_FUZZ) sets derandomize=False on its tests for random
# exploration.
settings.register_profile("txrdsproxy", derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("txrdsproxy")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: needs real database servers (tests/integration)")


def pytest_collection_modifyitems(config, items):
    # Mark everything under tests/integration so `-m "not integration"` gives
    # the fast, socket-free unit suite.
    marker = __import__("pytest").mark.integration
    for item in items:
        if os.sep + "integration" + os.sep in str(item.fspath):
            item.add_marker(marker)
