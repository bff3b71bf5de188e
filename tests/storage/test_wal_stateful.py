"""Hypothesis stateful test of the write-ahead log against a naive model.

The model is the durable log (term and data per index), the hard state, the compaction
offset and the snapshot. Rules append, append conflicting entries (Raft §5.3 truncation),
move the hard state, snapshot and compact, reopen (a clean crash after a synced save), tear a
save at any byte offset (a crash mid-write: a prefix of the buffer reached the file), leave a
zero-filled tail, and flip one bit anywhere in the synced files.

Properties:
- after a reopen the log equals the model (every synced record, nothing else);
- after a torn save the log equals the model with some prefix of that save's records applied
  (never a fabricated or altered entry), and the cut is logged;
- a flipped bit is reported as CorruptionError naming the file and an offset at or before the
  flipped byte, never skipped.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.errors import CorruptionError
from kvstore.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from kvstore.storage.disk import DiskStorage
from tests.storage.faults import SimulatedCrash, TornWriteFileSystem

VOTERS = ConfState(voters=(1, 2, 3))


@dataclass
class Model:
    offset: int = 0
    offset_term: int = 0
    entries: list[Entry] = field(default_factory=list)
    hard_state: HardState = field(default_factory=HardState)
    snapshot_index: int = 0

    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    def copy(self) -> Model:
        return Model(
            self.offset, self.offset_term, list(self.entries), self.hard_state, self.snapshot_index
        )

    def put(self, entries: list[Entry]) -> None:
        del self.entries[entries[0].index - self.offset - 1 :]
        self.entries.extend(entries)


class WalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="kvstore-wal-")
        self.fs = TornWriteFileSystem()
        self.storage = self._open()
        self.model = Model()
        self.term = 1

    def _open(self) -> DiskStorage:
        return DiskStorage(
            self.directory,
            initial_conf_state=VOTERS,
            segment_size_bytes=1024,
            compact_after_entries=8,
            fs=self.fs,
        )

    def teardown(self) -> None:
        self.storage.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _entries(self, first: int, count: int, seed: int) -> list[Entry]:
        return [
            Entry(term=self.term, index=first + i, data=os.urandom(seed % 7) + bytes([i]) * seed)
            for i in range(count)
        ]

    # --- writes -------------------------------------------------------------------------------

    @rule(count=st.integers(1, 12), seed=st.integers(0, 200), commit=st.booleans())
    def append(self, count: int, seed: int, commit: bool) -> None:
        entries = self._entries(self.model.last_index() + 1, count, seed)
        hard_state = self._next_hard_state(commit, entries[-1].index)
        self.storage.save(hard_state, entries, None)
        self.model.put(entries)
        self.model.hard_state = hard_state

    @precondition(lambda self: self.model.last_index() > self.model.hard_state.commit)
    @rule(data=st.data(), count=st.integers(1, 5), seed=st.integers(0, 50))
    def append_conflicting(self, data: st.DataObject, count: int, seed: int) -> None:
        """Raft §5.3: a new leader's entries replace our uncommitted suffix."""
        low = max(self.model.hard_state.commit, self.model.offset) + 1
        first = data.draw(st.integers(low, self.model.last_index()))
        self.term += 1
        entries = self._entries(first, count, seed)
        hard_state = HardState(term=self.term, vote=1, commit=self.model.hard_state.commit)
        self.storage.save(hard_state, entries, None)
        self.model.put(entries)
        self.model.hard_state = hard_state

    def _next_hard_state(self, commit: bool, last: int) -> HardState:
        current = self.model.hard_state
        new_commit = max(current.commit, last - 2) if commit else current.commit
        return HardState(term=self.term, vote=1, commit=new_commit)

    @precondition(lambda self: self.model.hard_state.commit > self.model.snapshot_index)
    @rule(data=st.data(), keep=st.integers(0, 5))
    def snapshot_and_compact(self, data: st.DataObject, keep: int) -> None:
        index = data.draw(
            st.integers(
                max(self.model.snapshot_index, self.model.offset) + 1,
                self.model.hard_state.commit,
            )
        )
        snapshot = self.storage.create_snapshot(index, VOTERS, b"state@%d" % index)
        assert snapshot.metadata.term == self._model_term(index)
        self.model.snapshot_index = index
        compact_to = index - keep
        if compact_to > self.model.offset:
            self.storage.compact(compact_to)
            self.model.offset_term = self._model_term(compact_to)
            del self.model.entries[: compact_to - self.model.offset]
            self.model.offset = compact_to

    @rule(gap=st.integers(0, 20), count=st.integers(0, 4))
    def install_snapshot(self, gap: int, count: int) -> None:
        """Raft §7: a leader's snapshot past our log replaces all of it."""
        index = max(self.model.last_index(), self.model.snapshot_index) + 1 + gap
        self.term += 1
        snapshot = Snapshot(SnapshotMetadata(index, self.term, VOTERS), b"leader@%d" % index)
        entries = self._entries(index + 1, count, 3)
        hard_state = HardState(term=self.term, vote=0, commit=index)
        self.storage.save(hard_state, entries, snapshot)
        self.model = Model(index, self.term, entries, hard_state, index)

    def _model_term(self, index: int) -> int:
        if index == self.model.offset:
            return self.model.offset_term
        return self.model.entries[index - self.model.offset - 1].term

    # --- crashes ------------------------------------------------------------------------------

    @rule()
    def reopen(self) -> None:
        """A crash after a save returned: everything synced is there, nothing else."""
        self.storage.close()
        self.storage = self._open()
        self._check_equal(self.model)

    @rule(count=st.integers(1, 12), conflict=st.booleans(), tear=st.floats(0, 1))
    def torn_save(self, count: int, conflict: bool, tear: float) -> None:
        """A crash in the middle of a save's write: some prefix of its bytes hit the file."""
        before = self.model.copy()
        first = self.model.last_index() + 1
        if conflict and self.model.last_index() > max(self.model.hard_state.commit, before.offset):
            first = self.model.last_index()
            self.term += 1
        entries = self._entries(first, count, count)
        hard_state = HardState(term=self.term, vote=1, commit=self.model.hard_state.commit)
        candidates = [before]
        if first <= before.last_index():  # TRUNCATE record applied alone
            truncated = before.copy()
            del truncated.entries[first - before.offset - 1 :]
            candidates.append(truncated)
        with_entries = before.copy()
        with_entries.put(entries)
        candidates.append(with_entries)
        complete = with_entries.copy()
        complete.hard_state = hard_state
        candidates.append(complete)
        # Tear somewhere inside the buffer this save will write (~ its encoded size).
        self.fs.tear_at = int(tear * (count * (len(entries[-1].data) + 20) + 40))
        with pytest.raises(SimulatedCrash):
            self.storage.save(hard_state, entries, None)
        self.storage.close()
        self.storage = self._open()
        recovered = self._recovered()
        assert recovered in [self._comparable(c) for c in candidates], recovered
        self.model = next(c for c in candidates if self._comparable(c) == recovered)

    @rule(zeros=st.integers(1, 64))
    def zero_filled_tail(self, zeros: int) -> None:
        """The file grew but its data never came: a zero tail is cut like a torn one."""
        self.storage.close()
        with open(self._segments()[-1], "ab") as file:
            file.write(b"\0" * zeros)
        self.storage = self._open()
        self._check_equal(self.model)

    @rule(data=st.data())
    def bit_flip(self, data: st.DataObject) -> None:
        """A flipped bit anywhere in the synced files is reported, never skipped."""
        self.storage.close()
        candidates = [p for p in self._segments() if os.path.getsize(p) > 0]
        path = data.draw(st.sampled_from(candidates))
        size = os.path.getsize(path)
        position = data.draw(st.integers(0, size - 1))
        bit = data.draw(st.integers(0, 7))
        self._flip(path, position, bit)
        try:
            with pytest.raises(CorruptionError) as caught:
                self._open()
            assert caught.value.path == path
            assert 0 <= caught.value.offset <= position
        finally:
            self._flip(path, position, bit)
        self.storage = self._open()
        self._check_equal(self.model)

    # --- checks -------------------------------------------------------------------------------

    def _segments(self) -> list[str]:
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".wal"))
        return [os.path.join(self.directory, n) for n in names]

    @staticmethod
    def _flip(path: str, position: int, bit: int) -> None:
        with open(path, "r+b") as file:
            file.seek(position)
            byte = file.read(1)[0]
            file.seek(position)
            file.write(bytes([byte ^ (1 << bit)]))

    def _recovered(self) -> tuple[object, ...]:
        storage = self.storage
        entries = storage.entries(storage.first_index(), storage.last_index() + 1, 1 << 40)
        if storage.last_index() < storage.first_index():
            entries = []
        return (storage.first_index(), tuple(entries), storage.initial_state()[0])

    @staticmethod
    def _comparable(model: Model) -> tuple[object, ...]:
        return (model.offset + 1, tuple(model.entries), model.hard_state)

    def _check_equal(self, model: Model) -> None:
        assert self._recovered() == self._comparable(model)
        assert self.storage.snapshot().metadata.index == model.snapshot_index
        assert self.storage.initial_state()[1] == VOTERS

    @invariant()
    def memory_matches_model(self) -> None:
        assert self.storage.last_index() == self.model.last_index()
        assert self.storage.first_index() == self.model.offset + 1


WalMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWal = WalMachine.TestCase


@pytest.fixture(autouse=True)
def _quiet_storage_logs() -> None:
    logging.getLogger("kvstore.storage").setLevel(logging.ERROR)
