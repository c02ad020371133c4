"""Health of a proxy's targets, as `describe-db-proxy-targets` reports it (TargetHealth).

Engine-neutral.  For now the evidence is the outcome of the connectors' own connection attempts:
a target nobody has tried yet is REGISTERING, the last attempt decides AVAILABLE or UNAVAILABLE.
The connectors call `record_success` / `record_failure`; the admin API reads `health_of`.
(Active health checks of standbys belong to the failover monitor, a later part.)
"""

from dataclasses import dataclass
from typing import Optional

REGISTERING = "REGISTERING"
AVAILABLE = "AVAILABLE"
UNAVAILABLE = "UNAVAILABLE"

# TargetHealth.Reason values (the RDS API's vocabulary) that we produce.
CONNECTION_FAILED = "CONNECTION_FAILED"
AUTH_FAILURE = "AUTH_FAILURE"


@dataclass(frozen=True)
class HealthRecord:
    """One target's health: State, and for UNAVAILABLE the Reason and Description."""

    state: str
    reason: Optional[str] = None
    description: Optional[str] = None
    since: Optional[float] = None  # clock time of the attempt that set it


_REGISTERING = HealthRecord(REGISTERING)


class TargetHealth:
    """The last known health of each target of one proxy (keyed by the target object)."""

    def __init__(self, clock=None):
        self.clock = clock
        self._records = {}

    def _now(self):
        return self.clock.seconds() if self.clock is not None else None

    def health_of(self, target):
        """-> HealthRecord; REGISTERING until a connection to *target* has been tried."""
        return self._records.get(target, _REGISTERING)

    def record_success(self, target):
        """A connection to *target* was opened and logged in."""
        self._records[target] = HealthRecord(AVAILABLE, since=self._now())

    def record_failure(self, target, reason, description):
        """A connection attempt to *target* failed; *reason* is CONNECTION_FAILED or AUTH_FAILURE."""
        self._records[target] = HealthRecord(UNAVAILABLE, reason, description, self._now())
