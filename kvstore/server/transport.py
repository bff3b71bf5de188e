"""The peer transport: persistent TCP connections carrying Raft messages between nodes.

Each node dials one outbound connection to every peer and only writes Raft messages on it;
it reads Raft messages from the connections its peers dialed to it. So every ordered pair of
nodes has its own stream, and a slow reader never blocks the other direction.

Wire format (asyncio streams on the peer port): frames of a 4-byte big-endian length, a
4-byte big-endian CRC32 of the payload, and the payload (a proxy that drops bytes mid-stream
must never make a garbled frame decode into a valid-looking message). The first frame each way is a handshake, `kvstore.codec.pack(["kvstore-peer", 1,
cluster_id, node_id, client_url])`; every later frame is `kvstore.codec.encode_message`.

Rules that hold here:
- A handshake with another cluster id, an unknown node id, a checksum mismatch, or any
  malformed frame is logged
  and the connection closed; nothing from it ever reaches the Raft core.
- `send()` never blocks: each peer has a bounded queue, and a full queue drops the message
  (Raft retransmits; a dropped message costs latency, never safety).
- One writer task per peer takes everything queued and writes it with one `writelines`.
- A dropped outbound connection is redialed with capped exponential back-off and jitter.
- When any connection to a peer closes, `on_peer_down(peer)` is called, so the driver can
  tell the core at once (`RawNode.report_peer_down`) instead of waiting for a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.codec import encode_message, message_from_obj, pack, unpack
from kvstore.errors import ProtocolError
from kvstore.raft.types import Message, MessageType
from kvstore.server.discovery import resolve_address, split_host_port

logger = logging.getLogger("kvstore.server")

_HEADER = struct.Struct(">II")  # length, crc32
_MAGIC = "kvstore-peer"
_VERSION = 1
FRAME_BYTES_MAX = 256 << 20
_HANDSHAKE_TIMEOUT_S = 5.0
_READ_CHUNK_BYTES = 256 << 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Handshake:
    cluster_id: str
    node_id: int
    client_url: str


def encode_frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _check_crc(payload: bytes, crc: int) -> bytes:
    if zlib.crc32(payload) != crc:
        raise ProtocolError("frame checksum mismatch")
    return payload


def encode_handshake(handshake: Handshake) -> bytes:
    return encode_frame(
        pack([_MAGIC, _VERSION, handshake.cluster_id, handshake.node_id, handshake.client_url])
    )


def decode_handshake(payload: bytes) -> Handshake:
    obj = unpack(payload)
    if not isinstance(obj, list) or len(obj) != 5 or obj[0] != _MAGIC or obj[1] != _VERSION:
        raise ProtocolError("not a kvstore peer handshake")
    _, _, cluster_id, node_id, client_url = obj
    if not isinstance(cluster_id, str) or not isinstance(client_url, str):
        raise ProtocolError("handshake: cluster id and client url must be strings")
    if not isinstance(node_id, int) or isinstance(node_id, bool) or node_id < 1:
        raise ProtocolError(f"handshake: bad node id {node_id!r}")
    return Handshake(cluster_id=cluster_id, node_id=node_id, client_url=client_url)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(_HEADER.size)
    length, crc = _HEADER.unpack(header)
    if length == 0 or length > FRAME_BYTES_MAX:
        raise ProtocolError(f"frame length {length} out of range")
    return _check_crc(await reader.readexactly(length), crc)


class _FrameBuffer:
    """Splits a byte stream into frames; bounded by FRAME_BYTES_MAX per frame."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        offset = 0
        buffer = self._buffer
        header_size = _HEADER.size
        while len(buffer) - offset >= header_size:
            length, crc = _HEADER.unpack_from(buffer, offset)
            if length == 0 or length > FRAME_BYTES_MAX:
                raise ProtocolError(f"frame length {length} out of range")
            end = offset + header_size + length
            if end > len(buffer):
                break
            frames.append(_check_crc(bytes(buffer[offset + header_size : end]), crc))
            offset = end
        if offset:
            del buffer[:offset]
        return frames


