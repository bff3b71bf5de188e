"""Transactions: comparisons, then one of two lists of operations, applied in one revision.

A `Txn` is one command of the log (`CommandKind.TXN`, encoded here): its comparisons are
evaluated against the state as the entry is applied, and then either its `success` or its
`failure` operations run, in order, as one atomic step. Whatever the operations write
(puts, deletes, deletes of a whole prefix) takes one new store revision together; a
transaction that writes nothing (only reads, or deletes of absent keys) creates none (etcd's
rule). Reads inside a transaction see the writes before them in the same list.

Rules that hold here (checked by `Txn.__post_init__`, so a decoded entry obeys them too):
- at most `TXN_OPS_MAX` comparisons and as many operations per list;
- no key is written twice in one list, and no put falls under a prefix the same list
  deletes: each key then changes at most once in the revision, so its events and its
  `version` are unambiguous (etcd refuses these too);
- values are bytes, keys non-empty strings, integers within msgpack's range.

Results: `OpResponse` per operation. The answer the proposing client gets carries what
reads returned; the copy kept in the session table for retries drops the values read
(`strip_reads`), so that table stays small: a retried transaction that had already applied
answers whether it succeeded and what it wrote, with `values_dropped` set.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvstore.errors import ProtocolError
from kvstore.kv.commands import (
    UINT64_MAX,
    CommandKind,
    KeyValue,
    RequestId,
    check_common,
    request_from_obj,
    request_to_obj,
)

TXN_OPS_MAX = 1024
"""The most comparisons, or operations per branch, a transaction may hold (a decoding bound;
the server's configured limit is lower)."""

RANGE_LIMIT_MAX = 10_000
"""The most keys one range read returns."""


class CompareTarget(enum.StrEnum):
    """What of a key a comparison looks at (etcd's compare targets)."""

    VALUE = "value"
    VERSION = "version"
    CREATE_REVISION = "create_revision"
    MOD_REVISION = "mod_revision"


class CompareOp(enum.StrEnum):
    EQUAL = "="
    NOT_EQUAL = "!="
    LESS = "<"
    GREATER = ">"


@dataclass(frozen=True, slots=True)
class Compare:
    """`key`'s `target` `op` `operand`. An absent key has version, create and mod revision 0
    and no value: a value comparison on an absent key is false whatever the op."""

    key: str
    target: CompareTarget
    op: CompareOp
    operand: bytes | int

    def __post_init__(self) -> None:
        _check_key(self.key)
        if not isinstance(self.target, CompareTarget) or not isinstance(self.op, CompareOp):
            raise ValueError("compare: bad target or op")
        if self.target is CompareTarget.VALUE:
            if not isinstance(self.operand, bytes):
                raise ValueError("compare: a value comparison needs a bytes operand")
        elif not _is_count(self.operand):
            raise ValueError(f"compare: {self.target.value} needs an integer in 0..2**64-1")


@dataclass(frozen=True, slots=True)
class TxnPut:
    key: str
    value: bytes
    lease: int = 0

    def __post_init__(self) -> None:
        _check_key(self.key)
        if not isinstance(self.value, bytes):
            raise ValueError("put: value must be bytes")
        if not _is_count(self.lease):
            raise ValueError("put: lease must be an integer in 0..2**64-1")


@dataclass(frozen=True, slots=True)
class TxnDelete:
    """Delete `key`, or with `prefix` every key starting with `key` (then it may be "")."""

    key: str
    prefix: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, bool):
            raise ValueError("delete: prefix must be a bool")
        if not self.prefix:
            _check_key(self.key)
        elif not isinstance(self.key, str):
            raise ValueError("delete: prefix must be a string")


@dataclass(frozen=True, slots=True)
class TxnGet:
    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)


@dataclass(frozen=True, slots=True)
class TxnRange:
    """The keys starting with `prefix`, from `start` on (inclusive; "" = the first), sorted,
    at most `limit`."""

    prefix: str
    limit: int = 1000
    start: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not isinstance(self.start, str):
            raise ValueError("range: prefix and start must be strings")
        if not _is_count(self.limit) or not 1 <= self.limit <= RANGE_LIMIT_MAX:
            raise ValueError(f"range: limit must be in 1..{RANGE_LIMIT_MAX}")


TxnOp = TxnPut | TxnDelete | TxnGet | TxnRange


