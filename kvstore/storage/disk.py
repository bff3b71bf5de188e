"""DiskStorage: the server's `DurableStorage`, a write-ahead log plus snapshot files.

Layout of the data directory:

    00000000000000000000.wal ...   WAL segments (kvstore.storage.wal)
    snap-<index>-<term>.snap       the newest snapshot the log names (kvstore.storage.snapshot)
    LOCK                           flock'ed while a process has the directory open

A directory that does not exist yet is created level by level, each new level fsynced and
then its parent (`FileSystem.make_directories`): otherwise a power loss could take back the
directory of a freshly bootstrapped node together with the vote and entries it held.

The entries after the compaction offset are kept in memory, so `entries()` and `term()` never
touch the disk; memory is bounded by the snapshot cadence (the caller snapshots and compacts).
They are kept as plain tuples of atomic values (`_Row`), not `Entry` objects: the garbage
collector stops tracking such tuples after one young collection, whereas every Entry (a
slotted dataclass) stayed tracked while in the log. Under load, 80,000-150,000 of them sat in
the young generations at each generation-1 collection (140-170 ms pauses, long enough to start
elections), and full collections walked the whole log. `entries()` builds Entry objects on
the way out.

Rules:
- `save()` is group commit: the Ready's entries (and a TRUNCATE record when they conflict
  with the log, Raft §5.3), then its hard state, in one buffer, one write, one fdatasync.
  Entries before the hard state: a torn write can then never leave a commit index without
  the entries it covers.
- Memory changes only after the disk write succeeded: ResourceExhaustedError (DiskFullError
  for ENOSPC; EMFILE, ENFILE, ENOMEM) leaves both the file and
  the in-memory log exactly as before the call; FatalDiskError poisons the object.
- A snapshot is durable (file fsynced, renamed, directory fsynced) before the log names it,
  and older snapshots and segments are removed only after that.
- `compact(index)` is durable at once: normally a small COMPACT record; when the offset has
  moved `compact_after_entries` entries past the log's base, or the log exceeds
  `compact_after_bytes`, the retained entries are rewritten into a new segment (atomically,
  see wal.py) and the older segments deleted.
- Entries the log already has (same index and term: Raft §5.3 Log Matching) are skipped, so
  a TRUNCATE record only ever cuts at a real conflict, which is above the commit index.
- The membership (conf state) is persisted: CONF_STATE records, and snapshot metadata.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kvstore import codec
from kvstore.errors import (
    CompactedError,
    CorruptionError,
    FatalDiskError,
    ResourceExhaustedError,
    StorageError,
    UnavailableIndexError,
)
from kvstore.raft.types import (
    EMPTY_SNAPSHOT,
    ENTRY_OVERHEAD_BYTES,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
)
from kvstore.storage import snapshot as snapshot_files
from kvstore.storage.base import DurableStorage
from kvstore.storage.fs import FileSystem
from kvstore.storage.wal import (
    RecordType,
    StorageMetrics,
    WalState,
    WriteAheadLog,
    frame,
    frame_entries,
)

logger = logging.getLogger("kvstore.storage")

# One in-memory log entry: (term, index, type, data); see the module docstring.
_Row = tuple[int, int, int, bytes]
_ENTRY_TYPES: dict[int, EntryType] = {int(t): t for t in EntryType}


def _row(entry: Entry) -> _Row:
    return (entry.term, entry.index, int(entry.type), entry.data)


def _entry(row: _Row) -> Entry:
    return Entry(row[0], row[1], _ENTRY_TYPES[row[2]], row[3])


LOCK_NAME = "LOCK"


class DiskStorage:
    """Write-ahead log and snapshots in one directory; see the module docstring."""

    def __init__(
        self,
        directory: Path | str,
        *,
        initial_conf_state: ConfState | None = None,
        segment_size_bytes: int = 64 << 20,
        compact_after_entries: int = 10_000,
        compact_after_bytes: int = 64 << 20,
        trailing_entries: int | None = None,
        fs: FileSystem | None = None,
    ) -> None:
        """Open (recover) `directory`, creating it if needed. `initial_conf_state` is the
        membership recorded for a brand-new directory. `trailing_entries`: when set,
        `create_snapshot()` compacts the log itself, keeping that many entries before the
        snapshot so slightly lagging followers catch up without one. Raises CorruptionError
        on damage, StorageError if another process holds the directory."""
        if segment_size_bytes < 1024 or compact_after_entries < 1 or compact_after_bytes < 1:
            raise ValueError("segment_size_bytes >= 1024, compact_after_* >= 1 required")
        if trailing_entries is not None and trailing_entries < 0:
            raise ValueError("trailing_entries must be >= 0")
        self.directory = str(directory)
        self.fs = fs or FileSystem()
        self.metrics = StorageMetrics()
        self.compact_after_entries = compact_after_entries
        self.compact_after_bytes = compact_after_bytes
        self.trailing_entries = trailing_entries
        # Snapshot files streamed from a leader, renamed to their prepared name, by (index,
        # term): the save that installs one renames it into place (`adopt_snapshot_file`).
        self._adopted: dict[tuple[int, int], str] = {}
        try:
            self.fs.make_directories(self.directory)
        except OSError as exc:
            raise StorageError(f"cannot create {self.directory}: {exc}") from exc
        self._lock_fd = self._lock_directory()
        self._wal = WriteAheadLog(
            self.directory, self.fs, self.metrics, segment_size_bytes=segment_size_bytes
        )
        try:
            self._recover(initial_conf_state or ConfState())
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot open {self.directory}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # --- recovery -----------------------------------------------------------------------------

    def _recover(self, initial_conf_state: ConfState) -> None:
        fresh = frame(RecordType.SEGMENT, codec.pack([0, [0, 0, 0, 0]])) + frame(
            RecordType.CONF_STATE, codec.pack(codec.conf_state_to_obj(initial_conf_state))
        )
        snapshot_names = self._snapshot_files(recovering=True)
        state = self._wal.open(fresh)
        self._offset = state.offset
        self._offset_term = state.offset_term
        self._entries: list[_Row] = [_row(entry) for entry in state.entries]
        self._hard_state = state.hard_state
        self._conf_state = state.conf_state
        self._base_offset = state.base_offset
        self._snapshot = self._load_named_snapshot(state, snapshot_names)
        self._remove_snapshots(keep=self._snapshot.metadata.index)
        logger.info(
            "recovered directory=%s offset=%d last_index=%d term=%d vote=%d commit=%d snapshot=%d",
            self.directory,
            self._offset,
            self.last_index(),
            self._hard_state.term,
            self._hard_state.vote,
            self._hard_state.commit,
            self._snapshot.metadata.index,
        )

    def _load_named_snapshot(self, state: WalState, names: dict[tuple[int, int], str]) -> Snapshot:
        """The newest snapshot the log names, verified against the log."""
        if not state.snapshots:
            return EMPTY_SNAPSHOT
        index, term = max(state.snapshots)
        name = snapshot_files.snapshot_name(index, term)
        path = os.path.join(self.directory, name)
        if (index, term) not in names:
            raise CorruptionError(path, 0, "the log names this snapshot but the file is missing")
        snapshot = snapshot_files.load_snapshot(self.fs, path)
        if index < state.offset:
            raise CorruptionError(path, 0, f"snapshot {index} is older than log offset")
        if index > state.last_index() or (
            index > state.offset and state.entries[index - state.offset - 1].term != term
        ):
            raise CorruptionError(path, 0, "snapshot does not match the log")
        return snapshot

    def _snapshot_files(self, *, recovering: bool = False) -> dict[tuple[int, int], str]:
        """The snapshot files by (index, term); removes temporary files, and on recovery
        prepared ones too (at run time a prepared file may be in the making on another
        thread, see `prepare_snapshot`)."""
        found: dict[tuple[int, int], str] = {}
        leftovers = [snapshot_files.SUFFIX + snapshot_files.TEMPORARY_SUFFIX]
        if recovering:
            leftovers.append(snapshot_files.SUFFIX + snapshot_files.PREPARED_SUFFIX)
        for name in self.fs.listdir(self.directory):
            if name.endswith(tuple(leftovers)):
                self.fs.unlink(os.path.join(self.directory, name))
            elif (parsed := snapshot_files.parse_snapshot_name(name)) is not None:
                found[parsed] = name
        return found

    def _remove_snapshots(self, *, keep: int) -> None:
        """Remove every snapshot file but the one at index `keep` (already durable)."""
        try:
            removed = False
            for (index, _term), name in self._snapshot_files().items():
                if index != keep:
                    self.fs.unlink(os.path.join(self.directory, name))
                    removed = True
            if removed:
                self.fs.fsync_directory(self.directory)
        except OSError as exc:
            # Harmless for correctness (recovery uses only the snapshot the log names).
            logger.warning(
                "could not remove old snapshots directory=%s error=%s", self.directory, exc
            )

    def _lock_directory(self) -> int:
        fd = os.open(os.path.join(self.directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{self.directory} is in use by another process") from exc
        return fd

    # --- the read side (kvstore.raft.storage.Storage) -----------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._conf_state

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    @property
    def conf_state(self) -> ConfState:
        return self._conf_state

    def first_index(self) -> int:
        return self._offset + 1

    def last_index(self) -> int:
        return self._offset + len(self._entries)

    def term(self, index: int) -> int:
        if index < self._offset:
            raise CompactedError(f"index {index} < log offset {self._offset}")
        if index == self._offset:
            return self._offset_term
        if index > self.last_index():
            raise UnavailableIndexError(f"index {index} > last index {self.last_index()}")
        return self._entries[index - self._offset - 1][0]

    def entries(self, low: int, high: int, size_bytes_max: int) -> list[Entry]:
        if low <= self._offset:
            raise CompactedError(f"index {low} <= log offset {self._offset}")
        if high > self.last_index() + 1:
            raise UnavailableIndexError(f"index {high - 1} > last index {self.last_index()}")
        rows, types = self._entries, _ENTRY_TYPES
        selected: list[Entry] = []
        total = 0
        for position in range(low - self._offset - 1, high - self._offset - 1):
            term, index, type_, data = rows[position]
            total += len(data) + ENTRY_OVERHEAD_BYTES  # Entry.size_bytes() of the row
            if total > size_bytes_max and selected:
                break
            selected.append(Entry(term, index, types[type_], data))
        return selected

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # --- the write side (kvstore.storage.base.DurableStorage) ---------------------------------

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        if snapshot is not None and snapshot.metadata.index > self._snapshot.metadata.index:
            self._install_snapshot(hard_state, entries, snapshot)
            return
        entries = self._drop_compacted(entries)
        records: list[bytes] = []
        first = entries[0].index if entries else 0
        if entries:
            if first > self.last_index() + 1:
                raise UnavailableIndexError(
                    f"missing log entries: last {self.last_index()}, appending {first}"
                )
            if first <= self.last_index():
                records.append(frame(RecordType.TRUNCATE, codec.pack([first])))
            records.extend(frame_entries(entries))
        store_hard_state = hard_state is not None and hard_state != self._hard_state
        if hard_state is not None and store_hard_state:
            records.append(
                frame(RecordType.HARD_STATE, codec.pack(codec.hard_state_to_obj(hard_state)))
            )
        if not records:
            return
        self._wal.append(records[0] if len(records) == 1 else b"".join(records))
        if entries:
            del self._entries[first - self._offset - 1 :]
            self._entries.extend([_row(entry) for entry in entries])
        if hard_state is not None and store_hard_state:
            self._hard_state = hard_state

    def _drop_compacted(self, entries: Sequence[Entry]) -> Sequence[Entry]:
        """Skip the entries the log already has: compacted ones, and (Log Matching, Raft
        §5.3: same index and term means the same entry) a front that matches ours, so the
        TRUNCATE record cuts only where the log really conflicts, never below a snapshot."""
        if entries and entries[0].index <= self._offset:
            entries = entries[self._offset + 1 - entries[0].index :]
        skip, last = 0, self.last_index()
        while (
            skip < len(entries)
            and entries[skip].index <= last
            and self._entries[entries[skip].index - self._offset - 1][0] == entries[skip].term
        ):
            skip += 1
        return entries[skip:] if skip else entries

    def _install_snapshot(
        self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot
    ) -> None:
        """Raft §7: the snapshot replaces the whole log; entries of the same Ready follow it."""
        metadata = snapshot.metadata
        entries = [entry for entry in entries if entry.index > metadata.index]
        if entries and entries[0].index != metadata.index + 1:
            raise UnavailableIndexError(f"entries after snapshot {metadata.index} have a gap")
        # Swapped, not iterated in place: `adopt_snapshot_file` runs on another thread.
        adopted, self._adopted = self._adopted, {}
        self._write_snapshot_file(snapshot, adopted.pop((metadata.index, metadata.term), None))
        for leftover in adopted.values():
            self.discard_prepared(leftover)
        conf_state = metadata.conf_state if metadata.conf_state.voters else self._conf_state
        new_hard_state = hard_state or self._hard_state
        self._wal.rewrite(
            self._base_content(metadata.index, metadata.term, metadata, conf_state)
            + self._base_tail(new_hard_state, entries)
        )
        self._offset, self._offset_term = metadata.index, metadata.term
        self._base_offset = metadata.index
        self._entries = [_row(entry) for entry in entries]
        self._hard_state, self._conf_state = new_hard_state, conf_state
        self._snapshot = snapshot
        self._remove_snapshots(keep=metadata.index)

    def prepare_snapshot(self, snapshot: Snapshot) -> str | None:
        """See DurableStorage.prepare_snapshot: writes `<snapshot name>.prepared` and fsyncs
        it; only a later `create_snapshot(..., prepared=path)` renames it into place, and only
        recovery removes a leftover one. Thread-safe with the other methods for that reason."""
        self._wal.check_usable()
        try:
            return snapshot_files.prepare_snapshot(self.fs, self.directory, snapshot)
        except FatalDiskError as exc:
            self._wal.poison(str(exc))
            raise

    def adopt_snapshot_file(self, snapshot: Snapshot, path: str) -> None:
        """See DurableStorage.adopt_snapshot_file: the file is renamed to `<snapshot
        name>.prepared` now (recovery removes it if no save names it) and only renamed into
        place by the install: a 128 MB snapshot is not encoded and written a second time."""
        metadata = snapshot.metadata
        prepared = (
            os.path.join(
                self.directory, snapshot_files.snapshot_name(metadata.index, metadata.term)
            )
            + snapshot_files.PREPARED_SUFFIX
        )
        try:
            self.fs.rename(path, prepared)
        except OSError as exc:
            logger.warning("event=adopt_failed path=%s error=%s", path, exc)
            return
        self._adopted[(metadata.index, metadata.term)] = prepared

    def discard_prepared(self, prepared: str) -> None:
        try:
            self.fs.unlink(prepared)
        except OSError as exc:
            logger.warning("event=remove_failed path=%s error=%s", prepared, exc)

    def create_snapshot(
        self, index: int, conf_state: ConfState, data: bytes, prepared: str | None = None
    ) -> Snapshot:
        if index <= self._snapshot.metadata.index:
            raise CompactedError(f"snapshot index {index} is not newer than the current one")
        if index > self.last_index():
            raise UnavailableIndexError(f"snapshot index {index} > last {self.last_index()}")
        metadata = SnapshotMetadata(index=index, term=self.term(index), conf_state=conf_state)
        snapshot = Snapshot(metadata=metadata, data=data)
        self._write_snapshot_file(snapshot, prepared)
        conf_state = conf_state if conf_state.voters else self._conf_state
        self._wal.append(
            frame(RecordType.SNAPSHOT, codec.pack([index, metadata.term]))
            + frame(RecordType.CONF_STATE, codec.pack(codec.conf_state_to_obj(conf_state)))
        )
        self._snapshot, self._conf_state = snapshot, conf_state
        self._remove_snapshots(keep=index)
        if self.trailing_entries is not None and index - self.trailing_entries > self._offset:
            try:
                self.compact(index - self.trailing_entries)
            except ResourceExhaustedError as exc:
                # The snapshot is durable; the log just keeps its entries until the next one.
                logger.warning("event=compaction_skipped reason=%s error=%r", exc.code, exc)
        return snapshot

    def compact(self, index: int) -> None:
        if index <= self._offset:
            return
        if index > self._snapshot.metadata.index:
            raise ValueError(f"compact({index}) beyond the snapshot {self._snapshot.metadata}")
        offset_term = self.term(index)
        retained = self._entries[index - self._offset :]
        if (
            index - self._base_offset >= self.compact_after_entries
            or self._wal.total_bytes() >= self.compact_after_bytes
        ):
            # Restart the log at the new offset in a new segment; older segments go.
            metadata = self._snapshot.metadata
            self._wal.rewrite(
                self._base_content(index, offset_term, metadata, self._conf_state)
                + self._base_tail(self._hard_state, [_entry(row) for row in retained])
            )
            logger.info("compacted write-ahead log offset=%d", index)
            self._base_offset = index
        else:
            # Cheap and durable: one small record; the segments are rewritten later.
            self._wal.append(frame(RecordType.COMPACT, codec.pack([index, offset_term])))
        self._entries = retained
        self._offset, self._offset_term = index, offset_term

    def _base_content(
        self, offset: int, offset_term: int, metadata: SnapshotMetadata, conf_state: ConfState
    ) -> bytes:
        base = [offset, offset_term, metadata.index, metadata.term]
        return frame(RecordType.SEGMENT, codec.pack([self._wal.next_seq(), base])) + frame(
            RecordType.CONF_STATE, codec.pack(codec.conf_state_to_obj(conf_state))
        )

    def _base_tail(self, hard_state: HardState, entries: Sequence[Entry]) -> bytes:
        records = frame_entries(entries) if entries else []
        records.append(
            frame(RecordType.HARD_STATE, codec.pack(codec.hard_state_to_obj(hard_state)))
        )
        return b"".join(records)

    def _write_snapshot_file(self, snapshot: Snapshot, prepared: str | None = None) -> None:
        self._wal.check_usable()
        try:
            _path, fsyncs = snapshot_files.write_snapshot(
                self.fs, self.directory, snapshot, prepared
            )
        except FatalDiskError as exc:
            self._wal.poison(str(exc))
            raise
        self.metrics.fsync_count += fsyncs

    def close(self) -> None:
        self._wal.close()
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)


def _conforms(storage: DiskStorage) -> DurableStorage:
    """Never called: lets mypy check that DiskStorage implements DurableStorage."""
    return storage
