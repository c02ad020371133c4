"""The configuration file as the one record of every proxy: how API changes persist.

The model (docs/operations.md, "How changes persist"):

- The file is the truth.  A change made through the management API is written into the file
  before it is reported done: the file is re-read, the change is made on its document, the
  result is validated as a whole (the same loader as at start), written to a temporary file
  beside it and renamed over it (atomic: a crash leaves the old or the new file, never half).
  Comments, key order and layout are kept (ruamel.yaml round trip).  A restart or a reload
  therefore finds every API change in the file.
- If the file was edited on disk since the process last read or wrote it, an API change is
  refused (nothing changes) and the operator is told to reload first: the API never writes over
  an edit it has not seen.
- Each API change is also noted, by key path, in a journal beside the file
  (`<file>.api-changes.json`).  When a reload or a start finds the file contradicting a
  journalled change (an older copy of the file was put back, a deployment tool rewrote it),
  the file wins, as the operator's latest word, and every contradicted change is reported
  (logged, and listed by `rdsproxy reload`) with the operation and time that made it.
"""

import copy
import datetime
import hashlib
import io
import json
import os

from txrdsproxy.config.load import ConfigError, parse_config


class ConfigConflict(Exception):
    """The file changed on disk since it was last read or written: reload before changing it."""


def _yaml():
    from ruamel.yaml import YAML
    yaml = YAML()  # round trip: comments and order kept
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    return yaml


def plain(node):
    """A ruamel document -> plain dicts, lists, str, int, float, bool (what the loader expects)."""
    from ruamel.yaml.scalarbool import ScalarBoolean
    if isinstance(node, dict):
        return {plain(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, ScalarBoolean) or isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def _digest(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ConfigStore:
    """Reads, edits and atomically rewrites one configuration file (see the module docstring)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.source = path
        self.base_dir = os.path.dirname(self.path)
        self.journal_path = self.path + ".api-changes.json"
        self.document = None
        self.digest = None
        self.journal = self._read_journal()

    # -- reading --------------------------------------------------------------------------------
    def _read_text(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"{self.source}: cannot read: {e.strerror}") from None

    def _parse(self, text):
        from ruamel.yaml.error import YAMLError
        try:
            document = _yaml().load(text)
        except YAMLError as e:
            raise ConfigError(f"{self.source}: not valid YAML: {e}") from None
        if document is None:
            document = {}
        return document, parse_config(plain(document), self.source, self.base_dir)

    def read(self):
        """Read and validate the file -> (document, Config, digest); ConfigError when unusable.
        Nothing is adopted: `adopt` does that once the caller has applied the Config."""
        text = self._read_text()
        document, config = self._parse(text)
        return document, config, _digest(text)

    def adopt(self, document, digest):
        self.document, self.digest = document, digest

    def load(self):
        """Read, validate and adopt the file -> Config (at start)."""
        document, config, digest = self.read()
        self.adopt(document, digest)
        return config

    # -- API changes --------------------------------------------------------------------------------
    def prepare(self, edit):
        """-> (document, Config) with *edit*(document) applied to a copy of the current one and
        the result validated.  Raises ConfigConflict when the file changed on disk since it was
        read or written, ConfigError when the edited configuration is not valid."""
        text = self._read_text()
        if self.digest is not None and _digest(text) != self.digest:
            raise ConfigConflict(
                f"{self.source} was changed on disk since it was loaded; reload it first "
                "(`rdsproxy reload` or SIGHUP), then repeat the change")
        document = copy.deepcopy(self.document if self.document is not None else self._parse(text)[0])
        edit(document)
        return document, parse_config(plain(document), self.source, self.base_dir)

    def commit(self, document, operation, paths):
        """Write *document* atomically and journal *paths* ({key path: value}) as set by
        *operation*.  Raises OSError when the file cannot be written (nothing is changed)."""
        out = io.StringIO()
        _yaml().dump(document, out)
        text = out.getvalue()
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.chmod(tmp, os.stat(self.path).st_mode & 0o7777)
            except OSError:
                pass
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.adopt(document, _digest(text))
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for path, value in paths.items():
            self.journal[path] = {"value": value, "operation": operation, "time": when}
        self._write_journal()

    # -- the journal of API changes ---------------------------------------------------------------------
    def _read_journal(self):
        try:
            with open(self.journal_path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_journal(self):
        tmp = self.journal_path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.journal, f, indent=1, sort_keys=True)
            os.replace(tmp, self.journal_path)
        except OSError:
            pass  # the journal only serves reports; the file itself was written

    def contradictions(self, document):
        """API changes (journalled) that *document* (a file about to be applied) undoes.

        -> [str] for the report; those entries leave the journal (the file won)."""
        data = plain(document)
        lines = []
        for path, entry in sorted(self.journal.items()):
            found, value = lookup(data, path)
            if found and value == entry["value"]:
                continue
            if not found and entry["value"] is None:
                continue
            now = "is absent" if not found else f"sets {json.dumps(value)}"
            lines.append(f"{path}: the file {now}, which undoes {json.dumps(entry['value'])} set by "
                         f"{entry['operation']} at {entry['time']}")
            del self.journal[path]
        if lines:
            self._write_journal()
        return lines


def lookup(data, path):
    """Key path `DBProxies[name=app].IdleClientTimeout` in plain *data* -> (found, value).

    A `[name=x]` step picks the list item whose DBProxyName (or RdsResourceId, TargetGroupName)
    is x, so a path stays true when items move."""
    node = data
    for step in _steps(path):
        if isinstance(step, tuple):
            if not isinstance(node, list):
                return False, None
            node = next((item for item in node if isinstance(item, dict)
                         and item.get(step[0]) == step[1]), None)
            if node is None:
                return False, None
        else:
            if not isinstance(node, dict) or step not in node:
                return False, None
            node = node[step]
    return True, node


def _steps(path):
    out = []
    for part in path.split("."):
        while "[" in part:
            head, rest = part.split("[", 1)
            if head:
                out.append(head)
            inner, part = rest.split("]", 1)
            key, value = inner.split("=", 1)
            out.append((key, value))
        if part:
            out.append(part)
    return out
