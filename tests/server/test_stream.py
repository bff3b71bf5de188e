"""The binary stream (kvstore/server/stream.py) on a single-node driver: round trips, the
same answers as HTTP, exactly-once, and hostile input (every malformed field answered 400 by
id with the connection kept; undecodable, oversized or textual messages close it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from kvstore.kv.auth import AuthTable
from kvstore.raft.config import RaftConfig
from kvstore.replica import Replica
from kvstore.server import stream
from kvstore.server.auth import AuthGate, token_digest
from kvstore.server.config import ServeConfig
from kvstore.server.connections import ClientServer
from kvstore.server.driver import Driver
from kvstore.server.http import HttpApi
from kvstore.server.metrics import NodeMetrics
from kvstore.storage.memory import MemoryStorage


class Node:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        driver: Driver,
        api: HttpApi,
        server: ClientServer,
    ) -> None:
        self.session, self.url, self.driver, self.api = session, url, driver, api
        self.server = server

    async def connect(self, token: str = "") -> aiohttp.ClientWebSocketResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return await self.session.ws_connect(
            self.url + "/v1/stream", max_msg_size=0, headers=headers
        )


@pytest.fixture
async def node(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    config = ServeConfig(
        id=1, peers=((1, "127.0.0.1:1"),), data_dir=tmp_path, tick_interval_ms=1, **overrides
    )
    replica = Replica(
        RaftConfig(id=1, peers=(1,)), MemoryStorage(), random.Random(7), defer_snapshots=True
    )
    driver = Driver(config, replica, NodeMetrics(1), lambda message: None, lambda peer: None)
    task = asyncio.get_running_loop().create_task(driver.run())
    api = HttpApi(driver, "test")
    stream.install(api)
    server = api.build_server()
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    session = aiohttp.ClientSession()
    try:
        async with asyncio.timeout(10):
            while not driver.is_leader() or driver.applied_index() < 1:
                await asyncio.sleep(0.002)
        yield Node(session, url, driver, api, server)
    finally:
        await session.close()
        await runner.cleanup()
        driver.stop()
        await asyncio.wait_for(task, 5)
        driver.close()


async def exchange(
    ws: aiohttp.ClientWebSocketResponse, requests: list[Any], answers: int | None = None
) -> dict[int, list[Any]]:
    """Send one message of `requests`; the answers by id once all (or `answers`) came."""
    await ws.send_bytes(msgpack.packb(requests, use_bin_type=True))
    wanted = len(requests) if answers is None else answers
    got: dict[int, list[Any]] = {}
    async with asyncio.timeout(10):
        while len(got) < wanted:
            message = await ws.receive()
            assert message.type is aiohttp.WSMsgType.BINARY, message
            for answer in msgpack.unpackb(message.data, raw=False):
                got[answer[0]] = answer
    return got


def put(answer_id: int, key: Any, value: Any = b"v", request_id: Any = "c:1") -> list[Any]:
    return [answer_id, "put", key, value, request_id, 0, None, False]


def code(answer: list[Any]) -> str:
    return str(json.loads(answer[3])["error"]["code"])


async def test_put_get_delete_round_trip_with_the_http_answers(node: Node) -> None:
    ws = await node.connect()
    answers = await exchange(
        ws, [put(1, "a", b"1", "c:1"), put(2, "b", b"2", "c:2"), [3, "get", "zz", "stale"]]
    )
    assert answers[1][1] == 200 and answers[2][1] == 200
    assert b'"version": 1' in answers[1][3]
    assert answers[1][2]["kvstore-leader"] == node.driver.config.client_url
    assert answers[3][1] == 404 and code(answers[3]) == "not_found"
    got = await exchange(ws, [[4, "get", "a", "linearizable"], [5, "get", "b", "stale"]])
    assert got[4][1] == 200 and got[4][3] == b"1" and got[4][2]["kvstore-version"] == "1"
    assert got[5][3] == b"2"
    deleted = await exchange(ws, [[6, "delete", "a", "c:3", 3, None]])
    assert deleted[6][1] == 200 and b'"deleted": true' in deleted[6][3]
    # Over HTTP the same key is gone, and b is there.
    async with node.session.get(node.url + "/v1/kv/b") as response:
        assert await response.read() == b"2"
    await ws.close()


async def test_a_retried_request_id_applies_once(node: Node) -> None:
    ws = await node.connect()
    first = await exchange(ws, [put(1, "once", b"x", "retry:1")])
    again = await exchange(ws, [put(2, "once", b"x", "retry:1")])
    assert first[1][3] == again[2][3], "the retry gets the first answer"
    got = await exchange(ws, [[3, "get", "once", "linearizable"]])
    assert got[3][2]["kvstore-version"] == "1"
    await ws.close()


async def test_the_writes_of_one_turn_share_one_entry_and_each_applies_once(
    node: Node,
) -> None:
    """The driver proposes the puts of one turn as one batch entry: one message of 40
    writes (one request id twice) takes a few entries, not 41, and the repeated request id
    applies once, both copies answered alike."""
    ws = await node.connect()
    machine = node.driver.replica.state_machine
    index, revision = machine.applied_index, machine.revision
    requests = [put(i, f"b{i}", b"v", f"batch:{i}") for i in range(1, 41)]
    requests.append(put(41, "b1", b"v", "batch:1"))
    answers = await exchange(ws, requests)
    assert all(answers[i][1] == 200 for i in range(1, 42))
    assert answers[41][3] == answers[1][3]
    assert machine.revision == revision + 40
    assert machine.applied_index - index <= 4, "one entry per turn, not one per write"
    await ws.close()


async def test_every_write_of_a_batch_the_core_refuses_gets_the_refusal(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch entry the core refuses to propose fails each of its writes at once (none
    waits for its deadline), each with the leader's refusal."""
    from kvstore.errors import ProposalDroppedError

    def refuse(data: bytes) -> None:
        raise ProposalDroppedError("too many uncommitted bytes")

    ws = await node.connect()
    monkeypatch.setattr(node.driver.node, "propose", refuse)
    answers = await exchange(ws, [put(i, f"r{i}", b"v", f"refused:{i}") for i in range(1, 9)])
    assert {answer[1] for answer in answers.values()} == {429}
    assert {code(answer) for answer in answers.values()} == {"overloaded"}
    await ws.close()


