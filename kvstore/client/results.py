"""Typed results of client calls: frozen, slotted dataclasses instead of raw dicts.

Revisions follow the server's vocabulary: `revision` is the store's revision (it grows by one
with every applied write) at the time of the answer; a key's `create_revision` and
`mod_revision` are the store revisions of the write that created it and of its latest write;
`version` counts the writes to the key since it was created. A compare-and-set compares
`mod_revision` (0 means "the key must not exist").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as read: its value and its revisions."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    # The store's revision when this was read.
    revision: int

    def text(self, encoding: str = "utf-8") -> str:
        """The value decoded as text."""
        return self.value.decode(encoding)


@dataclass(frozen=True, slots=True)
class PutResult:
    """The answer to a successful put or compare-and-set."""

    key: str
    # The store's revision after the write (equal to mod_revision).
    revision: int
    create_revision: int
    mod_revision: int
    version: int
    # The Kvstore-Request-Id every attempt of this write carried ("<client_id>:<seq>").
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """The answer to a successful delete."""

    key: str
    revision: int
    request_id: str = ""
    # How many keys went (1 for a key; any number for a prefix).
    deleted: int = 1


@dataclass(frozen=True, slots=True)
class ListResult:
    """A listing by prefix, in key order; `more` says the limit cut it short."""

    revision: int
    items: tuple[KeyValue, ...]
    more: bool
    # With `more`: the key to pass as `start` for the next page.
    next: str | None = None

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """How far one follower is, as its leader sees it."""

    match_index: int
    next_index: int
    lag: int
    state: str


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """`GET /v1/status` of one node."""

    # The endpoint that answered.
    endpoint: str
    id: int
    cluster_id: str
    role: str
    term: int
    leader_id: int
    leader_url: str | None
    commit_index: int
    applied_index: int
    last_index: int
    # Only on the leader: its view of every follower.
    peers: Mapping[int, PeerStatus] = field(default_factory=dict)
    # Every field of the answer, including ones this version does not know.
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters since the client was created, for applications to export."""

    # Completed calls (success or error).
    calls: int
    # HTTP attempts made (every call makes at least one, unless its deadline was already past).
    attempts: int
    # Attempts beyond the first of each call (redirects included).
    retries: int
    # Retries that followed a not-leader hint at once.
    redirects: int
    # Times the leader the client believes in changed (including learning it the first time).
    leader_changes: int
    # Calls that ended with an error (including not found and precondition failed).
    failures: int
    # Calls that ended with DeadlineExceededError.
    deadline_exceeded: int
    # Times an endpoint's circuit breaker opened.
    breaker_opens: int


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One lease as `GET /v1/leases` lists it; `remaining_ms` only from the leader."""

    id: int
    ttl_ms: int
    keys: tuple[str, ...]
    key_count: int
    remaining_ms: int | None = None
