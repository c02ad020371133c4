"""`Workers: N` pieces that need no process: the cap split, session ids naming their worker,
the config key, the merge of the workers' metrics, and cancel forwarding (fake transports,
task.Clock)."""

import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txrdsproxy.config.load import ConfigError, parse_config
from txrdsproxy.config.model import ConnectionPoolConfig
from txrdsproxy.pool.pool import BackendPool
from txrdsproxy.proxy.pg_frontend import PgFrontend
from txrdsproxy.testing.fakes import ClientTransport
from txrdsproxy.wire.mysql import errors as mysql_errors
from txrdsproxy.wire.pg import messages as msg
from txrdsproxy.workers import WorkerIdentity, share_of
from txrdsproxy.admin.querycodec import QueryError, encode_response, operation
from txrdsproxy.workers.admin import _HOP, ForwardedRequest, merge_console, merge_metrics, merge_sessions
from txrdsproxy.workers.peer import PEER_TIMEOUT, PeerFactory

try:
    from test_pg_frontend import FakeConnector, Harness
except ImportError:
    from tests.unit.test_pg_frontend import FakeConnector, Harness


# -- the cap split ---------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 64])
def test_shares_add_up_to_the_cap_and_differ_by_at_most_one(count):
    for total in range(0, 300):
        shares = [share_of(total, i, count) for i in range(count)]
        assert sum(shares) == total
        assert max(shares) - min(shares) <= 1
        assert shares == sorted(shares, reverse=True)  # the remainder goes to the first workers


def test_the_pool_caps_are_the_workers_share():
    pools = []
    for index in range(3):
        cfg = ConnectionPoolConfig(max_connections_percent=10, max_idle_connections_percent=5)
        pool = BackendPool("p", None, cfg, Clock())
        pool.db_max_connections = 100  # cap 10, idle cap 5
        pool.share = (index, 3)
        pools.append(pool)
    assert [p.max_connections for p in pools] == [4, 3, 3]
    assert [p.max_idle_connections for p in pools] == [2, 2, 1]
    alone = BackendPool("p", None, ConnectionPoolConfig(max_connections_percent=10), Clock())
    alone.db_max_connections = 100
    assert alone.max_connections == 10  # Workers: 1: the whole cap


# -- session ids -----------------------------------------------------------------------------------

def test_session_ids_name_their_worker_and_never_collide():
    seen = set()
    for index in range(3):
        h = Harness()
        worker = WorkerIdentity(index, 3, "/run")
        h.ctx.join_worker(worker)
        ids = [h.ctx.next_id() for _ in range(50)]
        assert all(worker.owner(i) == index for i in ids)
        assert all(i > 0 for i in ids)
        assert not seen & set(ids)
        seen.update(ids)
        assert h.ctx.pool.share == (index, 3)


# -- the config key --------------------------------------------------------------------------------

def _config(workers, listen="tcp:6432"):
    return {"Secrets": {"Path": "s.json"}, "Workers": workers, "DBProxies": [{
        "DBProxyName": "p", "EngineFamily": "POSTGRESQL", "Listen": listen,
        "Auth": [{"SecretArn": "arn:a"}],
        "TargetGroups": [{"Targets": [{"RdsResourceId": "t", "Endpoint": "h", "Port": 5432}]}]}]}


def test_workers_key():
    assert parse_config(_config(3)).workers == 3
    assert parse_config({k: v for k, v in _config(1).items() if k != "Workers"}).workers == 1
    assert 1 <= parse_config(_config("auto")).workers <= 64
    for bad, text in [(0, "between 1 and 64"), (65, "between 1 and 64"), ("two", "integer or auto"),
                      (True, "integer or auto")]:
        with pytest.raises(ConfigError, match=text):
            parse_config(_config(bad), source="x.yaml")
    with pytest.raises(ConfigError, match=r"DBProxies\[0\]\.Listen: must be a tcp"):
        parse_config(_config(2, listen="unix:/tmp/p.sock"), source="x.yaml")
    assert parse_config(_config(1, listen="unix:/tmp/p.sock")).workers == 1


# -- metrics ---------------------------------------------------------------------------------------

