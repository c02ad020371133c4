"""What the failover, switchover, reader-endpoint and vanished-writer tests share: the proxy's
view of its targets (read in the reactor thread, through InProcessProxy.call) and a PostgreSQL
primary with a streaming standby."""

import contextlib
import threading
import time

try:
    from servers import ServerError
except ImportError:
    from tests.integration.servers import ServerError


def writer_id(ctx):
    """The RdsResourceId of the target the proxy takes for the writer, or None."""
    writer = ctx.topology.current_writer()
    return None if writer is None else writer.rds_resource_id


def health_states(ctx):
    """{RdsResourceId: TargetHealth state}."""
    return {t.rds_resource_id: ctx.health.health_of(t).state for t in ctx.topology.targets}


def health_with_reasons(ctx):
    """{RdsResourceId: (TargetHealth state, reason)}."""
    return {t.rds_resource_id: (ctx.health.health_of(t).state, ctx.health.health_of(t).reason)
            for t in ctx.topology.targets}


def pool_by_target(ctx):
    """[(RdsResourceId, connection state name)] of the writer pool's connections, sorted."""
    return sorted((c.target.rds_resource_id, c.state.name) for c in ctx.pool.connections())


def wait_replicated(standby, sql, expected, timeout=60):  # a bound against a hang (loaded CI)
    """Poll *sql* on the PostgreSQL *standby* until it answers *expected* (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if standby.psql(sql, dbname="appdb").strip() == expected:
                return
        except ServerError:
            pass
        assert time.monotonic() < deadline, "the standby never caught up"
        time.sleep(0.05)


@contextlib.contextmanager
def pg_replicated(pg_server_factory, tmp_path, password, standbys=1, max_connections=30, settings=None):
    """A PostgreSQL primary (user app_scram with *password*, owner of database appdb) and
    *standbys* streaming standbys under *tmp_path* (*settings*: postgresql.conf lines of all),
    stopped on leaving: -> (primary, [standby])."""
    primary = pg_server_factory(max_connections=max_connections, settings=settings)
    primary.create_user("app_scram", password, method="scram-sha-256")
    primary.create_database("appdb", owner="app_scram")
    started = []
    try:
        for n in range(standbys):
            started.append(primary.start_standby(tmp_path / f"standby-{n + 1}" if standbys > 1
                                                 else tmp_path / "standby"))
        yield primary, started
    finally:
        for standby in started:
            standby.stop()


def in_thread(fn):
    """Run fn() in a thread -> (thread, outcome): outcome gets ("ok", value, t) or ("error", e, t)."""
    outcome = []

    def run():
        try:
            outcome.append(("ok", fn(), time.monotonic()))
        except Exception as e:  # the expected error; checked by the test
            outcome.append(("error", e, time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome
