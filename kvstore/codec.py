"""msgpack encodings of the core's values: entries, hard state, snapshots and messages.

Used by the write-ahead log (records), snapshot files and the peer transport (frames). Every
top-level encoding starts with a version byte so the format can evolve; decoding validates
shapes and types and raises `ProtocolError` on anything else, because these bytes come from
disks and peers we do not trust blindly. Never pickle.

Encodings are positional arrays (not maps) to keep hot-path frames small and fast.
"""

from __future__ import annotations

from typing import Any

import msgpack

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

FORMAT_VERSION = 1


# --- plain values <-> python structures ----------------------------------------------------


def entry_to_obj(entry: Entry) -> list[Any]:
    return [entry.term, entry.index, int(entry.type), entry.data]


def entry_from_obj(obj: Any) -> Entry:
    _expect_list(obj, 4, "entry")
    term, index, type_, data = obj
    _expect_int(term, "entry.term")
    _expect_int(index, "entry.index")
    if not isinstance(data, bytes):
        raise ProtocolError("entry.data is not bytes")
    try:
        entry_type = EntryType(type_)
    except ValueError as exc:
        raise ProtocolError(f"unknown entry type {type_!r}") from exc
    return Entry(term=term, index=index, type=entry_type, data=data)


def hard_state_to_obj(state: HardState) -> list[int]:
    return [state.term, state.vote, state.commit]


def hard_state_from_obj(obj: Any) -> HardState:
    _expect_list(obj, 3, "hard state")
    for value, name in zip(obj, ("term", "vote", "commit")):
        _expect_int(value, f"hard_state.{name}")
    return HardState(term=obj[0], vote=obj[1], commit=obj[2])


def conf_state_to_obj(conf: ConfState) -> list[list[int]]:
    return [list(conf.voters), list(conf.learners)]


def conf_state_from_obj(obj: Any) -> ConfState:
    _expect_list(obj, 2, "conf state")
    voters, learners = obj
    for group in (voters, learners):
        if not isinstance(group, list) or not all(isinstance(v, int) for v in group):
            raise ProtocolError("conf state members must be lists of ints")
    return ConfState(voters=tuple(voters), learners=tuple(learners))


def snapshot_metadata_to_obj(meta: SnapshotMetadata) -> list[Any]:
    return [meta.index, meta.term, conf_state_to_obj(meta.conf_state)]


def snapshot_metadata_from_obj(obj: Any) -> SnapshotMetadata:
    _expect_list(obj, 3, "snapshot metadata")
    _expect_int(obj[0], "snapshot.index")
    _expect_int(obj[1], "snapshot.term")
    return SnapshotMetadata(index=obj[0], term=obj[1], conf_state=conf_state_from_obj(obj[2]))


def snapshot_to_obj(snapshot: Snapshot) -> list[Any]:
    return [snapshot_metadata_to_obj(snapshot.metadata), snapshot.data]


def snapshot_from_obj(obj: Any) -> Snapshot:
    _expect_list(obj, 2, "snapshot")
    if not isinstance(obj[1], bytes):
        raise ProtocolError("snapshot.data is not bytes")
    return Snapshot(metadata=snapshot_metadata_from_obj(obj[0]), data=obj[1])


def message_to_obj(message: Message) -> list[Any]:
    return [
        int(message.type),
        message.to,
        message.from_,
        message.term,
        message.log_term,
        message.index,
        [entry_to_obj(e) for e in message.entries],
        message.commit,
        message.reject,
        message.reject_hint,
        None if message.snapshot is None else snapshot_to_obj(message.snapshot),
        message.context,
    ]


def message_from_obj(obj: Any) -> Message:
    _expect_list(obj, 12, "message")
    (type_, to, from_, term, log_term, index, entries, commit, reject, hint, snap, ctx) = obj
    try:
        message_type = MessageType(type_)
    except ValueError as exc:
        raise ProtocolError(f"unknown message type {type_!r}") from exc
    for value, name in (
        (to, "to"),
        (from_, "from"),
        (term, "term"),
        (log_term, "log_term"),
        (index, "index"),
        (commit, "commit"),
        (hint, "reject_hint"),
    ):
        _expect_int(value, f"message.{name}")
    if not isinstance(entries, list):
        raise ProtocolError("message.entries is not a list")
    if not isinstance(reject, bool) or not isinstance(ctx, bytes):
        raise ProtocolError("message.reject or message.context has the wrong type")
    return Message(
        type=message_type,
        to=to,
        from_=from_,
        term=term,
        log_term=log_term,
        index=index,
        entries=tuple(entry_from_obj(e) for e in entries),
        commit=commit,
        reject=reject,
        reject_hint=hint,
        snapshot=None if snap is None else snapshot_from_obj(snap),
        context=ctx,
    )


# --- bytes ---------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """Encode a python structure made by the *_to_obj functions, behind the version byte."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return bytes((FORMAT_VERSION,)) + body


def unpack(data: bytes) -> Any:
    """Decode bytes made by `pack`; raises ProtocolError on a wrong version or bad msgpack."""
    if not data:
        raise ProtocolError("empty payload")
    if data[0] != FORMAT_VERSION:
        raise ProtocolError(f"unsupported format version {data[0]}")
    try:
        return msgpack.unpackb(data[1:], raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"malformed msgpack: {exc}") from exc


def encode_message(message: Message) -> bytes:
    return pack(message_to_obj(message))


def decode_message(data: bytes) -> Message:
    return message_from_obj(unpack(data))


def encode_entry(entry: Entry) -> bytes:
    return pack(entry_to_obj(entry))


def decode_entry(data: bytes) -> Entry:
    return entry_from_obj(unpack(data))


# --- validation ----------------------------------------------------------------------------


def _expect_list(obj: Any, length: int, what: str) -> None:
    if not isinstance(obj, list) or len(obj) != length:
        raise ProtocolError(f"{what}: expected an array of {length}")


def _expect_int(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{what}: expected a non-negative integer, got {value!r}")
