"""Transactions on the client side: comparisons, operations, and the typed result.

    from kvstore.client.txn import Compare, Op

    result = await kv.txn(
        compare=[Compare.mod_revision("config", "=", 7)],
        success=[Op.put("config", b"new"), Op.delete_prefix("cache/")],
        failure=[Op.get("config")],
    )
    if not result.succeeded:
        current = result.responses[0].kvs[0]

The server applies either branch atomically in one revision (docs/api.md, `POST /v1/txn`),
exactly once like every write (the client's request id goes with every attempt). These
values only build the JSON the server validates; plain dicts of the same shape work too
(the `kvstore txn` command passes a file's JSON through).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.client.results import KeyValue
from kvstore.errors import ProtocolError

_OPS = ("=", "!=", "<", ">")


def _b64(value: bytes | str) -> str:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class Compare:
    """`key`'s `target` (value, version, create_revision, mod_revision) `op` (=, !=, <, >)
    `operand`. An absent key has version and revisions 0; a value comparison on it fails."""

    key: str
    target: str
    op: str
    operand: bytes | str | int

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"op must be one of {', '.join(_OPS)}")

    @classmethod
    def value(cls, key: str, op: str, value: bytes | str) -> Compare:
        return cls(key, "value", op, value)

    @classmethod
    def version(cls, key: str, op: str, version: int) -> Compare:
        return cls(key, "version", op, version)

    @classmethod
    def create_revision(cls, key: str, op: str, revision: int) -> Compare:
        return cls(key, "create_revision", op, revision)

    @classmethod
    def mod_revision(cls, key: str, op: str, revision: int) -> Compare:
        return cls(key, "mod_revision", op, revision)

    @classmethod
    def absent(cls, key: str) -> Compare:
        """The key does not exist."""
        return cls(key, "create_revision", "=", 0)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": self.key, "target": self.target, "op": self.op}
        if self.target == "value":
            assert not isinstance(self.operand, int), "a value comparison takes bytes"
            body["value"] = _b64(self.operand)
        else:
            body["value"] = self.operand
        return body


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a branch; build it with the class methods."""

    body: Mapping[str, Any]

    @classmethod
    def put(cls, key: str, value: bytes | str, *, lease: int = 0) -> Op:
        body: dict[str, Any] = {"op": "put", "key": key, "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return cls(body)

    @classmethod
    def delete(cls, key: str) -> Op:
        return cls({"op": "delete", "key": key})

    @classmethod
    def delete_prefix(cls, prefix: str) -> Op:
        return cls({"op": "delete", "prefix": prefix})

    @classmethod
    def get(cls, key: str) -> Op:
        return cls({"op": "get", "key": key})

    @classmethod
    def range(cls, prefix: str, *, limit: int = 1000, start: str = "") -> Op:
        return cls({"op": "range", "prefix": prefix, "limit": limit, "start": start})

    def to_json(self) -> dict[str, Any]:
        return dict(self.body)


@dataclass(frozen=True, slots=True)
class OpResult:
    """What one operation did: put `revision` (and `prev` without its value), delete
    `deleted`, get and range `kvs` (and `more` for a range cut short by its limit)."""

    op: str
    revision: int = 0
    deleted: int = 0
    kvs: tuple[KeyValue, ...] = ()
    more: bool = False
    count: int = 0
    prev: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class TxnResult:
    """`succeeded`: whether the comparisons held (the success branch ran); `revision`: the
    store's revision after the transaction; `values_dropped`: this was a retry of a
    transaction already applied, whose values read are no longer kept (counts are)."""

    succeeded: bool
    revision: int
    responses: tuple[OpResult, ...]
    values_dropped: bool = False
    request_id: str = ""


def txn_body(
    compare: Sequence[Compare | Mapping[str, Any]],
    success: Sequence[Op | Mapping[str, Any]],
    failure: Sequence[Op | Mapping[str, Any]],
) -> dict[str, Any]:
    def one(item: Compare | Op | Mapping[str, Any]) -> dict[str, Any]:
        return item.to_json() if isinstance(item, Compare | Op) else dict(item)

    return {
        "compare": [one(item) for item in compare],
        "success": [one(item) for item in success],
        "failure": [one(item) for item in failure],
    }


def key_value_from_json(item: Any, revision: int) -> KeyValue:
    """A key as the API writes it (value in base64; absent for a put's `prev`)."""
    if not isinstance(item, dict):
        raise ProtocolError(f"a key is not an object: {item!r}")
    try:
        value = base64.b64decode(str(item.get("value", "")), validate=True)
        return KeyValue(
            key=str(item["key"]),
            value=value,
            create_revision=int(item.get("create_revision", 0)),
            mod_revision=int(item.get("mod_revision", 0)),
            version=int(item.get("version", 0)),
            revision=revision,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"a key is malformed: {item!r}") from exc


def txn_result_from_json(answer: Mapping[str, Any], request_id: str = "") -> TxnResult:
    try:
        revision = int(answer["revision"])
        responses = []
        for item in answer["responses"]:
            prev = item.get("prev")
            responses.append(
                OpResult(
                    op=str(item["op"]),
                    revision=int(item.get("revision", 0)),
                    deleted=int(item.get("deleted", 0)),
                    kvs=tuple(key_value_from_json(kv, revision) for kv in item.get("kvs", [])),
                    more=bool(item.get("more", False)),
                    count=int(item.get("count", 0)),
                    prev=None if prev is None else key_value_from_json(prev, revision),
                )
            )
        return TxnResult(
            succeeded=bool(answer["succeeded"]),
            revision=revision,
            responses=tuple(responses),
            values_dropped=bool(answer.get("values_dropped", False)),
            request_id=request_id,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"a transaction's answer is malformed: {exc!r}") from exc
