"""`Client`: the asyncio client library, one pooled HTTP session per instance.

One call (get, put, ...) is a loop of attempts, each a single HTTP exchange through the
injected `Transport`, governed by the pure `RetryPolicy` (kvstore.client.retry):

- **Leader discovery.** Every answer carries `Kvstore-Leader`; a write on a follower answers
  307 / not_leader with the leader's URL. The client remembers the leader and sends every
  call straight there; a hint is followed at once, without back-off, and is trusted over the
  hinted endpoint's circuit breaker (it is fresh news from a live node).
- **Retries** of transient failures across replicas, with capped exponential back-off and
  full jitter, honouring Retry-After, inside the call's deadline and attempt budget.
- **Exactly-once writes.** Every write carries `Kvstore-Request-Id: <client_id>:<seq>`;
  all attempts of one write reuse it, so the cluster's session table answers a retry of an
  applied write with the first answer instead of applying it twice. `Kvstore-Acked-Below`
  is the lowest seq still awaiting its answer, so the cluster may forget older answers.
- **Circuit breakers** per endpoint skip a replica that keeps failing at the transport level.
- **Failover without waiting out timeouts.** A node that does not answer (refused, reset) is
  left for another node at once, and a hint naming a node that already failed in this call
  is not followed. An attempt with no answer after `leader_probe_after_s` asks the other
  nodes who leads (`_LeaderProbe`, one round at a time per client); as soon as one names
  another leader, the attempt is abandoned and the call goes there. So a frozen leader
  (SIGSTOP, a hung disk) costs an application about one election, not the attempt timeout.

Errors are the types of kvstore.errors. A call that gives up raises:
- `UnavailableError` when no node could be reached at all (every attempt failed to connect:
  nothing listening, no route), or when the attempts ran out with every one certainly
  rejected (no_leader, 429): nothing was applied;
- `DeadlineExceededError` when the deadline passed otherwise; for a write,
  `outcome_unknown=True` if some attempt may have reached the cluster (it may have applied),
  `outcome_unknown=False` if every attempt was certainly rejected.

Rules that hold here: the client only runs on the event loop that first used it; time comes
from the injected clock and sleeping from the injected sleep (tests use fakes); no call takes
longer than its deadline (attempt timeouts and sleeps are clipped to the time left).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from kvstore.client.config import ClientConfig, Consistency
from kvstore.client.lease import Lease, OnLost
from kvstore.client.probe import LeaderProbe, normalize_url
from kvstore.client.responses import FailedAttempt, classify_failure, parse_node_status
from kvstore.client.results import (
    ClientStats,
    DeleteResult,
    KeyValue,
    LeaseInfo,
    ListResult,
    NodeStatus,
    PutResult,
)
from kvstore.client.retry import (
    CallBudget,
    CircuitBreaker,
    Clock,
    Decision,
    Failure,
    FailureKind,
    RetryPolicy,
    Verdict,
)
from kvstore.client.stream import StreamTransport
from kvstore.client.transport import (
    AiohttpTransport,
    HttpResponse,
    Transport,
    TransportError,
    tls_context,
)
from kvstore.client.txn import Compare, Op, TxnResult, txn_body, txn_result_from_json
from kvstore.client.watch import Watch
from kvstore.errors import (
    BadRequestError,
    DeadlineExceededError,
    KVStoreError,
    NotLeaderError,
    ProtocolError,
    UnavailableError,
)
from kvstore.request_id import check_client_id, request_id_text

log = logging.getLogger("kvstore.client")

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Call:
    """One logical operation, as every attempt of it sends it."""

    name: str
    method: str
    path: str
    key: str | None = None
    query: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None
    body: bytes | None = None
    # Writes carry a request id and may leave their outcome unknown.
    is_write: bool = False
    # Send every attempt to this endpoint only (status of one node).
    pinned_endpoint: str | None = None
    # Any node answers at once (a stale read): a short attempt, so a frozen node costs
    # little before the next one is asked (ClientConfig.stale_attempt_timeout_s).
    any_node: bool = False


@dataclass(frozen=True, slots=True)
class _LeaderMoved:
    """An attempt abandoned: no answer for `waited_s` while another node names a leader."""

    leader_url: str
    waited_s: float


@dataclass(frozen=True, slots=True)
class _Answer:
    """A successful attempt: who answered, and the answer."""

    endpoint: str
    response: HttpResponse
    # The write's seq (0 for a read).
    seq: int = 0


class _Counters:
    __slots__ = (
        "attempts",
        "calls",
        "deadline_exceeded",
        "failures",
        "leader_changes",
        "redirects",
        "retries",
    )

    def __init__(self) -> None:
        self.calls = self.attempts = self.retries = self.redirects = 0
        self.leader_changes = self.failures = self.deadline_exceeded = 0


def _key_path(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise BadRequestError("a key must be a non-empty string")
    return "/v1/kv/" + quote(key, safe="")


def _as_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


class Client:
    """The asyncio client: `async with Client(["http://127.0.0.1:7001", ...]) as kv: ...`.

    `endpoints` are client URLs of some or all nodes (the leader may also be learned from
    answers). Keyword arguments: `config` (a ClientConfig), `timeout_s` (overrides
    config.timeout_s), and for tests `transport`, `clock` (monotonic seconds), `sleep`,
    `rng` and `client_id`.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        config: ClientConfig | None = None,
        timeout_s: float | None = None,
        transport: Transport | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        client_id: str | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [part for part in endpoints.split(",") if part.strip()]
        if not endpoints:
            raise ValueError("Client needs at least one endpoint")
        config = config or ClientConfig()
        if timeout_s is not None:
            config = replace(config, timeout_s=timeout_s)
        self.config = config
        self.endpoints: tuple[str, ...] = tuple(dict.fromkeys(map(normalize_url, endpoints)))
        # The session table on the servers is keyed by this; random per instance.
        self.client_id = check_client_id(client_id) if client_id else secrets.token_hex(8)
        self._clock: Clock = clock or time.monotonic
        self._sleep: Sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self._policy = RetryPolicy(config, clock=self._clock, rng=self._rng)
        self._transport: Transport = transport or _default_transport(config, self.endpoints)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._round_robin = self._rng.randrange(len(self.endpoints))
        # Invariant: the URL the latest answer named as leader, or None while unknown.
        self._leader_url: str | None = None
        self._last_leader_seen: str | None = None
        # Invariant: seqs are handed out once, in order; _inflight holds those whose call
        # has not finished, so min(_inflight) is the lowest seq still awaiting an answer.
        self._next_seq = 1
        self._inflight: set[int] = set()
        # Invariant: no seq below this is in _inflight (see `_acked_below`).
        self._lowest_unfinished = 1
        self._counters = _Counters()
        self._probe = LeaderProbe(self._transport, self.endpoints, config, self._clock)
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pooled HTTP session. Calls after close raise RuntimeError."""
        self._closed = True
        await self._probe.close()
        await self._transport.close()

    # --- observability --------------------------------------------------------------------

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters (attempts, retries, leader changes, ...)."""
        counters = self._counters
        return ClientStats(
            calls=counters.calls,
            attempts=counters.attempts,
            retries=counters.retries,
            redirects=counters.redirects,
            leader_changes=counters.leader_changes,
            failures=counters.failures,
            deadline_exceeded=counters.deadline_exceeded,
            breaker_opens=sum(breaker.opens for breaker in self._breakers.values()),
        )

    @property
    def leader_url(self) -> str | None:
        """The leader the client currently believes in, if any."""
        return self._leader_url

    def clock(self) -> float:
        """The client's monotonic clock, in seconds (injected for tests)."""
        return self._clock()

    # --- operations -----------------------------------------------------------------------

    async def get(
        self,
        key: str,
        *,
        consistency: Consistency | str | None = None,
        revision: int | None = None,
        timeout_s: float | None = None,
    ) -> KeyValue:
        """The value and revisions of `key`; NotFoundError if it does not exist. With
        `revision`, as it was then (RevisionCompactedError once the history dropped it)."""
        level = Consistency(consistency or self.config.read_consistency)
        query = {"consistency": level.value}
        if revision:
            query["revision"] = str(revision)
        call = _Call(
            "get", "GET", _key_path(key), key=key, query=query,
            any_node=level is Consistency.STALE,
        )  # fmt: skip
        response = (await self._run(call, timeout_s)).response
        headers = response.headers
        return KeyValue(
            key=key,
            value=response.body,
            create_revision=_int_header(headers, "kvstore-create-revision"),
            mod_revision=_int_header(headers, "kvstore-mod-revision"),
            version=_int_header(headers, "kvstore-version"),
            revision=_int_header(headers, "kvstore-revision"),
        )

    async def put(
        self,
        key: str,
        value: bytes | str,
        *,
        if_revision: int | None = None,
        create_only: bool = False,
        lease: int = 0,
        timeout_s: float | None = None,
    ) -> PutResult:
        """Write `value` under `key`, exactly once even across retries and failovers.
        `lease`: attach the key to that lease (it goes when the lease does).

        `if_revision`: write only if the key's mod_revision equals it (0: only if absent);
        `create_only`: write only if the key does not exist. A failed condition raises
        PreconditionFailedError (its `current_revision` says what the key is at).
        """
        headers: dict[str, str] = {}
        if if_revision is not None:
            if isinstance(if_revision, bool) or if_revision < 0:
                raise BadRequestError(f"if_revision must be an int >= 0, got {if_revision!r}")
            headers["If-Match"] = str(if_revision)
        if create_only:
            headers["If-None-Match"] = "*"
        call = _Call(
            "put", "PUT", _key_path(key), key=key, headers=headers,
            body=_as_bytes(value), is_write=True,
            query={"lease": str(lease)} if lease else None,
        )  # fmt: skip
        answered = await self._run(call, timeout_s)
        answer = _json_object(answered.response)
        return PutResult(
            key=str(answer.get("key", key)),
            revision=_int_field(answer, "revision"),
            create_revision=_int_field(answer, "create_revision"),
            mod_revision=_int_field(answer, "mod_revision"),
            version=_int_field(answer, "version"),
            request_id=self._request_id(answered.seq),
        )

    async def cas(
        self,
        key: str,
        value: bytes | str,
        *,
        mod_revision: int | None = None,
        create_only: bool = False,
        timeout_s: float | None = None,
    ) -> PutResult:
        """Compare-and-set: write only if the key's mod_revision is `mod_revision` (0: absent),
        or, with `create_only=True`, only if the key does not exist. Exactly one of the two.
        Raises PreconditionFailedError when the comparison fails."""
        if (mod_revision is None) == (not create_only):
            raise BadRequestError("cas needs exactly one of mod_revision=N or create_only=True")
        return await self.put(
            key, value, if_revision=mod_revision, create_only=create_only, timeout_s=timeout_s
        )

    async def delete(
        self, key: str, *, if_revision: int | None = None, timeout_s: float | None = None
    ) -> DeleteResult:
        """Delete `key`; NotFoundError if absent, PreconditionFailedError on a failed If-Match."""
        headers = {} if if_revision is None else {"If-Match": str(if_revision)}
        call = _Call("delete", "DELETE", _key_path(key), key=key, headers=headers, is_write=True)
        answered = await self._run(call, timeout_s)
        answer = _json_object(answered.response)
        return DeleteResult(
            key=str(answer.get("key", key)),
            revision=_int_field(answer, "revision"),
            request_id=self._request_id(answered.seq),
        )

    async def list(
        self,
        prefix: str = "",
        *,
        limit: int | None = None,
        start: str | None = None,
        revision: int | None = None,
        consistency: Consistency | str | None = None,
        timeout_s: float | None = None,
    ) -> ListResult:
        """The keys starting with `prefix`, in order, from `start` on (a previous page's
        `next`), at most `limit` (server default if None); with `revision`, as they were
        then."""
        level = Consistency(consistency or self.config.read_consistency)
        query = {"prefix": prefix, "consistency": level.value}
        if limit is not None:
            query["limit"] = str(limit)
        if start:
            query["start"] = start
        if revision:
            query["revision"] = str(revision)
        call = _Call("list", "GET", "/v1/kv", query=query, any_node=level is Consistency.STALE)
        answer = _json_object((await self._run(call, timeout_s)).response)
        revision = _int_field(answer, "revision")
        raw_items = answer.get("items")
        if not isinstance(raw_items, list):
            raise ProtocolError("list answer without an items array")
        items = tuple(_list_item(item, revision) for item in raw_items)
        following = answer.get("next")
        return ListResult(
            revision=revision,
            items=items,
            more=bool(answer.get("more", False)),
            next=following if isinstance(following, str) else None,
        )

    async def delete_prefix(self, prefix: str, *, timeout_s: float | None = None) -> DeleteResult:
        """Delete every key starting with `prefix` (non-empty) in one revision."""
        if not prefix:
            raise BadRequestError("delete_prefix needs a non-empty prefix")
        call = _Call(
            "delete_prefix", "DELETE", "/v1/kv", key=prefix, query={"prefix": prefix},
            is_write=True,
        )  # fmt: skip
        answered = await self._run(call, timeout_s)
        answer = _json_object(answered.response)
        return DeleteResult(
            key=prefix,
            revision=_int_field(answer, "revision"),
            request_id=f"{self.client_id}:{answered.seq}",
            deleted=_int_field(answer, "deleted"),
        )

    # --- coordination: transactions, compaction, leases, watches --------------------------

    async def txn(
        self,
        compare: Sequence[Compare | Mapping[str, object]] = (),
        success: Sequence[Op | Mapping[str, object]] = (),
        failure: Sequence[Op | Mapping[str, object]] = (),
        *,
        timeout_s: float | None = None,
    ) -> TxnResult:
        """If every comparison holds run `success`, else `failure`, atomically in one
        revision and exactly once (see kvstore.client.txn)."""
        body = json.dumps(txn_body(compare, success, failure)).encode()
        answered = await self._post("txn", "/v1/txn", body, timeout_s, is_write=True)
        return txn_result_from_json(
            _json_object(answered.response), f"{self.client_id}:{answered.seq}"
        )

    async def compact(self, revision: int, *, timeout_s: float | None = None) -> int:
        """Drop the history up to `revision`; returns the oldest revision still kept."""
        body = json.dumps({"revision": revision}).encode()
        answered = await self._post("compact", "/v1/compact", body, timeout_s, is_write=True)
        return _int_field(_json_object(answered.response), "oldest_revision")

    async def lease_grant(
        self, ttl_ms: int, *, lease_id: int = 0, timeout_s: float | None = None
    ) -> int:
        """Grant a lease of `ttl_ms` (the server picks the id unless given); its id."""
        body = json.dumps({"ttl_ms": ttl_ms, "id": lease_id}).encode()
        answered = await self._post("lease_grant", "/v1/lease/grant", body, timeout_s,
                                    is_write=True)  # fmt: skip
        return _int_field(_json_object(answered.response), "id")

    async def lease_keepalive(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        """Renew the lease on the leader; its TTL in ms (NotFoundError once it is gone)."""
        body = json.dumps({"id": lease_id}).encode()
        answered = await self._post("lease_keepalive", "/v1/lease/keepalive", body, timeout_s)
        return _int_field(_json_object(answered.response), "ttl_ms")

    async def lease_revoke(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        """Revoke the lease; its keys are deleted in one revision. Returns how many."""
        body = json.dumps({"id": lease_id}).encode()
        answered = await self._post("lease_revoke", "/v1/lease/revoke", body, timeout_s,
                                    is_write=True)  # fmt: skip
        return _int_field(_json_object(answered.response), "deleted")

    async def leases(self, *, timeout_s: float | None = None) -> tuple[LeaseInfo, ...]:
        """Every lease, with (up to 100 of) its keys."""
        call = _Call("leases", "GET", "/v1/leases")
        answer = _json_object((await self._run(call, timeout_s)).response)
        raw = answer.get("leases")
        if not isinstance(raw, list):
            raise ProtocolError("leases answer without a leases array")
        infos = []
        for item in raw:
            if not isinstance(item, dict):
                raise ProtocolError(f"a lease is not an object: {item!r}")
            remaining = item.get("remaining_ms")
            infos.append(
                LeaseInfo(
                    id=_int_field(item, "id"),
                    ttl_ms=_int_field(item, "ttl_ms"),
                    keys=tuple(str(key) for key in item.get("keys", [])),
                    key_count=_int_field(item, "key_count"),
                    remaining_ms=remaining if isinstance(remaining, int) else None,
                )
            )
        return tuple(infos)

    # --- membership (docs/api.md, "Membership") ------------------------------------------

    async def members(self, *, timeout_s: float | None = None) -> dict[str, object]:
        """`GET /v1/members` of the leader (or whichever node answers): voters, learners,
        removed ids and, from the leader, each member's lag."""
        call = _Call("members", "GET", "/v1/members")
        return _json_object((await self._run(call, timeout_s)).response)

    async def add_member(
        self,
        name: str,
        peer_address: str,
        *,
        client_url: str = "",
        promote: bool = False,
        timeout_s: float | None = None,
    ) -> dict[str, object]:
        """Add a learner under a new id (docs/api.md, Membership): `name` (a name held by a
        member makes that member the one it replaces), its peer address and client URL;
        `promote`: the leader promotes it once caught up. The answer: `id`, `replaces`,
        `peers` (the address book to start it with) and `members`."""
        body = json.dumps(
            {"name": name, "peer_address": peer_address, "client_url": client_url,
             "promote": promote}
        ).encode()  # fmt: skip
        answered = await self._post("member_add", "/v1/members/add", body, timeout_s,
                                    is_write=True)  # fmt: skip
        return _json_object(answered.response)

    async def promote_member(
        self, member: int, *, timeout_s: float | None = None
    ) -> dict[str, object]:
        """Promote learner `member` to voter once caught up; the new member list."""
        return await self._member_change("promote", member, timeout_s)

    async def remove_member(
        self, member: int, *, timeout_s: float | None = None
    ) -> dict[str, object]:
        """Remove `member` (its id is never used again); the new member list."""
        return await self._member_change("remove", member, timeout_s)

    async def transfer_leader(self, to: int, *, timeout_s: float | None = None) -> int:
        """Hand leadership to voter `to`; the new leader's id."""
        body = json.dumps({"to": to}).encode()
        answered = await self._post("transfer_leader", "/v1/leader/transfer", body, timeout_s,
                                    is_write=True)  # fmt: skip
        return _int_field(_json_object(answered.response), "leader_id")

    async def _member_change(
        self, action: str, member: int, timeout_s: float | None
    ) -> dict[str, object]:
        body = json.dumps({"id": member}).encode()
        answered = await self._post(f"member_{action}", f"/v1/members/{action}", body,
                                    timeout_s, is_write=True)  # fmt: skip
        return _json_object(answered.response)

    def lease(self, ttl_s: float, *, on_lost: OnLost | None = None) -> Lease:
        """A lease kept alive in the background: `async with kv.lease(5) as lease:`
        (kvstore.client.lease)."""
        return Lease(self, ttl_s, on_lost=on_lost, sleep=self._sleep)

    def watch(
        self,
        *,
        key: str | None = None,
        prefix: str | None = None,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress: bool = False,
        progress_interval_s: float = 1.0,
    ) -> Watch:
        """Events of `key` or of every key under `prefix` from `start_revision` (0: from
        now), across failovers, each once and in order (kvstore.client.watch)."""
        return Watch(
            self.endpoints, key=key, prefix=prefix, start_revision=start_revision,
            prev_kv=prev_kv, progress=progress, progress_interval_s=progress_interval_s,
            connect_timeout_s=self.config.connect_timeout_s, rng=self._rng,
            ssl_context=tls_context(self.config.ca_file, self.config.cert_file,
                                    self.config.key_file),
            headers={"Authorization": f"Bearer {self.config.token}"} if self.config.token
            else None,
        )  # fmt: skip

    async def _post(
        self, name: str, path: str, body: bytes, timeout_s: float | None, *, is_write: bool = False
    ) -> _Answer:
        call = _Call(
            name, "POST", path, headers={"Content-Type": "application/json"}, body=body,
            is_write=is_write,
        )  # fmt: skip
        return await self._run(call, timeout_s)

    # --- users, roles and tokens (admin; docs/security.md) ---------------------------------

    async def auth_show(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Every user with its roles, every role with its permissions, every token's id and
        user (GET /v1/auth)."""
        call = _Call("auth_show", "GET", "/v1/auth")
        return _json_object((await self._run(call, timeout_s)).response)

    async def auth_put_role(
        self, name: str, permissions: Sequence[tuple[str, str]], *, timeout_s: float | None = None
    ) -> None:
        """Create or replace role `name`: (prefix, "read" | "write" | "admin") pairs."""
        body = {"permissions": [{"prefix": p, "access": a} for p, a in permissions]}
        await self._auth_write("auth_put_role", "PUT", f"/v1/auth/roles/{name}", body, timeout_s)

    async def auth_delete_role(self, name: str, *, timeout_s: float | None = None) -> None:
        await self._auth_write(
            "auth_delete_role", "DELETE", f"/v1/auth/roles/{name}", None, timeout_s
        )

    async def auth_put_user(
        self, name: str, roles: Sequence[str], *, timeout_s: float | None = None
    ) -> None:
        """Create or replace user `name` with `roles` (which must exist)."""
        body = {"roles": list(roles)}
        await self._auth_write("auth_put_user", "PUT", f"/v1/auth/users/{name}", body, timeout_s)

    async def auth_delete_user(self, name: str, *, timeout_s: float | None = None) -> None:
        """Delete user `name` and every token of it."""
        await self._auth_write(
            "auth_delete_user", "DELETE", f"/v1/auth/users/{name}", None, timeout_s
        )

    async def auth_new_token(self, user: str, *, timeout_s: float | None = None) -> tuple[str, str]:
        """A new token for `user`: (token, id). The token is shown only now."""
        answer = await self._auth_write(
            "auth_new_token", "POST", "/v1/auth/tokens", {"user": user}, timeout_s
        )
        return str(answer.get("token", "")), str(answer.get("id", ""))

    async def auth_delete_token(self, token_id: str, *, timeout_s: float | None = None) -> None:
        await self._auth_write(
            "auth_delete_token", "DELETE", f"/v1/auth/tokens/{token_id}", None, timeout_s
        )

    async def _auth_write(
        self, name: str, method: str, path: str, body: Any, timeout_s: float | None
    ) -> dict[str, Any]:
        call = _Call(
            name, method, path,
            headers=None if body is None else {"Content-Type": "application/json"},
            body=None if body is None else json.dumps(body).encode(),
            is_write=True,
        )  # fmt: skip
        return _json_object((await self._run(call, timeout_s)).response)

    async def status(
        self, endpoint: str | None = None, *, timeout_s: float | None = None
    ) -> NodeStatus:
        """`GET /v1/status` of `endpoint`, or of whichever node answers (the leader first)."""
        pinned = None if endpoint is None else normalize_url(endpoint)
        call = _Call("status", "GET", "/v1/status", pinned_endpoint=pinned)
        answer = await self._run(call, timeout_s)
        return parse_node_status(answer.endpoint, _json_object(answer.response))

    async def cluster_status(self, *, timeout_s: float = 1.0) -> dict[str, NodeStatus | None]:
        """The status of every configured endpoint, concurrently; None for one that is down."""

        async def one(endpoint: str) -> NodeStatus | None:
            try:
                return await self.status(endpoint, timeout_s=timeout_s)
            except KVStoreError:
                return None

        answers = await asyncio.gather(*(one(endpoint) for endpoint in self.endpoints))
        return dict(zip(self.endpoints, answers))

    # --- the retry loop -------------------------------------------------------------------

    async def _run(self, call: _Call, timeout_s: float | None) -> _Answer:
        if self._closed:
            raise RuntimeError("this Client is closed")
        self._counters.calls += 1
        seq = 0
        if call.is_write:
            seq = self._next_seq
            self._next_seq += 1
            self._inflight.add(seq)
        try:
            answer = await self._attempts(call, seq, self._policy.begin(timeout_s))
            return answer
        except KVStoreError as exc:
            self._counters.failures += 1
            if isinstance(exc, DeadlineExceededError):
                self._counters.deadline_exceeded += 1
            raise
        finally:
            self._inflight.discard(seq)

    async def _attempts(self, call: _Call, seq: int, budget: CallBudget) -> _Answer:
        hint: str | None = None
        maybe_applied = False
        # Whether any attempt reached a node (an HTTP answer, or a request that may have
        # been sent): if none did, the cluster is unreachable rather than slow.
        reached = False
        # Endpoints that did not answer in this call: avoided, and their hints not followed.
        down: set[str] = set()
        distrusted: set[str] = set()
        # The last error that says why a node could not be used (refused, a certificate
        # that does not check out...): a timeout of an attempt that started with little
        # time left says less, and the caller is told this one instead.
        telling: KVStoreError | None = None
        while True:
            endpoint = call.pinned_endpoint or hint or self._choose_endpoint(avoid=down)
            attempt_timeout_s = budget.start_attempt(
                self.config.stale_attempt_timeout_s if call.any_node else None
            )
            self._counters.attempts += 1
            outcome = await self._attempt(call, seq, endpoint, attempt_timeout_s)
            if isinstance(outcome, _Answer):
                return outcome
            maybe_applied = maybe_applied or outcome.maybe_applied
            reached = reached or not _connect_failure(outcome.error)
            if not (isinstance(outcome.error, TransportError) and outcome.error.timed_out):
                telling = outcome.error
            failure = outcome.failure
            if failure.kind is FailureKind.NODE_DOWN:
                down.add(endpoint)
            elif failure.kind is FailureKind.NOT_LEADER and failure.leader_url in down:
                if failure.leader_url in distrusted:
                    # Named again after a back-off: it may lead by now (a cluster starting).
                    down.discard(failure.leader_url)
                else:
                    # A live node still names the leader that just failed us: it has not
                    # noticed yet. Not followed (a hot loop between the two): back off.
                    distrusted.add(failure.leader_url)
                    failure = Failure(FailureKind.TRANSIENT, "stale_hint", failure.retry_after_s)
            decision = budget.decide(failure)
            if not decision.retry:
                last = outcome.error
                if not reached and telling is not None:
                    last = telling
                error = self._give_up(call, budget, decision, last, maybe_applied, reached=reached)
                raise error from (None if error is outcome.error else outcome.error)
            hint = failure.leader_url if failure.kind is FailureKind.NOT_LEADER else None
            self._note_retry(call, endpoint, budget, failure, decision)
            if decision.delay_s > 0:
                await self._sleep(decision.delay_s)

    async def _attempt(
        self, call: _Call, seq: int, endpoint: str, timeout_s: float
    ) -> _Answer | FailedAttempt:
        """One HTTP exchange, its answer or why it failed."""
        breaker = self._breaker(endpoint)
        breaker.before_call()
        try:
            response = await self._exchange(call, seq, endpoint, timeout_s)
        except TransportError as exc:
            breaker.record_failure()
            if self._leader_url == endpoint:
                self._set_leader(None)
            reason = "timeout" if exc.timed_out else "transport"
            failure = Failure(FailureKind.NODE_DOWN, reason)
            return FailedAttempt(failure, exc, maybe_applied=call.is_write and exc.maybe_sent)
        if isinstance(response, _LeaderMoved):
            # Abandoned: the node did not answer while another names a new leader.
            breaker.record_failure()
            self._set_leader(response.leader_url)
            error = NotLeaderError(
                f"{endpoint}: no answer in {response.waited_s:.3f}s while another node names "
                f"{response.leader_url} as the leader",
                leader_url=response.leader_url,
            )
            failure = Failure(FailureKind.NOT_LEADER, "leader_moved", None, response.leader_url)
            return FailedAttempt(failure, error, maybe_applied=call.is_write)
        breaker.record_success()
        self._learn_leader(response)
        if response.status < 300:
            return _Answer(endpoint, response, seq)
        failed = classify_failure(endpoint, response)
        if not call.is_write:
            failed = replace(failed, maybe_applied=False)
        return failed

    async def _exchange(
        self, call: _Call, seq: int, endpoint: str, timeout_s: float
    ) -> HttpResponse | _LeaderMoved:
        """The attempt's request; past `leader_probe_after_s` without an answer, the other
        nodes are asked who leads until it answers (then its answer) or one of them names
        another leader (then `_LeaderMoved`, and the request is cancelled)."""
        request = self._transport.request(
            endpoint, call.method, call.path, query=call.query,
            headers=self._headers(call, seq), body=call.body, timeout_s=timeout_s,
        )  # fmt: skip
        config = self.config
        if (
            call.pinned_endpoint is not None
            or call.any_node
            or len(self.endpoints) < 2
            or config.leader_probe_after_s >= timeout_s
        ):
            return await request
        started = self._clock()
        task = asyncio.ensure_future(request)
        try:
            done, _ = await asyncio.wait((task,), timeout=config.leader_probe_after_s)
            while not done:
                leader = await self._probe.named_leader(besides=endpoint, answered=task)
                if task.done():
                    break
                if leader is not None:
                    return _LeaderMoved(leader, self._clock() - started)
                done, _ = await asyncio.wait((task,), timeout=config.leader_probe_interval_s)
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError, TransportError):
                    await task

    def _headers(self, call: _Call, seq: int) -> Mapping[str, str] | None:
        base = call.headers
        if self.config.token:
            base = {**(base or {}), "Authorization": f"Bearer {self.config.token}"}
        if not call.is_write:
            return base
        headers = dict(base or {})
        headers["Kvstore-Request-Id"] = self._request_id(seq)
        headers["Kvstore-Acked-Below"] = str(self._acked_below())
        return headers

    def _request_id(self, seq: int) -> str:
        """The text of `RequestId(self.client_id, seq)`, without building one per write: the
        client id was checked when the client was made, and seqs count up from 1."""
        return request_id_text(self.client_id, seq)

    def _acked_below(self) -> int:
        """min(_inflight), or the next seq when none waits: every seq below it has its answer.
        The bound only moves up, over each seq once, so a write costs O(1) amortized rather
        than a scan of every call in flight (with 256 writers on one Client, that scan was
        16% of the client's CPU)."""
        low, inflight, end = self._lowest_unfinished, self._inflight, self._next_seq
        while low < end and low not in inflight:
            low += 1
        self._lowest_unfinished = low
        return low

    def _give_up(
        self,
        call: _Call,
        budget: CallBudget,
        decision: Decision,
        error: KVStoreError,
        maybe_applied: bool,
        *,
        reached: bool,
    ) -> KVStoreError:
        if decision.verdict is Verdict.GIVE_UP_PERMANENT:
            return error
        what = f"{call.name} {call.key or call.path}"
        if not reached:
            return UnavailableError(
                f"{what}: no node could be reached in {budget.attempts} attempts "
                f"({', '.join(self.endpoints)}); last error: {error}"
            )
        reason = (
            "deadline passed"
            if decision.verdict is Verdict.GIVE_UP_DEADLINE
            else "attempts used up"
        )
        message = f"{what}: {reason} after {budget.attempts} attempts; last error: {error}"
        if call.is_write and maybe_applied:
            return DeadlineExceededError(
                message + " (outcome unknown: the write may have been applied)",
                attempts=budget.attempts, outcome_unknown=True,
            )  # fmt: skip
        if decision.verdict is Verdict.GIVE_UP_DEADLINE:
            return DeadlineExceededError(message, attempts=budget.attempts, outcome_unknown=False)
        return UnavailableError(message)

    def _note_retry(
        self, call: _Call, endpoint: str, budget: CallBudget, failure: Failure, decision: Decision
    ) -> None:
        self._counters.retries += 1
        if failure.kind is FailureKind.NOT_LEADER and decision.delay_s == 0:
            self._counters.redirects += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "retry call=%s key=%s attempt=%d endpoint=%s reason=%s delay_s=%.4f "
                "remaining_s=%.3f leader=%s",
                call.name, call.key, budget.attempts, endpoint, failure.reason,
                decision.delay_s, budget.remaining_s(), failure.leader_url or self._leader_url,
            )  # fmt: skip

    # --- endpoints, leader, breakers ------------------------------------------------------

    def _breaker(self, endpoint: str) -> CircuitBreaker:
        breaker = self._breakers.get(endpoint)
        if breaker is None:
            breaker = self._breakers[endpoint] = CircuitBreaker(self.config, clock=self._clock)
        return breaker

    def _choose_endpoint(self, avoid: set[str] | frozenset[str] = frozenset()) -> str:
        """The leader if known and not broken, else the next endpoint whose breaker allows;
        endpoints in `avoid` (they did not answer in this call) only when no other is left."""
        leader = self._leader_url
        if leader is not None and leader not in avoid and self._breaker(leader).allows():
            return leader
        count = len(self.endpoints)
        for skip in (avoid, frozenset()):
            for step in range(count):
                index = (self._round_robin + step) % count
                endpoint = self.endpoints[index]
                if endpoint != leader and endpoint not in skip and self._breaker(endpoint).allows():
                    self._round_robin = (index + 1) % count
                    return endpoint
        # Every breaker is open: probe the one whose cool-down ends first.
        return min(self.endpoints, key=lambda endpoint: self._breaker(endpoint).reopens_at())

    def _learn_leader(self, response: HttpResponse) -> None:
        if "kvstore-leader" not in response.headers:
            return
        named = response.headers["kvstore-leader"].strip()
        self._set_leader(normalize_url(named) if named else None)

    def _set_leader(self, url: str | None) -> None:
        if url == self._leader_url:
            return
        self._leader_url = url
        if url is not None and url != self._last_leader_seen:
            self._last_leader_seen = url
            self._counters.leader_changes += 1
            log.debug("leader url=%s", url)


def _default_transport(config: ClientConfig, endpoints: Sequence[str]) -> Transport:
    http = AiohttpTransport(
        connect_timeout_s=config.connect_timeout_s,
        max_connections=config.max_connections,
        ca_file=config.ca_file,
        cert_file=config.cert_file,
        key_file=config.key_file,
    )
    if not config.binary_stream:
        return http
    return StreamTransport(
        http,
        connect_timeout_s=config.connect_timeout_s,
        token=config.token,
        standby=endpoints if config.standby_streams and len(endpoints) > 1 else (),
    )


def _connect_failure(error: KVStoreError) -> bool:
    """An attempt that never reached a node: the connection could not be made."""
    return isinstance(error, TransportError) and not error.maybe_sent


def _int_header(headers: Mapping[str, str], name: str) -> int:
    raw = headers.get(name)
    if raw is None:
        return 0
    try:
        return int(raw.strip().strip('"'))
    except ValueError as exc:
        raise ProtocolError(f"header {name} is not an integer: {raw!r}") from exc


def _json_object(response: HttpResponse) -> dict[str, object]:
    try:
        answer = json.loads(response.body)
    except ValueError as exc:
        raise ProtocolError(f"answer is not JSON: {response.body[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise ProtocolError(f"answer is not a JSON object: {response.body[:200]!r}")
    return answer


def _int_field(answer: Mapping[str, object], name: str) -> int:
    value = answer.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"field {name} is not an integer: {value!r}")
    return value


def _list_item(item: object, revision: int) -> KeyValue:
    if not isinstance(item, dict):
        raise ProtocolError(f"list item is not an object: {item!r}")
    try:
        value = base64.b64decode(str(item.get("value", "")), validate=True)
    except ValueError as exc:
        raise ProtocolError(f"list item value is not base64: {item!r}") from exc
    return KeyValue(
        key=str(item.get("key", "")),
        value=value,
        create_revision=_int_field(item, "create_revision"),
        mod_revision=_int_field(item, "mod_revision"),
        version=_int_field(item, "version"),
        revision=revision,
    )
