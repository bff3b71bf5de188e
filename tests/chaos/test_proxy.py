"""The fault-injecting TCP proxy: pass-through, stall, blackhole, delay, loss, reset,
partitions."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from kvstore.chaos.proxy import LinkFaults, LinkProxy, ProxyMesh


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield ("127.0.0.1", server.sockets[0].getsockname()[1])
    server.close()


@pytest.fixture
async def proxy(echo_server: tuple[str, int]) -> AsyncIterator[LinkProxy]:
    link = LinkProxy("1->2", echo_server, random.Random(1))
    await link.start()
    yield link
    await link.close()


async def _round_trip(port: int, payload: bytes, timeout_s: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def test_healthy_link_passes_bytes(proxy: LinkProxy) -> None:
    assert await _round_trip(proxy.port, b"hello") == b"hello"


async def test_blackhole_swallows_bytes_and_heal_restores_new_connections(
    proxy: LinkProxy,
) -> None:
    proxy.set_faults(LinkFaults(blackhole=True))
    with pytest.raises(TimeoutError):
        await _round_trip(proxy.port, b"lost", timeout_s=0.2)
    proxy.heal()
    assert await _round_trip(proxy.port, b"back") == b"back"


async def test_blackholed_connection_is_broken_after_heal(proxy: LinkProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    proxy.set_faults(LinkFaults(blackhole=True))
    writer.write(b"hole")
    await writer.drain()
    await _wait_for(lambda: any(c.tainted for c in proxy._connections))
    proxy.heal()
    writer.write(b"after")
    async with asyncio.timeout(2):
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(5)
    writer.close()


async def test_stalled_connection_stays_stalled_after_heal_without_an_error(
    proxy: LinkProxy,
) -> None:
    """Issue 12 item 14: a partition stalls connections (as dropped packets do) rather than
    closing them; only new connections work after the heal."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x")
    await writer.drain()
    assert await reader.readexactly(1) == b"x"
    proxy.set_faults(LinkFaults(stall=True))
    writer.write(b"held")
    await writer.drain()
    await _wait_for(lambda: proxy.connections_stalled == 1)
    held_reader, held_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    held_writer.write(b"new")
    await held_writer.drain()
    await _wait_for(lambda: proxy.connections_stalled == 2)  # accepted, then held too
    proxy.heal()
    writer.write(b"after")
    await writer.drain()
    # A new connection works at once; the stalled ones got nothing, and no error or EOF.
    assert await _round_trip(proxy.port, b"fresh") == b"fresh"
    for stalled in (reader, held_reader):
        assert not stalled.at_eof() and stalled.exception() is None
        assert len(stalled._buffer) == 0  # type: ignore[attr-defined]
    assert proxy.connections_broken == 0
    writer.close()
    held_writer.close()


async def test_reset_breaks_open_connections_and_refuses_new(proxy: LinkProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x")
    await writer.drain()
    assert await reader.readexactly(1) == b"x"
    proxy.set_faults(LinkFaults(reset=True))
    async with asyncio.timeout(2):
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _round_trip(proxy.port, b"y")
    writer.close()


async def test_delay_holds_chunks_back(proxy: LinkProxy) -> None:
    loop = asyncio.get_running_loop()
    proxy.set_faults(LinkFaults(delay_ms=100))
    started = loop.time()
    assert await _round_trip(proxy.port, b"slow") == b"slow"
    # Both directions are delayed, so a round trip takes at least two delays.
    assert loop.time() - started >= 0.19


async def test_total_loss_breaks_the_connection(proxy: LinkProxy) -> None:
    proxy.set_faults(LinkFaults(loss=1.0))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _round_trip(proxy.port, b"z")
    assert proxy.connections_broken >= 1


def test_fault_values_are_validated() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkFaults(loss=1.5)
    with pytest.raises(ValueError):
        LinkFaults(delay_ms=-1)


async def test_mesh_partitions_cut_the_right_links(echo_server: tuple[str, int]) -> None:
    mesh = ProxyMesh({1: echo_server, 2: echo_server, 3: echo_server}, random.Random(2))
    await mesh.start()
    try:
        assert sorted(mesh.links) == [(1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2)]
        dial = mesh.dial_addresses()
        assert dial[1][1] == f"{echo_server[0]}:{echo_server[1]}"
        assert dial[1][2] == mesh.links[(1, 2)].address

        mesh.partition({1}, {2, 3}, one_way=True)
        assert _cut(mesh) == {(1, 2), (1, 3)}
        mesh.heal()
        mesh.partition({1}, {2, 3})
        assert _cut(mesh) == {(1, 2), (1, 3), (2, 1), (3, 1)}
        mesh.heal()
        mesh.bridge({1}, {3})
        assert _cut(mesh) == {(1, 3), (3, 1)}
        mesh.heal()
        mesh.isolate(2)
        assert _cut(mesh) == {(1, 2), (2, 1), (2, 3), (3, 2)}
        mesh.heal()
        assert _cut(mesh) == set()
        assert await _round_trip(mesh.links[(3, 1)].port, b"ok") == b"ok"
    finally:
        await mesh.close()


def _cut(mesh: ProxyMesh) -> set[tuple[int, int]]:
    return {link for link, proxy in mesh.links.items() if proxy.faults.stall}


async def _wait_for(condition: object, timeout_s: float = 2.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)
