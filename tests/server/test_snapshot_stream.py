"""Streamed snapshots between two real transports on 127.0.0.1 (no Raft core).

The frame bound is lowered to 64 KiB here, so every snapshot in these tests is larger than
the largest frame either side accepts: before streaming, such a snapshot could never be sent.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from kvstore.codec import encode_message, pack
from kvstore.raft.types import (
    ConfState,
    Entry,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)
from kvstore.server.snapshot_stream import (
    INCOMING_SUFFIX,
    TAG_ACK,
    TAG_BEGIN,
    TAG_CHUNK,
    SnapshotStreams,
)
from kvstore.server.transport import PeerTransport
from kvstore.storage.snapshot import HEADER_BYTES, encode_snapshot_file

FRAME_BYTES_MAX = 64 << 10
CHUNK_BYTES = 16 << 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.002)


class _SlowFile(io.BytesIO):
    """A snapshot file whose reads take `delay_s` each (on the sender's worker thread), so
    a transfer lasts long enough to see what happens during it."""

    def __init__(self, content: bytes, delay_s: float) -> None:
        super().__init__(content)
        self.delay_s = delay_s

    def read(self, size: int | None = -1) -> bytes:
        time.sleep(self.delay_s)
        return super().read(size)


class _Pair:
    """Node 1 (the leader, sending) and node 2 (the follower, receiving into `directory`)."""

    def __init__(self, directory: Path, *, file_bytes: bytes | None = None, delay_s: float = 0.0):
        peers = {1: f"127.0.0.1:{_free_port()}", 2: f"127.0.0.1:{_free_port()}"}
        self.directory = directory
        self.received: list[Message] = []
        self.statuses: list[tuple[int, bool]] = []
        self.file_bytes = file_bytes
        self.delay_s = delay_s
        self.opened = 0
        common: dict[str, Any] = {
            "cluster_id": "c1",
            "peers": peers,
            "on_peer_down": lambda peer: None,
            "frame_bytes_max": FRAME_BYTES_MAX,
            "snapshot_chunk_bytes": CHUNK_BYTES,
        }
        self.leader = PeerTransport(
            node_id=1,
            client_url="http://client-1",
            listen=peers[1],
            on_message=lambda message: None,
            on_snapshot_status=lambda peer, ok: self.statuses.append((peer, ok)),
            open_snapshot=self._open,
            **common,
        )
        self.follower = PeerTransport(
            node_id=2,
            client_url="http://client-2",
            listen=peers[2],
            on_message=self.received.append,
            snapshot_directory=str(directory),
            **common,
        )

    def _open(self, index: int, term: int) -> tuple[BinaryIO, int] | None:
        if self.file_bytes is None:
            return None
        self.opened += 1
        return _SlowFile(self.file_bytes, self.delay_s), len(self.file_bytes)

    async def __aenter__(self) -> _Pair:
        await self.leader.start()
        await self.follower.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.leader.close()
        await self.follower.close()

    def snapshots(self) -> list[Message]:
        return [m for m in self.received if m.type is MessageType.SNAPSHOT]

    def partial_files(self) -> list[str]:
        return [name for name in os.listdir(self.directory) if name.endswith(INCOMING_SUFFIX)]


def _snapshot(size: int, index: int = 7) -> Snapshot:
    data = os.urandom(size)
    metadata = SnapshotMetadata(index=index, term=2, conf_state=ConfState(voters=(1, 2, 3)))
    return Snapshot(metadata=metadata, data=data)


def _message(snapshot: Snapshot) -> Message:
    return Message(MessageType.SNAPSHOT, 2, 1, 2, snapshot=snapshot)


def _heartbeat() -> Message:
    return Message(MessageType.HEARTBEAT, 2, 1, 2)


async def test_a_snapshot_larger_than_any_frame_arrives_whole_and_is_reported(
    tmp_path: Path,
) -> None:
    snapshot = _snapshot(1 << 20)  # 16 times the frame bound
    async with _Pair(tmp_path) as pair:  # no file: the in-memory encoding is streamed
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: pair.statuses)
        assert pair.statuses == [(2, True)]
        await _wait_for(pair.snapshots)  # ACKed once checked, stepped once loaded
        [received] = pair.snapshots()
        assert received.snapshot == snapshot
        assert (received.term, received.from_, received.to) == (2, 1, 2)
        assert pair.partial_files() == []
        streams = pair.leader.snapshots
        assert streams.streams_started == streams.streams_completed == 1
        assert streams.bytes_sent == len(encode_snapshot_file(snapshot))


async def test_the_leader_streams_its_snapshot_file(tmp_path: Path) -> None:
    """With a file (as a DiskStorage has), the file's bytes are what travels."""
    snapshot = _snapshot(300 << 10)
    async with _Pair(tmp_path, file_bytes=encode_snapshot_file(snapshot)) as pair:
        # The message's data is not what is sent: the file is.
        pair.leader.send(_message(Snapshot(metadata=snapshot.metadata, data=b"stale")))
        await _wait_for(lambda: pair.statuses)
        assert pair.statuses == [(2, True)]
        assert pair.opened == 1
        await _wait_for(pair.snapshots)
        assert pair.snapshots()[0].snapshot == snapshot


async def test_heartbeats_flow_while_a_snapshot_streams(tmp_path: Path) -> None:
    """Messages queued during a transfer go out between two chunks, not after the stream,
    and never wait for the leader's disk: each heartbeat sent mid-transfer arrives while the
    snapshot is still incomplete, although every read of the file takes 60 ms."""
    snapshot = _snapshot(4 << 20)
    content = encode_snapshot_file(snapshot)
    # Four reads ahead of 1 MiB, 60 ms each: about 0.25 s of transfer.
    async with _Pair(tmp_path, file_bytes=content, delay_s=0.06) as pair:
        pair.leader.send(_message(snapshot))
        streams = pair.follower.snapshots
        await _wait_for(lambda: streams.bytes_received > 0)
        heartbeats_during = 0
        for _ in range(5):
            pair.leader.send(_heartbeat())
            sent = len([m for m in pair.received if m.type is MessageType.HEARTBEAT])
            await _wait_for(
                lambda sent=sent: (
                    len([m for m in pair.received if m.type is MessageType.HEARTBEAT]) > sent
                )
            )
            if not pair.snapshots():
                heartbeats_during += 1
        assert heartbeats_during == 5, f"only {heartbeats_during} of 5 arrived mid-transfer"
        await _wait_for(lambda: pair.statuses)
        assert pair.statuses == [(2, True)]
        await _wait_for(pair.snapshots)
        assert pair.snapshots()[0].snapshot == snapshot


async def test_a_dropped_connection_fails_the_stream_and_the_next_starts_over(
    tmp_path: Path,
) -> None:
    snapshot = _snapshot(4 << 20)
    content = encode_snapshot_file(snapshot)
    async with _Pair(tmp_path, file_bytes=content, delay_s=0.05) as pair:
        pair.leader.send(_message(snapshot))
        streams = pair.follower.snapshots
        await _wait_for(lambda: streams.bytes_received >= 4 * CHUNK_BYTES)
        pair.leader._redial(2, "test")  # the connection drops mid-stream
        await _wait_for(lambda: pair.statuses)
        assert pair.statuses == [(2, False)]
        await _wait_for(lambda: pair.partial_files() == [])
        assert pair.snapshots() == []
        # The core sends it again later: a new stream, from the first byte.
        pair.file_bytes, pair.delay_s = content, 0.0
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: len(pair.statuses) == 2)
        assert pair.statuses == [(2, False), (2, True)]
        await _wait_for(pair.snapshots)
        assert [m.snapshot for m in pair.snapshots()] == [snapshot]
        assert pair.leader.snapshots.streams_started == 2


