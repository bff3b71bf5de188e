"""Disk faults and damage: ENOSPC, EIO, torn and zeroed tails, corruption, and a crash at every
filesystem step of snapshot writing, WAL compaction and snapshot installation."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from kvstore.errors import (
    CorruptionError,
    DiskFullError,
    FatalDiskError,
    ResourceExhaustedError,
    http_status,
)
from kvstore.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from kvstore.storage.disk import DiskStorage
from kvstore.storage.fs import FileSystem
from kvstore.storage.wal import HEADER_SIZE, RecordType, frame, scan_records
from tests.storage.faults import CrashAfterFileSystem, FaultyFileSystem, SimulatedCrash

VOTERS = ConfState(voters=(1, 2, 3))


def entries(first: int, last: int, term: int = 1, size: int = 20) -> list[Entry]:
    return [Entry(term=term, index=i, data=bytes([i % 251]) * size) for i in range(first, last + 1)]


def wal_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.wal"))}


def all_entries(storage: DiskStorage) -> list[Entry]:
    if storage.last_index() < storage.first_index():
        return []
    return storage.entries(storage.first_index(), storage.last_index() + 1, 1 << 40)


# --- ENOSPC --------------------------------------------------------------------------------


def test_enospc_half_way_leaves_wal_as_before_and_recovers(tmp_path: Path) -> None:
    fs = FaultyFileSystem()
    storage = DiskStorage(tmp_path, fs=fs)
    storage.save(HardState(term=1, commit=5), entries(1, 10), None)
    before = wal_bytes(tmp_path)
    fs.fail("write", errno.ENOSPC, partial=100)
    with pytest.raises(DiskFullError):
        storage.save(HardState(term=1, commit=10), entries(11, 40), None)
    assert wal_bytes(tmp_path) == before
    assert storage.last_index() == 10
    assert storage.initial_state()[0] == HardState(term=1, commit=5)
    with pytest.raises(DiskFullError):  # still full: still refused, still unchanged
        storage.save(HardState(term=1, commit=10), entries(11, 40), None)
    assert wal_bytes(tmp_path) == before
    fs.heal()  # space is free again
    storage.save(HardState(term=1, commit=10), entries(11, 40), None)
    storage.close()
    storage = DiskStorage(tmp_path)
    assert all_entries(storage) == entries(1, 40)
    assert storage.initial_state()[0] == HardState(term=1, commit=10)
    storage.close()


def test_enospc_creating_a_segment_or_snapshot(tmp_path: Path) -> None:
    fs = FaultyFileSystem()
    storage = DiskStorage(tmp_path, fs=fs, segment_size_bytes=1024)
    storage.save(HardState(term=1, commit=60), entries(1, 60), None)  # > 1 KiB: rotates next
    segments = sorted(p.name for p in tmp_path.glob("*.wal"))
    fs.fail("write", errno.ENOSPC)
    with pytest.raises(DiskFullError):
        storage.save(None, entries(61, 61), None)
    with pytest.raises(DiskFullError):
        storage.create_snapshot(50, VOTERS, b"x" * 1000)
    assert sorted(p.name for p in tmp_path.glob("*")) == [*segments, "LOCK"]  # no tmp left
    fs.heal()
    storage.save(None, entries(61, 61), None)
    storage.create_snapshot(50, VOTERS, b"x" * 1000)
    storage.close()
    storage = DiskStorage(tmp_path)
    assert storage.last_index() == 61
    assert storage.snapshot().data == b"x" * 1000
    storage.close()


# --- EMFILE, ENFILE, ENOMEM: a shortage that passes, not a damaged disk ---------------------


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_no_file_descriptor_for_a_snapshot_or_segment_is_retried_not_fatal(
    tmp_path: Path, error: int
) -> None:
    """Issue 12 item 7: EMFILE while creating a snapshot file (a node whose descriptors
    were used up by idle connections) was a FatalDiskError, and the node exited with status
    2. Opening a snapshot file, a new segment or a prepared snapshot for want of a file
    descriptor or memory now raises ResourceExhaustedError (503, not DiskFullError),
    leaves the directory as it was and does not poison the storage: the same calls
    succeed once descriptors are free."""
    fs = FaultyFileSystem()
    storage = DiskStorage(tmp_path, fs=fs, segment_size_bytes=1024)
    storage.save(HardState(term=1, commit=60), entries(1, 60), None)  # > 1 KiB: rotates next
    before = sorted(p.name for p in tmp_path.glob("*"))
    fs.fail("open", error)
    snapshot = Snapshot(SnapshotMetadata(index=50, term=1, conf_state=VOTERS), b"x" * 1000)
    for attempt in (
        lambda: storage.save(None, entries(61, 61), None),
        lambda: storage.create_snapshot(50, VOTERS, b"x" * 1000),
        lambda: storage.prepare_snapshot(snapshot),
    ):
        with pytest.raises(ResourceExhaustedError) as refused:
            attempt()
        assert not isinstance(refused.value, DiskFullError)
        assert http_status(refused.value) == 503
    assert sorted(p.name for p in tmp_path.glob("*")) == before
    assert storage.last_index() == 60
    fs.heal()
    storage.save(None, entries(61, 61), None)
    storage.create_snapshot(50, VOTERS, b"x" * 1000)
    storage.close()
    storage = DiskStorage(tmp_path)
    assert storage.last_index() == 61
    assert storage.snapshot().data == b"x" * 1000
    storage.close()


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ENOMEM])
def test_a_failed_fsync_stays_fatal_whatever_its_errno(tmp_path: Path, error: int) -> None:
    fs = FaultyFileSystem()
    storage = DiskStorage(tmp_path, fs=fs)
    fs.fail("fdatasync", error)
    with pytest.raises(FatalDiskError):
        storage.save(HardState(term=1), entries(1, 3), None)
    storage.close()


# --- EIO -----------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["fdatasync", "write"])
def test_eio_is_fatal_and_never_retried(tmp_path: Path, operation: str) -> None:
    fs = FaultyFileSystem()
    storage = DiskStorage(tmp_path, fs=fs)
    storage.save(HardState(term=1), entries(1, 3), None)
    fs.fail(operation, errno.EIO)
    with pytest.raises(FatalDiskError):
        storage.save(HardState(term=1, commit=3), entries(4, 5), None)
    fs.heal()
    calls = fs.calls
    with pytest.raises(FatalDiskError, match="failed earlier"):
        storage.save(HardState(term=1, commit=3), entries(4, 5), None)
    with pytest.raises(FatalDiskError):
        storage.create_snapshot(2, VOTERS, b"s")
    assert fs.calls == calls  # the failed fsync was not retried
    storage.close()


def test_fsync_enospc_is_fatal(tmp_path: Path) -> None:
    """An fsync error of any kind means the pages may be gone: fatal, never DiskFullError."""
    fs = FaultyFileSystem()
    storage = DiskStorage(tmp_path, fs=fs)
    fs.fail("fdatasync", errno.ENOSPC)
    with pytest.raises(FatalDiskError):
        storage.save(HardState(term=1), entries(1, 3), None)
    storage.close()


# --- torn tails and corruption ---------------------------------------------------------------


def _prepared(tmp_path: Path, **kwargs: int) -> list[Path]:
    storage = DiskStorage(tmp_path, initial_conf_state=VOTERS, **kwargs)  # type: ignore[arg-type]
    for index in range(1, 121):
        storage.save(HardState(term=1, commit=index - 1), entries(index, index), None)
    storage.close()
    return sorted(tmp_path.glob("*.wal"))


def test_torn_tail_is_cut_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    last = _prepared(tmp_path)[-1]
    size = last.stat().st_size
    with open(last, "ab") as file:
        file.write(frame(RecordType.ENTRIES, b"\x01" + b"z" * 60)[:30])
    with caplog.at_level(logging.WARNING, logger="kvstore.storage"):
        storage = DiskStorage(tmp_path)
    assert f"offset={size} bytes=30" in caplog.text
    assert last.stat().st_size == size
    assert all_entries(storage) == entries(1, 120)
    storage.close()


def _zero_payload_of_last_record(path: Path, *, garbage: bytes = b"") -> int:
    """Zero the payload of the last record of `path` (its header intact), then append
    `garbage`; returns the record's offset."""
    data = path.read_bytes()
    records, _ = scan_records(str(path), data, is_last=True)
    last = records[-1]
    start = last.offset + HEADER_SIZE
    path.write_bytes(data[:start] + bytes(len(last.payload)) + garbage)
    return last.offset


