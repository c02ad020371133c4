"""MySQL proxies for the integration tests, on `proxyutil.InProcessProxy` (the reactor thread).

`write_mysql_config(dir, mariadb_server, **overrides)` writes secrets.json and proxy.yaml for an
EngineFamily MYSQL proxy in front of the fixture server; `start_mysql_proxy(...)` starts it.
"""

from pathlib import Path

import yaml

try:
    from proxyutil import POOL_KEYS, InProcessProxy, write_secrets
except ImportError:  # tests/ became a package
    from tests.integration.proxyutil import POOL_KEYS, InProcessProxy, write_secrets

NATIVE_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_native"
SHA2_ARN = "arn:aws:secretsmanager:local:000000000000:secret:app_sha2"


def write_mysql_config(dir, server, secrets=None, name="test-mysql", **overrides):
    """-> path of proxy.yaml.  *secrets*: {arn: (user, password, ClientPasswordAuthType)}."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    entries = {NATIVE_ARN: ("app_native", server.users["app_native"], "MYSQL_NATIVE_PASSWORD")}
    entries.update(secrets or {})
    write_secrets(dir / "secrets.json", {arn: (u, p) for arn, (u, p, _) in entries.items()})
    pool = {"MaxConnectionsPercent": 100, "MaxIdleConnectionsPercent": 50,
            "ConnectionBorrowTimeout": 30}
    proxy = {
        "DBProxyName": name,
        "EngineFamily": "MYSQL",
        "Listen": "tcp:0:interface=127.0.0.1",
        "Auth": [{"SecretArn": arn, "ClientPasswordAuthType": kind}
                 for arn, (_, _, kind) in entries.items()],
    }
    for key, value in overrides.items():
        (pool if key in POOL_KEYS else proxy)[key] = value
    if "MaxIdleConnectionsPercent" not in overrides:
        pool["MaxIdleConnectionsPercent"] = min(50, pool["MaxConnectionsPercent"])
    proxy["TargetGroups"] = [{
        "TargetGroupName": "default",
        "ConnectionPoolConfig": pool,
        "Targets": [{"RdsResourceId": "mariadb-1", "Endpoint": server.host, "Port": server.port}],
    }]
    config = {"Secrets": {"Backend": "file", "Path": "secrets.json"}, "DBProxies": [proxy]}
    path = dir / "proxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def start_mysql_proxy(dir, server, **kwargs):
    return InProcessProxy(write_mysql_config(dir, server, **kwargs))