async def test_conditions_and_their_errors(node: Node) -> None:
    ws = await node.connect()
    created = await exchange(ws, [[1, "put", "cas", b"1", "k:1", 0, None, True]])
    assert created[1][1] == 200
    again = await exchange(ws, [[2, "put", "cas", b"2", "k:2", 0, None, True]])
    assert again[2][1] == 412 and code(again[2]) == "precondition_failed"
    stale = await exchange(ws, [[3, "put", "cas", b"3", "k:3", 0, 999, False]])
    assert stale[3][1] == 412
    await ws.close()


@pytest.mark.parametrize(
    "request_, status",
    [
        (put(7, 123), 400),  # key not a string
        (put(7, ""), 400),
        (put(7, "bad\x00key"), 400),
        (put(7, "k" * 2000), 400),
        (put(7, "k", "text, not bytes"), 400),
        (put(7, "k", b"v", "no-seq"), 400),
        (put(7, "k", b"v", 5), 400),
        ([7, "put", "k", b"v", "c:1", -1, None, False], 400),
        ([7, "put", "k", b"v", "c:1", 2, None, False], 400),  # acked_below over its seq
        ([7, "delete", "k", "c:1", stream.UINT64_MAX, None], 400),
        ([7, "put", "k", b"v", "c:1", 0, "3", False], 400),
        ([7, "put", "k", b"v", "c:1", 0, 3, True], 400),
        ([7, "put", "k", b"v", "c:1", 0, None, "yes"], 400),
        ([7, "put", "k", b"v"], 400),
        ([7, "delete", "k", "c:1", 0], 400),
        ([7, "get", "k", "fresh"], 400),
        ([7, "get", "k"], 400),
        ([7, "drop", "k", 1], 400),
        ([7, True, "k"], 400),
    ],
)
async def test_a_malformed_request_is_answered_400_and_the_connection_stays(
    node: Node, request_: list[Any], status: int
) -> None:
    ws = await node.connect()
    answers = await exchange(ws, [request_, put(8, "fine", b"ok", "ok:1")])
    assert answers[7][1] == status, answers[7]
    assert answers[8][1] == 200, "the rest of the batch is served"
    assert not ws.closed
    await ws.close()


