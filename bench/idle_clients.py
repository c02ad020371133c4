"""Many idle client sessions: the proxy's memory per session and its login rate under a burst.

An asyncio client logs in N sessions at once (PostgreSQL: MD5 password; MySQL:
mysql_native_password; both built from the proxy's own sans-I/O wire helpers), keeps them open
and idle, and the caller reads the proxy's resident set size (/proc/<pid>/status VmRSS) before
and after.  Logins are counted as done when the proxy says so (ReadyForQuery / OK), so the rate
includes everything a real client waits for.  Figures, never assertions.
"""

import asyncio
import struct
import time

from txrdsproxy.wire.mysql import auth as myauth
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.pg import auth as pgauth

MY_CAPS = (P.CLIENT_LONG_PASSWORD | P.CLIENT_LONG_FLAG | P.CLIENT_PROTOCOL_41
           | P.CLIENT_TRANSACTIONS | P.CLIENT_SECURE_CONNECTION | P.CLIENT_PLUGIN_AUTH
           | P.CLIENT_MULTI_RESULTS | P.CLIENT_DEPRECATE_EOF)


def rss_kib(pid):
    """Resident set size of *pid* in KiB (Linux /proc)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def cpu_seconds(pid):
    """User + system CPU time of *pid* so far (/proc/<pid>/stat, clock ticks)."""
    import os
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _pg_message(reader):
    head = await reader.readexactly(5)
    kind, length = head[:1], struct.unpack("!I", head[1:])[0]
    return kind, await reader.readexactly(length - 4)


async def pg_login(host, port, user, password, database):
    """-> (reader, writer) of a session logged in with MD5 and at ReadyForQuery."""
    reader, writer = await asyncio.open_connection(host, port)
    body = struct.pack("!I", 196608) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (("user", user), ("database", database))) + b"\0"
    writer.write(struct.pack("!I", len(body) + 4) + body)
    while True:
        kind, payload = await _pg_message(reader)
        if kind == b"R":
            code = struct.unpack("!I", payload[:4])[0]
            if code == 5:
                answer = pgauth.md5_response(user, password, payload[4:8]) + b"\0"
                writer.write(b"p" + struct.pack("!I", len(answer) + 4) + answer)
            elif code != 0:
                raise RuntimeError("unexpected authentication request %d" % code)
        elif kind == b"E":
            raise RuntimeError("login refused: %r" % payload[:200])
        elif kind == b"Z":
            return reader, writer


async def _my_packet(reader):
    head = await reader.readexactly(4)
    length = head[0] | (head[1] << 8) | (head[2] << 16)
    return head[3], await reader.readexactly(length)


async def mysql_login(host, port, user, password, database):
    """-> (reader, writer) of a session logged in with mysql_native_password (OK received)."""
    reader, writer = await asyncio.open_connection(host, port)
    seq, payload = await _my_packet(reader)
    if payload[:1] == b"\xff":
        raise RuntimeError("refused at greeting: %r" % payload[:200])
    greeting = hs.parse_handshake_v10(payload)
    caps = (MY_CAPS & greeting.capabilities) | P.CLIENT_CONNECT_WITH_DB
    response = myauth.auth_response_for(hs.NATIVE_PASSWORD, password, greeting.scramble)
    packet = hs.build_handshake_response41(caps, user, response, database=database,
                                           auth_plugin=hs.NATIVE_PASSWORD)
    writer.write(P.encode_packet(packet, seq + 1))
    while True:
        seq, payload = await _my_packet(reader)
        if payload[:1] == b"\x00":
            return reader, writer
        if payload[:1] == b"\xfe":
            switch = hs.parse_auth_switch_request(payload)
            writer.write(P.encode_packet(
                myauth.auth_response_for(switch.plugin, password, switch.data), seq + 1))
            continue
        raise RuntimeError("login refused: %r" % payload[:200])


async def _burst(login, n, concurrency, sessions, errors):
    gate = asyncio.Semaphore(concurrency)

    async def one():
        async with gate:
            try:
                sessions.append(await asyncio.wait_for(login(), 120))
            except Exception as exc:  # counted and reported by the caller
                errors.append(repr(exc))

    await asyncio.gather(*(one() for _ in range(n)))


def measure(pid, login, total=10000, burst=5000, concurrency=1000):
    """Log in *burst* sessions at once (at most *concurrency* connecting at a time), then the
    rest up to *total*; all stay idle while the proxy's RSS is read.

    -> dict(burst_rate=logins/s of the burst, burst_cpu=proxy CPU s per login in the burst,
            rss_per_client=bytes, sessions=count, errors=[...]).
    """
    async def run():
        sessions, errors = [], []
        await asyncio.sleep(0)
        rss0 = rss_kib(pid)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await _burst(login, burst, concurrency, sessions, errors)
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        burst_ok = len(sessions)
        await _burst(login, total - burst, concurrency, sessions, errors)
        await asyncio.sleep(1.0)  # let the proxy finish what the last logins started
        rss1 = rss_kib(pid)
        out = dict(burst_rate=burst_ok / elapsed if elapsed else None,
                   burst_cpu=cpu / burst_ok if burst_ok else None,
                   rss_per_client=(rss1 - rss0) * 1024 / len(sessions) if sessions else None,
                   sessions=len(sessions), errors=errors)
        for _, writer in sessions:
            writer.close()
        await asyncio.sleep(0.5)
        return out

    return asyncio.run(run())
