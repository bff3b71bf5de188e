"""The commands of the key-value state machine, their results, and their log encoding.

A command is what a leader proposes: `Put` or `Delete`, each optionally conditional
(compare-and-set on the key's `mod_revision`, where 0 means "the key is absent"; `Put` may
also be create-only) and optionally tagged with a `RequestId` for exactly-once application
(Raft dissertation §6.3, see `kvstore.kv.sessions`; the id and its text form live in
`kvstore.request_id`, below the client and the server, and are re-exported here).

Encoding: one version byte (`COMMAND_FORMAT_VERSION`) followed by a msgpack array whose first
element is the `CommandKind`. Decoding is strict and raises `ProtocolError` on anything
malformed, because these bytes come from the replicated log: a leader running other code, a
damaged disk or a bug must be loud, never silently applied as something else.

A batch (`CommandKind.BATCH`, `encode_batch`) is one log entry holding several puts and
deletes, each encoded as above with its own request id: a leader under load proposes the
writes of one turn as one entry, so the per-entry work (an entry, a write-ahead log record,
a slot in every replication message, a decode) is paid once for all of them. Its commands
are applied in order, each exactly as if it had an entry of its own, each deduplicated by
its own request id (a request id twice in one batch is applied once and both copies get its
answer). Only puts and deletes may be batched: a lease grant takes its id from the entry's
index, which the commands of one batch share.

Rules that hold here:
- Values are frozen, slotted dataclasses and validate themselves in `__post_init__`
  (`ValueError` for a caller's mistake); the decoder turns such failures into `ProtocolError`.
- Nothing here depends on configuration, so every node decodes the same bytes the same way.
- Results (`WriteResult`) never carry key values: they are kept in the replicated session
  table, whose memory must stay bounded, and no API answer to a write echoes a value.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import msgpack

from kvstore.errors import ProtocolError
from kvstore.frozen import quick_init

# Re-exported: the state machine's callers name them from here.
from kvstore.request_id import RequestId as RequestId
from kvstore.request_id import parse_request_id as parse_request_id

if TYPE_CHECKING:
    from kvstore.kv.auth import AuthChange
    from kvstore.kv.history import Compact
    from kvstore.kv.leases import LeaseGrant, LeaseRevoke
    from kvstore.kv.txn import Txn, TxnOutcome

COMMAND_FORMAT_VERSION = 1
"""The first byte of every encoded command. Bump it when the array layout changes."""

BATCH_COMMANDS_MAX = 1024
"""Commands in one batch entry (`encode_batch`); a decoder refuses more."""

UINT64_MAX = (1 << 64) - 1
"""The largest integer msgpack encodes: revisions and times must fit (seqs too:
`kvstore.request_id.SEQ_MAX`)."""


class CommandKind(enum.IntEnum):
    """The command tags of the log encoding. Values are part of the format: never renumber."""

    PUT = 1
    DELETE = 2
    # Issue 14's commands start at 10, leaving 3..9 to other additions.
    TXN = 10  # kvstore.kv.txn
    LEASE_GRANT = 11  # kvstore.kv.leases
    LEASE_REVOKE = 12
    COMPACT = 13  # kvstore.kv.history
    AUTH = 20  # kvstore.kv.auth: users, roles, tokens (issue 16)
    # Several puts and deletes in one log entry (`encode_batch`, `decode_commands`).
    BATCH = 30


class WriteError(enum.StrEnum):
    """Why a write did not take effect (`WriteResult.error`)."""

    # The If-Match revision or the create-only condition did not hold (HTTP 412).
    PRECONDITION_FAILED = "precondition_failed"
    # A delete of a key that does not exist (HTTP 404).
    NOT_FOUND = "not_found"
    # The request's seq is below what the client's session still remembers: it was either
    # applied long ago (its answer was discarded) or never; it is not applied now. To the
    # client the outcome of that request is unknown.
    SESSION_EXPIRED = "session_expired"
    # A put names a lease that does not exist, or a revocation one that is gone (HTTP 404).
    LEASE_NOT_FOUND = "lease_not_found"
    # A grant names a lease id already in use (HTTP 409).
    LEASE_EXISTS = "lease_exists"
    # A compaction beyond the store's revision (HTTP 400).
    FUTURE_REVISION = "future_revision"
    # An auth change names a user, role or token that does not exist (HTTP 404).
    AUTH_NOT_FOUND = "auth_not_found"


@quick_init
@dataclass(frozen=True, slots=True)
class Put:
    """Set `key` to `value`. `if_revision`: only if the key's mod_revision equals it (0 =
    the key is absent); `create_only`: only if the key is absent. `acked_below`: the client
    has its answers for every seq below this (only with a request id)."""

    key: str
    value: bytes
    request: RequestId | None
    time_ms: int
    if_revision: int | None = None
    create_only: bool = False
    acked_below: int = 0
    lease: int = 0

    def __post_init__(self) -> None:
        check_common(self.key, self.request, self.time_ms, self.if_revision, self.acked_below)
        if not isinstance(self.value, bytes):
            raise ValueError("value must be bytes")
        if not isinstance(self.create_only, bool):
            raise ValueError("create_only must be a bool")
        if not _is_count(self.lease):
            raise ValueError(f"lease must be an integer in 0..2**64-1: {self.lease!r}")
        if self.create_only and self.if_revision is not None:
            raise ValueError("create_only and if_revision are exclusive (create_only = 0)")


@quick_init
@dataclass(frozen=True, slots=True)
class Delete:
    """Delete `key`; `if_revision` and `acked_below` as for `Put`."""

    key: str
    request: RequestId | None
    time_ms: int
    if_revision: int | None = None
    acked_below: int = 0

    def __post_init__(self) -> None:
        check_common(self.key, self.request, self.time_ms, self.if_revision, self.acked_below)


# Every command of the log. The newer ones live beside the logic that applies them.
Command: TypeAlias = "Put | Delete | Txn | LeaseGrant | LeaseRevoke | Compact | AuthChange"


@quick_init
@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key and its revisions, etcd style: `create_revision` is the store revision that
    created the key (since its last deletion), `mod_revision` the one that last wrote it,
    `version` the number of writes since creation (1 after the first put)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


@quick_init
@dataclass(frozen=True, slots=True)
class WriteResult:
    """The answer to one write, identical on every replica and for every retry of it.

    - `ok`: the write took effect; `revision` is then the store revision it created.
      Otherwise `revision` is the store revision at the time of the refusal.
    - `key_value`: after a successful put, the key's new revisions (value omitted, b"").
    - `prev`: the key as it was before (value omitted): for a put or delete that succeeded the
      overwritten or deleted key, for a failed precondition the key's current state (None if
      absent), so `prev.mod_revision` is the "current_revision" of a 412.
    - `error`: a `WriteError` value, or None when ok.
    - `txn`: for a transaction, which branch ran and what each operation did.
    - `deleted`: for a lease revocation, how many keys went with the lease.
    - `lease_id`: for a lease grant, the lease's id.
    """

    ok: bool
    revision: int
    key_value: KeyValue | None
    prev: KeyValue | None
    error: str | None
    txn: TxnOutcome | None = None
    deleted: int = 0
    lease_id: int = 0

    @property
    def current_revision(self) -> int:
        """For a failed precondition: the key's mod_revision then (0 if it was absent)."""
        return 0 if self.prev is None else self.prev.mod_revision


