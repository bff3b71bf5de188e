"""The leader's view of each follower: Progress (probe / replicate / snapshot) and Inflights.

Rules that hold here (as in etcd-io/raft's tracker package):
- Invariant: match_index < next_index, always.
- PROBE: at most one append is outstanding (`probe_sent`) until the follower answers, or a
  heartbeat response arrives at least a heartbeat interval after it was sent (`sent_tick`);
  used after a rejection or when the follower's state is unknown.
- REPLICATE: appends are pipelined optimistically (next_index advances as they are sent),
  bounded by `Inflights` in count and in bytes.
- SNAPSHOT: nothing is sent until the snapshot is reported as applied or failed, or (a lost
  report) two election timeouts after it was sent.
- A snapshot goes to a follower once per need: after it is reported delivered, the leader
  probes from just after it and waits for the follower's answer; answers to appends sent
  before it (a reconnecting follower answers every one queued while it was away) move the
  match index but neither restart replication below the snapshot nor count as rejections
  (`snapshot_answer_due`), either of which would send the same snapshot again.
"""

from __future__ import annotations

import enum
from collections import deque

LONG_AGO_TICK = -(1 << 62)
"""`Progress.sent_tick` of a follower nothing was sent to yet."""


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """A bounded FIFO of the appends sent and not yet acknowledged, by count and by bytes.

    Each element is (last index carried by the append, its payload bytes). The queue is full
    when it holds `capacity` messages or at least `bytes_max` bytes.
    """

    __slots__ = ("_queue", "bytes_in_flight", "bytes_max", "capacity")

    def __init__(self, capacity: int, bytes_max: int) -> None:
        self.capacity = capacity
        self.bytes_max = bytes_max
        self._queue: deque[tuple[int, int]] = deque()
        self.bytes_in_flight = 0

    def add(self, index: int, size_bytes: int) -> None:
        # Invariant: indexes are added in increasing order.
        assert not self.full(), "Inflights.add on a full window"
        assert not self._queue or self._queue[-1][0] < index, "Inflights indexes must grow"
        self._queue.append((index, size_bytes))
        self.bytes_in_flight += size_bytes

    def free_le(self, index: int) -> None:
        """Forget every append whose last index is <= `index` (the follower acknowledged it)."""
        queue = self._queue
        while queue and queue[0][0] <= index:
            self.bytes_in_flight -= queue.popleft()[1]

    def free_first_one(self) -> None:
        if self._queue:
            self.bytes_in_flight -= self._queue.popleft()[1]

    def full(self) -> bool:
        return len(self._queue) >= self.capacity or self.bytes_in_flight >= self.bytes_max

    def count(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        self._queue.clear()
        self.bytes_in_flight = 0


class Progress:
    """Replication state of one follower, kept by the leader (Raft §5.3 nextIndex/matchIndex)."""

    __slots__ = (
        "inflights",
        "match_index",
        "next_index",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "sent_tick",
        "snapshot_answer_due",
        "state",
    )

    def __init__(self, next_index: int, inflights: Inflights, match_index: int = 0) -> None:
        self.match_index = match_index
        self.next_index = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        # Set when any message from the follower arrives; cleared by check-quorum each
        # election timeout.
        self.recent_active = False
        self.pending_snapshot = 0
        # PROBE after a snapshot reported delivered, before any append went out since: the
        # follower's answer to the snapshot is due, and no rejection can be an answer to
        # anything sent since (`maybe_decrease_to` ignores them all).
        self.snapshot_answer_due = False
        # The leader's tick count when it last sent this follower an append or a snapshot:
        # heartbeat responses resend at most once per heartbeat interval, however many of
        # them arrive (they come with every ReadIndex round, and in bursts after a stall).
        self.sent_tick = LONG_AGO_TICK
        self.inflights = inflights

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snapshot_answer_due = False
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            # The follower has (or failed to get) the snapshot: probe from just after it.
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next_index = max(self.match_index + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next_index = self.match_index + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next_index = self.match_index + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged entries up to `index`; False if that is old news."""
        updated = False
        if self.match_index < index:
            self.match_index = index
            updated = True
            self.probe_sent = False
        if self.next_index < index + 1:
            self.next_index = index + 1
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an append whose previous index was `rejected`; back off to
        `match_hint` + 1 (fast backtracking, Raft §5.3). False if the rejection is stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match_index:
                return False
            self.next_index = self.match_index + 1
            return True
        if self.next_index - 1 != rejected or self.snapshot_answer_due:
            # Not an answer to the probe outstanding: to an earlier append, or (no append
            # sent since a snapshot) to one sent before the snapshot, at its index.
            return False
        self.next_index = max(min(rejected, match_hint + 1), self.match_index + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def sent_entries(self, count: int, size_bytes: int) -> None:
        """Record an append of `count` entries just sent to this follower."""
        if self.state is ProgressState.REPLICATE:
            if count > 0:
                self.next_index += count
                self.inflights.add(self.next_index - 1, size_bytes)
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True
            self.snapshot_answer_due = False
