"""The binary stream transport: the client's pipelined path to a node, with HTTP beside it.

`StreamTransport` is a `Transport` (kvstore.client.transport) that sends the key operations
(`PUT`, `DELETE` and `GET` of `/v1/kv/<key>`) over one WebSocket per node (`GET /v1/stream`,
msgpack frames: the protocol is described in kvstore/server/stream.py), many requests in
flight at once, every request queued in one turn of the event loop sent in one message; and
everything else (lists, status, health, a value too large for one message) over HTTP with
the `AiohttpTransport` it wraps. Its answers are the same `HttpResponse`s, so the retry
loop, request ids and error classification of kvstore.client.core do not know which path a
call took.

Rules that hold here:
- a node that answers the upgrade with HTTP (an older node, one that does not offer the
  stream, or one that refuses the token: 401) is used over HTTP from then on, for
  `_HTTP_ONLY_S`, then asked again;
- the client's token goes on the upgrade request (`Authorization: Bearer`); the node checks
  each operation on the stream against that token's user, as it checks HTTP requests;
- a connection that fails fails every request waiting on it with `TransportError
  (maybe_sent=True)`: the client retries them with their request ids, so each applies once;
- a dial that is refused raises `TransportError(maybe_sent=False)`, as over HTTP;
- each request waits at most its `timeout_s`; its late answer is dropped; a dial waits at
  most `_DIAL_TIMEOUT_MIN_S` (or twice the connect timeout), an open stream is pinged;
- one writer and one reader task per connection, owned by it, cancelled when it closes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any
from urllib.parse import unquote

import aiohttp
import msgpack

from kvstore.client.transport import AiohttpTransport, HttpResponse, TransportError

# A node that refused the upgrade is asked again after this long.
_HTTP_ONLY_S = 30.0
# Requests per message, and bytes of values per message, before another message is started:
# under the node's bounds (kvstore/server/stream.py: 1024 requests, 1 MiB + 64 KiB).
_BATCH_MAX = 512
_BATCH_BYTES_MAX = 256 * 1024
# Values larger than this go over HTTP (one message must hold one value with room to spare).
_STREAM_VALUE_BYTES_MAX = 512 * 1024
_KEY_PREFIX = "/v1/kv/"
# The upgrade must complete within this (or twice the connect timeout, if longer).
_DIAL_TIMEOUT_MIN_S = 1.0
# Pings on an open stream: a connection whose node stopped answering them is closed (its
# requests fail and are retried elsewhere) instead of holding new requests until they time out.
_HEARTBEAT_S = 10.0
# Standby streams: how often, at most, the endpoints without an open stream are dialled again
# (in the background, on the next request after this long).
_STANDBY_CHECK_S = 1.0
# What a stream request carries; a key operation with any other header goes over HTTP.
_STREAM_HEADERS = frozenset(
    {"Kvstore-Request-Id", "Kvstore-Acked-Below", "If-Match", "If-None-Match"}
)


class _Connection:
    """One WebSocket to one node and the requests waiting on it."""

    def __init__(self, endpoint: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.endpoint = endpoint
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[HttpResponse]] = {}
        self.outbox: list[list[Any]] = []
        self.outbox_bytes = 0
        self.outbox_ready = asyncio.Event()
        self.closed = False
        self.tasks = (
            asyncio.ensure_future(self._read()),
            asyncio.ensure_future(self._write()),
        )

    def send(self, frame: list[Any], size: int) -> asyncio.Future[HttpResponse]:
        answer_id = next(self.ids)
        frame[0] = answer_id
        future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
        self.waiting[answer_id] = future
        self.outbox.append(frame)
        self.outbox_bytes += size
        self.outbox_ready.set()
        return future

    def forget(self, future: asyncio.Future[HttpResponse]) -> None:
        """The request stopped waiting (timeout, cancelled): drop its late answer."""
        for answer_id, waiting in list(self.waiting.items()):
            if waiting is future:
                del self.waiting[answer_id]
                return

    async def _write(self) -> None:
        try:
            while not self.closed:
                await self.outbox_ready.wait()
                self.outbox_ready.clear()
                while self.outbox:
                    batch = self._take_batch()
                    await self.ws.send_bytes(msgpack.packb(batch, use_bin_type=True))
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            self.fail(f"{self.endpoint}: stream write failed: {exc}")

    def _take_batch(self) -> list[list[Any]]:
        """The next message's requests: all queued, or as many as the bounds allow."""
        outbox = self.outbox
        if len(outbox) <= _BATCH_MAX and self.outbox_bytes <= _BATCH_BYTES_MAX:
            self.outbox, self.outbox_bytes = [], 0
            return outbox
        batch: list[list[Any]] = []
        size = 0
        while outbox and len(batch) < _BATCH_MAX and (not batch or size < _BATCH_BYTES_MAX):
            frame = outbox.pop(0)
            batch.append(frame)
            size += _frame_size(frame)
        self.outbox_bytes = max(0, self.outbox_bytes - size)
        return batch

    async def _read(self) -> None:
        reason = "closed by the node"
        try:
            async for message in self.ws:
                if message.type is not aiohttp.WSMsgType.BINARY:
                    reason = f"unexpected {message.type.name} message"
                    break
                self._dispatch(msgpack.unpackb(message.data, raw=False, use_list=True))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            reason = f"malformed answer: {exc}"
        except (ConnectionError, aiohttp.ClientError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        self.fail(f"{self.endpoint}: stream {reason}")

    def _dispatch(self, answers: object) -> None:
        if not isinstance(answers, list):
            raise ValueError("an answer message must be an array")
        for answer in answers:
            if not isinstance(answer, list) or len(answer) != 4:
                raise ValueError(f"an answer must be [id, status, headers, body]: {answer!r}")
            answer_id, status, headers, body = answer
            future = self.waiting.pop(answer_id, None)
            if future is None or future.done():
                continue  # its request stopped waiting (or id 0: the node refused a message)
            if not isinstance(status, int) or not isinstance(headers, dict):
                raise ValueError(f"malformed answer {answer!r}")
            future.set_result(HttpResponse(status, headers, bytes(body or b"")))

    def fail(self, reason: str) -> None:
        """The connection is gone: every request waiting on it may or may not have applied."""
        self.closed = True
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(TransportError(reason, maybe_sent=True))
        self.outbox_ready.set()

    async def close(self) -> None:
        self.fail(f"{self.endpoint}: stream closed by the client")
        with suppress(Exception):
            await self.ws.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with suppress(asyncio.CancelledError, Exception):
                await task


class _AnswerTimeout(Exception):
    """Set on a request's future when its timeout passes first (`StreamTransport.request`)."""


def _time_out(future: asyncio.Future[HttpResponse]) -> None:
    if not future.done():
        future.set_exception(_AnswerTimeout())


def _frame_size(frame: list[Any]) -> int:
    return sum(len(part) for part in frame if isinstance(part, bytes | str)) + 16


class StreamTransport:
    """`Transport` over one WebSocket per node for key operations, HTTP for the rest."""

    def __init__(
        self,
        http: AiohttpTransport,
        *,
        connect_timeout_s: float = 0.5,
        token: str = "",
        standby: Sequence[str] = (),
    ) -> None:
        self._http = http
        # Endpoints whose streams are kept open while the client is in use, whichever node
        # it talks to: when the leader changes, the new leader's stream is already open
        # (a dial costs an upgrade exchange, several milliseconds on a busy node, on the
        # failover's critical path). Dialled in the background, at most every
        # `_STANDBY_CHECK_S` per endpoint, from `request`.
        self._standby = tuple(standby)
        self._standby_due = 0.0
        # Sent on the upgrade: the node checks each operation on the stream for its user. A
        # request with another Authorization header than this goes over HTTP.
        self._authorization = f"Bearer {token}" if token else None
        self._connect_timeout_s = connect_timeout_s
        self._dial_timeout_s = max(_DIAL_TIMEOUT_MIN_S, 2 * connect_timeout_s)
        self._connections: dict[str, _Connection] = {}
        self._connecting: dict[str, asyncio.Future[_Connection | None]] = {}
        # Nodes that answered the upgrade with HTTP: until when to use HTTP only.
        self._http_only_until: dict[str, float] = {}
        self.streamed = 0

    async def request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout_s: float,
    ) -> HttpResponse:
        if self._standby and time.monotonic() >= self._standby_due:
            self._tend_standby()
        frame = _frame(method, path, query, headers, body, self._authorization)
        if frame is None or self._http_only_until.get(endpoint, 0.0) > time.monotonic():
            return await self._http.request(
                endpoint, method, path, query=query, headers=headers, body=body,
                timeout_s=timeout_s,
            )  # fmt: skip
        connection = self._connections.get(endpoint)
        if connection is None or connection.closed:
            connection = await self._connect(endpoint, timeout_s)
            if connection is None:
                return await self._http.request(
                    endpoint, method, path, query=query, headers=headers, body=body,
                    timeout_s=timeout_s,
                )  # fmt: skip
        future = connection.send(frame, len(body or b"") + len(path) + 64)
        self.streamed += 1
        # One timer on the answer's own future: asyncio.wait_for wraps it in another future
        # and callbacks, a tenth of the client's CPU per request at 256 writers.
        timer = asyncio.get_running_loop().call_later(timeout_s, _time_out, future)
        try:
            return await future
        except _AnswerTimeout as exc:
            raise TransportError(
                f"{endpoint}: no answer within {timeout_s:.3f}s", maybe_sent=True, timed_out=True
            ) from exc
        finally:
            timer.cancel()
            if not future.done() or future.cancelled() or isinstance(
                future.exception(), _AnswerTimeout
            ):
                connection.forget(future)

    def _tend_standby(self) -> None:
        """Dial, in the background, every standby endpoint without an open stream, a dial
        under way, or a refusal of the stream (it is used over HTTP). A dial that fails is
        tried again at the next check; a request that needs the stream meanwhile waits for
        the dial under way, as it would for its own."""
        now = time.monotonic()
        self._standby_due = now + _STANDBY_CHECK_S
        for endpoint in self._standby:
            connection = self._connections.get(endpoint)
            if (
                (connection is not None and not connection.closed)
                or endpoint in self._connecting
                or self._http_only_until.get(endpoint, 0.0) > now
            ):
                continue
            self._start_dial(endpoint)

    def _start_dial(self, endpoint: str) -> asyncio.Future[_Connection | None]:
        pending = asyncio.ensure_future(self._dial(endpoint))
        self._connecting[endpoint] = pending
        pending.add_done_callback(functools.partial(self._dialled, endpoint))
        return pending

    async def _connect(self, endpoint: str, timeout_s: float) -> _Connection | None:
        """The node's stream (dialled once for all the requests that wait for it), or None
        when the node answers the upgrade with HTTP (it is then used over HTTP)."""
        pending = self._connecting.get(endpoint)
        if pending is None:
            pending = self._start_dial(endpoint)
        try:
            return await asyncio.wait_for(asyncio.shield(pending), timeout_s)
        except TimeoutError as exc:
            raise TransportError(
                f"{endpoint}: stream not open within {timeout_s:.3f}s",
                maybe_sent=False, timed_out=True,
            ) from exc  # fmt: skip

    def _dialled(self, endpoint: str, dial: asyncio.Future[_Connection | None]) -> None:
        """A dial ended: forget it, and take its error (its waiters may all have timed out,
        and an error nobody took would be logged when the task is collected)."""
        self._connecting.pop(endpoint, None)
        if not dial.cancelled():
            dial.exception()

    async def _dial(self, endpoint: str) -> _Connection | None:
        session = self._http._get_session()
        try:
            # Bounded: a frozen node accepts the TCP connection and never answers the
            # upgrade; without a bound the dial would wait for it forever.
            async with asyncio.timeout(self._dial_timeout_s):
                ws = await session.ws_connect(
                    endpoint.rstrip("/") + "/v1/stream",
                    timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
                    autoping=True,
                    heartbeat=_HEARTBEAT_S,
                    max_msg_size=0,
                    compress=0,
                    headers=(
                        {"Authorization": self._authorization} if self._authorization else None
                    ),
                )
        except TimeoutError as exc:
            raise TransportError(
                f"{endpoint}: stream not open within {self._dial_timeout_s:.3f}s",
                maybe_sent=False, timed_out=True,
            ) from exc  # fmt: skip
        except aiohttp.WSServerHandshakeError:
            self._http_only_until[endpoint] = time.monotonic() + _HTTP_ONLY_S
            return None
        except aiohttp.ClientConnectorCertificateError as exc:
            # The node's certificate did not check out: nothing was sent.
            raise TransportError(
                f"{endpoint}: TLS: {exc.certificate_error}", maybe_sent=False
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            error = exc.os_error
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise TransportError(
                f"{endpoint}: cannot connect: {reason.lower()}", maybe_sent=False
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(
                f"{endpoint}: {type(exc).__name__}: {exc}", maybe_sent=False
            ) from exc
        old = self._connections.get(endpoint)
        connection = _Connection(endpoint, ws)
        self._connections[endpoint] = connection
        if old is not None:
            await old.close()
        return connection

    async def close(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            await connection.close()
        for pending in list(self._connecting.values()):
            pending.cancel()
        await self._http.close()


def _frame(
    method: str,
    path: str,
    query: Mapping[str, str] | None,
    headers: Mapping[str, str] | None,
    body: bytes | None,
    authorization: str | None = None,
) -> list[Any] | None:
    """The stream request for an HTTP-shaped key operation, or None when it goes over HTTP
    (also when it carries an Authorization other than the stream's, `authorization`)."""
    if not path.startswith(_KEY_PREFIX) or len(path) == len(_KEY_PREFIX):
        return None
    key = unquote(path[len(_KEY_PREFIX) :], errors="strict")
    headers = headers or {}
    if "Authorization" in headers:
        if headers["Authorization"] != authorization:
            return None
        headers = {name: value for name, value in headers.items() if name != "Authorization"}
    if set(headers) - _STREAM_HEADERS:
        return None  # something the stream does not carry (a lease, ...): over HTTP
    if method == "GET":
        if query and set(query) - {"consistency"}:
            return None
        return [0, "get", key, (query or {}).get("consistency", "linearizable")]
    if method not in ("PUT", "DELETE") or query or "Kvstore-Request-Id" not in headers:
        return None  # a query (a lease, ...) the stream does not carry: over HTTP
    if_match = headers.get("If-Match")
    if_revision = int(if_match) if if_match is not None and if_match.isdigit() else None
    if if_match is not None and if_revision is None:
        return None  # let the node answer it over HTTP
    request_id = headers["Kvstore-Request-Id"]
    acked_below_text = headers.get("Kvstore-Acked-Below", "0")
    if not acked_below_text.isdigit():
        return None
    acked_below = int(acked_below_text)
    if method == "DELETE":
        return [0, "delete", key, request_id, acked_below, if_revision]
    value = body or b""
    if len(value) > _STREAM_VALUE_BYTES_MAX:
        return None
    create_only = headers.get("If-None-Match") == "*"
    return [0, "put", key, value, request_id, acked_below, if_revision, create_only]
