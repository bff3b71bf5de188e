"""MemoryStorage and DiskStorage driven side by side: after every step they answer alike.

MemoryStorage is the reference the simulator runs on; DiskStorage is what the server runs on.
Their `save()` guards are written independently (memory.py `_apply_snapshot` / `_append`,
disk.py `_drop_compacted` / `_install_snapshot`), so this test gives both the same random
sequence of the writes a driver makes (docs/architecture.md §2, kvstore/storage) and compares
everything the Raft core can read back:

- writes: `save(hard_state, entries, snapshot)` appending at the tail, replacing a conflicting
  tail (Raft §5.3), resending entries the log already has (with a compacted front), moving the
  hard state alone, installing a leader's snapshot inside or past the log (Raft §7);
  `create_snapshot` at a committed index (then compaction, as the server does), `compact` up
  to the snapshot, writes both must refuse; and, for DiskStorage only, a reopen (a clean
  restart after the last save returned);
- reads compared after each step: `initial_state()`, `first_index()`, `last_index()`,
  `term(i)` from below the first index to past the last (the error class included),
  `entries(lo, hi, size_bytes_max)` over whole and partial ranges with small and large byte
  limits, `snapshot()`.

Entries carry what a log holds: plain payloads, CONF_CHANGE records and batch entries
(several puts in one entry, as a leader under load proposes them). The writes are the ones
the core can produce: entries start at the tail or at an index where
the stored term differs (Raft §5.3), or resend a matching front that runs past the tail. One
input outside that set, a stale resend that ends inside the log, is a known difference and is
pinned by `test_a_stale_resend_inside_the_log_keeps_the_tail` (xfail) below.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.errors import KVStoreError
from kvstore.kv.commands import Put, RequestId, encode_batch, encode_command
from kvstore.raft import confchange
from kvstore.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
)
from kvstore.storage.disk import DiskStorage
from kvstore.storage.fs import FileSystem
from kvstore.storage.memory import MemoryStorage

VOTERS = ConfState(voters=(1, 2, 3))
NEW_VOTERS = ConfState(voters=(1, 2, 3, 4, 5))
T = TypeVar("T")
Answer = tuple[str, object]


def _answer(read: Callable[..., T], *args: int) -> Answer:
    """The value `read(*args)` returns, or the class of the typed error it raises."""
    try:
        return ("ok", read(*args))
    except (KVStoreError, ValueError) as exc:
        return ("raises", type(exc).__name__)


class _NoSyncFileSystem(FileSystem):
    """Real files, no fsync: this test compares what the two storages answer, not what
    survives a power cut (tests/storage/test_wal_stateful.py and test_crash_process.py do
    that), and thousands of fsyncs would make it slow on a busy disk. A reopen still reads
    everything back from the files (the page cache)."""

    def fsync(self, fd: int) -> None:
        pass

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync_directory(self, path: str) -> None:
        pass


def _open_disk(directory: str) -> DiskStorage:
    # Small segments and a low rewrite threshold so compaction exercises both of its paths
    # (the cheap COMPACT record and the rewrite into a new segment).
    return DiskStorage(
        directory,
        initial_conf_state=VOTERS,
        segment_size_bytes=1024,
        compact_after_entries=6,
        fs=_NoSyncFileSystem(),
    )


class SideBySide(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="kvstore-differential-")
        self.memory = MemoryStorage(VOTERS)
        self.disk = _open_disk(self.directory)
        self.term = 1
        self.commit = 0
        self.serial = 0

    def teardown(self) -> None:
        self.disk.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- helpers ------------------------------------------------------------------------------

    def _both(self, write: Callable[[MemoryStorage | DiskStorage], object]) -> None:
        """Apply one write to both; they must both succeed or both raise the same class."""
        assert _answer(lambda: write(self.memory)) == _answer(lambda: write(self.disk))

    def _entries(self, first: int, count: int, size: int) -> list[Entry]:
        entries = []
        for index in range(first, first + count):
            self.serial += 1
            if self.serial % 11 == 0:
                # A CONF_CHANGE entry must hold a well-formed change (recovery checks it).
                change = confchange.ConfChange(
                    confchange.ConfChangeType.ADD_LEARNER, 4, bytes([self.serial % 256]) * size
                )
                record = confchange.ConfChangeEntry(change, ConfState((1, 2, 3), (4,)))
                data = confchange.encode(record)
                entries.append(Entry(self.term, index, EntryType.CONF_CHANGE, data))
                continue
            data = b"" if size == 0 else bytes([self.serial % 256]) * size
            if self.serial % 7 == 0:
                # A batch entry, as a leader under load writes them (kvstore/kv/commands.py).
                data = encode_batch(
                    [
                        encode_command(Put(f"k{n}", data, RequestId("d", self.serial + n), 0))
                        for n in range(1 + size % 3)
                    ]
                )
            entries.append(Entry(self.term, index, EntryType.NORMAL, data))
        return entries

    def _hard_state(self, vote: int = 1) -> HardState:
        return HardState(term=self.term, vote=vote, commit=self.commit)

    # --- writes -------------------------------------------------------------------------------

    @rule(
        count=st.integers(1, 6),
        size=st.integers(0, 40),
        commit_to_end=st.booleans(),
        new_term=st.booleans(),
    )
    def append(self, count: int, size: int, commit_to_end: bool, new_term: bool) -> None:
        """Entries after the tail; with new_term, as a new leader's (so the log's terms change
        often and a term answered from the wrong entry shows)."""
        if new_term:
            self.term += 1
        entries = self._entries(self.memory.last_index() + 1, count, size)
        if commit_to_end:
            self.commit = entries[-1].index
        hard_state = self._hard_state()
        self._both(lambda s: s.save(hard_state, entries, None))

    @precondition(
        lambda self: self.memory.last_index() > max(self.commit, self.memory.first_index() - 1)
    )
    @rule(data=st.data(), count=st.integers(0, 5), size=st.integers(0, 40))
    def replace_tail(self, data: st.DataObject, count: int, size: int) -> None:
        """Raft §5.3: a new leader's entries replace our uncommitted suffix from the first
        index where the terms differ (the new term is higher than any stored one)."""
        low = max(self.commit, self.memory.first_index() - 1) + 1
        first = data.draw(st.integers(low, self.memory.last_index()), label="first")
        self.term += 1
        entries = self._entries(first, max(1, count), size)
        hard_state = self._hard_state()
        self._both(lambda s: s.save(hard_state, entries, None))

    @rule(data=st.data(), count=st.integers(1, 4), size=st.integers(0, 20))
    def resend_through_tail(self, data: st.DataObject, count: int, size: int) -> None:
        """Entries we already have (some maybe compacted away) followed by new ones: only the
        new ones are stored, the matching front changes nothing (Log Matching, Raft §5.3)."""
        offset, last = self.memory.first_index() - 1, self.memory.last_index()
        first = data.draw(st.integers(max(1, offset - 3), last + 1), label="first")
        # A compacted entry's content no longer matters: both storages skip it unread.
        compacted = [Entry(self.term, index) for index in range(first, offset + 1)]
        low = max(first, offset + 1)
        stored = self.memory.entries(low, last + 1, 1 << 40) if low <= last else []
        entries = compacted + stored + self._entries(last + 1, count, size)
        self._both(lambda s: s.save(None, entries, None))

    @rule(vote=st.integers(0, 3), term_up=st.booleans(), nothing=st.booleans())
    def hard_state_alone(self, vote: int, term_up: bool, nothing: bool) -> None:
        """A Ready with only a new hard state, or (nothing) with nothing to store at all."""
        if nothing:
            self._both(lambda s: s.save(None, [], None))
            return
        if term_up:
            self.term += 1
        hard_state = self._hard_state(vote)
        self._both(lambda s: s.save(hard_state, [], None))

    def _snapshot_range(self) -> tuple[int, int]:
        """Indexes a new snapshot may cover: newer than the current one, committed, stored."""
        low = max(self.memory.snapshot().metadata.index, self.memory.first_index() - 1) + 1
        return low, min(self.commit, self.memory.last_index())

    @precondition(lambda self: self._snapshot_range()[0] <= self._snapshot_range()[1])
    @rule(
        data=st.data(),
        new_members=st.booleans(),
        size=st.integers(0, 30),
        keep=st.none() | st.integers(0, 4),
    )
    def create_snapshot(
        self, data: st.DataObject, new_members: bool, size: int, keep: int | None
    ) -> None:
        """The driver's snapshot of the applied state, then (unless keep is None) compaction
        up to `keep` entries before it, as the server does after a snapshot."""
        index = data.draw(st.integers(*self._snapshot_range()), label="index")
        conf_state = NEW_VOTERS if new_members else ConfState()
        payload = bytes([index % 256]) * size
        made = [s.create_snapshot(index, conf_state, payload) for s in (self.memory, self.disk)]
        assert made[0] == made[1]
        if keep is not None:
            self._both(lambda s: s.compact(max(0, index - keep)))

    @precondition(lambda self: self.memory.snapshot().metadata.index >= self.memory.first_index())
    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        index = data.draw(
            st.integers(self.memory.first_index() - 1, self.memory.snapshot().metadata.index),
            label="index",
        )
        self._both(lambda s: s.compact(index))

    @rule(data=st.data())
    def refused(self, data: st.DataObject) -> None:
        """Writes both must refuse alike, changing nothing: a snapshot not newer than the
        current one or past the log, compaction past the snapshot."""
        snapshot_index = self.memory.snapshot().metadata.index
        choice = data.draw(st.sampled_from(["old snapshot", "future snapshot", "compact"]))
        if choice == "compact":
            self._both(lambda s: s.compact(snapshot_index + 1))
        else:
            index = snapshot_index if choice == "old snapshot" else self.memory.last_index() + 1
            self._both(lambda s: s.create_snapshot(index, VOTERS, b"x"))

    @rule(
        data=st.data(),
        count=st.integers(0, 3),
        new_members=st.booleans(),
        with_hard_state=st.booleans(),
    )
    def install_snapshot(
        self, data: st.DataObject, count: int, new_members: bool, with_hard_state: bool
    ) -> None:
        """Raft §7: a leader's snapshot, inside our log or past it, replaces the whole log;
        entries of the same Ready follow it. An older one is ignored but its entries kept."""
        current = self.memory.snapshot().metadata.index
        index = data.draw(
            st.integers(max(1, current - 1), self.memory.last_index() + 5), label="index"
        )
        if index <= current:
            snapshot_term = self.memory.snapshot().metadata.term
        else:
            self.term += 1
            snapshot_term = self.term
        conf_state = NEW_VOTERS if new_members else ConfState()
        snapshot = Snapshot(SnapshotMetadata(index, snapshot_term, conf_state), b"leader")
        if index <= current:
            entries = self._entries(self.memory.last_index() + 1, count, 5)
        else:
            entries = self._entries(index + 1, count, 5)
            self.commit = max(self.commit, index)
        hard_state = self._hard_state() if with_hard_state else None
        self._both(lambda s: s.save(hard_state, entries, snapshot))

    @rule()
    def reopen_disk(self) -> None:
        """A clean restart after the last save returned: DiskStorage recovers what it had."""
        self.disk.close()
        self.disk = _open_disk(self.directory)

    # --- the comparison -----------------------------------------------------------------------

    @invariant()
    def both_answer_alike(self) -> None:
        memory, disk = self.memory, self.disk
        assert disk.initial_state() == memory.initial_state()
        assert disk.first_index() == memory.first_index()
        assert disk.last_index() == memory.last_index()
        assert disk.snapshot() == memory.snapshot()
        first, last = memory.first_index(), memory.last_index()
        for index in range(max(0, first - 2), last + 3):
            assert _answer(disk.term, index) == _answer(memory.term, index), index
        for read_range in self._ranges(first, last):
            assert _answer(disk.entries, *read_range) == _answer(memory.entries, *read_range), (
                read_range
            )

    @staticmethod
    def _ranges(first: int, last: int) -> Iterator[tuple[int, int, int]]:
        middle = (first + last) // 2
        for low, high in (
            (first, last + 1),
            (first, middle + 1),
            (middle, last + 1),
            (first - 1, last + 1),  # reaches into the snapshot
            (first, last + 2),  # reaches past the tail
            (last + 1, last + 1),  # empty, at the tail
        ):
            if low < 1 or high < low:
                continue
            for size_bytes_max in (0, 40, 1 << 30):
                yield low, high, size_bytes_max


SideBySide.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryAgainstDisk = SideBySide.TestCase


@pytest.mark.xfail(
    strict=True,
    reason="MemoryStorage._append drops every stored entry after a resent batch, even when "
    "the batch matches the log (same index and term) and ends before its tail; "
    "DiskStorage._drop_compacted skips the matching front and keeps the tail. The core "
    "never saves such a batch today (RaftLog appends from the first conflict).",
)
def test_a_stale_resend_inside_the_log_keeps_the_tail(tmp_path: Path) -> None:
    memory, disk = MemoryStorage(VOTERS), _open_disk(str(tmp_path))
    log = [Entry(1, index, EntryType.NORMAL, b"v%d" % index) for index in range(1, 6)]
    try:
        for storage in (memory, disk):
            storage.save(HardState(term=1, vote=1, commit=2), log, None)
            storage.save(None, log[1:3], None)  # entries 2..3 again, unchanged
        assert disk.last_index() == 5
        assert memory.last_index() == disk.last_index()
    finally:
        disk.close()


@pytest.fixture(autouse=True)
def _quiet_storage_logs() -> None:
    logging.getLogger("kvstore.storage").setLevel(logging.ERROR)