async def test_a_damaged_stream_is_refused_and_reported_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = _snapshot(200 << 10)
    content = bytearray(encode_snapshot_file(snapshot))
    content[len(content) // 2] ^= 0xFF  # one bit flips on the leader's disk
    async with _Pair(tmp_path, file_bytes=bytes(content)) as pair:
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: pair.statuses)
        assert pair.statuses == [(2, False)]
        assert pair.snapshots() == []
        assert pair.partial_files() == []
    # The refusal names the file and the offset (the body's: its crc32 covers all of it).
    [refusal] = [r.getMessage() for r in caplog.records if "snapshot_stream_rejected" in r.msg]
    assert f"file={tmp_path / 'incoming-1-1'}{INCOMING_SUFFIX}" in refusal
    assert f"offset={HEADER_BYTES} " in refusal and "checksum" in refusal


class _Payloads:
    """The follower's end alone (`SnapshotStreams` without a transport): frames go in by
    `receive`, and what it would send back is kept."""

    def __init__(self, directory: Path) -> None:
        self.sent: list[bytes] = []
        self.received: list[Message] = []
        self.streams = SnapshotStreams(
            directory=str(directory),
            open_snapshot=None,
            on_message=self.received.append,
            on_snapshot_status=None,
            send_payload=lambda peer, payload: self.sent.append(payload),
            wake=lambda peer: None,
        )

    def begin(self, snapshot: Snapshot, size: int) -> None:
        header = encode_message(_message(Snapshot(metadata=snapshot.metadata)))
        self.streams.receive(1, bytes((TAG_BEGIN,)) + pack([1, size, header]))

    def chunk(self, offset: int, data: bytes) -> None:
        self.streams.receive(1, struct.pack(">BQQ", TAG_CHUNK, 1, offset) + data)

    def acks(self) -> list[bool]:
        return [payload[-1] == 1 for payload in self.sent if payload[0] == TAG_ACK]


