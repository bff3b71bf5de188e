"""The peer transport alone: two transports on 127.0.0.1, real sockets, no Raft core."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from kvstore.chaos.proxy import LinkFaults, LinkProxy, ProxyMesh
from kvstore.codec import encode_message, message_to_obj, pack
from kvstore.raft.config import RaftConfig
from kvstore.raft.node import RawNode
from kvstore.raft.types import Entry, Message, MessageType
from kvstore.server import peerauth
from kvstore.server.localcluster import LocalCluster, free_port
from kvstore.server.transport import PeerTransport, encode_frame
from kvstore.storage.memory import MemoryStorage


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_for(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


class _Node:
    def __init__(
        self,
        node_id: int,
        peers: dict[int, str],
        cluster_id: str = "c1",
        listen: str | None = None,
        **options: Any,
    ) -> None:
        self.received: list[Message] = []
        self.down: list[int] = []
        self.transport = PeerTransport(
            node_id=node_id,
            cluster_id=cluster_id,
            client_url=f"http://client-{node_id}",
            listen=listen or peers[node_id],
            peers=peers,
            on_message=self.received.append,
            on_peer_down=self.down.append,
            **options,
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
            # the handshake of version 1, which proved nothing
            encode_frame(pack(["kvstore-peer", 1, "c1", 2, "http://x"])),
            # a valid handshake followed by a message claiming to come from someone else
            None,
        ):
            before = a.transport.frames_rejected
            reader, writer = await asyncio.open_connection(host, int(port))
            if payload is None:
                await _handshake_as(reader, writer)
                payload = encode_frame(pack([5, 1, 3, 1, 0, 0, [], 0, False, 0, None, b""]))
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


async def _closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = 2.0) -> bool:
    """True once the other end closed (EOF or reset) within the deadline; what it sent before
    (its handshake) is skipped."""
    async with asyncio.timeout(timeout_s):
        try:
            while await reader.read(1 << 16):
                pass
        except ConnectionError:
            pass
    return True


async def _handshake_as(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    node_id: int = 2,
    *,
    cluster_id: str = "c1",
    secret: bytes = b"",
    to: int = 1,
    url: str = "http://x",
) -> peerauth.Handshake:
    """Complete the peer handshake by hand as `node_id`, proving `secret`; the answer."""
    hello = peerauth.new_hello(cluster_id=cluster_id, node_id=node_id, to=to, client_url=url)
    writer.write(encode_frame(peerauth.encode_handshake(hello)))
    length, _ = struct.unpack(">II", await reader.readexactly(8))
    answer = peerauth.decode_handshake(await reader.readexactly(length))
    proof = peerauth.prove(secret, peerauth.DIALER, hello, answer)
    writer.write(encode_frame(peerauth.encode_proof(proof)))
    await writer.drain()
    return answer


async def test_a_term_out_of_range_is_dropped_and_the_node_keeps_its_term() -> None:
    """Issue 12 item 9: a message with term 2^64-1 was adopted and persisted, and the node
    then failed to encode its own pre-vote forever. It must not reach the core."""
    peers = _peers()
    storage = MemoryStorage()
    core = RawNode(RaftConfig(id=1, peers=(1, 2)), storage, random.Random(1))
    a = _Node(1, peers)
    a.transport._on_message = core.step
    term = core.term
    await a.transport.start()
    host, port = peers[1].split(":")
    try:
        for bad_term in (2**64 - 1, 2**63, 2**62):
            obj = message_to_obj(Message(MessageType.HEARTBEAT, 1, 2, 1))
            obj[3] = bad_term
            before = a.transport.frames_rejected
            reader, writer = await asyncio.open_connection(host, int(port))
            await _handshake_as(reader, writer)
            writer.write(encode_frame(pack(obj)))
            await writer.drain()
            assert await _closed_by_peer(reader)
            assert a.transport.frames_rejected == before + 1
            writer.close()
        assert core.term == term
        # ... and the node can still encode what it sends next.
        core.campaign()
        for message in core.ready().messages:
            encode_message(message)
    finally:
        await a.transport.close()


async def test_an_oversized_length_prefix_before_the_handshake_is_refused_unread() -> None:
    """Issue 12 item 10: a 256 MiB frame before the handshake was read into memory. Now the
    length prefix alone is refused: the node closes at once, without waiting for the body
    (the handshake timeout is far away, so only the length check can close it in time)."""
    peers = _peers()
    a = _Node(1, peers, handshake_timeout_s=30.0)
    await a.transport.start()
    host, port = peers[1].split(":")
    try:
        for length in (200 << 20, 5 << 10):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(struct.pack(">II", length, 0) + b"x" * 100)
            await writer.drain()
            assert await _closed_by_peer(reader)
            writer.close()
        assert a.transport.frames_rejected == 2
        assert a.transport._inbound == 0
    finally:
        await a.transport.close()


async def test_a_frame_over_the_configured_bound_is_refused_after_the_handshake() -> None:
    peers = _peers()
    a = _Node(1, peers, frame_bytes_max=1 << 10)
    await a.transport.start()
    host, port = peers[1].split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        await _handshake_as(reader, writer)
        writer.write(struct.pack(">II", 2 << 10, 0))
        await writer.drain()
        assert await _closed_by_peer(reader)
        assert a.transport.frames_rejected == 1 and a.received == []
        writer.close()
    finally:
        await a.transport.close()


async def test_a_message_over_the_bound_is_not_sent() -> None:
    """The sender leaves out a message the peer would refuse (snapshots stream in chunks:
    tests/server/test_snapshot_stream.py)."""
    peers = _peers()
    a, b = _Node(1, peers, frame_bytes_max=1 << 10), _Node(2, peers)
    statuses: list[tuple[int, bool]] = []
    a.transport._on_snapshot_status = lambda peer, ok: statuses.append((peer, ok))
    await a.transport.start()
    await b.transport.start()
    try:
        big = Message(
            MessageType.APPEND, 2, 1, 3, entries=(Entry(term=3, index=1, data=b"y" * 2048),)
        )
        a.transport.send(big)
        a.transport.send(_append(2, 1, 5))
        await _wait_for(lambda: len(b.received) == 1)
        assert b.received[0].index == 5
        assert b.transport.frames_rejected == 0
    finally:
        await a.transport.close()
        await b.transport.close()


async def test_a_connection_without_a_handshake_is_closed_after_the_timeout() -> None:
    peers = _peers()
    a = _Node(1, peers, handshake_timeout_s=0.2)
    await a.transport.start()
    host, port = peers[1].split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\x00\x00")  # part of a header, then nothing
        await writer.drain()
        assert await _closed_by_peer(reader, timeout_s=3.0)
        writer.close()
    finally:
        await a.transport.close()


async def test_inbound_connections_are_capped_per_source_and_in_total() -> None:
    peers = _peers()
    a = _Node(1, peers, handshake_timeout_s=30.0, connections_max=3, connections_per_source_max=2)
    await a.transport.start()
    host, port = peers[1].split(":")
    opened: list[asyncio.StreamWriter] = []
    try:
        # Two from 127.0.0.1 are held (waiting for a handshake); the third is closed at once.
        first_reader, first = await asyncio.open_connection(host, int(port))
        opened.append(first)
        opened.append((await asyncio.open_connection(host, int(port)))[1])
        await _wait_for(lambda: a.transport._inbound == 2)
        reader, writer = await asyncio.open_connection(host, int(port))
        opened.append(writer)
        assert await _closed_by_peer(reader)
        assert a.transport._inbound == 2 and a.transport.frames_rejected == 1
        # Another source address (127.0.0.2 is loopback too) gets one more: the total cap.
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.2", 0))
        opened.append(writer)
        await _wait_for(lambda: a.transport._inbound == 3)
        # At the total cap a new connection evicts the oldest one still in its handshake
        # (the first from 127.0.0.1) instead of being refused.
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.3", 0))
        opened.append(writer)
        assert await _closed_by_peer(first_reader)
        await _wait_for(lambda: a.transport._inbound == 3)
        assert a.transport.frames_rejected == 1
    finally:
        for writer in opened:
            writer.close()
        await a.transport.close()


async def test_half_open_connections_from_many_addresses_do_not_lock_out_a_member() -> None:
    """A crowd of connections that never handshake, from more addresses than the per-source
    bound stops, used to hold every inbound slot (each for the handshake timeout, then
    opened anew): a member's dial was refused for as long as the crowd kept coming."""
    peers = _peers()
    a = _Node(1, peers, handshake_timeout_s=30.0, connections_max=4, connections_per_source_max=2)
    b = _Node(2, peers)
    await a.transport.start()
    host, port = peers[1].split(":")
    crowd: list[asyncio.StreamWriter] = []
    try:
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"):
            crowd.append((await asyncio.open_connection(host, int(port), local_addr=(source, 0)))[1])
        await _wait_for(lambda: a.transport._inbound == 4)
        await b.transport.start()
        await _wait_for(lambda: b.transport.is_connected(1))
        b.transport.send(Message(MessageType.HEARTBEAT, to=1, from_=2, term=1))
        await _wait_for(lambda: len(a.received) == 1)
    finally:
        for writer in crowd:
            writer.close()
        await b.transport.close()
        await a.transport.close()


