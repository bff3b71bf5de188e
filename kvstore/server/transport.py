"""The peer transport: persistent TCP connections carrying Raft messages between nodes.

Each node dials one outbound connection to every peer and only writes Raft messages on it;
it reads Raft messages from the connections its peers dialed to it. So every ordered pair of
nodes has its own stream, and a slow reader never blocks the other direction.

Wire format (asyncio streams on the peer port): frames of a 4-byte big-endian length, a
4-byte big-endian CRC32 of the payload, and the payload (a proxy that drops bytes mid-stream
must never make a garbled frame decode into a valid-looking message). The first frame each
frames are the authenticated handshake of kvstore/server/peerauth.py (hello, answer, proof),
each of at most HANDSHAKE_BYTES_MAX; every later frame (dialer to acceptor only) is
`kvstore.codec.encode_message`, of at most `frame_bytes_max`, a ping: a frame with an
empty payload, which a writer sends when it has sent nothing for `ping_interval_s`, or a
frame of a snapshot stream (kvstore/server/snapshot_stream.py: its payloads start with a tag
byte that no encoded message starts with; the follower's ACK goes on its own connection to
the leader).

With TLS on the peer port (kvstore/server/tls.py) both ends speak TLS from the first byte:
the listener completes the TLS handshake within `handshake_timeout_s` before the connection
counts against the bounds below (an upgrade with `start_tls` after the bounds hangs under
uvloop 0.23 on the server side), then each end checks that the other's certificate names the
member it claims to be before answering, and the handshake above runs inside TLS.

Rules that hold here:
- The address book (peer id -> address) is the node's bootstrap `--peers` plus the members
  added at runtime (kvstore/kv/members.py); `set_peers` replaces it whenever the membership
  changes. Only ids in it are dialled or accepted: once a member is removed, its connection
  in is closed at its next frame and its handshakes are refused. One exception: a process
  with an empty data directory asking whether a cluster exists (kvstore/server/identity.py)
  says so in its handshake ("fresh", proven like the rest); it is answered whatever id it
  has (the removed id of its slot, typically), and its connection is closed as soon as the
  handshake completes, before any frame is read.
- Nothing from a connection counts before its handshake has completed, the peer's proof of
  the cluster secret included: no Raft frame is read from it, no client URL is learnt from
  it (the leader URL that a follower's 307 gives out comes only from an authenticated
  member), and it wakes no redial and ends no probe. A connection that closes before then
  is no evidence about any peer either.
- A handshake with another cluster id, an unknown node id, a failed proof, a checksum
  mismatch, or any malformed or out-of-range frame (kvstore.codec checks every field) is
  logged (rate-limited) and the connection closed; nothing from it ever reaches the Raft
  core. A length prefix over the bound is refused before any of the body is read.
- Memory a peer can make us hold is bounded: at most `connections_max` inbound connections
  (`connections_per_source_max` from one address; at the total bound a new connection
  evicts the oldest one still in its handshake, and is refused only if none is), each
  allowed `handshake_timeout_s` to
  complete a handshake of at most HANDSHAKE_BYTES_MAX (a dial gives up after the shorter of
  that and `dead_after_s`), then frames of at most
  `frame_bytes_max`; a sender logs an error instead of sending a frame over it. A snapshot
  is not one frame: it streams in chunks of `snapshot_chunk_bytes`, interleaved with the
  messages (snapshot_stream.py), so no bound limits the size of the store.
- `send()` never blocks: each peer has a bounded queue, and a full queue drops the message
  (Raft retransmits; a dropped message costs latency, never safety).
- One writer task per peer takes everything queued and writes it with one `writelines`.
- A dropped outbound connection is redialed with capped exponential back-off and jitter.
- Liveness: TCP alone notices a connection whose packets are dropped only after minutes of
  retransmission. So an inbound connection on which nothing (not even a ping) has arrived for
  `dead_after_s` is closed, and our outbound connection to that peer is redialled: the two
  directions share the network path, and we cannot read anything on our outbound one. A peer
  that dials us anew tells us it stopped hearing from us, so an outbound connection older than
  `dead_after_s` is redialled then as well (a younger one was just dialled; redialling it too
  would make the two nodes redial each other forever). Peer sockets also set SO_KEEPALIVE and
  TCP_USER_TIMEOUT (Linux) so the kernel gives up on a stalled connection too.
- A peer is reported down (`on_peer_down(peer)`, so the driver tells the core at once,
  `RawNode.report_peer_down`, instead of waiting for an election timeout) only with evidence
  that it is gone, because the core then voids that leader's lease: if every follower did so
  on a blip at a live leader's network, they would depose it (issue 12 item 6). Evidence is:
  - silence on an inbound connection for `dead_after_s` (above): reported at once;
  - a connection to the peer closed (EOF or error), and the redial that follows is refused
    or reset before its handshake completes: the peer's process is gone (a SIGKILL or crash
    on the same host or LAN), reported as soon as the refusal arrives;
  - a connection closed, and no handshake with the peer completes (either way) within
    `probe_window_s` (0.6 heartbeat intervals by default, 30 ms): a timeout, an unreachable
    host or a frozen process that still accepts TCP; reported after that window. A window
    that our own stalled loop let pass more than twice over is not evidence: one more window
    follows it (within `dead_after_s` of the close), as for silence.
  A handshake completed within the window (ours or the peer's redial) is a blip: nothing is
  reported, and the leader's heartbeats flow again on the new connection. The outbound
  writer is the probe: it redials at once when its own connection closes, and is woken from
  its back-off when the peer's (inbound) connection closes. Closes of the same peer (inbound
  and outbound together) share one probe; a peer is reported at most once until a handshake
  with it completes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

from kvstore.codec import encode_message, message_from_obj, unpack
from kvstore.errors import ProtocolError
from kvstore.raft.types import Message, MessageType
from kvstore.server import peerauth
from kvstore.server.discovery import resolve_address, split_host_port
from kvstore.server.peerauth import Handshake
from kvstore.server.snapshot_stream import (
    CHUNK_BYTES_DEFAULT,
    OpenSnapshot,
    SnapshotStreams,
    is_stream_payload,
)
from kvstore.server.tls import TlsContexts, check_fresh_peer_identity, check_peer_identity

logger = logging.getLogger("kvstore.server")

_HEADER = struct.Struct(">II")  # length, crc32
HANDSHAKE_BYTES_MAX = 4 << 10
"""A handshake is ~200 bytes; a longer length prefix is refused before reading the body."""
FRAME_BYTES_MAX_DEFAULT = 256 << 20
"""Default bound of a frame after the handshake (an append carries at most about 1 MiB of
entries; a snapshot streams in small chunks); see ServeConfig.peer_frame_bytes_max."""
_READ_CHUNK_BYTES = 256 << 10
_PING = _HEADER.pack(0, zlib.crc32(b""))
_LOG_INTERVAL_S = 1.0
"""At most one line per kind of rejection per interval: a peer cannot flood the log."""
_PROBE_WINDOW_HEARTBEATS = 0.6
"""Default probe window after a closed connection, in heartbeat (ping) intervals: 30 ms, 3
ticks, at the defaults. A redial to a live peer on a LAN completes in about a millisecond,
so this leaves room for a loaded machine while staying far below the election timeout."""
_GONE_ERRORS = (ConnectionError, asyncio.IncompleteReadError)
"""How a dial fails when the peer's process is gone: refused (nothing listens on its port)
or reset (or closed) before the handshake completes. Timeouts and unreachable hosts are not
evidence: they may be the network, and wait for the probe window instead."""


def encode_frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _check_crc(payload: bytes, crc: int) -> bytes:
    if zlib.crc32(payload) != crc:
        raise ProtocolError("frame checksum mismatch")
    return payload


async def _read_frame(reader: asyncio.StreamReader, bytes_max: int) -> bytes:
    header = await reader.readexactly(_HEADER.size)
    length, crc = _HEADER.unpack(header)
    if length == 0 or length > bytes_max:
        # Refused before reading (or allocating for) the body.
        raise ProtocolError(f"frame length {length} out of range (at most {bytes_max})")
    return _check_crc(await reader.readexactly(length), crc)


class _FrameBuffer:
    """Splits a byte stream into frames of at most `bytes_max`; drops pings (empty frames)."""

    __slots__ = ("_buffer", "_bytes_max")

    def __init__(self, bytes_max: int) -> None:
        self._buffer = bytearray()
        self._bytes_max = bytes_max

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        offset = 0
        buffer = self._buffer
        header_size = _HEADER.size
        while len(buffer) - offset >= header_size:
            length, crc = _HEADER.unpack_from(buffer, offset)
            if length > self._bytes_max:
                raise ProtocolError(f"frame length {length} out of range (at most {self._bytes_max})")
            end = offset + header_size + length
            if end > len(buffer):
                break
            if length:
                frames.append(_check_crc(bytes(buffer[offset + header_size : end]), crc))
            elif crc != _EMPTY_CRC:
                raise ProtocolError("frame checksum mismatch")
            offset = end
        if offset:
            del buffer[:offset]
        return frames


_EMPTY_CRC = zlib.crc32(b"")


class _RateLimitedLog:
    """One warning per kind per _LOG_INTERVAL_S; the lines in between are counted."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -_LOG_INTERVAL_S) < _LOG_INTERVAL_S:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        logger.warning(message + " suppressed=%d", *args, suppressed)


