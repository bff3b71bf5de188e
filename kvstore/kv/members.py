"""Who the members are beyond their ids: the member context, the replicated member table and
the self-healing rule (docs/architecture.md §11, "Member identity and self-healing").

The Raft core knows members by id only; a CONF_CHANGE entry carries an opaque `context`
(kvstore/raft/confchange.py). This module owns that context's one encoding: a msgpack map
`{"name", "peer", "client", "replaces", "promote"}` (`MemberInfo`). `decode_context` checks
every field (types, lengths, ranges): the bytes come from the log, a snapshot or the wire.

`MemberTable` is the replicated part of the address book: the state machine applies every
committed CONF_CHANGE entry to it (ADD_LEARNER records the member's context, REMOVE forgets
it), and it is a section of every snapshot. So a node that joins from a snapshot, or
restarts after its log was compacted, still knows every member added at runtime: the book
is never something only one node knows. Members of the bootstrap configuration have no
context; their addresses are the nodes' `--peers`, and their name is their id as text.

`heal_step` is the self-healing decision, a pure function the server's healer (on the
leader) calls: given the configuration, the contexts and which learners have caught up,
the one change to propose next, if any. A learner whose name is held by an older member
(positive evidence: the same name came back under a new identity) gets that member removed
first, then is promoted: remove before promote, so three voters never become four with one
of them dead (dissertation §4.1; a quorum of 3 of 4 would need every live member). Nothing
is ever done because a member was silent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from kvstore.errors import ProtocolError
from kvstore.raft import confchange
from kvstore.raft.confchange import ConfChange, ConfChangeType
from kvstore.raft.types import ConfState

NAME_CHARS_MAX = 253
"""A member name: the slot it was started as (its first --id) or a pod's DNS name."""
ADDRESS_CHARS_MAX = 2048
_FIELDS = frozenset({"name", "peer", "client", "replaces", "promote"})


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """One member's context. `replaces`: the id its name held when it joined (0: none);
    `promote`: promote it once caught up (a join), else the operator does (`member add`)."""

    name: str
    peer_address: str
    client_url: str = ""
    replaces: int = 0
    promote: bool = False

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= NAME_CHARS_MAX or not self.name.isprintable():
            raise ValueError(f"member name must be 1..{NAME_CHARS_MAX} printable characters")
        for field, value in (("peer address", self.peer_address), ("client url", self.client_url)):
            if len(value) > ADDRESS_CHARS_MAX or not value.isprintable():
                raise ValueError(
                    f"{field} must be at most {ADDRESS_CHARS_MAX} printable characters"
                )
        if not self.peer_address:
            raise ValueError("a member needs a peer address")
        if not 0 <= self.replaces <= confchange.NODE_ID_MAX:
            raise ValueError(f"replaces {self.replaces} out of range")


def encode_context(info: MemberInfo) -> bytes:
    document: dict[str, Any] = {
        "name": info.name,
        "peer": info.peer_address,
        "client": info.client_url,
    }
    if info.replaces:
        document["replaces"] = info.replaces
    if info.promote:
        document["promote"] = True
    packed: bytes = msgpack.packb(document, use_bin_type=True)
    if len(packed) > confchange.CONTEXT_BYTES_MAX:
        raise ValueError(f"member context over {confchange.CONTEXT_BYTES_MAX} bytes")
    return packed


def decode_context(data: bytes) -> MemberInfo:
    """The member context in `data`; ValueError naming the problem on anything malformed."""
    if len(data) > confchange.CONTEXT_BYTES_MAX:
        raise ValueError(f"member context over {confchange.CONTEXT_BYTES_MAX} bytes")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=ADDRESS_CHARS_MAX)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"member context: not msgpack ({exc})") from exc
    if type(obj) is not dict or not set(obj) <= _FIELDS:
        raise ValueError("member context: expected a map of known fields")
    name, peer, client = obj.get("name"), obj.get("peer"), obj.get("client", "")
    replaces, promote = obj.get("replaces", 0), obj.get("promote", False)
    if type(name) is not str or type(peer) is not str or type(client) is not str:
        raise ValueError("member context: name, peer and client must be strings")
    if type(replaces) is not int or type(promote) is not bool:
        raise ValueError("member context: replaces must be an id, promote a boolean")
    return MemberInfo(name, peer, client, replaces, promote)


def member_name(member: int, info: MemberInfo | None) -> str:
    """A member's name: its context's, else (a bootstrap member) its id as text."""
    return info.name if info is not None else str(member)