W0 = """# HELP rdsproxy_client_connections Current client connections.
# TYPE rdsproxy_client_connections gauge
rdsproxy_client_connections{proxy_name="p"} 3.0
# HELP rdsproxy_query_requests_total Queries.
# TYPE rdsproxy_query_requests_total counter
rdsproxy_query_requests_total{proxy_name="p"} 10.0
# HELP rdsproxy_availability_percentage Availability.
# TYPE rdsproxy_availability_percentage gauge
rdsproxy_availability_percentage{proxy_name="p"} 100.0
# HELP process_resident_memory_bytes RSS.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1000.0
"""
W1 = W0.replace("} 3.0", "} 4.0").replace("} 10.0", "} 5.0").replace("} 100.0", "} 50.0") \
    .replace(" 1000.0", " 2000.0")


def test_merged_metrics_sum_what_adds_up_and_keep_the_rest_per_worker():
    merged = {m.name: m for m in merge_metrics([(0, W0), (1, W1)])}

    def values(name):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in merged[name].samples}

    assert values("rdsproxy_client_connections") == {
        ("rdsproxy_client_connections", (("proxy_name", "p"),)): 7.0}
    assert values("rdsproxy_query_requests")[
        ("rdsproxy_query_requests_total", (("proxy_name", "p"),))] == 15.0
    assert values("rdsproxy_availability_percentage") == {
        ("rdsproxy_availability_percentage", (("proxy_name", "p"),)): 50.0}
    assert values("process_resident_memory_bytes") == {
        ("process_resident_memory_bytes", (("worker", "0"),)): 1000.0,
        ("process_resident_memory_bytes", (("worker", "1"),)): 2000.0}


def _view(name, clients, waiting, longest, pinned, allowed, borrow):
    return {"name": name, "engine": "POSTGRESQL", "status": "available", "port": 5432,
            "figures": {"client_connections": clients, "client_connections_waiting": waiting,
                        "client_longest_wait_seconds": longest, "availability_percentage": [
                            {"labels": ["default", "WRITER"], "value": 100.0 if clients else 50.0}],
                        "max_database_connections_allowed": [
                            {"labels": ["default", "pg-1"], "value": allowed}]},
            "borrowLatency": borrow, "pinnedSessions": pinned}


def _session(sid, created):
    return {"SessionId": sid, "CreatedDate": created, "State": "pinned"}


def test_merged_console_combines_as_metrics_do_and_lists_every_workers_pins():
    class W:
        def __init__(self, index):
            self.index = index

        def as_dict(self):
            return {"index": self.index, "up": True}

    w0 = {"time": 10, "refreshSeconds": 3, "proxies": [
        _view("p", 3, 1, 0.5, [_session(4, "2026-12-03T10:00:02+00:00")], 3, {"sum": 1.0, "count": 4}),
        _view("q", 0, 0, 0.0, [], 1, None)]}
    w1 = {"time": 11, "refreshSeconds": 3, "proxies": [
        _view("p", 4, 2, 0.25, [_session(1, "2026-12-03T10:00:01+00:00"),
                                _session(3, "2026-12-03T10:00:03+00:00")], 2, {"sum": 0.5, "count": 1})]}
    merged = merge_console([(0, w0), (1, w1)], [W(0), W(1)])
    assert merged["time"] == 11 and merged["refreshSeconds"] == 3
    assert [p["name"] for p in merged["proxies"]] == ["p", "q"]
    p = merged["proxies"][0]
    assert p["figures"]["client_connections"] == 7
    assert p["figures"]["client_connections_waiting"] == 3
    assert p["figures"]["client_longest_wait_seconds"] == 0.5  # the longest, not a sum
    assert p["figures"]["availability_percentage"] == [{"labels": ["default", "WRITER"], "value": 100.0}]
    assert p["figures"]["max_database_connections_allowed"] == [{"labels": ["default", "pg-1"], "value": 5}]
    assert p["borrowLatency"] == {"sum": 1.5, "count": 5}
    assert [s["SessionId"] for s in p["pinnedSessions"]] == [1, 4, 3]  # oldest first
    assert merged["proxies"][1]["figures"]["client_connections"] == 0
    assert merged["workers"] == [{"index": 0, "up": True}, {"index": 1, "up": True}]
    assert w0["proxies"][0]["pinnedSessions"] == [_session(4, "2026-12-03T10:00:02+00:00")]  # untouched


