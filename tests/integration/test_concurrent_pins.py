"""Sessions that pin while their first borrow waits keep their own connection (found by `make soak`).

When every connection is busy, a session's SET is held until a connection is lent; it is
classified when the connection is attached, from the borrow's Deferred.  The pin must take
effect there, before the SET's ReadyForQuery, or the connection (carrying the SET) goes back
to the pool and the session "pins" on whatever connection it borrows next.
"""

import threading

import psycopg
import pytest


@pytest.mark.parametrize("warm", [True, False], ids=["warm-pool", "cold-pool"])
def test_concurrent_sessions_each_keep_their_own_set(pg_proxy_factory, pg_server, warm):
    proxy = pg_proxy_factory(MaxConnectionsPercent=20)
    if warm:
        with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as c:
            c.execute("select 1")
    seen, start = [], threading.Barrier(8)

    def session(i):
        with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as c:
            start.wait(30)
            c.execute(f"set soak.tag = 't{i}'")
            for _ in range(5):
                seen.append((i, c.execute("select current_setting('soak.tag', true)").fetchone()[0]))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(seen) == 40
    assert [(i, v) for i, v in seen if v != f"t{i}"] == []
    assert proxy.call(lambda: proxy.ctx.pin_counts) == {"set_variable": 8}
