"""The HTTP API (aiohttp): validation, the mapping of errors to HTTP, and nothing else.

Handlers never touch Raft state. A write is validated, turned into a command, and handed to
the driver (`Driver.write`), which proposes it and resolves a future when the entry is applied;
a linearizable read waits on `Driver.read_barrier()` (one ReadIndex for all reads of a turn)
and then reads the local state machine. This is the only module that turns `kvstore.errors`
into HTTP answers, in `HttpApi.handle` and `HttpApi._error_response`, with the registry's
`http_status()` and `to_json()` (the client reads them back with `from_json`); a write's
refusal (`WriteError`) becomes its error through `_WRITE_ERRORS`. Anything else a handler
raises is a bug and answers a JSON 500 (logged, rate-limited), never a traceback.

Every input is checked before it is used: the path and the query are percent-decoded here,
strictly (invalid UTF-8 or a malformed escape is 400, so that `%FF` and `%25FF` cannot name
the same key), keys and prefixes must not contain C0 or C1 control characters or DEL, and
every number in a header or the query is bounded in digits and value before `int()` sees it.
Connection bounds and timeouts live in kvstore/server/connections.py.

The API is described in docs/api.md and served as OpenAPI at /v1/openapi.json.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from kvstore.errors import (
    BadRequestError,
    ClusterError,
    ConflictError,
    DeadlineExceededError,
    KVStoreError,
    MethodNotAllowedError,
    NoRouteError,
    NotFoundError,
    NotLeaderError,
    PayloadTooLargeError,
    PreconditionFailedError,
    RequestTimeoutError,
    SessionExpiredError,
    UnauthenticatedError,
    http_status,
)
from kvstore.kv.commands import (
    UINT64_MAX,
    Delete,
    Put,
    RequestId,
    WriteError,
    WriteResult,
    parse_request_id,
)
from kvstore.server.auth import AuthGate
from kvstore.server.connections import ClientServer, ConnectionLimits, limits_from_config
from kvstore.server.driver import Driver
from kvstore.server.logthrottle import LogThrottle, clip
from kvstore.server.openapi import openapi_document

logger = logging.getLogger("kvstore.server.http")

# C0 controls, DEL and C1 controls (U+0080..U+009F, e.g. U+0085 NEXT LINE): never in a key.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A "%" not followed by two hex digits: malformed, and ambiguous if kept literally.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# `"N"`, `W/"N"` or a bare N (ETags are the quoted mod_revision).
_IF_MATCH = re.compile(r'(?:W/)?"([0-9]+)"|([0-9]+)')
_UINT_DIGITS_MAX = 20  # UINT64_MAX has 20 digits; longer text is refused before int()
_QUERY_FIELDS_MAX = 16
_LIST_LIMIT_MAX = 10_000
_JSON = "application/json"
_KEY_METHODS = "GET, HEAD, PUT, DELETE"

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


# Why a write did not take effect -> the error its answer carries.
_WRITE_ERRORS: dict[WriteError, type[KVStoreError]] = {
    WriteError.SESSION_EXPIRED: SessionExpiredError,
    WriteError.NOT_FOUND: NotFoundError,
    WriteError.PRECONDITION_FAILED: PreconditionFailedError,
    WriteError.LEASE_NOT_FOUND: NotFoundError,
    WriteError.LEASE_EXISTS: ConflictError,
    WriteError.FUTURE_REVISION: BadRequestError,
    WriteError.AUTH_NOT_FOUND: NotFoundError,
}
_WRITE_MESSAGES: dict[WriteError, str] = {
    WriteError.SESSION_EXPIRED: "the request id is older than the client's session remembers; "
    "not applied now, and whether an earlier attempt applied is unknown",
    WriteError.NOT_FOUND: "no such key",
    WriteError.PRECONDITION_FAILED: "the condition on the key's revision did not hold",
    WriteError.LEASE_NOT_FOUND: "no such lease",
    WriteError.LEASE_EXISTS: "a lease with that id exists",
    WriteError.FUTURE_REVISION: "the revision is beyond the store's",
    WriteError.AUTH_NOT_FOUND: "no such user, role or token (a user's roles must exist first)",
}


def _uint(text: str, name: str, maximum: int = UINT64_MAX, minimum: int = 0) -> int:
    """A decimal integer in minimum..maximum, or BadRequestError naming `name`. The length
    check comes first: int() of thousands of digits raises ValueError (and costs quadratic
    time)."""
    if 0 < len(text) <= _UINT_DIGITS_MAX and text.isascii() and text.isdigit():
        value = int(text)
        if minimum <= value <= maximum:
            return value
    raise BadRequestError(f"{name} must be an integer in {minimum}..{maximum}")


def _decode(text: str, what: str) -> str:
    """Percent-decode `text` strictly (UTF-8); BadRequestError for a bad escape or bytes."""
    if "%" not in text:
        return text
    if _BAD_ESCAPE.search(text):
        raise BadRequestError(f"{what} has a malformed percent-escape")
    try:
        return urllib.parse.unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"{what} is not valid UTF-8 once percent-decoded") from exc


def _path(request: web.BaseRequest) -> str:
    return _decode(request.rel_url.raw_path, "the path")


def _query(request: web.BaseRequest) -> dict[str, str]:
    """The query parameters, strictly decoded (UTF-8, '+' is a space); the first of
    repeated names wins."""
    raw = request.rel_url.raw_query_string
    if not raw:
        return {}
    if _BAD_ESCAPE.search(raw):
        raise BadRequestError("the query has a malformed percent-escape")
    try:
        pairs = urllib.parse.parse_qsl(
            raw, keep_blank_values=True, errors="strict", max_num_fields=_QUERY_FIELDS_MAX
        )
    except UnicodeDecodeError as exc:
        raise BadRequestError("the query is not valid UTF-8 once percent-decoded") from exc
    except ValueError as exc:
        raise BadRequestError(f"the query has over {_QUERY_FIELDS_MAX} fields") from exc
    query: dict[str, str] = {}
    for name, value in pairs:
        query.setdefault(name, value)
    return query


def _check_no_lone_surrogates(document: object) -> None:
    """400 if a string of a parsed JSON document holds a lone surrogate: JSON's `\\ud800`
    escape parses into a str that is no text (UTF-8 cannot encode it), which would fail
    deep inside (a key, a role's prefix) instead of here. Iterative: the parser bounds the
    depth, this does not recurse at all."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadRequestError(
                        "the body's JSON has a string with a lone surrogate (\\ud800-\\udfff),"
                        " which is no character"
                    ) from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_key(key: str, max_key_bytes: int) -> str:
    """`key` (already percent-decoded) if it may name a key; BadRequestError otherwise. The
    HTTP API and the binary stream (kvstore/server/stream.py) check keys here."""
    if len(key) > max_key_bytes or len(key.encode()) > max_key_bytes:
        raise BadRequestError(f"key is over {max_key_bytes} bytes")
    if _CONTROL.search(key):
        raise BadRequestError("key contains control characters")
    return key


def raise_for_result(result: WriteResult) -> None:
    """Raise the error of a write the state machine refused (nothing when it applied)."""
    if result.ok:
        return
    assert result.error is not None, "a refused write says why"
    refusal = WriteError(result.error)
    error = _WRITE_ERRORS[refusal](_WRITE_MESSAGES[refusal])
    if isinstance(error, PreconditionFailedError):
        error.current_revision = result.current_revision
    raise error


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(), status=status, content_type=_JSON, headers=headers
    )


def put_document(key: str, result: WriteResult) -> dict[str, Any]:
    """The answer to a put that succeeded, over HTTP and the binary stream alike."""
    kv = result.key_value
    assert kv is not None, "a put that succeeded carries the key's revisions"
    return {
        "key": key,
        "revision": result.revision,
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    }


def delete_document(key: str, result: WriteResult) -> dict[str, Any]:
    """The answer to a delete that succeeded, over HTTP and the binary stream alike."""
    return {"key": key, "revision": result.revision, "deleted": True}


def build_command(factory: Any, **fields: Any) -> Any:
    """Build a Put or Delete; the command validates itself (ValueError -> 400)."""
    try:
        return factory(**fields)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc


class HttpApi:
    """The aiohttp application of one node."""

    def __init__(self, driver: Driver, cluster_id: str) -> None:
        self.driver = driver
        self.config = driver.config
        self.cluster_id = cluster_id
        # The slot this node was started as (`--id`); its member id after a lost disk differs.
        self.member_name = str(self.config.id)
        self.metrics = driver.metrics
        self.throttle = LogThrottle(logger)
        self._body_timeout_s = self.config.client_body_timeout_ms / 1000
        self._node_header = str(self.config.id)
        self._latency: dict[tuple[str, str], Any] = {}
        self._key_routes: dict[str, Handler] = {
            "GET": self.get_key,
            "HEAD": self.get_key,
            "PUT": self.put_key,
            "DELETE": self.delete_key,
        }
        self._plain_routes: dict[tuple[str, str], Handler] = {
            ("/healthz", "GET"): self.healthz,
            ("/readyz", "GET"): self.readyz,
            ("/v1/status", "GET"): self.status,
            ("/metrics", "GET"): self.metrics_text,
            ("/v1/openapi.json", "GET"): self.openapi,
            ("/v1/kv", "GET"): self.list_keys,
        }
        self._prefix_routes: dict[tuple[str, str], Handler] = {}
        # Client authentication and authorization (kvstore/server/auth.py); None: off.
        self.auth_gate: AuthGate | None = None

    def add_prefix_routes(self, routes: dict[tuple[str, str], Handler]) -> None:
        """Serve routes whose path starts with a prefix ((prefix, method) -> handler; the
        route's name for metrics and auth is the prefix + "{name}"): /v1/auth/users/NAME."""
        self._prefix_routes.update(routes)

    def add_routes(self, routes: dict[tuple[str, str], Handler]) -> None:
        """Serve more plain routes ((path, method) -> handler): the coordination API
        (kvstore/server/coordination.py, watch.py) registers its own this way."""
        self._plain_routes.update(routes)

    def build_server(self, limits: ConnectionLimits | None = None) -> ClientServer:
        """aiohttp's low-level server with our own dispatch (the Application router and
        middleware chain cost more CPU per request than the handlers themselves), bounded
        by `limits` (default: the configured ones, see kvstore/server/connections.py)."""
        limit = self.config.max_body_bytes

        def request_factory(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> web.BaseRequest:
            return web.BaseRequest(
                message, payload, protocol, writer, task, protocol._loop, client_max_size=limit
            )

        return ClientServer(
            self.handle,
            limits=limits or limits_from_config(self.config),
            metrics=self.metrics,
            throttle=self.throttle,
            request_factory=request_factory,
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Dispatch one request, map errors to HTTP, add the node headers, time it."""
        started = time.perf_counter()
        route = "unmatched"
        try:
            route, handler = self._route(request)
            if self.auth_gate is not None:
                request["kvstore_user"] = self.auth_gate.check(request, route, _path(request))
            response = await handler(request)
        except KVStoreError as exc:
            response = self._error_response(request, exc)
        except TimeoutError:
            response = self._error_response(
                request,
                DeadlineExceededError(
                    "the deadline passed before an answer; a write's outcome is unknown",
                    outcome_unknown=True,
                ),
            )
        except web.HTTPRequestEntityTooLarge:
            response = self._error_response(
                request, PayloadTooLargeError("the request body is over the limit")
            )
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away: nobody to answer
        except Exception as exc:  # a bug of ours: a JSON 500, logged without flooding
            self.throttle.log(
                "handler_exception",
                logging.ERROR,
                "event=internal_error route=%s method=%s error=%s",
                route,
                clip(request.method),
                clip(exc),
                exc_info=exc,
            )
            response = _json(KVStoreError("internal error").to_json(), status=500)
        if response.prepared:
            return response  # a WebSocket (the binary stream): its headers went long ago
        response.headers["Kvstore-Node"] = self._node_header
        response.headers["Kvstore-Leader"] = self.driver.leader_url() or ""
        histogram = self._latency.get((route, request.method))
        if histogram is None:
            histogram = self.metrics.request_seconds.labels(route=route, method=request.method)
            self._latency[(route, request.method)] = histogram
        histogram.observe(time.perf_counter() - started)
        return response

    def _route(self, request: web.BaseRequest) -> tuple[str, Handler]:
        path, method = _path(request), request.method
        if path.startswith("/v1/kv/") and len(path) > 7:
            handler = self._key_routes.get(method)
            route = "/v1/kv/{key}"
        else:
            handler = self._plain_routes.get((path, method))
            route = path
            if handler is None and self._prefix_routes:
                for (prefix, route_method), candidate in self._prefix_routes.items():
                    if route_method == method and path.startswith(prefix) and path != prefix:
                        return prefix + "{name}", candidate
        if handler is None:
            if path.startswith("/v1/kv/") and method in self._key_routes:
                raise BadRequestError("the key is empty")
            if path.startswith("/v1/kv/"):
                raise MethodNotAllowedError(
                    f"{clip(method, 20)} is not allowed on a key", allow=_KEY_METHODS
                )
            allowed = [m for (p, m) in self._plain_routes if p == path]
            if allowed:
                raise MethodNotAllowedError(
                    f"{clip(method, 20)} is not allowed on {path}", allow=", ".join(allowed)
                )
            raise NoRouteError(f"no route {clip(path, 80)}")
        return route, handler

    def _error_response(self, request: web.BaseRequest, error: KVStoreError) -> web.Response:
        body = error.to_json()
        detail = body["error"]
        assert isinstance(detail, dict)
        detail.setdefault("leader", self.driver.leader_url())
        headers: dict[str, str] = {}
        status = http_status(error)
        if isinstance(error, NotLeaderError) and error.leader_url:
            # Writes on a follower: 307 to the leader's same URL, so `curl -L` works.
            status = 307
            headers["Location"] = error.leader_url.rstrip("/") + request.path_qs
        if isinstance(error, ClusterError) and error.retry_after_s is not None:
            # The header has whole seconds only (for curl); the body has the precise
            # retry_after_ms (to_json).
            headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
        if isinstance(error, MethodNotAllowedError):
            headers["Allow"] = error.allow
        if isinstance(error, UnauthenticatedError):
            headers["WWW-Authenticate"] = 'Bearer realm="kvstore"'

        if status < 500 and self.throttle.logger.isEnabledFor(logging.DEBUG):
            self.throttle.log(
                "client_error",
                logging.DEBUG,
                "event=client_error status=%d code=%s method=%s path=%s message=%s",
                status,
                error.code,
                clip(request.method, 20),
                clip(request.rel_url.raw_path),
                clip(error.message),
            )
        response = _json(body, status=status, headers=headers)
        if isinstance(error, RequestTimeoutError):
            response.force_close()  # the rest of the body may still come: drop it
        return response

    # --- validation ---------------------------------------------------------------------

    def _key(self, request: web.BaseRequest) -> str:
        return check_key(_path(request)[7:], self.config.max_key_bytes)  # after "/v1/kv/"

    def _request_id(self, request: web.BaseRequest) -> tuple[RequestId, int, bool]:
        """(request id, acked_below, server_made) for a write."""
        # Checked even where it is not used (no request id): malformed input is always 400.
        acked_below = _uint(request.headers.get("Kvstore-Acked-Below", "0"), "Kvstore-Acked-Below")
        header = request.headers.get("Kvstore-Request-Id")
        if header is None:
            request_id, server_acked_below = self.driver.new_request_id()
            return request_id, server_acked_below, True
        return parse_request_id(header), acked_below, False

    @staticmethod
    def _conditions(request: web.BaseRequest) -> tuple[int | None, bool]:
        if_match = request.headers.get("If-Match")
        if_none_match = request.headers.get("If-None-Match")
        if if_match is not None and if_none_match is not None:
            raise BadRequestError("use either If-Match or If-None-Match, not both")
        if if_none_match is not None:
            if if_none_match.strip() != "*":
                raise BadRequestError('If-None-Match supports only "*" (create only)')
            return None, True
        if if_match is None:
            return None, False
        match = _IF_MATCH.fullmatch(if_match.strip())
        if match is None:
            raise BadRequestError(
                'If-Match must be a revision number N, "N" or W/"N" (0 = the key is absent)'
            )
        return _uint(match.group(1) or match.group(2), "If-Match"), False

    async def json_body(self, request: web.BaseRequest) -> dict[str, Any]:
        """The JSON object body of an API request (aiohttp bounds its size by
        max_body_bytes: 413 beyond), read as `_body` reads a value; an empty body is {}."""
        raw = await self._read_body(request)
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequestError(f"the body is not JSON: {exc}") from exc
        except RecursionError:
            raise BadRequestError("the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise BadRequestError("the body must be a JSON object")
        _check_no_lone_surrogates(body)
        return body

    async def _body(self, request: web.BaseRequest) -> bytes:
        limit = self.config.max_value_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLargeError(f"value is over {limit} bytes")
        body = await self._read_body(request)
        if len(body) > limit:
            raise PayloadTooLargeError(f"value is over {limit} bytes")
        return body

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        """The request's body, within the body timeout unless it has all arrived."""
        try:
            if request.content.is_eof():
                # The whole body has arrived (a small value comes with its head): reading it
                # cannot wait, so no timer is armed for it.
                body = await request.read()
            else:
                async with asyncio.timeout(self._body_timeout_s):
                    body = await request.read()
        except (HttpProcessingError, web.RequestPayloadError) as exc:
            raise BadRequestError("the request body is malformed") from exc
        except TimeoutError as exc:
            self.metrics.client_connections_closed.labels(reason="body_timeout").inc()
            raise RequestTimeoutError(
                f"the body did not arrive within {self.config.client_body_timeout_ms} ms"
            ) from exc
        return body

    # --- key-value ----------------------------------------------------------------------

    async def put_key(self, request: web.BaseRequest) -> web.Response:
        key = self._key(request)
        if_revision, create_only = self._conditions(request)
        lease = _uint(_query(request).get("lease", "0"), "lease", (1 << 63) - 1)
        if self.driver.leader_pending():
            await self.driver.wait_for_leader()
        self.driver.check_writable()
        value = await self._body(request)
        request_id, acked_below, server_made = self._request_id(request)
        try:
            command = build_command(
                Put,
                key=key,
                value=value,
                request=request_id,
                time_ms=int(time.time() * 1000),
                if_revision=if_revision,
                create_only=create_only,
                acked_below=acked_below,
                lease=lease,
            )
            result = await self.driver.write(command, request_id)
        finally:
            if server_made:
                self.driver.release_request_id(request_id)
        self._raise_for_result(result)
        return _json(put_document(key, result))

    async def delete_key(self, request: web.BaseRequest) -> web.Response:
        key = self._key(request)
        if_revision, create_only = self._conditions(request)
        if create_only:
            raise BadRequestError("If-None-Match makes no sense on DELETE")
        if self.driver.leader_pending():
            await self.driver.wait_for_leader()
        self.driver.check_writable()
        request_id, acked_below, server_made = self._request_id(request)
        try:
            command = build_command(
                Delete,
                key=key,
                request=request_id,
                time_ms=int(time.time() * 1000),
                if_revision=if_revision,
                acked_below=acked_below,
            )
            result = await self.driver.write(command, request_id)
        finally:
            if server_made:
                self.driver.release_request_id(request_id)
        self._raise_for_result(result)
        return _json(delete_document(key, result))

    @staticmethod
    def _raise_for_result(result: WriteResult) -> None:
        raise_for_result(result)

    async def _barrier(self, request: web.BaseRequest) -> str:
        consistency = _query(request).get("consistency", "linearizable")
        if consistency == "linearizable":
            if not self.config.unsafe_local_reads:
                if self.driver.leader_pending():
                    await self.driver.wait_for_leader()
                await self.driver.read_barrier()
        elif consistency != "stale":
            raise BadRequestError("consistency must be linearizable or stale")
        self.metrics.reads.labels(consistency=consistency).inc()
        return consistency

    async def get_key(self, request: web.BaseRequest) -> web.Response:
        key = self._key(request)
        revision = _uint(_query(request).get("revision", "0"), "revision")
        await self._barrier(request)
        state_machine = self.driver.replica.state_machine
        kv = state_machine.get(key) if not revision else state_machine.get_at(key, revision)
        if kv is None:
            raise NotFoundError("no such key")
        return web.Response(
            body=kv.value,
            content_type="application/octet-stream",
            headers={
                "Kvstore-Revision": str(state_machine.revision),
                "Kvstore-Create-Revision": str(kv.create_revision),
                "Kvstore-Mod-Revision": str(kv.mod_revision),
                "Kvstore-Version": str(kv.version),
                "ETag": f'"{kv.mod_revision}"',
            },
        )

    async def list_keys(self, request: web.BaseRequest) -> web.Response:
        query = _query(request)
        prefix = query.get("prefix", "")
        if _CONTROL.search(prefix) or len(prefix.encode()) > self.config.max_key_bytes:
            raise BadRequestError(
                f"prefix must be at most {self.config.max_key_bytes} bytes without control "
                "characters"
            )
        limit = _uint(query.get("limit", "1000"), "limit", _LIST_LIMIT_MAX, minimum=1)
        start = query.get("start", "")
        if _CONTROL.search(start) or len(start.encode()) > self.config.max_key_bytes:
            raise BadRequestError("start must be a key (a list's `next`)")
        revision = _uint(query.get("revision", "0"), "revision")
        await self._barrier(request)
        state_machine = self.driver.replica.state_machine
        if revision:
            items, following = state_machine.range_at(prefix, limit, start, revision)
        else:
            items, following = state_machine.range(prefix, limit, start)
        return _json(
            {
                "revision": revision or state_machine.revision,
                "items": [
                    {
                        "key": kv.key,
                        "value": base64.b64encode(kv.value).decode("ascii"),
                        "create_revision": kv.create_revision,
                        "mod_revision": kv.mod_revision,
                        "version": kv.version,
                    }
                    for kv in items
                ],
                "more": following is not None,
                "next": following,
            }
        )

    # --- operations ---------------------------------------------------------------------

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        return _json({"ok": True, "id": self.config.id})

    async def readyz(self, request: web.BaseRequest) -> web.Response:
        status = self.driver.status()
        applied = self.driver.applied_index()
        ready = status.leader_id != 0 and applied >= status.commit_index
        body = {
            "ready": ready,
            "leader_id": status.leader_id,
            "applied_index": applied,
            "commit_index": status.commit_index,
        }
        return _json(body, status=200 if ready else 503)

    async def status(self, request: web.BaseRequest) -> web.Response:
        return _json(self.status_document())

    def status_document(self) -> dict[str, Any]:
        status = self.driver.status()
        document: dict[str, Any] = {
            "id": self.config.id,
            "name": self.member_name,
            "cluster_id": self.cluster_id,
            "role": status.role.value,
            "term": status.term,
            "leader_id": status.leader_id,
            "leader_url": self.driver.leader_url(),
            "commit_index": status.commit_index,
            "applied_index": self.driver.applied_index(),
            "last_index": status.last_index,
            "disk_full": self.driver.disk_full,
            "voters": list(status.conf_state.voters),
            "learners": list(status.conf_state.learners),
        }
        if self.config.unsafe_local_reads:
            document["unsafe_local_reads"] = True
        if status.progress:
            document["peers"] = {
                str(peer): {
                    "match_index": progress.match_index,
                    "next_index": progress.next_index,
                    "lag": max(0, status.last_index - progress.match_index),
                    "state": getattr(progress.state, "value", str(progress.state)),
                }
                for peer, progress in status.progress.items()
                if peer != self.config.id
            }
        return document

    async def metrics_text(self, request: web.BaseRequest) -> web.Response:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def openapi(self, request: web.BaseRequest) -> web.Response:
        return _json(openapi_document())