def _sessions_xml(ids, start):
    import datetime
    op = operation("DescribeDBProxySessions")
    items = [{"SessionId": i, "DBProxyName": "p", "TLS": False, "State": "idle", "AgeSeconds": 1,
              "IdleSeconds": 1, "QueryRequests": 0,
              "CreatedDate": datetime.datetime(2026, 12, 3, 10, 0, start + n, tzinfo=datetime.timezone.utc)}
             for n, i in enumerate(ids)]
    return encode_response(op, {"DBProxySessions": items}, "w")


def test_merged_sessions_are_one_list_paged_by_the_parent():
    import botocore.parsers
    op = operation("DescribeDBProxySessions")
    answers = [_sessions_xml(range(0, 50, 2), 0), _sessions_xml(range(1, 51, 2), 0)]  # 25 + 25
    seen, marker = [], None
    for _ in range(3):
        form = {"Action": "DescribeDBProxySessions", "Version": "2014-10-31", "DBProxyName": "p",
                "MaxRecords": "20", **({"Marker": marker} if marker else {})}
        xml = merge_sessions(op, answers, form, "req-9")
        parsed = botocore.parsers.QueryParser().parse(
            {"body": xml, "headers": {}, "status_code": 200}, op.output_shape)
        assert parsed["ResponseMetadata"]["RequestId"] == "req-9"
        seen += [s["SessionId"] for s in parsed["DBProxySessions"]]
        marker = parsed.get("Marker")
        if not marker:
            break
    assert seen == list(range(50))  # oldest first (then by id), each once
    with pytest.raises(QueryError) as e:
        merge_sessions(op, answers, {"DBProxyName": "p", "MaxRecords": "5"}, "r")
    assert e.value.code == "InvalidParameterValue"
    with pytest.raises(QueryError):
        merge_sessions(op, answers, {"DBProxyName": "p", "Marker": "bm9wZQ=="}, "r")


def test_only_the_parents_private_requests_get_every_record():
    from twisted.web.test.requesthelper import DummyChannel

    from txrdsproxy.admin.operations import ALL_RECORDS, paginate
    request = ForwardedRequest(DummyChannel())
    assert not request.unpaged
    request.requestHeaders.setRawHeaders(b"x-rdsproxy-unpaged", [b"1"])
    assert request.unpaged
    assert paginate(list(range(250)), {"MaxRecords": ALL_RECORDS}) == (list(range(250)), None)
    assert len(paginate(list(range(250)), {})[0]) == 100
    assert b"x-rdsproxy-unpaged" in _HOP  # a client's own header never reaches a worker


# -- cancel requests -------------------------------------------------------------------------------

def _cancel(h, pid, secret):
    other = PgFrontend(h.ctx)
    transport = ClientTransport()
    other.makeConnection(transport)
    other.dataReceived(msg.cancel_request(pid, secret))
    return transport


def test_a_cancel_for_another_workers_session_is_passed_to_it(monkeypatch):
    from txrdsproxy.workers import peer
    h = Harness()
    h.login()
    h.ctx.connector = FakeConnector()
    h.ctx.worker = WorkerIdentity(0, 2, "/run")
    forwarded = []

    def forward(worker, owner, key, reactor):
        d = defer.Deferred()
        forwarded.append((owner, key, d))
        return d

    monkeypatch.setattr(peer, "forward_cancel", forward)
    transport = _cancel(h, 7, 1234)  # 7 % 2: worker 1's session
    [(owner, key, done)] = forwarded
    assert (owner, key) == (1, (7, 1234))
    assert not transport.disconnecting  # closed once the owner has sent it
    done.callback(None)
    assert transport.disconnecting
    assert h.ctx.connector.cancels == []
    # This worker's own id with a wrong secret: dropped here, nothing forwarded.
    assert _cancel(h, 8, 1234).disconnecting
    assert len(forwarded) == 1


class _Session:
    def __init__(self, connector):
        self.lease = type("Lease", (), {"conn": object()})()
        self.ctx = type("Ctx", (), {"connector": connector})()