async def test_a_silent_connection_is_closed_and_the_outbound_one_redialled() -> None:
    """Issue 12 item 14: nothing arrives on a connection whose packets are dropped, and no
    error either; it must be noticed from the silence, not from TCP minutes later."""
    peers = _peers()
    a = _Node(1, peers, ping_interval_s=0.02, dead_after_s=0.15)
    await a.transport.start()
    host, port = peers[1].split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        await _handshake_as(reader, writer)  # then silence: no messages, no pings
        await _wait_for(lambda: a.transport.peer_urls.get(2) == "http://x")
        assert await _closed_by_peer(reader)
        await _wait_for(lambda: 2 in a.down)
        writer.close()
    finally:
        await a.transport.close()


async def test_idle_connections_stay_up_on_pings() -> None:
    peers = _peers()
    options = {"ping_interval_s": 0.02, "dead_after_s": 0.1}
    a, b = _Node(1, peers, **options), _Node(2, peers, **options)
    await a.transport.start()
    await b.transport.start()
    try:
        await _wait_for(lambda: a.transport.is_connected(2) and b.transport.is_connected(1))
        # Idle for many times dead_after_s: pings keep every connection up. The barrier is a
        # round trip through both transports, not a sleep that decides the outcome.
        for i in range(20):
            a.transport.send(_append(2, 1, i))
            await _wait_for(lambda i=i: len(b.received) == i + 1)
            await asyncio.sleep(0.03)
        assert a.down == [] and b.down == []
    finally:
        await a.transport.close()
        await b.transport.close()


