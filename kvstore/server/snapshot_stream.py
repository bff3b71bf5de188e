"""Streamed snapshots: a snapshot travels to a follower in chunks, never as one frame.

The Raft core hands the transport a SNAPSHOT message (Raft §7 InstallSnapshot) and later hears
one outcome, `RawNode.report_snapshot(peer, ok)`. Between the two, this module moves the bytes:

    leader                                          follower
    BEGIN  [stream id, size, the message without data]  ->  opens <dir>/incoming-<peer>-<id>.part
    CHUNK  stream id, offset, bytes            (many) ->  appends them (offset must follow on)
    END    stream id, size                            ->  checks magic, length and the crc32
                                                          of the body (computed as it came)
    ACK    stream id, ok           <- (on the follower's own connection to the leader)
                                                          on a worker thread: fsyncs, loads
                                                          and checks the file again (metadata
                                                          equal to BEGIN's), decodes the state
                                                          and hands the file to the storage
                                                          (`SnapshotReceiver`); then steps the
                                                          SNAPSHOT message into its node
    report_snapshot(follower, ok)

What is sent is the leader's snapshot file itself (`kvstore.storage.snapshot`), read ahead
READ_AHEAD_BYTES at a time on a worker thread and sent `chunk_bytes` at a time; the follower
writes each chunk to a temporary file as it arrives and reads it back only once the whole file
is there. So the stream itself holds at most a read-ahead (leader) or a chunk (follower) in
memory, beyond the state machine each holds anyway, and there is no size limit: a chunk is a
frame of at most `chunk_bytes`, far under the transport's frame bound (a snapshot was one frame
before, and a store of about 2 million 100-byte keys could no longer be sent).

Installing is off the loop too: the worker thread that checks the file also decodes the state
(`Replica.decode_snapshot`, a key at a time so the loop gets the GIL back every few
milliseconds) and the storage takes the file over (`adopt_snapshot_file`: renamed into place,
not written again); the node's Ready then only installs the decoded state. Decoding a million
keys on the loop held a follower for 9 s without answering a heartbeat.

Rules that hold here:
- Flow control is TCP's: the sender writes the next chunk only when the connection has taken
  the last one (`drain`), and the follower reads only as fast as it writes to its file.
- Heartbeats and appends are never starved: the stream's chunks are interleaved with the Raft
  messages on the same connection, and the transport writes every queued message before each
  chunk, so a message waits behind at most one chunk (`PeerTransport._pump`).
- One stream per follower. A SNAPSHOT message for the same index and term as the stream under
  way joins it (the core may time its pending snapshot out and send it again while a large one
  is still travelling); one for another snapshot replaces it, silently.
- Every stream ends with exactly one report: ACK ok (verified, and stepped into the
  follower's node once loaded), ACK failed (the follower found the file damaged or a chunk
  out of place: its log names the partial file and the offset), or failed because
  the leader's connection to the follower closed before the ACK. A follower that sees its
  leader's connection close discards the partial file. A later SNAPSHOT starts over from the
  first byte (restartable, not resumable).
- Every value from the wire is range-checked; anything malformed ends the connection
  (ProtocolError), as for any other frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, BinaryIO, Protocol

from kvstore.codec import encode_message, message_from_obj, pack, unpack
from kvstore.errors import CorruptionError, ProtocolError
from kvstore.raft.types import Message, MessageType, Snapshot
from kvstore.storage.fs import FileSystem
from kvstore.storage.snapshot import (
    HEADER_BYTES,
    encode_snapshot_file,
    load_snapshot,
    read_header,
    snapshot_name,
)

if TYPE_CHECKING:
    from kvstore.replica import DecodedSnapshot

logger = logging.getLogger("kvstore.server")

# First byte of a stream frame's payload. A Raft message's payload starts with the codec's
# format version (1), so these can never be taken for one.
TAG_BEGIN = 0xB1
TAG_CHUNK = 0xB2
TAG_END = 0xB3
TAG_ACK = 0xB4
STREAM_TAGS = frozenset({TAG_BEGIN, TAG_CHUNK, TAG_END, TAG_ACK})

CHUNK_BYTES_DEFAULT = 64 << 10
"""A heartbeat queued behind a chunk waits for at most this many bytes to be written."""
READ_AHEAD_BYTES = 1 << 20
"""The leader reads its snapshot file this much at a time (one worker-thread hop each)."""
SNAPSHOT_BYTES_MAX = 1 << 50
"""A declared stream size above this is refused (a range check, not a product limit)."""
_STREAM_ID_MAX = 1 << 63
_HELD_TYPES = frozenset({MessageType.APPEND, MessageType.SNAPSHOT})
_HELD_MAX = 1024
_CHUNK_HEADER = struct.Struct(">BQQ")  # tag, stream id, offset
_END = struct.Struct(">BQQ")  # tag, stream id, size
_ACK = struct.Struct(">BQ?")  # tag, stream id, ok
INCOMING_PREFIX = "incoming-"
INCOMING_SUFFIX = ".part"

OpenSnapshot = Callable[[int, int], "tuple[BinaryIO, int] | None"]
"""(index, term) -> the leader's snapshot file opened for reading and its size, or None."""


