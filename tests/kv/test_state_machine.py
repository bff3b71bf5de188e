"""The state machine against a naive dict model (Hypothesis), plus snapshots and digests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.errors import ProtocolError
from kvstore.kv.commands import (
    Command,
    Delete,
    KeyValue,
    Put,
    RequestId,
    WriteResult,
    encode_command,
)
from kvstore.kv.state_machine import SNAPSHOT_FORMAT_VERSION, StateMachine
from kvstore.raft import confchange
from kvstore.raft.types import ConfState, Entry, EntryType

keys = st.text(alphabet="abc", min_size=1, max_size=3)
prefixes = st.text(alphabet="abc", max_size=2)
values = st.binary(max_size=4)
clients = st.sampled_from([None, "a", "b"])


def apply(machine: StateMachine, command: Command) -> WriteResult:
    result = machine.apply(
        Entry(term=1, index=machine.applied_index + 1, data=encode_command(command))
    )
    assert result is not None
    return result


@dataclass
class ModelKey:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


class StateMachineVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.machine = StateMachine()
        self.model: dict[str, ModelKey] = {}
        self.revision = 0
        self.time_ms = 0
        # Tagged writes already applied, with their answers: retries must get the same.
        self.history: list[tuple[Command, WriteResult]] = []
        self.next_seq = {"a": 1, "b": 1}

    def _request(self, client: str | None) -> RequestId | None:
        if client is None:
            return None
        seq = self.next_seq[client]
        self.next_seq[client] = seq + 1
        return RequestId(client, seq)

    def _apply(self, command: Command) -> WriteResult:
        result = apply(self.machine, command)
        if command.request is not None:
            self.history.append((command, result))
        return result

    def _tick(self) -> int:
        self.time_ms += 7
        return self.time_ms

    def _model_put(self, key: str, value: bytes) -> None:
        self.revision += 1
        old = self.model.get(key)
        if old is None:
            self.model[key] = ModelKey(value, self.revision, self.revision, 1)
        else:
            self.model[key] = ModelKey(value, old.create_revision, self.revision, old.version + 1)

    def _current_revision(self, key: str) -> int:
        old = self.model.get(key)
        return 0 if old is None else old.mod_revision

    @rule(key=keys, value=values, client=clients)
    def put(self, key: str, value: bytes, client: str | None) -> None:
        result = self._apply(Put(key, value, self._request(client), self._tick()))
        self._model_put(key, value)
        assert result.ok and result.revision == self.revision
        assert result.key_value is not None
        assert result.key_value.mod_revision == self.revision

    @rule(
        key=keys,
        value=values,
        guess=st.integers(min_value=0, max_value=30),
        exact=st.booleans(),
        client=clients,
    )
    def cas(self, key: str, value: bytes, guess: int, exact: bool, client: str | None) -> None:
        expected = self._current_revision(key) if exact else guess
        command = Put(key, value, self._request(client), self._tick(), if_revision=expected)
        result = self._apply(command)
        if expected == self._current_revision(key):
            self._model_put(key, value)
            assert result.ok and result.revision == self.revision
        else:
            assert not result.ok and result.error == "precondition_failed"
            assert result.revision == self.revision
            assert result.current_revision == self._current_revision(key)

    @rule(key=keys, value=values, client=clients)
    def create_only(self, key: str, value: bytes, client: str | None) -> None:
        command = Put(key, value, self._request(client), self._tick(), create_only=True)
        result = self._apply(command)
        if key in self.model:
            assert not result.ok and result.error == "precondition_failed"
        else:
            self._model_put(key, value)
            assert result.ok and result.prev is None

    @rule(
        key=keys,
        conditional=st.booleans(),
        guess=st.integers(min_value=0, max_value=30),
        client=clients,
    )
    def delete(self, key: str, conditional: bool, guess: int, client: str | None) -> None:
        if_revision = guess if conditional else None
        command = Delete(key, self._request(client), self._tick(), if_revision=if_revision)
        result = self._apply(command)
        if if_revision is not None and if_revision != self._current_revision(key):
            assert result.error == "precondition_failed"
        elif key not in self.model:
            assert result.error == "not_found"
        else:
            old = self.model.pop(key)
            self.revision += 1
            assert result.ok and result.revision == self.revision
            assert result.prev is not None and result.prev.mod_revision == old.mod_revision

    @rule(prefix=prefixes, limit=st.integers(min_value=0, max_value=5))
    def list_prefix(self, prefix: str, limit: int) -> None:
        items, more = self.machine.list(prefix, limit)
        expected = sorted(k for k in self.model if k.startswith(prefix))
        shown = expected if limit == 0 else expected[:limit]
        assert [kv.key for kv in items] == shown
        assert more == (len(shown) < len(expected))
        for kv in items:
            assert kv == self._model_kv(kv.key)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A client retries a tagged write: the first answer comes back, nothing changes
        (the model is not touched, so the invariant checks that)."""
        command, first = self.history[data.draw(st.integers(0, len(self.history) - 1))]
        retried = dataclasses.replace(command, time_ms=self._tick())
        assert apply(self.machine, retried) == first

    @rule()
    def empty_entry(self) -> None:
        index = self.machine.applied_index + 1
        assert self.machine.apply(Entry(term=2, index=index)) is None
        assert self.machine.applied_index == index

    @precondition(lambda self: self.machine.applied_index > 0)
    @rule()
    def snapshot_round_trip(self) -> None:
        restored = StateMachine()
        restored.restore(self.machine.snapshot(), self.machine.applied_index)
        assert restored.digest() == self.machine.digest()
        self.machine = restored

    def _model_kv(self, key: str) -> KeyValue:
        m = self.model[key]
        return KeyValue(key, m.value, m.create_revision, m.mod_revision, m.version)

    @invariant()
    def same_contents(self) -> None:
        assert self.machine.revision == self.revision
        assert len(self.machine) == len(self.model)
        for key in self.model:
            assert self.machine.get(key) == self._model_kv(key)
        assert self.machine.get("zzz") is None
        self.machine.check_invariants()


StateMachineVsModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestStateMachineVsModel = StateMachineVsModel.TestCase


def test_conf_change_entries_only_advance_the_applied_index() -> None:
    """Without a member context (kv/members.py: those go to the member table)."""
    machine = StateMachine()
    before = machine.digest()
    data = confchange.encode(
        confchange.ConfChangeEntry(
            confchange.ConfChange(confchange.ConfChangeType.ADD_LEARNER, 4),
            ConfState(voters=(1, 2, 3), learners=(4,)),
        )
    )
    assert machine.apply(Entry(term=1, index=1, type=EntryType.CONF_CHANGE, data=data)) is None
    assert machine.applied_index == 1
    machine.restore(machine.snapshot(), 1)
    after_empty = StateMachine()
    after_empty.apply(Entry(term=1, index=1))
    assert machine.digest() == after_empty.digest() != before


def test_malformed_entry_raises_and_changes_nothing() -> None:
    machine = StateMachine()
    apply(machine, Put("a", b"1", None, 5))
    digest = machine.digest()
    with pytest.raises(ProtocolError):
        machine.apply(Entry(term=1, index=2, data=b"\x01\x93garbage"))
    assert machine.digest() == digest and machine.applied_index == 1


def test_equal_histories_give_equal_digests_and_different_ones_differ() -> None:
    def build(value: bytes) -> StateMachine:
        machine = StateMachine()
        for i, key in enumerate(["b", "a", "c", "a"]):
            apply(machine, Put(key, value, None, 10 * i))
        apply(machine, Delete("c", None, 50))
        return machine

    assert build(b"x").digest() == build(b"x").digest()
    assert build(b"x").digest() != build(b"y").digest()


@pytest.mark.parametrize("keys", [0, 1, 2047, 2048, 2049, 5000])
def test_chunked_snapshot_is_byte_for_byte_one_msgpack_array(keys: int) -> None:
    """`snapshot` packs the key array in chunks (so the GIL is released between them); the
    bytes must be those of one packb of the whole state, around every chunk boundary, or
    digests and restores across versions would disagree."""
    machine = StateMachine()
    for i in range(keys):
        apply(machine, Put(f"k{i:05d}", bytes([i % 251]) * (i % 7), RequestId("c", i + 1), i))
    flat: list[object] = []
    for key in sorted(machine._data):
        flat.extend((key, *machine._data[key]))
    whole = [
        machine.applied_index,
        machine.revision,
        machine.clock_ms,
        flat,
        machine.sessions.to_obj(),
        {"history": machine.history.to_obj(), "leases": machine.leases.to_obj()},
    ]
    expected = bytes((SNAPSHOT_FORMAT_VERSION,)) + msgpack.packb(whole, use_bin_type=True)
    assert machine.snapshot() == expected
    restored = StateMachine()
    restored.restore(expected, machine.applied_index)
    assert restored.digest() == machine.digest()


