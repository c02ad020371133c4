"""Session fixtures that start real PostgreSQL 15 and MariaDB servers.

Servers live under pytest's temp dirs on free ports of 127.0.0.1 and are
stopped when the session (or, for factories, the test) ends, even on failure.
Missing binaries skip the dependent tests, unless CI=true, where they fail.
"""

import os

import pytest

try:  # rootdir-relative "prepend" import (no __init__.py in tests/)
    from servers import (MARIADB_BINARIES, PG_BINARIES, MariaDBServer, PostgresServer,
                         require_binaries)
except ImportError:  # tests/ became a package
    from tests.integration.servers import (MARIADB_BINARIES, PG_BINARIES, MariaDBServer,
                                           PostgresServer, require_binaries)

PG_USERS = {
    # name: (password, pg_hba method)
    "app_scram": ("scram-pass-4f2a", "scram-sha-256"),
    "app_md5": ("md5-pass-9c1e", "md5"),
}
MARIADB_USERS = {
    # name: (password, auth plugin)
    "app_native": ("native-pass-7b3d", "mysql_native_password"),
}
APP_DB = "appdb"

# test_proxy_on_pypy.py runs the proxy under .venv-pypy3's twistd: only in `make test-pypy`
# (TXRDSPROXY_PYPY=1, where a missing .venv-pypy3 fails).  Elsewhere it is not collected at all,
# so `make test` neither needs PyPy nor reports a skip for it.
collect_ignore = [] if os.environ.get("TXRDSPROXY_PYPY") else ["test_proxy_on_pypy.py"]


def _skip_unless(*binaries):
    reason = require_binaries(*binaries)
    if reason:
        pytest.skip(reason)


def _stopping(server, request):
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory, request):
    """A PostgreSQL 15 server with users app_scram (scram-sha-256) and app_md5 (md5).

    ``pg_server.users`` maps user name -> password; ``pg_server.auth_methods``
    maps user name -> pg_hba method.  Both users belong to the NOLOGIN role
    ``appdb_owner`` that owns database "appdb", so both have owner rights on it.
    """
    _skip_unless(*PG_BINARIES)
    server = _stopping(PostgresServer(tmp_path_factory.mktemp("pg"), max_connections=100),
                       request)
    server.start()
    for name, (password, method) in PG_USERS.items():
        server.create_user(name, password, method=method)
    server.psql("CREATE ROLE appdb_owner NOLOGIN; GRANT appdb_owner TO %s"
                % ", ".join(PG_USERS))
    server.create_database(APP_DB, owner="appdb_owner")
    server.app_db = APP_DB
    return server


@pytest.fixture
def pg_server_factory(tmp_path_factory, request):
    """Start dedicated PostgreSQL servers: ``pg_server_factory(max_connections=20, settings=None)``.

    Returns started PostgresServer objects (superuser only; call create_user
    as needed); all are stopped after the test.
    """
    _skip_unless(*PG_BINARIES)

    def make(max_connections=20, settings=None):
        server = _stopping(PostgresServer(tmp_path_factory.mktemp("pgf"),
                                          max_connections=max_connections,
                                          settings=settings), request)
        return server.start()

    return make


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory, request):
    """A MariaDB server with user app_native (mysql_native_password) and database "appdb".

    ``mariadb_server.users`` maps user name -> password; the user has ALL on *.*.
    """
    _skip_unless(*MARIADB_BINARIES)
    server = _stopping(MariaDBServer(tmp_path_factory.mktemp("mariadb"), max_connections=100),
                       request)
    server.start()
    for name, (password, plugin) in MARIADB_USERS.items():
        server.create_user(name, password, plugin=plugin)
    server.create_database(APP_DB)
    server.app_db = APP_DB
    return server


