"""Snapshot files: the state machine's state as of a log index, written atomically.

File `snap-<index:020d>-<term:020d>.snap`:

    magic    8 bytes  b"KVSNAP01"
    checksum u32      zlib.crc32 of the body
    length   u64      body length
    body              kvstore.codec.pack(snapshot_to_obj(snapshot))

Writing follows the only sequence that survives a crash at any point: write a temporary file,
fsync it, rename it over its final name, fsync the directory. The server writes and fsyncs the
file ahead, on a thread of its own (`prepare_snapshot`: name + PREPARED_SUFFIX, which nothing
but recovery touches), and later only renames it (`write_snapshot(prepared=...)`), so the
storage thread is not busy for the seconds a large file takes. A snapshot is only *used* once
the write-ahead log names it (a SNAPSHOT record or a segment base), so a file that became
durable just before a crash but was never recorded in the log is ignored and removed on
recovery. Loading verifies magic, length, checksum and that the metadata matches the name.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import BinaryIO

import msgpack

from kvstore import codec
from kvstore.errors import (
    CorruptionError,
    FatalDiskError,
    ProtocolError,
    StorageError,
)
from kvstore.raft.types import Snapshot
from kvstore.storage.fs import FileSystem, shortage_error

MAGIC = b"KVSNAP01"
_HEADER = struct.Struct("<8sIQ")
SUFFIX = ".snap"
TEMPORARY_SUFFIX = ".tmp"
PREPARED_SUFFIX = ".prepared"
# A snapshot file is fsynced after every this many bytes written (see `_write_file`).
_SYNC_EVERY_BYTES = 4 << 20


def snapshot_name(index: int, term: int) -> str:
    return f"snap-{index:020d}-{term:020d}{SUFFIX}"


def parse_snapshot_name(name: str) -> tuple[int, int] | None:
    """(index, term) of a snapshot file name, or None for any other name."""
    if not (name.startswith("snap-") and name.endswith(SUFFIX)):
        return None
    parts = name[len("snap-") : -len(SUFFIX)].split("-")
    if len(parts) != 2 or not all(len(p) == 20 and p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def encode_snapshot_file(snapshot: Snapshot) -> bytes:
    body = codec.pack(codec.snapshot_to_obj(snapshot))
    return _HEADER.pack(MAGIC, zlib.crc32(body), len(body)) + body


def write_snapshot(
    fs: FileSystem, directory: str, snapshot: Snapshot, prepared: str | None = None
) -> tuple[str, int]:
    """Durably write `snapshot` (or, with `prepared`, the file `prepare_snapshot` wrote for
    it); returns its path and the number of fsyncs made. Raises DiskFullError on ENOSPC and
    ResourceExhaustedError on EMFILE, ENFILE or ENOMEM (the temporary file is removed), and
    FatalDiskError on any other failure."""
    path = _path(directory, snapshot)
    fsyncs = 1  # the directory's
    if prepared is None:
        prepared = path + TEMPORARY_SUFFIX
        fsyncs += _write_file(fs, prepared, encode_snapshot_file(snapshot))
    elif prepared != path + PREPARED_SUFFIX:
        raise ValueError(f"{prepared} is not the prepared file of {path}")
    try:
        fs.rename(prepared, path)
        fs.fsync_directory(directory)
    except OSError as exc:
        raise FatalDiskError(f"rename/fsync of {path} failed: {exc}") from exc
    return path, fsyncs


def prepare_snapshot(fs: FileSystem, directory: str, snapshot: Snapshot) -> str:
    """Write `snapshot`'s file and fsync it under its final name + PREPARED_SUFFIX; returns
    that path. Errors as `write_snapshot`."""
    path = _path(directory, snapshot) + PREPARED_SUFFIX
    _write_file(fs, path, encode_snapshot_file(snapshot))
    return path


def _path(directory: str, snapshot: Snapshot) -> str:
    return os.path.join(directory, snapshot_name(snapshot.metadata.index, snapshot.metadata.term))


def _write_file(fs: FileSystem, path: str, content: bytes) -> int:
    """Create or truncate `path`, write `content`, fsync; returns the number of fsyncs.
    The file is removed on ENOSPC.

    Written and synced _SYNC_EVERY_BYTES at a time: the log's fdatasync on the same disk
    waits for whatever dirty data the file system flushes with it, and one fsync of a 35 MB
    snapshot written at once made a two-entry save of the leader take 444 ms (the leader
    lost its followers). In steps, a save waits for one step's worth at most."""
    try:
        fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError as exc:
        raise _map_error(exc, f"create {path}") from exc
    fsyncs = 1
    try:
        view = memoryview(content)
        while view:
            step = view[:_SYNC_EVERY_BYTES]
            while step:
                written = fs.write(fd, step)
                step, view = step[written:], view[written:]
            if view:
                fs.fsync(fd)
                fsyncs += 1
    except OSError as exc:
        fs.close(fd)
        _remove_quietly(fs, path)
        raise _map_error(exc, f"write {path}") from exc
    try:
        fs.fsync(fd)
    except OSError as exc:
        raise FatalDiskError(f"fsync of {path} failed: {exc}") from exc
    finally:
        fs.close(fd)
    return fsyncs


