"""MemoryStorage.save_torn(): the crash modelling the simulator uses leaves exactly the states
a torn write to DiskStorage's log can leave (a prefix of TRUNCATE, entries, hard state)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from kvstore.storage.memory import MemoryStorage


def _log(storage: MemoryStorage) -> tuple[list[Entry], HardState]:
    entries = storage.entries(storage.first_index(), storage.last_index() + 1, 1 << 40)
    return entries, storage.initial_state()[0]


def _candidates(
    before: list[Entry], hard_state: HardState, entries: list[Entry], new_hard_state: HardState
) -> list[tuple[list[Entry], HardState]]:
    first = entries[0].index
    base = [e for e in before if e.index < first]
    result = [(before, hard_state)]
    if first <= len(before):
        result.append((base, hard_state))
    result.extend((base + entries[:k], hard_state) for k in range(1, len(entries) + 1))
    result.append((base + entries, new_hard_state))
    return result


@settings(max_examples=200, deadline=None)
@given(
    existing=st.integers(0, 10),
    first=st.integers(1, 11),
    count=st.integers(1, 5),
    seed=st.integers(0, 1 << 30),
)
def test_save_torn_leaves_a_prefix_of_the_records(
    existing: int, first: int, count: int, seed: int
) -> None:
    first = min(first, existing + 1)
    storage = MemoryStorage(ConfState(voters=(1,)))
    before = [Entry(term=1, index=i, data=b"old%d" % i) for i in range(1, existing + 1)]
    if before:
        storage.save(HardState(term=1, commit=0), before, None)
    hard_state = storage.initial_state()[0]
    entries = [Entry(term=2, index=first + i, data=b"new") for i in range(count)]
    new_hard_state = HardState(term=2, vote=1, commit=0)
    storage.save_torn(new_hard_state, entries, None, random.Random(seed))
    assert _log(storage) in _candidates(before, hard_state, entries, new_hard_state)


def test_save_torn_snapshot_is_all_or_nothing() -> None:
    outcomes = set()
    snapshot = Snapshot(SnapshotMetadata(index=10, term=3, conf_state=ConfState(voters=(1,))))
    for seed in range(20):
        storage = MemoryStorage(ConfState(voters=(1,)))
        storage.save(HardState(term=1), [Entry(term=1, index=1)], None)
        storage.save_torn(HardState(term=3, commit=10), [], snapshot, random.Random(seed))
        state = (storage.first_index(), storage.last_index(), storage.initial_state()[0].term)
        assert state in [(1, 1, 1), (11, 10, 3)]
        outcomes.add(state)
    assert len(outcomes) == 2
