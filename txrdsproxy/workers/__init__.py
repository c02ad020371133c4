"""`Workers: N`: several processes serving the same proxies, one reactor and one set of pools each.

    supervisor.py   the parent (twistd's process): checks and reserves every listening port,
                    starts the N workers, restarts one that dies, passes SIGHUP/SIGTERM on, and
                    serves the admin endpoint for the whole proxy (admin.py)
    worker.py       one worker process: the ordinary proxy service (service.make_service) with
                    its listeners opened with SO_REUSEPORT (listen.py), a private admin endpoint
                    and a peer socket (peer.py) on UNIX sockets in the run directory
    admin.py        the parent's admin resources: /metrics, /healthz, /console/data.json and
                    DescribeDBProxySessions merged over the workers, everything else (the rest
                    of the Query API, /reload, the console page) forwarded to one worker
    peer.py         cancel requests for a session another worker holds

With `Workers: 1` (the default) none of this runs: twistd's process is the proxy, as before.

The split of the database connection cap, and the session ids that name their worker, are
`WorkerIdentity`'s rules (below); docs/operations.md#workers says why each choice was made.
"""

from dataclasses import dataclass

__all__ = ["WorkerIdentity", "share_of"]


def share_of(total, index, count):
    """This worker's part of a cap of *total* split over *count* workers: floor(total / count),
    plus one for the first `total % count` workers, so the parts add up to *total* exactly."""
    return total // count + (1 if index < total % count else 0)


@dataclass(frozen=True)
class WorkerIdentity:
    """Which worker this process is (*index* of *count*) and where its peers' sockets are.

    Session ids (PostgreSQL's BackendKeyData process id, MySQL's connection id) are
    `index + count * k`, k = 1, 2, ...: unique over the workers, and `id % count` names the
    worker that holds the session, so a cancel request reaching another worker is routed."""

    index: int
    count: int
    rundir: str
    # {(address family, host, port): file descriptor}: listening sockets the parent opened and
    # handed down (after twistd dropped privileges, see listen.py), used instead of binding.
    inherited: tuple = ()
    # True: the supervisor runs the one health monitor of every proxy and this worker applies
    # its verdicts (workers/hub.py, failover/follower.py) instead of probing by itself.
    shared_monitor: bool = False

    def first_id(self):
        return self.count + self.index

    def owner(self, session_id):
        """-> the index of the worker holding session *session_id*."""
        return session_id % self.count

    def peer_socket(self, index):
        return f"{self.rundir}/peer-{index}.sock"

    def monitor_socket(self):
        return f"{self.rundir}/monitor.sock"

    def admin_socket(self, index=None):
        return f"{self.rundir}/admin-{self.index if index is None else index}.sock"
