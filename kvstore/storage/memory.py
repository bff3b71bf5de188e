"""MemoryStorage: the reference `DurableStorage`, kept in memory (simulator and tests).

Whatever `save()` was given counts as durable; a simulated crash keeps this object and drops
the RawNode, which is exactly "lose what was not yet persisted". Every operation the core uses
per message (`term()`, `last_index()`, `entries()` of a few entries) is O(1) or O(result).

Invariant: `_entries[0]` is a sentinel holding the snapshot's (index, term); real entries
follow it at consecutive indexes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from kvstore.errors import CompactedError, DiskFullError, UnavailableIndexError
from kvstore.raft.types import (
    EMPTY_SNAPSHOT,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
)


class MemoryStorage:
    def __init__(self, conf_state: ConfState | None = None) -> None:
        self._hard_state = HardState()
        self._snapshot: Snapshot = EMPTY_SNAPSHOT
        self._conf_state = conf_state or ConfState()
        self._entries: list[Entry] = [Entry(term=0, index=0)]
        # Fault injection (the simulator's "disk fills during compaction"): while set,
        # `compact` raises DiskFullError and changes nothing, as DiskStorage does on ENOSPC.
        self.compact_disk_full = False
        self.compactions_refused = 0

    # --- the read side (kvstore.raft.storage.Storage) ---------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._conf_state

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def first_index(self) -> int:
        return self._entries[0].index + 1

    def last_index(self) -> int:
        return self._entries[0].index + len(self._entries) - 1

    def term(self, index: int) -> int:
        offset = self._entries[0].index
        if index < offset:
            raise CompactedError(f"index {index} < snapshot index {offset}")
        position = index - offset
        if position >= len(self._entries):
            raise UnavailableIndexError(f"index {index} > last index {self.last_index()}")
        return self._entries[position].term

    def entries(self, low: int, high: int, size_bytes_max: int) -> list[Entry]:
        offset = self._entries[0].index
        if low <= offset:
            raise CompactedError(f"index {low} <= snapshot index {offset}")
        if high > self.last_index() + 1:
            raise UnavailableIndexError(f"index {high - 1} > last index {self.last_index()}")
        # Walk only as far as the byte limit allows: a follower far behind must not make
        # every append copy the whole rest of the log.
        stored = self._entries
        start = low - offset
        stop = high - offset
        end = start
        total = 0
        while end < stop:
            total += stored[end].size_bytes()
            if total > size_bytes_max and end > start:
                break
            end += 1
        return stored[start:end]

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # --- the write side (kvstore.storage.base.DurableStorage) -------------------------------

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        if snapshot is not None and not snapshot.is_empty():
            self._apply_snapshot(snapshot)
        if entries:
            self._append(entries)
        if hard_state is not None:
            self._hard_state = hard_state

    def save_torn(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        rng: random.Random,
    ) -> None:
        """Model a crash in the middle of `save()` (crash modelling for the simulator): keep
        what a torn write to DiskStorage's log can leave behind, then the caller drops the
        node as after any crash. The log records are written in this order, and a torn write
        keeps a prefix of them: TRUNCATE (the conflicting suffix goes), the entries (a prefix
        of them survives), the hard state (only if every entry made it). A snapshot install
        is all-or-nothing (a new segment renamed into place), so it survives whole or not
        at all. Nothing of this save was acknowledged, so every outcome is legitimate."""
        if snapshot is not None and not snapshot.is_empty():
            if rng.random() < 0.5:
                self.save(hard_state, entries, snapshot)
            return
        offset = self._entries[0].index
        if entries and entries[0].index <= offset:
            entries = entries[offset + 1 - entries[0].index :]  # compacted: already stored
        conflict = bool(entries) and entries[0].index <= self.last_index()
        records = int(conflict) + len(entries) + int(hard_state is not None)
        kept = rng.randint(0, records)
        if conflict and kept >= 1:
            del self._entries[entries[0].index - offset :]
        kept_entries = entries[: max(0, kept - int(conflict))]
        if kept_entries:
            self._append(kept_entries)
        if hard_state is not None and kept == records:
            self._hard_state = hard_state

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        metadata = snapshot.metadata
        if metadata.index <= self._snapshot.metadata.index:
            return
        self._snapshot = snapshot
        if metadata.conf_state.voters:
            self._conf_state = metadata.conf_state
        self._entries = [Entry(term=metadata.term, index=metadata.index)]

    def _append(self, entries: Sequence[Entry]) -> None:
        offset = self._entries[0].index
        first = entries[0].index
        if first + len(entries) - 1 <= offset:
            return  # all of them are already compacted into the snapshot
        if first <= offset:
            entries = entries[offset + 1 - first :]
            first = offset + 1
        position = first - offset
        if position > len(self._entries):
            raise UnavailableIndexError(
                f"missing log entries: last {self.last_index()}, appending {first}"
            )
        # Raft §5.3: a conflicting entry replaces ours and everything after it.
        del self._entries[position:]
        self._entries.extend(entries)

    def prepare_snapshot(self, snapshot: Snapshot) -> str | None:
        return None  # nothing to write ahead: create_snapshot keeps the bytes

    def discard_prepared(self, prepared: str) -> None:
        pass

    def adopt_snapshot_file(self, snapshot: Snapshot, path: str) -> None:
        pass  # no files: `save` keeps the bytes

    def create_snapshot(
        self, index: int, conf_state: ConfState, data: bytes, prepared: str | None = None
    ) -> Snapshot:
        if index <= self._snapshot.metadata.index:
            raise CompactedError(f"snapshot index {index} is not newer than the current one")
        if index > self.last_index():
            raise UnavailableIndexError(f"snapshot index {index} > last {self.last_index()}")
        metadata = SnapshotMetadata(index=index, term=self.term(index), conf_state=conf_state)
        self._snapshot = Snapshot(metadata=metadata, data=data)
        if conf_state.voters:
            self._conf_state = conf_state
        return self._snapshot

    def compact(self, index: int) -> None:
        offset = self._entries[0].index
        if index <= offset:
            return
        if index > self._snapshot.metadata.index:
            raise ValueError(f"compact({index}) beyond the snapshot {self._snapshot.metadata}")
        if self.compact_disk_full:
            self.compactions_refused += 1
            raise DiskFullError(f"disk full compacting the log to {index} (simulated)")
        sentinel = Entry(term=self.term(index), index=index)
        del self._entries[: index - offset]
        self._entries[0] = sentinel

    def close(self) -> None:
        pass
