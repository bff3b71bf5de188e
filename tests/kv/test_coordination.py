"""Transactions, revision history and leases in the state machine (kvstore.kv.txn, history,
leases): applied atomically in one revision, encoded and restored exactly, bounded."""

from __future__ import annotations

import pytest

from kvstore.errors import BadRequestError, ProtocolError, RevisionCompactedError
from kvstore.kv.commands import (
    Delete,
    Put,
    RequestId,
    WriteError,
    decode_command,
    encode_command,
)
from kvstore.kv.history import Compact, HistoryConfig
from kvstore.kv.leases import LeaseGrant, LeaseKeeper, LeaseRevoke
from kvstore.kv.sessions import result_from_obj, result_to_obj
from kvstore.kv.state_machine import KvConfig, StateMachine
from kvstore.kv.txn import (
    Compare,
    CompareOp,
    CompareTarget,
    Txn,
    TxnDelete,
    TxnGet,
    TxnPut,
    TxnRange,
)
from kvstore.raft.types import Entry, EntryType


def apply(machine: StateMachine, command: object):  # type: ignore[no-untyped-def]
    entry = Entry(
        index=machine.applied_index + 1,
        term=1,
        type=EntryType.NORMAL,
        data=encode_command(command),  # type: ignore[arg-type]
    )
    return machine.apply(entry)


def put(machine: StateMachine, key: str, value: bytes, lease: int = 0):  # type: ignore[no-untyped-def]
    return apply(machine, Put(key, value, None, 1, lease=lease))


def cas4(keys: list[str], revisions: list[int], value: bytes, seq: int) -> Txn:
    return Txn(
        compares=tuple(
            Compare(k, CompareTarget.MOD_REVISION, CompareOp.EQUAL, r)
            for k, r in zip(keys, revisions)
        ),
        success=tuple(TxnPut(k, value) for k in keys),
        failure=tuple(TxnGet(k) for k in keys),
        request=RequestId("c", seq),
        time_ms=seq,
    )


def test_a_txn_writes_every_key_in_one_revision_or_none() -> None:
    machine = StateMachine()
    for key in "abcd":
        put(machine, key, b"0")
    keys = list("abcd")
    revisions = [machine.get(k).mod_revision for k in keys]  # type: ignore[union-attr]
    result = apply(machine, cas4(keys, revisions, b"1", 1))
    assert result.ok and result.txn.succeeded and result.revision == 5
    assert {machine.get(k).mod_revision for k in keys} == {5}  # type: ignore[union-attr]
    assert [machine.get(k).version for k in keys] == [2] * 4  # type: ignore[union-attr]
    # The same comparisons now fail: the failure branch reads, nothing is written.
    failed = apply(machine, cas4(keys, revisions, b"2", 2))
    assert failed.ok and not failed.txn.succeeded and failed.revision == 5
    assert [r.kvs[0].value for r in failed.txn.responses] == [b"1"] * 4
    assert machine.revision == 5
    machine.check_invariants()


def test_a_retried_txn_answers_its_first_outcome_without_the_values_read() -> None:
    machine = StateMachine()
    put(machine, "a", b"x")
    txn = Txn((), (TxnGet("a"), TxnPut("b", b"y")), (), RequestId("c", 1), 1)
    first = apply(machine, txn)
    assert first.txn.responses[0].kvs[0].value == b"x"
    again = apply(machine, txn)
    assert again.revision == first.revision and machine.revision == 2
    assert again.txn.values_dropped and again.txn.responses[0].count == 1
    assert again.txn.responses[0].kvs == ()
    assert result_from_obj(result_to_obj(again)) == again


