"""Behaviours found by running a driver's own test suite through the proxy (asyncpg 0.32's tests/).

Each test here pins down a proxy bug that suite found, on real PostgreSQL with the real driver.
"""

import asyncio


try:
    from proxyutil import (asyncpg, error_fields, needs_asyncpg, pg_running, raw_login, raw_query,
                           read_messages)
except ImportError:
    from tests.integration.proxyutil import (asyncpg, error_fields, needs_asyncpg, pg_running,
                                             raw_login, raw_query, read_messages)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@needs_asyncpg
def test_fatal_from_the_server_reaches_the_client_as_its_last_word(pg_proxy, pg_server):
    """pg_terminate_backend under a running query: the client sees the server's FATAL 57P01
    (asyncpg: "closed in the middle of operation: terminating connection", caused by
    AdminShutdownError), not an error of the proxy's hiding it.  asyncpg test_execute.py
    test_execute_script_interrupted_by_server."""
    async def main():
        conn = await asyncpg.connect(host=pg_proxy.host, port=pg_proxy.port, user="app_scram",
                                     password=pg_server.users["app_scram"], database="appdb")
        try:
            await conn.execute("BEGIN")  # keeps the same database connection
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
            # Terminate the backend once it runs the query (a backend terminated while idle in
            # the transaction is another case).
            for _ in range(600):
                await asyncio.sleep(0.05)
                if pg_running(pg_server, "SELECT pg_sleep(30)", "PgSleep"):
                    break
            else:
                raise AssertionError("pg_sleep(30) never ran")
            pg_server.psql("SELECT pg_terminate_backend(%d)" % pid)
            try:
                await running
            except asyncpg.ConnectionDoesNotExistError as e:
                return e
            raise AssertionError("the query was not interrupted")
        finally:
            conn.terminate()

    error = _run(main())
    assert "closed in the middle of operation: terminating connection" in str(error)
    assert isinstance(error.__cause__, asyncpg.exceptions.AdminShutdownError)


def test_fatal_from_the_server_is_the_only_error_on_the_wire(pg_proxy, pg_server):
    """Byte level: exactly one ErrorResponse (the server's FATAL) and then end of stream."""
    sock, _ = raw_login(pg_proxy, pg_server)
    with sock:
        [[pid]] = raw_query(sock, "BEGIN; SELECT pg_backend_pid()")
        body = b"SELECT pg_sleep(30)\0"
        sock.sendall(b"Q" + (len(body) + 4).to_bytes(4, "big") + body)
        # Wait until the database is running it, then kill that backend.
        pg_proxy.wait_for(lambda: pg_server.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event = 'PgSleep'"
            % pid).strip() == "1", what="pg_sleep running")
        pg_server.psql("SELECT pg_terminate_backend(%s)" % pid)
        msgs = read_messages(sock, timeout=15)
    errors = [error_fields(p) for k, p in msgs if k == b"E"]
    assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "57P01")], msgs
    assert msgs[-1][0] == b"E"
    assert b"Z" not in [k for k, _ in msgs]
    assert "database ended the session: terminating connection" in pg_proxy.logs.text()


def _cancel_request(proxy, pid, secret):
    import socket
    import struct
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!III", 16, 80877102, pid) + struct.pack("!I", secret))
        assert sock.recv(1) == b""  # the proxy closes it once the cancel is done


def test_cancel_is_done_when_the_proxy_closes_the_cancel_socket(pg_proxy, pg_server):
    """As with PostgreSQL, closing the CancelRequest's socket means the signal was delivered, so
    a late cancel of a query that just ended can't hit the next one.  asyncpg relies on it: after a
    failed copy_records_to_table it sends CopyFail, then a CancelRequest, waits for that socket to
    close, then ROLLBACK, which the proxy's cancel, still on its way, used to cancel (asyncpg
    test_copy.py test_copy_records_to_table_generator_error, intermittently)."""
    import struct
    sock, login = raw_login(pg_proxy, pg_server)
    with sock:
        [key] = [p for k, p in login if k == b"K"]
        pid, secret = struct.unpack("!II", key)
        raw_query(sock, "BEGIN")  # the session keeps its database connection from here
        for _ in range(5):
            raw_query(sock, "SELECT 1")
            _cancel_request(pg_proxy, pid, secret)  # nothing is running: PostgreSQL ignores it
            assert raw_query(sock, "SELECT pg_sleep(0.3)::text, 'not cancelled'") == [
                ["", "not cancelled"]]
        raw_query(sock, "ROLLBACK")