HEADER_BYTES = _HEADER.size


def read_header(path: str, header: bytes) -> tuple[int, int]:
    """(crc32 of the body, length of the body) from the first HEADER_BYTES of a snapshot
    file (a stream receiving one checks its body as it arrives); CorruptionError if they
    are not a snapshot file's."""
    if len(header) < _HEADER.size:
        raise CorruptionError(path, 0, "snapshot file shorter than its header")
    magic, crc, length = _HEADER.unpack_from(header, 0)
    if magic != MAGIC:
        raise CorruptionError(path, 0, "bad snapshot magic")
    return crc, length


def load_snapshot(fs: FileSystem, path: str) -> Snapshot:
    """Read and verify a snapshot file; CorruptionError(path, offset, reason) on damage.

    The state machine's bytes are read straight into the one bytes object the Snapshot
    holds: reading the whole file and decoding the body made four copies of them at once
    (file, body, msgpack's input, the decoded bin), 512 MB of a 128 MB snapshot."""
    with fs.open_for_reading(path) as file:
        header = file.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise CorruptionError(path, 0, "snapshot file shorter than its header")
        magic, crc, length = _HEADER.unpack_from(header, 0)
        if magic != MAGIC:
            raise CorruptionError(path, 0, "bad snapshot magic")
        body_bytes = os.fstat(file.fileno()).st_size - _HEADER.size
        if body_bytes != length:
            raise CorruptionError(
                path, 12, f"snapshot body is {body_bytes} bytes, header says {length}"
            )
        prefix = file.read(min(length, _PREFIX_BYTES))
        layout = _body_layout(prefix, length)
        if layout is None:
            _check_crc(path, file, crc, zlib.crc32(prefix))
            raise CorruptionError(path, _HEADER.size, "snapshot does not decode")
        metadata_obj, data_start = layout
        file.seek(_HEADER.size + data_start)
        data = file.read(length - data_start)
    if zlib.crc32(data, zlib.crc32(prefix[:data_start])) != crc or len(data) != length - data_start:
        raise CorruptionError(path, _HEADER.size, "snapshot checksum mismatch")
    try:
        metadata = codec.snapshot_metadata_from_obj(metadata_obj)
    except ProtocolError as exc:
        raise CorruptionError(path, _HEADER.size, f"snapshot does not decode: {exc}") from exc
    named = parse_snapshot_name(os.path.basename(path))
    if named is not None and named != (metadata.index, metadata.term):
        raise CorruptionError(path, _HEADER.size, "snapshot metadata does not match its name")
    return Snapshot(metadata=metadata, data=data)


# The body's start holds its version byte, array header, metadata and the data's bin header:
# a few hundred bytes (the metadata is indices and member ids).
_PREFIX_BYTES = 64 << 10
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _body_layout(prefix: bytes, length: int) -> tuple[object, int] | None:
    """(the metadata's msgpack object, where the data's bytes start in the body) from the
    body's first bytes (`codec.pack(snapshot_to_obj(...))`: version, [metadata, bin]), if
    they are laid out so and the data runs exactly to the body's end; else None."""
    if not prefix or prefix[0] != codec.FORMAT_VERSION:
        return None
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(prefix))
    unpacker.feed(prefix[1:])
    try:
        if unpacker.read_array_header() != 2:
            return None
        metadata_obj = unpacker.unpack()
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.StackError):
        return None
    position = 1 + unpacker.tell()
    width = _BIN_LENGTH_BYTES.get(prefix[position]) if position < len(prefix) else None
    if width is None or position + 1 + width > len(prefix):
        return None
    data_start = position + 1 + width
    data_length = int.from_bytes(prefix[position + 1 : data_start], "big")
    if data_start + data_length != length:
        return None
    return metadata_obj, data_start


def _check_crc(path: str, file: BinaryIO, crc: int, running: int) -> None:
    """Read the rest of the body, CorruptionError if its crc32 is not `crc`."""
    while chunk := file.read(_PREFIX_BYTES):
        running = zlib.crc32(chunk, running)
    if running != crc:
        raise CorruptionError(path, _HEADER.size, "snapshot checksum mismatch")


def _map_error(exc: OSError, what: str) -> StorageError:
    return shortage_error(exc, what) or FatalDiskError(f"{what}: {exc}")


def _remove_quietly(fs: FileSystem, path: str) -> None:
    try:
        fs.unlink(path)
    except OSError:
        pass