@pytest.mark.parametrize("answer_id", [1.5, "7", None, True, -1, [1]])
async def test_a_request_whose_id_is_not_an_integer_is_refused_by_id_0(
    node: Node, answer_id: Any
) -> None:
    ws = await node.connect()
    answers = await exchange(ws, [[answer_id, "put", "k", b"v", "id:1", 0, None, False]])
    assert answers[0][1] == 400 and "id must be an integer" in json.loads(answers[0][3])[
        "error"
    ]["message"]
    assert node.driver.replica.state_machine.get("k") is None, "nothing was applied"
    assert not ws.closed
    await ws.close()


async def test_a_value_over_the_limit_is_413(node: Node) -> None:
    ws = await node.connect()
    limit = node.driver.config.max_value_bytes
    answers = await exchange(ws, [put(1, "big", b"x" * (limit + 1), "big:1")])
    assert answers[1][1] == 413
    await ws.close()


@pytest.mark.parametrize(
    "payload, close_code",
    [
        (b"\xc1\xc1 not msgpack", aiohttp.WSCloseCode.INVALID_TEXT),
        (msgpack.packb({"a": 1}), aiohttp.WSCloseCode.UNSUPPORTED_DATA),
        (msgpack.packb([]), aiohttp.WSCloseCode.UNSUPPORTED_DATA),
        (b"\x91" * 100_000 + b"\xc0", aiohttp.WSCloseCode.INVALID_TEXT),  # nested too deep
        (b"\xdd\xff\xff\xff\xff", aiohttp.WSCloseCode.INVALID_TEXT),  # a 4 G element array
        (
            msgpack.packb([[i, "get", "k", "stale"] for i in range(stream.BATCH_MAX + 1)]),
            aiohttp.WSCloseCode.UNSUPPORTED_DATA,
        ),
    ],
)
async def test_an_undecodable_message_gets_a_last_answer_and_closes(
    node: Node, payload: bytes, close_code: int
) -> None:
    ws = await node.connect()
    await ws.send_bytes(payload)
    async with asyncio.timeout(10):
        message = await ws.receive()
        assert message.type is aiohttp.WSMsgType.BINARY
        [answer] = msgpack.unpackb(message.data, raw=False)
        assert answer[0] == 0 and answer[1] == 400
        assert len(json.loads(answer[3])["error"]["message"]) > len("not msgpack: ")
        closing = await ws.receive()
    assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == close_code
    assert closing.extra, "the close names the problem"


