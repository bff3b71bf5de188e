"""The coordination API: transactions, range deletes, compaction and leases over HTTP.

Routes (docs/api.md has the bodies):
- `POST /v1/txn`: comparisons, then the success or the failure operations, in one revision
  (kvstore.kv.txn). A transaction that may write is proposed like every write (exactly once
  by its `Kvstore-Request-Id`); one that only reads is evaluated on this node after a
  ReadIndex, with no log entry.
- `DELETE /v1/kv?prefix=P`: every key under a non-empty prefix, in one revision.
- `POST /v1/compact`: drop the history up to a revision.
- `POST /v1/lease/grant|keepalive|revoke`, `GET /v1/leases` (kvstore/server/leases.py).

Like http.py, every input is checked before the core sees it: the body is JSON of bounded
size (the node's `max_body_bytes`), keys are bounded strings without control characters,
values base64 (or `value_text`, UTF-8), numbers bounded, and the number of comparisons and
operations at most `txn_ops_max`; anything else is a 400 naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from kvstore.errors import BadRequestError
from kvstore.kv.commands import UINT64_MAX, Command, RequestId, WriteResult
from kvstore.kv.history import Compact
from kvstore.kv.leases import LEASE_ID_MAX, LEASE_TTL_MS_MAX, LeaseGrant, LeaseRevoke
from kvstore.kv.txn import (
    RANGE_LIMIT_MAX,
    Compare,
    CompareOp,
    CompareTarget,
    OpResponse,
    Txn,
    TxnDelete,
    TxnGet,
    TxnOp,
    TxnPut,
    TxnRange,
)
from kvstore.server.http import _CONTROL, HttpApi, _json, _query
from kvstore.server.leases import LeaseService
from kvstore.server.watch import key_value_json

_T = TypeVar("_T")
_OP_ALIASES = {"==": CompareOp.EQUAL}


class CoordinationApi:
    """The routes above, registered on the node's HttpApi."""

    def __init__(self, http: HttpApi, leases: LeaseService) -> None:
        self.http = http
        self.driver = http.driver
        self.config = http.config
        self.leases = leases
        http.add_routes(
            {
                ("/v1/txn", "POST"): self.txn,
                ("/v1/kv", "DELETE"): self.delete_prefix,
                ("/v1/compact", "POST"): self.compact,
                ("/v1/lease/grant", "POST"): self.lease_grant,
                ("/v1/lease/keepalive", "POST"): self.lease_keepalive,
                ("/v1/lease/revoke", "POST"): self.lease_revoke,
                ("/v1/leases", "GET"): self.lease_list,
            }
        )

    # --- plumbing --------------------------------------------------------------------------

    async def _propose(
        self, request: web.BaseRequest, build: Callable[[RequestId, int, int], Command]
    ) -> WriteResult:
        """Propose the command `build(request_id, time_ms, acked_below)` makes, exactly once
        by the request's id, and raise the error of a refusal."""
        driver = self.driver
        if driver.leader_pending():
            await driver.wait_for_leader()
        driver.check_writable()
        request_id, acked_below, server_made = self.http._request_id(request)
        try:
            command = _build(build, request_id, int(time.time() * 1000), acked_below)
            result = await driver.write(command, request_id)
        finally:
            if server_made:
                driver.release_request_id(request_id)
        self.http._raise_for_result(result)
        return result

    # --- transactions ----------------------------------------------------------------------

    async def txn(self, request: web.BaseRequest) -> web.Response:
        body = await self.http.json_body(request)
        compares = _parse_list(body, "compare", self.config.txn_ops_max)
        success = _parse_list(body, "success", self.config.txn_ops_max)
        failure = _parse_list(body, "failure", self.config.txn_ops_max)
        if unknown := set(body) - {"compare", "success", "failure"}:
            raise BadRequestError(f"unknown fields in the transaction: {sorted(unknown)}")
        parsed = (
            tuple(self._compare(item) for item in compares),
            tuple(self._op(item) for item in success),
            tuple(self._op(item) for item in failure),
        )
        probe = _build(lambda: Txn(*parsed, request=None, time_ms=0))
        if probe.writes:
            result = await self._propose(
                request,
                lambda rid, now, acked: Txn(*parsed, request=rid, time_ms=now, acked_below=acked),
            )
        else:
            await self.http._barrier(request)
            result = self.driver.replica.state_machine.evaluate_read_only(probe)
        outcome = result.txn
        assert outcome is not None, "a transaction's result says which branch ran"
        return _json(
            {
                "succeeded": outcome.succeeded,
                "revision": result.revision,
                "responses": [_response_json(response) for response in outcome.responses],
                "values_dropped": outcome.values_dropped,
            }
        )

    def _key(self, item: dict[str, Any], name: str = "key", *, empty: bool = False) -> str:
        key = item.get(name)
        limit = self.config.max_key_bytes
        if not isinstance(key, str) or (not key and not empty):
            raise BadRequestError(f"{name} must be a non-empty string")
        if _CONTROL.search(key) or len(key.encode()) > limit:
            raise BadRequestError(f"{name} {key[:40]!r}: at most {limit} bytes, no controls")
        return key

    def _value(self, item: dict[str, Any]) -> bytes:
        if "value_text" in item:
            text = item["value_text"]
            if not isinstance(text, str):
                raise BadRequestError("value_text must be a string")
            value = text.encode("utf-8")
        else:
            encoded = item.get("value", "")
            if not isinstance(encoded, str):
                raise BadRequestError("value must be a base64 string")
            try:
                value = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadRequestError("value is not valid base64") from exc
        if len(value) > self.config.max_value_bytes:
            raise BadRequestError(f"a value is over {self.config.max_value_bytes} bytes")
        return value

    def _compare(self, item: Any) -> Compare:
        if not isinstance(item, dict):
            raise BadRequestError("each comparison must be an object")
        key = self._key(item)
        try:
            target = CompareTarget(item.get("target", ""))
        except ValueError:
            names = ", ".join(t.value for t in CompareTarget)
            raise BadRequestError(f"compare target must be one of {names}") from None
        op_text = item.get("op", "=")
        try:
            op = _OP_ALIASES.get(op_text) or CompareOp(op_text)
        except ValueError:
            raise BadRequestError("compare op must be one of =, !=, <, >") from None
        if target is CompareTarget.VALUE:
            operand: bytes | int = self._value(item)
        else:
            operand = _bounded_int(item.get("value"), f"compare value of {key!r}", UINT64_MAX)
        return _build(Compare, key, target, op, operand)

    def _op(self, item: Any) -> TxnOp:
        if not isinstance(item, dict):
            raise BadRequestError("each operation must be an object")
        kind = item.get("op")
        if kind == "put":
            lease = _bounded_int(item.get("lease", 0), "lease", LEASE_ID_MAX)
            return _build(TxnPut, self._key(item), self._value(item), lease)
        if kind == "delete":
            if "prefix" in item:
                return _build(TxnDelete, self._key(item, "prefix", empty=True), True)
            return _build(TxnDelete, self._key(item))
        if kind == "get":
            return _build(TxnGet, self._key(item))
        if kind == "range":
            limit = _bounded_int(item.get("limit", 1000), "limit", RANGE_LIMIT_MAX, 1)
            start = self._key(item, "start", empty=True) if "start" in item else ""
            return _build(TxnRange, self._key(item, "prefix", empty=True), limit, start)
        raise BadRequestError("op must be one of put, delete, get, range")

    async def delete_prefix(self, request: web.BaseRequest) -> web.Response:
        prefix = _query(request).get("prefix", "")
        if not prefix:
            raise BadRequestError("DELETE /v1/kv needs a non-empty prefix=")
        self._key({"prefix": prefix}, "prefix")
        result = await self._propose(
            request,
            lambda rid, now, acked: Txn(
                (), (TxnDelete(prefix, True),), (), request=rid, time_ms=now, acked_below=acked
            ),
        )
        assert result.txn is not None
        return _json({"revision": result.revision, "deleted": result.txn.responses[0].deleted})

    async def compact(self, request: web.BaseRequest) -> web.Response:
        body = await self.http.json_body(request)
        revision = _bounded_int(body.get("revision"), "revision", UINT64_MAX, 1)
        result = await self._propose(
            request, lambda rid, now, acked: Compact(revision, rid, now, acked)
        )
        oldest = self.driver.replica.state_machine.history.oldest
        return _json({"revision": result.revision, "oldest_revision": max(oldest, revision + 1)})

    # --- leases ----------------------------------------------------------------------------

    async def lease_grant(self, request: web.BaseRequest) -> web.Response:
        body = await self.http.json_body(request)
        ttl_ms = _bounded_int(body.get("ttl_ms"), "ttl_ms", LEASE_TTL_MS_MAX, 1)
        lease_id = _bounded_int(body.get("id", 0), "id", LEASE_ID_MAX)
        result = await self._propose(
            request, lambda rid, now, acked: LeaseGrant(lease_id, ttl_ms, rid, now, acked)
        )
        return _json({"id": result.lease_id, "ttl_ms": ttl_ms, "revision": result.revision})

    async def lease_keepalive(self, request: web.BaseRequest) -> web.Response:
        body = await self.http.json_body(request)
        lease_id = _bounded_int(body.get("id"), "id", LEASE_ID_MAX, 1)
        ttl_ms = await self.leases.keepalive(lease_id)
        return _json({"id": lease_id, "ttl_ms": ttl_ms})

    async def lease_revoke(self, request: web.BaseRequest) -> web.Response:
        body = await self.http.json_body(request)
        lease_id = _bounded_int(body.get("id"), "id", LEASE_ID_MAX, 1)
        result = await self._propose(
            request, lambda rid, now, acked: LeaseRevoke(lease_id, rid, now, acked)
        )
        return _json({"id": lease_id, "revision": result.revision, "deleted": result.deleted})

    async def lease_list(self, request: web.BaseRequest) -> web.Response:
        await self.http._barrier(request)
        machine = self.driver.replica.state_machine
        leases = []
        for lease in machine.leases.leases():
            keys = sorted(lease.keys)
            entry: dict[str, Any] = {
                "id": lease.lease_id,
                "ttl_ms": lease.ttl_ms,
                "keys": keys[:100],
                "key_count": len(keys),
            }
            remaining = self.leases.remaining_ms(lease.lease_id)
            if remaining is not None:
                entry["remaining_ms"] = remaining
            leases.append(entry)
        return _json({"revision": machine.revision, "leases": leases})


def _build(factory: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Build a command or a part of one; it validates itself (ValueError -> 400)."""
    try:
        return factory(*args, **kwargs)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc


def _parse_list(body: dict[str, Any], name: str, limit: int) -> list[Any]:
    items = body.get(name, [])
    if not isinstance(items, list):
        raise BadRequestError(f"{name} must be an array")
    if len(items) > limit:
        raise BadRequestError(f"{name} has {len(items)} entries; at most {limit} (txn_ops_max)")
    return items


def _bounded_int(value: Any, name: str, maximum: int, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise BadRequestError(f"{name} must be an integer in {minimum}..{maximum}")
    return value


def _response_json(response: OpResponse) -> dict[str, Any]:
    body: dict[str, Any] = {"op": response.op}
    if response.op == "put":
        body["revision"] = response.revision
        if response.prev is not None:
            prev = key_value_json(response.prev)
            del prev["value"]
            body["prev"] = prev
    elif response.op == "delete":
        body["deleted"] = response.deleted
    else:
        body["kvs"] = [key_value_json(kv) for kv in response.kvs]
        body["count"] = response.count
        if response.op == "range":
            body["more"] = response.more
    return body
