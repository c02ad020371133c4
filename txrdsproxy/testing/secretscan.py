"""Scan every log event for secret values (DESIGN rule 8: secrets never appear in logs).

`SecretScan` observes the global Twisted log publisher for as long as it is installed; tests add
the values that must never be logged (passwords, secret access keys, IAM tokens and their
signatures) and `check()` fails naming the event (not the value) that leaked one.  Events are
checked formatted and as `repr` of their fields, so a secret in a field that the format does not
show is caught too.
"""

import threading

from twisted.logger import formatEvent, globalLogPublisher


class SecretScan:
    def __init__(self):
        self.secrets = set()
        self.events = 0
        self._texts = []
        self._lock = threading.Lock()

    def add(self, *values):
        for value in values:
            if value and len(value) >= 6:  # short strings would match by accident
                self.secrets.add(value)

    def __call__(self, event):
        try:
            text = formatEvent(event)
        except Exception:
            text = ""
        fields = repr({k: v for k, v in event.items() if not k.startswith("log_")})
        with self._lock:
            self.events += 1
            self._texts.append(text + "\n" + fields)

    def install(self):
        globalLogPublisher.addObserver(self)
        return self

    def uninstall(self):
        globalLogPublisher.removeObserver(self)

    def leaks(self):
        """-> [(event index, first 80 chars of the event with the secret masked)]."""
        out = []
        with self._lock:
            texts = list(self._texts)
        for i, text in enumerate(texts):
            for secret in self.secrets:
                if secret in text:
                    out.append((i, text.replace(secret, "<SECRET>")[:200]))
        return out

    def check(self):
        leaks = self.leaks()
        assert not leaks, f"{len(leaks)} log events hold a secret value: {leaks[:3]}"
        assert self.events > 0, "no log event was captured: the scan would prove nothing"
