"""The replicated key-value state machine: deterministic apply, reads, snapshots, digest.

Every replica applies the same committed log entries in the same order and so reaches the
same state (Raft §5.3, state machine safety). Hence `apply` depends on nothing but the entry
and the current state: no local clock, no randomness, no configuration that may differ
between replicas (the session bounds in `SessionConfig` must be identical cluster-wide).

The model follows etcd's MVCC metadata without keeping history: a store-wide `revision`
grows by one with each successful write; each key carries `create_revision`, `mod_revision`
and `version`. Failed writes (a failed precondition, a delete of a missing key) change no key
and no revision, but their answer is still recorded in the client's session, so a retried
compare-and-set that failed answers the same failure.

Time: `clock_ms` is the largest `time_ms` of any command applied so far (the proposing
leader's wall clock, carried in the entry); session expiry uses it and nothing else.

Beyond the keys, the replicated state holds the revision history (kvstore.kv.history: what
watches and reads at a past revision are served from), the leases (kvstore.kv.leases) and
transactions' effects (kvstore.kv.txn), and who may do what (kvstore.kv.auth: users, roles,
token hashes; the section "auth", present once there is any); all of it is in snapshots (format version 2, which
appends one map of these sections to version 1's array; version 1 still restores).

Entries that carry no command (a new leader's empty entry, CONF_CHANGE) advance
`applied_index` only, except that a CONF_CHANGE entry's member context goes into the member
table (kv/members.py; the section "members" of snapshots, present once a member was added
at runtime); a batch entry (kvstore.kv.commands: several puts and deletes) applies its
commands in order, each as an entry of its own would, and advances it by one. A committed
entry whose bytes do not decode raises `ProtocolError`
and leaves the state untouched: it means a bug, a foreign leader or damage, and must stop
the node loudly rather than be applied differently on different replicas.

Invariants:
- `_keys` holds exactly the keys of `_data`, sorted: a `SortedList` (sortedcontainers), so a
  new key costs O(log n) instead of the O(n) memmove of one flat sorted list (500 us per new
  key at a million keys), and listing a prefix costs O(log n + limit);
- every key's `mod_revision` <= `revision`; `applied_index` only grows, by one per entry,
  except through `restore`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
from sortedcontainers import SortedList

from kvstore.errors import BadRequestError, ProtocolError, RevisionCompactedError
from kvstore.kv.auth import AuthChange, AuthTable
from kvstore.kv.commands import (
    Command,
    Delete,
    KeyValue,
    Put,
    RequestId,
    WriteError,
    WriteResult,
    decode_commands,
)
from kvstore.kv.history import EVENT_DELETE, EVENT_PUT, Compact, Event, History, HistoryConfig
from kvstore.kv.leases import LeaseGrant, LeaseRevoke, LeaseTable
from kvstore.kv.members import MemberTable
from kvstore.kv.sessions import (
    SessionConfig,
    SessionTable,
)
from kvstore.kv.txn import (
    OpResponse,
    Txn,
    TxnDelete,
    TxnGet,
    TxnOutcome,
    TxnPut,
    compare_holds,
)
from kvstore.raft.types import Entry, EntryType

SNAPSHOT_FORMAT_VERSION = 2
"""The first byte of `StateMachine.snapshot()`'s encoding (1: without the sections map)."""


# One key's state inside the store (the key itself is the dict key): (value, create_revision,
# mod_revision, version). A plain tuple of atomic values on purpose: the garbage collector
# stops tracking such tuples after their first collection, whereas a NamedTuple subclass stays
# tracked, and a store of a million keys then made every full collection walk a million
# records (0.3-0.4 s pauses that silenced heartbeats and caused spurious elections).
_Record = tuple[bytes, int, int, int]
_CREATE: Final = 1
_MOD: Final = 2
_VERSION: Final = 3


class _Records(dict[str, _Record]):
    """The key -> record map. A subclass on purpose, for the garbage collector: a full
    collection untracks an exact dict whose values are all untracked (our records are), and
    the next insert of a fresh record tracks it again *in the youngest generation*, so after
    every full collection the next young collections walked the whole store again (a
    600,000-key dict among the young objects of 140-170 ms generation-1 pauses under load).
    The collector untracks only exact dicts: this one stays in the oldest generation, and
    only full collections walk it."""

    __slots__ = ()


