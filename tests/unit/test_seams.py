"""DESIGN rule 11: every seam named there is a zope.interface, and each implementation is checked
with verifyObject (a method missing or with another signature fails here, not in production).

Seams: backend connections read by pool/metrics/admin (IBackendConnection: test_metrics.py),
secrets stores (ISecretsStore: test_secrets.py; ISecretsLoading: test_secrets_first_load.py),
the registry (IProxyRegistry: test_runtime.py), and here: what lends connections (ILeaseSource,
ILease), the session events a lent connection sends (IPgSessionEvents, IMySQLSessionEvents), and
the engine hooks the shared ClientSession calls (IEngineSession).
"""

from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyClass, verifyObject

from tests.unit import test_mysql_frontend as myfe
from tests.unit import test_pg_frontend as pgfe
from txrdsproxy.config.model import ConnectionPoolConfig
from txrdsproxy.pool.interfaces import ILease, ILeaseSource
from txrdsproxy.pool.lease import Lease
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy.interfaces import (
    IEngineSession, IMySQLSessionEvents, IPgSessionEvents, ISessionEvents,
)
from txrdsproxy.proxy.mysql_frontend import MySQLFrontend
from txrdsproxy.proxy.pg_frontend import PgFrontend
from txrdsproxy.testing.fakes import FakeLease, FakePgBackendConn, FakePool


def test_the_pool_and_its_fake_lend_through_the_same_interface():
    pool = BackendPool("p", connector=None, pool_config=ConnectionPoolConfig(), clock=Clock())
    assert verifyObject(ILeaseSource, pool)
    assert verifyObject(ILeaseSource, FakePool(FakePgBackendConn))


def test_leases_and_their_fake_provide_the_lease_interface():
    pool = SimpleNamespace(is_retired=lambda conn: False)  # what a Lease asks its pool
    assert verifyObject(ILease, Lease(pool=pool, conn=FakePgBackendConn(("u", "d")), now=0.0))
    assert verifyObject(ILease, FakeLease(FakePgBackendConn(("u", "d"))))


@pytest.mark.parametrize("make, events", [
    (lambda: pgfe.Harness().frontend, IPgSessionEvents),
    (lambda: myfe.Harness().frontend, IMySQLSessionEvents),
], ids=["postgresql", "mysql"])
def test_frontends_provide_the_session_events_and_the_engine_hooks(make, events):
    frontend = make()
    assert verifyObject(events, frontend) and ISessionEvents.providedBy(frontend)
    assert verifyObject(IEngineSession, frontend)


def test_the_declarations_are_on_the_classes():
    assert verifyClass(IEngineSession, PgFrontend) and verifyClass(IEngineSession, MySQLFrontend)
