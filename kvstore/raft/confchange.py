"""Membership changes as values: a ConfChange, how it changes a ConfState, and its encoding.

A CONF_CHANGE log entry carries one `ConfChange` (dissertation §4.1: one server at a time):
add a learner, promote a learner to voter, or remove a member. The entry records both the
change (who, and an opaque `context` the server uses for the member's addresses) and the
whole configuration that results (`conf_state`). The result is what the core adopts: a node
that receives the entry needs no earlier configuration to know the new one, so a learner
that replays the log from its first entry, or a node restarting from its write-ahead log,
always ends with the right membership (the first entry it holds may be far past the
bootstrap configuration).

Rules that hold here:
- `apply_change` is the only place that says which change is valid from which configuration;
  the leader checks a proposal with it, and every node appends the same entries after the
  same prefix, so every node derives the same configurations (Raft §5.3 Log Matching).
- Invariant: voters, learners and removed are disjoint and sorted; an id once removed is in
  `removed` forever, and `apply_change` never adds it again (member ids are never reused, so
  a wiped node can never come back under an identity that was counted in a quorum).
- At least one voter remains.

This module is plain values (it imports only `kvstore.raft.types`); decoding raises
`ValueError`, which the codec turns into `ProtocolError` for bytes from a peer or a disk.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from kvstore.raft.types import ConfState

NODE_ID_MAX = (1 << 63) - 1
"""The largest node id (ids travel as unsigned 64-bit integers and must stay below 2^63)."""
CONTEXT_BYTES_MAX = 4096
"""The opaque context of a change (the member's name and addresses): small by nature."""
MEMBERS_MAX = 1024
"""Voters plus learners of one configuration (the codec's bound too)."""
REMOVED_MAX = 1 << 16
"""Ids ever removed that one configuration remembers."""

_VERSION = 1
_HEADER = struct.Struct(">BBQH")  # version, change type, node id, context length
_COUNT = struct.Struct(">H")
_ID = struct.Struct(">Q")


class ConfChangeType(enum.IntEnum):
    """Values are part of the log format: never renumber."""

    ADD_LEARNER = 1
    PROMOTE = 2
    REMOVE = 3


@dataclass(frozen=True, slots=True)
class ConfChange:
    type: ConfChangeType
    node_id: int
    # Opaque to the core: what the server needs to reach the member (name, addresses).
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class ConfChangeEntry:
    """What a CONF_CHANGE entry's data holds: the change and the configuration after it."""

    change: ConfChange
    conf_state: ConfState


def apply_change(conf: ConfState, change: ConfChange) -> ConfState:
    """The configuration after `change`; ValueError (saying why) when it is not allowed."""
    node = change.node_id
    voters, learners, removed = set(conf.voters), set(conf.learners), set(conf.removed)
    if not 1 <= node <= NODE_ID_MAX:
        raise ValueError(f"node id {node} out of range")
    if change.type is ConfChangeType.ADD_LEARNER:
        if node in voters or node in learners:
            raise ValueError(f"node {node} is already a member")
        if node in removed:
            raise ValueError(f"node {node} was removed; member ids are never reused")
        if len(voters) + len(learners) >= MEMBERS_MAX:
            raise ValueError(f"a configuration has at most {MEMBERS_MAX} members")
        learners.add(node)
    elif change.type is ConfChangeType.PROMOTE:
        if node not in learners:
            raise ValueError(f"node {node} is not a learner")
        learners.discard(node)
        voters.add(node)
    else:
        if node not in voters and node not in learners:
            raise ValueError(f"node {node} is not a member")
        if voters == {node}:
            raise ValueError(f"node {node} is the last voter")
        if len(removed) >= REMOVED_MAX:
            raise ValueError(f"a configuration remembers at most {REMOVED_MAX} removed ids")
        voters.discard(node)
        learners.discard(node)
        removed.add(node)
    return ConfState(
        voters=tuple(sorted(voters)),
        learners=tuple(sorted(learners)),
        removed=tuple(sorted(removed)),
    )


def next_member_id(conf: ConfState) -> int:
    """An id never used in this cluster's configurations: one above every id it has seen."""
    return max((*conf.voters, *conf.learners, *conf.removed), default=0) + 1


# --- encoding ----------------------------------------------------------------------------


def encode(record: ConfChangeEntry) -> bytes:
    change, conf = record.change, record.conf_state
    parts = [_HEADER.pack(_VERSION, int(change.type), change.node_id, len(change.context))]
    parts.append(change.context)
    for ids in (conf.voters, conf.learners, conf.removed):
        parts.append(_COUNT.pack(len(ids)))
        parts.extend(_ID.pack(member) for member in ids)
    return b"".join(parts)


def decode(data: bytes) -> ConfChangeEntry:
    """A CONF_CHANGE entry's data, range-checked; ValueError on anything malformed."""
    try:
        version, type_, node, context_length = _HEADER.unpack_from(data, 0)
    except struct.error as exc:
        raise ValueError("conf change: truncated header") from exc
    if version != _VERSION:
        raise ValueError(f"conf change: unknown version {version}")
    try:
        change_type = ConfChangeType(type_)
    except ValueError as exc:
        raise ValueError(f"conf change: unknown type {type_}") from exc
    if not 1 <= node <= NODE_ID_MAX:
        raise ValueError(f"conf change: node id {node} out of range")
    if context_length > CONTEXT_BYTES_MAX:
        raise ValueError(f"conf change: context of {context_length} bytes")
    offset = _HEADER.size
    context = data[offset : offset + context_length]
    if len(context) != context_length:
        raise ValueError("conf change: truncated context")
    offset += context_length
    lists: list[tuple[int, ...]] = []
    for limit in (MEMBERS_MAX, MEMBERS_MAX, REMOVED_MAX):
        ids, offset = _decode_ids(data, offset, limit)
        lists.append(ids)
    if offset != len(data):
        raise ValueError("conf change: trailing bytes")
    voters, learners, removed = lists
    conf = ConfState(voters=voters, learners=learners, removed=removed)
    check_conf_state(conf)
    return ConfChangeEntry(ConfChange(change_type, node, bytes(context)), conf)


def _decode_ids(data: bytes, offset: int, limit: int) -> tuple[tuple[int, ...], int]:
    try:
        (count,) = _COUNT.unpack_from(data, offset)
    except struct.error as exc:
        raise ValueError("conf change: truncated member list") from exc
    if count > limit:
        raise ValueError(f"conf change: {count} ids in a list of at most {limit}")
    offset += _COUNT.size
    end = offset + count * _ID.size
    if end > len(data):
        raise ValueError("conf change: truncated member list")
    ids = tuple(_ID.unpack_from(data, offset + i * _ID.size)[0] for i in range(count))
    return ids, end


def check_conf_state(conf: ConfState) -> None:
    """ValueError unless the configuration keeps this module's invariants."""
    groups = (conf.voters, conf.learners, conf.removed)
    for ids in groups:
        if any(not 1 <= member <= NODE_ID_MAX for member in ids):
            raise ValueError("conf state: node id out of range")
        if list(ids) != sorted(set(ids)):
            raise ValueError("conf state: ids must be sorted and unique")
    if len(set().union(*groups)) != sum(len(ids) for ids in groups):
        raise ValueError("conf state: voters, learners and removed overlap")
    if not conf.voters:
        raise ValueError("conf state: no voter")