# Keys packed per msgpack call when writing a snapshot (see `StateMachine.snapshot`).
_SNAPSHOT_CHUNK_KEYS: Final = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class KvConfig:
    """Configuration of the state machine; identical on every replica (see module doc)."""

    sessions: SessionConfig = field(default_factory=SessionConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)


class StateMachine:
    """The key-value store a replica applies committed entries to."""

    def __init__(self, config: KvConfig | None = None) -> None:
        self.config = config or KvConfig()
        self.applied_index = 0
        self.revision = 0
        self.clock_ms = 0
        # Plain records rather than KeyValue objects: building a frozen dataclass per key
        # would dominate restore() and snapshot() of a large store.
        self._data: dict[str, _Record] = _Records()
        # Invariant: sorted(self._data).
        self._keys: SortedList = SortedList()
        self._sessions = SessionTable(self.config.sessions)
        self.history = History(self.config.history)
        self.leases = LeaseTable()
        self.auth = AuthTable()
        # Contexts of the members added at runtime (kv/members.py): the address book's
        # replicated part, in every snapshot.
        self.members = MemberTable()

    # --- apply ---------------------------------------------------------------------------

    def apply(self, entry: Entry) -> WriteResult | None:
        """Apply the committed entry `applied_index + 1`; None when it carries no command
        (for a batch: the result of its last command)."""
        applied = self.apply_entry(entry)
        return applied[-1][1] if applied else None

    def apply_entry(self, entry: Entry) -> tuple[tuple[Command, WriteResult], ...]:
        """`apply`, returning every command of the entry with its result, in order (none
        for empty and CONF_CHANGE entries; several for a batch), so a driver can match
        results to its pending proposals without decoding the entry a second time. The
        whole entry decodes before anything is applied."""
        assert entry.index == self.applied_index + 1, (
            f"apply out of order: entry {entry.index} after applied {self.applied_index}"
        )
        if entry.type != EntryType.NORMAL or not entry.data:
            if entry.type == EntryType.CONF_CHANGE:
                self.members.apply(entry.data)
            self.applied_index = entry.index
            return ()
        commands = decode_commands(entry.data)
        applied = tuple((command, self.apply_command(command)) for command in commands)
        self.applied_index = entry.index
        return applied

    def apply_command(self, command: Command) -> WriteResult:
        """Apply one decoded command (the body of `apply`; public for tests and tools)."""
        if command.time_ms > self.clock_ms:
            self.clock_ms = command.time_ms
            self._sessions.expire(self.clock_ms)
        request = command.request
        if request is not None:
            earlier = self._sessions.begin(request, command.acked_below, self.clock_ms)
            if isinstance(earlier, WriteResult):
                return earlier
            if earlier is WriteError.SESSION_EXPIRED:
                return self._refusal(WriteError.SESSION_EXPIRED)
        match command:
            case Put():
                result = self._put(command)
            case Delete():
                result = self._delete(command)
            case Txn():
                result = self._txn(command)
            case LeaseGrant():
                result = self._lease_grant(command)
            case LeaseRevoke():
                result = self._lease_revoke(command)
            case Compact():
                result = self._compact(command)
            case AuthChange():
                result = self._auth_change(command)
        if request is not None:
            kept = result
            if result.txn is not None:
                kept = dataclasses.replace(result, txn=result.txn.strip_reads())
            self._sessions.record(request, kept)
        return result

    # --- the primitives every write goes through (events, leases, the key index) -------------

    def _write_key(self, key: str, value: bytes, lease: int, revision: int) -> _Record:
        """Set `key` at `revision` (the caller sets `self.revision`); returns the new record."""
        current = self._data.get(key)
        if current is None:
            new: _Record = (value, revision, revision, 1)
            self._keys.add(key)
        else:
            new = (value, current[_CREATE], revision, current[_VERSION] + 1)
        self._data[key] = new
        self.leases.attach(key, lease)
        self.history.record(
            Event(
                EVENT_PUT,
                KeyValue(key, *new),
                None if current is None else KeyValue(key, *current),
                self.clock_ms,
            )
        )
        return new

    def _remove_key(self, key: str, revision: int) -> _Record:
        """Delete the existing `key` at `revision`; returns the record it had."""
        current = self._data.pop(key)
        self._keys.remove(key)
        self.leases.detach(key)
        self.history.record(
            Event(
                EVENT_DELETE,
                KeyValue(key, b"", 0, revision, 0),
                KeyValue(key, *current),
                self.clock_ms,
            )
        )
        return current

    def _wrote(self, revision: int) -> None:
        """The writes of one command are done: `revision` is the store's, bounds apply."""
        self.revision = revision
        self.history.trim(revision, self.clock_ms)

    def _put(self, command: Put) -> WriteResult:
        key = command.key
        current = self._data.get(key)
        if (command.create_only and current is not None) or not _matches(
            current, command.if_revision
        ):
            return self._refusal(WriteError.PRECONDITION_FAILED, key, current)
        if command.lease and command.lease not in self.leases:
            return self._refusal(WriteError.LEASE_NOT_FOUND)
        new = self._write_key(key, command.value, command.lease, self.revision + 1)
        self._wrote(self.revision + 1)
        return WriteResult(
            ok=True,
            revision=self.revision,
            key_value=_metadata(key, new),
            prev=None if current is None else _metadata(key, current),
            error=None,
        )

    def _delete(self, command: Delete) -> WriteResult:
        current = self._data.get(command.key)
        if not _matches(current, command.if_revision):
            return self._refusal(WriteError.PRECONDITION_FAILED, command.key, current)
        if current is None:
            return self._refusal(WriteError.NOT_FOUND, command.key, None)
        self._remove_key(command.key, self.revision + 1)
        self._wrote(self.revision + 1)
        return WriteResult(
            ok=True,
            revision=self.revision,
            key_value=None,
            prev=_metadata(command.key, current),
            error=None,
        )

    def _txn(self, txn: Txn) -> WriteResult:
        """Compare, then run one branch in one revision (kvstore.kv.txn)."""
        succeeded = all(compare_holds(compare, self.get(compare.key)) for compare in txn.compares)
        ops = txn.success if succeeded else txn.failure
        for op in ops:
            if isinstance(op, TxnPut) and op.lease and op.lease not in self.leases:
                return self._refusal(WriteError.LEASE_NOT_FOUND)
        revision = self.revision + 1
        wrote = False
        responses: list[OpResponse] = []
        for op in ops:
            if isinstance(op, TxnPut):
                current = self._data.get(op.key)
                self._write_key(op.key, op.value, op.lease, revision)
                prev = None if current is None else _metadata(op.key, current)
                responses.append(OpResponse("put", revision=revision, prev=prev))
                wrote = True
            elif isinstance(op, TxnDelete):
                doomed = self._prefix_keys(op.key) if op.prefix else [op.key]
                doomed = [key for key in doomed if key in self._data]
                for key in doomed:
                    self._remove_key(key, revision)
                responses.append(OpResponse("delete", deleted=len(doomed)))
                wrote = wrote or bool(doomed)
            elif isinstance(op, TxnGet):
                kv = self.get(op.key)
                kvs = () if kv is None else (kv,)
                responses.append(OpResponse("get", kvs=kvs, count=len(kvs)))
            else:
                items, next_key = self.range(op.prefix, op.limit, op.start)
                responses.append(
                    OpResponse(
                        "range", kvs=tuple(items), more=next_key is not None, count=len(items)
                    )
                )
        if wrote:
            self._wrote(revision)
        return WriteResult(
            ok=True,
            revision=self.revision,
            key_value=None,
            prev=None,
            error=None,
            txn=TxnOutcome(succeeded, tuple(responses)),
        )

    def evaluate_read_only(self, txn: Txn) -> WriteResult:
        """A transaction that writes nothing, evaluated against the current state without
        being applied (a server serves it after a ReadIndex; it changes nothing)."""
        assert not txn.writes, "only a transaction without writes is evaluated in place"
        return self._txn(txn)

    def _prefix_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for key in self._keys.irange(minimum=prefix):
            if not key.startswith(prefix):
                break
            keys.append(key)
        return keys

    def _lease_grant(self, command: LeaseGrant) -> WriteResult:
        lease_id = command.lease_id
        if lease_id == 0:
            # The entry's index: unique and the same on every replica.
            lease_id = self.applied_index + 1
            while lease_id in self.leases:
                lease_id += 1
        elif lease_id in self.leases:
            return self._refusal(WriteError.LEASE_EXISTS)
        self.leases.grant(lease_id, command.ttl_ms)
        return WriteResult(
            ok=True, revision=self.revision, key_value=None, prev=None, error=None,
            lease_id=lease_id,
        )  # fmt: skip

    def _lease_revoke(self, command: LeaseRevoke) -> WriteResult:
        if command.lease_id not in self.leases:
            return self._refusal(WriteError.LEASE_NOT_FOUND)
        keys = self.leases.revoke(command.lease_id)
        if keys:
            revision = self.revision + 1
            for key in keys:
                self._remove_key(key, revision)
            self._wrote(revision)
        return WriteResult(
            ok=True, revision=self.revision, key_value=None, prev=None, error=None,
            deleted=len(keys),
        )  # fmt: skip

    def _compact(self, command: Compact) -> WriteResult:
        if command.revision > self.revision:
            return self._refusal(WriteError.FUTURE_REVISION)
        self.history.compact(command.revision)
        return WriteResult(ok=True, revision=self.revision, key_value=None, prev=None, error=None)

    def _auth_change(self, command: AuthChange) -> WriteResult:
        if self.auth.apply(command) is not None:
            return self._refusal(WriteError.AUTH_NOT_FOUND)
        return WriteResult(ok=True, revision=self.revision, key_value=None, prev=None, error=None)

    def _refusal(
        self, error: WriteError, key: str = "", current: _Record | None = None
    ) -> WriteResult:
        return WriteResult(
            ok=False,
            revision=self.revision,
            key_value=None,
            prev=None if current is None else _metadata(key, current),
            error=error.value,
        )

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        record = self._data.get(key)
        return None if record is None else KeyValue(key, *record)

    def range(self, prefix: str, limit: int, start: str = "") -> tuple[list[KeyValue], str | None]:
        """Keys starting with `prefix`, from `start` on (inclusive), sorted, at most `limit`
        (>= 1); and the next key there is (the continuation), None if none."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        items: list[KeyValue] = []
        data = self._data
        for key in self._keys.irange(minimum=max(prefix, start)):
            if not key.startswith(prefix):
                break
            if len(items) == limit:
                return items, key
            items.append(KeyValue(key, *data[key]))
        return items, None

    def check_revision(self, revision: int) -> None:
        """Refuse a read at `revision` the history cannot serve: compacted, or ahead of the
        store (BadRequestError)."""
        if revision > self.revision:
            raise BadRequestError(
                f"revision {revision} is in the future (the store is at {self.revision})"
            )
        if revision <= self.history.compacted:
            raise RevisionCompactedError(
                f"revision {revision} is compacted; the oldest kept is {self.history.oldest}",
                oldest_revision=self.history.oldest,
            )

    def get_at(self, key: str, revision: int) -> KeyValue | None:
        """`key` as it was at `revision` (checked with `check_revision`)."""
        self.check_revision(revision)
        return self.history.state_at(key, revision, self.get(key))

    def range_at(
        self, prefix: str, limit: int, start: str, revision: int
    ) -> tuple[list[KeyValue], str | None]:
        """`range` as the store was at `revision` (checked with `check_revision`)."""
        self.check_revision(revision)
        if revision == self.revision:
            return self.range(prefix, limit, start)
        low = max(prefix, start)
        changed = {
            key: state
            for key, state in self.history.keys_changed_since(revision, prefix).items()
            if key >= low
        }
        current = (key for key in self._keys.irange(minimum=low) if key not in changed)
        items: list[KeyValue] = []
        for key in _merge_sorted(current, sorted(changed), prefix):
            state = changed[key] if key in changed else self.get(key)
            if state is None:
                continue
            if len(items) == limit:
                return items, key
            items.append(state)
        return items, None

    def list(self, prefix: str, limit: int) -> tuple[list[KeyValue], bool]:
        """Keys starting with `prefix`, sorted, at most `limit` (0 = no limit); `more` says
        whether further keys match."""
        if limit < 0:
            raise ValueError("limit must be >= 0")
        items: list[KeyValue] = []
        data = self._data
        for key in self._keys.irange(minimum=prefix):
            if not key.startswith(prefix):
                break
            if limit and len(items) == limit:
                return items, True
            items.append(KeyValue(key, *data[key]))
        return items, False

    def __len__(self) -> int:
        return len(self._data)

    def duplicate_result(self, request: RequestId) -> WriteResult | None:
        """The recorded answer if `request` was already applied, a SESSION_EXPIRED refusal if
        its seq is below what its session remembers, None otherwise. Read-only: a server may
        answer a retry with it without proposing (the answer is committed state)."""
        earlier = self._sessions.lookup(request)
        if isinstance(earlier, WriteResult):
            return earlier
        if earlier is WriteError.SESSION_EXPIRED:
            return self._refusal(WriteError.SESSION_EXPIRED)
        return None

    @property
    def sessions(self) -> SessionTable:
        """The session table (read it; only `apply` may change it)."""
        return self._sessions

    def check_invariants(self) -> None:
        """Assert the module's invariants (tests and the simulator; O(size))."""
        assert list(self._keys) == sorted(self._data), "key index out of step with the data"
        for record in self._data.values():
            assert 0 < record[_CREATE] <= record[_MOD] <= self.revision
            assert record[_VERSION] >= 1
        self._sessions.check_invariants()
        self.history.check_invariants(self.revision)
        self.leases.check_invariants()
        for lease in self.leases.leases():
            assert all(key in self._data for key in lease.keys), "a lease holds a missing key"

    # --- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as of `applied_index`, canonically encoded (equal states give
        equal bytes): version byte + msgpack."""
        return _encode_snapshot(
            (self.applied_index, self.revision, self.clock_ms),
            self._keys,
            self._data,
            self._sessions.to_obj(),
            self._sections(),
        )

    def _sections(self) -> dict[str, Any]:
        """The snapshot's map of state beyond keys and sessions (format version 2)."""
        sections = {"history": self.history.to_obj(), "leases": self.leases.to_obj()}
        if self.auth.users or self.auth.roles:
            # Only when there is some: the snapshot of a store without auth is unchanged.
            sections["auth"] = self.auth.to_obj()
        if self.members.contexts:
            # Likewise only once a member was added at runtime.
            sections["members"] = self.members.to_obj()
        return sections

    def freeze(self, *, copy: bool = True) -> FrozenState:
        """A copy of the state as of now that `FrozenState.encode` can encode on another
        thread while this machine goes on applying: the key order and the key map are copied
        (references only: records are immutable tuples; 0.1 s or more for a million keys),
        the session table and the sections as their encoded objects.

        `copy=False` skips the copy of the keys and their map: the result then refers to the
        live ones and is valid only until the next apply, for a driver that encodes it in a
        forked process, whose memory is a copy-on-write image of this moment (the server's
        kvstore/server/snapshots.py)."""
        header = (self.applied_index, self.revision, self.clock_ms)
        if not copy:
            # Even the sessions' and sections' objects are left to the encoding (the
            # history's alone took 25-35 ms at 10,000 revisions).
            return FrozenState(header, self._keys, self._data, None, {}, live=self)
        return FrozenState(
            header,
            list(self._keys),
            _Records(self._data),
            self._sessions.to_obj(),
            self._sections(),
        )

    def restore(self, data: bytes, index: int) -> None:
        """Replace the whole state by a snapshot taken at applied `index`; ProtocolError if
        the bytes are malformed (the state is then unchanged)."""
        self.install(decode_state(data, index, self.config))

    def install(self, state: DecodedState) -> None:
        """Replace the whole state by one `decode_state` made (for this machine's config)."""
        self.applied_index, self.revision, self.clock_ms = state.header
        self._data, self._keys, self._sessions = state.data, state.keys, state.sessions
        self.history, self.leases, self.auth = state.history, state.leases, state.auth
        self.members = state.members

    def digest(self) -> str:
        """sha256 (hex) of the canonical encoding: equal states give equal digests."""
        return hashlib.sha256(self.snapshot()).hexdigest()


