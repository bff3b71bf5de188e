"""Peer authentication (kvstore/server/peerauth.py) through the transport, and the attacks of
issue 16 by a process that knows the cluster id but not the secret.

Each attack is also run by a process that does know the secret (the control): there the same
frames reach the node, so a refusal seen here is the authentication's doing, not a malformed
test frame's.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvstore.codec import encode_message
from kvstore.kv.commands import Put, encode_command
from kvstore.raft.config import RaftConfig
from kvstore.raft.node import RawNode
from kvstore.raft.types import Entry, Message, MessageType
from kvstore.server import peerauth
from kvstore.server.config import ServeConfig, load_config
from kvstore.server.localcluster import LocalCluster
from kvstore.server.transport import PeerTransport, encode_frame
from kvstore.storage.memory import MemoryStorage

SECRET = b"s3cret-of-the-test-cluster-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


class _Node:
    def __init__(self, node_id: int, peers: dict[int, str], secret: bytes = SECRET, **options: Any):
        self.received: list[Message] = []
        self.down: list[int] = []
        self.transport = PeerTransport(
            node_id=node_id,
            cluster_id="c1",
            client_url=f"http://client-{node_id}",
            listen=peers[node_id],
            peers=peers,
            on_message=self.received.append,
            on_peer_down=self.down.append,
            cluster_secret=secret,
            **options,
        )


def _peers() -> dict[int, str]:
    return {1: f"127.0.0.1:{_free_port()}", 2: f"127.0.0.1:{_free_port()}"}


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    length, _ = struct.unpack(">II", await reader.readexactly(8))
    return await reader.readexactly(length)


async def _closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = 2.0) -> bool:
    async with asyncio.timeout(timeout_s):
        try:
            while await reader.read(1 << 16):
                pass
        except ConnectionError:
            pass
    return True


async def _attack(
    address: str,
    frames: list[bytes],
    *,
    secret: bytes,
    node_id: int = 2,
    url: str = "http://x",
    to: int = 1,
    cluster_id: str = "c1",
) -> asyncio.StreamReader:
    """Dial `address` as `node_id` (right cluster id), prove `secret`, then send `frames`."""
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    hello = peerauth.new_hello(cluster_id=cluster_id, node_id=node_id, to=to, client_url=url)
    writer.write(encode_frame(peerauth.encode_handshake(hello)))
    answer = peerauth.decode_handshake(await _read_frame(reader))
    proof = peerauth.prove(secret, peerauth.DIALER, hello, answer)
    writer.write(encode_frame(peerauth.encode_proof(proof)) + b"".join(frames))
    await writer.drain()
    return reader


def _core() -> RawNode:
    """Node 1 of {1, 2, 3}, a follower of node 2 at term 5 with one entry."""
    storage = MemoryStorage()
    core = RawNode(RaftConfig(id=1, peers=(1, 2, 3)), storage, random.Random(1))
    core.step(Message(MessageType.HEARTBEAT, to=1, from_=2, term=5))
    return core


def _state(core: RawNode) -> tuple[int, int, object]:
    status = core.status()
    return status.term, status.last_index, status.role


def _forged(core: RawNode) -> dict[str, Message]:
    """The issue's forged frames, claiming to come from node 2 at the node's term."""
    term = core.term
    put = Put(key="forged", value=b"evil", request=None, time_ms=0)
    return {
        "append at the current term": Message(
            MessageType.APPEND,
            to=1,
            from_=2,
            term=term,
            log_term=0,
            index=0,
            entries=(Entry(term=term, index=1, data=encode_command(put)),),
            commit=1,
        ),
        "timeout now": Message(MessageType.TIMEOUT_NOW, to=1, from_=2, term=term),
        "heartbeat at term + 1000": Message(MessageType.HEARTBEAT, to=1, from_=2, term=term + 1000),
    }


@pytest.mark.parametrize(
    "attack", ["append at the current term", "timeout now", "heartbeat at term + 1000"]
)
async def test_a_forged_frame_without_the_secret_never_reaches_raft(attack: str) -> None:
    peers = _peers()
    peers[3] = f"127.0.0.1:{_free_port()}"
    node = _Node(1, peers)
    core = _core()
    node.transport._on_message = core.step
    await node.transport.start()
    try:
        before = _state(core)
        frame = encode_frame(encode_message(_forged(core)[attack]))
        for secret in (b"", b"a-guessed-secret-that-is-wrong", b"kvstore", b"c1"):
            reader = await _attack(peers[1], [frame], secret=secret)
            assert await _closed_by_peer(reader)
        await _wait_for(lambda: node.transport.handshakes_failed == 4)
        assert _state(core) == before
        assert node.transport.peer_urls == {}
        # The control: the same frame from a process that proves the secret does reach Raft.
        reader = await _attack(peers[1], [frame], secret=SECRET)
        await _wait_for(lambda: _state(core) != before)
    finally:
        await node.transport.close()


async def test_frames_sent_in_place_of_the_proof_are_refused() -> None:
    """An attacker that skips the proof: its first frame is read as the proof, and refused."""
    peers = _peers()
    node = _Node(1, peers)
    await node.transport.start()
    host, port = peers[1].split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        hello = peerauth.new_hello(cluster_id="c1", node_id=2, to=1, client_url="http://x")
        heartbeat = Message(MessageType.HEARTBEAT, to=1, from_=2, term=1000)
        writer.write(encode_frame(peerauth.encode_handshake(hello)))
        writer.write(encode_frame(encode_message(heartbeat)) * 3)
        await writer.drain()
        assert await _closed_by_peer(reader)
        assert node.received == [] and node.transport.frames_rejected == 1
        writer.close()
    finally:
        await node.transport.close()


async def test_the_acceptors_proof_reflected_back_is_refused() -> None:
    """The proofs are bound to the role: the answer's proof cannot be sent back as ours."""
    peers = _peers()
    node = _Node(1, peers)
    await node.transport.start()
    host, port = peers[1].split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        hello = peerauth.new_hello(cluster_id="c1", node_id=2, to=1, client_url="http://x")
        writer.write(encode_frame(peerauth.encode_handshake(hello)))
        answer = peerauth.decode_handshake(await _read_frame(reader))
        assert len(answer.proof) == peerauth.PROOF_BYTES
        writer.write(encode_frame(peerauth.encode_proof(answer.proof)))
        await writer.drain()
        assert await _closed_by_peer(reader)
        assert node.transport.frames_rejected == 1 and node.transport.peer_urls == {}
        writer.close()
    finally:
        await node.transport.close()