class SnapshotReceiver(Protocol):
    """What installs a received snapshot (the node's `Replica`): `decode_snapshot` runs on a
    worker thread once the file is verified, `offer_decoded` on the loop just before the
    SNAPSHOT message is stepped."""

    def decode_snapshot(self, snapshot: Snapshot, file: str | None = None) -> DecodedSnapshot: ...

    def offer_decoded(self, decoded: DecodedSnapshot) -> None: ...


def snapshot_file_opener(directory: str) -> OpenSnapshot:
    """`OpenSnapshot` for the snapshot files of a DiskStorage in `directory`. The file is
    opened when the stream begins: if the storage replaces it meanwhile (a newer snapshot),
    the open descriptor still reads the old one to the end."""

    def open_snapshot(index: int, term: int) -> tuple[BinaryIO, int] | None:
        path = os.path.join(directory, snapshot_name(index, term))
        try:
            file = open(path, "rb")  # noqa: SIM115 (closed when the stream ends)
        except FileNotFoundError:
            return None
        return file, os.fstat(file.fileno()).st_size

    return open_snapshot


def is_stream_payload(payload: bytes) -> bool:
    return payload[0] in STREAM_TAGS


@dataclass(slots=True)
class _Outgoing:
    """A stream to one follower: the message it delivers and how far it has got."""

    stream_id: int
    message: Message
    file: BinaryIO
    size: int
    offset: int = 0
    # Read ahead from the file (one worker-thread hop per READ_AHEAD_BYTES), not yet sent.
    ahead: bytes = b""
    ahead_offset: int = 0
    # The read ahead under way on a worker thread, if any.
    reading: asyncio.Future[bytes] | None = None
    # All bytes written; waiting for the follower's ACK.
    sent: bool = False

    def same_snapshot(self, message: Message) -> bool:
        old, new = self.message.snapshot, message.snapshot
        assert old is not None and new is not None
        return (old.metadata.index, old.metadata.term) == (new.metadata.index, new.metadata.term)


@dataclass(slots=True)
class _Incoming:
    """A stream from one leader being written to a temporary file."""

    stream_id: int
    message: Message
    size: int
    path: str
    fd: int
    # Loop time when BEGIN arrived: the transfer's duration is logged at END.
    begun_at: float
    received: int = 0
    # The file's header (its first HEADER_BYTES) and the crc32 of the body received so far:
    # the stream is checked against the header's checksum the moment it ends.
    header: bytes = b""
    crc: int = 0


