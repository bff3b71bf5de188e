"""How long a leader stuck in one save goes on sending keepalives: one policy for the server's
driver and the simulator.

While a save is slow, the server's driver neither ticks nor steps messages (persist before
send, Raft §5), so a leader would send no heartbeats and a slow disk would start elections.
It sends keepalives instead (heartbeats with commit 0, in a term that is already durable).
Without a bound, a save that never returns (a dying disk, an EBS or NFS stall, a process in
D state, a disk that stays full) kept the followers in lease for as long as it hung: they
refused every vote (Raft dissertation §4.2.3) and the stuck leader, not ticking, never ran
check-quorum, so the whole cluster was unavailable with it (issue 12). Keepalives therefore
stop once one save has stalled for `limit`, about one election timeout: the followers' election
timers then run out and they elect a new leader; when the old leader's save finally returns it
steps the newer term and becomes a follower.

Pure and unit-free: the server passes seconds of its monotonic clock, the simulator virtual
time units. No I/O, no clock of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeepalivePolicy:
    """Keepalives every `interval` during a stalled save while it has stalled less than
    `limit` (math.inf: without a bound, the behaviour before issue 12)."""

    interval: float
    limit: float

    def __post_init__(self) -> None:
        if not self.interval > 0 or not self.limit >= 0 or math.isnan(self.limit):
            raise ValueError(f"keepalive interval must be > 0 and limit >= 0: {self}")

    @classmethod
    def for_timeouts(cls, heartbeat_interval: float, election_timeout: float) -> KeepalivePolicy:
        """The policy for a node with these timeouts (in the same unit): a keepalive every
        heartbeat interval for at most one election timeout of one stalled save."""
        return cls(interval=heartbeat_interval, limit=election_timeout)

    def allows(self, stalled_for: float) -> bool:
        """Whether a keepalive may go out once the save has been stalled for `stalled_for`
        (measured from when the save began, across the retries of the same save)."""
        return stalled_for < self.limit
