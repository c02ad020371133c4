"""The pool: cap on database connections under load, idle trimming, InitQuery, borrow timeout."""

import threading
import time

import pytest

import psycopg  # test extras: a missing driver must fail, not skip


def test_200_clients_50_transactions_cap_10(pg_server_factory, pg_proxy_factory):
    server = pg_server_factory(max_connections=100)
    server.create_user("app_scram", "load-pass", method="scram-sha-256")
    server.psql("create table hits (client int, n int)")
    server.psql("alter table hits owner to app_scram")
    proxy = pg_proxy_factory(server=server, MaxConnectionsPercent=10, MaxIdleConnectionsPercent=10,
                             ConnectionBorrowTimeout=120)
    clients, per_client = 200, 50
    stop = threading.Event()
    samples = []
    errors = []

    def sampler():
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            while not stop.is_set():
                samples.append(conn.execute(
                    "select count(*) from pg_stat_activity where usename = 'app_scram'"
                    " and backend_type = 'client backend'").fetchone()[0])
                time.sleep(0.02)

    # Start together, as far as the machine allows: on a loaded machine 200 SCRAM logins (client
    # PBKDF2 in 200 threads beside the proxy) can take longer than any fixed wait, and a broken
    # barrier used to fail the test although nothing was wrong.  Nothing asserted below depends
    # on the start being simultaneous (all rows, the cap, the spread over connections).
    start = threading.Barrier(clients)

    def client(i):
        try:
            # prepare_threshold=None: unnamed statements only (named ones would pin).
            with psycopg.connect(proxy.dsn(server, dbname="postgres"), autocommit=True,
                                 prepare_threshold=None) as conn:
                try:
                    start.wait(60)
                except threading.BrokenBarrierError:
                    pass  # some clients are still logging in: go on without them
                for n in range(per_client):
                    conn.execute("insert into hits values (%s, %s)", (i, n))
        except Exception as e:  # reported below
            errors.append(f"client {i}: {e!r}")

    watcher = threading.Thread(target=sampler)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        stop.set()
        watcher.join(10)
    assert not errors, errors[:5]
    assert server.psql("select count(*) from hits").strip() == str(clients * per_client)
    assert len(samples) > 5
    assert max(samples) <= 10, max(samples)
    assert max(samples) >= 2  # the work was really spread over several connections
    assert proxy.call(lambda: len(proxy.ctx.pool.connections())) <= 10


def test_idle_connections_above_max_idle_percent_are_closed(pg_proxy_factory, pg_server):
    # max_connections 100: cap 10, at most 2 idle.
    proxy = pg_proxy_factory(MaxConnectionsPercent=10, MaxIdleConnectionsPercent=2,
                             IdleConnectionTimeout=0.2)
    conns = [psycopg.connect(proxy.dsn(pg_server)) for _ in range(6)]
    try:
        pids = set()
        for c in conns:  # each holds an open transaction: six database connections at once
            pids.add(c.execute("select pg_backend_pid()").fetchone()[0])
        assert len(pids) == 6
        assert proxy.pool_state().get("borrowed") == 6
        for c in conns:
            c.commit()
        state = proxy.wait_for(lambda: (lambda s: s if s.get("idle", 0) <= 2 and len(s) == 1 else None)(
            proxy.pool_state()), what="idle connections trimmed")
        assert state == {"idle": 2}
        kept = set(proxy.call(lambda: [c.backend_pid for c in proxy.ctx.pool.connections()]))
        live = lambda: set(int(p) for p in pg_server.psql(  # noqa: E731
            "select pid from pg_stat_activity where pid in (%s)" % ",".join(map(str, pids))).split())
        proxy.wait_for(lambda: live() == kept, what="closed connections gone from the server")
        for c in conns:  # and the sessions go on
            assert c.execute("select 1").fetchone() == (1,)
            c.commit()
    finally:
        for c in conns:
            c.close()


def test_init_query_runs_on_each_new_connection(pg_proxy_factory, pg_server):
    pg_server.psql("drop table if exists initq_log; create table initq_log (pid int, who text);"
                   " alter table initq_log owner to appdb_owner", dbname="appdb")
    proxy = pg_proxy_factory(
        MaxConnectionsPercent=10,
        InitQuery="insert into initq_log values (pg_backend_pid(), current_user); "
                  "set application_name = 'initq'")
    conns = [psycopg.connect(proxy.dsn(pg_server, user=u))
             for u in ("app_scram", "app_scram", "app_scram", "app_md5")]
    try:
        for c in conns:
            c.execute("select 1")  # four transactions open at once: four connections
        pool_pids = set(proxy.call(lambda: [c.backend_pid for c in proxy.ctx.pool.connections()]))
        assert len(pool_pids) == 4
        logged = pg_server.psql("select pid || ' ' || who from initq_log order by who", dbname="appdb").split("\n")
        logged = [line.split() for line in logged if line]
        assert {int(p) for p, _ in logged} == pool_pids
        assert sorted(w for _, w in logged) == ["app_md5", "app_scram", "app_scram", "app_scram"]
        names = pg_server.psql("select distinct application_name from pg_stat_activity where pid in (%s)"
                               % ",".join(map(str, pool_pids))).split()
        assert names == ["initq"]
    finally:
        for c in conns:
            c.close()


def test_borrow_timeout_then_session_still_usable(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1,
                             ConnectionBorrowTimeout=1)
    holder = psycopg.connect(proxy.dsn(pg_server))
    waiter = psycopg.connect(proxy.dsn(pg_server), autocommit=True)
    try:
        holder.execute("select 1")  # an open transaction keeps the only connection
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as e:
            waiter.execute("select 2")
        waited = time.monotonic() - t0
        assert str(e.value).strip() == "Timed-out waiting to acquire database connection."
        assert 0.8 <= waited < 10
        assert not waiter.closed
        holder.commit()
        assert waiter.execute("select 3").fetchone() == (3,)
        # extended protocol batch that timed out mid-way: also recovered
        holder.execute("select 4")
        with pytest.raises(psycopg.OperationalError):
            waiter.execute("select %s::int", (5,))
        holder.rollback()
        assert waiter.execute("select %s::int", (6,)).fetchone() == (6,)
    finally:
        holder.close()
        waiter.close()