class _Peer:
    """The outbound side of one peer: its queue, its connection task and its state."""

    def __init__(self, peer_id: int, address: str, queue_frames_max: int) -> None:
        self.id = peer_id
        self.address = address
        self.queue: list[Message] = []
        self.queue_frames_max = queue_frames_max
        self.wakeup = asyncio.Event()
        self.redial = asyncio.Event()
        self.connected = False
        self.dropped = 0


class PeerTransport:
    """Sends and receives Raft messages; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        node_id: int,
        cluster_id: str,
        client_url: str,
        listen: str,
        peers: dict[int, str],
        on_message: Callable[[Message], None],
        on_peer_down: Callable[[int], None],
        on_peer_url: Callable[[int, str], None] | None = None,
        on_snapshot_status: Callable[[int, bool], None] | None = None,
        queue_frames_max: int = 8192,
        on_drop: Callable[[int], None] | None = None,
        backoff_initial_s: float = 0.02,
        backoff_max_s: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.client_url = client_url
        self.listen = listen
        self._peers = {
            peer_id: _Peer(peer_id, address, queue_frames_max)
            for peer_id, address in peers.items()
            if peer_id != node_id
        }
        self._on_message = on_message
        self._on_peer_down = on_peer_down
        self._on_peer_url = on_peer_url
        self._on_snapshot_status = on_snapshot_status
        # Told the peer's id for every message dropped on a full queue (the metrics count it).
        self._on_drop = on_drop
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.peer_urls: dict[int, str] = {}
        self.frames_rejected = 0
        self.bound_port = 0

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        self._server = await asyncio.start_server(
            self._serve_inbound, host, port, limit=_READ_CHUNK_BYTES, reuse_address=True
        )
        self.bound_port = self._server.sockets[0].getsockname()[1]
        for peer in self._peers.values():
            self._spawn(self._run_outbound(peer), f"peer-out-{peer.id}")

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _spawn(self, coroutine: object, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- sending -----------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message for its peer; drop it (and count) when that queue is full."""
        peer = self._peers.get(message.to)
        if peer is None:
            logger.debug("event=send_unknown_peer to=%s", message.to)
            return
        if len(peer.queue) >= peer.queue_frames_max:
            peer.dropped += 1
            if self._on_drop is not None:
                self._on_drop(peer.id)
            if message.type is MessageType.SNAPSHOT:
                self._snapshot_status(peer.id, [message], ok=False)
            return
        peer.queue.append(message)
        peer.wakeup.set()

    def is_connected(self, peer_id: int) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.connected

    def dropped(self, peer_id: int) -> int:
        peer = self._peers.get(peer_id)
        return 0 if peer is None else peer.dropped

    async def _run_outbound(self, peer: _Peer) -> None:
        backoff = self._backoff_initial_s
        while not self._closing:
            try:
                reader, writer = await self._dial(peer)
            except (OSError, ProtocolError, asyncio.IncompleteReadError, TimeoutError) as exc:
                logger.debug("event=dial_failed peer=%s error=%r", peer.id, exc)
                # Back off, but dial at once when the peer dials us: it has just come up.
                peer.redial.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff * (0.5 + self._rng.random())):
                        await peer.redial.wait()
                backoff = min(backoff * 2, self._backoff_max_s)
                continue
            backoff = self._backoff_initial_s
            peer.connected = True
            logger.info("event=peer_connected peer=%s direction=out", peer.id)
            try:
                await self._pump(peer, reader, writer)
            except Exception:
                # Whatever broke this connection must not end the peer's task: without it
                # nothing would ever be sent to the peer again. Log it and dial anew.
                logger.exception("event=peer_pump_failed peer=%s", peer.id)
            finally:
                peer.connected = False
                writer.close()
            if not self._closing:
                logger.info("event=peer_disconnected peer=%s direction=out", peer.id)
                self._on_peer_down(peer.id)

    async def _dial(self, peer: _Peer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = resolve_address(peer.address)
        async with asyncio.timeout(_HANDSHAKE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(encode_handshake(self._handshake()))
                answer = decode_handshake(await _read_frame(reader))
                self._check_handshake(answer, expected_id=peer.id)
            except BaseException:
                writer.close()
                raise
        self._learn_url(answer)
        return reader, writer

    async def _pump(
        self, peer: _Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Write queued frames until the connection fails; the peer never writes back, so a
        read returning EOF means the connection is gone (the peer died or closed it)."""
        eof = asyncio.ensure_future(reader.read(1))
        try:
            while not eof.done():
                if not peer.queue:
                    peer.wakeup.clear()
                    wake = asyncio.ensure_future(peer.wakeup.wait())
                    await asyncio.wait((eof, wake), return_when=asyncio.FIRST_COMPLETED)
                    wake.cancel()
                    continue
                batch, peer.queue = peer.queue, []
                try:
                    if writer.is_closing():
                        # uvloop raises RuntimeError on a write to a transport that a reset
                        # has already closed; it is a broken connection like any other.
                        raise ConnectionResetError("the connection was closed under us")
                    writer.writelines([encode_frame(encode_message(m)) for m in batch])
                    await writer.drain()
                except BaseException:
                    self._snapshot_status(peer.id, batch, ok=False)
                    raise
                self._snapshot_status(peer.id, batch, ok=True)
        except (OSError, ConnectionError) as exc:
            logger.debug("event=peer_write_failed peer=%s error=%r", peer.id, exc)
        finally:
            eof.cancel()

    def _snapshot_status(self, peer_id: int, batch: list[Message], *, ok: bool) -> None:
        """Tell the core whether a snapshot left (RawNode.report_snapshot)."""
        if self._on_snapshot_status is None:
            return
        for message in batch:
            if message.type is MessageType.SNAPSHOT:
                self._on_snapshot_status(peer_id, ok)

    # --- receiving ---------------------------------------------------------------------

    async def _serve_inbound(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        remote = writer.get_extra_info("peername")
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        peer_id = 0
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT_S):
                hello = decode_handshake(await _read_frame(reader))
            self._check_handshake(hello, expected_id=None)
            peer_id = hello.node_id
            writer.write(encode_handshake(self._handshake()))
            self._peers[peer_id].redial.set()
            self._learn_url(hello)
            logger.info("event=peer_connected peer=%s direction=in", peer_id)
            await self._read_messages(peer_id, reader)
        except ProtocolError as exc:
            self.frames_rejected += 1
            logger.warning(
                "event=peer_rejected remote=%s peer=%s reason=%r", remote, peer_id, str(exc)
            )
        except (asyncio.IncompleteReadError, ConnectionError, OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # Closing the transport cancels this task; end it normally, because asyncio's
            # stream callback logs a cancelled connection handler as an error.
            pass
        finally:
            writer.close()
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            if peer_id and not self._closing:
                logger.info("event=peer_disconnected peer=%s direction=in", peer_id)
                self._on_peer_down(peer_id)

    async def _read_messages(self, peer_id: int, reader: asyncio.StreamReader) -> None:
        frames = _FrameBuffer()
        while True:
            data = await reader.read(_READ_CHUNK_BYTES)
            if not data:
                return
            for payload in frames.feed(data):
                message = message_from_obj(unpack(payload))
                if message.from_ != peer_id or message.to != self.node_id:
                    raise ProtocolError(
                        f"message from {message.from_} to {message.to} on the stream of {peer_id}"
                    )
                self._on_message(message)

    # --- handshake ---------------------------------------------------------------------

    def _handshake(self) -> Handshake:
        return Handshake(
            cluster_id=self.cluster_id, node_id=self.node_id, client_url=self.client_url
        )

    def _check_handshake(self, hello: Handshake, *, expected_id: int | None) -> None:
        if hello.cluster_id != self.cluster_id:
            raise ProtocolError(
                f"cluster id {hello.cluster_id!r} does not match ours ({self.cluster_id!r})"
            )
        if expected_id is not None and hello.node_id != expected_id:
            raise ProtocolError(f"expected node {expected_id}, reached node {hello.node_id}")
        if hello.node_id not in self._peers:
            raise ProtocolError(f"node {hello.node_id} is not a peer of node {self.node_id}")

    def _learn_url(self, hello: Handshake) -> None:
        if self.peer_urls.get(hello.node_id) != hello.client_url:
            self.peer_urls[hello.node_id] = hello.client_url
            if self._on_peer_url is not None:
                self._on_peer_url(hello.node_id, hello.client_url)
