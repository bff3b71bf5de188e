"""A replica: the Raft core (`RawNode`), its durable storage and the key-value state machine.

Both drivers, the simulator and the asyncio server, run a replica through the same code,
snapshots included (`begin_snapshot`, `encode_snapshot`, `complete_snapshot`: the server
encodes on a thread of its own, the simulator finishes the encoding as a later event that
crashes can come before). The simulator does not exercise two orderings the server uses: a
leader's appends sent before its own save returns (dissertation §10.2.1), and commit-only
Readies not fsynced (docs/architecture.md §3). One Ready is handled in three steps, in this order (Raft §5: persistence
before replies):

1. `prepare()`           takes the next Ready from the core (None when there is nothing to
                         do, or while the previous Ready is not finished);
2. `persist(ready)`      stores its hard state, entries and snapshot with one `storage.save()`
                         (the fsync). It touches nothing but the storage, so the server may
                         run it in a worker thread as long as nothing else touches the node or
                         the storage meanwhile. After ResourceExhaustedError (a full disk,
                         no file descriptor), call it again later;
3. `finish(ready, send)` = `send(ready, send)` (the messages), `apply(ready)` (restore the
                         snapshot if any, then apply the committed entries) and
                         `advance(ready)` (`RawNode.advance`; without `defer_snapshots`,
                         then `take_snapshot` when one is due).

`process_ready(send)` is the three steps in one call (simple synchronous drivers and tests).

A snapshot from the leader may be decoded ahead, off the driver (`decode_snapshot`, on any
thread, which also hands the storage its received file) and offered (`offer_decoded`): the
Ready that restores it then installs the decoded state instead of decoding the bytes.

Errors: a committed entry or a snapshot that does not decode raises `ProtocolError` out of
`apply` (the entries before it are applied, the node is not advanced); the process must stop,
as for a corrupt disk: every replica would meet the same bytes.

Restart: the state machine lives in memory only, so a replica starts from the storage's
snapshot (if any) and the core re-delivers the committed entries after it: `RaftConfig.applied`
is set to the snapshot's index whatever the caller passed. Each start needs a differently
seeded `random.Random`: the core draws the nonce of its ReadIndex contexts from it, which is
what keeps an answer meant for a previous incarnation's read from serving a new one.

This module does no I/O of its own, imports no asyncio, time, socket or threading, and takes
its randomness from the `random.Random` it is given.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.errors import ResourceExhaustedError
from kvstore.frozen import quick_init
from kvstore.kv.commands import Command, WriteResult, encode_command
from kvstore.kv.state_machine import (
    DecodedState,
    FrozenState,
    KvConfig,
    StateMachine,
    decode_state,
)
from kvstore.raft.config import RaftConfig
from kvstore.raft.node import RawNode
from kvstore.raft.types import (
    ConfState,
    HardState,
    Message,
    ReadState,
    Ready,
    Snapshot,
    SnapshotMetadata,
    SoftState,
)
from kvstore.storage.base import DurableStorage

SendFunction = Callable[[Sequence[Message]], None]

logger = logging.getLogger("kvstore.replica")

SNAPSHOT_LOG_BYTES = 64 << 20
"""Bytes of entries applied since the last snapshot that count as `snapshot_entries` reached
(see `Replica.__init__`): the log between two snapshots stays near this size or the
snapshot's (`snapshot_log_ratio`), whichever is larger, however many writes an entry holds."""


@quick_init
@dataclass(frozen=True, slots=True)
class Applied:
    """One committed command as applied: `command` is None for empty and CONF_CHANGE entries,
    `result` the answer to give the client that proposed it (the same on every replica). A
    batch entry gives one per command, all with the entry's index."""

    index: int
    command: Command | None
    result: WriteResult | None


@dataclass(frozen=True, slots=True)
class ReadyOutcome:
    """What one Ready did, for the driver: leadership changes (`soft_state`), answers to
    complete (`applied`), ReadIndex answers to serve once `Replica.applied_index` reaches
    theirs (`read_states`; on a follower that may take a later Ready, when its commit index
    catches up with the leader's), and figures for metrics."""

    soft_state: SoftState | None
    applied: tuple[Applied, ...]
    read_states: tuple[ReadState, ...]
    hard_state: HardState | None
    entries_persisted: int
    messages: tuple[Message, ...]
    # The index of the snapshot restored into the state machine by this Ready, else 0.
    snapshot_restored: int = 0
    # The index of the local snapshot taken after this Ready, else 0.
    snapshot_taken: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotJob:
    """A snapshot begun by `Replica.begin_snapshot`: the frozen state, the term of its
    index, the membership to record with it, and the entry bytes applied before it (for
    pacing)."""

    frozen: FrozenState
    term: int
    conf_state: ConfState
    applied_bytes: int

    @property
    def index(self) -> int:
        return self.frozen.applied_index


