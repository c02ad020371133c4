"""Compatibility re-export: the real-server helpers live in `txrdsproxy.testing.servers`.

Kept so that test modules importing ``servers`` (rootdir-relative) or
``tests.integration.servers`` keep working; new code imports the package module.
"""

from txrdsproxy.testing.servers import *  # noqa: F401,F403
from txrdsproxy.testing.servers import __all__  # noqa: F401
