"""The binary stream (kvstore/server/stream.py) on a single-node driver: round trips, the
same answers as HTTP, exactly-once, and hostile input (every malformed field answered 400 by
id with the connection kept; undecodable, oversized or textual messages close it)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from kvstore.raft.config import RaftConfig
from kvstore.replica import Replica
from kvstore.server import stream
from kvstore.server.config import ServeConfig
from kvstore.server.driver import Driver
from kvstore.server.http import HttpApi
from kvstore.server.metrics import NodeMetrics
from kvstore.storage.memory import MemoryStorage


class Node:
    def __init__(self, session: aiohttp.ClientSession, url: str, driver: Driver) -> None:
        self.session, self.url, self.driver = session, url, driver

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        return await self.session.ws_connect(self.url + "/v1/stream", max_msg_size=0)


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
    runner = web.ServerRunner(api.build_server())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    session = aiohttp.ClientSession()
    try:
        async with asyncio.timeout(10):
            while not driver.is_leader() or driver.applied_index() < 1:
                await asyncio.sleep(0.002)
        yield Node(session, url, driver)
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
        closing = await ws.receive()
    assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == close_code


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