async def test_a_one_way_stall_is_redialled_by_the_side_that_still_hears() -> None:
    """Only 1 -> 2 stalls: node 1 still hears node 2 (its pings flow), so node 1 cannot see
    the silence; node 2 does, and its new connection tells node 1 to redial."""
    peers = _peers()
    rng = random.Random(4)
    proxies = {
        (1, 2): LinkProxy("1->2", ("127.0.0.1", int(peers[2].split(":")[1])), rng),
        (2, 1): LinkProxy("2->1", ("127.0.0.1", int(peers[1].split(":")[1])), rng),
    }
    for proxy in proxies.values():
        await proxy.start()
    options = {"ping_interval_s": 0.02, "dead_after_s": 0.1, "handshake_timeout_s": 0.3}
    a = _Node(1, {1: peers[1], 2: proxies[(1, 2)].address}, listen=peers[1], **options)
    b = _Node(2, {1: proxies[(2, 1)].address, 2: peers[2]}, listen=peers[2], **options)
    await a.transport.start()
    await b.transport.start()
    try:
        a.transport.send(_append(2, 1, 0))
        await _wait_for(lambda: len(b.received) == 1)
        proxies[(1, 2)].set_faults(LinkFaults(stall=True))
        await _wait_for(lambda: 1 in b.down)  # node 2 noticed the silence
        await _wait_for(lambda: 2 in a.down)  # ... and node 1 redialled on its new connection
        proxies[(1, 2)].heal()

        def delivered() -> bool:
            a.transport.send(_append(2, 1, 1))
            return any(m.index == 1 for m in b.received)

        await _wait_for(delivered)
    finally:
        await a.transport.close()
        await b.transport.close()
        for proxy in proxies.values():
            await proxy.close()