@dataclass(frozen=True, slots=True)
class EncodedSnapshot:
    """`Replica.encode_snapshot`'s result: the bytes, and the file the storage prepared."""

    data: bytes
    prepared: str | None


@dataclass(frozen=True, slots=True)
class DecodedSnapshot:
    """`Replica.decode_snapshot`'s result: a snapshot from the leader and its state, decoded
    ahead of the Ready that restores it (`Replica.offer_decoded`)."""

    snapshot: Snapshot
    state: DecodedState


class Replica:
    """RawNode + DurableStorage + StateMachine, driven one Ready at a time."""

    def __init__(
        self,
        config: RaftConfig,
        storage: DurableStorage,
        rng: random.Random,
        *,
        snapshot_entries: int = 10_000,
        snapshot_catch_up_entries: int = 1_000,
        snapshot_log_ratio: float = 1.0,
        snapshot_log_bytes: int = SNAPSHOT_LOG_BYTES,
        defer_snapshots: bool = False,
        kv_config: KvConfig | None = None,
    ) -> None:
        """`snapshot_entries`: take a snapshot once at least this many entries were applied
        since the last one, and `snapshot_log_ratio`: only once the bytes of those entries
        reach this multiple of the last snapshot's size (Raft dissertation §5.1.3: snapshot
        when the log outgrows the snapshot, so writing snapshots costs a bounded share of
        the write volume however large the store is; with a fixed count alone, a million
        keys were serialized every 10,000 writes). `snapshot_catch_up_entries`: keep this
        many entries before the snapshot in the log, so a slightly lagging follower catches
        up by appends rather than a snapshot (etcd's SnapshotCatchUpEntries).
        `defer_snapshots`: `advance` takes no snapshot; the driver calls `begin_snapshot`,
        encodes the frozen state on a thread of its own while the replica goes on, then
        `complete_snapshot` (the server). `kv_config` must be the same on every replica."""
        if (
            snapshot_entries < 1
            or snapshot_log_bytes < 1
            or snapshot_catch_up_entries < 0
            or snapshot_log_ratio < 0
        ):
            raise ValueError(
                "snapshot_entries and snapshot_log_bytes must be >= 1, "
                "snapshot_catch_up_entries and snapshot_log_ratio >= 0"
            )
        self.storage = storage
        self.snapshot_entries = snapshot_entries
        self.snapshot_log_ratio = snapshot_log_ratio
        self.snapshot_log_bytes = snapshot_log_bytes
        self.defer_snapshots = defer_snapshots
        # Every replica applies the same entries, so with equal thresholds all of them
        # snapshot at the same moment; on a shared machine three nodes encoding at once
        # starved the leader's loop for 0.4 s and cost it its followers. With deferred
        # (server) snapshots the thresholds differ by node: x1, x1.25, x1.5 (a local policy;
        # nothing about safety depends on when a node snapshots).
        self._stagger = 1.0 + 0.25 * ((config.id - 1) % 3) if defer_snapshots else 1.0
        self.snapshot_catch_up_entries = snapshot_catch_up_entries
        self.state_machine = StateMachine(kv_config)
        snapshot = storage.snapshot()
        if not snapshot.is_empty():
            self.state_machine.restore(snapshot.data, snapshot.metadata.index)
        # Invariant: the index of the newest snapshot in storage (0 if none).
        self._snapshot_index = snapshot.metadata.index
        # Size of that snapshot, and bytes of entry data applied since it was taken (or
        # since the restart): together they pace snapshots (see `_snapshot_wanted`).
        self._snapshot_bytes = len(snapshot.data)
        self._applied_bytes = 0
        # After a snapshot failed for a full disk: no new attempt before this applied index.
        self._snapshot_retry_index = 0
        # After a full disk skipped the compaction that follows a stored snapshot: the index
        # to compact to (0: none owed), retried from `_compact_retry_index` on.
        self._compact_owed = 0
        self._compact_retry_index = 0
        self.node = RawNode(
            dataclasses.replace(config, applied=snapshot.metadata.index), storage, rng
        )
        # The Ready between prepare() and advance(); the core hands out one at a time.
        self._pending: Ready | None = None
        # A leader's snapshot decoded ahead (`offer_decoded`), for the Ready that restores it.
        self._decoded: DecodedSnapshot | None = None

    # --- queries ---------------------------------------------------------------------------

    @property
    def id(self) -> int:
        return self.node.id

    @property
    def applied_index(self) -> int:
        return self.state_machine.applied_index

    @property
    def snapshot_bytes(self) -> int:
        """Size of the newest snapshot's state machine encoding (0 if none)."""
        return self._snapshot_bytes

    @property
    def snapshot_index(self) -> int:
        return self._snapshot_index

    def propose(self, command: Command) -> None:
        """Encode and propose a command; ProposalDroppedError if not the leader."""
        self.node.propose(encode_command(command))

    # --- one Ready, step by step -----------------------------------------------------------

    def has_ready(self) -> bool:
        return self._pending is None and self.node.has_ready()

    def prepare(self) -> Ready | None:
        """Take the next Ready, or None when there is none (or one is still in progress)."""
        if not self.has_ready():
            return None
        self._pending = self.node.ready()
        return self._pending

    def persist(self, ready: Ready) -> None:
        """storage.save() of the Ready's hard state, entries and snapshot: one fsync. Touches
        nothing but the storage. Raises the storage's errors (ResourceExhaustedError, such
        as DiskFullError: nothing of this
        Ready is durable, retry later; FatalDiskError: the process must end)."""
        assert ready is self._pending, "persist() of a Ready that prepare() did not return"
        if ready.hard_state is None and not ready.entries and ready.snapshot is None:
            return
        self.storage.save(ready.hard_state, ready.entries, ready.snapshot)

    def finish(self, ready: Ready, send: SendFunction) -> ReadyOutcome:
        """After `persist(ready)` returned: send, apply, advance (and maybe snapshot)."""
        self.send(ready, send)
        applied = self.apply(ready)
        taken = self.advance(ready)
        restored = 0 if ready.snapshot is None else ready.snapshot.metadata.index
        return ReadyOutcome(
            soft_state=ready.soft_state,
            applied=applied,
            read_states=ready.read_states,
            hard_state=ready.hard_state,
            entries_persisted=len(ready.entries),
            messages=ready.messages,
            snapshot_restored=restored,
            snapshot_taken=taken,
        )

    def process_ready(self, send: SendFunction) -> ReadyOutcome | None:
        """prepare, persist, finish: the whole cycle for one Ready (None if there is none)."""
        ready = self.prepare()
        if ready is None:
            return None
        self.persist(ready)
        return self.finish(ready, send)

    def send(self, ready: Ready, send: SendFunction) -> None:
        """Hand the Ready's messages to the transport (only after `persist` returned)."""
        if ready.messages:
            send(ready.messages)

    def apply(self, ready: Ready) -> tuple[Applied, ...]:
        """Restore the Ready's snapshot if it has one, then apply its committed entries in
        log order (only after `persist` returned)."""
        self._restore_snapshot(ready)
        applied: list[Applied] = []
        for entry in ready.committed_entries:
            if entry.index <= self.state_machine.applied_index:
                # Covered by a snapshot restored in this same Ready.
                continue
            commands = self.state_machine.apply_entry(entry)
            self._applied_bytes += len(entry.data)
            if not commands:
                applied.append(Applied(entry.index, None, None))
            for command, result in commands:
                applied.append(Applied(entry.index, command, result))
        return tuple(applied)

    def advance(self, ready: Ready) -> int:
        """Tell the core the Ready is done, then snapshot if due; returns the index of the
        snapshot taken (0 if none)."""
        assert ready is self._pending, "advance() of a Ready that prepare() did not return"
        self.node.advance(ready)
        self._pending = None
        return 0 if self.defer_snapshots else self.maybe_snapshot()

    # --- snapshots -------------------------------------------------------------------------

    def snapshot_due(self) -> bool:
        """Whether the next `advance` takes a snapshot (never with `defer_snapshots`)."""
        return not self.defer_snapshots and self._snapshot_wanted()

    def _snapshot_wanted(self) -> bool:
        stagger = self._stagger
        return (
            (
                self.applied_index - self._snapshot_index >= self.snapshot_entries * stagger
                or self._applied_bytes >= self.snapshot_log_bytes * stagger
            )
            and self.applied_index >= self._snapshot_retry_index
            and self._applied_bytes >= self.snapshot_log_ratio * stagger * self._snapshot_bytes
        )

    def maybe_snapshot(self) -> int:
        """Snapshot the state machine and compact the log when `snapshot_entries` entries
        were applied since the last snapshot; returns the snapshot's index, 0 if none.

        A full disk, or no file descriptor or memory for the file (ResourceExhaustedError:
        storage left as it was) does not stop the node: the log
        just grows, and the snapshot is tried again a quarter interval later. Any other
        storage error propagates (FatalDiskError: the process must end)."""
        if not self.snapshot_due():
            if not self.defer_snapshots and self.compaction_due():
                self.retry_compaction()
            return 0
        try:
            return self.take_snapshot()
        except ResourceExhaustedError as exc:
            self.abandon_snapshot(exc)
            return 0

    def abandon_snapshot(self, exc: ResourceExhaustedError) -> None:
        """The disk was full (or file descriptors or memory short) while writing a
        snapshot: try again a quarter interval on."""
        self._snapshot_retry_index = self.applied_index + max(1, self.snapshot_entries // 4)
        logger.warning(
            "event=snapshot_failed reason=%s index=%d retry_at=%d error=%r",
            exc.code,
            self.applied_index,
            self._snapshot_retry_index,
            exc,
        )

    def begin_snapshot(self, *, copy: bool = True) -> SnapshotJob | None:
        """When a snapshot is due, freeze the state machine at its applied index and return
        the job (pass it to `encode_snapshot`, on any thread, then to `complete_snapshot`);
        else None. One job at a time. This is the only way a snapshot is taken: the server
        encodes in a forked process (or on a thread of its own), the simulator as a later
        event that crashes can interleave with, `take_snapshot` all at once. `copy=False`:
        the job refers to the live key map instead of a copy (`StateMachine.freeze`), for an
        encoding in a forked process only."""
        if not self._snapshot_wanted():
            return None
        return self._freeze(copy=copy)

    def freeze_for_backup(self) -> SnapshotJob:
        """The state machine frozen at its applied index, with that index's term and
        membership, for a backup (`kvstore.server.backup`: encoded on another thread, sent
        to an operator, never stored here, nothing compacted)."""
        return self._freeze()

    def _freeze(self, *, copy: bool = True) -> SnapshotJob:
        term = self.storage.term(self.applied_index)
        frozen = self.state_machine.freeze(copy=copy)
        # The membership as of the snapshot's index, not the one in force: a change appended
        # after it is not part of the state the snapshot stands for (dissertation §4.1).
        conf_state = self.node.conf_state_at(frozen.applied_index)
        return SnapshotJob(frozen, term, conf_state, self._applied_bytes)

    def encode_snapshot(self, job: SnapshotJob) -> EncodedSnapshot:
        """Encode the job's frozen state and have the storage write its file ahead
        (`prepare_snapshot`). Touches neither the core nor the live state machine, so it
        runs on a thread of its own while the driver goes on. ResourceExhaustedError: call
        `abandon_snapshot`; FatalDiskError: the process must end."""
        data = job.frozen.encode()
        metadata = SnapshotMetadata(index=job.index, term=job.term, conf_state=job.conf_state)
        prepared = self.storage.prepare_snapshot(Snapshot(metadata=metadata, data=data))
        return EncodedSnapshot(data, prepared)

    def complete_snapshot(self, job: SnapshotJob, encoded: EncodedSnapshot) -> int:
        """Record the encoded snapshot (renaming the prepared file) and compact the log;
        returns the snapshot's index, 0 if it was overtaken (a newer snapshot arrived from the
        leader meanwhile) or the disk is full. It touches only the storage and this replica's
        bookkeeping, so the server runs it on its storage thread while the driver waits.

        The commit index is made durable up to the snapshot first: commit-only changes are
        not fsynced on their own (see the server's driver), and a restart must never find a
        snapshot beyond its durable commit index. `job.index` was applied, hence committed."""
        index, data = job.index, encoded.data
        if index <= self._snapshot_index:
            if encoded.prepared is not None:
                self.storage.discard_prepared(encoded.prepared)
            return 0
        try:
            durable = self.storage.initial_state()[0]
            if durable.commit < index:
                self.storage.save(dataclasses.replace(durable, commit=index), [], None)
            self.storage.create_snapshot(index, job.conf_state, data, encoded.prepared)
        except ResourceExhaustedError as exc:
            if encoded.prepared is not None:
                self.storage.discard_prepared(encoded.prepared)
            self.abandon_snapshot(exc)
            return 0
        return self._snapshot_stored(index, len(data), job.applied_bytes)

    def take_snapshot(self) -> int:
        """Snapshot the state machine at its applied index now, due or not, through the one
        path (`_freeze`, `encode_snapshot`, `complete_snapshot`, all at once), then compact
        the log to `snapshot_catch_up_entries` before it (storage compacts only what the
        durable snapshot covers). ResourceExhaustedError from encoding propagates (see
        `maybe_snapshot`); so does any other storage error."""
        if self.applied_index <= self._snapshot_index:
            return 0
        job = self._freeze()
        return self.complete_snapshot(job, self.encode_snapshot(job))

    def _snapshot_stored(self, index: int, size: int, applied_bytes: int) -> int:
        """Bookkeeping after a snapshot at `index` of `size` bytes became durable, covering
        `applied_bytes` of the entry bytes counted for pacing; then compact the log to
        `snapshot_catch_up_entries` before it. Returns `index`."""
        self._snapshot_index = index
        self._snapshot_bytes = size
        self._applied_bytes = max(0, self._applied_bytes - applied_bytes)
        self._compact(index - self.snapshot_catch_up_entries)
        return index

    def compaction_due(self) -> bool:
        """Whether a compaction a full disk skipped is to be tried again now (the server
        then runs `retry_compaction` on its storage thread)."""
        return self._compact_owed > 0 and self.applied_index >= self._compact_retry_index

    def retry_compaction(self) -> None:
        """Try again the compaction a full disk skipped (see `_compact`)."""
        if self._compact_owed > 0:
            self._compact(self._compact_owed)

    def _compact(self, compact_to: int) -> None:
        """Compact the log up to `compact_to`, which a durable snapshot covers. A full disk
        (DiskFullError: the storage is left as it was) only postpones it: the snapshot is
        stored either way, the log keeps its entries a while longer, and the compaction is
        tried again a quarter interval later (or by the next snapshot's). The same for no
        file descriptor or memory (ResourceExhaustedError). A crash here
        ended the process on every replica applying the same data (issue 12)."""
        if compact_to < self.storage.first_index():
            self._compact_owed = 0
            return
        try:
            self.storage.compact(compact_to)
        except ResourceExhaustedError as exc:
            self._compact_owed = compact_to
            self._compact_retry_index = self.applied_index + max(1, self.snapshot_entries // 4)
            logger.warning(
                "event=compaction_skipped reason=%s index=%d retry_at=%d error=%r",
                exc.code,
                compact_to,
                self._compact_retry_index,
                exc,
            )
            return
        self._compact_owed = 0

    def decode_snapshot(self, snapshot: Snapshot, file: str | None = None) -> DecodedSnapshot:
        """Decode a snapshot from the leader ahead of its Ready, and offer the storage its
        verified, fsynced `file` (`DurableStorage.adopt_snapshot_file`). Touches neither the
        core nor the live state machine, so it runs on another thread (the server's snapshot
        stream: decoding a million keys took seconds, and on the loop no heartbeat was
        answered meanwhile). ProtocolError if the state does not decode."""
        state = decode_state(snapshot.data, snapshot.metadata.index, self.state_machine.config)
        if file is not None:
            self.storage.adopt_snapshot_file(snapshot, file)
        return DecodedSnapshot(snapshot, state)

    def offer_decoded(self, decoded: DecodedSnapshot) -> None:
        """Keep `decoded` for the Ready that restores its snapshot (replacing any other
        offered before): `apply` then installs it instead of decoding the bytes again."""
        self._decoded = decoded

    def _restore_snapshot(self, ready: Ready) -> None:
        """A snapshot from the leader (Raft §7) replaces the whole state machine."""
        snapshot = ready.snapshot
        if snapshot is None or snapshot.is_empty():
            return
        decoded, self._decoded = self._decoded, None
        if (
            decoded is not None
            and decoded.snapshot.metadata == snapshot.metadata
            and decoded.snapshot.data is snapshot.data
        ):
            self.state_machine.install(decoded.state)
        else:
            self.state_machine.restore(snapshot.data, snapshot.metadata.index)
        self._snapshot_index = max(self._snapshot_index, snapshot.metadata.index)
        self._snapshot_bytes, self._applied_bytes = len(snapshot.data), 0
