"""The Raft core's configuration: one frozen, keyword-only dataclass validated on creation.

Time is counted in ticks (the driver decides how long a tick is). The election timeout of a
node is randomized in [election_ticks, 2 * election_ticks) each time it resets (Raft §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftConfig:
    id: int
    # All voters including `id`, the configuration of a new cluster; used only when storage
    # holds no membership yet. Empty for a node joining an existing cluster: it starts with
    # no configuration, takes no part in elections, and learns the membership from the
    # leader (a snapshot or a CONF_CHANGE entry).
    peers: tuple[int, ...]
    election_ticks: int = 20
    heartbeat_ticks: int = 5
    check_quorum: bool = True
    pre_vote: bool = True
    max_size_per_message_bytes: int = 1 << 20
    max_inflight_messages: int = 256
    max_inflight_bytes: int = 32 << 20
    max_uncommitted_entries_bytes: int = 64 << 20
    # Committed entries handed out per Ready (at least one): bounds the work of one Ready,
    # e.g. when a restarted node replays a long log.
    max_committed_size_per_ready_bytes: int = 8 << 20
    # A snapshot sent and neither reported delivered or failed (`RawNode.report_snapshot`)
    # nor answered is sent again after this many ticks (0: two election timeouts). A
    # transport that always reports, as the server's does, can afford a long one: a large
    # snapshot takes longer than two election timeouts to travel.
    snapshot_timeout_ticks: int = 0
    # A learner is promoted only when at most this many entries behind the leader's log
    # (dissertation §4.2.1; Consul's 250).
    promote_lag_entries_max: int = 250
    # The state machine's applied index on restart: committed entries up to it are not
    # handed out again.
    applied: int = 0

    def __post_init__(self) -> None:
        if self.id < 1:
            raise ValueError(f"id must be >= 1, got {self.id}")
        if any(peer < 1 for peer in self.peers):
            raise ValueError(f"peers must be ids >= 1, got {self.peers}")
        if len(set(self.peers)) != len(self.peers):
            raise ValueError(f"peers must not repeat, got {self.peers}")
        if self.heartbeat_ticks < 1:
            raise ValueError(f"heartbeat_ticks must be >= 1, got {self.heartbeat_ticks}")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ValueError(
                f"election_ticks ({self.election_ticks}) must be > heartbeat_ticks "
                f"({self.heartbeat_ticks})"
            )
        if self.max_size_per_message_bytes < 1:
            raise ValueError("max_size_per_message_bytes must be >= 1")
        if self.max_inflight_messages < 1:
            raise ValueError("max_inflight_messages must be >= 1")
        if self.max_inflight_bytes < 1:
            raise ValueError("max_inflight_bytes must be >= 1")
        if self.max_uncommitted_entries_bytes < 1:
            raise ValueError("max_uncommitted_entries_bytes must be >= 1")
        if self.max_committed_size_per_ready_bytes < 1:
            raise ValueError("max_committed_size_per_ready_bytes must be >= 1")
        if self.snapshot_timeout_ticks < 0:
            raise ValueError("snapshot_timeout_ticks must be >= 0")
        if self.promote_lag_entries_max < 0:
            raise ValueError("promote_lag_entries_max must be >= 0")
        if self.applied < 0:
            raise ValueError(f"applied must be >= 0, got {self.applied}")
