"""Revision history: the recent changes of the store, for watches and reads at a past revision.

Every write the state machine applies is recorded here as an `Event` (a put or a delete of
one key, with the key's new state and its previous state, values included), in revision
order; the events of one revision (a transaction, a lease's keys) sit together. The history
is part of the replicated state: it changes only through `apply`, is bounded by rules that
depend on the applied log alone, and travels in snapshots, so every replica keeps the same
events and a watcher may move from one node to another without missing or repeating one.

Bounds (`HistoryConfig`, identical on every replica): at most `revisions_max` revisions, at
most `bytes_max` bytes of keys and values, and nothing older than `age_ms` by the applied
clock (the proposing leaders' time carried in the entries; 0 = no age bound). Whole
revisions are dropped from the oldest on ("compaction"), automatically after each write and
on demand through the `Compact` command. `compacted` is the newest revision dropped: a
watch or a read at a revision at or below it is refused, naming `compacted + 1`, the
oldest revision kept.

Reads at a past revision R (R > `compacted`): a key's state at R is the previous state
recorded by its first event after R, or, without such an event, its current state.

Invariants:
- `_events` is in revision order; every kept revision's events are all kept;
- `compacted` < the revision of every kept event <= the store's revision;
- `_bytes` is the sum of `Event.size` over `_events[_first:]`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvstore.errors import ProtocolError
from kvstore.frozen import quick_init
from kvstore.kv.commands import (
    UINT64_MAX,
    CommandKind,
    KeyValue,
    RequestId,
    check_common,
    request_from_obj,
    request_to_obj,
)

HISTORY_FORMAT_VERSION = 1
"""The first element of the history's snapshot encoding."""