@dataclass(frozen=True, slots=True)
class Txn:
    """If every comparison holds, run `success`, else `failure`; see the module docstring.
    `request`, `time_ms` and `acked_below` as for `Put`."""

    compares: tuple[Compare, ...]
    success: tuple[TxnOp, ...]
    failure: tuple[TxnOp, ...]
    request: RequestId | None
    time_ms: int
    acked_below: int = 0

    def __post_init__(self) -> None:
        check_common(None, self.request, self.time_ms, None, self.acked_below)
        if not isinstance(self.compares, tuple) or len(self.compares) > TXN_OPS_MAX:
            raise ValueError(f"txn: at most {TXN_OPS_MAX} comparisons")
        if not all(isinstance(compare, Compare) for compare in self.compares):
            raise ValueError("txn: compares must be Compare values")
        for name, ops in (("success", self.success), ("failure", self.failure)):
            if not isinstance(ops, tuple) or len(ops) > TXN_OPS_MAX:
                raise ValueError(f"txn: at most {TXN_OPS_MAX} {name} operations")
            if not all(isinstance(op, TxnPut | TxnDelete | TxnGet | TxnRange) for op in ops):
                raise ValueError(f"txn: {name} holds something that is not an operation")
            _check_writes_disjoint(ops, name)

    def to_obj(self) -> list[Any]:
        return txn_to_obj(self)

    @property
    def writes(self) -> bool:
        """Whether either branch may write (a read-only transaction need not be proposed)."""
        return any(isinstance(op, TxnPut | TxnDelete) for op in self.success + self.failure)


def _check_writes_disjoint(ops: Sequence[TxnOp], name: str) -> None:
    keys: set[str] = set()
    prefixes: list[str] = []
    for op in ops:
        if isinstance(op, TxnPut) or (isinstance(op, TxnDelete) and not op.prefix):
            if op.key in keys:
                raise ValueError(f"txn: {name} writes the key {op.key!r} twice")
            keys.add(op.key)
        elif isinstance(op, TxnDelete):
            prefixes.append(op.key)
    for prefix in prefixes:
        if any(key.startswith(prefix) for key in keys) or prefixes.count(prefix) > 1:
            raise ValueError(f"txn: {name} deletes the prefix {prefix!r} and writes under it")


# --- results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpResponse:
    """What one operation did. put: `revision` and `prev` (the key before, value omitted);
    delete: `deleted` (how many keys); get and range: `kvs` and `more`; `count` is the
    number of keys read (kept when the values are dropped)."""

    op: str
    revision: int = 0
    prev: KeyValue | None = None
    deleted: int = 0
    kvs: tuple[KeyValue, ...] = ()
    more: bool = False
    count: int = 0


@dataclass(frozen=True, slots=True)
class TxnOutcome:
    """Which branch ran and what each of its operations did."""

    succeeded: bool
    responses: tuple[OpResponse, ...]
    values_dropped: bool = False

    def strip_reads(self) -> TxnOutcome:
        """The copy the session table keeps: no key values read (see the module doc)."""
        if not any(response.kvs for response in self.responses):
            return self
        stripped = tuple(replace(response, kvs=()) for response in self.responses)
        return TxnOutcome(self.succeeded, stripped, values_dropped=True)


def compare_holds(compare: Compare, kv: KeyValue | None) -> bool:
    """Evaluate one comparison against the key's current state (None: absent)."""
    if compare.target is CompareTarget.VALUE:
        if kv is None:
            return False
        actual: bytes | int = kv.value
    elif compare.target is CompareTarget.VERSION:
        actual = 0 if kv is None else kv.version
    elif compare.target is CompareTarget.CREATE_REVISION:
        actual = 0 if kv is None else kv.create_revision
    else:
        actual = 0 if kv is None else kv.mod_revision
    operand = compare.operand
    if compare.op is CompareOp.EQUAL:
        return actual == operand
    if compare.op is CompareOp.NOT_EQUAL:
        return actual != operand
    if compare.op is CompareOp.LESS:
        return actual < operand  # type: ignore[operator]
    return actual > operand  # type: ignore[operator]


# --- encoding ------------------------------------------------------------------------------


