"""A writer that vanishes without closing anything (issue 11 item 2), on both engines.

The writer's processes are stopped with SIGSTOP: its kernel still accepts TCP connections and
answers keepalives, so nothing on the proxy's side ever sees the connections break.  A session
whose statement is running there must get an error once the health checks have found the writer
gone (WriterMonitor.VANISHED_AFTER rounds without an answer), not when TCP gives up (never,
here), and its client connection must stay usable: once the standby/replica is promoted, the
next statement on the same connection runs there.  The bound checked is the proxy's configured
one (rounds of HealthCheckInterval plus the probe timeout) with a wide margin; the time taken is
printed, not asserted as performance.
"""

import os
import signal
import time

import psycopg  # test extras: a missing driver must fail, not skip
import pymysql

from txrdsproxy.failover.monitor import WriterMonitor

try:
    from failover_util import in_thread, writer_id
    from mysql_harness import start_mysql_proxy
except ImportError:
    from tests.integration.failover_util import in_thread, writer_id
    from tests.integration.mysql_harness import start_mysql_proxy

INTERVAL = 1.0
MARGIN = 30.0  # seconds on top of the configured bound: a loaded machine, thread scheduling


def _bound(proxy):
    """Seconds within which the proxy's configuration promises the error (plus MARGIN)."""
    monitor = proxy.ctx.monitor
    return WriterMonitor.VANISHED_AFTER * (monitor.interval + monitor.probe_timeout) + MARGIN




def _available(proxy):
    ctx = proxy.ctx
    return all(ctx.health.health_of(t).state == "AVAILABLE" for t in ctx.topology.targets)