EVENT_PUT = "put"
EVENT_DELETE = "delete"
# What an event costs against `bytes_max` beyond its keys and values.
_EVENT_OVERHEAD_BYTES = 64
# Events `History.compact` steps over one by one before it searches instead.
_COMPACT_SCAN_MAX = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryConfig:
    """Bounds of the history; must be the same on every replica (see the module doc)."""

    revisions_max: int = 10_000
    bytes_max: int = 64 << 20
    age_ms: int = 0

    def __post_init__(self) -> None:
        for name in ("revisions_max", "bytes_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"history {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.age_ms, int) or isinstance(self.age_ms, bool) or self.age_ms < 0:
            raise ValueError(f"history age_ms must be an integer >= 0, got {self.age_ms!r}")


@quick_init
@dataclass(frozen=True, slots=True)
class Event:
    """One change of one key. `kv` is the key after the change (for a delete: the key with
    an empty value, `mod_revision` the deleting revision, version 0); `prev` the key before
    (None if it did not exist); `time_ms` the applied clock when it happened."""

    type: str
    kv: KeyValue
    prev: KeyValue | None
    time_ms: int

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @property
    def size(self) -> int:
        prev = 0 if self.prev is None else len(self.prev.key) + len(self.prev.value)
        return _EVENT_OVERHEAD_BYTES + len(self.kv.key) + len(self.kv.value) + prev


@dataclass(frozen=True, slots=True)
class Compact:
    """Drop the history up to and including `revision` (on demand; must not exceed the
    store's revision when applied, else it is refused)."""

    revision: int
    request: RequestId | None
    time_ms: int
    acked_below: int = 0

    def __post_init__(self) -> None:
        check_common(None, self.request, self.time_ms, None, self.acked_below)
        if not _is_count(self.revision) or self.revision < 1:
            raise ValueError("compact: revision must be an integer >= 1")

    def to_obj(self) -> list[Any]:
        return [
            int(CommandKind.COMPACT),
            self.revision,
            request_to_obj(self.request),
            self.time_ms,
            self.acked_below,
        ]

    @staticmethod
    def from_obj(obj: list[Any]) -> Compact:
        if len(obj) != 5:
            raise ProtocolError("compact: expected an array of 5")
        _, revision, request, time_ms, acked_below = obj
        return Compact(revision, request_from_obj(request), time_ms, acked_below)


class History:
    """The bounded event log; see the module docstring."""

    def __init__(self, config: HistoryConfig | None = None) -> None:
        self.config = config or HistoryConfig()
        self._events: list[Event] = []
        # Events before this position are dropped (the list is trimmed in bulk, not per pop).
        self._first = 0
        self._bytes = 0
        self.compacted = 0

    # --- recording ---------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Append an event (of the store's newest revision)."""
        assert not self._kept() or self._events[-1].revision <= event.revision
        self._events.append(event)
        self._bytes += event.size

    def trim(self, revision: int, clock_ms: int) -> None:
        """Apply the bounds after a write that made `revision` the store's newest."""
        config = self.config
        floor = revision - config.revisions_max
        if floor > self.compacted:
            self.compact(floor)
        while self._bytes > config.bytes_max and self._kept():
            self.compact(self._events[self._first].revision)
        if config.age_ms:
            oldest_allowed = clock_ms - config.age_ms
            while self._kept() and self._events[self._first].time_ms < oldest_allowed:
                self.compact(self._events[self._first].revision)

    def compact(self, revision: int) -> None:
        """Drop every event of a revision <= `revision`; `compacted` becomes at least it."""
        if revision <= self.compacted:
            return
        events = self._events
        position, end = self._first, len(events)
        # After each write the bound drops one revision, usually one event: step over the
        # few it drops instead of a binary search (whose key function cost 7% of a leader's
        # CPU under load); a long run of them is searched.
        for _ in range(_COMPACT_SCAN_MAX):
            if position == end or events[position].kv.mod_revision > revision:
                break
            self._bytes -= events[position].size
            position += 1
        else:
            stop = self._position(revision + 1)
            for event in events[position:stop]:
                self._bytes -= event.size
            position = stop
        self._first = position
        self.compacted = revision
        if self._first > 1024 and self._first * 2 > len(events):
            del events[: self._first]
            self._first = 0

    # --- reading -----------------------------------------------------------------------

    @property
    def oldest(self) -> int:
        """The oldest revision a watch or a read may start from."""
        return self.compacted + 1

    def __len__(self) -> int:
        return len(self._events) - self._first

    def _kept(self) -> bool:
        return len(self._events) > self._first

    def _position(self, revision: int) -> int:
        """The list position of the first kept event of a revision >= `revision`."""
        return bisect.bisect_left(
            self._events, revision, lo=self._first, key=lambda event: event.revision
        )

    def since(self, revision: int) -> Iterator[Event]:
        """The kept events of revisions >= `revision`, in order (the caller checks that
        `revision` is not compacted)."""
        events = self._events
        for position in range(self._position(revision), len(events)):
            yield events[position]

    def state_at(self, key: str, revision: int, current: KeyValue | None) -> KeyValue | None:
        """`key` as it was at `revision` (> compacted), given its `current` state."""
        for event in self.since(revision + 1):
            if event.kv.key == key:
                return event.prev
        return current

    def keys_changed_since(self, revision: int, prefix: str) -> dict[str, KeyValue | None]:
        """For each key under `prefix` changed after `revision`: its state at `revision`."""
        states: dict[str, KeyValue | None] = {}
        for event in self.since(revision + 1):
            key = event.kv.key
            if key.startswith(prefix) and key not in states:
                states[key] = event.prev
        return states

    def check_invariants(self, revision: int) -> None:
        kept = self._events[self._first :]
        revisions = [event.revision for event in kept]
        assert revisions == sorted(revisions), "history out of revision order"
        assert all(self.compacted < r <= revision for r in revisions), "history out of bounds"
        assert self._bytes == sum(event.size for event in kept), "history size miscounted"

    # --- snapshots ---------------------------------------------------------------------

    def to_obj(self) -> list[Any]:
        """[version, compacted, [[type, key, value, create, mod, version, time_ms, prev], ...]]
        with prev None or [value, create, mod, version] (the key is the event's)."""
        return [
            HISTORY_FORMAT_VERSION,
            self.compacted,
            [_event_to_obj(event) for event in self._events[self._first :]],
        ]

    def load_obj(self, obj: Any, revision: int) -> None:
        """Replace the history by a decoded `to_obj`; ProtocolError (and no change) if bad."""
        if not isinstance(obj, list) or len(obj) != 3 or obj[0] != HISTORY_FORMAT_VERSION:
            raise ProtocolError("history: expected [version 1, compacted, events]")
        _, compacted, items = obj
        if not _is_count(compacted) or compacted > revision or not isinstance(items, list):
            raise ProtocolError(f"history: bad compacted revision {compacted!r}")
        events = [_event_from_obj(item) for item in items]
        previous = compacted
        for event in events:
            if not previous <= event.revision <= revision or event.revision <= compacted:
                raise ProtocolError(f"history: event revision {event.revision} out of order")
            previous = event.revision
        self._events, self._first, self.compacted = events, 0, compacted
        self._bytes = sum(event.size for event in events)


def _event_to_obj(event: Event) -> list[Any]:
    kv, prev = event.kv, event.prev
    return [
        event.type,
        kv.key,
        kv.value,
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        event.time_ms,
        None
        if prev is None
        else [prev.value, prev.create_revision, prev.mod_revision, prev.version],
    ]


def _event_from_obj(obj: Any) -> Event:
    if not isinstance(obj, list) or len(obj) != 8:
        raise ProtocolError("history event: expected an array of 8")
    kind, key, value, create, mod, version, time_ms, prev = obj
    if kind not in (EVENT_PUT, EVENT_DELETE) or type(key) is not str or not key:
        raise ProtocolError("history event: bad type or key")
    if type(value) is not bytes or not all(_is_count(n) for n in (create, mod, version, time_ms)):
        raise ProtocolError(f"history event of {key!r}: bad value or numbers")
    if mod < 1 or (kind == EVENT_PUT and not 0 < create <= mod):
        raise ProtocolError(f"history event of {key!r}: bad revisions")
    previous = None
    if prev is not None:
        if not isinstance(prev, list) or len(prev) != 4 or type(prev[0]) is not bytes:
            raise ProtocolError(f"history event of {key!r}: bad previous state")
        p_value, p_create, p_mod, p_version = prev
        if not all(_is_count(n) for n in (p_create, p_mod, p_version)) or not (
            0 < p_create <= p_mod < mod and p_version >= 1
        ):
            raise ProtocolError(f"history event of {key!r}: bad previous revisions")
        previous = KeyValue(key, p_value, p_create, p_mod, p_version)
    return Event(kind, KeyValue(key, value, create, mod, version), previous, time_ms)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX
