"""Isolation against a hostile authenticated client, on a real PostgreSQL 15 through the proxy.

The split-message attack (issue 6): Query("SELECT 1") followed by only the 5-byte header of a
CopyData.  If the proxy gave the connection back at ReadyForQuery, the server would still wait
for the CopyData body and the client's next bytes -- a whole `SET search_path = evil` -- would be
forwarded to whichever connection the session borrowed next and run there, on a pooled
connection other sessions use.  Here the connection stays with the session until the body is
sent (the server ignores CopyData outside COPY), other sessions are answered correctly on other
connections, and no session ever sees the hidden setting.
"""

import struct
import threading

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from proxyutil import raw_login, raw_query, read_messages
except ImportError:
    from tests.integration.proxyutil import raw_login, raw_query, read_messages


def _message(kind, body):
    return kind + struct.pack("!I", len(body) + 4) + body


def _query(sql):
    return _message(b"Q", sql.encode() + b"\0")


def _victim(proxy, pg_server, out):
    """Another client of the same user: what it sees, or the error it got."""
    try:
        with psycopg.connect(proxy.dsn(pg_server, user="app_md5", connect_timeout=20),
                             autocommit=True) as conn:
            out["path"] = conn.execute("show search_path").fetchone()[0]
            out["answer"] = conn.execute("select %s::int * 2", (21,)).fetchone()[0]
    except Exception as e:  # reported by the assertions below
        out["error"] = repr(e)


def test_split_message_attack_does_not_cross_sessions(pg_proxy_factory, pg_server):
    # One pooled connection: whoever comes next would get the attacker's half-written one.
    proxy = pg_proxy_factory(MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1,
                             ConnectionBorrowTimeout=30)
    default_path = pg_server.psql("show search_path", dbname="appdb").strip()
    sock, _ = raw_login(proxy, pg_server)
    # The hidden payload: whole messages if read on their own, 'SET search_path = evil' first.
    hidden = _query("SET search_path = evil") + _query("SELECT 'padding'")
    sock.sendall(_query("SELECT 1") + b"d" + struct.pack("!I", len(hidden) + 4))
    msgs = read_messages(sock, until=b"Z")
    assert [k for k, _ in msgs] == [b"T", b"D", b"C", b"Z"]
    # Another session asks for a connection now: it must wait for the attacker's to be whole.
    seen = {}
    victim = threading.Thread(target=_victim, args=(proxy, pg_server, seen), daemon=True)
    victim.start()
    proxy.wait_for(lambda: "borrowing" in proxy.session_states(), timeout=20,
                   what="the other session waiting for the only connection")
    assert not seen
    # The rest of the CopyData: the attacker's connection's server reads it as the body.
    sock.sendall(hidden)
    victim.join(30)
    assert seen == {"path": default_path, "answer": 42}
    assert raw_query(sock, "show search_path") == [[default_path]]
    # Later sessions, on the same pooled connection, never see the hidden setting either.
    for _ in range(3):
        again = {}
        _victim(proxy, pg_server, again)
        assert again == {"path": default_path, "answer": 42}
    sock.close()


def test_header_only_then_client_vanishes_closes_the_connection(pg_proxy_factory, pg_server):
    proxy = pg_proxy_factory(MaxConnectionsPercent=2, MaxIdleConnectionsPercent=2)
    sock, _ = raw_login(proxy, pg_server)
    (pid,) = raw_query(sock, "select pg_backend_pid()")[0]
    sock.sendall(_query("SELECT 1") + b"d" + struct.pack("!I", 1000))
    read_messages(sock, until=b"Z")
    sock.close()
    # The connection the server is mid-message on is closed, never lent again.
    proxy.wait_for(lambda: all(c.backend_pid != int(pid) for c in proxy.call(proxy.ctx.pool.connections)),
                   what="the half-written connection closed")
    with psycopg.connect(proxy.dsn(pg_server), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone()[0] == 1