# --- encoding ------------------------------------------------------------------------------


def encode_command(command: Command) -> bytes:
    """Encode a command for the log: version byte + msgpack array."""
    request = request_to_obj(command.request)
    obj: list[Any]
    if isinstance(command, Put):
        obj = [
            int(CommandKind.PUT),
            command.key,
            command.value,
            request,
            command.time_ms,
            command.if_revision,
            command.create_only,
            command.acked_below,
        ]
        if command.lease:
            # Only when set, so the bytes of a put without a lease are what they were.
            obj.append(command.lease)
    elif isinstance(command, Delete):
        obj = [
            int(CommandKind.DELETE),
            command.key,
            request,
            command.time_ms,
            command.if_revision,
            command.acked_below,
        ]
    else:
        obj = command.to_obj()
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return bytes((COMMAND_FORMAT_VERSION,)) + body


def encode_batch(commands: Sequence[bytes]) -> bytes:
    """One entry's payload for several puts and deletes, each made by `encode_command`
    (the caller checks the kinds: `decode_commands` refuses any other)."""
    assert 1 <= len(commands) <= BATCH_COMMANDS_MAX, f"a batch of {len(commands)} commands"
    body: bytes = msgpack.packb([int(CommandKind.BATCH), list(commands)], use_bin_type=True)
    return bytes((COMMAND_FORMAT_VERSION,)) + body


def decode_commands(data: bytes) -> tuple[Command, ...]:
    """The commands of one entry's payload: one made by `encode_command`, or those of a
    batch made by `encode_batch`, in order; ProtocolError on anything else (nothing of a
    batch is returned when any part of it is malformed)."""
    obj = unpack_versioned(data, COMMAND_FORMAT_VERSION, "command")
    if not isinstance(obj, list) or not obj:
        raise ProtocolError("command: expected a non-empty array")
    if obj[0] != CommandKind.BATCH or not _is_int(obj[0]):
        return (_command_from_obj(obj),)
    if len(obj) != 2 or not isinstance(obj[1], list):
        raise ProtocolError("batch: expected [kind, [command, ...]]")
    parts = obj[1]
    if not 1 <= len(parts) <= BATCH_COMMANDS_MAX:
        raise ProtocolError(f"batch: 1..{BATCH_COMMANDS_MAX} commands, not {len(parts)}")
    commands = []
    for part in parts:
        if not isinstance(part, bytes):
            raise ProtocolError("batch: every command must be bytes")
        command = decode_command(part)
        if not isinstance(command, (Put, Delete)):
            raise ProtocolError(f"batch: only puts and deletes, not {type(command).__name__}")
        commands.append(command)
    return tuple(commands)