async def test_nodes_with_the_same_secret_talk_and_with_another_do_not() -> None:
    peers = _peers()
    a, b = _Node(1, peers), _Node(2, peers)
    await a.transport.start()
    await b.transport.start()
    try:
        b.transport.send(Message(MessageType.HEARTBEAT, to=1, from_=2, term=3))
        await _wait_for(lambda: len(a.received) == 1)
        assert a.transport.peer_urls[2] == "http://client-2"
        assert b.transport.peer_urls[1] == "http://client-1"
    finally:
        await a.transport.close()
        await b.transport.close()
    peers = _peers()
    a, b = _Node(1, peers), _Node(2, peers, secret=b"another-secret-of-16-bytes-or-more")
    await a.transport.start()
    await b.transport.start()
    try:
        b.transport.send(Message(MessageType.HEARTBEAT, to=1, from_=2, term=3))
        a.transport.send(Message(MessageType.HEARTBEAT, to=2, from_=1, term=3))
        # Each side refuses the other's dial: as acceptor (bad dialer proof, never sent: the
        # dialer stops at the acceptor's bad proof) or as dialer.
        await _wait_for(
            lambda: a.transport.handshakes_failed >= 2 and b.transport.handshakes_failed >= 2
        )
        assert a.received == [] and b.received == []
        assert a.transport.peer_urls == {} and b.transport.peer_urls == {}
        assert not a.transport.is_connected(2) and not b.transport.is_connected(1)
    finally:
        await a.transport.close()
        await b.transport.close()


