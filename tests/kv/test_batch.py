"""Batch entries (several puts and deletes in one log entry): the encoding's round trip and
range checks, and the state machine applying each command as an entry of its own would,
deduplicated by its own request id, including a request id twice in one batch."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import ProtocolError
from kvstore.kv.commands import (
    BATCH_COMMANDS_MAX,
    COMMAND_FORMAT_VERSION,
    CommandKind,
    Delete,
    Put,
    RequestId,
    WriteError,
    decode_command,
    decode_commands,
    encode_batch,
    encode_command,
)
from kvstore.kv.leases import LeaseGrant
from kvstore.kv.state_machine import StateMachine
from kvstore.raft.types import Entry

from .test_commands import commands


def _put(key: str, value: bytes, client: str, seq: int) -> Put:
    return Put(key, value, RequestId(client, seq), time_ms=1000)


def _raw_batch(parts: object) -> bytes:
    body = msgpack.packb([int(CommandKind.BATCH), parts], use_bin_type=True)
    return bytes((COMMAND_FORMAT_VERSION,)) + body


@given(st.lists(commands(), min_size=1, max_size=8))
def test_a_batch_round_trips_in_order(batch: list[Put | Delete]) -> None:
    assert decode_commands(encode_batch([encode_command(c) for c in batch])) == tuple(batch)


def test_a_single_command_decodes_as_itself() -> None:
    put = _put("k", b"v", "c1", 1)
    assert decode_commands(encode_command(put)) == (put,)


def test_decode_command_refuses_a_batch() -> None:
    with pytest.raises(ProtocolError):
        decode_command(encode_batch([encode_command(_put("k", b"v", "c1", 1))]))


GOOD = encode_command(_put("k", b"v", "c1", 1))


@pytest.mark.parametrize(
    "data",
    [
        _raw_batch([]),  # empty
        _raw_batch([GOOD] * (BATCH_COMMANDS_MAX + 1)),  # too many
        _raw_batch(GOOD),  # not an array
        _raw_batch([GOOD, "k"]),  # a command that is not bytes
        _raw_batch([GOOD, GOOD[:-1]]),  # a truncated command
        _raw_batch([GOOD, _raw_batch([GOOD])]),  # a batch inside a batch
        _raw_batch([encode_command(LeaseGrant(0, 1000, RequestId("c1", 2), 1000))]),
        bytes((COMMAND_FORMAT_VERSION,))
        + msgpack.packb([int(CommandKind.BATCH), [GOOD], 1], use_bin_type=True),
    ],
)
def test_malformed_batches_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_commands(data)


def test_a_malformed_batch_changes_nothing() -> None:
    machine = StateMachine()
    data = _raw_batch([encode_command(_put("a", b"1", "c1", 1)), b"\x01\xc1"])
    with pytest.raises(ProtocolError):
        machine.apply_entry(Entry(term=1, index=1, data=data))
    assert machine.applied_index == 0 and machine.get("a") is None


def test_each_command_of_a_batch_applies_in_order_with_its_own_result() -> None:
    machine = StateMachine()
    batch = [
        _put("a", b"1", "c1", 1),
        _put("b", b"2", "c2", 1),
        Delete("a", RequestId("c3", 1), time_ms=1000),
        Delete("zz", RequestId("c4", 1), time_ms=1000),
    ]
    applied = machine.apply_entry(
        Entry(term=1, index=1, data=encode_batch([encode_command(c) for c in batch]))
    )
    assert [command for command, _ in applied] == batch
    results = [result for _, result in applied]
    assert [r.ok for r in results] == [True, True, True, False]
    assert [r.revision for r in results] == [1, 2, 3, 3]
    assert results[3].error == WriteError.NOT_FOUND
    assert machine.applied_index == 1 and machine.revision == 3
    assert machine.get("a") is None and machine.get("b") is not None


def test_a_request_id_twice_in_one_batch_applies_once_and_both_get_its_answer() -> None:
    machine = StateMachine()
    first = _put("a", b"1", "c1", 1)
    again = _put("a", b"1", "c1", 1)  # the same request, retried into the same batch
    applied = machine.apply_entry(
        Entry(term=1, index=1, data=encode_batch([encode_command(first), encode_command(again)]))
    )
    assert applied[0][1] == applied[1][1]
    assert machine.revision == 1 and machine.get("a").version == 1  # type: ignore[union-attr]


def test_a_batch_retrying_an_applied_request_gets_the_recorded_answer() -> None:
    machine = StateMachine()
    put = _put("a", b"1", "c1", 1)
    [(_, answer)] = machine.apply_entry(Entry(term=1, index=1, data=encode_command(put)))
    retry = encode_batch([encode_command(put), encode_command(_put("b", b"2", "c2", 1))])
    applied = machine.apply_entry(Entry(term=1, index=2, data=retry))
    assert applied[0][1] == answer
    assert machine.revision == 2  # only b's put wrote


def test_a_batch_and_its_commands_one_by_one_reach_the_same_state() -> None:
    batch = [_put(f"k{i % 3}", bytes([i]), f"c{i % 2}", i + 1) for i in range(6)]
    batched, single = StateMachine(), StateMachine()
    batched.apply(Entry(term=1, index=1, data=encode_batch([encode_command(c) for c in batch])))
    for command in batch:
        single.apply_command(command)
    assert batched.revision == single.revision
    assert [batched.get(f"k{i}") for i in range(3)] == [single.get(f"k{i}") for i in range(3)]