def test_the_owner_sends_the_forwarded_cancel_and_closes_once_the_database_took_it():
    clock, connector = Clock(), FakeConnector()
    session = _Session(connector)
    factory = PeerFactory({(7, 1234): session}, clock)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    for byte in b"C" + msg.cancel_request(7, 1234)[8:]:  # the key, one byte at a time
        proto.dataReceived(bytes([byte]))
    [(conn, done)] = connector.cancels
    assert conn is session.lease.conn and not transport.disconnecting
    done.callback(None)
    assert transport.disconnecting
    proto.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_the_owner_closes_at_once_for_an_unknown_key_and_bounds_a_silent_peer():
    clock = Clock()
    factory = PeerFactory({}, clock)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"C" + msg.cancel_request(7, 1)[8:])
    assert transport.disconnecting
    silent = factory.buildProtocol(None)
    silent_transport = StringTransport()
    silent.makeConnection(silent_transport)
    silent.dataReceived(b"C\x00\x00")  # a cancel cut short
    clock.advance(PEER_TIMEOUT - 0.1)
    assert not silent_transport.disconnecting
    clock.advance(0.1)
    assert silent_transport.disconnecting  # aborted: every wait has an end


def test_unknown_thread_is_the_servers_error():
    payload = mysql_errors.unknown_thread(9)
    assert payload[1:3] == (1094).to_bytes(2, "little")
    assert payload.endswith(b"Unknown thread id: 9")


class _MyConn:
    def __init__(self, thread):
        self.handshake = type("Handshake", (), {"connection_id": thread})()


class _MySession:
    def __init__(self, ident, user, thread=None):
        self.id, self.user, self.closed = ident, user, False
        self.lease = None if thread is None else type("Lease", (), {"conn": _MyConn(thread)})()

    def _close_client(self):
        self.closed = True


class _MyCtx:
    def __init__(self, name, sessions):
        self.name, self.sessions = name, set(sessions)


def test_kill_passed_on_is_decided_by_the_owner():
    from txrdsproxy.workers.peer import kill_locally
    busy, idle, other = _MySession(3, "app", thread=77), _MySession(5, "app"), _MySession(7, "bob")
    contexts = [_MyCtx("my", [busy, idle, other]), _MyCtx("my2", [])]
    assert kill_locally(contexts, True, 3, "my", "app") == b"THREAD 77"
    assert kill_locally(contexts, True, 5, "my", "app") == b"OK"  # nothing running
    assert kill_locally(contexts, True, 7, "my", "app") == b"NOT_OWNER"
    assert kill_locally(contexts, False, 3, "my2", "app") == b"UNKNOWN"  # another proxy
    assert kill_locally(contexts, False, 9, "my", "app") == b"UNKNOWN"
    assert not busy.closed
    assert kill_locally(contexts, False, 3, "my", "app") == b"OK" and busy.closed
    assert not other.closed


def test_kill_request_whole_or_split_at_every_byte():
    from txrdsproxy.workers.peer import _kill_request
    busy = _MySession(2 ** 40 + 1, "äpp", thread=12)
    request = _kill_request(True, busy.id, "my-proxy", "äpp")
    for cut in range(len(request)):  # cut 0: whole in one read
        factory = PeerFactory({}, Clock(), lambda: [_MyCtx("my-proxy", [busy])])
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(request[:cut])
        assert transport.value() == b"" and not transport.disconnecting
        proto.dataReceived(request[cut:])
        assert transport.value() == b"THREAD 12" and transport.disconnecting


def test_peer_requests_of_unknown_kind_or_too_long_are_dropped():
    for data in (b"X", b"K" + b"\xff" * 4000):
        proto = PeerFactory({}, Clock()).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(data)
        assert transport.disconnecting and transport.value() == b""


# -- --uid: the parent hands its sockets down ------------------------------------------------------

class _RecordingReactor:
    """adoptStreamPort / spawnProcess recorded (nothing runs)."""

    def __init__(self):
        self.adopted, self.spawned = [], []

    def adoptStreamPort(self, fd, family, factory):
        import socket
        # what Twisted's adoptStreamPort does: socket.fromfd (on PyPy this makes the shared
        # socket blocking, on CPython it does not: both are simulated here)
        sock = socket.fromfd(fd, family, socket.SOCK_STREAM)
        os.set_blocking(fd, True)
        self.adopted.append((sock.getsockname(), family, factory))
        sock.close()
        return object()

    def seconds(self):
        return 0.0

    def spawnProcess(self, protocol, executable, argv, env=None, childFDs=None):
        self.spawned.append((argv, childFDs))

        class P:
            pid = 4242
        return P()


