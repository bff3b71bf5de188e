"""AiohttpTransport against a small in-process aiohttp server: what comes back, what fails how.

The server here is a stand-in speaking a few answers of the HTTP API contract; the real
server is exercised in test_cluster.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from kvstore import Client
from kvstore.client.transport import AiohttpTransport, TransportError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def server() -> AsyncIterator[str]:
    seen: list[str] = []

    async def key(request: web.Request) -> web.Response:
        seen.append(request.match_info["key"])
        if request.method == "PUT":
            return web.Response(
                status=307,
                headers={"Location": "http://127.0.0.1:1/v1/kv/x", "Kvstore-Leader": ""},
            )
        return web.Response(body=b"hello", headers={"Kvstore-Mod-Revision": "4"})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/v1/kv/{key:.+}", key)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_answers_come_back_whole_with_lower_case_headers(server: str) -> None:
    transport = AiohttpTransport()
    try:
        response = await transport.request(server, "GET", "/v1/kv/a%2Fb", timeout_s=2.0)
        assert response.status == 200 and response.body == b"hello"
        assert response.headers["kvstore-mod-revision"] == "4"
        redirect = await transport.request(server, "PUT", "/v1/kv/x", body=b"v", timeout_s=2.0)
        assert redirect.status == 307, "redirects are the retry loop's business, not followed"
    finally:
        await transport.close()


async def test_refused_connections_were_certainly_not_sent() -> None:
    transport = AiohttpTransport()
    try:
        with pytest.raises(TransportError) as caught:
            await transport.request(f"http://127.0.0.1:{free_port()}", "GET", "/", timeout_s=2.0)
        assert caught.value.maybe_sent is False
        # The OS's reason, not aiohttp's "Cannot connect to host ... ssl:default [...]".
        assert "connection refused" in str(caught.value) and "ssl:" not in str(caught.value)
    finally:
        await transport.close()


async def test_a_hung_server_times_out_with_the_request_maybe_sent(server: str) -> None:
    transport = AiohttpTransport()
    try:
        with pytest.raises(TransportError) as caught:
            await transport.request(server, "GET", "/slow", timeout_s=0.2)
        assert caught.value.timed_out and caught.value.maybe_sent
    finally:
        await transport.close()


async def test_keys_are_percent_encoded_as_one_path_segment(server: str) -> None:
    async with Client([server]) as kv:
        item = await kv.get("dir/sub key/é")
    assert item.value == b"hello" and item.mod_revision == 4
