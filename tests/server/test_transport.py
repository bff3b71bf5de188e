"""The peer transport alone: two transports on 127.0.0.1, real sockets, no Raft core."""

from __future__ import annotations

import asyncio
import socket
import struct

from kvstore.codec import pack
from kvstore.raft.types import Entry, Message, MessageType
from kvstore.server.transport import PeerTransport, encode_frame


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_for(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


class _Node:
    def __init__(self, node_id: int, peers: dict[int, str], cluster_id: str = "c1") -> None:
        self.received: list[Message] = []
        self.down: list[int] = []
        self.transport = PeerTransport(
            node_id=node_id,
            cluster_id=cluster_id,
            client_url=f"http://client-{node_id}",
            listen=peers[node_id],
            peers=peers,
            on_message=self.received.append,
            on_peer_down=self.down.append,
        )


def _peers() -> dict[int, str]:
    return {1: f"127.0.0.1:{_free_port()}", 2: f"127.0.0.1:{_free_port()}"}


def _append(to: int, from_: int, index: int) -> Message:
    return Message(
        type=MessageType.APPEND,
        to=to,
        from_=from_,
        term=3,
        index=index,
        entries=(Entry(term=3, index=index + 1, data=b"x" * 100),),
    )


async def test_messages_flow_both_ways_in_order_and_urls_are_learnt() -> None:
    peers = _peers()
    a, b = _Node(1, peers), _Node(2, peers)
    await a.transport.start()
    await b.transport.start()
    try:
        for i in range(500):
            a.transport.send(_append(2, 1, i))
        b.transport.send(_append(1, 2, 7))
        await _wait_for(lambda: len(b.received) == 500 and len(a.received) == 1)
        assert [m.index for m in b.received] == list(range(500))
        assert b.received[0].entries[0].data == b"x" * 100
        assert a.transport.peer_urls[2] == "http://client-2"
        assert b.transport.peer_urls[1] == "http://client-1"
    finally:
        await a.transport.close()
        await b.transport.close()


async def test_peer_down_is_reported_and_reconnect_happens() -> None:
    peers = _peers()
    a, b = _Node(1, peers), _Node(2, peers)
    await a.transport.start()
    await b.transport.start()
    try:
        await _wait_for(lambda: a.transport.is_connected(2) and b.transport.is_connected(1))
        await b.transport.close()
        await _wait_for(lambda: 2 in a.down)
        b2 = _Node(2, peers)
        await b2.transport.start()
        try:
            await _wait_for(lambda: a.transport.is_connected(2))
            a.transport.send(_append(2, 1, 1))
            await _wait_for(lambda: len(b2.received) == 1)
        finally:
            await b2.transport.close()
    finally:
        await a.transport.close()


async def test_full_queue_drops_instead_of_blocking() -> None:
    peers = _peers()
    a = _Node(1, peers)
    told: list[int] = []
    a.transport._on_drop = told.append
    a.transport._peers[2].queue_frames_max = 10
    for i in range(25):  # not started: nothing drains the queue
        a.transport.send(_append(2, 1, i))
    assert a.transport.dropped(2) == 15
    assert told == [2] * 15  # what kvstore_peer_messages_dropped_total counts


async def test_wrong_cluster_id_is_rejected() -> None:
    peers = _peers()
    a, b = _Node(1, peers, "c1"), _Node(2, peers, "other")
    await a.transport.start()
    await b.transport.start()
    try:
        b.transport.send(_append(1, 2, 1))
        await _wait_for(lambda: a.transport.frames_rejected >= 1)
        assert a.received == [] and not b.transport.is_connected(1)
    finally:
        await a.transport.close()
        await b.transport.close()


async def test_garbage_and_forged_frames_are_rejected() -> None:
    peers = _peers()
    a = _Node(1, peers)
    await a.transport.start()
    host, port = peers[1].split(":")
    try:
        for payload in (
            b"GET / HTTP/1.1\r\n\r\n",
            struct.pack(">II", 1 << 30, 0) + b"xx",
            struct.pack(">II", 5, 12345) + b"hello",  # checksum mismatch
            encode_frame(b"\x01\xc1garbage"),
            # a valid handshake followed by a message claiming to come from someone else
            encode_frame(pack(["kvstore-peer", 1, "c1", 2, "http://x"]))
            + encode_frame(pack([5, 1, 3, 1, 0, 0, [], 0, False, 0, None, b""])),
        ):
            before = a.transport.frames_rejected
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(payload)
            await writer.drain()
            await _wait_for(lambda before=before: a.transport.frames_rejected > before)
            assert await reader.read() is not None  # the node closed the connection
            writer.close()
        assert a.received == []
    finally:
        await a.transport.close()


async def test_a_failed_write_does_not_end_the_peer_task(monkeypatch) -> None:
    """Regression (found by the chaos drills): a write to a transport that a reset had just
    closed raised RuntimeError under uvloop, which ended the outbound task for good; the
    leader never reached that follower again and it campaigned (pre-vote) forever."""
    import kvstore.server.transport as transport_module

    real_encode = transport_module.encode_frame
    failures = []

    def failing_once(payload: bytes) -> bytes:
        if not failures:
            failures.append(payload)
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
        return real_encode(payload)

    peers = _peers()
    a, b = _Node(1, peers), _Node(2, peers)
    await a.transport.start()
    await b.transport.start()
    try:
        await _wait_for(lambda: a.transport.is_connected(2) and b.transport.is_connected(1))
        # Both connections are up and idle: the next frame encoded is node 1's append.
        monkeypatch.setattr(transport_module, "encode_frame", failing_once)
        a.transport.send(_append(2, 1, 1))
        await _wait_for(lambda: failures != [])

        def delivered() -> bool:
            a.transport.send(_append(2, 1, 2))
            return any(m.index == 2 for m in b.received)

        await _wait_for(delivered)
    finally:
        await a.transport.close()
        await b.transport.close()
