"""msgpack encodings of the core's values: entries, hard state, snapshots and messages.

Used by the write-ahead log (records), snapshot files and the peer transport (frames). Every
top-level encoding starts with a version byte so the format can evolve; decoding validates
shapes and types and raises `ProtocolError` on anything else, because these bytes come from
disks and peers we do not trust blindly. Never pickle.

Encodings are positional arrays (not maps) to keep hot-path frames small and fast.

Bounds (checked on every decode, so a hostile or damaged value never reaches the core):
- Integers are exact `int`s (never bool or float), non-negative.
- A term or an index from a peer is below `WIRE_VALUE_LIMIT` (2^62); one from our own disk
  is below `STORED_VALUE_LIMIT` (2^63). The gap is headroom: a node that adopted the largest
  term a peer may send can still add one for each of ~2^62 elections and persist and decode
  the result, and every value stays within msgpack's uint64. (A term of 2^64-1 from one
  packet once made every node fail to encode its own next pre-vote, forever.)
- A node id is below `NODE_ID_LIMIT` (2^63); a member of a configuration is at least 1, and
  a configuration has at most `CONF_MEMBERS_MAX` members.
- A TRANSFER_LEADER message's transferee is a node id; it travels in the index slot.
- A message carries at most `MESSAGE_ENTRIES_MAX` entries and a context of at most
  `CONTEXT_BYTES_MAX` bytes; its type and an entry's type are known enum values.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack

from kvstore.errors import ProtocolError
from kvstore.raft import confchange
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

WIRE_VALUE_LIMIT = 1 << 62
"""Terms and indexes from a peer are below this (see the module docstring)."""
STORED_VALUE_LIMIT = 1 << 63
"""Terms and indexes read back from our own disk are below this."""
NODE_ID_LIMIT = 1 << 63
"""Node ids (and a vote, 0 for none) are below this."""
CONF_MEMBERS_MAX = 1024
"""Voters plus learners of one configuration."""
MESSAGE_ENTRIES_MAX = 1 << 20
"""Entries in one message (the frame size bounds it first in practice)."""
CONTEXT_BYTES_MAX = 1024
"""A message context: a ReadIndex context or a campaign marker, a few bytes in practice."""


# --- plain values <-> python structures ----------------------------------------------------


def entry_to_obj(entry: Entry) -> list[Any]:
    return [entry.term, entry.index, int(entry.type), entry.data]


def entry_from_obj(obj: Any, *, limit: int = STORED_VALUE_LIMIT) -> Entry:
    """An entry from the disk, or from a peer with `limit=WIRE_VALUE_LIMIT`."""
    _expect_list(obj, 4, "entry")
    term, index, type_, data = obj
    _expect_int(term, "entry.term", limit)
    _expect_int(index, "entry.index", limit)
    if type(data) is not bytes:
        raise ProtocolError("entry.data is not bytes")
    entry_type = _expect_enum(EntryType, type_, "entry")
    if entry_type is EntryType.CONF_CHANGE:
        # The core adopts the configuration such an entry names: check it before it gets there.
        try:
            confchange.decode(data)
        except ValueError as exc:
            raise ProtocolError(f"entry {index}: {exc}") from None
    return Entry(term=term, index=index, type=entry_type, data=data)


def hard_state_to_obj(state: HardState) -> list[int]:
    return [state.term, state.vote, state.commit]


def hard_state_from_obj(obj: Any) -> HardState:
    _expect_list(obj, 3, "hard state")
    term, vote, commit = obj
    _expect_int(term, "hard_state.term", STORED_VALUE_LIMIT)
    _expect_int(vote, "hard_state.vote", NODE_ID_LIMIT)
    _expect_int(commit, "hard_state.commit", STORED_VALUE_LIMIT)
    return HardState(term=term, vote=vote, commit=commit)


def conf_state_to_obj(conf: ConfState) -> list[list[int]]:
    return [list(conf.voters), list(conf.learners), list(conf.removed)]


def conf_state_from_obj(obj: Any) -> ConfState:
    """[voters, learners, removed]; a directory written before membership changes holds
    [voters, learners] (nothing removed yet)."""
    if type(obj) is list and len(obj) == 2:
        obj = [*obj, []]
    _expect_list(obj, 3, "conf state")
    voters, learners, removed = obj
    if type(voters) is not list or type(learners) is not list or type(removed) is not list:
        raise ProtocolError("conf state members must be lists of node ids")
    if len(voters) + len(learners) > CONF_MEMBERS_MAX:
        raise ProtocolError(f"conf state: more than {CONF_MEMBERS_MAX} members")
    if len(removed) > confchange.REMOVED_MAX:
        raise ProtocolError(f"conf state: more than {confchange.REMOVED_MAX} removed ids")
    for member in (*voters, *learners, *removed):
        _expect_int(member, "conf state member", NODE_ID_LIMIT)
        if member < 1:
            raise ProtocolError(f"conf state member: node ids start at 1, got {member}")
    return ConfState(voters=tuple(voters), learners=tuple(learners), removed=tuple(removed))


def snapshot_metadata_to_obj(meta: SnapshotMetadata) -> list[Any]:
    return [meta.index, meta.term, conf_state_to_obj(meta.conf_state)]


def snapshot_metadata_from_obj(
    obj: Any, *, limit: int = STORED_VALUE_LIMIT
) -> SnapshotMetadata:
    _expect_list(obj, 3, "snapshot metadata")
    _expect_int(obj[0], "snapshot.index", limit)
    _expect_int(obj[1], "snapshot.term", limit)
    return SnapshotMetadata(index=obj[0], term=obj[1], conf_state=conf_state_from_obj(obj[2]))


def snapshot_to_obj(snapshot: Snapshot) -> list[Any]:
    return [snapshot_metadata_to_obj(snapshot.metadata), snapshot.data]


def snapshot_from_obj(obj: Any, *, limit: int = STORED_VALUE_LIMIT) -> Snapshot:
    _expect_list(obj, 2, "snapshot")
    if type(obj[1]) is not bytes:
        raise ProtocolError("snapshot.data is not bytes")
    return Snapshot(metadata=snapshot_metadata_from_obj(obj[0], limit=limit), data=obj[1])


def message_to_obj(message: Message) -> list[Any]:
    index = message.index
    if message.type is MessageType.TRANSFER_LEADER:
        # The transferee travels in the index slot (see message_from_obj).
        assert index == 0, "TRANSFER_LEADER carries a transferee, not an index"
        index = message.transferee
    return [
        int(message.type),
        message.to,
        message.from_,
        message.term,
        message.log_term,
        index,
        [entry_to_obj(e) for e in message.entries],
        message.commit,
        message.reject,
        message.reject_hint,
        None if message.snapshot is None else snapshot_to_obj(message.snapshot),
        message.context,
    ]


def message_from_obj(obj: Any) -> Message:
    """A message from a peer: every field within the bounds of the module docstring.

    A TRANSFER_LEADER message's transferee (a node id) travels in the index slot, which that
    message does not otherwise use: the array keeps the layout of format version 1, so nodes
    built before `Message.transferee` existed still understand each other.
    """
    _expect_list(obj, 12, "message")
    (type_, to, from_, term, log_term, index, entries, commit, reject, hint, snap, ctx) = obj
    message_type = _expect_enum(MessageType, type_, "message")
    _expect_int(to, "message.to", NODE_ID_LIMIT)
    _expect_int(from_, "message.from", NODE_ID_LIMIT)
    transferee = 0
    if message_type is MessageType.TRANSFER_LEADER:
        _expect_int(index, "message.transferee", NODE_ID_LIMIT)
        transferee, index = index, 0
    else:
        _expect_int(index, "message.index", WIRE_VALUE_LIMIT)
    for value, name in (
        (term, "term"),
        (log_term, "log_term"),
        (commit, "commit"),
        (hint, "reject_hint"),
    ):
        _expect_int(value, f"message.{name}", WIRE_VALUE_LIMIT)
    if type(entries) is not list:
        raise ProtocolError("message.entries is not a list")
    if len(entries) > MESSAGE_ENTRIES_MAX:
        raise ProtocolError(f"message.entries: more than {MESSAGE_ENTRIES_MAX}")
    if type(reject) is not bool:
        raise ProtocolError("message.reject is not a bool")
    if type(ctx) is not bytes or len(ctx) > CONTEXT_BYTES_MAX:
        raise ProtocolError(f"message.context is not bytes of at most {CONTEXT_BYTES_MAX}")
    return Message(
        type=message_type,
        to=to,
        from_=from_,
        term=term,
        log_term=log_term,
        index=index,
        entries=tuple(entry_from_obj(e, limit=WIRE_VALUE_LIMIT) for e in entries),
        commit=commit,
        reject=reject,
        reject_hint=hint,
        snapshot=None if snap is None else snapshot_from_obj(snap, limit=WIRE_VALUE_LIMIT),
        context=ctx,
        transferee=transferee,
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
    if type(obj) is not list or len(obj) != length:
        raise ProtocolError(f"{what}: expected an array of {length}")


def _expect_int(value: Any, what: str, limit: int) -> None:
    """An exact int (not a bool, not a float) in [0, limit)."""
    if type(value) is not int or not 0 <= value < limit:
        raise ProtocolError(f"{what}: expected an integer in [0, {limit}), got {value!r:.40}")


_E = TypeVar("_E", EntryType, MessageType)


def _expect_enum(enum_type: type[_E], value: Any, what: str) -> _E:
    # An IntEnum looks values up by equality, so True would pass as 1: demand an exact int.
    if type(value) is not int:
        raise ProtocolError(f"{what}: type is not an integer: {value!r:.40}")
    try:
        return enum_type(value)
    except ValueError as exc:
        raise ProtocolError(f"unknown {what} type {value!r}") from exc