def test_a_worker_adopts_the_handed_down_socket_and_binds_any_other_itself():
    import socket
    from txrdsproxy.workers.listen import bind_reuseport, inherited_sockets, worker_binder
    assert worker_binder(WorkerIdentity(0, 2, "/nowhere")) is bind_reuseport  # nothing handed down
    parent = socket.socket()
    parent.bind(("127.0.0.1", 0))
    parent.listen(5)
    port = parent.getsockname()[1]
    try:
        inherited = inherited_sockets([parent.fileno()])
        assert inherited == (((socket.AF_INET, "127.0.0.1", port), parent.fileno()),)
        reactor = _RecordingReactor()
        bind = worker_binder(WorkerIdentity(0, 2, "/nowhere", inherited))
        bind(f"tcp:{port}:interface=127.0.0.1:backlog=100", "factory", reactor, "proxy p")
        assert reactor.adopted == [(("127.0.0.1", port), socket.AF_INET, "factory")]
        assert not os.get_blocking(parent.fileno())  # else the reactor's accept loop would block
        bind("tcp:0:interface=127.0.0.1", "other", reactor, "proxy q")  # not handed down: bound here
        assert reactor.adopted[1][0][1] not in (0, port) and reactor.adopted[1][2] == "other"
        assert parent.fileno() != -1  # the handed-down descriptor stays the parent's
    finally:
        parent.close()


@pytest.mark.parametrize("dropped", [False, True])
def test_the_supervisor_hands_each_worker_its_own_socket_only_when_twistd_dropped_privileges(
        monkeypatch, dropped):
    """Reserved as root: one socket per worker in the port's SO_REUSEPORT group, so the kernel
    balances over the workers (one shared socket lets whichever worker wakes first take every
    connection).  Handed down only when twistd dropped privileges; else one reservation stays,
    bound and never listening, and the workers bind their own."""
    import socket
    from txrdsproxy.workers import supervisor as sup_mod
    config = parse_config(_config(2, listen="tcp:0:interface=127.0.0.1"))
    reactor = _RecordingReactor()
    sup = sup_mod.WorkerSupervisor(config, "/etc/rdsproxy.yaml", reactor)
    euid = [0]
    monkeypatch.setattr(sup_mod.os, "geteuid", lambda: euid[0])
    sup.privilegedStartService()
    try:
        [socks] = sup._reserved
        assert len(socks) == 2 and len({s.getsockname() for s in socks}) == 1  # one port, 2 members
        euid[0] = 65534 if dropped else 0  # twistd --uid nobody runs between the two
        sup.startService()
        [socks] = sup._reserved
        assert len(reactor.spawned) == 2
        if dropped:
            for index, (argv, child_fds) in enumerate(reactor.spawned):
                assert argv[-2:] == ["--inherit", "3"] and child_fds[3] == socks[index].fileno()
            assert socks[0].fileno() != socks[1].fileno()
        else:
            for argv, child_fds in reactor.spawned:
                assert "--inherit" not in argv and set(child_fds) == {0, 1, 2}
            assert len(socks) == 1  # the extra members were closed
        listening = [s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in socks]
        assert listening == [int(dropped)] * len(socks)  # reserved only unless handed down
        port = socks[0].getsockname()[1]
        if dropped:  # the kernel spreads connections over both members
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
            try:
                accepted = []
                for s in socks:
                    s.setblocking(False)
                    n = 0
                    while True:
                        try:
                            s.accept()[0].close()
                        except BlockingIOError:
                            break
                        n += 1
                    accepted.append(n)
                assert sum(accepted) == 64 and min(accepted) > 0, accepted
            finally:
                for c in clients:
                    c.close()
    finally:
        for socks in sup._reserved:
            for s in socks:
                s.close()
        import shutil
        shutil.rmtree(sup.rundir, ignore_errors=True)


@pytest.mark.parametrize("euid", [0, 1000])
def test_reserving_as_another_user_keeps_one_socket_per_proxy(monkeypatch, euid):
    """Not root: twistd cannot drop privileges, so no socket per worker is kept for handing down."""
    from txrdsproxy.workers import supervisor as sup_mod
    config = parse_config(_config(3, listen="tcp:0:interface=127.0.0.1"))
    sup = sup_mod.WorkerSupervisor(config, "/etc/rdsproxy.yaml", _RecordingReactor())
    monkeypatch.setattr(sup_mod.os, "geteuid", lambda: euid)
    sup.privilegedStartService()
    try:
        assert [len(socks) for socks in sup._reserved] == [3 if euid == 0 else 1]
    finally:
        for socks in sup._reserved:
            for s in socks:
                s.close()