async def test_handshake_churn_claiming_to_be_the_leader_changes_nothing() -> None:
    """The issue's churn: a handshake as the leader (node 2), then a disconnect, again and
    again. Unauthenticated, it ends no probe, starts none, reports no peer down and redials
    nothing; and the fake client URL it carries is never learnt."""
    peers = _peers()
    a, b = _Node(1, peers), _Node(2, peers)
    await a.transport.start()
    await b.transport.start()
    try:
        await _wait_for(lambda: a.transport.is_connected(2) and b.transport.is_connected(1))
        outbound = a.transport._peers[2]
        connected_at = outbound.connected_at
        for round_ in range(30):
            reader = await _attack(peers[1], [], secret=b"wrong", url="http://attacker:1")
            assert await _closed_by_peer(reader)
            await _wait_for(lambda round_=round_: a.transport.handshakes_failed == round_ + 1)
        assert a.down == [] and outbound.probe is None
        assert outbound.connected_at == connected_at  # our connection to 2 was not redialled
        assert a.transport.peer_urls == {2: "http://client-2"}
        # ... and node 2 still gets through.
        b.transport.send(Message(MessageType.HEARTBEAT, to=1, from_=2, term=3))
        await _wait_for(lambda: len(a.received) == 1)
    finally:
        await a.transport.close()
        await b.transport.close()


async def test_a_dialer_does_not_believe_an_acceptor_without_the_secret() -> None:
    """Something listening at a peer's address (its process is down) answers with a client URL
    of its own: the dialer learns nothing from it and sends it nothing."""
    peers = _peers()
    host, port = peers[2].split(":")
    answered: list[bool] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = peerauth.decode_handshake(await _read_frame(reader))
        answer = peerauth.answer_to(
            hello, secret=b"not-the-secret", cluster_id="c1", node_id=2, client_url="http://evil"
        )
        writer.write(encode_frame(peerauth.encode_handshake(answer)))
        answered.append(True)
        with_data = await reader.read(1 << 16)
        answered.append(bool(with_data))
        writer.close()

    server = await asyncio.start_server(impostor, host, int(port))
    a = _Node(1, peers)
    await a.transport.start()
    try:
        a.transport.send(Message(MessageType.HEARTBEAT, to=2, from_=1, term=3))
        await _wait_for(lambda: len(answered) >= 2)
        assert answered[1] is False  # the dialer closed without sending its proof or a frame
        assert a.transport.peer_urls == {} and not a.transport.is_connected(2)
    finally:
        await a.transport.close()
        server.close()


# --- configuration ---------------------------------------------------------------------------


def _config(**values: Any) -> ServeConfig:
    return ServeConfig(
        id=1,
        peers=((1, values.get("listen_peer", "127.0.0.1:7101")),),
        data_dir=Path("d"),
        **values,
    )


def test_a_non_loopback_peer_port_needs_a_secret_or_an_explicit_trust() -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        _config(listen_peer="0.0.0.0:7101")
    with pytest.raises(ValueError, match="not a loopback address"):
        _config(listen_peer="kv1.example.internal:7101")
    _config(listen_peer="0.0.0.0:7101", cluster_secret="x" * 16)
    _config(listen_peer="0.0.0.0:7101", peer_network_trusted=True)
    for loopback in ("127.0.0.1:7101", "127.0.0.2:7101", "localhost:7101", "[::1]:7101"):
        _config(listen_peer=loopback)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        _config(cluster_secret="short")