async def test_a_text_message_closes_the_connection(node: Node) -> None:
    ws = await node.connect()
    await ws.send_str('[[1, "get", "k", "stale"]]')
    async with asyncio.timeout(10):
        while (message := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
            pass
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.UNSUPPORTED_DATA


async def test_a_message_over_the_size_bound_closes_the_connection(node: Node) -> None:
    ws = await node.connect()
    limit = stream.message_bytes_max(node.driver.config.max_value_bytes)
    await ws.send_bytes(b"\x00" * (limit + 1))
    async with asyncio.timeout(10):
        message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_without_an_upgrade_the_stream_is_a_json_400(node: Node) -> None:
    async with node.session.get(node.url + "/v1/stream") as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_request"


@pytest.mark.parametrize("node", [{"client_idle_timeout_ms": 200}], indirect=True)
async def test_an_idle_stream_is_closed(node: Node) -> None:
    ws = await node.connect()
    await exchange(ws, [put(1, "k", b"v", "idle:1")])
    async with asyncio.timeout(10):
        message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE


async def test_a_follower_answers_307_naming_the_leader(node: Node) -> None:
    from kvstore.raft.types import Role

    driver = node.driver
    driver._peer_url = lambda peer: "http://127.0.0.1:7002" if peer == 2 else None  # type: ignore[method-assign]
    ws = await node.connect()
    driver._on_soft_state(2, Role.FOLLOWER)
    try:
        answers = await exchange(ws, [put(1, "k", b"v", "f:1")])
        assert answers[1][1] == 307
        assert answers[1][2]["location"] == "http://127.0.0.1:7002"
        assert code(answers[1]) == "not_leader"
    finally:
        driver._on_soft_state(1, Role.LEADER)
    await ws.close()


async def test_the_client_library_uses_the_stream_by_default(node: Node) -> None:
    from kvstore.client import Client, ClientConfig
    from kvstore.client.stream import StreamTransport
    from kvstore.errors import NotFoundError, PreconditionFailedError

    async with Client([node.url]) as kv:
        transport = kv._transport
        assert isinstance(transport, StreamTransport)
        results = await asyncio.gather(*(kv.put(f"k{i}", f"v{i}") for i in range(50)))
        assert [r.version for r in results] == [1] * 50
        assert (await kv.get("k7")).value == b"v7"
        with pytest.raises(PreconditionFailedError):
            await kv.cas("k7", b"x", mod_revision=10_000)
        await kv.delete("k7")
        with pytest.raises(NotFoundError):
            await kv.get("k7", consistency="stale")
        assert len((await kv.list("k")).items) == 49  # over HTTP
        assert transport.streamed >= 54
    async with Client([node.url], config=ClientConfig(binary_stream=False)) as kv:
        assert not isinstance(kv._transport, StreamTransport)
        assert (await kv.get("k8")).value == b"v8"


async def test_the_client_falls_back_to_http_where_no_stream_is_offered() -> None:
    from kvstore.client import Client

    # A node without the stream: a plain aiohttp app answering 404 to the upgrade.
    app = web.Application()

    async def put_key(request: web.Request) -> web.Response:
        return web.json_response(
            {"key": "k", "revision": 1, "create_revision": 1, "mod_revision": 1, "version": 1}
        )

    app.router.add_put("/v1/kv/{key}", put_key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with Client([url]) as kv:
            assert (await kv.put("k", b"v")).revision == 1
            assert (await kv.put("k", b"w")).revision == 1
            assert kv._transport.streamed == 0  # type: ignore[attr-defined]
    finally:
        await runner.cleanup()


async def test_a_node_that_accepts_but_never_upgrades_costs_a_bounded_wait() -> None:
    """A frozen node's kernel still accepts connections: the stream's dial must not wait
    for its upgrade forever (every later request to it would queue behind that dial)."""
    from kvstore.client.stream import StreamTransport
    from kvstore.client.transport import AiohttpTransport, TransportError

    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    transport = StreamTransport(AiohttpTransport(), connect_timeout_s=0.05)
    try:
        with pytest.raises(TransportError) as failed:
            await transport.request(
                url, "PUT", "/v1/kv/k", headers={"Kvstore-Request-Id": "c:1"}, body=b"v",
                timeout_s=0.1,
            )  # fmt: skip
        assert failed.value.timed_out and not failed.value.maybe_sent
        async with asyncio.timeout(10):  # the dial itself ends at its own bound
            while transport._connecting:
                await asyncio.sleep(0.01)
    finally:
        await transport.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


# --- under --auth: the upgrade carries the token, each operation is checked ------------------

READER, WRITER = "reader-token-0123456789", "writer-token-0123456789"


def _with_auth(node: Node) -> AuthTable:
    """Turn on the node's auth gate: user bob reads app/, user alice writes app/."""
    table = AuthTable()
    table.roles["reader"] = (("app/", "read"),)
    table.roles["writer"] = (("app/", "write"),)
    table.users["bob"] = ("reader",)
    table.users["alice"] = ("writer",)
    table.tokens[token_digest(READER)] = "bob"
    table.tokens[token_digest(WRITER)] = "alice"
    node.api.auth_gate = AuthGate(
        table=lambda: table, root_digest="", protect_status=False, protect_metrics=False
    )
    return table


@pytest.mark.parametrize("token", ["", "not-a-known-token-0123", "Basic"])
async def test_an_upgrade_without_a_good_token_is_refused_as_http_would(
    node: Node, token: str
) -> None:
    _with_auth(node)
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    if token == "Basic":
        headers["Authorization"] = "Basic YTpi"
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    session, url = node.session, node.url
    async with (
        session.get(url + "/v1/stream", headers=headers) as upgrade,
        session.get(url + "/v1/kv/app/x", headers=headers) as plain,
    ):
        assert upgrade.status == plain.status == 401
        assert (await upgrade.json())["error"]["code"] == "unauthenticated"
        assert (await plain.json())["error"]["code"] == "unauthenticated"
        assert upgrade.headers["WWW-Authenticate"] == plain.headers["WWW-Authenticate"]


async def test_each_operation_on_a_stream_is_checked_for_its_user(node: Node) -> None:
    _with_auth(node)
    writer = await node.connect(WRITER)
    allowed = await exchange(writer, [put(1, "app/x", b"1", "w:1"), put(2, "other", b"2", "w:2")])
    assert allowed[1][1] == 200
    assert allowed[2][1] == 403 and code(allowed[2]) == "permission_denied"
    reader = await node.connect(READER)
    answers = await exchange(
        reader,
        [
            [1, "get", "app/x", "linearizable"],
            put(2, "app/x", b"3", "r:1"),
            [3, "delete", "app/x", "r:2", 0, None],
            [4, "get", "other", "stale"],
        ],
    )
    assert answers[1][1] == 200 and answers[1][3] == b"1"
    assert [answers[i][1] for i in (2, 3, 4)] == [403, 403, 403]
    assert {code(answers[i]) for i in (2, 3, 4)} == {"permission_denied"}
    assert not reader.closed, "a forbidden operation is answered, the stream stays"
    assert node.driver.replica.state_machine.get("app/x").value == b"1"  # type: ignore[union-attr]
    assert node.driver.replica.state_machine.get("other") is None
    await writer.close()
    await reader.close()


async def test_a_token_revoked_while_its_stream_is_open_stops_working(node: Node) -> None:
    table = _with_auth(node)
    ws = await node.connect(WRITER)
    assert (await exchange(ws, [put(1, "app/y", b"1", "v:1")]))[1][1] == 200
    del table.tokens[token_digest(WRITER)]
    answer = (await exchange(ws, [put(2, "app/y", b"2", "v:2")]))[2]
    assert answer[1] == 401 and code(answer) == "unauthenticated"
    await ws.close()


async def test_the_client_with_a_token_uses_the_stream(node: Node) -> None:
    from kvstore.client import Client, ClientConfig
    from kvstore.errors import PermissionDeniedError

    _with_auth(node)
    async with Client([node.url], config=ClientConfig(token=WRITER)) as kv:
        assert (await kv.put("app/k", b"v")).version == 1
        assert (await kv.get("app/k")).value == b"v"
        with pytest.raises(PermissionDeniedError):
            await kv.put("elsewhere", b"v")
        assert kv._transport.streamed >= 3  # type: ignore[attr-defined]
    async with Client([node.url], config=ClientConfig(token="wrong-token-0123456789")) as kv:
        from kvstore.errors import UnauthenticatedError

        with pytest.raises(UnauthenticatedError):
            await kv.get("app/k")


# --- a client that never reads its answers -----------------------------------------------


class _DeafClient:
    """A WebSocket (as StreamSession sees it) whose client sends `messages` and then nothing,
    and never reads: every send blocks."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = list(messages)
        self.received = 0
        self.closed = False
        self._never = asyncio.get_running_loop().create_future()

    async def receive(self, timeout: float | None = None) -> aiohttp.WSMessage:
        if not self.messages:
            await self._never
        self.received += 1
        return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, self.messages.pop(0), None)

    async def send_bytes(self, data: bytes) -> None:
        await self._never

    async def close(self, **kwargs: Any) -> None:
        self.closed = True


@pytest.mark.parametrize("value_bytes", [10, 64 * 1024])
async def test_a_client_that_never_reads_stops_being_read(
    node: Node, value_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers not yet sent count against the connection's bounds (requests, bytes): the
    node stops reading a client that takes no answers instead of buffering without end.
    The answers of the message being sent count too: with the reader checking its bounds
    at every turn of the loop (as a slow machine makes it, whose back-off sleeps are over
    at once), it read a second bound's worth while the first sat in a send that never ended."""
    monkeypatch.setattr(stream, "_BACKPRESSURE_CHECK_S", 0)
    ws = await node.connect()
    await exchange(ws, [put(1, "v", b"x" * value_bytes, "deaf:1")])
    await ws.close()
    batch = msgpack.packb([[i + 1, "get", "v", "stale"] for i in range(stream.BATCH_MAX)])
    deaf = _DeafClient([batch] * 50)
    session = stream.StreamSession(node.api, deaf)  # type: ignore[arg-type]
    task = asyncio.ensure_future(session.run())
    try:
        for _ in range(500):  # step the loop: every answer here is synchronous
            await asyncio.sleep(0)
        by_count = stream.IN_FLIGHT_MAX // stream.BATCH_MAX
        by_bytes = stream.OUTBOX_BYTES_MAX // (value_bytes * stream.BATCH_MAX) + 1
        assert deaf.received <= min(by_count, by_bytes), deaf.received
        assert deaf.messages, "the node read every message of a client that reads nothing"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("node", [{"client_body_timeout_ms": 300}], indirect=True)
async def test_a_client_that_takes_no_answers_is_cut_off(node: Node) -> None:
    ws = await node.connect()
    await exchange(ws, [put(1, "v", b"x" * (256 * 1024), "cut:1")])
    await ws.close()
    before = node.server.open_connections
    reader, writer = await asyncio.open_connection("127.0.0.1", int(node.url.rsplit(":", 1)[1]))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(
        b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    batch = msgpack.packb([[i + 1, "get", "v", "stale"] for i in range(64)])
    writer.write(_masked_frame(batch))
    try:
        async with asyncio.timeout(15):  # the node aborts the connection it cannot write to
            while node.server.open_connections > before:
                await asyncio.sleep(0.02)
    finally:
        writer.transport.abort()
    async with node.session.get(node.url + "/v1/status") as response:
        assert response.status == 200, "the node serves others"


def _masked_frame(payload: bytes) -> bytes:
    """One binary WebSocket frame from a client (masked with a zero mask)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x82, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([0x82, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x82, 0x80 | 127]) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class _UpgradeCounter:
    """A stand-in node that accepts stream upgrades, counts them and holds them open."""

    def __init__(self) -> None:
        self.upgrades = 0
        self.runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> str:
        async def upgrade(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            self.upgrades += 1
            async for _ in ws:
                pass
            return ws

        app = web.Application()
        app.router.add_get("/v1/stream", upgrade)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _stream_transport(standby: list[str]) -> Any:
    from kvstore.client.stream import StreamTransport
    from kvstore.client.transport import AiohttpTransport

    return StreamTransport(AiohttpTransport(), standby=standby)


_standby_seq = iter(range(1, 1_000_000))


async def _put_over(transport: Any, url: str, key: str) -> int:
    request_id = f"standby:{next(_standby_seq)}"
    response = await transport.request(
        url, "PUT", f"/v1/kv/{key}", headers={"Kvstore-Request-Id": request_id},
        body=b"v", timeout_s=5.0,
    )  # fmt: skip
    return int(response.status)


async def test_standby_streams_are_opened_to_the_endpoints_not_used(node: Node) -> None:
    # A client in use keeps a stream open to every endpoint, so that after a leader change
    # the new leader's stream is already there: the dial is off the failover's path.
    other = _UpgradeCounter()
    other_url = await other.start()
    transport = _stream_transport([node.url, other_url])
    try:
        assert await _put_over(transport, node.url, "a") == 200
        async with asyncio.timeout(5):
            while other.upgrades < 1:
                await asyncio.sleep(0.005)
        for i in range(20):
            assert await _put_over(transport, node.url, f"b{i}") == 200
        assert other.upgrades == 1  # one stream, kept, not one per request
    finally:
        await transport.close()
        await other.stop()


async def test_a_standby_endpoint_that_was_down_is_dialled_again(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvstore.client import stream as client_stream

    monkeypatch.setattr(client_stream, "_STANDBY_CHECK_S", 0.01)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport = _stream_transport([node.url, f"http://127.0.0.1:{port}"])
    other = _UpgradeCounter()
    try:
        # The standby endpoint refuses: the requests to the leader go on untouched.
        for i in range(5):
            assert await _put_over(transport, node.url, f"c{i}") == 200
        await other.start(port)
        async with asyncio.timeout(5):
            i = 0
            while other.upgrades < 1:
                i += 1
                assert await _put_over(transport, node.url, f"d{i}") == 200
                await asyncio.sleep(0.005)
    finally:
        await transport.close()
        await other.stop()


async def test_without_standby_only_the_nodes_used_get_a_stream(node: Node) -> None:
    from kvstore.client import Client, ClientConfig

    other = _UpgradeCounter()
    other_url = await other.start()
    try:
        config = ClientConfig(standby_streams=False)
        async with Client([node.url, other_url], config=config) as kv:
            transport = kv._transport
            for i in range(10):
                await transport.request(  # type: ignore[attr-defined]
                    node.url, "GET", f"/v1/kv/e{i}", query={"consistency": "stale"},
                    timeout_s=5.0,
                )  # fmt: skip
            assert set(transport._connections) == {node.url}  # type: ignore[attr-defined]
            assert not transport._connecting  # type: ignore[attr-defined]
        async with Client([node.url, other_url]) as kv:
            assert kv._transport._standby == (node.url, other_url)  # type: ignore[attr-defined]
        async with Client([node.url]) as kv:
            assert kv._transport._standby == ()  # type: ignore[attr-defined]
    finally:
        await other.stop()


async def test_a_request_on_an_open_stream_that_gets_no_answer_times_out() -> None:
    from kvstore.client.transport import TransportError

    silent = _UpgradeCounter()  # takes the stream and never answers
    url = await silent.start()
    transport = _stream_transport([])
    try:
        with pytest.raises(TransportError) as failed:
            await _put_over_with_timeout(transport, url, "t", 0.05)
        assert failed.value.timed_out and failed.value.maybe_sent
        connection = transport._connections[url]
        assert not connection.waiting  # forgotten: a late answer is dropped
        # The stream stays usable for the next request (which times out the same way).
        with pytest.raises(TransportError):
            await _put_over_with_timeout(transport, url, "u", 0.05)
        assert silent.upgrades == 1
    finally:
        await transport.close()
        await silent.stop()


async def _put_over_with_timeout(transport: Any, url: str, key: str, timeout_s: float) -> int:
    response = await transport.request(
        url, "PUT", f"/v1/kv/{key}", headers={"Kvstore-Request-Id": f"t:{next(_standby_seq)}"},
        body=b"v", timeout_s=timeout_s,
    )  # fmt: skip
    return int(response.status)
