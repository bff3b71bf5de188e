"""The values that flow in and out of the Raft core: entries, messages, hard state, snapshots.

Everything here is a frozen, slotted dataclass or an enum, so a value handed to the driver can
never change under it. These types are the contract between the core (`kvstore.raft.node`),
storage (`kvstore.storage`), the wire codec (`kvstore.codec`), the simulator and the server;
they carry no behaviour beyond small derived properties.

Conventions (as in etcd-io/raft):
- Node ids are positive integers; `NONE` (0) means "no node" (no vote, no known leader).
- Log indexes start at 1; index 0 with term 0 is the empty log's sentinel.
- Terms start at 0 and only grow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvstore.frozen import quick_init

NONE = 0
"""The node id meaning "nobody": no vote cast, no leader known."""


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class EntryType(enum.IntEnum):
    NORMAL = 0
    # A membership change (dissertation §4.1); its data is a `confchange.ConfChangeEntry`.
    CONF_CHANGE = 1


class MessageType(enum.IntEnum):
    """Every message between nodes. Values are part of the wire format: never renumber."""

    # Elections (Raft §5.2) and pre-vote (dissertation §9.6).
    VOTE = 1
    VOTE_RESPONSE = 2
    PRE_VOTE = 3
    PRE_VOTE_RESPONSE = 4
    # Replication (Raft §5.3).
    APPEND = 5
    APPEND_RESPONSE = 6
    HEARTBEAT = 7
    HEARTBEAT_RESPONSE = 8
    # Snapshot installation (Raft §7).
    SNAPSHOT = 9
    # Leadership transfer (dissertation §3.10): the leader tells the target to campaign now.
    TIMEOUT_NOW = 10
    # ReadIndex forwarded from a follower to the leader, and its answer (dissertation §6.4).
    READ_INDEX = 11
    READ_INDEX_RESPONSE = 12
    # A follower asks the leader to hand leadership over to someone (forwarded transfer).
    TRANSFER_LEADER = 13


ENTRY_OVERHEAD_BYTES = 16
"""What an entry costs beside its data (term, index, type), for every size bound: in-flight
and uncommitted bytes, batches of appends, WAL records. One number, used everywhere."""


@quick_init
@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    # Opaque to the core: an encoded command of the state machine, or b"" for the empty entry
    # a new leader appends (Raft §5.4.2).
    data: bytes = b""

    def size_bytes(self) -> int:
        """Approximate encoded size, used to bound batches and in-flight bytes."""
        return len(self.data) + ENTRY_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message of the same Ready leaves the node (Raft §5)."""

    term: int = 0
    vote: int = NONE
    commit: int = 0

    def is_empty(self) -> bool:
        return self.term == 0 and self.vote == NONE and self.commit == 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """The cluster membership (dissertation §4): voters count in elections and commit
    quorums; learners receive the log but never vote nor count; `removed` lists every id
    ever removed, which is never used again (see `kvstore.raft.confchange`)."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SnapshotMetadata:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    metadata: SnapshotMetadata = field(default_factory=SnapshotMetadata)
    # The state machine's encoded state as of metadata.index; opaque to the core.
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.metadata.index == 0


EMPTY_SNAPSHOT = Snapshot()


@quick_init
@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    to: int
    from_: int
    term: int
    # APPEND: term and index of the entry before `entries`. *_RESPONSE: see each handler.
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    # APPEND_RESPONSE with reject: the follower's hint for the next probe (fast backtracking).
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    # READ_INDEX / HEARTBEAT: the request context that ties answers to a read.
    context: bytes = b""
    # TRANSFER_LEADER: the node to hand leadership to (dissertation §3.10).
    # Invariant: non-zero only in TRANSFER_LEADER, which carries no index.
    transferee: int = 0


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state that the driver may want to observe; not persisted."""

    leader_id: int = NONE
    role: Role = Role.FOLLOWER


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex answer: once the applied index reaches `index`, a read tagged with
    `context` may be served from local state and is linearizable (dissertation §6.4)."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the driver, processed strictly in this order:

    1. persist `hard_state`, `entries` and `snapshot` (one fsync when `must_sync`);
    2. send `messages` (only after step 1 returned: Raft §5 persistence before replies);
    3. apply `snapshot`, then `committed_entries`, to the state machine; serve `read_states`
       once the applied index reaches theirs;
    4. call `RawNode.advance(ready)`.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False