@dataclass(frozen=True, slots=True)
class FrozenState:
    """A state machine's state at one applied index, detached from the live machine."""

    header: tuple[int, int, int]  # applied_index, revision, clock_ms
    keys: Iterable[str]  # sorted
    data: Mapping[str, _Record]
    sessions: Any
    sections: dict[str, Any]
    # freeze(copy=False): the live machine, whose sessions and sections `encode` reads.
    live: StateMachine | None = None

    @property
    def applied_index(self) -> int:
        return self.header[0]

    def encode(self) -> bytes:
        """The bytes `StateMachine.snapshot` gave at the moment of `freeze`."""
        sessions, sections = self.sessions, self.sections
        if self.live is not None:
            sessions, sections = self.live._sessions.to_obj(), self.live._sections()
        return _encode_snapshot(self.header, self.keys, self.data, sessions, sections)


def _encode_snapshot(
    header: tuple[int, int, int],
    keys: Iterable[str],
    data: Mapping[str, _Record],
    sessions_obj: Any,
    sections: dict[str, Any],
) -> bytes:
    """version byte + msgpack [applied_index, revision, clock_ms, flat keys, sessions,
    sections] (sections: {"history": ..., "leases": ...}, see kv/history.py, kv/leases.py).

    Keys as one flat array (key, value, create, mod, version, key, ...): no per-key arrays to
    build or to decode, which is most of the cost for a large store. The array is packed in
    chunks, each a short C call: one packb of a million-key store held the GIL for about a
    second, so a leader encoding a snapshot on another thread could not send the keepalives
    that keep its followers from campaigning. The bytes are exactly those of one packb of
    the whole array (a msgpack array is its header followed by its elements)."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [
        bytes((SNAPSHOT_FORMAT_VERSION,)),
        packer.pack_array_header(6),
        *(packer.pack(number) for number in header),
        packer.pack_array_header(5 * len(data)),
    ]
    chunk: list[Any] = []
    extend, chunk_len = chunk.extend, 5 * _SNAPSHOT_CHUNK_KEYS
    for key in keys:
        extend((key, *data[key]))
        if len(chunk) >= chunk_len:
            parts.append(_pack_elements(packer, chunk))
            chunk.clear()
    if chunk:
        parts.append(_pack_elements(packer, chunk))
    parts.append(packer.pack(sessions_obj))
    parts.append(packer.pack(sections))
    return b"".join(parts)


def _pack_elements(packer: msgpack.Packer, elements: list[Any]) -> bytes:
    """The msgpack encoding of `elements` without the array header: one chunk of a larger
    array whose header was written before."""
    packed: bytes = packer.pack(elements)
    return packed[len(packer.pack_array_header(len(elements))) :]


@dataclass(frozen=True, slots=True)
class DecodedState:
    """A snapshot's state, decoded and checked but not yet in a machine (`decode_state`,
    `StateMachine.install`)."""

    header: tuple[int, int, int]  # applied_index, revision, clock_ms
    data: _Records
    keys: SortedList
    sessions: SessionTable
    history: History
    leases: LeaseTable
    auth: AuthTable
    members: MemberTable


# Bytes the snapshot decoder reads at a time (see `decode_state`).
_DECODE_READ_BYTES: Final = 1 << 20
_DECODE_ERRORS: Final = (ValueError, TypeError, msgpack.UnpackException, msgpack.StackError)


def decode_state(data: bytes, index: int, config: KvConfig) -> DecodedState:
    """Decode and check `StateMachine.snapshot()`'s bytes taken at applied `index`;
    ProtocolError if they are malformed. Touches no machine, so it may run on any thread
    (a follower installing a snapshot from its leader decodes on a worker thread while its
    loop goes on answering heartbeats).

    The key array is read one element at a time from a streaming unpacker rather than by
    one unpackb of the whole: one C call over a million-key snapshot held the GIL for a
    second or more, so another thread decoding it stopped the event loop just as decoding
    on the loop did, and the whole array of objects was built before the key map (5 objects
    per key more at the peak)."""
    what = "state machine snapshot"
    if not isinstance(data, bytes) or not data:
        raise ProtocolError(f"{what}: empty payload")
    if data[0] not in (1, SNAPSHOT_FORMAT_VERSION):
        raise ProtocolError(f"{what}: unsupported format version {data[0]}")
    source = io.BytesIO(data)  # shares `data`'s buffer: no copy
    source.seek(1)
    unpacker = msgpack.Unpacker(
        source,
        read_size=min(_DECODE_READ_BYTES, len(data)),
        max_buffer_size=len(data),
        raw=False,
        strict_map_key=True,
        use_list=True,
    )
    try:
        return _decode_state(unpacker, data[0], index, config)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"{what}: malformed msgpack: {exc}") from exc


def _decode_state(
    unpacker: msgpack.Unpacker, version: int, index: int, config: KvConfig
) -> DecodedState:
    if unpacker.read_array_header() != (5 if version == 1 else 6):
        raise ProtocolError("state machine snapshot: expected an array of 6")
    applied_index, revision, clock_ms = unpacker.unpack(), unpacker.unpack(), unpacker.unpack()
    for value, name in ((applied_index, "applied_index"), (revision, "revision")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(f"state machine snapshot: bad {name} {value!r}")
    if not isinstance(clock_ms, int) or isinstance(clock_ms, bool) or clock_ms < 0:
        raise ProtocolError(f"state machine snapshot: bad clock {clock_ms!r}")
    if applied_index != index:
        raise ProtocolError(f"snapshot of index {applied_index} restored as {index}")
    data = _data_from_items(unpacker, revision)
    sessions_obj = unpacker.unpack()
    sections = {} if version == 1 else unpacker.unpack()
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        pass
    else:
        raise ProtocolError("state machine snapshot: data after its end")
    sessions = SessionTable(config.sessions)
    sessions.load_obj(sessions_obj)
    history, leases = _sections_from_obj(sections, config.history, revision, data)
    auth = AuthTable()
    if isinstance(sections, dict) and "auth" in sections:
        auth.load_obj(sections["auth"])
    members = MemberTable()
    if isinstance(sections, dict) and "members" in sections:
        members.load_obj(sections["members"])
    header = (applied_index, revision, clock_ms)
    return DecodedState(header, data, SortedList(data), sessions, history, leases, auth, members)


def _data_from_items(unpacker: msgpack.Unpacker, revision: int) -> _Records:
    """Decode and validate the flat key array of a snapshot (see `snapshot`), read from
    `unpacker` one element at a time (see `decode_state`)."""
    try:
        length = unpacker.read_array_header()
    except ValueError as exc:
        raise ProtocolError("state machine snapshot: items is not an array") from exc
    if length % 5:
        raise ProtocolError("state machine snapshot: key array length not a multiple of 5")
    data = _Records()
    previous = ""
    fields = itertools.islice(unpacker, length)
    for key, value, create_revision, mod_revision, version in zip(
        fields, fields, fields, fields, fields
    ):
        # Exact type checks (bool is not an int here; msgpack never yields subclasses).
        if (
            type(key) is not str
            or type(value) is not bytes
            or type(create_revision) is not int
            or type(mod_revision) is not int
            or type(version) is not int
        ):
            raise ProtocolError(f"state machine snapshot: bad key entry after {previous!r}")
        if key <= previous:
            raise ProtocolError("state machine snapshot: keys empty or not strictly sorted")
        if not 0 < create_revision <= mod_revision <= revision or version < 1:
            raise ProtocolError(f"state machine snapshot: bad revisions for {key!r}")
        data[key] = (value, create_revision, mod_revision, version)
        previous = key
    if len(data) * 5 != length:
        raise msgpack.OutOfData("the key array ends early")
    return data


def _sections_from_obj(
    sections: Any, config: HistoryConfig, revision: int, data: Mapping[str, _Record]
) -> tuple[History, LeaseTable]:
    """The history and leases of a snapshot's sections map (empty when absent: a version 1
    snapshot, whose history starts at its revision)."""
    if not isinstance(sections, dict) or not set(sections) <= {"history", "leases", "auth", "members"}:
        raise ProtocolError("state machine snapshot: sections must be a map of known names")
    history = History(config)
    if "history" in sections:
        history.load_obj(sections["history"], revision)
    else:
        history.compact(revision)
    leases = LeaseTable()
    if "leases" in sections:
        leases.load_obj(sections["leases"], data.keys())
    return history, leases


def _merge_sorted(first: Iterable[str], second: list[str], prefix: str) -> Iterable[str]:
    """The keys of two sorted streams in order, stopping at the first not under `prefix`."""
    other = iter(second)
    pending = next(other, None)
    for key in first:
        if not key.startswith(prefix):
            break
        while pending is not None and pending < key:
            yield pending
            pending = next(other, None)
        yield key
    while pending is not None:
        yield pending
        pending = next(other, None)


def _matches(current: _Record | None, if_revision: int | None) -> bool:
    if if_revision is None:
        return True
    return (0 if current is None else current[_MOD]) == if_revision


def _metadata(key: str, record: _Record) -> KeyValue:
    """The key's revisions without its value (what write results carry)."""
    return KeyValue(key, b"", record[_CREATE], record[_MOD], record[_VERSION])
