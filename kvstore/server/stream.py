"""The binary stream: the client library's pipelined path, msgpack frames over one WebSocket
on the client port (`GET /v1/stream`), many requests in flight per connection.

HTTP/1.1 answers one request at a time per connection, and each costs the node a request
parse, a task and a response object; here one WebSocket message carries a batch of requests
and one message carries a batch of answers, and a write is answered from its future's
callback (`Driver.submit`), without a task of its own. HTTP stays for curl and everything
else; the client falls back to it where a node does not offer the stream.

A message from the client is a msgpack array of 1..`BATCH_MAX` requests:

    [id, "put", key, value, request_id, acked_below, if_revision, create_only]
    [id, "delete", key, request_id, acked_below, if_revision]
    [id, "get", key, consistency]

(`id` an integer the answer echoes; `key` and `request_id` strings, `value` bytes,
`if_revision` an integer or nil, `create_only` a boolean, `consistency` "linearizable" or
"stale"). A message from the node is a msgpack array of answers `[id, status, headers, body]`:
exactly the status, the (lower-case) headers the client reads and the body that the HTTP API
gives for the same request, errors included (kvstore/errors.py's registry), so the client's
retry loop, its exactly-once bookkeeping and its error classification are the same for both.

Bounds and checks (every one answers or closes, never grows without limit):
- the connection is one of the client port's connections (kvstore/server/connections.py
  bounds their number per source and in all);
- a message is at most `message_bytes_max` (aiohttp closes the connection with 1009 beyond),
  holds at most `BATCH_MAX` requests, and is read only while the connection has fewer than
  `IN_FLIGHT_MAX` requests not yet answered or whose answers are not yet sent, and fewer
  than `OUTBOX_BYTES_MAX` bytes of answers not yet sent (the client is not read meanwhile:
  TCP pushes back), so a client that does not read its answers stops being read;
- answers go out in messages of about `ANSWER_MESSAGE_BYTES` (one answer may be larger);
  a message the client does not take within the client body timeout (it reads nothing)
  cuts the connection (aborted: a socket whose peer never reads would never finish closing);
- a connection with nothing in flight and no message for the client idle timeout is closed;
- every field is type- and range-checked before use; a request that does not parse is
  answered 400 by id when it has one, and a message that does not parse at all closes the
  connection (1003 or 1007) after a last answer with id 0;
- every request waits at most the request timeout (the driver's deadlines), then 504.

Under `--auth` the upgrade request carries the credential (`Authorization: Bearer`, or the
TLS client certificate) and is refused 401 without a good one, as any HTTP request; each
operation is then checked as its HTTP request would be (read on a get's key, write on a put's
or delete's) and a forbidden one is answered 403 by its id (kvstore/server/auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack
from aiohttp import WSCloseCode, WSMsgType, web

from kvstore.errors import (
    BadRequestError,
    DeadlineExceededError,
    KVStoreError,
    NotFoundError,
    NotLeaderError,
    PayloadTooLargeError,
    UnauthenticatedError,
    http_status,
)
from kvstore.kv.commands import UINT64_MAX, Delete, Put, RequestId, WriteResult, parse_request_id
from kvstore.server.auth import StreamAuthorizer
from kvstore.server.http import (
    HttpApi,
    build_command,
    check_key,
    delete_document,
    put_document,
    raise_for_result,
)
from kvstore.server.logthrottle import clip

logger = logging.getLogger("kvstore.server.http")

# Requests in one message, and waiting for answers on one connection.
BATCH_MAX = 1024
IN_FLIGHT_MAX = 4096
# Bytes of answers waiting to be sent before the connection is no longer read, and the size
# at which an answer message is cut (the answers of one batch of gets of large values would
# otherwise make one message of up to BATCH_MAX values).
OUTBOX_BYTES_MAX = 8 << 20
ANSWER_MESSAGE_BYTES = 1 << 20
# Beside an answer's body: its id, status and headers, roughly.
_ANSWER_OVERHEAD_BYTES = 128
# Room for a message's framing and fields beside one value at the limit.
_MESSAGE_SLACK_BYTES = 64 * 1024
_MESSAGE_BYTES_MIN = 1 << 20
# How often a busy connection's reader looks again (it waits on answers, not on the client).
_BACKPRESSURE_CHECK_S = 0.05

Answer = list[Any]


def message_bytes_max(max_value_bytes: int) -> int:
    """The largest message a node reads: one value at the limit with room to spare."""
    return max(_MESSAGE_BYTES_MIN, max_value_bytes + _MESSAGE_SLACK_BYTES)


def _uint_field(value: object, name: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT64_MAX:
        raise BadRequestError(f"{name} must be an integer in 0..{UINT64_MAX}")
    return value


def _unpack_error(exc: Exception) -> str:
    """What was wrong with a message msgpack refused (some of its errors have no text)."""
    if isinstance(exc, msgpack.StackError):
        return "nested too deep"
    if isinstance(exc, msgpack.FormatError):
        return "a byte that is no msgpack type"
    return str(exc) or type(exc).__name__


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def _str_field(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequestError(f"{name} must be a string")
    return value


class StreamSession:
    """One client's stream: reads batches of requests, answers each as it completes."""

    def __init__(
        self,
        api: HttpApi,
        ws: web.WebSocketResponse,
        authorizer: StreamAuthorizer | None = None,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self._api = api
        # The connection's transport: aborted when the client stops taking answers.
        self._transport = transport
        # Under --auth: what checks each operation (read or write on its key), as HTTP does.
        self._authorizer = authorizer
        self._driver = api.driver
        self._config = api.config
        self._ws = ws
        self._loop = asyncio.get_running_loop()
        self._outbox: list[Answer] = []
        self._outbox_bytes = 0
        self._outbox_ready = asyncio.Event()
        self._in_flight = 0
        # Answers (count, bytes) of the message being sent now.
        self._sending = 0
        self._sending_bytes = 0
        self._send_timeout_s = self._config.client_body_timeout_ms / 1000
        # Requests waiting for a leader to be known (rare: an election is under way), each
        # a task owned here, cancelled when the connection ends.
        self._held: set[asyncio.Task[None]] = set()
        self._closed = False

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._write_answers())
        try:
            await self._read_requests()
        finally:
            self._closed = True
            for task in list(self._held):
                task.cancel()
            writer.cancel()
            try:
                await writer
            except asyncio.CancelledError:
                pass

    # --- reading ------------------------------------------------------------------------

    async def _read_requests(self) -> None:
        idle_s = self._config.client_idle_timeout_ms / 1000
        ws = self._ws
        while not ws.closed and not self._closed:
            if (
                self._in_flight + len(self._outbox) + self._sending >= IN_FLIGHT_MAX
                or self._outbox_bytes + self._sending_bytes >= OUTBOX_BYTES_MAX
            ):
                await asyncio.sleep(_BACKPRESSURE_CHECK_S)
                continue
            try:
                message = await ws.receive(timeout=idle_s)
            except TimeoutError:
                if self._in_flight == 0 and not self._outbox:
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"idle")
                    return
                continue
            if message.type is WSMsgType.BINARY:
                refusal = self._handle_message(message.data)
                if refusal is not None:
                    await self._refuse(*refusal)
                    return
            elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            elif message.type is WSMsgType.ERROR:
                logger.debug("event=stream_error error=%r", ws.exception())
                return
            else:  # TEXT: the protocol is binary
                await self._refuse(WSCloseCode.UNSUPPORTED_DATA, "messages must be binary msgpack")
                return

    def _handle_message(self, data: bytes) -> tuple[int, str] | None:
        """Start every request of one message; (close code, why) when the connection must
        close instead."""
        try:
            batch = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            return WSCloseCode.INVALID_TEXT, f"not msgpack: {_unpack_error(exc)}"
        if not isinstance(batch, list) or not 1 <= len(batch) <= BATCH_MAX:
            return (
                WSCloseCode.UNSUPPORTED_DATA,
                f"a message must be an array of 1..{BATCH_MAX} requests",
            )
        for request in batch:
            self._start(request)
        return None

    def _schedule(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def _refuse(self, code: int, message: str) -> None:
        """A last answer (id 0, 400) naming the problem, then close."""
        self._answer_error(0, BadRequestError(message))
        await self._flush()
        # A close frame's reason is at most 123 bytes.
        reason = message.encode()[:123].decode(errors="ignore").encode()
        await self._ws.close(code=code, message=reason)

    def _start(self, request: object) -> None:
        raw_id = request[0] if isinstance(request, list) and request else None
        answer_id = raw_id if _is_uint(raw_id) else 0
        assert isinstance(answer_id, int)
        self._in_flight += 1
        try:
            if not isinstance(request, list) or len(request) < 3:
                raise BadRequestError("a request must be [id, op, key, ...]")
            _uint_field(raw_id, "id")
            op = request[1]
            if op == "put":
                self._start_put(answer_id, request)
            elif op == "delete":
                self._start_delete(answer_id, request)
            elif op == "get":
                self._start_get(answer_id, request)
            else:
                raise BadRequestError("op must be put, delete or get")
        except KVStoreError as exc:
            self._answer_error(answer_id, exc)
        except Exception as exc:  # a bug of ours: a 500 by id keeps the stream's framing
            self._api.throttle.log(
                "stream_exception",
                logging.ERROR,
                "event=internal_error route=/v1/stream error=%s",
                clip(exc),
                exc_info=exc,
            )
            self._answer_error(answer_id, KVStoreError("internal error"))

    # --- the operations -----------------------------------------------------------------

    def _key(self, value: object, op: str, access: str) -> str:
        """The request's key, checked, once the stream's user may `access` it."""
        key = _str_field(value, "key")
        if not key:
            raise BadRequestError("the key is empty")
        key = check_key(key, self._config.max_key_bytes)
        if self._authorizer is not None:
            self._authorizer.check(op, access, key)
        return key

    def _write_fields(self, request: list[Any], first: int) -> tuple[RequestId, int, int | None]:
        request_id = parse_request_id(_str_field(request[first], "request_id"))
        acked_below = _uint_field(request[first + 1], "acked_below")
        if_revision = _uint_field(request[first + 2], "if_revision", optional=True)
        assert acked_below is not None
        return request_id, acked_below, if_revision

    def _start_put(self, answer_id: int, request: list[Any]) -> None:
        if len(request) != 8:
            raise BadRequestError(
                "put is [id, op, key, value, request_id, acked_below, if_revision, create_only]"
            )
        key = self._key(request[2], "put", "write")
        value = request[3]
        if not isinstance(value, bytes):
            raise BadRequestError("value must be bytes (msgpack bin)")
        if len(value) > self._config.max_value_bytes:
            raise PayloadTooLargeError(f"value is over {self._config.max_value_bytes} bytes")
        request_id, acked_below, if_revision = self._write_fields(request, 4)
        create_only = request[7]
        if not isinstance(create_only, bool):
            raise BadRequestError("create_only must be a boolean")
        if create_only and if_revision is not None:
            raise BadRequestError("use either if_revision or create_only, not both")
        command = build_command(
            Put,
            key=key,
            value=value,
            request=request_id,
            time_ms=int(time.time() * 1000),
            if_revision=if_revision,
            create_only=create_only,
            acked_below=acked_below,
        )
        self._submit(
            answer_id, command, request_id, lambda result: _json_bytes(put_document(key, result))
        )

    def _start_delete(self, answer_id: int, request: list[Any]) -> None:
        if len(request) != 6:
            raise BadRequestError("delete is [id, op, key, request_id, acked_below, if_revision]")
        key = self._key(request[2], "delete", "write")
        request_id, acked_below, if_revision = self._write_fields(request, 3)
        command = build_command(
            Delete,
            key=key,
            request=request_id,
            time_ms=int(time.time() * 1000),
            if_revision=if_revision,
            acked_below=acked_below,
        )
        self._submit(
            answer_id, command, request_id, lambda result: _json_bytes(delete_document(key, result))
        )

    def _submit(
        self,
        answer_id: int,
        command: Put | Delete,
        request_id: RequestId,
        body: Callable[[WriteResult], bytes],
    ) -> None:
        driver = self._driver
        if driver.leader_pending():
            self._schedule(self._held_write(answer_id, command, request_id, body))
            return
        future = driver.submit(command, request_id)

        def done(future: asyncio.Future[WriteResult]) -> None:
            self._answer_write(answer_id, future, body)

        if future.done():
            done(future)
        else:
            future.add_done_callback(done)

    async def _held_write(
        self,
        answer_id: int,
        command: Put | Delete,
        request_id: RequestId,
        body: Callable[[WriteResult], bytes],
    ) -> None:
        """A write reaching the node during an election: held until a leader is known (as
        over HTTP), then proposed here or answered not_leader with the winner's URL."""
        try:
            await self._driver.wait_for_leader()
            self._submit_now(answer_id, command, request_id, body)
        except KVStoreError as exc:
            self._answer_error(answer_id, exc)

    def _submit_now(
        self,
        answer_id: int,
        command: Put | Delete,
        request_id: RequestId,
        body: Callable[[WriteResult], bytes],
    ) -> None:
        future = self._driver.submit(command, request_id)
        future.add_done_callback(lambda done: self._answer_write(answer_id, done, body))

    def _answer_write(
        self,
        answer_id: int,
        future: asyncio.Future[WriteResult],
        body: Callable[[WriteResult], bytes],
    ) -> None:
        if future.cancelled():
            self._in_flight -= 1
            return
        error = future.exception()
        if error is None:
            result = future.result()
            try:
                raise_for_result(result)
            except KVStoreError as exc:
                self._answer_error(answer_id, exc)
                return
            self._answer(answer_id, 200, self._headers(), body(result))
        elif isinstance(error, KVStoreError):
            self._answer_error(answer_id, error)
        elif isinstance(error, TimeoutError):
            self._answer_error(
                answer_id,
                DeadlineExceededError(
                    "the deadline passed before an answer; a write's outcome is unknown",
                    outcome_unknown=True,
                ),
            )
        else:
            raise error  # a bug of ours: the loop's exception handler logs it

    def _start_get(self, answer_id: int, request: list[Any]) -> None:
        if len(request) != 4:
            raise BadRequestError("get is [id, op, key, consistency]")
        key = self._key(request[2], "get", "read")
        consistency = request[3]
        if consistency == "stale" or (
            consistency == "linearizable" and self._config.unsafe_local_reads
        ):
            self._api.metrics.reads.labels(consistency=consistency).inc()
            self._answer_get(answer_id, key)
            return
        if consistency != "linearizable":
            raise BadRequestError("consistency must be linearizable or stale")
        self._api.metrics.reads.labels(consistency=consistency).inc()
        if self._driver.leader_pending():
            self._schedule(self._held_read(answer_id, key))
            return
        self._read_when_ready(answer_id, key, self._driver.start_read())

    async def _held_read(self, answer_id: int, key: str) -> None:
        await self._driver.wait_for_leader()
        self._read_when_ready(answer_id, key, self._driver.start_read())

    def _read_when_ready(self, answer_id: int, key: str, future: asyncio.Future[None]) -> None:
        def done(future: asyncio.Future[None]) -> None:
            if future.cancelled():
                self._in_flight -= 1
                return
            error = future.exception()
            if error is None:
                self._answer_get(answer_id, key)
            elif isinstance(error, KVStoreError):
                self._answer_error(answer_id, error)
            elif isinstance(error, TimeoutError):
                self._answer_error(
                    answer_id, DeadlineExceededError("the deadline passed before an answer")
                )
            else:
                raise error

        future.add_done_callback(done)

    def _answer_get(self, answer_id: int, key: str) -> None:
        state_machine = self._driver.replica.state_machine
        kv = state_machine.get(key)
        if kv is None:
            self._answer_error(answer_id, NotFoundError("no such key"))
            return
        headers = self._headers()
        headers["kvstore-revision"] = str(state_machine.revision)
        headers["kvstore-create-revision"] = str(kv.create_revision)
        headers["kvstore-mod-revision"] = str(kv.mod_revision)
        headers["kvstore-version"] = str(kv.version)
        self._answer(answer_id, 200, headers, kv.value)

    # --- answering ----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"kvstore-leader": self._driver.leader_url() or ""}

    def _answer_error(self, answer_id: int, error: KVStoreError) -> None:
        body = error.to_json()
        detail = body["error"]
        assert isinstance(detail, dict)
        leader = self._driver.leader_url()
        detail.setdefault("leader", leader)
        status = http_status(error)
        headers = self._headers()
        if isinstance(error, NotLeaderError) and error.leader_url:
            status = 307
            headers["location"] = error.leader_url.rstrip("/")
        if isinstance(error, UnauthenticatedError):
            headers["www-authenticate"] = 'Bearer realm="kvstore"'
        self._answer(answer_id, status, headers, _json_bytes(body))

    def _answer(self, answer_id: int, status: int, headers: dict[str, str], body: bytes) -> None:
        self._in_flight -= 1
        if self._closed:
            return
        self._outbox.append([answer_id, status, headers, body])
        self._outbox_bytes += len(body) + _ANSWER_OVERHEAD_BYTES
        self._outbox_ready.set()

    async def _write_answers(self) -> None:
        """The connection's one writer: every answer ready since its last send goes out in
        one message."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            await self._flush()

    async def close(self) -> None:
        """Send the answers ready so far, then close the connection (going away)."""
        await self._flush()
        self._closed = True
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._ws.close(code=WSCloseCode.GOING_AWAY, message=b"node stopping")

    async def _flush(self) -> None:
        """Send every answer waiting, in messages of about ANSWER_MESSAGE_BYTES; cut the
        connection if the client does not take one within the send timeout."""
        while self._outbox and not self._ws.closed and not self._closed:
            answers, size = self._take_answers()
            # Answers being sent still count against the bounds until the send is done: a
            # client that takes nothing would otherwise have one more message's worth read.
            self._sending, self._sending_bytes = len(answers), size
            try:
                async with asyncio.timeout(self._send_timeout_s):
                    await self._ws.send_bytes(msgpack.packb(answers, use_bin_type=True))
            except TimeoutError:
                self._stalled()
                return
            except ConnectionError:
                self._closed = True
                return
            finally:
                self._sending = self._sending_bytes = 0

    def _take_answers(self) -> tuple[list[Answer], int]:
        """The next message's answers and their bytes, taken from the outbox."""
        outbox = self._outbox
        if self._outbox_bytes <= ANSWER_MESSAGE_BYTES:
            size = self._outbox_bytes
            self._outbox, self._outbox_bytes = [], 0
            return outbox, size
        size = count = 0
        while count < len(outbox) and (count == 0 or size < ANSWER_MESSAGE_BYTES):
            size += len(outbox[count][3]) + _ANSWER_OVERHEAD_BYTES
            count += 1
        answers, self._outbox = outbox[:count], outbox[count:]
        self._outbox_bytes -= size
        return answers, size

    def _stalled(self) -> None:
        """The client took no answer for the send timeout: abort the connection (closing it
        would wait for the unread bytes to drain, which never happens)."""
        logger.debug("event=stream_stalled send_timeout_s=%s", self._send_timeout_s)
        self._closed = True
        self._outbox, self._outbox_bytes = [], 0
        if self._transport is not None:
            self._transport.abort()


def _json_bytes(document: object) -> bytes:
    return json.dumps(document).encode()


class StreamSessions:
    """The node's open streams, so that a stopping node can end them (`close`)."""

    def __init__(self) -> None:
        self.open: set[StreamSession] = set()

    async def close(self) -> None:
        """End every open stream now (1001 going away), each after its answers ready so far.
        A stopping node calls it once its listener is closed and its writes are answered:
        aiohttp would otherwise hold the shutdown for its timeout while clients keep their
        streams, and a client learns at once that it must go elsewhere (the requests still
        waiting fail as a closed connection does: they are retried with their request ids)."""
        sessions, self.open = list(self.open), set()
        await asyncio.gather(*(session.close() for session in sessions))


def install(api: HttpApi) -> StreamSessions:
    """Serve the stream at `GET /v1/stream` on `api`'s client port; returns its sessions."""
    limit = message_bytes_max(api.config.max_value_bytes)
    heartbeat_s = max(1.0, api.config.client_idle_timeout_ms / 4000)
    sessions = StreamSessions()

    async def stream(request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            max_msg_size=limit, heartbeat=heartbeat_s, autoping=True, compress=False
        )
        if not ws.can_prepare(request).ok:
            raise BadRequestError(
                "GET /v1/stream is a WebSocket upgrade: it needs Upgrade: websocket, "
                "Connection: Upgrade, Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key of 16 "
                "bytes in base64"
            )
        gate = api.auth_gate
        # The upgrade itself passed the gate (HttpApi.handle): 401 without a good credential.
        authorizer = gate.stream_authorizer(request) if gate is not None else None
        await ws.prepare(request)
        session = StreamSession(api, ws, authorizer, request.transport)
        sessions.open.add(session)
        try:
            await session.run()
        finally:
            sessions.open.discard(session)
        return ws

    api.add_routes({("/v1/stream", "GET"): stream})
    return sessions