class Frozen:
    """SIGSTOP a process group; on exit SIGKILL it and SIGCONT it (so it can be reaped)."""

    def __init__(self, pgid):
        self.pgid = pgid

    def __enter__(self):
        os.killpg(self.pgid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                pass


def test_pg_statement_on_a_vanished_writer_fails_in_bounded_time_and_the_session_goes_on(
        pg_server_factory, pg_proxy_factory, tmp_path):
    primary = pg_server_factory(max_connections=20)
    primary.create_user("app_scram", "vanish-pass", method="scram-sha-256")
    primary.create_database("appdb", owner="app_scram")
    standby = primary.start_standby(tmp_path / "standby")
    conns = []
    try:
        proxy = pg_proxy_factory(server=primary, targets=[primary, standby],
                                 HealthCheckInterval=INTERVAL, ConnectionBorrowTimeout=60)
        proxy.wait_for(lambda: proxy.call(_available, proxy), timeout=30, what="the first checks")
        victim = psycopg.connect(proxy.dsn(primary), autocommit=True)
        conns.append(victim)
        idle = psycopg.connect(proxy.dsn(primary), autocommit=True)
        conns.append(idle)
        assert victim.execute("select inet_server_port()").fetchone()[0] == primary.port
        assert idle.execute("select inet_server_port()").fetchone()[0] == primary.port

        thread, outcome = in_thread(lambda: victim.execute("select pg_sleep(600)").fetchone())
        proxy.wait_for(lambda: proxy.pool_state().get("borrowed") == 1, timeout=15,
                       what="the statement to run")
        bound = proxy.call(_bound, proxy)
        with Frozen(primary.proc.pid):  # the postmaster leads the group of all its processes
            stopped_at = time.monotonic()
            thread.join(bound)
            assert not thread.is_alive(), f"no error within {bound:g} s of the writer vanishing"
            (kind, error, at), = outcome
            assert kind == "error" and isinstance(error, psycopg.OperationalError), outcome
            assert error.sqlstate == "08006" and "outcome is unknown" in str(error), str(error)
            print(f"\nPostgreSQL: statement on the vanished writer failed after"
                  f" {at - stopped_at:.1f} s (HealthCheckInterval {INTERVAL:g} s)")
            assert not victim.closed
            proxy.wait_for(lambda: proxy.call(writer_id, proxy.ctx) is None, timeout=bound,
                           what="the writer to be lost")
            standby.promote()
            # the same client connections, on the promoted standby
            assert victim.execute("select inet_server_port(), pg_is_in_recovery()").fetchone() == (
                standby.port, False)
            assert idle.execute("select inet_server_port()").fetchone()[0] == standby.port
    finally:
        for conn in conns:
            conn.close()
        standby.stop()


def test_mysql_statement_on_a_vanished_writer_fails_in_bounded_time_and_the_session_goes_on(
        mariadb_replication_factory, tmp_path):
    primary, (replica,) = mariadb_replication_factory()
    proxy = start_mysql_proxy(tmp_path, primary, targets=[primary, replica],
                              HealthCheckInterval=INTERVAL, ConnectionBorrowTimeout=60)
    conns = []

    def connect():
        conn = pymysql.connect(host=proxy.host, port=proxy.port, user="app_native",
                               password=primary.users["app_native"], database="appdb",
                               autocommit=True, connect_timeout=30, read_timeout=300)
        conns.append(conn)
        return conn

    def one(conn, sql):
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()

    try:
        proxy.wait_for(lambda: proxy.call(_available, proxy), timeout=30, what="the first checks")
        victim, idle = connect(), connect()
        assert one(victim, "SELECT @@port")[0] == primary.port
        assert one(idle, "SELECT @@port")[0] == primary.port

        thread, outcome = in_thread(lambda: one(victim, "SELECT SLEEP(600)"))
        proxy.wait_for(lambda: proxy.pool_state().get("borrowed") == 1, timeout=15,
                       what="the statement to run")
        bound = proxy.call(_bound, proxy)
        with Frozen(primary.proc.pid):
            stopped_at = time.monotonic()
            thread.join(bound)
            assert not thread.is_alive(), f"no error within {bound:g} s of the writer vanishing"
            (kind, error, at), = outcome
            assert kind == "error" and isinstance(error, pymysql.err.OperationalError), outcome
            assert error.args == (2013, "Lost connection to the database during the command"), error.args
            print(f"\nMySQL: statement on the vanished writer failed after {at - stopped_at:.1f} s"
                  f" (HealthCheckInterval {INTERVAL:g} s)")
            proxy.wait_for(lambda: proxy.call(writer_id, proxy.ctx) is None, timeout=bound,
                           what="the writer to be lost")
            replica.promote()
            # the same client connections, on the promoted replica
            assert one(victim, "SELECT @@port, @@read_only") == (replica.port, 0)
            assert one(idle, "SELECT @@port")[0] == replica.port
    finally:
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
        proxy.stop()


def test_pg_statement_behind_a_network_cut_fails_in_bounded_time_and_the_session_goes_on(
        pg_server, pg_proxy_factory, tmp_path):
    """The network to the writer is cut (a FaultRelay stops forwarding every byte, both ways,
    on every connection, new ones included): same outcome as a stopped server.  The shared
    pg_server stays untouched; its copy (a standby made from it) is promoted."""
    from twisted.internet.threads import blockingCallFromThread

    from txrdsproxy.testing.faultrelay import FaultRelay
    try:
        from proxyutil import reactor_thread
    except ImportError:
        from tests.integration.proxyutil import reactor_thread

    reactor = reactor_thread()
    relay = FaultRelay(reactor, pg_server.host, pg_server.port)
    relay_port = blockingCallFromThread(reactor, relay.listen)

    class Behind:  # the writer as the proxy sees it: through the relay
        host, port = "127.0.0.1", relay_port

    standby = pg_server.start_standby(tmp_path / "standby")
    conns = []
    try:
        proxy = pg_proxy_factory(server=pg_server, targets=[Behind, standby],
                                 HealthCheckInterval=INTERVAL, ConnectionBorrowTimeout=60)
        proxy.wait_for(lambda: proxy.call(_available, proxy), timeout=30, what="the first checks")
        victim = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
        conns.append(victim)
        assert victim.execute("select inet_server_port()").fetchone()[0] == pg_server.port
        thread, outcome = in_thread(lambda: victim.execute("select pg_sleep(600)").fetchone())
        proxy.wait_for(lambda: proxy.pool_state().get("borrowed") == 1, timeout=15,
                       what="the statement to run")
        bound = proxy.call(_bound, proxy)
        blockingCallFromThread(reactor, relay.stall_all)
        cut_at = time.monotonic()
        thread.join(bound)
        assert not thread.is_alive(), f"no error within {bound:g} s of the network cut"
        (kind, error, at), = outcome
        assert kind == "error" and error.sqlstate == "08006", outcome
        assert "outcome is unknown" in str(error)
        print(f"\nPostgreSQL: statement behind the cut failed after {at - cut_at:.1f} s")
        proxy.wait_for(lambda: proxy.call(writer_id, proxy.ctx) is None, timeout=bound,
                       what="the writer to be lost")
        standby.promote()
        assert victim.execute("select inet_server_port(), pg_is_in_recovery()").fetchone() == (
            standby.port, False)
    finally:
        for conn in conns:
            conn.close()
        blockingCallFromThread(reactor, relay.stop)
        # the shared server's backend behind the cut still sleeps: end it
        pg_server.psql("select pg_terminate_backend(pid) from pg_stat_activity"
                       " where query = 'select pg_sleep(600)'")
        standby.stop()
