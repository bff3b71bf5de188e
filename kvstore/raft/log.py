"""RaftLog: the stable log (read through `Storage`) plus the unstable tail the core holds.

Entries the core creates or receives live in the unstable tail until the driver has persisted
them (`Ready.entries`) and called `advance()`; only then are they dropped from here, and from
then on they are read from storage. A snapshot received from the leader is likewise unstable
until persisted.

Rules that hold here:
- Invariant: applied <= committed <= last_index().
- Invariant: unstable entries are contiguous and start at `_unstable_offset`; when an
  unstable snapshot is present, `_unstable_offset` == snapshot index + 1.
- Committed entries are never truncated (Raft §5.3 Log Matching + Leader Completeness): an
  append that would do so is our own bug and asserts.
- All per-message work is O(entries in the message), never O(log length).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.errors import CompactedError, UnavailableIndexError
from kvstore.raft.storage import Storage
from kvstore.raft.types import Entry, Snapshot

_UNLIMITED = 1 << 62


class RaftLog:
    __slots__ = (
        "_storage",
        "_unstable",
        "_unstable_offset",
        "_unstable_snapshot",
        "applied",
        "committed",
    )

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        last_index = storage.last_index()
        self._unstable: list[Entry] = []
        self._unstable_offset = last_index + 1
        self._unstable_snapshot: Snapshot | None = None
        # Both start at the snapshot index: everything in a snapshot is committed and applied.
        self.committed = storage.first_index() - 1
        self.applied = self.committed

    # --- indexes and terms ----------------------------------------------------------------

    def first_index(self) -> int:
        if self._unstable_snapshot is not None:
            return self._unstable_snapshot.metadata.index + 1
        return self._storage.first_index()

    def last_index(self) -> int:
        if self._unstable:
            return self._unstable_offset + len(self._unstable) - 1
        if self._unstable_snapshot is not None:
            return self._unstable_snapshot.metadata.index
        return self._storage.last_index()

    def stable_last_index(self) -> int:
        """The last index of our log known to be in storage (persisted and not replaced by
        an unstable suffix). With an unstable snapshot, its index, which is committed."""
        return self._unstable_offset - 1

    def last_term(self) -> int:
        return self.term(self.last_index())

    def term(self, index: int) -> int:
        """The term at `index`; raises CompactedError / UnavailableIndexError out of range."""
        offset = self._unstable_offset
        if index >= offset:
            position = index - offset
            if position < len(self._unstable):
                return self._unstable[position].term
            raise UnavailableIndexError(f"index {index} > last index {self.last_index()}")
        snapshot = self._unstable_snapshot
        if snapshot is not None:
            if index == snapshot.metadata.index:
                return snapshot.metadata.term
            raise CompactedError(f"index {index} is covered by the unstable snapshot")
        return self._storage.term(index)

    def term_or_zero(self, index: int) -> int:
        """The term at `index`, or 0 when it is compacted or beyond the log."""
        try:
            return self.term(index)
        except (CompactedError, UnavailableIndexError):
            return 0

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except (CompactedError, UnavailableIndexError):
            return False

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: a candidate's log at least as up to date as ours gets our vote."""
        our_term = self.last_term()
        return last_term > our_term or (last_term == our_term and last_index >= self.last_index())

    # --- reading entries --------------------------------------------------------------------

    def entries(self, low: int, size_bytes_max: int = _UNLIMITED) -> list[Entry]:
        """Entries from `low` to the end, at most about `size_bytes_max` bytes (at least one)."""
        return self.slice(low, self.last_index() + 1, size_bytes_max)

    def slice(self, low: int, high: int, size_bytes_max: int = _UNLIMITED) -> list[Entry]:
        """Entries in [low, high), limited by bytes but never empty when the range is not."""
        if low >= high:
            return []
        if low < self.first_index():
            raise CompactedError(f"index {low} is compacted")
        if high > self.last_index() + 1:
            raise UnavailableIndexError(f"index {high - 1} > last index {self.last_index()}")
        result: list[Entry] = []
        offset = self._unstable_offset
        if low < offset:
            result = self._storage.entries(low, min(high, offset), size_bytes_max)
            if len(result) < min(high, offset) - low:
                return result  # storage stopped on the byte limit
            size_bytes_max -= sum(entry.size_bytes() for entry in result)
            if size_bytes_max <= 0 and result:
                return result
        if high > offset:
            unstable = self._unstable
            position = max(low, offset) - offset
            stop = high - offset
            total = 0
            while position < stop:
                entry = unstable[position]
                total += entry.size_bytes()
                if total > size_bytes_max and result:
                    break
                result.append(entry)
                position += 1
        return result

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, with that term; (i, 0) when
        the term at the index i where the search stops is unknown (compacted or beyond the
        log). Used for fast backtracking (Raft §5.3): one round trip skips every entry of a
        term the other side does not have. Terms never decrease along a log, so this is a
        binary search: O(log n) term lookups, not one per skipped entry."""
        if index <= 0:
            return 0, 0
        try:
            index_term = self.term(index)
        except (CompactedError, UnavailableIndexError):
            return index, 0
        if index_term <= term:
            return index, index_term
        low = self.first_index() - 1
        low_term = self.term(low)
        if low_term > term:
            return low - 1, 0  # the answer lies below what we still have
        high = index
        # Invariant: term(low) <= term < term(high).
        while high - low > 1:
            middle = (low + high) // 2
            middle_term = self.term(middle)
            if middle_term <= term:
                low, low_term = middle, middle_term
            else:
                high = middle
        return low, low_term

    # --- changing the log -------------------------------------------------------------------

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """The index of the first entry that is new or conflicts with ours, or 0 if none."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def maybe_append(
        self, index: int, log_term: int, committed: int, entries: Sequence[Entry]
    ) -> int | None:
        """Raft §5.3 AppendEntries receiver: None when our log has no entry (index, log_term);
        otherwise append what is new, advance commit, and return the last new index."""
        if not self.match_term(index, log_term):
            return None
        last_new_index = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            assert conflict > self.committed, (
                f"entry {conflict} conflicts with committed entry (committed {self.committed})"
            )
            self.append(entries[conflict - index - 1 :])
        self.commit_to(min(committed, last_new_index))
        return last_new_index

    def append(self, entries: Sequence[Entry]) -> int:
        """Append `entries` (which may overwrite an uncommitted suffix); returns last index."""
        if not entries:
            return self.last_index()
        after = entries[0].index - 1
        assert after >= self.committed, f"append after {after} below commit {self.committed}"
        offset = self._unstable_offset
        if after == offset + len(self._unstable) - 1:
            self._unstable.extend(entries)
        elif after < offset:
            # Replacing entries that are already (or about to be) in storage: the unstable
            # tail restarts here and storage.save() will overwrite the stable suffix.
            self._unstable_offset = after + 1
            self._unstable = list(entries)
        else:
            del self._unstable[after + 1 - offset :]
            self._unstable.extend(entries)
        return self.last_index()

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            assert index <= self.last_index(), (
                f"commit {index} beyond last index {self.last_index()}"
            )
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Raft §5.4.2: commit by counting replicas only an entry of the leader's term."""
        if index > self.committed and self.term_or_zero(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        assert index <= self.committed, f"applied {index} beyond committed {self.committed}"
        if index > self.applied:
            self.applied = index

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by `snapshot` (Raft §7); persisted via Ready.snapshot."""
        self.committed = snapshot.metadata.index
        self._unstable_snapshot = snapshot
        self._unstable = []
        self._unstable_offset = snapshot.metadata.index + 1

    # --- the Ready side ---------------------------------------------------------------------

    def unstable_entries(self) -> tuple[Entry, ...]:
        return tuple(self._unstable)

    def has_unstable_entries(self) -> bool:
        return bool(self._unstable)

    def unstable_snapshot(self) -> Snapshot | None:
        return self._unstable_snapshot

    def has_next_committed_entries(self) -> bool:
        return self.committed > self.applied

    def next_committed_entries(self, size_bytes_max: int = _UNLIMITED) -> list[Entry]:
        """Committed entries not yet applied: (applied, committed], possibly unstable ones
        (the driver persists a Ready before applying it)."""
        if self.committed <= self.applied:
            return []
        low = max(self.applied + 1, self.first_index())
        return self.slice(low, self.committed + 1, size_bytes_max)

    def stable_to(self, index: int, term: int) -> None:
        """The driver persisted entries up to (index, term): drop them from the unstable tail,
        unless they were replaced meanwhile (then the term no longer matches)."""
        offset = self._unstable_offset
        position = index - offset
        if position < 0 or position >= len(self._unstable):
            return
        if self._unstable[position].term != term:
            return
        del self._unstable[: position + 1]
        self._unstable_offset = index + 1

    def stable_snapshot_to(self, index: int) -> None:
        if self._unstable_snapshot is not None and self._unstable_snapshot.metadata.index == index:
            self._unstable_snapshot = None