@pytest.fixture
def mariadb_server_factory(tmp_path_factory, request):
    """Start dedicated MariaDB servers: ``mariadb_server_factory(max_connections=20,
    settings=None, binlog=False)``.  Returns started MariaDBServer objects (root only; call
    create_user as needed); all are stopped after the test."""
    _skip_unless(*MARIADB_BINARIES)

    def make(max_connections=20, settings=None, binlog=False):
        server = _stopping(MariaDBServer(tmp_path_factory.mktemp("mariadbf"),
                                         max_connections=max_connections, settings=settings,
                                         binlog=binlog), request)
        return server.start()

    return make


def _replicated_mariadb(tmp_path_factory, request, replicas, max_connections):
    primary = _stopping(MariaDBServer(tmp_path_factory.mktemp("maria-primary"),
                                      max_connections=max_connections, binlog=True), request)
    primary.start()
    for name, (password, plugin) in MARIADB_USERS.items():
        primary.create_user(name, password, plugin=plugin)  # without READ_ONLY ADMIN
    primary.create_database(APP_DB)
    primary.app_db = APP_DB
    out = []
    for i in range(replicas):
        replica = _stopping(primary.start_replica(tmp_path_factory.mktemp("maria-replica%d" % i)),
                            request)
        replica.app_db = APP_DB
        out.append(replica)
    return primary, out


@pytest.fixture
def mariadb_replication_factory(tmp_path_factory, request):
    """A MariaDB primary with GTID replicas, for tests that promote, demote or stop them:
    ``primary, replicas = mariadb_replication_factory(replicas=1, max_connections=40)``.

    The primary writes a binary log; each replica is read-only (read_only=1) and replicates
    with MASTER_USE_GTID=slave_pos.  User app_native (ALL on *.* except READ_ONLY ADMIN, so a
    write on a replica fails with 1290) and database "appdb" exist on all of them.
    ``replica.sync_with(primary)``, ``replica.promote()``, ``old.demote(new)``: see
    MariaDBServer.  Everything is stopped after the test."""
    _skip_unless(*MARIADB_BINARIES)

    def make(replicas=1, max_connections=40):
        return _replicated_mariadb(tmp_path_factory, request, replicas, max_connections)

    return make


@pytest.fixture(scope="session")
def mariadb_replicated(tmp_path_factory, request):
    """(primary, replica): a shared MariaDB primary and one GTID replica (see
    mariadb_replication_factory) for tests that only read and write through them.  Tests must
    not promote, demote or stop them (use the factory for that)."""
    _skip_unless(*MARIADB_BINARIES)
    primary, (replica,) = _replicated_mariadb(tmp_path_factory, request, 1, 100)
    return primary, replica


# -- the proxy in front of the servers (tests/integration/proxyutil.py) -------------------------

try:
    from proxyutil import InProcessProxy, write_proxy_config
except ImportError:
    from tests.integration.proxyutil import InProcessProxy, write_proxy_config


@pytest.fixture
def pg_proxy_factory(pg_server, tmp_path_factory, request):
    """Start in-process proxies over ``pg_server`` (or ``server=``) with a fresh config.

    ``pg_proxy_factory(server=None, **overrides)``: overrides named after ConnectionPoolConfig
    keys (MaxConnectionsPercent, ConnectionBorrowTimeout, ...) go into the pool config, others
    (IdleClientTimeout, MaxClientConnections, ...) onto the DBProxy.  Stopped after the test.
    """
    def make(server=None, **overrides):
        config = write_proxy_config(tmp_path_factory.mktemp("proxy"), server or pg_server,
                                    **overrides)
        proxy = InProcessProxy(config)
        request.addfinalizer(proxy.stop)
        return proxy

    return make


@pytest.fixture
def pg_proxy(pg_proxy_factory):
    """An in-process proxy over ``pg_server`` with the default test config."""
    return pg_proxy_factory()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run integration tests as plain functions, not in pytest-twisted's reactor greenlet.

    Their clients block the test thread; the proxy runs on its own reactor thread
    (proxyutil.reactor_thread).
    """
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    pyfuncitem.obj(**args)
    return True