def outcome_to_obj(outcome: TxnOutcome) -> list[Any]:
    """A stored outcome (session table): no values read, so no kvs (see `strip_reads`)."""
    assert not any(response.kvs for response in outcome.responses), "strip_reads first"
    return [
        outcome.succeeded,
        outcome.values_dropped,
        [
            [
                r.op,
                r.revision,
                None if r.prev is None else [r.prev.key, r.prev.create_revision,
                                             r.prev.mod_revision, r.prev.version],
                r.deleted,
                r.more,
                r.count,
            ]
            for r in outcome.responses
        ],
    ]  # fmt: skip


def outcome_from_obj(obj: Any) -> TxnOutcome:
    if not isinstance(obj, list) or len(obj) != 3 or not isinstance(obj[2], list):
        raise ProtocolError("txn outcome: expected an array of 3")
    succeeded, values_dropped, items = obj
    if not isinstance(succeeded, bool) or not isinstance(values_dropped, bool):
        raise ProtocolError("txn outcome: succeeded and values_dropped must be bools")
    responses = []
    for item in items:
        if not isinstance(item, list) or len(item) != 6 or item[0] not in _OP_SHAPES:
            raise ProtocolError("txn outcome: bad operation response")
        op, revision, prev, deleted, more, count = item
        if not all(_is_count(n) for n in (revision, deleted, count)) or not isinstance(more, bool):
            raise ProtocolError("txn outcome: bad numbers in an operation response")
        previous = None
        if prev is not None:
            if (
                not isinstance(prev, list)
                or len(prev) != 4
                or not isinstance(prev[0], str)
                or not all(_is_count(n) for n in prev[1:])
            ):
                raise ProtocolError("txn outcome: bad previous key")
            previous = KeyValue(prev[0], b"", prev[1], prev[2], prev[3])
        responses.append(OpResponse(op, revision, previous, deleted, (), more, count))
    return TxnOutcome(succeeded, tuple(responses), values_dropped)


def txn_to_obj(txn: Txn) -> list[Any]:
    return [
        int(CommandKind.TXN),
        [[c.key, c.target.value, c.op.value, c.operand] for c in txn.compares],
        [_op_to_obj(op) for op in txn.success],
        [_op_to_obj(op) for op in txn.failure],
        request_to_obj(txn.request),
        txn.time_ms,
        txn.acked_below,
    ]


def txn_from_obj(obj: list[Any]) -> Txn:
    """The inverse of `txn_to_obj`; ValueError or ProtocolError when malformed."""
    if len(obj) != 7:
        raise ProtocolError("txn: expected an array of 7")
    _, compares, success, failure, request, time_ms, acked_below = obj
    for part in (compares, success, failure):
        if not isinstance(part, list) or len(part) > TXN_OPS_MAX:
            raise ProtocolError("txn: compares and operations must be short arrays")
    return Txn(
        compares=tuple(_compare_from_obj(item) for item in compares),
        success=tuple(_op_from_obj(item) for item in success),
        failure=tuple(_op_from_obj(item) for item in failure),
        request=request_from_obj(request),
        time_ms=time_ms,
        acked_below=acked_below,
    )


def _compare_from_obj(obj: Any) -> Compare:
    if not isinstance(obj, list) or len(obj) != 4:
        raise ProtocolError("txn compare: expected an array of 4")
    key, target, op, operand = obj
    try:
        return Compare(key, CompareTarget(target), CompareOp(op), operand)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"txn compare: {exc}") from exc


def _op_to_obj(op: TxnOp) -> list[Any]:
    if isinstance(op, TxnPut):
        return ["put", op.key, op.value, op.lease]
    if isinstance(op, TxnDelete):
        return ["delete", op.key, op.prefix]
    if isinstance(op, TxnGet):
        return ["get", op.key]
    return ["range", op.prefix, op.limit, op.start]


_OP_SHAPES: dict[str, tuple[int, type[TxnOp]]] = {
    "put": (4, TxnPut),
    "delete": (3, TxnDelete),
    "get": (2, TxnGet),
    "range": (4, TxnRange),
}


def _op_from_obj(obj: Any) -> TxnOp:
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise ProtocolError("txn op: expected an array naming its kind")
    shape = _OP_SHAPES.get(obj[0])
    if shape is None or len(obj) != shape[0]:
        raise ProtocolError(f"txn op: unknown kind or wrong length: {obj[0]!r}")
    try:
        return shape[1](*obj[1:])
    except TypeError as exc:
        raise ProtocolError(f"txn op: {exc}") from exc


# --- validation ----------------------------------------------------------------------------


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError("key must be a non-empty string")