def test_restore_rejects_a_wrong_index_and_garbage() -> None:
    machine = StateMachine()
    apply(machine, Put("a", b"1", None, 5))
    data = machine.snapshot()
    other = StateMachine()
    with pytest.raises(ProtocolError):
        other.restore(data, 2)
    for bad in (b"", b"\x03" + data[1:], data[:-3], b"\x02\xc0", b"\x01\xc0"):
        with pytest.raises(ProtocolError):
            other.restore(bad, 1)
    assert other.applied_index == 0 and other.get("a") is None
    other.restore(data, 1)
    assert other.get("a") == machine.get("a")


def test_list_handles_high_code_points_and_limits() -> None:
    machine = StateMachine()
    for key in ["a", "a\U0010ffff", "a\U0010ffffz", "b", "\U0010ffff"]:
        apply(machine, Put(key, b"", None, 0))
    items, more = machine.list("a\U0010ffff", 0)
    assert [kv.key for kv in items] == ["a\U0010ffff", "a\U0010ffffz"] and not more
    items, more = machine.list("", 2)
    assert [kv.key for kv in items] == ["a", "a\U0010ffff"] and more
    items, more = machine.list("", 5)
    assert len(items) == 5 and not more
    with pytest.raises(ValueError):
        machine.list("", -1)


def test_stored_records_drop_out_of_garbage_collection() -> None:
    """Regression: records were a NamedTuple subclass, which the collector tracks forever, so
    a store of a million keys made each full collection walk a million objects (0.3-0.4 s
    pauses measured under the 10-minute benchmark, long enough to cost the leader its
    lease). Plain tuples of atomic values are untracked after their first collection."""
    import gc

    from kvstore.kv.commands import Put, RequestId

    machine = StateMachine()
    for i in range(2_000):
        machine.apply_command(
            Put(key=f"k{i:05d}", value=b"v", request=RequestId("c", i + 1), time_ms=i + 1)
        )
    restored = StateMachine()
    restored.restore(machine.snapshot(), machine.applied_index)
    gc.collect()
    for store in (machine, restored):
        records = list(store._data.values())
        assert len(records) == 2_000
        assert not any(gc.is_tracked(record) for record in records)


def test_the_store_map_stays_out_of_young_collections() -> None:
    """Regression: a full collection untracks an exact dict whose values are untracked, and
    the next insert tracks it again in generation 0, so the next young collections walked
    the whole store (a 600,000-key dict among the young objects of 140-170 ms generation-1
    pauses). The map is a dict subclass, which the collector never untracks."""
    import gc

    from kvstore.kv.commands import Put, RequestId

    machine = StateMachine()
    for i in range(1_000):
        machine.apply_command(Put(f"k{i:05d}", b"v", RequestId("c", i + 1), i + 1))
    gc.collect()
    machine.apply_command(Put("fresh", b"v", RequestId("c", 1_001), 1_001))
    store = machine._data
    assert not any(candidate is store for candidate in gc.get_objects(generation=0))


def test_a_frozen_state_encodes_as_the_snapshot_of_its_moment_copied_or_not() -> None:
    """`freeze()` copies and stays valid while the machine goes on; `freeze(copy=False)` (for
    an encoding in a forked child) refers to the live state, sessions and history included,
    and encodes the same bytes as long as nothing is applied meanwhile."""
    machine = StateMachine()
    for i in range(3000):
        apply(machine, Put(f"k{i % 2100:05d}", bytes([i % 251]), RequestId("c", i + 1), i))
    expected = machine.snapshot()
    copied, live = machine.freeze(), machine.freeze(copy=False)
    assert live.encode() == expected and live.applied_index == machine.applied_index
    apply(machine, Put("later", b"x", RequestId("c", 9999), 9999))
    assert copied.encode() == expected
    assert live.encode() != expected  # only valid until the next apply
