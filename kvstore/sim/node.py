"""One simulated node: the production `Replica` (RawNode + storage + kv state machine).

`SimNode.process_ready()` drives the replica through exactly the steps the server uses
(kvstore.replica): `prepare()` the Ready, `persist()` it, `send()` its messages, `apply()`
it, `advance()` (which may snapshot and compact the log). A crash can be injected between
those steps (`CrashStage`), and a crash loses everything that is not in the storage: the
Replica (core and state machine) is rebuilt from the `MemoryStorage` on restart, exactly as a
process restart does. The storage object itself survives crashes (it stands for the disk).

The node reports what it does to a `NodeObserver` (the simulation), which feeds the safety
checkers, the workload and the trace.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from typing import Protocol

from kvstore.errors import CompactedError, ResourceExhaustedError, UnavailableIndexError
from kvstore.kv.state_machine import KvConfig, StateMachine
from kvstore.raft.config import RaftConfig
from kvstore.raft.node import RawNode
from kvstore.raft.types import Entry, Message, ReadState, Ready, Role
from kvstore.replica import Replica, SnapshotJob
from kvstore.sim.invariants import StorageLogView
from kvstore.storage.memory import MemoryStorage


class CrashStage(enum.Enum):
    """Where in the Ready cycle a crash strikes."""

    NOW = "now"  # before the next Ready: stepped but unprocessed state is lost
    MID_PERSIST = "mid_persist"  # a torn save: a prefix of its records reached the disk
    MID_SEND = "mid_send"  # after persisting, having sent only some of the messages
    BEFORE_ADVANCE = "before_advance"  # after applying, before advance()


class NodeObserver(Protocol):
    def on_persisted(
        self, node: SimNode, ready: Ready, prev_term: int | None, role_changed: bool
    ) -> None: ...

    def on_torn_save(self, node: SimNode, entries: Sequence[Entry], prev_term: int | None) -> None:
        """A crash tore a save: `entries` are those of it that reached the disk."""
        ...

    def on_send(self, node: SimNode, messages: Sequence[Message]) -> None: ...

    def on_save_hung(self, node: SimNode, duration: int) -> None:
        """The node's save of its pending Ready hangs for `duration`."""
        ...

    def on_restored(self, node: SimNode, index: int) -> None: ...

    def on_applied(self, node: SimNode, entry: Entry) -> None: ...

    def on_state(self, node: SimNode) -> None:
        """The state machine finished applying a Ready's entries."""
        ...

    def on_read_states(self, node: SimNode, read_states: Sequence[ReadState]) -> None: ...

    def on_snapshot_taken(self, node: SimNode, index: int) -> None: ...

    def on_snapshot_begun(self, node: SimNode, job: SnapshotJob) -> None: ...


