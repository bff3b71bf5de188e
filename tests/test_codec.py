"""Round trips of the wire and disk encodings, and rejection of malformed input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore import codec
from kvstore.errors import ProtocolError
from kvstore.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

ids = st.integers(min_value=0, max_value=2**31)
entries = st.builds(
    Entry, term=ids, index=ids, type=st.sampled_from(EntryType), data=st.binary(max_size=64)
)
snapshots = st.builds(
    Snapshot,
    metadata=st.builds(
        SnapshotMetadata,
        index=ids,
        term=ids,
        conf_state=st.builds(
            ConfState,
            voters=st.lists(ids, max_size=5).map(tuple),
            learners=st.lists(ids, max_size=3).map(tuple),
        ),
    ),
    data=st.binary(max_size=64),
)
messages = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    to=ids,
    from_=ids,
    term=ids,
    log_term=ids,
    index=ids,
    entries=st.lists(entries, max_size=4).map(tuple),
    commit=ids,
    reject=st.booleans(),
    reject_hint=ids,
    snapshot=st.none() | snapshots,
    context=st.binary(max_size=16),
)


@given(messages)
def test_message_round_trip(message: Message) -> None:
    assert codec.decode_message(codec.encode_message(message)) == message


@given(entries)
def test_entry_round_trip(entry: Entry) -> None:
    assert codec.decode_entry(codec.encode_entry(entry)) == entry


def test_hard_state_round_trip() -> None:
    state = HardState(term=7, vote=2, commit=41)
    assert (
        codec.hard_state_from_obj(codec.unpack(codec.pack(codec.hard_state_to_obj(state)))) == state
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x09" + msgpack.packb([1]),
        b"\x01\xc1",
        codec.pack([99, 1, 2, 3, 0, 0, [], 0, False, 0, None, b""]),
        codec.pack([5, 1, 2, -1, 0, 0, [], 0, False, 0, None, b""]),
        codec.pack([5, 1, 2, 3, 0, 0, [[1, 2]], 0, False, 0, None, b""]),
        codec.pack({"type": 5}),
    ],
)
def test_malformed_message_is_rejected(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.decode_message(payload)


@given(st.binary(max_size=64))
def test_garbage_never_escapes_as_another_error(payload: bytes) -> None:
    try:
        codec.decode_message(payload)
    except ProtocolError:
        pass