class MemberTable:
    """Member id -> context bytes for members added at runtime (see the module docstring).

    Invariant: holds only ids added by a committed ADD_LEARNER entry with a context and not
    removed since; the bytes are exactly the entry's context (checked when first applied)."""

    def __init__(self) -> None:
        self.contexts: dict[int, bytes] = {}

    def apply(self, data: bytes) -> None:
        """Apply a committed CONF_CHANGE entry's data; ProtocolError if it does not decode
        (the same bytes are on every replica: the node must stop, not diverge)."""
        try:
            record = confchange.decode(data)
        except ValueError as exc:
            raise ProtocolError(f"conf change entry: {exc}") from exc
        change = record.change
        if change.type is ConfChangeType.ADD_LEARNER and change.context:
            try:
                decode_context(change.context)
            except ValueError:
                return  # a context of another kind (tests, tools): no address to learn
            self.contexts[change.node_id] = change.context
        elif change.type is ConfChangeType.REMOVE:
            self.contexts.pop(change.node_id, None)

    def info(self, member: int) -> MemberInfo | None:
        data = self.contexts.get(member)
        return None if data is None else decode_context(data)

    def infos(self) -> dict[int, MemberInfo]:
        return {member: decode_context(data) for member, data in self.contexts.items()}

    def to_obj(self) -> list[Any]:
        return [[member, self.contexts[member]] for member in sorted(self.contexts)]

    def load_obj(self, obj: Any) -> None:
        """Replace the table by a snapshot's section; ProtocolError when malformed."""
        if type(obj) is not list or len(obj) > confchange.MEMBERS_MAX:
            raise ProtocolError("state machine snapshot: members must be a bounded array")
        contexts: dict[int, bytes] = {}
        for item in obj:
            if (
                type(item) is not list
                or len(item) != 2
                or type(item[0]) is not int
                or not 1 <= item[0] <= confchange.NODE_ID_MAX
                or type(item[1]) is not bytes
                or item[0] in contexts
            ):
                raise ProtocolError("state machine snapshot: bad member entry")
            try:
                decode_context(item[1])
            except ValueError as exc:
                raise ProtocolError(f"state machine snapshot: member {item[0]}: {exc}") from exc
            contexts[item[0]] = item[1]
        self.contexts = contexts


def address_book(
    bootstrap: Mapping[int, str],
    infos: Mapping[int, MemberInfo],
    conf: ConfState,
    self_id: int,
    self_name: str,
) -> dict[int, str]:
    """Peer id -> peer address for every member of `conf` but this node. A member whose
    name is a slot of this node's bootstrap `--peers` (a bootstrap member, or one that took
    a slot over after a lost disk) is reached at that entry: `--peers` stays the one place
    that says how this node reaches each slot (through a proxy, a NAT); any other runtime
    member at the address of its context. The bootstrap entry of this node's own name is
    its own address (it holds that slot now), and is left out. Before this node has any
    configuration (a learner waiting for its first message), every bootstrap peer."""
    members: Iterable[int] = (*conf.voters, *conf.learners) if conf.voters else bootstrap
    book: dict[int, str] = {}
    for member in members:
        if member == self_id:
            continue
        info = infos.get(member)
        slot = member_slot(member, info)
        if slot in bootstrap and str(slot) != self_name:
            book[member] = bootstrap[slot]
        elif info is not None:
            book[member] = info.peer_address
    return book


def member_slot(member: int, info: MemberInfo | None) -> int:
    """The bootstrap slot (an id of `--peers`) a member holds: its id for a bootstrap
    member, the slot its name stands for otherwise, 0 for none."""
    name = member_name(member, info)
    return int(name) if name.isdigit() and len(name) < 19 else 0


def holder_of(name: str, conf: ConfState, infos: Mapping[int, MemberInfo]) -> int:
    """The newest member (voter or learner) that goes by `name`, 0 if none."""
    holders = [
        member
        for member in (*conf.voters, *conf.learners)
        if member_name(member, infos.get(member)) == name
    ]
    return max(holders, default=0)


def heal_step(
    conf: ConfState,
    infos: Mapping[int, MemberInfo],
    caught_up: Callable[[int], bool],
) -> ConfChange | None:
    """The next change self-healing makes, or None (see the module docstring): for the
    first caught-up learner that asked to be promoted, remove the members its name or its
    `replaces` designate (older ids), then promote it."""
    for learner in conf.learners:
        info = infos.get(learner)
        if info is None or not info.promote or not caught_up(learner):
            continue
        for member in (*conf.voters, *conf.learners):
            if member == learner:
                continue
            if member == info.replaces or (
                member < learner and member_name(member, infos.get(member)) == info.name
            ):
                if conf.voters == (member,):
                    return None
                return ConfChange(ConfChangeType.REMOVE, member)
        return ConfChange(ConfChangeType.PROMOTE, learner)
    return None