async def test_a_stalled_link_is_redialled_and_messages_flow_after_the_heal() -> None:
    """Issue 12 item 14, end to end: a partition that stalls both directions (no RST, no
    FIN, as a network that drops packets) and then heals. The stalled connections never
    resume; without liveness checks nothing would reach the peer again."""
    peers = _peers()
    rng = random.Random(3)
    proxies = {
        (1, 2): LinkProxy("1->2", ("127.0.0.1", int(peers[2].split(":")[1])), rng),
        (2, 1): LinkProxy("2->1", ("127.0.0.1", int(peers[1].split(":")[1])), rng),
    }
    for proxy in proxies.values():
        await proxy.start()
    options = {"ping_interval_s": 0.02, "dead_after_s": 0.1, "handshake_timeout_s": 0.3}
    a = _Node(1, {1: peers[1], 2: proxies[(1, 2)].address}, listen=peers[1], **options)
    b = _Node(2, {1: proxies[(2, 1)].address, 2: peers[2]}, listen=peers[2], **options)
    await a.transport.start()
    await b.transport.start()
    try:
        a.transport.send(_append(2, 1, 0))
        await _wait_for(lambda: len(b.received) == 1)
        for proxy in proxies.values():
            proxy.set_faults(LinkFaults(stall=True))
        await _wait_for(lambda: 2 in a.down and 1 in b.down)
        for proxy in proxies.values():
            proxy.heal()

        def delivered() -> bool:
            a.transport.send(_append(2, 1, 1))
            b.transport.send(_append(1, 2, 1))
            return any(m.index == 1 for m in b.received) and a.received != []

        await _wait_for(delivered)
        assert sum(p.connections_stalled for p in proxies.values()) >= 2
    finally:
        await a.transport.close()
        await b.transport.close()
        for proxy in proxies.values():
            await proxy.close()


def _probing(node: _Node, peer_id: int) -> bool:
    return node.transport._peers[peer_id].probe is not None


async def test_a_blip_that_resets_every_connection_reports_no_peer_down() -> None:
    """Issue 12 item 6: a blip at a live node's network resets all its connections at once.
    Every follower reporting the leader down on that voided its lease and deposed it. The
    peer still accepts and handshakes, so the redial completes and nothing is reported."""
    peers = _peers()
    rng = random.Random(5)
    proxies = {
        (1, 2): LinkProxy("1->2", ("127.0.0.1", int(peers[2].split(":")[1])), rng),
        (2, 1): LinkProxy("2->1", ("127.0.0.1", int(peers[1].split(":")[1])), rng),
    }
    for proxy in proxies.values():
        await proxy.start()
    a = _Node(1, {1: peers[1], 2: proxies[(1, 2)].address}, listen=peers[1], probe_window_s=2.0)
    b = _Node(2, {1: proxies[(2, 1)].address, 2: peers[2]}, listen=peers[2], probe_window_s=2.0)
    await a.transport.start()
    await b.transport.start()
    try:
        a.transport.send(_append(2, 1, 0))
        b.transport.send(_append(1, 2, 0))
        await _wait_for(lambda: len(b.received) == 1 and len(a.received) == 1)
        for proxy in proxies.values():
            # Reset every connection of the link now; new ones are accepted again at once.
            proxy.set_faults(LinkFaults(reset=True))
            proxy.heal()

        def delivered() -> bool:
            a.transport.send(_append(2, 1, 1))
            b.transport.send(_append(1, 2, 1))
            return any(m.index == 1 for m in b.received) and any(m.index == 1 for m in a.received)

        await _wait_for(delivered)
        # Both sides probed (their connections were reset) and the probes found the peer up.
        await _wait_for(lambda: not _probing(a, 2) and not _probing(b, 1))
        for proxy in proxies.values():
            assert proxy.connections_broken >= 1 and proxy.connections_accepted >= 2
        assert a.down == [] and b.down == []
    finally:
        await a.transport.close()
        await b.transport.close()
        for proxy in proxies.values():
            await proxy.close()


