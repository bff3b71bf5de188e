"""DiskStorage: round trips through close and reopen, conflicts, snapshots, compaction."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvstore.errors import CompactedError, StorageError, UnavailableIndexError
from kvstore.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from kvstore.storage.disk import DiskStorage

VOTERS = ConfState(voters=(1, 2, 3))


def entries(first: int, last: int, term: int = 1, size: int = 10) -> list[Entry]:
    return [Entry(term=term, index=i, data=bytes([i % 256]) * size) for i in range(first, last + 1)]


def reopen(storage: DiskStorage, **kwargs: object) -> DiskStorage:
    storage.close()
    return DiskStorage(storage.directory, **kwargs)  # type: ignore[arg-type]


def test_fresh_directory_records_initial_voters(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path / "d", initial_conf_state=VOTERS)
    assert storage.initial_state() == (HardState(), VOTERS)
    assert (storage.first_index(), storage.last_index(), storage.term(0)) == (1, 0, 0)
    storage = reopen(storage, initial_conf_state=ConfState(voters=(9,)))
    assert storage.initial_state() == (HardState(), VOTERS)
    storage.close()


def test_save_and_recover_entries_and_hard_state(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path, initial_conf_state=VOTERS)
    storage.save(HardState(term=1, vote=2, commit=0), entries(1, 10), None)
    storage.save(HardState(term=1, vote=2, commit=7), [], None)
    storage = reopen(storage)
    assert storage.initial_state()[0] == HardState(term=1, vote=2, commit=7)
    assert storage.entries(1, 11, 1 << 20) == entries(1, 10)
    assert storage.entries(3, 11, 1) == entries(3, 3)  # at least one entry
    with pytest.raises(CompactedError):
        storage.entries(0, 2, 100)
    with pytest.raises(UnavailableIndexError):
        storage.term(11)
    assert storage.metrics.fsync_count == 0
    storage.save(None, entries(11, 11), None)
    assert storage.metrics.fsync_count == 1
    assert storage.metrics.bytes_written > 0
    storage.close()


def test_conflicting_entries_truncate_durably(tmp_path: Path) -> None:
    """Raft §5.3: a conflicting entry replaces ours and everything after it."""
    storage = DiskStorage(tmp_path)
    storage.save(HardState(term=1), entries(1, 10), None)
    storage.save(HardState(term=2), entries(6, 7, term=2), None)
    assert storage.last_index() == 7
    storage = reopen(storage)
    assert storage.entries(1, 8, 1 << 20) == entries(1, 5) + entries(6, 7, term=2)
    storage.save(None, entries(8, 9, term=2), None)
    storage = reopen(storage)
    assert storage.last_index() == 9
    storage.close()


def test_segments_rotate_and_recover(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path, segment_size_bytes=2048)
    for index in range(1, 301):
        storage.save(HardState(term=1, commit=index - 1), entries(index, index, size=50), None)
    assert len(list(tmp_path.glob("*.wal"))) > 5
    storage = reopen(storage, segment_size_bytes=2048)
    assert storage.entries(1, 301, 1 << 30) == entries(1, 300, size=50)
    storage.close()


def test_snapshot_and_compaction_survive_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = DiskStorage(tmp_path, compact_after_entries=50, segment_size_bytes=4096)
    storage.save(HardState(term=1, commit=200), entries(1, 200, size=40), None)
    snap = storage.create_snapshot(150, VOTERS, b"state@150")
    assert snap.metadata == SnapshotMetadata(index=150, term=1, conf_state=VOTERS)
    with caplog.at_level(logging.INFO, logger="kvstore.storage"):
        storage.compact(140)
    assert "compacted" in caplog.text
    assert storage.first_index() == 141
    assert len(list(tmp_path.glob("*.wal"))) == 1
    storage = reopen(storage)
    assert storage.first_index() == 141
    assert storage.term(140) == 1
    assert storage.snapshot() == snap
    assert storage.initial_state()[1] == VOTERS
    assert storage.entries(141, 201, 1 << 30) == entries(141, 200, size=40)
    with pytest.raises(CompactedError):
        storage.create_snapshot(150, VOTERS, b"again")
    storage.close()


def test_a_prepared_snapshot_is_written_ahead_and_only_renamed_later(tmp_path: Path) -> None:
    """The server writes a snapshot's file on a thread of its own (prepare_snapshot) and
    records it later (create_snapshot(prepared=...)), a rename. A prepared file survives the
    run-time clean-up of other snapshots, is removed by recovery if never recorded, and
    is removed on request when overtaken."""
    storage = DiskStorage(tmp_path)
    storage.save(HardState(term=2, commit=60), entries(1, 60, term=2), None)
    metadata = SnapshotMetadata(index=40, term=2, conf_state=VOTERS)
    prepared = storage.prepare_snapshot(Snapshot(metadata=metadata, data=b"state@40"))
    assert prepared is not None and prepared.endswith(".snap.prepared")
    assert storage.snapshot().metadata.index == 0  # nothing recorded yet
    # Another snapshot recorded meanwhile (run-time clean-up) leaves the prepared file.
    storage.create_snapshot(30, VOTERS, b"state@30")
    assert Path(prepared).exists()
    snap = storage.create_snapshot(40, VOTERS, b"state@40", prepared)
    assert snap.metadata == metadata and not Path(prepared).exists()
    storage = reopen(storage)
    assert storage.snapshot().data == b"state@40"
    # A prepared file whose term does not match the log is refused, not renamed.
    wrong = storage.prepare_snapshot(
        Snapshot(metadata=SnapshotMetadata(index=50, term=1, conf_state=VOTERS), data=b"x")
    )
    assert wrong is not None
    with pytest.raises(ValueError):
        storage.create_snapshot(50, VOTERS, b"x", wrong)
    storage.discard_prepared(wrong)
    assert not Path(wrong).exists()
    # A prepared file never recorded (a crash in between) is removed by recovery.
    leftover = storage.prepare_snapshot(
        Snapshot(metadata=SnapshotMetadata(index=55, term=2, conf_state=VOTERS), data=b"y")
    )
    assert leftover is not None and Path(leftover).exists()
    storage = reopen(storage)
    assert not Path(leftover).exists()
    assert storage.snapshot().data == b"state@40"
    storage.close()


def test_trailing_entries_compacts_automatically(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path, trailing_entries=10, compact_after_entries=1)
    storage.save(HardState(term=1, commit=100), entries(1, 100), None)
    storage.create_snapshot(80, VOTERS, b"s80")
    assert storage.first_index() == 71
    storage.create_snapshot(100, VOTERS, b"s100")
    assert storage.first_index() == 91
    assert [p.name for p in tmp_path.glob("*.snap")] == [
        "snap-00000000000000000100-00000000000000000001.snap"
    ]
    storage = reopen(storage)
    assert (storage.first_index(), storage.last_index()) == (91, 100)
    assert storage.snapshot().data == b"s100"
    storage.close()


def test_install_snapshot_replaces_log(tmp_path: Path) -> None:
    """Raft §7: a snapshot from the leader replaces the whole log."""
    storage = DiskStorage(tmp_path, initial_conf_state=VOTERS)
    storage.save(HardState(term=1), entries(1, 20), None)
    snap = Snapshot(SnapshotMetadata(index=50, term=3, conf_state=VOTERS), b"leader state")
    storage.save(HardState(term=3, commit=50), entries(51, 52, term=3), snap)
    assert (storage.first_index(), storage.last_index(), storage.term(50)) == (51, 52, 3)
    storage = reopen(storage)
    assert (storage.first_index(), storage.last_index(), storage.term(50)) == (51, 52, 3)
    assert storage.snapshot() == snap
    assert storage.initial_state() == (HardState(term=3, commit=50), VOTERS)
    storage.close()


def test_directory_is_locked(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)
    with pytest.raises(StorageError, match="in use"):
        DiskStorage(tmp_path)
    storage.close()


def test_entries_already_in_the_log_are_not_rewritten(tmp_path: Path) -> None:
    """Log Matching (Raft §5.3): a resent entry with our index and term is ours; only a real
    conflict truncates."""
    storage = DiskStorage(tmp_path)
    storage.save(HardState(term=1, commit=10), entries(1, 10), None)
    before = storage.metrics.bytes_written
    storage.save(None, entries(5, 10), None)
    assert storage.metrics.bytes_written == before  # nothing new: nothing written
    storage.save(None, entries(8, 9) + entries(10, 12, term=2), None)
    assert storage.entries(1, 13, 1 << 20) == entries(1, 9) + entries(10, 12, term=2)
    storage = reopen(storage)
    assert storage.entries(1, 13, 1 << 20) == entries(1, 9) + entries(10, 12, term=2)
    storage.close()


def test_compaction_by_bytes_rewrites_the_log(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path, compact_after_bytes=20_000, segment_size_bytes=4096)
    storage.save(HardState(term=1, commit=300), entries(1, 300, size=100), None)
    storage.create_snapshot(250, VOTERS, b"s")
    storage.compact(200)
    assert sum(p.stat().st_size for p in tmp_path.glob("*.wal")) < 20_000
    storage = reopen(storage)
    assert (storage.first_index(), storage.last_index()) == (201, 300)
    storage.close()


def test_in_memory_log_drops_out_of_garbage_collection(tmp_path: Path) -> None:
    """Regression: the log held Entry objects (slotted dataclasses, tracked by the collector
    for as long as they are in the log): 80,000-150,000 of them sat in the young generations
    at each generation-1 collection under load, and full collections walked the whole log.
    The log keeps plain tuples, which the collector untracks, and hands out Entry objects."""
    import gc

    storage = DiskStorage(tmp_path, initial_conf_state=VOTERS)
    gc.collect()
    tracked_before = len(gc.get_objects())
    batch = entries(1, 20_000)
    storage.save(HardState(term=1, vote=1, commit=0), batch, None)
    del batch
    gc.collect()
    assert len(gc.get_objects()) - tracked_before < 1_000
    assert storage.entries(5, 8, 1 << 20) == entries(5, 7)
    assert storage.entries(5, 20_001, 60) == entries(5, 6)  # 26 bytes each: two fit
    assert storage.term(20_000) == 1
    storage = reopen(storage)
    assert storage.entries(19_999, 20_001, 1 << 20) == entries(19_999, 20_000)
    storage.close()


def test_a_large_snapshot_file_is_synced_in_steps(tmp_path: Path) -> None:
    """A WAL fdatasync waits for the dirty data flushed with it: one fsync of a whole 35 MB
    snapshot made a leader's two-entry save take 444 ms. The file is synced every 4 MiB."""
    from kvstore.storage.fs import FileSystem

    class Recording(FileSystem):
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        def write(self, fd: int, data: bytes | memoryview) -> int:
            written = super().write(fd, data)
            self.calls.append(("write", written))
            return written

        def fsync(self, fd: int) -> None:
            super().fsync(fd)
            self.calls.append(("fsync", 0))

    fs = Recording()
    storage = DiskStorage(tmp_path, fs=fs)
    storage.save(HardState(term=1, commit=10), entries(1, 10), None)
    fs.calls.clear()
    data = bytes(10 << 20)
    metadata = SnapshotMetadata(index=10, term=1, conf_state=VOTERS)
    prepared = storage.prepare_snapshot(Snapshot(metadata=metadata, data=data))
    unsynced = largest = 0
    for call, size in fs.calls:
        unsynced = unsynced + size if call == "write" else 0
        largest = max(largest, unsynced)
    assert largest <= 4 << 20
    assert [call for call, _ in fs.calls].count("fsync") >= 3
    assert fs.calls[-1][0] == "fsync"
    storage.create_snapshot(10, VOTERS, data, prepared)
    storage = reopen(storage)
    assert storage.snapshot().data == data
    storage.close()