def test_a_last_record_with_a_zeroed_payload_is_cut_as_a_torn_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12 item 6: after a power loss with delayed allocation, the last record's
    header can be on disk and its payload zeros (the data blocks never came). The node
    refused to start (checksum mismatch); that record was never acknowledged (a save is
    acknowledged after its fdatasync), so, as etcd does, it is cut like a torn write and
    the cut logged with the file and offset. A zero tail after it changes nothing."""
    last = _prepared(tmp_path)[-1]
    offset = _zero_payload_of_last_record(last, garbage=bytes(7))
    with caplog.at_level(logging.WARNING, logger="kvstore.storage"):
        storage = DiskStorage(tmp_path)
    assert f"cutting torn tail path={last} offset={offset}" in caplog.text
    assert last.stat().st_size == offset
    # The last save wrote entry 120 then the hard state with commit 119: the hard state
    # record (the last one) is the torn one.
    assert all_entries(storage) == entries(1, 120)
    assert storage.initial_state()[0].commit == 118
    storage.close()


@pytest.mark.parametrize("after", ["record", "garbage"])
def test_a_zeroed_payload_with_anything_after_it_is_corruption(tmp_path: Path, after: str) -> None:
    """Only a zeroed record with nothing after it can be a torn write: a record after it,
    or non-zero bytes, mean a synced record was damaged."""
    last = _prepared(tmp_path)[-1]
    follow = (
        frame(RecordType.HARD_STATE, last.read_bytes()[-20:]) if after == "record" else b"\x01"
    )
    offset = _zero_payload_of_last_record(last, garbage=follow)
    with pytest.raises(CorruptionError) as caught:
        DiskStorage(tmp_path)
    assert (caught.value.path, caught.value.offset) == (str(last), offset)
    assert "checksum" in caught.value.reason


def test_a_zeroed_payload_in_a_sealed_segment_is_corruption(
    tmp_path: Path,
) -> None:
    segments = _prepared(tmp_path, segment_size_bytes=1024)
    offset = _zero_payload_of_last_record(segments[0])
    with pytest.raises(CorruptionError) as caught:
        DiskStorage(tmp_path)
    assert (caught.value.path, caught.value.offset) == (str(segments[0]), offset)


def test_a_last_record_with_a_garbage_payload_is_corruption(tmp_path: Path) -> None:
    last = _prepared(tmp_path)[-1]
    data = bytearray(last.read_bytes())
    records, _ = scan_records(str(last), bytes(data), is_last=True)
    start = records[-1].offset + HEADER_SIZE
    data[start : start + len(records[-1].payload)] = b"\x5a" * len(records[-1].payload)
    last.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match="checksum"):
        DiskStorage(tmp_path)


def test_checksum_failure_in_a_sealed_segment_is_reported(tmp_path: Path) -> None:
    segments = _prepared(tmp_path, segment_size_bytes=1024)
    assert len(segments) >= 2
    data = bytearray(segments[0].read_bytes())
    data[-3] ^= 0x10
    segments[0].write_bytes(bytes(data))
    with pytest.raises(CorruptionError) as caught:
        DiskStorage(tmp_path)
    assert caught.value.path == str(segments[0])
    assert "checksum" in caught.value.reason


def test_truncated_sealed_segment_is_reported(tmp_path: Path) -> None:
    segments = _prepared(tmp_path, segment_size_bytes=1024)
    os.truncate(segments[0], segments[0].stat().st_size - 5)
    with pytest.raises(CorruptionError, match="sealed segment"):
        DiskStorage(tmp_path)


def test_missing_segment_is_reported(tmp_path: Path) -> None:
    segments = _prepared(tmp_path, segment_size_bytes=1024)
    assert len(segments) >= 3
    segments[1].unlink()
    with pytest.raises(CorruptionError, match="missing"):
        DiskStorage(tmp_path)


def test_corrupt_snapshot_is_reported(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)
    storage.save(HardState(term=1, commit=10), entries(1, 10), None)
    storage.create_snapshot(8, VOTERS, b"important state" * 10)
    storage.close()
    (path,) = tmp_path.glob("*.snap")
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptionError) as caught:
        DiskStorage(tmp_path)
    assert caught.value.path == str(path)
    path.unlink()
    with pytest.raises(CorruptionError, match="missing"):
        DiskStorage(tmp_path)


# --- a crash at every filesystem step --------------------------------------------------------


def _crash_at_every_step(
    tmp_path: Path,
    prepare: Callable[[DiskStorage], None],
    act: Callable[[DiskStorage], None],
    check: Callable[[DiskStorage, bool], None],
    *,
    compact_after_entries: int = 10_000,
    segment_size_bytes: int = 64 << 20,
) -> list[str]:
    """Prepare a directory, then for N = 0, 1, ...: copy it, run `act` with a crash before
    the N-th mutating filesystem operation, reopen and `check(storage, completed)`. Stops at
    the first N where `act` completes. Returns the operations of the complete run."""
    template = tmp_path / "template"
    storage = DiskStorage(template, initial_conf_state=VOTERS)
    prepare(storage)
    storage.close()
    for crash_at in range(1000):
        directory = tmp_path / f"crash-{crash_at}"
        shutil.copytree(template, directory)
        fs = CrashAfterFileSystem(None)
        storage = DiskStorage(
            directory,
            fs=fs,
            compact_after_entries=compact_after_entries,
            segment_size_bytes=segment_size_bytes,
        )
        fs.crash_at = len(fs.operations) + crash_at
        try:
            act(storage)
            completed = True
        except SimulatedCrash:
            completed = False
        storage.close()
        recovered = DiskStorage(directory)
        check(recovered, completed)
        recovered.close()
        shutil.rmtree(directory)
        if completed:
            return fs.operations
    raise AssertionError("never completed")


@pytest.mark.parametrize("rewrite", [False, True])
def test_crash_at_every_step_of_create_snapshot_and_compaction(
    tmp_path: Path, rewrite: bool
) -> None:
    """rewrite=False: compaction is a COMPACT record; True: the WAL is rewritten."""

    def prepare(storage: DiskStorage) -> None:
        storage.save(HardState(term=2, vote=1, commit=90), entries(1, 100, term=2), None)
        storage.create_snapshot(50, VOTERS, b"old state")

    def act(storage: DiskStorage) -> None:
        storage.create_snapshot(90, VOTERS, b"new state")
        storage.compact(85)

    def check(storage: DiskStorage, completed: bool) -> None:
        assert storage.initial_state() == (HardState(term=2, vote=1, commit=90), VOTERS)
        assert storage.last_index() == 100
        assert all_entries(storage) == entries(storage.first_index(), 100, term=2)
        snapshot = storage.snapshot()
        assert (snapshot.metadata.index, snapshot.data) in [(50, b"old state"), (90, b"new state")]
        assert storage.first_index() <= snapshot.metadata.index + 1
        assert len(list(Path(storage.directory).glob("*.tmp"))) == 0
        if completed:
            assert (storage.first_index(), snapshot.metadata.index) == (86, 90)

    operations = _crash_at_every_step(
        tmp_path, prepare, act, check, compact_after_entries=10 if rewrite else 10_000
    )
    assert "rename snap-00000000000000000090-00000000000000000002.snap.tmp" in operations
    assert any(op.startswith("unlink 0000") for op in operations) == rewrite


def test_crash_at_every_step_of_snapshot_install(tmp_path: Path) -> None:
    snapshot = Snapshot(SnapshotMetadata(index=500, term=4, conf_state=VOTERS), b"leader")

    def prepare(storage: DiskStorage) -> None:
        storage.save(HardState(term=3, vote=2, commit=20), entries(1, 30, term=3), None)

    def act(storage: DiskStorage) -> None:
        storage.save(HardState(term=4, commit=500), entries(501, 503, term=4), snapshot)

    def check(storage: DiskStorage, completed: bool) -> None:
        if storage.snapshot().metadata.index == 0:
            assert not completed
            assert storage.initial_state()[0] == HardState(term=3, vote=2, commit=20)
            assert all_entries(storage) == entries(1, 30, term=3)
        else:
            assert storage.snapshot() == snapshot
            assert storage.initial_state()[0] == HardState(term=4, commit=500)
            assert all_entries(storage) == entries(501, 503, term=4)
        if completed:
            assert storage.snapshot() == snapshot

    operations = _crash_at_every_step(tmp_path, prepare, act, check)
    assert len(operations) >= 8


def test_crash_at_every_step_of_a_save_that_rotates_the_segment(tmp_path: Path) -> None:
    def prepare(storage: DiskStorage) -> None:
        storage.save(HardState(term=1, commit=60), entries(1, 60), None)  # over 1 KiB

    def act(storage: DiskStorage) -> None:
        storage.save(HardState(term=1, commit=61), entries(61, 61), None)

    def check(storage: DiskStorage, completed: bool) -> None:
        assert storage.last_index() in (60, 61)
        assert all_entries(storage) == entries(1, storage.last_index())
        if completed:
            assert storage.initial_state()[0] == HardState(term=1, commit=61)
        assert len(list(Path(storage.directory).glob("*.tmp"))) == 0

    operations = _crash_at_every_step(tmp_path, prepare, act, check, segment_size_bytes=1024)
    assert "rename 00000000000000000001.wal.tmp" in operations


class RecordingFileSystem(FileSystem):
    """Records directory creations and directory fsyncs, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def mkdir(self, path: str) -> None:
        self.calls.append(("mkdir", path))
        super().mkdir(path)

    def fsync_directory(self, path: str) -> None:
        self.calls.append(("fsync", path))
        super().fsync_directory(path)


def test_a_new_data_directory_is_durable_in_its_parent(tmp_path: Path) -> None:
    """Issue 12 item 4: the data directory was created without fsyncing it or its parent,
    so after a power loss a freshly bootstrapped node could come back without its directory
    (and the vote and entries in it). Each newly created level is fsynced, then its parent."""
    fs = RecordingFileSystem()
    top = tmp_path / "a"
    data_dir = top / "b" / "c"
    storage = DiskStorage(data_dir, fs=fs)
    storage.close()
    created = [str(top), str(top / "b"), str(data_dir)]
    assert [path for call, path in fs.calls if call == "mkdir"] == created
    for path in created:
        mkdir = fs.calls.index(("mkdir", path))
        after = fs.calls[mkdir + 1 :]
        assert ("fsync", path) in after, f"{path} itself is not fsynced"
        assert ("fsync", os.path.dirname(path)) in after, f"the parent of {path} is not"
    # An existing directory is opened as it is: nothing created.
    fs.calls.clear()
    DiskStorage(data_dir, fs=fs).close()
    assert not [call for call in fs.calls if call[0] == "mkdir"]
