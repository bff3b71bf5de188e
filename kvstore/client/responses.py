"""HTTP answers back into kvstore's types: typed errors, retry classes, node status.

The server (kvstore.server.http) turns errors into `{"error": {"code", "message", ...}}` with
a status code, by the registry of kvstore.errors (`to_json`, `http_status`); this module
reads them back with the same registry (`from_json`: the class of the code, with its fields),
and decides for each failed answer what
the retry policy should see (`FailureKind`) and whether a write may have been applied
(`maybe_applied`). Pure functions of the answer: no I/O, easy to test.

Status by status:
- 307/308/421 or code not_leader: NOT_LEADER, with the leader's URL from the body, the
  Location header or Kvstore-Leader; without a usable URL it is a transient no_leader.
- 503 and 429 (overloaded): TRANSIENT; no_leader, proposal_dropped, overloaded,
  too_many_connections and resource_exhausted were never proposed, any other 503 (a leader that stepped down with the write pending answers
  "unavailable") may have applied. The server's wait is honoured: `retry_after_ms` from the
  error body if present (precise), else the Retry-After header (whole seconds, or a date).
- 504 (the server's own proposal deadline) and other 5xx: TRANSIENT, may have been applied.
- 400, 404, 409 session_expired, 412, 413, 507 and other 4xx: PERMANENT, the typed error is
  raised as is. session_expired (SessionExpiredError) means the cluster no longer remembers
  this request id: not applied now, and whether an earlier attempt applied is unknown.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from kvstore.client.results import NodeStatus, PeerStatus
from kvstore.client.retry import Failure, FailureKind
from kvstore.client.transport import HttpResponse
from kvstore.errors import (
    ClusterError,
    KVStoreError,
    NoLeaderError,
    NotLeaderError,
    ProtocolError,
    from_json,
)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308, 421})
# 503 codes that mean the write was refused before it reached the log.
_NOT_PROPOSED_CODES = frozenset(
    {"no_leader", "proposal_dropped", "overloaded", "too_many_connections", "resource_exhausted"}
)


@dataclass(frozen=True, slots=True)
class FailedAttempt:
    """Why one attempt failed, and whether (for a write) it may have taken effect anyway."""

    failure: Failure
    error: KVStoreError
    maybe_applied: bool


@dataclass(frozen=True, slots=True)
class ErrorBody:
    code: str
    message: str
    leader: str | None
    fields: Mapping[str, object]


def error_body(response: HttpResponse) -> ErrorBody:
    """The JSON error of a failed answer; tolerant of a missing or non-JSON body."""
    try:
        decoded = json.loads(response.body) if response.body else {}
    except ValueError:
        decoded = {}
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if not isinstance(error, dict):
        text = response.body[:200].decode("utf-8", "replace").strip()
        return ErrorBody("", text or f"HTTP {response.status}", None, {})
    leader = error.get("leader")
    return ErrorBody(
        code=str(error.get("code") or ""),
        message=str(error.get("message") or f"HTTP {response.status}"),
        leader=leader if isinstance(leader, str) and leader else None,
        fields={**decoded, **error},
    )


def parse_retry_after(value: str | None, *, now_wall_s: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds (fractions allowed) or an HTTP-date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        now = time.time() if now_wall_s is None else now_wall_s
        seconds = when.timestamp() - now
    return max(0.0, seconds) if seconds == seconds else None  # NaN is not a delay


def _origin(url: str) -> str:
    """scheme://host:port of a URL (a Location names the same path on the leader)."""
    scheme, _, rest = url.partition("://")
    if not rest:
        return ""
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _leader_hint(endpoint: str, response: HttpResponse, body: ErrorBody) -> str | None:
    for candidate in (
        body.leader,
        response.headers.get("location"),
        response.headers.get("kvstore-leader"),
    ):
        if candidate:
            origin = _origin(candidate.strip())
            if origin and origin != endpoint.rstrip("/"):
                return origin
    return None


def classify_failure(endpoint: str, response: HttpResponse) -> FailedAttempt:
    """What a non-2xx answer from `endpoint` means for the retry loop."""
    status = response.status
    body = error_body(response)
    retry_after_s = _retry_after_s(response, body)
    message = f"{endpoint}: {body.code or status}: {body.message}"
    if status in _REDIRECT_STATUSES or body.code == "not_leader":
        hint = _leader_hint(endpoint, response, body)
        if hint is None:
            error: KVStoreError = NoLeaderError(message, retry_after_s=retry_after_s)
            return FailedAttempt(_transient("no_leader", retry_after_s), error, False)
        error = NotLeaderError(message, leader_url=hint)
        return FailedAttempt(
            Failure(FailureKind.NOT_LEADER, "not_leader", None, hint), error, False
        )
    if status < 400:
        error = ProtocolError(f"unexpected answer: {message}")
        return FailedAttempt(Failure(FailureKind.PERMANENT, str(status)), error, False)
    error = from_json(status, {"error": dict(body.fields)}, message=message)
    if isinstance(error, ClusterError):
        error.retry_after_s = retry_after_s
    if status in (429, 503) or (status >= 500 and status != 507):
        # A write refused before it was proposed certainly did not apply; a plain
        # "unavailable" also covers a leader that stepped down with the write pending, and
        # 504 and other 5xx may have applied.
        maybe_applied = status != 429 and body.code not in _NOT_PROPOSED_CODES
        failure = _transient(body.code or str(status), retry_after_s)
        return FailedAttempt(failure, error, maybe_applied)
    return FailedAttempt(Failure(FailureKind.PERMANENT, body.code or str(status)), error, False)


def _retry_after_s(response: HttpResponse, body: ErrorBody) -> float | None:
    """The server's wish: `retry_after_ms` in the error body when present (HTTP's Retry-After
    is whole seconds, far coarser than an election), else the Retry-After header."""
    precise = body.fields.get("retry_after_ms")
    if isinstance(precise, int | float) and not isinstance(precise, bool) and precise >= 0:
        return float(precise) / 1000.0
    return parse_retry_after(response.headers.get("retry-after"))


def _transient(reason: str, retry_after_s: float | None) -> Failure:
    return Failure(FailureKind.TRANSIENT, reason, retry_after_s)


def parse_node_status(endpoint: str, answer: Mapping[str, object]) -> NodeStatus:
    """`GET /v1/status` JSON into a NodeStatus; unknown fields stay in `raw`."""

    def integer(name: str) -> int:
        value = answer.get(name, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    peers: dict[int, PeerStatus] = {}
    raw_peers = answer.get("peers")
    if isinstance(raw_peers, dict):
        for peer_id, progress in raw_peers.items():
            if not isinstance(progress, dict):
                continue
            peers[int(peer_id)] = PeerStatus(
                match_index=int(progress.get("match_index", 0) or 0),
                next_index=int(progress.get("next_index", 0) or 0),
                lag=int(progress.get("lag", 0) or 0),
                state=str(progress.get("state", "")),
            )
    leader_url = answer.get("leader_url")
    return NodeStatus(
        endpoint=endpoint,
        id=integer("id"),
        cluster_id=str(answer.get("cluster_id", "")),
        role=str(answer.get("role", "")),
        term=integer("term"),
        leader_id=integer("leader_id"),
        leader_url=leader_url if isinstance(leader_url, str) and leader_url else None,
        commit_index=integer("commit_index"),
        applied_index=integer("applied_index"),
        last_index=integer("last_index"),
        peers=peers,
        raw=dict(answer),
    )
