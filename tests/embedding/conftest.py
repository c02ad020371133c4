"""Embedding tests: an application that runs txrdsproxy itself (txrdsproxy.embed), in front of the
real PostgreSQL server of the integration fixtures.  Twisted tests here run on pytest-twisted's
reactor (Deferred-returning tests); the asyncio application runs in a subprocess, because its
reactor (asyncioreactor) cannot be installed in a process where pytest-twisted installed another.
"""

import pytest

from tests.integration.conftest import APP_DB, PG_USERS, pg_server  # noqa: F401  (the fixture)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "embedding" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def proxy_dict(server, name="emb-pg", listen="tcp:0:interface=127.0.0.1"):
    """A configuration in the file's shape for one PostgreSQL proxy over *server*."""
    return {"DBProxies": [{
        "DBProxyName": name, "EngineFamily": "POSTGRESQL", "Listen": listen,
        "Auth": [{"SecretArn": "arn:app", "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256"}],
        "TargetGroups": [{"TargetGroupName": "default", "Targets": [
            {"RdsResourceId": "pg-1", "Endpoint": server.host, "Port": server.port}]}],
    }]}


def app_secrets(server):
    return {"arn:app": {"username": "app_scram", "password": server.users["app_scram"]}}
