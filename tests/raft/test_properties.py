"""Hypothesis property tests: log, quorum and progress/inflights against naive models."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.raft import quorum
from kvstore.raft.log import RaftLog
from kvstore.raft.progress import Inflights
from kvstore.raft.types import Entry
from kvstore.storage.memory import MemoryStorage

# --- quorum -----------------------------------------------------------------------------------

voter_sets = st.sets(st.integers(1, 9), min_size=1, max_size=7)


@given(voter_sets, st.data())
def test_committed_index_matches_naive_model(voters: set[int], data: st.DataObject) -> None:
    match = {v: data.draw(st.integers(0, 20)) for v in voters}
    result = quorum.committed_index(voters, match)
    # Naive: the largest index that more than half of the voters have reached.
    naive = max(
        (i for i in range(0, 21) if sum(m >= i for m in match.values()) * 2 > len(voters)),
        default=0,
    )
    assert result == naive


@given(voter_sets, st.data())
def test_vote_result_matches_naive_model(voters: set[int], data: st.DataObject) -> None:
    votes = {v: data.draw(st.booleans()) for v in voters if data.draw(st.booleans())}
    granted = sum(votes.values())
    rejected = len(votes) - granted
    missing = len(voters) - len(votes)
    if granted * 2 > len(voters):
        expected = quorum.VoteResult.WON
    elif (granted + missing) * 2 <= len(voters):
        expected = quorum.VoteResult.LOST
    else:
        expected = quorum.VoteResult.PENDING
    assert rejected >= 0
    assert quorum.vote_result(voters, votes) is expected


# --- inflights ----------------------------------------------------------------------------------


@given(
    st.integers(1, 8),
    st.integers(1, 500),
    st.lists(st.tuples(st.booleans(), st.integers(0, 120)), max_size=60),
)
def test_inflights_match_a_list_model(
    capacity: int, bytes_max: int, operations: list[tuple[bool, int]]
) -> None:
    inflights = Inflights(capacity, bytes_max)
    model: list[tuple[int, int]] = []
    next_index = 1
    for is_add, value in operations:
        full = len(model) >= capacity or sum(b for _, b in model) >= bytes_max
        assert inflights.full() is full
        if is_add:
            if full:
                continue
            inflights.add(next_index, value)
            model.append((next_index, value))
            next_index += 1 + value % 3
        else:
            upto = value % (next_index + 1)
            inflights.free_le(upto)
            model = [(i, b) for i, b in model if i > upto]
        assert inflights.count() == len(model)
        assert inflights.bytes_in_flight == sum(b for _, b in model)


# --- the log ------------------------------------------------------------------------------------

append_ops = st.lists(
    st.tuples(
        st.sampled_from(["append", "persist", "commit", "conflict"]),
        st.integers(0, 6),
    ),
    max_size=40,
)


@settings(max_examples=200)
@given(append_ops)
def test_raft_log_matches_a_list_model(operations: list[tuple[str, int]]) -> None:
    """RaftLog (stable storage + unstable tail) behaves like one plain list of terms."""
    storage = MemoryStorage()
    log = RaftLog(storage)
    model: list[int] = []  # model[i - 1] is the term at index i
    term = 1
    for op, value in operations:
        if op == "append":
            term += value % 2
            new = [Entry(term, len(model) + k + 1) for k in range(value)]
            log.append(new)
            model.extend(e.term for e in new)
        elif op == "conflict" and len(model) > log.committed:
            # A new leader's entries overwrite an uncommitted suffix (Raft §5.3).
            after = log.committed + value % (len(model) - log.committed)
            term += 1
            new = [Entry(term, after + k + 1) for k in range(1 + value % 3)]
            assert log.maybe_append(after, log.term(after), log.committed, new) == new[-1].index
            model = model[:after] + [e.term for e in new]
        elif op == "persist" and log.has_unstable_entries():
            unstable = log.unstable_entries()
            storage.save(None, unstable, None)
            log.stable_to(unstable[-1].index, unstable[-1].term)
        elif op == "commit" and model:
            log.commit_to(min(len(model), log.committed + value))
        assert log.last_index() == len(model)
        assert [log.term(i) for i in range(1, len(model) + 1)] == model
        if model:
            assert [e.term for e in log.slice(1, len(model) + 1)] == model
            conflict_probe = [Entry(t, i) for i, t in enumerate(model, start=1)]
            assert log.find_conflict(conflict_probe) == 0
        assert log.is_up_to_date(len(model), model[-1] if model else 0)


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=30).map(sorted),
    st.integers(0, 35),
    st.integers(0, 6),
    st.integers(0, 30),
)
def test_find_conflict_by_term_matches_naive_scan(
    terms: list[int], index: int, term: int, compact_to: int
) -> None:
    from kvstore.raft.types import ConfState

    storage = MemoryStorage()
    storage.save(None, [Entry(t, i) for i, t in enumerate(terms, start=1)], None)
    compact_to = min(compact_to, len(terms))
    if compact_to:
        storage.create_snapshot(compact_to, ConfState(voters=(1,)), b"")
        storage.compact(compact_to)
    log = RaftLog(storage)
    index = min(index, len(terms))
    # Naive: scan down one index at a time; a compacted index ends the scan with term 0.
    naive = (0, 0)
    for i in range(index, 0, -1):
        if i < compact_to:
            naive = (i, 0)
            break
        if terms[i - 1] <= term:
            naive = (i, terms[i - 1])
            break
    assert log.find_conflict_by_term(index, term) == naive


@given(st.lists(st.integers(0, 300), min_size=1, max_size=30), st.integers(1, 2000))
def test_slice_respects_byte_limit_but_returns_at_least_one(sizes: list[int], limit: int) -> None:
    storage = MemoryStorage()
    entries = [Entry(1, i, data=bytes(size)) for i, size in enumerate(sizes, start=1)]
    half = len(entries) // 2
    storage.save(None, entries[:half], None)
    log = RaftLog(storage)
    log.append(entries[half:])
    result = log.slice(1, len(entries) + 1, limit)
    assert result == entries[: len(result)]
    assert len(result) >= 1
    if len(result) > 1:
        assert sum(e.size_bytes() for e in result) <= limit


# --- MemoryStorage ------------------------------------------------------------------------------


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from(["save", "snapshot"]), st.integers(0, 8), st.integers(0, 5)),
        max_size=30,
    )
)
def test_memory_storage_matches_a_dict_model(operations: list[tuple[str, int, int]]) -> None:
    """Saves overwrite conflicting suffixes (Raft §5.3); snapshots and compaction keep every
    later entry; reads outside the kept range raise the typed errors."""
    from kvstore.errors import CompactedError, UnavailableIndexError
    from kvstore.raft.types import ConfState

    storage = MemoryStorage()
    model: dict[int, int] = {}  # index -> term of the live log
    snapshot_index = 0
    term = 1
    for op, a, b in operations:
        last = max(model, default=snapshot_index)
        if op == "save":
            term += b % 2
            start = max(snapshot_index + 1, last + 1 - a)
            entries = [Entry(term, i) for i in range(start, start + b + 1)]
            storage.save(None, entries, None)
            model = {i: t for i, t in model.items() if i < start}
            model.update({e.index: e.term for e in entries})
        elif last > snapshot_index:
            index = snapshot_index + 1 + a % (last - snapshot_index)
            storage.create_snapshot(index, ConfState(voters=(1,)), b"")
            storage.compact(index)
            snapshot_index = index
            model = {i: t for i, t in model.items() if i > index}
        last = max(model, default=snapshot_index)
        assert storage.first_index() == snapshot_index + 1
        assert storage.last_index() == last
        assert [e.term for e in storage.entries(snapshot_index + 1, last + 1, 1 << 30)] == [
            model[i] for i in range(snapshot_index + 1, last + 1)
        ]
        if snapshot_index:
            with pytest.raises(CompactedError):
                storage.term(snapshot_index - 1)
        with pytest.raises(UnavailableIndexError):
            storage.term(last + 1)