def _tune_socket(writer: asyncio.StreamWriter, user_timeout_ms: int) -> None:
    """Keepalive, and TCP_USER_TIMEOUT where the platform has it: the kernel then drops a
    connection whose sent data stays unacknowledged (dropped packets) instead of retrying
    for minutes."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle_s = max(1, user_timeout_ms // 1000)
        for option, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", idle_s), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)


def _resolve_wait(waiter: asyncio.Future[bool] | None, timed_out: bool = False) -> None:
    """End a pump's wait, if it is still waiting; `timed_out`: by the ping interval."""
    if waiter is not None and not waiter.done():
        waiter.set_result(timed_out)


class _Peer:
    """The outbound side of one peer: its queue, its connection task and its state."""

    def __init__(self, peer_id: int, address: str, queue_frames_max: int) -> None:
        self.id = peer_id
        self.address = address
        # Raft messages, and (bytes) payloads of snapshot stream frames (an ACK).
        self.queue: list[Message | bytes] = []
        self.queue_frames_max = queue_frames_max
        # While the pump waits for something to send: what `send`, a ready snapshot chunk,
        # the connection's end or the ping interval resolves to wake it (`_resolve_wait`).
        self.waiter: asyncio.Future[bool] | None = None
        self.redial = asyncio.Event()
        self.connected = False
        self.dropped = 0
        # The outbound connection while it is up, and when it came up (loop time).
        self.writer: asyncio.StreamWriter | None = None
        self.connected_at = 0.0
        # While a closed connection's probe runs: its deadline (see the module docstring).
        self.probe: asyncio.TimerHandle | None = None
        # Reported down and no handshake with it completed since.
        self.reported_down = False
        # Its outbound task, and whether it left the address book (`set_peers`).
        self.task: asyncio.Task[None] | None = None
        self.removed = False
        # The bootstrap slot it holds, which its TLS certificate may name (0: its id).
        self.slot = 0


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
        cluster_secret: bytes = b"",
        tls: TlsContexts | None = None,
        on_handshake_refused: Callable[[str], None] | None = None,
        on_peer_url: Callable[[int, str], None] | None = None,
        on_snapshot_status: Callable[[int, bool], None] | None = None,
        queue_frames_max: int = 8192,
        on_drop: Callable[[int], None] | None = None,
        backoff_initial_s: float = 0.02,
        backoff_max_s: float = 0.25,
        rng: random.Random | None = None,
        handshake_timeout_s: float = 1.0,
        frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT,
        connections_max: int = 64,
        connections_per_source_max: int = 8,
        ping_interval_s: float = 0.05,
        dead_after_s: float = 0.25,
        probe_window_s: float | None = None,
        snapshot_directory: str | None = None,
        open_snapshot: OpenSnapshot | None = None,
        snapshot_chunk_bytes: int = CHUNK_BYTES_DEFAULT,
        fresh: bool = False,
        name_slot: int = 0,
    ) -> None:
        """`fresh`: this process has an empty data directory and only finds out whether a
        cluster exists (kvstore/server/identity.py): its handshakes say so, and what each
        peer said of itself is kept in `peer_fresh`."""
        self.node_id = node_id
        self.fresh = fresh
        # The bootstrap slot this node holds (its --id), which may differ from its member id
        # after it replaced a lost disk; 0: none.
        self.name_slot = name_slot
        # Peer id -> whether its last completed handshake said it was fresh; and the peers
        # that dialled us saying so (each has seen our answer, so it knows if we are fresh).
        # Every peer that ever said so is in `seen_fresh` (kept at once: a redial can say
        # otherwise a moment later).
        self.peer_fresh: dict[int, bool] = {}
        self.seen_fresh: set[int] = set()
        self.fresh_dialers: set[int] = set()
        self.cluster_id = cluster_id
        self.client_url = client_url
        self.listen = listen
        self._peers = {
            peer_id: _Peer(peer_id, address, queue_frames_max)
            for peer_id, address in peers.items()
            if peer_id != node_id
        }
        self._queue_frames_max = queue_frames_max
        self._started = False
        # The key of the handshake's proofs (kvstore/server/peerauth.py); b"" proves nothing.
        self._secret = cluster_secret
        # Mutual TLS on this port (kvstore/server/tls.py): contexts read at each connection,
        # so a reload applies to the next one.
        self._tls = tls
        # Told "in" or "out" for each connection refused before its handshake completed.
        self._on_handshake_refused = on_handshake_refused
        self._on_message = on_message
        self._on_peer_down = on_peer_down
        self._on_peer_url = on_peer_url
        self._on_snapshot_status = on_snapshot_status
        # Snapshots travel as streams of chunks beside the Raft messages (snapshot_stream.py).
        self.snapshots = SnapshotStreams(
            directory=snapshot_directory,
            open_snapshot=open_snapshot,
            on_message=on_message,
            on_snapshot_status=on_snapshot_status,
            send_payload=self._send_payload,
            wake=self._wake,
            chunk_bytes=min(snapshot_chunk_bytes, frame_bytes_max - 32),
        )
        # Told the peer's id for every message dropped on a full queue (the metrics count it).
        self._on_drop = on_drop
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._handshake_timeout_s = handshake_timeout_s
        self._frame_bytes_max = frame_bytes_max
        self._connections_max = connections_max
        self._connections_per_source_max = connections_per_source_max
        self._ping_interval_s = ping_interval_s
        self._dead_after_s = dead_after_s
        self._probe_window_s = (
            _PROBE_WINDOW_HEARTBEATS * ping_interval_s if probe_window_s is None else probe_window_s
        )
        # The kernel's own limit on unacknowledged data: well past ours, so that it only
        # matters when our check cannot run (a blocked loop), and never under 1 s.
        self._user_timeout_ms = max(1000, int(4000 * dead_after_s))
        # Inbound connections, in total and per source address (before and after handshake).
        self._inbound = 0
        self._inbound_by_source: dict[str, int] = {}
        # Inbound connections whose handshake has not completed, oldest first (dicts keep
        # order): at the total bound the oldest is evicted for a new one.
        self._unauthenticated: dict[asyncio.StreamWriter, None] = {}
        self._log = _RateLimitedLog()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.peer_urls: dict[int, str] = {}
        self.frames_rejected = 0
        # Inbound connections that ended before their handshake completed (refused or not).
        self.handshakes_failed = 0
        # Dials whose handshake (TLS or ours) the other end failed, or we failed on its answer.
        self.dials_rejected = 0
        self.bound_port = 0

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        listener = None if self._tls is None else self._tls.peer_listener
        self._server = await asyncio.start_server(
            self._serve_inbound,
            host,
            port,
            limit=_READ_CHUNK_BYTES,
            reuse_address=True,
            ssl=listener,
            ssl_handshake_timeout=self._handshake_timeout_s if listener else None,
        )
        self.bound_port = self._server.sockets[0].getsockname()[1]
        self._started = True
        for peer in self._peers.values():
            peer.task = self._spawn(self._run_outbound(peer), f"peer-out-{peer.id}")

    def peers(self) -> dict[int, str]:
        """The address book in use: peer id -> the address dialled."""
        return {peer.id: peer.address for peer in self._peers.values()}

    def set_peers(self, book: dict[int, str], slots: dict[int, int] | None = None) -> None:
        """Make `book` (peer id -> address; this node's own id is ignored) the address book,
        when the membership changed: a new member is dialled, a member whose address changed
        is redialled there, and a member that left is forgotten: its outbound connection
        closes, and its connections in (and any new handshake from it) are refused, so
        nothing from a removed id reaches the core any more. `slots`: peer id -> the
        bootstrap slot it holds, for the TLS identity check."""
        book = {peer: address for peer, address in book.items() if peer != self.node_id}
        for peer_id in [p for p in self._peers if p not in book]:
            peer = self._peers.pop(peer_id)
            peer.removed = True
            logger.info("event=peer_removed peer=%s", peer_id)
            if peer.probe is not None:
                peer.probe.cancel()
                peer.probe = None
            if peer.task is not None:
                peer.task.cancel()
            self.peer_urls.pop(peer_id, None)
        for peer_id, address in book.items():
            slot = (slots or {}).get(peer_id, 0)
            known = self._peers.get(peer_id)
            if known is not None:
                known.slot = slot
            if known is None:
                added = self._peers[peer_id] = _Peer(peer_id, address, self._queue_frames_max)
                added.slot = slot
                logger.info("event=peer_added peer=%s address=%s", peer_id, address)
                if self._started and not self._closing:
                    added.task = self._spawn(self._run_outbound(added), f"peer-out-{peer_id}")
            elif known.address != address:
                logger.info("event=peer_address_changed peer=%s address=%s", peer_id, address)
                known.address = address
                self._redial(peer_id, "address_changed")

    async def close(self) -> None:
        self._closing = True
        await self.snapshots.close()
        for peer in self._peers.values():
            if peer.probe is not None:
                peer.probe.cancel()
                peer.probe = None
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

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
            if message.type is MessageType.SNAPSHOT and self._on_snapshot_status is not None:
                self._on_snapshot_status(peer.id, False)
            return
        peer.queue.append(message)
        _resolve_wait(peer.waiter)

    def flush(self) -> None:
        """Write every idle peer's queued messages to its socket now, without waiting for its
        pump task's turn. The driver calls this before it blocks the loop on an inline save:
        a leader's appends then reach the followers while its own fsync runs (dissertation
        §10.2.1) instead of after it. Only a pump that waits for work is bypassed (it is
        then between frames), and only while the kernel has taken everything written so far
        (nothing buffered): otherwise the pump's back-pressure and snapshot chunks keep
        their order and the pump sends the queue itself."""
        for peer in self._peers.values():
            writer = peer.writer
            if (
                not peer.queue
                or peer.waiter is None
                or writer is None
                or writer.is_closing()
                or writer.transport.get_write_buffer_size() > 0
            ):
                continue
            batch, peer.queue = peer.queue, []
            writer.writelines(self._frames(peer.id, batch))

    def _wake(self, peer_id: int) -> None:
        peer = self._peers.get(peer_id)
        if peer is not None:
            _resolve_wait(peer.waiter)

    def _send_payload(self, peer_id: int, payload: bytes) -> None:
        """Queue a snapshot stream frame (an ACK) for `peer_id`, never dropped: one per
        stream, and the stream's leader waits for it."""
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.queue.append(payload)
            _resolve_wait(peer.waiter)

    def is_connected(self, peer_id: int) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.connected

    def dropped(self, peer_id: int) -> int:
        peer = self._peers.get(peer_id)
        return 0 if peer is None else peer.dropped

    async def _run_outbound(self, peer: _Peer) -> None:
        backoff = self._backoff_initial_s
        while not self._closing and not peer.removed:
            try:
                reader, writer = await self._dial(peer)
            except (OSError, ProtocolError, asyncio.IncompleteReadError, TimeoutError) as exc:
                if isinstance(exc, ProtocolError | ssl.SSLError):
                    self.dials_rejected += 1
                    if self._on_handshake_refused is not None:
                        self._on_handshake_refused("out")
                    # The peer answered but did not authenticate (or refused us): a setting
                    # differs (secret, certificate, CA), or it is not our peer at all.
                    self._log.warning(
                        "peer_dial_rejected",
                        "event=peer_dial_rejected peer=%s error=%r",
                        peer.id,
                        str(exc)[:200],
                    )
                logger.debug("event=dial_failed peer=%s error=%r", peer.id, exc)
                if peer.probe is not None and isinstance(exc, _GONE_ERRORS):
                    self._peer_gone(peer, "redial_refused")
                # Back off, but dial at once when the peer dials us: it has just come up.
                peer.redial.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff * (0.5 + self._rng.random())):
                        await peer.redial.wait()
                backoff = min(backoff * 2, self._backoff_max_s)
                continue
            backoff = self._backoff_initial_s
            peer.connected = True
            peer.writer = writer
            peer.connected_at = asyncio.get_running_loop().time()
            logger.info("event=peer_connected peer=%s direction=out", peer.id)
            self._peer_alive(peer)
            try:
                await self._pump(peer, reader, writer)
            except Exception:
                # Whatever broke this connection must not end the peer's task: without it
                # nothing would ever be sent to the peer again. Log it and dial anew.
                logger.exception("event=peer_pump_failed peer=%s", peer.id)
            finally:
                peer.connected = False
                peer.writer = None
                writer.close()
            self._connection_closed(peer.id, "out")

    async def _dial(self, peer: _Peer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = resolve_address(peer.address)
        # Bounded, and short: a dial into a partition hangs (its SYN or handshake is lost),
        # and the first one after the heal must not wait behind it for long. A peer that has
        # not answered within dead_after_s would count as dead on an open connection too.
        async with asyncio.timeout(min(self._handshake_timeout_s, self._dead_after_s)):
            context = None if self._tls is None else self._tls.peer_dial
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host if context else None
            )
            try:
                _tune_socket(writer, self._user_timeout_ms)
                if context is not None:
                    check_peer_identity(
                        writer.get_extra_info("peercert"), peer.id, peer.address, peer.slot
                    )
                hello = peerauth.new_hello(
                    cluster_id=self.cluster_id,
                    node_id=self.node_id,
                    to=peer.id,
                    client_url=self.client_url,
                    fresh=self.fresh,
                )
                writer.write(encode_frame(peerauth.encode_handshake(hello)))
                answer = peerauth.decode_handshake(
                    await _read_frame(reader, HANDSHAKE_BYTES_MAX)
                )
                # A fresh process asks whoever holds the slot now (a new id, after a lost
                # disk): any member of the cluster may answer.
                self._check_handshake(
                    answer, expected_id=None if self.fresh else peer.id, dialing=True
                )
                peerauth.check_proof(self._secret, peerauth.ACCEPTOR, hello, answer, answer.proof)
                proof = peerauth.prove(self._secret, peerauth.DIALER, hello, answer)
                writer.write(encode_frame(peerauth.encode_proof(proof)))
            except BaseException:
                writer.close()
                raise
        self._learn_url(answer)
        return reader, writer

    async def _pump(
        self, peer: _Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Write queued frames until the connection fails; the peer never writes back, so a
        read returning EOF means the connection is gone (the peer died or closed it). With
        nothing to send for ping_interval_s, send a ping so the peer can tell an idle
        connection from a dead one. `_redial` aborts the connection to end this early.

        A snapshot stream's chunks (snapshot_stream.py) alternate with the batches of queued
        messages, one chunk after each batch: a heartbeat or an append waits behind one chunk
        at most, and a steady flow of messages cannot starve the stream either. The file is
        read ahead on a worker thread; the writer never waits for it (a completed read calls
        `_wake`)."""
        loop = asyncio.get_running_loop()
        eof = asyncio.ensure_future(reader.read(1))
        eof.add_done_callback(lambda _: _resolve_wait(peer.waiter))
        try:
            while not eof.done():
                if peer.queue:
                    batch, peer.queue = peer.queue, []
                    self._write(writer, self._frames(peer.id, batch))
                    await writer.drain()
                chunk = self.snapshots.ready_chunk(peer.id)
                if chunk is not None:
                    self._write(writer, [encode_frame(chunk)])
                    await writer.drain()
                    continue
                if peer.queue:
                    continue
                # One future and one timer per wait: an Event waited on by a task of its own,
                # under asyncio.wait, cost about 8 us more per wake (and a cancelled task, a
                # turn of the loop), and a leader's pumps wake for every write.
                waiter = peer.waiter = loop.create_future()
                timer = loop.call_later(self._ping_interval_s, _resolve_wait, waiter, True)
                try:
                    timed_out = await waiter
                finally:
                    timer.cancel()
                    peer.waiter = None
                if timed_out:
                    # Nothing to send for a ping interval.
                    self._write(writer, [_PING])
                    await writer.drain()
        except (OSError, ConnectionError) as exc:
            logger.debug("event=peer_write_failed peer=%s error=%r", peer.id, exc)
        finally:
            eof.cancel()
            # A stream under way cannot go on over a new connection: it failed.
            self.snapshots.connection_lost(peer.id)

    @staticmethod
    def _write(writer: asyncio.StreamWriter, frames: list[bytes]) -> None:
        if writer.is_closing():
            # uvloop raises RuntimeError on a write to a transport that a reset has already
            # closed; it is a broken connection like any other.
            raise ConnectionResetError("the connection was closed under us")
        writer.writelines(frames)

    def _frames(self, peer_id: int, batch: list[Message | bytes]) -> list[bytes]:
        """Encoded frames of `batch`, leaving out (with an error) any the peer would refuse.
        A SNAPSHOT message begins a stream (snapshot_stream.py): its frame is the stream's
        BEGIN, and its chunks follow between later batches."""
        frames = []
        for message in batch:
            if isinstance(message, bytes):
                frames.append(encode_frame(message))
                continue
            if message.type is MessageType.SNAPSHOT:
                begin = self.snapshots.begin(peer_id, message)
                if begin is not None:
                    frames.append(encode_frame(begin))
                continue
            payload = encode_message(message)
            if len(payload) > self._frame_bytes_max:
                logger.error(
                    "event=peer_frame_too_large peer=%s type=%s bytes=%d frame_bytes_max=%d",
                    peer_id,
                    message.type.name,
                    len(payload),
                    self._frame_bytes_max,
                )
                continue
            frames.append(encode_frame(payload))
        return frames

    def _redial(self, peer_id: int, reason: str) -> None:
        """Drop our outbound connection to `peer_id` (if up) so that it is dialled anew."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.writer is None:
            return
        logger.info("event=peer_redial peer=%s reason=%s", peer_id, reason)
        peer.writer.transport.abort()

    # --- failure detection -------------------------------------------------------------

    def _connection_closed(self, peer_id: int, direction: str) -> None:
        """A connection to `peer_id` closed: probe the peer unless a probe already runs or it
        is reported down already (see the module docstring)."""
        peer = self._peers.get(peer_id)
        if peer is None or self._closing or peer.removed:
            return
        logger.info("event=peer_disconnected peer=%s direction=%s", peer_id, direction)
        if peer.reported_down or peer.probe is not None:
            return
        loop = asyncio.get_running_loop()
        peer.probe = loop.call_later(
            self._probe_window_s, self._probe_ended, peer, loop.time(), loop.time()
        )
        # The outbound task redials at once after its own connection closed; if it is backing
        # off from a failed dial instead, it dials now.
        peer.redial.set()

    def _probe_ended(self, peer: _Peer, closed_at: float, window_from: float) -> None:
        """The probe window passed without a handshake with `peer`: it is gone, unless the
        window ended more than twice over, which means our own loop was stalled (a garbage
        collection, a starved CPU) and the answer to our redial may be sitting unread: then
        one more window, from now, as the inbound watchdog does for silence, for at most
        `dead_after_s` since the close. A follower stalled for 0.3 s reported its live
        leader down this way (the 10-minute soak of bench/README.md)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = now - window_from > 2 * self._probe_window_s
        if late and now - closed_at < self._dead_after_s and not self._closing:
            peer.probe = loop.call_later(
                self._probe_window_s, self._probe_ended, peer, closed_at, now
            )
            return
        self._peer_gone(peer, "no_answer")

    def _peer_alive(self, peer: _Peer) -> None:
        """A handshake with `peer` completed (either way): it is up."""
        peer.reported_down = False
        if peer.probe is not None:
            peer.probe.cancel()
            peer.probe = None
            logger.info("event=peer_blip peer=%s", peer.id)

    def _peer_gone(self, peer: _Peer, reason: str) -> None:
        """Evidence that `peer` is gone: tell the driver, once until it is back."""
        if peer.probe is not None:
            peer.probe.cancel()
            peer.probe = None
        if peer.reported_down or self._closing:
            return
        peer.reported_down = True
        logger.info("event=peer_down peer=%s reason=%s", peer.id, reason)
        self._on_peer_down(peer.id)

    # --- receiving ---------------------------------------------------------------------

    async def _serve_inbound(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._closing:
            # Accepted as the transport closed, its handler started after `close` cancelled
            # the handlers it knew: left to run, it would read a peer's messages for a
            # transport that is gone (the empty-directory check's, whose messages are dropped),
            # a link silent one way while both ends think it up.
            writer.transport.abort()
            return
        remote = writer.get_extra_info("peername")
        source = str(remote[0]) if isinstance(remote, tuple) and remote else str(remote)
        if self._inbound_by_source.get(source, 0) >= self._connections_per_source_max or (
            self._inbound >= self._connections_max and not self._evict_unauthenticated()
        ):
            # Refused before reading anything: the connection costs a descriptor for a moment.
            self.frames_rejected += 1
            self._log.warning(
                "peer_connection_refused",
                "event=peer_connection_refused remote=%s inbound=%d from_source=%d",
                remote,
                self._inbound,
                self._inbound_by_source.get(source, 0),
            )
            writer.transport.abort()
            return
        self._inbound += 1
        self._inbound_by_source[source] = self._inbound_by_source.get(source, 0) + 1
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        peer_id = 0
        watchdog: asyncio.Task[None] | None = None
        self._unauthenticated[writer] = None
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                hello = await self._accept_handshake(reader, writer)
            del self._unauthenticated[writer]
            peer_id = hello.node_id
            if peer_id not in self._peers:
                # A fresh process that has had our answer (see `_check_handshake`).
                logger.info("event=fresh_peer_answered peer=%s", peer_id)
                return
            peer = self._peers[peer_id]
            peer.redial.set()
            self._peer_alive(peer)
            loop = asyncio.get_running_loop()
            if peer.writer is not None and loop.time() - peer.connected_at > self._dead_after_s:
                # The peer dialled us anew: it stopped hearing from us (or restarted), so our
                # outbound connection to it is suspect. One dialled recently is left alone,
                # or two nodes would keep redialling each other.
                self._redial(peer_id, "peer_redialled")
            self._learn_url(hello)
            if hello.fresh:
                self.fresh_dialers.add(peer_id)
            logger.info("event=peer_connected peer=%s direction=in", peer_id)
            heard = [loop.time()]
            watchdog = loop.create_task(self._watch_inbound(peer_id, writer, heard))
            await self._read_messages(peer_id, reader, heard)
        except (ProtocolError, ssl.SSLError) as exc:
            self.frames_rejected += 1
            if not peer_id:
                self._handshake_failed()
            self._log.warning(
                "peer_rejected",
                "event=peer_rejected remote=%s peer=%s reason=%r",
                remote,
                peer_id,
                str(exc)[:200],
            )
        except (asyncio.IncompleteReadError, ConnectionError, OSError, TimeoutError):
            if not peer_id:
                self._handshake_failed()
        except asyncio.CancelledError:
            # Closing the transport cancels this task; end it normally, because asyncio's
            # stream callback logs a cancelled connection handler as an error.
            pass
        finally:
            # The watchdog ends on its own only when it found the connection silent, and it
            # has reported the peer then; any other end of the connection is probed.
            silent = watchdog is not None and watchdog.done() and not watchdog.cancelled()
            if watchdog is not None:
                watchdog.cancel()
            self._unauthenticated.pop(writer, None)
            self._inbound -= 1
            left = self._inbound_by_source[source] - 1
            if left:
                self._inbound_by_source[source] = left
            else:
                del self._inbound_by_source[source]
            writer.close()
            current = asyncio.current_task()
            if current is not None:
                self._tasks.discard(current)
            if peer_id and not silent:
                self._connection_closed(peer_id, "in")

    def _evict_unauthenticated(self) -> bool:
        """At the total bound: abort the oldest inbound connection still in its handshake,
        so that a crowd of half-open connections (from more addresses than the per-source
        bound stops) cannot lock the members out; False if every one is authenticated. A
        member's handshake takes a round trip, so it is evicted only if more connections
        than the bound arrive during it."""
        oldest = next(iter(self._unauthenticated), None)
        if oldest is None:
            return False
        del self._unauthenticated[oldest]
        self._log.warning(
            "peer_connection_evicted",
            "event=peer_connection_evicted remote=%s inbound=%d",
            oldest.get_extra_info("peername"),
            self._inbound,
        )
        oldest.transport.abort()
        return True

    async def _watch_inbound(
        self, peer_id: int, writer: asyncio.StreamWriter, heard: list[float]
    ) -> None:
        """Close the connection once nothing has arrived on it for dead_after_s, and redial
        ours to the same peer (see the module docstring)."""
        loop = asyncio.get_running_loop()
        interval_s = self._ping_interval_s
        last_wake = loop.time()
        while True:
            await asyncio.sleep(interval_s)
            now = loop.time()
            late = now - last_wake > 2 * interval_s
            last_wake = now
            if late:
                # Our own loop was blocked: what arrived meanwhile is unread, not missing.
                continue
            if now - heard[0] >= self._dead_after_s:
                logger.warning(
                    "event=peer_silent peer=%s silent_ms=%d", peer_id, (now - heard[0]) * 1000
                )
                peer = self._peers.get(peer_id)
                if peer is not None:
                    self._peer_gone(peer, "silent")
                writer.transport.abort()
                self._redial(peer_id, "peer_silent")
                return

    async def _read_messages(
        self, peer_id: int, reader: asyncio.StreamReader, heard: list[float]
    ) -> None:
        frames = _FrameBuffer(self._frame_bytes_max)
        loop = asyncio.get_running_loop()
        try:
            await self._read_frames(peer_id, reader, heard, frames, loop)
        finally:
            # A partial snapshot stream from this peer is useless once its connection is gone.
            self.snapshots.discard_incoming(peer_id)

    async def _read_frames(
        self,
        peer_id: int,
        reader: asyncio.StreamReader,
        heard: list[float],
        frames: _FrameBuffer,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        while True:
            data = await reader.read(_READ_CHUNK_BYTES)
            if not data:
                return
            heard[0] = loop.time()
            if peer_id not in self._peers:
                raise ProtocolError(f"node {peer_id} is no longer a member")
            for payload in frames.feed(data):
                if is_stream_payload(payload):
                    self.snapshots.receive(peer_id, payload)
                    continue
                message = message_from_obj(unpack(payload))
                if message.from_ != peer_id or message.to != self.node_id:
                    raise ProtocolError(
                        f"message from {message.from_} to {message.to} on the stream of {peer_id}"
                    )
                if not self.snapshots.hold(peer_id, message):
                    self._on_message(message)

    # --- handshake ---------------------------------------------------------------------

    def _handshake_failed(self) -> None:
        self.handshakes_failed += 1
        if self._on_handshake_refused is not None:
            self._on_handshake_refused("in")

    async def _accept_handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Handshake:
        """Read the dialer's hello, answer it with our proof and check the dialer's proof;
        the dialer's hello once it has proven the secret (see kvstore/server/peerauth.py)."""
        hello = peerauth.decode_handshake(await _read_frame(reader, HANDSHAKE_BYTES_MAX))
        self._check_handshake(hello, expected_id=None)
        if self._tls is not None:
            known = self._peers.get(hello.node_id)
            if known is None and hello.fresh:  # asks, then is closed: see tls.py
                check_fresh_peer_identity(writer.get_extra_info("peercert"), hello.node_id)
            else:
                check_peer_identity(
                    writer.get_extra_info("peercert"),
                    hello.node_id,
                    known.address if known is not None else "",
                    known.slot if known is not None else 0,
                )
        answer = peerauth.answer_to(
            hello,
            secret=self._secret,
            cluster_id=self.cluster_id,
            node_id=self.node_id,
            client_url=self.client_url,
            fresh=self.fresh,
        )
        _tune_socket(writer, self._user_timeout_ms)
        writer.write(encode_frame(peerauth.encode_handshake(answer)))
        proof = peerauth.decode_proof(await _read_frame(reader, HANDSHAKE_BYTES_MAX))
        peerauth.check_proof(self._secret, peerauth.DIALER, hello, answer, proof)
        return hello

    def _check_handshake(
        self, hello: Handshake, *, expected_id: int | None, dialing: bool = False
    ) -> None:
        """Refuse a handshake from another cluster, for another node, or from an id that is
        not a peer. Two exceptions, for a fresh process finding out whether a cluster exists
        (identity.py): its hello may come from any id (a removed one: the id its slot held)
        and be meant for the slot this node holds (`name_slot`), and it accepts an answer
        from any member. Such a connection carries nothing after the handshake: an inbound
        one from a non-peer is closed as soon as the handshake completes."""
        if hello.cluster_id != self.cluster_id:
            raise ProtocolError(
                f"cluster id {hello.cluster_id!r} does not match ours ({self.cluster_id!r})"
            )
        if expected_id is not None and hello.node_id != expected_id:
            raise ProtocolError(f"expected node {expected_id}, reached node {hello.node_id}")
        slot_ok = hello.fresh and self.name_slot and hello.to == self.name_slot
        if hello.to != self.node_id and not slot_ok:
            raise ProtocolError(f"node {hello.node_id} meant to reach node {hello.to}")
        if hello.node_id not in self._peers and not hello.fresh and not (dialing and self.fresh):
            raise ProtocolError(f"node {hello.node_id} is not a peer of node {self.node_id}")

    def _learn_url(self, hello: Handshake) -> None:
        self.peer_fresh[hello.node_id] = hello.fresh
        if hello.fresh:
            self.seen_fresh.add(hello.node_id)
        if self.peer_urls.get(hello.node_id) != hello.client_url:
            self.peer_urls[hello.node_id] = hello.client_url
            if self._on_peer_url is not None:
                self._on_peer_url(hello.node_id, hello.client_url)