async def test_a_peer_whose_process_is_gone_is_reported_at_once_and_once() -> None:
    """The redial after the close is refused: reported as soon as that is known, not after
    the probe window (SIGKILL failover must stay fast); both closed connections, one report."""
    peers = _peers()
    a, b = _Node(1, peers, probe_window_s=5.0), _Node(2, peers)
    await a.transport.start()
    await b.transport.start()
    try:
        await _wait_for(lambda: a.transport.is_connected(2) and b.transport.is_connected(1))
        await b.transport.close()  # its listener and both connections close
        await _wait_for(lambda: 2 in a.down, timeout_s=2.5)  # well before the window ends
        assert a.down == [2] and not _probing(a, 2)
    finally:
        await a.transport.close()


@pytest.mark.parametrize("stalled", [False, True], ids=["loop_running", "loop_stalled"])
async def test_a_peer_that_accepts_but_never_handshakes_is_reported_after_the_window(
    stalled: bool,
) -> None:
    """A frozen process: its listening socket still completes TCP connects (the kernel's
    backlog), but nobody answers the handshake. Neither refused nor answered: reported when
    the probe window ends.

    `stalled`, the soak's case: a follower's loop stalled (a 0.27 s garbage collection) just
    after a connection to its leader closed; when it ran again the probe window had long
    passed with the redial's answer unread, and it reported its live leader down. A window
    that ends more than twice over is followed by one more, from when the loop runs again;
    a peer that still does not answer is reported then."""
    window_s = 0.2
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(8)  # never accepted
    peers = {1: f"127.0.0.1:{_free_port()}", 2: f"127.0.0.1:{frozen.getsockname()[1]}"}
    a = _Node(1, peers, probe_window_s=window_s, handshake_timeout_s=5.0, dead_after_s=5.0)
    loop = asyncio.get_running_loop()
    reported: list[float] = []
    a.transport._on_peer_down = lambda peer: reported.append(loop.time())
    await a.transport.start()
    host, port = peers[1].split(":")
    try:
        # Node 2 dialled us before it froze; that connection now closes.
        reader, writer = await asyncio.open_connection(host, int(port))
        await _handshake_as(reader, writer)
        await _wait_for(lambda: a.transport.peer_urls.get(2) == "http://x")
        window_from = loop.time()
        writer.close()
        if stalled:
            await _wait_for(lambda: _probing(a, 2))
            time.sleep(3 * window_s)  # the fault: our own loop stalls through the window
            window_from = loop.time()
        await _wait_for(lambda: reported != [])
        assert reported[0] - window_from >= window_s - 0.005
        assert len(reported) == 1 and not _probing(a, 2)
    finally:
        await a.transport.close()
        frozen.close()


def _probe_verdicts(cluster: LocalCluster, node_id: int, peer_id: int) -> tuple[int, int]:
    """How many probes of `peer_id` by `node_id` ended as a blip, and how many times the core
    was told it is down (RawNode.report_peer_down's line, whatever told it)."""
    log = cluster.log_path(node_id).read_text(errors="replace")
    return log.count(f"event=peer_blip peer={peer_id}\n"), log.count(
        f"event=leader_reported_down node={node_id} leader={peer_id}"
    )


async def test_a_blip_at_a_live_leaders_network_does_not_depose_it(tmp_path: Path) -> None:
    """Issue 12 item 6, end to end: three `kvstore serve` processes whose peer links pass
    through kvstore.chaos.proxy. Every connection of the leader is reset at once, and the
    links accept new ones at once (a blip, not an outage). Each follower's probe finds the
    leader up and reports nothing, so the leader and its term stay. Before, both followers
    voided its lease at once, granted each other's pre-vote and elected another leader."""
    peer_ports = {i: free_port() for i in (1, 2, 3)}
    mesh = ProxyMesh({i: ("127.0.0.1", port) for i, port in peer_ports.items()}, random.Random(6))
    await mesh.start()
    cluster = LocalCluster(
        tmp_path, 3, peer_ports=list(peer_ports.values()), peer_addresses=mesh.dial_addresses()
    )
    # The proxies run on this loop: every blocking call on the cluster goes to a thread.
    try:
        await asyncio.to_thread(cluster.start)
        leader = await asyncio.to_thread(cluster.wait_for_leader, 15.0)
        followers = [i for i in cluster.ids if i != leader]
        leader_links = [p for (source, target), p in mesh.links.items() if leader in (source, target)]
        await _wait_for(lambda: all(p._connections for p in leader_links), 10.0)
        status = await asyncio.to_thread(cluster.status, leader)
        assert status is not None
        term = status["term"]
        before = {i: _probe_verdicts(cluster, i, leader) for i in followers}
        for proxy in leader_links:
            proxy.set_faults(LinkFaults(reset=True))
            proxy.heal()

        def probed() -> bool:
            return all(
                sum(_probe_verdicts(cluster, i, leader)) > sum(before[i]) for i in followers
            )

        # Each follower's probe of the leader has ended: its verdict is final.
        await _wait_for(probed, 10.0)
        for i in followers:
            assert _probe_verdicts(cluster, i, leader)[1] == before[i][1], f"node {i} reported"
        for i in cluster.ids:
            status = await asyncio.to_thread(cluster.status, i)
            assert status is not None
            assert (status["leader_id"], status["term"]) == (leader, term), status
        assert all(p.connections_broken >= 1 for p in leader_links)
    finally:
        await asyncio.to_thread(cluster.stop)
        await mesh.close()