def test_the_secret_comes_from_a_file_and_never_shows_in_repr(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  0123456789abcdef0123 \n")
    env = {
        "KVSTORE_ID": "1",
        "KVSTORE_CLUSTER_SECRET_FILE": str(path),
        "KVSTORE_LISTEN_PEER": "0.0.0.0:7101",
    }
    config = load_config(None, env)
    assert config.cluster_secret == "0123456789abcdef0123"
    assert "0123456789abcdef0123" not in repr(config)
    with pytest.raises(ValueError, match="both set"):
        load_config(None, {**env, "KVSTORE_CLUSTER_SECRET": "0123456789abcdef0123"})
    with pytest.raises(ValueError, match="cannot read"):
        load_config(None, {**env, "KVSTORE_CLUSTER_SECRET_FILE": str(tmp_path / "missing")})
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_config(None, env)
    trusted = load_config(
        None,
        {
            "KVSTORE_ID": "1",
            "KVSTORE_LISTEN_PEER": "0.0.0.0:7101",
            "KVSTORE_PEER_NETWORK_TRUSTED": "true",
        },
    )
    assert trusted.peer_network_trusted and trusted.cluster_secret == ""


# --- end to end: the issue's attacks on a real three-node cluster -----------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _request(method: str, url: str, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with _OPENER.open(request, timeout=5.0) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _status(cluster: LocalCluster, node_id: int) -> dict[str, Any]:
    """The node's /v1/status, waiting for an answer (a loaded machine may miss one)."""
    status: dict[str, Any] = cluster.wait_until(
        lambda: cluster.status(node_id), 10.0, f"node {node_id}'s status"
    )
    return status


async def test_the_issues_attacks_on_a_real_cluster_change_nothing(tmp_path: Path) -> None:
    """Every attack of issue 16 against a follower, by a process that knows the cluster id
    (served by /v1/status) but not the secret, claiming to be the leader: a forged append at
    the current term, a forged TIMEOUT_NOW, a heartbeat at term + 1000, a handshake churn and
    a fake client URL. The leader, the term and the data stay; the follower refuses each and
    its 307 still points at the real leader."""
    cluster = LocalCluster(tmp_path, 3)
    try:
        await asyncio.to_thread(cluster.start)
        leader = await asyncio.to_thread(cluster.wait_for_leader, 15.0)
        follower = next(i for i in cluster.ids if i != leader)
        put = await asyncio.to_thread(
            _request, "PUT", cluster.client_url(leader) + "/v1/kv/real", b"acknowledged"
        )
        assert put[0] == 200, put
        leader_term = (await asyncio.to_thread(_status, cluster, leader))["term"]

        def caught_up() -> dict[str, Any] | None:
            # Under load a follower may not have heard from the leader yet: wait until it has.
            status = cluster.status(follower)
            if status and (status["leader_id"], status["term"]) == (leader, leader_term):
                return status
            return None

        status = await asyncio.to_thread(cluster.wait_until, caught_up, 10.0, "follower")
        assert status["cluster_id"] == "kvstore"
        term, last = status["term"], status["last_index"]
        evil = Put(key="real", value=b"forged", request=None, time_ms=0)
        forged = [
            Message(
                MessageType.APPEND,
                to=follower,
                from_=leader,
                term=term,
                log_term=term,
                index=last,
                entries=(Entry(term=term, index=last + 1, data=encode_command(evil)),),
                commit=last + 1,
            ),
            Message(MessageType.TIMEOUT_NOW, to=follower, from_=leader, term=term),
            Message(MessageType.HEARTBEAT, to=follower, from_=leader, term=term + 1000),
        ]
        address = cluster.peer_listen[follower]
        for guess in (b"", b"kvstore", b"a-guessed-secret-that-is-wrong"):
            for message in forged:
                frame = encode_frame(encode_message(message))
                reader = await _attack(
                    address,
                    [frame],
                    secret=guess,
                    node_id=leader,
                    url="http://attacker:1",
                    to=follower,
                    cluster_id="kvstore",
                )
                assert await _closed_by_peer(reader)
        for _ in range(20):  # the churn: a handshake as the leader, then a disconnect
            reader = await _attack(
                address,
                [],
                secret=b"",
                node_id=leader,
                url="http://attacker:1",
                to=follower,
                cluster_id="kvstore",
            )
            assert await _closed_by_peer(reader)
        # A barrier: a write through the follower's leader, committed on every node.
        put = await asyncio.to_thread(
            _request, "PUT", cluster.client_url(leader) + "/v1/kv/after", b"x"
        )
        assert put[0] == 200, put
        for node_id in cluster.ids:
            status = await asyncio.to_thread(_status, cluster, node_id)
            assert (status["leader_id"], status["term"]) == (leader, term), (node_id, status)
        code, _, body = await asyncio.to_thread(
            _request, "GET", cluster.client_url(follower) + "/v1/kv/real"
        )
        assert code == 200 and b"acknowledged" in body, body
        code, headers, _ = await asyncio.to_thread(
            _request, "PUT", cluster.client_url(follower) + "/v1/kv/k", b"v"
        )
        assert code == 307
        assert headers["Location"].startswith(cluster.client_url(leader))
        assert headers["Kvstore-Leader"] == cluster.client_url(leader)
        _, _, metrics = await asyncio.to_thread(
            _request, "GET", cluster.client_url(follower) + "/metrics"
        )
        refused = [
            line for line in metrics.decode().splitlines()
            if line.startswith('kvstore_peer_handshakes_refused_total{direction="in"}')
        ]  # fmt: skip
        assert refused and float(refused[0].split()[-1]) >= 29  # 9 forged + 20 churn
        log = cluster.log_path(follower).read_text(errors="replace")
        assert "event=peer_rejected" in log and "did not prove the cluster secret" in log
    finally:
        await asyncio.to_thread(cluster.stop)
