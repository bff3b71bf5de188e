"""The write side of storage: what a driver (server or simulator) needs to persist a Ready.

`DurableStorage` extends the core's read-only `Storage` Protocol. Implementations:
`kvstore.storage.memory.MemoryStorage` (the reference, used by the simulator and tests) and
`kvstore.storage.disk.DiskStorage` (the write-ahead log and snapshot files, used by the server).

Rules every implementation keeps:
- `save()` is all-or-nothing durable when it returns: hard state, entries and snapshot of one
  Ready are made durable with a single fsync (group commit). Entries that conflict with ones
  already stored (same index) replace them and everything after them (Raft §5.3).
- `create_snapshot()` and `compact()` never discard anything before the new snapshot is durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvstore.raft.storage import Storage
from kvstore.raft.types import ConfState, Entry, HardState, Snapshot


class DurableStorage(Storage, Protocol):
    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        """Durably store one Ready's hard state, entries and snapshot (one fsync)."""
        ...

    def create_snapshot(
        self, index: int, conf_state: ConfState, data: bytes, prepared: str | None = None
    ) -> Snapshot:
        """Durably record the state machine's snapshot as of applied `index`; `prepared`
        names the file `prepare_snapshot` already wrote for it."""
        ...

    def prepare_snapshot(self, snapshot: Snapshot) -> str | None:
        """Write `snapshot` durably where only `create_snapshot(..., prepared=...)` will
        name it; callable from another thread while the storage is in use (it writes one new
        file and touches nothing else). None if the storage has nothing to prepare."""
        ...

    def discard_prepared(self, prepared: str) -> None:
        """Remove a prepared snapshot that will not be recorded (overtaken)."""
        ...

    def adopt_snapshot_file(self, snapshot: Snapshot, path: str) -> None:
        """`path` (in the storage's directory) holds `snapshot`'s file exactly as this
        storage writes it, verified and fsynced (a snapshot streamed from the leader): the
        `save` that installs `snapshot` may take the file over instead of writing it again.
        Callable from another thread, like `prepare_snapshot`. A storage that does not keep
        files ignores it (the caller removes what is left at `path`)."""
        ...

    def compact(self, index: int) -> None:
        """Discard log entries up to and including `index` (which a durable snapshot covers)."""
        ...

    def close(self) -> None: ...