def decode_command(data: bytes) -> Command:
    """Decode bytes made by `encode_command`; ProtocolError on anything else (a batch too:
    `decode_commands` reads those)."""
    obj = unpack_versioned(data, COMMAND_FORMAT_VERSION, "command")
    if not isinstance(obj, list) or not obj:
        raise ProtocolError("command: expected a non-empty array")
    return _command_from_obj(obj)


def _command_from_obj(obj: list[Any]) -> Command:
    kind = obj[0]
    try:
        if kind == CommandKind.PUT and _is_int(kind):
            return _put_from_obj(obj)
        if kind == CommandKind.DELETE and _is_int(kind):
            return _delete_from_obj(obj)
        decoder = _newer_decoders().get(kind) if _is_int(kind) else None
        if decoder is not None:
            command: Command = decoder(obj)
            return command
    except ValueError as exc:
        raise ProtocolError(f"invalid command: {exc}") from exc
    raise ProtocolError(f"unknown command kind {kind!r}")


def _newer_decoders() -> dict[int, Any]:
    """The decoders of the commands that live in modules of their own (imported here, late,
    because those modules build on this one)."""
    from kvstore.kv.auth import AuthChange
    from kvstore.kv.history import Compact
    from kvstore.kv.leases import LeaseGrant, LeaseRevoke
    from kvstore.kv.txn import txn_from_obj

    return {
        CommandKind.AUTH: AuthChange.from_obj,
        CommandKind.TXN: txn_from_obj,
        CommandKind.LEASE_GRANT: LeaseGrant.from_obj,
        CommandKind.LEASE_REVOKE: LeaseRevoke.from_obj,
        CommandKind.COMPACT: Compact.from_obj,
    }


def _put_from_obj(obj: list[Any]) -> Put:
    if len(obj) not in (8, 9):
        raise ProtocolError("put: expected an array of 8 or 9")
    _, key, value, request, time_ms, if_revision, create_only, acked_below = obj[:8]
    lease = obj[8] if len(obj) == 9 else 0
    if len(obj) == 9 and lease == 0:
        raise ProtocolError("put: a lease of 0 is encoded by leaving it out")
    return Put(
        key=key,
        value=value,
        request=request_from_obj(request),
        time_ms=time_ms,
        if_revision=if_revision,
        create_only=create_only,
        acked_below=acked_below,
        lease=lease,
    )


def _delete_from_obj(obj: list[Any]) -> Delete:
    if len(obj) != 6:
        raise ProtocolError("delete: expected an array of 6")
    _, key, request, time_ms, if_revision, acked_below = obj
    return Delete(
        key=key,
        request=request_from_obj(request),
        time_ms=time_ms,
        if_revision=if_revision,
        acked_below=acked_below,
    )


def request_to_obj(request: RequestId | None) -> list[Any] | None:
    return None if request is None else [request.client_id, request.seq]


def request_from_obj(obj: Any) -> RequestId | None:
    if obj is None:
        return None
    if not isinstance(obj, list) or len(obj) != 2:
        raise ProtocolError("request id: expected an array of 2")
    return RequestId(obj[0], obj[1])


def unpack_versioned(data: bytes, version: int, what: str) -> Any:
    """msgpack-decode `data` behind its version byte; ProtocolError if anything is off."""
    if not isinstance(data, bytes) or not data:
        raise ProtocolError(f"{what}: empty payload")
    if data[0] != version:
        raise ProtocolError(f"{what}: unsupported format version {data[0]}")
    try:
        return msgpack.unpackb(data[1:], raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.StackError) as exc:
        raise ProtocolError(f"{what}: malformed msgpack: {exc}") from exc


# --- validation ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    """A non-negative integer that msgpack can carry (bools excluded: msgpack keeps them
    apart, so do we)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def check_common(
    key: object, request: object, time_ms: object, if_revision: object, acked_below: object
) -> None:
    """The checks every command shares (`key` None: a command without a key)."""
    if key is not None and (not isinstance(key, str) or not key):
        raise ValueError("key must be a non-empty string")
    if request is not None and not isinstance(request, RequestId):
        raise ValueError("request must be a RequestId or None")
    if not _is_count(time_ms):
        raise ValueError(f"time_ms must be an integer >= 0: {time_ms!r}")
    if if_revision is not None and not _is_count(if_revision):
        raise ValueError(f"if_revision must be None or an integer >= 0: {if_revision!r}")
    if not isinstance(acked_below, int) or not _is_count(acked_below):
        raise ValueError(f"acked_below must be an integer >= 0: {acked_below!r}")
    if request is None and acked_below != 0:
        raise ValueError("acked_below needs a request id")
    if isinstance(request, RequestId) and acked_below > request.seq:
        raise ValueError("acked_below cannot exceed the request's own seq")
