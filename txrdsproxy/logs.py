"""JSON log lines for log shippers: one object per line, with twisted.logger's named fields.

The plain text format (twistd's) stays the default.  For JSON:

    twistd -n --logger=txrdsproxy.logs.json_observer rdsproxy --config etc/rdsproxy.yaml

(`--logger` names a factory of the first log observer; this one writes to standard output, or to
the file named by $TXRDSPROXY_JSON_LOG).  An application embedding the proxy uses
`JSONLinesObserver(file)` with `twisted.logger.globalLogBeginner.beginLoggingTo([...])`.

Each line: `time` (ISO 8601, UTC), `level`, `namespace` (the logger, e.g.
`txrdsproxy.pool.pool.BackendPool`), `message` (the formatted text), then the event's own named
fields (`pool`, `conn`, `reason`, `s`, ...) as JSON values: numbers and strings as they are,
other objects by their `str()` (sessions and connections have short, secret-free reprs), and for
a logged failure `error` and `traceback`.  Twisted's own `log_*` keys are left out.  A field that
cannot be written never loses the line.
"""

import datetime
import json
import os
import sys

from twisted.logger import formatEvent
from zope.interface import implementer
from twisted.logger import ILogObserver

_SCALARS = (str, int, float, bool, type(None))


def _value(value):
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (list, tuple)) and len(value) <= 50:
        return [_value(v) for v in value]
    if isinstance(value, dict) and len(value) <= 50:
        return {str(k): _value(v) for k, v in value.items()}
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def event_as_record(event):
    """-> the dict written for one twisted.logger event."""
    when = event.get("log_time")
    record = {
        "time": datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(
            timespec="milliseconds") if when is not None else None,
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
    }
    try:
        record["message"] = formatEvent(event)
    except Exception:
        record["message"] = str(event.get("log_format"))
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "isError",
                                                               "system", "time"):
            continue
        record[key] = _value(value)
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object on one line to *out* (a text file), flushed."""

    def __init__(self, out):
        self.out = out

    def __call__(self, event):
        try:
            line = json.dumps(event_as_record(event), ensure_ascii=False, default=str)
        except Exception as e:  # never lose the line because of one field
            line = json.dumps({"message": str(event.get("log_format")), "log_error": repr(e)})
        self.out.write(line + "\n")
        self.out.flush()


def json_observer():
    """twistd's `--logger` factory: JSON lines on stdout, or appended to $TXRDSPROXY_JSON_LOG."""
    path = os.environ.get("TXRDSPROXY_JSON_LOG")
    out = open(path, "a", encoding="utf-8") if path else sys.stdout
    return JSONLinesObserver(out)
