"""A MySQL client that vanishes in the middle of LOAD DATA LOCAL INFILE (real MariaDB).

While the client streams its file, the database connection waits for more data packets (or the
empty packet that ends the file): it stands in the middle of a statement.  Whatever the point
where the client goes, that connection must never serve another session: the proxy closes it,
the server aborts the statement (nothing loaded), and the next session gets a clean connection.
"""

import socket

import pytest

try:
    from mysql_harness import start_mysql_proxy
    from mysql_raw import CAPS, RawMySQL
except ImportError:
    from tests.integration.mysql_harness import start_mysql_proxy
    from tests.integration.mysql_raw import CAPS, RawMySQL
from txrdsproxy.wire.mysql import packets as P

TABLE = "infile_vanish_t"
ROWS = b"".join(b"%d\n" % i for i in range(2000))


@pytest.fixture(scope="module")
def infile_server(mariadb_server):
    mariadb_server.mariadb(f"CREATE TABLE IF NOT EXISTS appdb.{TABLE} (id INT)")
    mariadb_server.mariadb("SET GLOBAL local_infile = 1")
    return mariadb_server


def _ids(server):
    out = server.mariadb("SELECT id FROM information_schema.processlist WHERE user = 'app_native'")
    return {int(x) for x in out.split()}


# Where the client stops: (bytes it sends after the server's request, as a function of the data).
CUTS = {
    "before any data": lambda data: b"",
    "after whole data packets": lambda data: P.encode_packet(data[:1000], 2)
    + P.encode_packet(data[1000:], 3),
    "inside a data packet": lambda data: P.encode_packet(data, 2)[:700],
    "inside a header": lambda data: P.encode_packet(data, 2)[:2],
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_client_vanishing_mid_load_data_local_never_leaves_its_connection_in_the_pool(
        infile_server, tmp_path, cut):
    server = infile_server
    server.mariadb(f"DELETE FROM appdb.{TABLE}")
    proxy = start_mysql_proxy(tmp_path / "proxy", server, MaxConnectionsPercent=1)  # 1 connection
    try:
        victim = RawMySQL(proxy.host, proxy.port, "app_native", server.users["app_native"],
                          database="appdb", caps=CAPS | P.CLIENT_LOCAL_FILES)
        victim.query("SELECT 1")  # the pool's one connection exists
        [before] = _ids(server)
        victim.send(P.encode_packet(
            bytes((P.COM_QUERY,)) + f"LOAD DATA LOCAL INFILE 'rows.txt' INTO TABLE {TABLE}".encode(), 0))
        seq, payload = victim.packet()
        assert payload[:1] == b"\xfb"  # the server asks for the file
        victim.send(CUTS[cut](ROWS))
        victim.sock.shutdown(socket.SHUT_RDWR)
        victim.sock.close()
        # The proxy closes that database connection instead of returning it to the pool ...
        proxy.wait_for(lambda: before not in _ids(server), what="the connection closed")
        assert proxy.call(lambda: len(proxy.ctx.pool.connections())) == 0
        assert "client left mid-request" in proxy.logs.text()
        # ... the statement never completed, and the next session is served by a new one.
        other = RawMySQL(proxy.host, proxy.port, "app_native", server.users["app_native"],
                         database="appdb")
        assert other.query(f"SELECT COUNT(*) FROM {TABLE}") == [["0"]]
        assert _ids(server) and before not in _ids(server)
        other.close()
    finally:
        proxy.stop()