def test_txn_reads_see_earlier_writes_and_range_delete_takes_one_revision() -> None:
    machine = StateMachine()
    for key in ("p/1", "p/2", "p/3", "q"):
        put(machine, key, b"v")
    txn = Txn(
        (Compare("q", CompareTarget.VALUE, CompareOp.EQUAL, b"v"),),
        (TxnDelete("p/", prefix=True), TxnPut("q", b"w"), TxnRange("", 10), TxnGet("p/1")),
        (),
        None,
        2,
    )
    result = apply(machine, txn)
    deleted, wrote, listed, got = result.txn.responses
    assert deleted.deleted == 3 and wrote.revision == 5 and machine.revision == 5
    assert [kv.key for kv in listed.kvs] == ["q"] and got.kvs == ()
    events = list(machine.history.since(5))
    assert [(e.type, e.kv.key) for e in events] == [
        ("delete", "p/1"), ("delete", "p/2"), ("delete", "p/3"), ("put", "q"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "ops",
    [
        (TxnPut("a", b""), TxnPut("a", b"")),
        (TxnPut("a", b""), TxnDelete("a")),
        (TxnDelete("a", prefix=True), TxnPut("ab", b"")),
    ],
)
def test_a_txn_writing_a_key_twice_is_refused(ops: tuple[TxnPut | TxnDelete, ...]) -> None:
    with pytest.raises(ValueError, match=r"twice|prefix"):
        Txn((), ops, (), None, 0)


def test_txn_encoding_round_trips_and_garbage_is_a_protocol_error() -> None:
    txn = Txn(
        (
            Compare("a", CompareTarget.VERSION, CompareOp.GREATER, 1),
            Compare("b", CompareTarget.VALUE, CompareOp.NOT_EQUAL, b"z"),
        ),
        (TxnPut("a", b"1", lease=7), TxnDelete("p", prefix=True), TxnRange("x", 5, "xa")),
        (TxnGet("a"),),
        RequestId("c", 3),
        9,
        2,
    )
    assert decode_command(encode_command(txn)) == txn
    data = encode_command(txn)
    for bad in (data[:-2], data.replace(b"range", b"rangx")):
        with pytest.raises(ProtocolError):
            decode_command(bad)


def test_history_serves_past_reads_and_names_the_oldest_revision_once_compacted() -> None:
    machine = StateMachine(KvConfig(history=HistoryConfig(revisions_max=3)))
    put(machine, "a", b"1")  # 1
    put(machine, "b", b"1")  # 2
    put(machine, "a", b"2")  # 3
    apply(machine, Delete("b", None, 1))  # 4
    assert machine.get_at("a", 3).value == b"2"  # type: ignore[union-attr]
    assert machine.get_at("b", 3).value == b"1"  # type: ignore[union-attr]
    assert machine.get_at("b", 4) is None
    items, following = machine.range_at("", 10, "", 2)
    assert [(kv.key, kv.value) for kv in items] == [("a", b"1"), ("b", b"1")]
    assert following is None
    with pytest.raises(RevisionCompactedError) as info:
        machine.get_at("a", 1)
    assert info.value.oldest_revision == 2
    with pytest.raises(BadRequestError):
        machine.get_at("a", 5)
    apply(machine, Compact(3, None, 1))
    assert machine.history.oldest == 4 and len(machine.history) == 1
    assert apply(machine, Compact(9, None, 1)).error == WriteError.FUTURE_REVISION
    machine.check_invariants()


def test_history_bytes_and_age_bounds_drop_whole_revisions() -> None:
    machine = StateMachine(KvConfig(history=HistoryConfig(bytes_max=400, age_ms=1000)))
    for i in range(10):
        apply(machine, Put(f"k{i}", b"x" * 100, None, 1))
    assert machine.history._bytes <= 400 and machine.history.oldest > 1
    apply(machine, Put("late", b"", None, 5000))
    assert [e.kv.key for e in machine.history.since(1)] == ["late"]
    machine.check_invariants()


def test_snapshot_carries_history_and_leases() -> None:
    machine = StateMachine()
    grant = apply(machine, LeaseGrant(0, 5000, None, 1))
    lease_id = grant.lease_id
    assert lease_id == 1
    put(machine, "a", b"1", lease=lease_id)
    put(machine, "b", b"2")
    restored = StateMachine()
    restored.restore(machine.snapshot(), machine.applied_index)
    assert restored.digest() == machine.digest()
    assert restored.leases.get(lease_id).keys == {"a"}  # type: ignore[union-attr]
    assert [e.kv.key for e in restored.history.since(1)] == ["a", "b"]
    restored.check_invariants()


def test_revoking_a_lease_deletes_its_keys_in_one_revision() -> None:
    machine = StateMachine()
    lease_id = apply(machine, LeaseGrant(0, 5000, None, 1)).lease_id
    for key in ("x", "y", "z"):
        put(machine, key, b"v", lease=lease_id)
    put(machine, "z", b"w")  # rewritten without the lease: detached
    assert put(machine, "q", b"v", lease=99).error == WriteError.LEASE_NOT_FOUND
    result = apply(machine, LeaseRevoke(lease_id, None, 1, expired=True))
    assert result.ok and result.deleted == 2 and machine.revision == 5
    assert machine.get("x") is None and machine.get("z") is not None
    assert {e.revision for e in machine.history.since(5)} == {5}
    assert apply(machine, LeaseRevoke(lease_id, None, 1)).error == WriteError.LEASE_NOT_FOUND
    assert apply(machine, LeaseGrant(7, 10, None, 1)).lease_id == 7
    assert apply(machine, LeaseGrant(7, 10, None, 1)).error == WriteError.LEASE_EXISTS
    machine.check_invariants()


def test_keeper_gives_a_full_ttl_on_promotion_and_expires_only_past_it() -> None:
    machine = StateMachine()
    lease_id = apply(machine, LeaseGrant(0, 1000, None, 1)).lease_id
    keeper = LeaseKeeper()
    assert keeper.expired(10_000, 100) == []  # a follower expires nothing
    keeper.promote(machine.leases, 5_000)
    assert keeper.expired(5_999, 100) == []
    assert keeper.keepalive(lease_id, 5_500) == 1000
    assert keeper.expired(6_499, 100) == []
    assert keeper.expired(6_500, 100) == [lease_id]
    assert keeper.expired(6_550, 100) == []  # its revocation is in flight
    assert keeper.expiring(lease_id) and keeper.keepalive(lease_id, 6_560) is None
    assert keeper.expired(6_600, 100) == [lease_id]
    keeper.demote()
    assert keeper.keepalive(lease_id, 7_000) is None


def test_a_snapshot_of_format_1_restores_with_an_empty_history_from_its_revision() -> None:
    import msgpack

    machine = StateMachine()
    put(machine, "a", b"1")
    put(machine, "b", b"2")
    flat: list[object] = []
    for key in sorted(machine._data):
        flat.extend((key, *machine._data[key]))
    old = [machine.applied_index, machine.revision, machine.clock_ms, flat,
           machine.sessions.to_obj()]  # fmt: skip
    restored = StateMachine()
    restored.restore(b"\x01" + msgpack.packb(old, use_bin_type=True), machine.applied_index)
    assert restored.get("b").value == b"2"  # type: ignore[union-attr]
    assert restored.history.oldest == 3 and len(restored.leases) == 0
    with pytest.raises(RevisionCompactedError):
        restored.get_at("a", 1)
    restored.check_invariants()


@pytest.mark.parametrize(
    "sections",
    [
        {"history": [1, 99, []]},  # compacted beyond the store's revision
        {"leases": [1, [[1, 0, []]]]},  # a TTL of 0
        {"leases": [1, [[1, 10, ["missing"]]]]},  # a key the store does not hold
        {"surprise": 1},
    ],
)
def test_a_snapshot_with_bad_sections_is_refused(sections: dict[str, object]) -> None:
    import msgpack

    machine = StateMachine()
    put(machine, "a", b"1")
    data = machine.snapshot()
    obj = msgpack.unpackb(data[1:], raw=False)
    obj[5] = sections
    with pytest.raises(ProtocolError):
        StateMachine().restore(data[:1] + msgpack.packb(obj, use_bin_type=True), 1)
