"""Top-level pytest configuration: engine neutral, kept minimal."""

import os


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