class SimNode:
    """A node that can crash and restart; see the module docstring."""

    def __init__(
        self, node_id: int, peers: tuple[int, ...], raft_config: RaftConfig, tick_period: int
    ) -> None:
        self.id = node_id
        # The bootstrap voters; empty for a node that joins an existing cluster.
        self.peers = peers
        # The disk was lost: this id never runs again (a new node replaces it).
        self.lost = False
        self.raft_config = raft_config
        self.storage = MemoryStorage()
        self.log = StorageLogView(self.storage)
        self.replica: Replica | None = None
        self.tick_period = tick_period
        self.next_tick = 0
        self.incarnation = 0
        self.crash_stage: CrashStage | None = None
        # A paused process (SIGSTOP): no ticks, no Ready processing, messages wait for it.
        self.paused = False
        # Client requests that reached the paused process: (kind, payload), handled on resume.
        self.held_requests: list[tuple[str, bytes]] = []
        # A hung disk: the next save that must sync hangs this long (0: no hang armed)...
        self.hang_next_save = 0
        # ...and the Ready whose save is hanging. Meanwhile the node neither ticks nor steps
        # messages, as the server's driver does while it waits for a save; it only sends the
        # keepalives the keepalive policy allows (Simulation.on_save_hung).
        self.hung_ready: Ready | None = None
        # What the node last said about itself in a Ready (persisted or soft state).
        self.term = 0
        # The state machine's configuration (the same on every node; None: the default).
        self.kv_config: KvConfig | None = None
        self.role = Role.FOLLOWER
        self.leader_id = 0
        self.commit = 0
        # Snapshot policy: one every `snapshot_interval` applied entries, keeping
        # `snapshot_keep` entries before it so slightly lagging peers catch up by appends.
        self.snapshot_interval = 1_000_000
        self.snapshot_keep = 0
        # Snapshots are taken the server's way: begun after `advance`, encoded and completed
        # by a later event (`Simulation.on_snapshot_begun`), dropped by a crash in between.
        # The snapshot begun and not yet completed (one at a time, as in the server).
        self.snapshot_job: SnapshotJob | None = None

    @property
    def up(self) -> bool:
        return self.replica is not None

    @property
    def stalled(self) -> bool:
        """Paused, or waiting for a hung save: no ticks, no messages, requests held."""
        return self.paused or self.hung_ready is not None

    @property
    def raw(self) -> RawNode | None:
        return None if self.replica is None else self.replica.node

    @property
    def machine(self) -> StateMachine | None:
        return None if self.replica is None else self.replica.state_machine

    def start(self, rng: random.Random, now: int) -> None:
        """(Re)build the replica from storage, as a process start does."""
        assert self.replica is None
        self.replica = Replica(
            self.raft_config,
            self.storage,
            rng,
            snapshot_entries=self.snapshot_interval,
            snapshot_catch_up_entries=self.snapshot_keep,
            # Paced by count alone, so small simulated stores snapshot (and send snapshots)
            # often; pacing by size is a local policy with no part in safety.
            snapshot_log_ratio=0.0,
            defer_snapshots=True,
            kv_config=self.kv_config,
        )
        self.incarnation += 1
        self.crash_stage = None
        hard_state, _ = self.storage.initial_state()
        self.term, self.commit = hard_state.term, hard_state.commit
        self.role, self.leader_id = Role.FOLLOWER, 0
        self.next_tick = now + rng.randint(1, self.tick_period)

    def crash(self) -> None:
        """Lose everything not in storage."""
        self.replica = None
        self.paused = False
        self.hung_ready = None  # a save that never returned made nothing durable
        self.snapshot_job = None  # an encoding in progress dies with the process
        self.held_requests.clear()
        self.crash_stage = None
        self.role, self.leader_id = Role.FOLLOWER, 0

    def process_ready(self, observer: NodeObserver, rng: random.Random) -> None:
        """Handle every pending Ready (bounded), crashing at `crash_stage` if one is set."""
        for _ in range(100):
            replica = self.replica
            if replica is None:
                return
            if self.crash_stage is CrashStage.NOW:
                self.crash()
                return
            ready = replica.prepare()
            if ready is None:
                return
            self._handle_ready(replica, ready, observer, rng)
        raise AssertionError(f"node {self.id}: Ready did not settle after 100 rounds")

    def _handle_ready(
        self, replica: Replica, ready: Ready, observer: NodeObserver, rng: random.Random
    ) -> None:
        # 1. Persist before anything leaves the node (Raft §5: durable before replying).
        if self.hang_next_save and ready.must_sync:
            duration, self.hang_next_save = self.hang_next_save, 0
            self.hung_ready = ready
            observer.on_save_hung(self, duration)
            return
        if self.crash_stage is CrashStage.MID_PERSIST:
            self._torn_save(ready, observer, rng)
            return
        replica.persist(ready)
        role_changed = self._note_state(ready)
        observer.on_persisted(self, ready, self._prev_term(ready.entries), role_changed)
        # 2. Send.
        if self.crash_stage is CrashStage.MID_SEND:
            observer.on_send(self, ready.messages[: rng.randint(0, len(ready.messages))])
            self.crash()
            return
        replica.send(ready, lambda messages: observer.on_send(self, messages))
        # 3. Apply.
        applied = {item.index for item in replica.apply(ready)}
        snapshot = ready.snapshot
        restored = snapshot is not None and not snapshot.is_empty()
        if snapshot is not None and restored:
            observer.on_restored(self, snapshot.metadata.index)
        for entry in ready.committed_entries:
            if entry.index in applied:
                observer.on_applied(self, entry)
        if applied or restored:
            # Only now: apply() restored the snapshot and applied the entries in one go.
            observer.on_state(self)
        if ready.read_states:
            observer.on_read_states(self, ready.read_states)
        if self.crash_stage is CrashStage.BEFORE_ADVANCE:
            self.crash()
            return
        # 4. Advance (the replica may snapshot and compact here).
        replica.advance(ready)  # takes no snapshot: defer_snapshots
        self._tend_snapshot(replica, observer)

    def finish_hung_save(self, observer: NodeObserver, rng: random.Random) -> None:
        """The hung save returns: the rest of its Ready is handled as usual."""
        ready, replica = self.hung_ready, self.replica
        assert ready is not None and replica is not None
        self.hung_ready = None
        self._handle_ready(replica, ready, observer, rng)

    def _tend_snapshot(self, replica: Replica, observer: NodeObserver) -> None:
        """What the server's driver does between two turns (`SnapshotTender.tend`): retry
        a compaction a full disk skipped, or begin a snapshot that is due; its encoding then
        finishes as an event of its own (`complete_snapshot_job`), as the server's encoding
        thread finishes while turns go on."""
        if self.snapshot_job is not None:
            return
        if replica.compaction_due():
            replica.retry_compaction()
            return
        job = replica.begin_snapshot()
        if job is not None:
            self.snapshot_job = job
            observer.on_snapshot_begun(self, job)

    def complete_snapshot_job(self) -> int:
        """The encoding of the job begun earlier finished: write it ahead and store it
        (`Replica.encode_snapshot`, `Replica.complete_snapshot`). Returns the index of the
        snapshot stored, 0 if it was overtaken or storage was short of space."""
        job, replica = self.snapshot_job, self.replica
        assert job is not None and replica is not None
        self.snapshot_job = None
        try:
            encoded = replica.encode_snapshot(job)
        except ResourceExhaustedError as exc:
            replica.abandon_snapshot(exc)
            return 0
        return replica.complete_snapshot(job, encoded)

    def _torn_save(self, ready: Ready, observer: NodeObserver, rng: random.Random) -> None:
        """Crash in the middle of the fsync'ed write (MemoryStorage models what a torn
        write-ahead log record sequence leaves behind); nothing of it was acknowledged."""
        self.storage.save_torn(ready.hard_state, ready.entries, ready.snapshot, rng)
        kept = [entry for entry in ready.entries if self.log.entry_at(entry.index) == entry]
        observer.on_torn_save(self, kept, self._prev_term(kept))
        self.crash()

    def _note_state(self, ready: Ready) -> bool:
        changed = False
        if ready.soft_state is not None:
            changed = ready.soft_state.role is not self.role
            self.role = ready.soft_state.role
            self.leader_id = ready.soft_state.leader_id
        if ready.hard_state is not None:
            changed = changed or ready.hard_state.term != self.term
            self.term = ready.hard_state.term
            self.commit = ready.hard_state.commit
        return changed

    def _prev_term(self, entries: Sequence[Entry]) -> int | None:
        if not entries:
            return None
        try:
            return self.storage.term(entries[0].index - 1)
        except (CompactedError, UnavailableIndexError):
            return None
