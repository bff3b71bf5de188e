"""Snapshot files (kvstore/storage/snapshot.py): what loads and what is refused.

`load_snapshot` reads the state machine's bytes straight into the Snapshot it returns instead
of decoding the whole file in memory; these tests hold it to the same refusals as before:
any damaged byte, a short or long file, a file under another snapshot's name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstore.errors import CorruptionError
from kvstore.raft.types import ConfState, Snapshot, SnapshotMetadata
from kvstore.storage.fs import FileSystem
from kvstore.storage.snapshot import (
    HEADER_BYTES,
    encode_snapshot_file,
    load_snapshot,
    snapshot_name,
)


def _snapshot(data: bytes, index: int = 9, term: int = 2) -> Snapshot:
    metadata = SnapshotMetadata(index=index, term=term, conf_state=ConfState(voters=(1, 2, 3)))
    return Snapshot(metadata=metadata, data=data)


def _write(directory: Path, snapshot: Snapshot, content: bytes | None = None) -> Path:
    metadata = snapshot.metadata
    path = directory / snapshot_name(metadata.index, metadata.term)
    path.write_bytes(encode_snapshot_file(snapshot) if content is None else content)
    return path


@pytest.mark.parametrize("size", [0, 1, 255, 256, 70_000, 1 << 20])
def test_a_snapshot_file_loads_as_written(tmp_path: Path, size: int) -> None:
    snapshot = _snapshot(os.urandom(size))
    assert load_snapshot(FileSystem(), str(_write(tmp_path, snapshot))) == snapshot


def test_every_damaged_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    snapshot = _snapshot(b"state " * 50)
    content = encode_snapshot_file(snapshot)
    for position in range(len(content)):
        damaged = bytearray(content)
        damaged[position] ^= 0x41
        path = _write(tmp_path, snapshot, bytes(damaged))
        with pytest.raises(CorruptionError) as caught:
            load_snapshot(FileSystem(), str(path))
        assert caught.value.path == str(path)
        assert 0 <= caught.value.offset <= HEADER_BYTES


@pytest.mark.parametrize("cut", [1, 5, HEADER_BYTES, HEADER_BYTES + 3, -1])
def test_a_short_or_long_file_is_refused(tmp_path: Path, cut: int) -> None:
    snapshot = _snapshot(b"x" * 1000)
    content = encode_snapshot_file(snapshot)
    for variant in (content[:cut], content + b"\0" * abs(cut)):
        path = _write(tmp_path, snapshot, variant)
        with pytest.raises(CorruptionError, match=str(path)):
            load_snapshot(FileSystem(), str(path))


def test_a_file_under_another_snapshots_name_is_refused(tmp_path: Path) -> None:
    content = encode_snapshot_file(_snapshot(b"x", index=9))
    path = _write(tmp_path, _snapshot(b"x", index=10), content)
    with pytest.raises(CorruptionError, match="does not match its name"):
        load_snapshot(FileSystem(), str(path))
