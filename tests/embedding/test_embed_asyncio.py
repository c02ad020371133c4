"""An asyncio application (asyncioreactor + asyncpg) embedding a proxy, in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.embedding.conftest import APP_DB
from tests.integration.proxyutil import needs_asyncpg


@needs_asyncpg
def test_asyncio_application_queries_postgresql_through_the_embedded_proxy(pg_server):
    script = Path(__file__).with_name("asyncio_app.py")
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), pg_server.host, str(pg_server.port),
                           pg_server.users["app_scram"], APP_DB],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["future"] is True  # an asyncio future (made by txaio), awaited by async def
    assert out["stop_future"] is True
    assert out["sum"] == sum(i * 2 for i in range(20))
    assert out["user"] == "app_scram"
    assert out["after_stop"] == {}