class SnapshotStreams:
    """Both ends of the snapshot streams of one node (see the module docstring). The
    transport calls `begin` (a SNAPSHOT message to send), `ready_chunk` (whenever it could
    write; `wake` tells it when a chunk has become ready), `connection_lost`, and `receive`
    for every stream frame that arrives."""

    def __init__(
        self,
        *,
        directory: str | None,
        open_snapshot: OpenSnapshot | None,
        on_message: Callable[[Message], None],
        on_snapshot_status: Callable[[int, bool], None] | None,
        send_payload: Callable[[int, bytes], None],
        wake: Callable[[int], None],
        chunk_bytes: int = CHUNK_BYTES_DEFAULT,
    ) -> None:
        assert chunk_bytes >= 1
        self._directory = directory
        self._open_snapshot = open_snapshot
        self._on_message = on_message
        self._on_snapshot_status = on_snapshot_status
        self._send_payload = send_payload
        self._wake = wake
        self.chunk_bytes = chunk_bytes
        self._next_stream_id = 1
        self._outgoing: dict[int, _Outgoing] = {}
        self._incoming: dict[int, _Incoming] = {}
        # Messages from a leader whose snapshot is ACKed and loading (`hold`).
        self._held: dict[int, list[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fs = FileSystem()
        # Decodes a verified snapshot off the loop and takes its file over (the node sets
        # it); without one the node decodes the bytes when it restores them.
        self.receiver: SnapshotReceiver | None = None
        if directory is not None:
            _remove_leftovers(directory)
        # Counters, for tests and metrics.
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_failed = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- sending (leader) --------------------------------------------------------------

    def begin(self, peer_id: int, message: Message) -> bytes | None:
        """A SNAPSHOT message for `peer_id`: start its stream and return the BEGIN payload
        (None when it joins the stream already under way for the same snapshot)."""
        assert message.type is MessageType.SNAPSHOT and message.snapshot is not None
        current = self._outgoing.get(peer_id)
        if current is not None:
            if current.same_snapshot(message):
                logger.debug("event=snapshot_stream_joined peer=%s", peer_id)
                return None
            self._drop_outgoing(peer_id)
        file, size = self._source(message.snapshot)
        stream_id = self._next_stream_id
        self._next_stream_id += 1
        self._outgoing[peer_id] = _Outgoing(stream_id, message, file, size)
        self.streams_started += 1
        metadata = message.snapshot.metadata
        logger.info(
            "event=snapshot_stream_begin peer=%s stream=%d index=%d bytes=%d",
            peer_id,
            stream_id,
            metadata.index,
            size,
        )
        header = replace(message, snapshot=Snapshot(metadata=metadata))
        return bytes((TAG_BEGIN,)) + pack([stream_id, size, encode_message(header)])

    def _source(self, snapshot: Snapshot) -> tuple[BinaryIO, int]:
        """The leader's snapshot file, or (no file: a storage without one) its encoding."""
        metadata = snapshot.metadata
        if self._open_snapshot is not None:
            opened = self._open_snapshot(metadata.index, metadata.term)
            if opened is not None:
                return opened
        content = encode_snapshot_file(snapshot)
        return io.BytesIO(content), len(content)

    def ready_chunk(self, peer_id: int) -> bytes | None:
        """The next CHUNK (after the last, the END) payload for `peer_id` if it can be sent
        now, else None. The file is read ahead on a worker thread, READ_AHEAD_BYTES at a
        time; while a read is pending this answers None at once (the transport goes on
        sending messages meanwhile) and `wake(peer_id)` is called when it completes."""
        stream = self._outgoing.get(peer_id)
        if stream is None or stream.sent or stream.reading is not None:
            return None
        if stream.offset >= stream.size:
            stream.sent = True
            return _END.pack(TAG_END, stream.stream_id, stream.size)
        if stream.ahead_offset >= len(stream.ahead):
            self._read_ahead(peer_id, stream)
            return None
        start = stream.ahead_offset
        chunk = stream.ahead[start : start + self.chunk_bytes]
        stream.ahead_offset += len(chunk)
        offset = stream.offset
        stream.offset += len(chunk)
        self.bytes_sent += len(chunk)
        return _CHUNK_HEADER.pack(TAG_CHUNK, stream.stream_id, offset) + chunk

    def _read_ahead(self, peer_id: int, stream: _Outgoing) -> None:
        wanted = min(max(READ_AHEAD_BYTES, self.chunk_bytes), stream.size - stream.offset)
        loop = asyncio.get_running_loop()
        reading = loop.run_in_executor(None, stream.file.read, wanted)
        stream.reading = reading

        def done(future: asyncio.Future[bytes]) -> None:
            if self._outgoing.get(peer_id) is not stream:
                if not future.cancelled():
                    future.exception()  # the stream ended meanwhile: nothing to report
                return
            stream.reading = None
            data = None if future.cancelled() or future.exception() else future.result()
            if data is None or len(data) != wanted:
                # Unreadable, or shorter than announced: not the snapshot we began.
                logger.error("event=snapshot_stream_read_failed peer=%s", peer_id)
                self._fail_outgoing(peer_id)
            else:
                stream.ahead, stream.ahead_offset = data, 0
            self._wake(peer_id)

        reading.add_done_callback(done)

    def connection_lost(self, peer_id: int) -> None:
        """Our connection to `peer_id` closed: its stream (if any) failed."""
        if peer_id in self._outgoing:
            self._fail_outgoing(peer_id)

    def _fail_outgoing(self, peer_id: int) -> None:
        stream = self._outgoing[peer_id]
        logger.info(
            "event=snapshot_stream_failed peer=%s stream=%d sent_bytes=%d",
            peer_id,
            stream.stream_id,
            stream.offset,
        )
        self.streams_failed += 1
        self._drop_outgoing(peer_id)
        self._report(peer_id, ok=False)

    def _drop_outgoing(self, peer_id: int) -> None:
        stream = self._outgoing.pop(peer_id)
        with contextlib.suppress(OSError):
            stream.file.close()

    def _on_ack(self, peer_id: int, payload: bytes) -> None:
        if len(payload) != _ACK.size:
            raise ProtocolError("snapshot stream ACK of the wrong size")
        _, stream_id, ok = _ACK.unpack(payload)
        stream = self._outgoing.get(peer_id)
        if stream is None or stream.stream_id != stream_id:
            return  # an answer about a stream that failed or was replaced meanwhile
        self._drop_outgoing(peer_id)
        if ok:
            self.streams_completed += 1
        else:
            self.streams_failed += 1
        logger.info(
            "event=snapshot_stream_%s peer=%s stream=%d bytes=%d",
            "done" if ok else "refused",
            peer_id,
            stream_id,
            stream.size,
        )
        self._report(peer_id, ok=ok)

    def _report(self, peer_id: int, *, ok: bool) -> None:
        if self._on_snapshot_status is not None:
            self._on_snapshot_status(peer_id, ok)

    # --- receiving (follower) -----------------------------------------------------------

    def receive(self, peer_id: int, payload: bytes) -> None:
        """A stream frame from `peer_id`; ProtocolError if it is malformed."""
        tag = payload[0]
        if tag == TAG_ACK:
            self._on_ack(peer_id, payload)
        elif tag == TAG_BEGIN:
            self._on_begin(peer_id, payload)
        elif tag == TAG_CHUNK:
            self._on_chunk(peer_id, payload)
        else:
            self._on_end(peer_id, payload)

    def _on_begin(self, peer_id: int, payload: bytes) -> None:
        fields = unpack(payload[1:])
        if type(fields) is not list or len(fields) != 3:
            raise ProtocolError("snapshot stream BEGIN is not [stream id, size, message]")
        stream_id, size, encoded = fields
        if type(stream_id) is not int or not 0 < stream_id < _STREAM_ID_MAX:
            raise ProtocolError("snapshot stream id out of range")
        if type(size) is not int or not 0 < size <= SNAPSHOT_BYTES_MAX:
            raise ProtocolError(f"snapshot stream size out of range (at most {SNAPSHOT_BYTES_MAX})")
        if type(encoded) is not bytes:
            raise ProtocolError("snapshot stream BEGIN carries no message")
        message = message_from_obj(unpack(encoded))
        if message.type is not MessageType.SNAPSHOT or message.snapshot is None:
            raise ProtocolError("snapshot stream BEGIN carries no SNAPSHOT message")
        if message.from_ != peer_id:
            raise ProtocolError(f"snapshot stream of {message.from_} on the stream of {peer_id}")
        self.discard_incoming(peer_id)
        if self._directory is None:
            raise ProtocolError("this node takes no snapshot streams")
        name = f"{INCOMING_PREFIX}{peer_id}-{stream_id}{INCOMING_SUFFIX}"
        path = os.path.join(self._directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        begun_at = asyncio.get_running_loop().time()
        self._incoming[peer_id] = _Incoming(stream_id, message, size, path, fd, begun_at)

    def _on_chunk(self, peer_id: int, payload: bytes) -> None:
        if len(payload) < _CHUNK_HEADER.size:
            raise ProtocolError("snapshot stream CHUNK shorter than its header")
        _, stream_id, offset = _CHUNK_HEADER.unpack_from(payload)
        stream = self._incoming.get(peer_id)
        if stream is None or stream.stream_id != stream_id:
            return  # a stream we discarded (the frames still in flight after a failure)
        data = memoryview(payload)[_CHUNK_HEADER.size :]
        if offset != stream.received or stream.received + len(data) > stream.size:
            self._refuse(peer_id, offset, f"chunk out of order (expected offset {stream.received})")
            return
        in_header = max(0, min(len(data), HEADER_BYTES - offset))
        if in_header:
            stream.header += bytes(data[:in_header])
        stream.crc = zlib.crc32(data[in_header:], stream.crc)
        try:
            while data:
                written = os.write(stream.fd, data)
                data = data[written:]
                stream.received += written
        except OSError as exc:
            self._refuse(peer_id, stream.received, f"write failed: {exc}")
            return
        self.bytes_received += len(payload) - _CHUNK_HEADER.size

    def _on_end(self, peer_id: int, payload: bytes) -> None:
        if len(payload) != _END.size:
            raise ProtocolError("snapshot stream END of the wrong size")
        _, stream_id, size = _END.unpack(payload)
        stream = self._incoming.get(peer_id)
        if stream is None or stream.stream_id != stream_id:
            return
        if size != stream.size or stream.received != stream.size:
            self._refuse(
                peer_id, stream.received, f"ended after {stream.received} of {stream.size} bytes"
            )
            return
        try:
            crc, length = read_header(stream.path, stream.header)
        except CorruptionError as exc:
            self._refuse(peer_id, exc.offset, exc.reason)
            return
        if length != size - HEADER_BYTES or crc != stream.crc:
            self._refuse(
                peer_id, HEADER_BYTES, "checksum or length of the body does not match the header"
            )
            return
        del self._incoming[peer_id]
        self._held.setdefault(peer_id, [])
        loop = asyncio.get_running_loop()
        logger.info(
            "event=snapshot_stream_end peer=%s stream=%d bytes=%d seconds=%.3f",
            peer_id,
            stream_id,
            size,
            loop.time() - stream.begun_at,
        )
        task = loop.create_task(self._install(peer_id, stream), name=f"snapshot-verify-{peer_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _install(self, peer_id: int, stream: _Incoming) -> None:
        """The stream matched its checksum: ACK at once, then fsync, load and check the file
        on a worker thread (frames keep arriving meanwhile) and step the SNAPSHOT message
        into the node. The ACK does not wait for the load: decoding a large snapshot holds
        this process for seconds, and an ACK written only after it found the leader's
        connection closed as silent and the stream failed (1M keys, 128 MB)."""
        self._send_payload(peer_id, _ACK.pack(TAG_ACK, stream.stream_id, True))
        started = time.perf_counter()
        try:
            snapshot, decoded = await asyncio.get_running_loop().run_in_executor(
                None, self._verify, stream
            )
        except (CorruptionError, OSError) as exc:
            self._release_held(peer_id)
            # Its checksum matched, so the file that arrived is the leader's: this is our
            # disk (or a damaged file on the leader). Not installed; the leader, told it was
            # delivered, sends it again when the follower's answer does not come.
            logger.error(
                "event=snapshot_stream_rejected peer=%s stream=%d error=%s",
                peer_id,
                stream.stream_id,
                exc,
            )
            return
        finally:
            with contextlib.suppress(OSError):
                os.unlink(stream.path)  # unless the storage took it over
        if decoded is not None and self.receiver is not None:
            self.receiver.offer_decoded(decoded)
        self._on_message(replace(stream.message, snapshot=snapshot))
        logger.info(
            "event=snapshot_stream_received peer=%s stream=%d index=%d bytes=%d "
            "load_seconds=%.3f decoded=%s",
            peer_id,
            stream.stream_id,
            snapshot.metadata.index,
            stream.size,
            time.perf_counter() - started,
            decoded is not None,
        )
        self._release_held(peer_id)

    def hold(self, peer_id: int, message: Message) -> bool:
        """While a snapshot from `peer_id` is ACKed but not yet stepped (it loads), its
        appends wait (up to _HELD_MAX, then they are dropped: Raft sends them again) and are
        stepped after it, in order: the leader, told the snapshot arrived, probes from after
        it, and the follower must not answer that probe with the log it had before the
        snapshot (a rejection that would send the snapshot again). True if held.

        An append that follows on from the same entry as the last one held is the leader's
        probe again (resent every heartbeat interval while the follower lags, and a
        million-key snapshot loads for seconds): only the one with more entries is kept (the
        newer on a tie). Kept, every copy was held (hundreds of megabytes at 1M keys) and
        stepped after the snapshot."""
        held = self._held.get(peer_id)
        if held is None or message.type not in _HELD_TYPES:
            return False
        if held and _same_probe(held[-1], message):
            if len(message.entries) >= len(held[-1].entries):
                held[-1] = message
        elif len(held) < _HELD_MAX:
            held.append(message)
        return True

    def _release_held(self, peer_id: int) -> None:
        for message in self._held.pop(peer_id, []):
            self._on_message(message)

    def _verify(self, stream: _Incoming) -> tuple[Snapshot, DecodedSnapshot | None]:
        """fsync, then load and check the file (magic, length, crc32, metadata); then, with
        a receiver, decode the state and hand it the file (on this worker thread: the loop
        goes on answering heartbeats; the state is decoded a slice at a time, see
        `kvstore.kv.state_machine.decode_state`). A state that does not decode (or any other
        failure of the receiver) is left to the node, which stops on it as on any snapshot it
        cannot restore."""
        try:
            os.fsync(stream.fd)
        finally:
            os.close(stream.fd)
        snapshot = load_snapshot(self._fs, stream.path)
        expected = stream.message.snapshot
        assert expected is not None
        if snapshot.metadata != expected.metadata:
            raise CorruptionError(stream.path, 0, "snapshot metadata differs from the stream's")
        receiver = self.receiver
        if receiver is None:
            return snapshot, None
        try:
            return snapshot, receiver.decode_snapshot(snapshot, stream.path)
        except Exception as exc:
            # Whatever went wrong here (ProtocolError: a state that does not decode), the
            # snapshot is still stepped and the held appends released after it; the node
            # then decodes it itself and stops on it if it cannot.
            logger.error("event=snapshot_decode_failed path=%s error=%r", stream.path, exc)
            return snapshot, None

    def _refuse(self, peer_id: int, offset: int, reason: str) -> None:
        """Refuse the stream from `peer_id` (ACK failed): the message names the partial file
        and the offset in it where the damage was found (for a checksum, the body's start:
        the crc32 covers the whole body)."""
        stream = self._incoming[peer_id]
        logger.error(
            "event=snapshot_stream_rejected peer=%s stream=%d file=%s offset=%d reason=%s",
            peer_id,
            stream.stream_id,
            stream.path,
            offset,
            reason,
        )
        self.discard_incoming(peer_id)
        self._send_payload(peer_id, _ACK.pack(TAG_ACK, stream.stream_id, False))

    def discard_incoming(self, peer_id: int) -> None:
        """Forget the partial stream from `peer_id` (its connection closed, or a new one
        begins): the next SNAPSHOT starts over."""
        stream = self._incoming.pop(peer_id, None)
        if stream is None:
            return
        with contextlib.suppress(OSError):
            os.close(stream.fd)
        with contextlib.suppress(OSError):
            os.unlink(stream.path)

    async def close(self) -> None:
        for peer_id in list(self._outgoing):
            self._drop_outgoing(peer_id)
        for peer_id in list(self._incoming):
            self.discard_incoming(peer_id)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _same_probe(held: Message, message: Message) -> bool:
    """Whether `message` is the same leader's append from the same previous entry as `held`
    (the leader's log only grows in its term, so the one with more entries holds the
    other's)."""
    return held.type is message.type is MessageType.APPEND and (
        held.term,
        held.index,
        held.log_term,
    ) == (message.term, message.index, message.log_term)


def _remove_leftovers(directory: str) -> None:
    """Partial files of streams a crash interrupted: never used, so removed on start."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(INCOMING_PREFIX) and name.endswith(INCOMING_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
