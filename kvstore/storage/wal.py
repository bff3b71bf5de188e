"""The write-ahead log: segmented, append-only files of checksummed records.

Record framing (little-endian), one after another in a segment file `<seq:020d>.wal`:

    length   u32   low 24 bits: payload length; high 8 bits: a check of those 24 bits
    checksum u32   zlib.crc32 over the type byte followed by the payload
    type     u8    a `RecordType`
    payload        msgpack (kvstore.codec.pack: a version byte, then the value)

The length check lets recovery tell a torn write (a complete, self-consistent header whose
payload runs past the end of the file) from a damaged length field (which would otherwise
make a flipped bit in the middle of the log look like a torn tail and silently cut synced
records): every single-bit flip of the length field fails the check.

Every segment starts with a SEGMENT record `[seq, base]`. `base` is None when the segment
continues the previous one (rotation), or `[offset, offset_term, snapshot_index,
snapshot_term]` when the segment restarts the log (seq 0, WAL compaction, snapshot install):
then it is followed by CONF_STATE, HARD_STATE and the retained entries, and every older
segment is obsolete. Such segments are written to a temporary name, fsynced, renamed and the
directory fsynced, so a segment file either exists complete or not at all.

Recovery rules:
- Every record of every segment is verified. Only at the very end of the last segment may a
  record be incomplete (a torn write: the header is short, or the payload runs past the end
  of the file), or have a complete header and a payload of zeros only (its data blocks never
  came: delayed allocation after a power loss; etcd treats it the same), or the tail be all
  zeros; that tail is cut off and the cut logged with the file and offset. A record is
  acknowledged only after its fdatasync, and a synced record never reads back as zeros.
- Anything else (checksum mismatch, damaged length, unknown type, a payload that does not
  decode, an entry index gap, a segment sequence gap) raises CorruptionError(path, offset).

Appends (`append`) write one buffer with as few `write` calls as the kernel allows and then
one fdatasync: the group commit of a whole Ready. ENOSPC truncates the partial write away and
raises DiskFullError (the log is exactly as before), and so do EMFILE, ENFILE and ENOMEM with
ResourceExhaustedError (`fs.shortage_error`); any other failure raises FatalDiskError
and poisons the log (a retried fsync may report success over lost pages).
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore import codec
from kvstore.errors import (
    CorruptionError,
    FatalDiskError,
    ProtocolError,
    StorageError,
)
from kvstore.raft.types import ENTRY_OVERHEAD_BYTES, ConfState, Entry, EntryType, HardState
from kvstore.storage.fs import FileSystem, shortage_error

logger = logging.getLogger("kvstore.storage")

RECORD_HEADER = struct.Struct("<IIB")
HEADER_SIZE = RECORD_HEADER.size
MAX_PAYLOAD_BYTES = (1 << 24) - 1
# ENTRIES records are cut at about this payload size so one record never nears the limit.
ENTRIES_RECORD_TARGET_BYTES = 1 << 20
SEGMENT_SUFFIX = ".wal"
TEMPORARY_SUFFIX = ".tmp"


class RecordType(enum.IntEnum):
    """Values are part of the on-disk format: never renumber."""

    SEGMENT = 1  # [seq, base | None]; first record of every segment
    HARD_STATE = 2  # codec hard state
    ENTRIES = 3  # [entry, ...] at consecutive indexes, continuing the log
    TRUNCATE = 4  # [index]: drop the entry at index and every later one (Raft §5.3)
    SNAPSHOT = 5  # [index, term]: a durable snapshot file exists for this point
    CONF_STATE = 6  # codec conf state
    COMPACT = 7  # [index, term]: entries up to index are covered by a snapshot; drop them


_TYPE_CRC = {int(t): zlib.crc32(bytes((t,))) for t in RecordType}


def _length_field(length: int) -> int:
    return length | ((zlib.crc32(length.to_bytes(3, "little")) & 0xFF) << 24)


def frame(record_type: RecordType, payload: bytes) -> bytes:
    """One framed record: header followed by payload."""
    length = len(payload)
    if length > MAX_PAYLOAD_BYTES:
        raise StorageError(f"record of {length} bytes exceeds {MAX_PAYLOAD_BYTES}")
    crc = zlib.crc32(payload, _TYPE_CRC[record_type])
    return RECORD_HEADER.pack(_length_field(length), crc, record_type) + payload


def frame_entries(entries: Sequence[Entry]) -> list[bytes]:
    """ENTRIES records for consecutive entries, cut at about ENTRIES_RECORD_TARGET_BYTES.
    Hot path: entries become tuples (packed as arrays, EntryType as its int) in one packb."""
    total = sum([len(entry.data) for entry in entries]) + ENTRY_OVERHEAD_BYTES * len(entries)
    if total < ENTRIES_RECORD_TARGET_BYTES:
        batch = [(entry.term, entry.index, entry.type, entry.data) for entry in entries]
        return [frame(RecordType.ENTRIES, codec.pack(batch))]
    records: list[bytes] = []
    chunk: list[tuple[int, int, int, bytes]] = []
    chunk_bytes = 0
    for entry in entries:
        chunk.append((entry.term, entry.index, entry.type, entry.data))
        chunk_bytes += len(entry.data) + ENTRY_OVERHEAD_BYTES
        if chunk_bytes >= ENTRIES_RECORD_TARGET_BYTES:
            records.append(frame(RecordType.ENTRIES, codec.pack(chunk)))
            chunk, chunk_bytes = [], 0
    if chunk:
        records.append(frame(RecordType.ENTRIES, codec.pack(chunk)))
    return records


def segment_name(seq: int) -> str:
    return f"{seq:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    stem = name[: -len(SEGMENT_SUFFIX)]
    if name.endswith(SEGMENT_SUFFIX) and len(stem) == 20 and stem.isdigit():
        return int(stem)
    return None


def _segment_base(obj: Any) -> Any:
    if not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[0], int):
        raise ProtocolError("segment record: expected [seq, base]")
    return obj[1]


@dataclass(frozen=True, slots=True)
class Record:
    type: RecordType
    payload: bytes
    offset: int


@dataclass(slots=True)
class StorageMetrics:
    """Counters for /metrics; only ever increased (except last_fsync_seconds)."""

    fsync_count: int = 0
    fsync_seconds_total: float = 0.0
    last_fsync_seconds: float = 0.0
    bytes_written: int = 0


def scan_records(path: str, data: bytes, *, is_last: bool) -> tuple[list[Record], int]:
    """Verify and split one segment's bytes. Returns the records and the length of the valid
    prefix, which is shorter than `data` only for a torn tail of the last segment."""
    records: list[Record] = []
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < HEADER_SIZE:
            if is_last:
                return records, offset
            raise CorruptionError(path, offset, "truncated record header in a sealed segment")
        length_field, crc, type_ = RECORD_HEADER.unpack_from(data, offset)
        length = length_field & MAX_PAYLOAD_BYTES
        if _length_field(length) != length_field:
            if is_last and data.count(0, offset) == end - offset:
                return records, offset  # a zero-filled tail: the file grew, the data never came
            raise CorruptionError(path, offset, "record length field is damaged")
        start = offset + HEADER_SIZE
        if start + length > end:
            if is_last:
                return records, offset
            raise CorruptionError(path, offset, "record runs past the end of a sealed segment")
        payload = data[start : start + length]
        if zlib.crc32(payload, zlib.crc32(bytes((type_,)))) != crc:
            if is_last and length and data.count(0, start) == end - start:
                # The header reached the disk but the payload did not (delayed allocation
                # after a power loss): a torn write of the last, unacknowledged save, as
                # long as nothing but zeros follows it. Anything else stays corruption.
                return records, offset
            raise CorruptionError(path, offset, "record checksum mismatch")
        if type_ not in _TYPE_CRC:
            raise CorruptionError(path, offset, f"unknown record type {type_}")
        records.append(Record(RecordType(type_), payload, offset))
        offset = start + length
    return records, offset


_ENTRY_TYPES = {int(t): t for t in EntryType}


def _decode_entries(objs: list[Any], expected: int) -> list[Entry]:
    """codec.entry_from_obj's checks, inlined for recovery speed; entries must continue the
    log at `expected`. Raises ProtocolError or ValueError."""
    entries: list[Entry] = []
    for item in objs:
        if type(item) is not list or len(item) != 4:
            raise ProtocolError("entry: expected an array of 4")
        term, index, type_, data = item
        if (
            type(term) is not int
            or type(index) is not int
            or type(data) is not bytes
            or not 0 <= term < codec.STORED_VALUE_LIMIT
            or type_ not in _ENTRY_TYPES
            or type_ == EntryType.CONF_CHANGE
        ):
            # Raises with the precise reason; a CONF_CHANGE entry (rare) is checked there
            # in full, since the core adopts the configuration it names.
            checked = codec.entry_from_obj(item)
            if checked.type is not EntryType.CONF_CHANGE:
                raise ProtocolError(f"malformed entry {item!r:.80}")
        if index != expected:
            raise ValueError(f"entry index {index}, expected {expected}")
        entries.append(Entry(term, index, _ENTRY_TYPES[type_], data))
        expected += 1
    return entries


@dataclass(slots=True)
class WalState:
    """What replaying the log yields. Invariant: entries[i].index == offset + 1 + i."""

    offset: int = 0
    offset_term: int = 0
    entries: list[Entry] = field(default_factory=list)
    hard_state: HardState = field(default_factory=HardState)
    conf_state: ConfState = field(default_factory=ConfState)
    # (index, term) of every durable snapshot the log names, in log order.
    snapshots: list[tuple[int, int]] = field(default_factory=list)
    # The offset of the segment base the log was last restarted from (for compaction).
    base_offset: int = 0

    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def reset(self, base: Any) -> None:
        if not isinstance(base, list) or len(base) != 4:
            raise ProtocolError("segment base: expected an array of 4")
        for value in base:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProtocolError("segment base: expected non-negative integers")
        self.offset, self.offset_term, snapshot_index, snapshot_term = base
        self.base_offset = self.offset
        self.entries = []
        if snapshot_index > 0:
            self.snapshots.append((snapshot_index, snapshot_term))

    def apply(self, record: Record) -> None:
        """Replay one record; raises ProtocolError (or ValueError) on nonsense."""
        obj = codec.unpack(record.payload)
        if record.type is RecordType.ENTRIES:
            if not isinstance(obj, list) or not obj:
                raise ProtocolError("entries record: expected a non-empty array")
            self.entries.extend(_decode_entries(obj, self.last_index() + 1))
        elif record.type is RecordType.HARD_STATE:
            hard_state = codec.hard_state_from_obj(obj)
            if hard_state.term < self.hard_state.term:
                raise ValueError(f"term goes back from {self.hard_state.term} to {hard_state.term}")
            self.hard_state = hard_state
        elif record.type is RecordType.TRUNCATE:
            if not isinstance(obj, list) or len(obj) != 1 or not isinstance(obj[0], int):
                raise ProtocolError("truncate record: expected [index]")
            index = obj[0]
            if not self.offset < index <= self.last_index():
                raise ValueError(
                    f"truncate at {index} outside ({self.offset}, {self.last_index()}]"
                )
            del self.entries[index - self.offset - 1 :]
        elif record.type is RecordType.SNAPSHOT:
            if (
                not isinstance(obj, list)
                or len(obj) != 2
                or not all(isinstance(v, int) for v in obj)
            ):
                raise ProtocolError("snapshot record: expected [index, term]")
            self.snapshots.append((obj[0], obj[1]))
        elif record.type is RecordType.COMPACT:
            self._compact(obj)
        elif record.type is RecordType.CONF_STATE:
            self.conf_state = codec.conf_state_from_obj(obj)
        else:
            raise ValueError("a segment record in the middle of a segment")

    def _compact(self, obj: Any) -> None:
        if not isinstance(obj, list) or len(obj) != 2 or not all(isinstance(v, int) for v in obj):
            raise ProtocolError("compact record: expected [index, term]")
        index, term = obj
        if not self.offset < index <= self.last_index():
            raise ValueError(f"compact to {index} outside ({self.offset}, {self.last_index()}]")
        if self.entries[index - self.offset - 1].term != term:
            raise ValueError(f"compact to {index}: term {term} does not match the log")
        del self.entries[: index - self.offset]
        self.offset, self.offset_term = index, term


@dataclass(slots=True)
class _Segment:
    seq: int
    path: str
    size: int


class WriteAheadLog:
    """The segment files of one directory: recovery, appends, rotation and rewrites."""

    def __init__(
        self,
        directory: str,
        fs: FileSystem,
        metrics: StorageMetrics,
        *,
        segment_size_bytes: int,
    ) -> None:
        self.directory = directory
        self.fs = fs
        self.metrics = metrics
        self.segment_size_bytes = segment_size_bytes
        self._segments: list[_Segment] = []
        self._fd = -1
        self._failed: str | None = None

    # --- recovery -------------------------------------------------------------------------

    def open(self, fresh_content: bytes) -> WalState:
        """Recover the log; on an empty directory write `fresh_content` (which must start
        with the SEGMENT record of seq 0) as the first segment."""
        names = self.fs.listdir(self.directory)
        for name in names:
            if name.endswith(SEGMENT_SUFFIX + TEMPORARY_SUFFIX):
                self.fs.unlink(self._path(name))  # a segment that never became durable
        found = sorted(
            (seq, name) for name in names if (seq := parse_segment_name(name)) is not None
        )
        if not found:
            self._create_segment(0, fresh_content)
            state = WalState()
            self._replay(state, self._segments[0].path, fresh_content, is_last=True)
            return state
        segments = [_Segment(seq, self._path(name), 0) for seq, name in found]
        datas = [self.fs.read_file(segment.path) for segment in segments]
        start = self._newest_base(segments, datas)
        for segment in segments[:start]:
            logger.warning("removing obsolete segment path=%s", segment.path)
            self.fs.unlink(segment.path)
        segments, datas = segments[start:], datas[start:]
        state = WalState()
        for position, (segment, data) in enumerate(zip(segments, datas)):
            expected_seq = segments[0].seq + position
            if segment.seq != expected_seq:
                raise CorruptionError(segment.path, 0, f"segment {expected_seq} is missing")
            is_last = position == len(segments) - 1
            segment.size = self._replay(state, segment.path, data, is_last=is_last)
            if segment.size < len(data):
                self._cut_tail(segment, len(data))
        self._segments = segments
        self._fd = self._open_for_append(segments[-1].path)
        return state

    def _newest_base(self, segments: list[_Segment], datas: list[bytes]) -> int:
        """The position of the newest segment that restarts the log."""
        newest = -1
        for position, (segment, data) in enumerate(zip(segments, datas)):
            seq, base = self._read_segment_header(segment.path, data)
            if seq != segment.seq:
                raise CorruptionError(segment.path, 0, f"segment header names seq {seq}")
            if base is not None:
                newest = position
        if newest < 0:
            raise CorruptionError(segments[0].path, 0, "no segment restarts the log")
        return newest

    def _read_segment_header(self, path: str, data: bytes) -> tuple[int, Any]:
        if len(data) < HEADER_SIZE:
            raise CorruptionError(path, 0, "segment shorter than its header")
        length = RECORD_HEADER.unpack_from(data, 0)[0] & MAX_PAYLOAD_BYTES
        records, _ = scan_records(path, data[: HEADER_SIZE + length], is_last=False)
        if records[0].type is not RecordType.SEGMENT:
            raise CorruptionError(path, 0, "segment does not start with a segment record")
        try:
            obj = codec.unpack(records[0].payload)
        except ProtocolError as exc:
            raise CorruptionError(path, 0, f"segment record: {exc}") from exc
        try:
            return obj[0], _segment_base(obj)
        except ProtocolError as exc:
            raise CorruptionError(path, 0, str(exc)) from exc

    def _replay(self, state: WalState, path: str, data: bytes, *, is_last: bool) -> int:
        records, valid = scan_records(path, data, is_last=is_last)
        if not records or records[0].type is not RecordType.SEGMENT:
            raise CorruptionError(path, 0, "segment does not start with a segment record")
        for record in records:
            try:
                if record.type is RecordType.SEGMENT:
                    if record.offset != 0:
                        raise ValueError("a segment record in the middle of a segment")
                    base = _segment_base(codec.unpack(record.payload))
                    if base is not None:
                        state.reset(base)
                else:
                    state.apply(record)
            except (ProtocolError, ValueError) as exc:
                raise CorruptionError(path, record.offset, str(exc)) from exc
        return valid

    def _cut_tail(self, segment: _Segment, size: int) -> None:
        logger.warning(
            "cutting torn tail path=%s offset=%d bytes=%d",
            segment.path,
            segment.size,
            size - segment.size,
        )
        fd = self.fs.open(segment.path, os.O_WRONLY)
        try:
            self.fs.ftruncate(fd, segment.size)
            self._sync(fd, data_only=False)
        finally:
            self.fs.close(fd)

    # --- appends --------------------------------------------------------------------------

    def total_bytes(self) -> int:
        return sum(segment.size for segment in self._segments)

    def append(self, data: bytes) -> None:
        """Write `data` (framed records) durably: one write, one fdatasync."""
        self.check_usable()
        if self._segments[-1].size >= self.segment_size_bytes:
            self._rotate()
        segment = self._segments[-1]
        try:
            self._write_all(self._fd, data)
        except OSError as exc:
            self._undo_partial_write(segment, exc)
        self._sync(self._fd, data_only=True)
        segment.size += len(data)

    def rewrite(self, content: bytes) -> None:
        """Restart the log with a new segment (content begins with a SEGMENT record that has
        a base), then remove every older segment once the new one is durable."""
        self.check_usable()
        old = self._segments
        self._create_segment(old[-1].seq + 1, content)
        self._segments = self._segments[-1:]
        for segment in old:
            try:
                self.fs.unlink(segment.path)
            except OSError as exc:
                logger.warning("could not remove segment path=%s error=%s", segment.path, exc)
        self._fsync_directory()

    def next_seq(self) -> int:
        return self._segments[-1].seq + 1 if self._segments else 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self.fs.close(fd)

    def _rotate(self) -> None:
        seq = self._segments[-1].seq + 1
        header = frame(RecordType.SEGMENT, codec.pack([seq, None]))
        self._create_segment(seq, header)

    def _create_segment(self, seq: int, content: bytes) -> None:
        """tmp file, write, fsync, rename, fsync dir; then it becomes the append target."""
        path = self._path(segment_name(seq))
        temporary = path + TEMPORARY_SUFFIX
        try:
            fd = self.fs.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        except OSError as exc:
            raise self._map_error(exc, f"create {temporary}") from exc
        try:
            self._write_all(fd, content)
        except OSError as exc:
            self.fs.close(fd)
            self._remove_quietly(temporary)
            raise self._map_error(exc, f"write {temporary}") from exc
        try:
            self._sync(fd, data_only=False)
        finally:
            self.fs.close(fd)
        try:
            self.fs.rename(temporary, path)
        except OSError as exc:
            raise self._fatal(f"rename {temporary}: {exc}") from exc
        self._fsync_directory()
        if self._fd >= 0:
            self.close()
        self._fd = self._open_for_append(path)
        self._segments = [*self._segments, _Segment(seq, path, len(content))]

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self.fs.write(fd, view)
            self.metrics.bytes_written += written
            view = view[written:]

    def _undo_partial_write(self, segment: _Segment, exc: OSError) -> None:
        shortage = shortage_error(exc, f"write {segment.path}")
        if shortage is None:
            raise self._fatal(f"write {segment.path}: {exc}") from exc
        try:
            self.fs.ftruncate(self._fd, segment.size)
        except OSError as truncate_exc:
            raise self._fatal(f"truncate after {exc} {segment.path}: {truncate_exc}") from exc
        raise shortage from exc

    def _sync(self, fd: int, *, data_only: bool) -> None:
        started = time.perf_counter()
        try:
            if data_only:
                self.fs.fdatasync(fd)
            else:
                self.fs.fsync(fd)
        except OSError as exc:
            # Never retried: after a failed fsync the kernel may have dropped the dirty pages
            # and a second fsync can report success over lost data.
            raise self._fatal(f"fsync failed: {exc}") from exc
        elapsed = time.perf_counter() - started
        self.metrics.fsync_count += 1
        self.metrics.fsync_seconds_total += elapsed
        self.metrics.last_fsync_seconds = elapsed

    def _fsync_directory(self) -> None:
        started = time.perf_counter()
        try:
            self.fs.fsync_directory(self.directory)
        except OSError as exc:
            raise self._fatal(f"fsync of directory {self.directory} failed: {exc}") from exc
        elapsed = time.perf_counter() - started
        self.metrics.fsync_count += 1
        self.metrics.fsync_seconds_total += elapsed
        self.metrics.last_fsync_seconds = elapsed

    def _open_for_append(self, path: str) -> int:
        try:
            return self.fs.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise self._fatal(f"open {path}: {exc}") from exc

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.unlink(path)
        except OSError:
            pass

    def _map_error(self, exc: OSError, what: str) -> StorageError:
        return shortage_error(exc, what) or self._fatal(f"{what}: {exc}")

    def _fatal(self, message: str) -> FatalDiskError:
        self._failed = message
        return FatalDiskError(message)

    def poison(self, message: str) -> None:
        """Refuse every later write: a write or fsync failed somewhere in this directory."""
        self._failed = message

    def check_usable(self) -> None:
        if self._failed is not None:
            raise FatalDiskError(f"storage failed earlier: {self._failed}")

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)