async def test_a_connection_whose_handler_starts_after_close_is_aborted() -> None:
    """A connection accepted as the transport closes gets a handler that may run only after
    `close` cancelled the handlers it knew. It must not live on reading for the closed
    transport: with the empty-directory check's transport (which drops every message) that
    left a link silent one way while both ends thought it up, and two live nodes of three
    elected no one after the third died."""
    peers = _peers()
    node = _Node(1, peers)
    await node.transport.start()
    await node.transport.close()

    class _Writer:
        aborted = False

        def __init__(self) -> None:
            self.transport = self

        def abort(self) -> None:
            self.aborted = True

        def get_extra_info(self, name: str) -> Any:
            return ("127.0.0.1", 1) if name == "peername" else None

        def is_closing(self) -> bool:
            return self.aborted

        def close(self) -> None:
            self.aborted = True

    reader = asyncio.StreamReader()
    sent = encode_frame(b"\x00" * 16)  # whatever the peer sent: it must not be read
    reader.feed_data(sent)
    reader.feed_eof()
    writer = _Writer()
    task = asyncio.ensure_future(node.transport._serve_inbound(reader, writer))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            await task
    finally:
        task.cancel()
    assert writer.aborted
    assert await reader.read() == sent, "the closed transport read the connection"


async def test_flush_puts_queued_messages_on_the_wire_before_the_loop_turns() -> None:
    # The driver flushes a leader's appends before an inline save blocks the loop for its
    # fsync: the followers must get them while the leader's loop is blocked, not after.
    # The receiver runs on a loop of its own (a thread), so it reads while this loop blocks.
    import threading

    peers = _peers()
    loop_b = asyncio.new_event_loop()
    thread = threading.Thread(target=loop_b.run_forever, daemon=True)
    thread.start()

    async def start_b() -> _Node:
        node = _Node(2, peers)
        await node.transport.start()
        return node

    b = asyncio.run_coroutine_threadsafe(start_b(), loop_b).result(10)
    a = _Node(1, peers)
    await a.transport.start()
    try:
        a.transport.send(_append(2, 1, 0))
        await _wait_for(lambda: len(b.received) == 1)
        # Its pump idle again, waiting for work (the state `flush` bypasses).
        await _wait_for(lambda: a.transport._peers[2].waiter is not None)
        a.transport.send(_append(2, 1, 1))
        a.transport.flush()
        deadline = time.monotonic() + 5
        while len(b.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # blocks this loop, as an inline fsync does
        assert [m.index for m in b.received] == [0, 1]
        # Order holds between flushed messages and the pump's own.
        for i in range(2, 400):
            a.transport.send(_append(2, 1, i))
            if i % 3 == 0:
                a.transport.flush()
            if i % 7 == 0:
                await asyncio.sleep(0)
        await _wait_for(lambda: len(b.received) == 400)
        assert [m.index for m in b.received] == list(range(400))
    finally:
        await a.transport.close()
        asyncio.run_coroutine_threadsafe(b.transport.close(), loop_b).result(10)
        loop_b.call_soon_threadsafe(loop_b.stop)
        thread.join(10)
        loop_b.close()
