"""The WriterMonitor's fencing decisions on disk, so that a restarted proxy keeps them.

"Never two writers" (failover/monitor.py) fences a former writer that was not a standby when the
writer moved off it: it is not made the writer again until it answers as a standby or is
registered again.  Kept in memory only, a restart would forget it, and a former writer that
came back read-write (a split brain) would be taken as the writer again from the configuration.
So the monitor writes, per proxy, the writer it last decided on and its fenced targets into one
small JSON file, and a monitor that starts reads it back:

    <StateDirectory>/rdsproxy-state.json
    {"version": 1,
     "proxies": {"app-pg": {"writer": "pg-2", "fenced": {"pg-1": "pg-2"}}}}

`fenced` maps a fenced former writer's RdsResourceId to the target promoted in its place.
Targets are named by RdsResourceId; an entry for a target the proxy no longer has is ignored
(and dropped at the next write).  The file is written whole and atomically (a temporary file in
the same directory, flushed to disk, then renamed over the old one), only when the decision
changes; a file that cannot be read or parsed is logged and treated as empty (no fencing
remembered), never a reason not to start.  With `Workers: N` only the supervisor's monitor
writes it.  How an operator clears a fence: docs/operations.md#never-two-writers.
"""

import json
import os
import tempfile

from twisted.logger import Logger

__all__ = ["FenceStore", "STATE_FILE"]

STATE_FILE = "rdsproxy-state.json"
VERSION = 1


class FenceStore:
    """The state file of one process (*path*); `for_proxy(name)` gives one proxy's view of it.

    Reads once (lazily) and keeps what it read; every `save` rewrites the whole file."""

    log = Logger()

    def __init__(self, path):
        self.path = path
        self._proxies = None  # name -> {"writer": id or None, "fenced": {id: id}}

    @classmethod
    def in_directory(cls, directory):
        return cls(os.path.join(directory, STATE_FILE))

    def _load(self):
        if self._proxies is not None:
            return self._proxies
        self._proxies = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return self._proxies
        except (OSError, ValueError) as e:
            self.log.error("state file {path} cannot be read ({error}); starting without the "
                           "fencing it may have held", path=self.path, error=str(e))
            return self._proxies
        proxies = data.get("proxies") if isinstance(data, dict) else None
        if not isinstance(proxies, dict):
            self.log.error("state file {path} is not a txrdsproxy state file; ignored", path=self.path)
            return self._proxies
        for name, entry in proxies.items():
            if not isinstance(entry, dict):
                continue
            writer = entry.get("writer")
            fenced = entry.get("fenced") or {}
            if not isinstance(fenced, dict):
                fenced = {}
            self._proxies[str(name)] = {
                "writer": writer if isinstance(writer, str) else None,
                "fenced": {str(k): str(v) for k, v in fenced.items()}}
        return self._proxies

    def read(self, proxy_name):
        """-> (writer id or None, {fenced id: promoted id}) remembered for *proxy_name*."""
        entry = self._load().get(proxy_name)
        if entry is None:
            return None, {}
        return entry["writer"], dict(entry["fenced"])

    def save(self, proxy_name, writer, fenced):
        """Remember *writer* (id or None) and *fenced* ({id: id}) for *proxy_name*; the file is
        rewritten atomically when that changes anything.  -> True when written.  An error is
        logged (the decision still holds in memory), never raised."""
        proxies = self._load()
        entry = {"writer": writer, "fenced": dict(fenced)}
        if proxies.get(proxy_name) == entry:
            return False
        proxies[proxy_name] = entry
        try:
            _write_atomically(self.path, {"version": VERSION, "proxies": proxies})
        except OSError as e:
            self.log.error("state file {path} cannot be written ({error}): the fencing of proxy "
                           "{name} holds until this process stops, not across a restart",
                           path=self.path, error=str(e), name=proxy_name)
            return False
        return True

    def for_proxy(self, name):
        return ProxyFences(self, name)


class ProxyFences:
    """One proxy's part of a FenceStore (what a WriterMonitor is given)."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def read(self):
        return self.store.read(self.name)

    def save(self, writer, fenced):
        return self.store.save(self.name, writer, fenced)


def _write_atomically(path, data):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".rdsproxy-state-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself on disk
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