async def test_a_chunk_out_of_place_is_refused_naming_the_file_and_offset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk that does not follow on (lost or repeated on the way) is refused at once,
    not after the rest of the snapshot: the message names the partial file and the chunk's
    offset, the partial file is removed, and the leader hears ACK failed."""
    snapshot = _snapshot(200 << 10)
    content = encode_snapshot_file(snapshot)
    follower = _Payloads(tmp_path)
    follower.begin(snapshot, len(content))
    follower.chunk(0, content[:CHUNK_BYTES])
    follower.chunk(2 * CHUNK_BYTES, content[2 * CHUNK_BYTES : 3 * CHUNK_BYTES])  # one lost
    assert follower.acks() == [False]
    [refusal] = [r.getMessage() for r in caplog.records if "snapshot_stream_rejected" in r.msg]
    assert f"file={tmp_path / 'incoming-1-1'}{INCOMING_SUFFIX}" in refusal
    assert f"offset={2 * CHUNK_BYTES} " in refusal and f"expected offset {CHUNK_BYTES}" in refusal
    assert os.listdir(tmp_path) == []
    # Frames of the refused stream still in flight are ignored; a new stream starts over.
    follower.chunk(CHUNK_BYTES, content[CHUNK_BYTES : 2 * CHUNK_BYTES])
    assert follower.acks() == [False] and follower.received == []


class _Receiver:
    """A `SnapshotReceiver` that records where and when it was called."""

    def __init__(self) -> None:
        self.decoded_on: list[int] = []
        self.file_present: list[bool] = []
        self.offered: list[Any] = []

    def decode_snapshot(self, snapshot: Snapshot, file: str | None = None) -> Any:
        self.decoded_on.append(threading.get_ident())
        self.file_present.append(file is not None and os.path.exists(file))
        return ("decoded", snapshot.metadata.index)

    def offer_decoded(self, decoded: Any) -> None:
        self.offered.append(decoded)


async def test_a_received_snapshot_is_decoded_off_the_loop_before_it_is_stepped(
    tmp_path: Path,
) -> None:
    snapshot = _snapshot(256 << 10)
    async with _Pair(tmp_path) as pair:
        receiver = _Receiver()
        pair.follower.snapshots.receiver = receiver
        offered_when_stepped: list[int] = []
        pair.follower.snapshots._on_message = lambda message: (
            offered_when_stepped.append(len(receiver.offered)),
            pair.received.append(message),
        )
        pair.leader.send(_message(snapshot))
        await _wait_for(pair.snapshots)
        assert receiver.decoded_on and receiver.decoded_on[0] != threading.get_ident()
        assert receiver.file_present == [True]  # verified and fsynced, not yet removed
        assert receiver.offered == [("decoded", snapshot.metadata.index)]
        assert offered_when_stepped == [1]
        assert pair.partial_files() == []


async def test_the_same_snapshot_sent_again_joins_the_stream_under_way(tmp_path: Path) -> None:
    """The core may time a large pending snapshot out and send it again while it is still
    travelling: that neither restarts the stream nor reports twice."""
    snapshot = _snapshot(4 << 20)
    content = encode_snapshot_file(snapshot)
    async with _Pair(tmp_path, file_bytes=content, delay_s=0.05) as pair:
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: pair.follower.snapshots.bytes_received > 0)
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: pair.statuses)
        assert pair.statuses == [(2, True)]
        assert pair.leader.snapshots.streams_started == 1
        await _wait_for(pair.snapshots)
        assert len(pair.snapshots()) == 1


async def test_appends_wait_for_the_snapshot_that_was_acked_before_it_loaded(
    tmp_path: Path,
) -> None:
    """The follower ACKs once the stream matches its checksum and loads the file afterwards:
    an append that the leader sends meanwhile (its probe from after the snapshot) must reach
    the follower's node after the snapshot, or the follower would reject it with its old log
    and the leader would send the snapshot again. Heartbeats are not held."""
    snapshot = _snapshot(256 << 10)
    async with _Pair(tmp_path) as pair:
        streams = pair.follower.snapshots
        verify = streams._verify

        def slow_verify(stream: Any) -> Snapshot:
            time.sleep(0.3)  # a large snapshot loads for a while (on the worker thread)
            return verify(stream)

        streams._verify = slow_verify  # type: ignore[method-assign]
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: pair.statuses)
        assert pair.statuses == [(2, True)]
        append = Message(MessageType.APPEND, 2, 1, 2, index=7, log_term=2)
        pair.leader.send(append)
        pair.leader.send(_heartbeat())
        await _wait_for(lambda: len(pair.received) == 3)
        assert [m.type for m in pair.received] == [
            MessageType.HEARTBEAT,
            MessageType.SNAPSHOT,
            MessageType.APPEND,
        ]


async def test_a_probe_resent_while_the_snapshot_loads_is_held_once(tmp_path: Path) -> None:
    """The leader resends its probe every heartbeat interval while the follower lags; a
    large snapshot loads for seconds, and every copy (up to a message's size each) was held
    and stepped after it. Now one is stepped: the one with the most entries."""
    snapshot = _snapshot(256 << 10)
    async with _Pair(tmp_path) as pair:
        streams = pair.follower.snapshots
        verify = streams._verify
        loading = threading.Event()

        def slow_verify(stream: Any) -> Any:
            loading.wait(10)  # the test says when the load is over
            return verify(stream)

        streams._verify = slow_verify  # type: ignore[method-assign]
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: pair.statuses)
        entries = tuple(Entry(term=2, index=8 + i, data=b"x" * 1000) for i in range(30))
        for count in range(1, 21):
            probe = Message(
                MessageType.APPEND, 2, 1, 2, index=7, log_term=2, commit=count,
                entries=entries[: 10 + count // 2],
            )  # fmt: skip
            pair.leader.send(probe)
        # A resend without entries (as the leader's core resends a probe) adds nothing.
        pair.leader.send(Message(MessageType.APPEND, 2, 1, 2, index=7, log_term=2, commit=21))
        pair.leader.send(_heartbeat())
        await _wait_for(lambda: len(pair.received) == 1)  # the heartbeat, not held
        loading.set()
        await _wait_for(pair.snapshots)  # the held messages are stepped right after it
        assert [m.type for m in pair.received] == [
            MessageType.HEARTBEAT,
            MessageType.SNAPSHOT,
            MessageType.APPEND,
        ]
        assert pair.received[-1].commit == 20 and len(pair.received[-1].entries) == 20


async def test_a_connection_dropped_while_the_snapshot_loads_does_not_lose_it(
    tmp_path: Path,
) -> None:
    """Once ACKed, the snapshot is the follower's: a connection that drops while it is
    loaded and decoded (on the worker thread) neither discards the file nor the held
    appends, and the leader's report stays the ACK's."""
    snapshot = _snapshot(256 << 10)
    async with _Pair(tmp_path) as pair:
        streams = pair.follower.snapshots
        receiver = _Receiver()
        streams.receiver = receiver
        verify = streams._verify
        loading = threading.Event()

        def slow_verify(stream: Any) -> Any:
            loading.wait(10)
            return verify(stream)

        streams._verify = slow_verify  # type: ignore[method-assign]
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: pair.statuses)
        pair.leader.send(Message(MessageType.APPEND, 2, 1, 2, index=7, log_term=2))
        await _wait_for(lambda: 1 in streams._held and len(streams._held[1]) == 1)
        pair.leader._redial(2, "test")  # the connection drops mid-load
        pair.follower._redial(1, "test")
        loading.set()
        await _wait_for(pair.snapshots)
        assert [m.type for m in pair.received] == [MessageType.SNAPSHOT, MessageType.APPEND]
        assert pair.snapshots()[0].snapshot == snapshot
        assert receiver.file_present == [True] and len(receiver.offered) == 1
        assert pair.statuses == [(2, True)]
        assert pair.partial_files() == []


async def test_a_receiver_that_fails_leaves_the_snapshot_to_the_node(tmp_path: Path) -> None:
    """Decoding ahead is an optimisation: if the receiver fails for any reason, the snapshot
    is still stepped (the node decodes it itself, and stops if it cannot) and the appends
    held behind it are released. Before, anything but a ProtocolError ended the install
    task: the snapshot was never stepped and every later append from that leader was held."""
    snapshot = _snapshot(128 << 10)
    async with _Pair(tmp_path) as pair:
        receiver = _Receiver()

        def failing_decode(snapshot: Snapshot, file: str | None = None) -> Any:
            raise MemoryError("no memory for the decoded state")

        receiver.decode_snapshot = failing_decode  # type: ignore[method-assign]
        pair.follower.snapshots.receiver = receiver
        pair.leader.send(_message(snapshot))
        await _wait_for(lambda: pair.statuses)
        pair.leader.send(Message(MessageType.APPEND, 2, 1, 2, index=7, log_term=2))
        await _wait_for(lambda: len(pair.received) == 2)
        assert [m.type for m in pair.received] == [MessageType.SNAPSHOT, MessageType.APPEND]
        assert pair.snapshots()[0].snapshot == snapshot and receiver.offered == []
        assert pair.partial_files() == []
