"""The read-only view of durable storage that the Raft core needs (etcd-io/raft's Storage).

The core reads the stable log through this Protocol and never writes to it: the driver
persists each Ready (see `kvstore.storage.base.DurableStorage`) and then calls `advance()`.
Entries the core has produced but the driver has not yet persisted live in the core's
unstable log, never here.
"""

from __future__ import annotations

from typing import Protocol

from kvstore.raft.types import ConfState, Entry, HardState, Snapshot


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the membership, read once when the node starts."""
        ...

    def entries(self, low: int, high: int, size_bytes_max: int) -> list[Entry]:
        """Entries in [low, high). At least one entry is returned when any is in range, even
        one larger than `size_bytes_max`. Raises CompactedError if low <= the snapshot index,
        UnavailableIndexError if high > last_index() + 1."""
        ...

    def term(self, index: int) -> int:
        """The term of the entry at `index`; valid for snapshot index <= index <= last_index().
        Raises CompactedError below, UnavailableIndexError above."""
        ...

    def first_index(self) -> int:
        """The index of the first entry still in the log (snapshot index + 1)."""
        ...

    def last_index(self) -> int:
        """The index of the last entry in the log (the snapshot index when the log is empty)."""
        ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (EMPTY_SNAPSHOT when there is none)."""
        ...
