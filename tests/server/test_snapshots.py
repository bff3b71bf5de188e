"""The server's snapshots (kvstore/server/snapshots.py): encoded in a forked child by default,
on a thread otherwise; both store the bytes of the state machine at the snapshot's index, a
child's disk error is handled as the thread's was, and the child holds none of the parent's
descriptors (a socket the parent closes is closed at once, not when the child ends)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import time
from pathlib import Path

import pytest

from kvstore.kv.commands import Put, RequestId
from kvstore.raft.config import RaftConfig
from kvstore.raft.types import Role
from kvstore.replica import EncodedSnapshot, Replica, SnapshotJob
from kvstore.server.metrics import NodeMetrics
from kvstore.server.snapshots import FORK_AVAILABLE, SnapshotTender
from kvstore.server.storage_thread import StorageThread
from kvstore.storage.disk import DiskStorage
from kvstore.storage.fs import FileSystem
from tests.storage.faults import FaultyFileSystem

_DEADLINE_S = 30.0
needs_fork = pytest.mark.skipif(not FORK_AVAILABLE, reason="snapshots fork on Linux only")


def _leader(directory: Path, writes: int, fs: FileSystem | None = None) -> Replica:
    """A one-node replica, elected, with `writes` writes applied: a snapshot is due."""
    replica = Replica(
        RaftConfig(id=1, peers=(1,)),
        DiskStorage(directory, fs=fs),
        random.Random(1),
        snapshot_entries=1,
        snapshot_log_ratio=0.0,
        defer_snapshots=True,
    )
    replica.node.campaign()
    for i in range(writes + 3):
        replica.process_ready(lambda messages: None)
        if replica.node.status().role is Role.LEADER and i < writes:
            replica.propose(Put(f"key{i:04d}", b"v" * i, RequestId("t", i + 1), i))
    assert replica.applied_index > writes
    return replica


def _tender(replica: Replica, *, fork: bool) -> tuple[SnapshotTender, StorageThread]:
    metrics = NodeMetrics(1)
    storage = StorageThread(
        replica,
        metrics,
        node_id=1,
        peer_ids=[],
        send=lambda message: None,
        is_leader=lambda: True,
        inline_entries_max=0,
        heartbeat_interval_s=0.05,
        election_timeout_s=0.2,
    )
    return SnapshotTender(replica, storage, metrics, fork=fork), storage


async def _until(condition: object, tender: SnapshotTender) -> None:
    deadline = time.monotonic() + _DEADLINE_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the snapshot did not finish in time"
        await tender.tend()
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("fork", [pytest.param(True, marks=needs_fork), False])
async def test_a_snapshot_holds_the_state_at_its_index(tmp_path: Path, fork: bool) -> None:
    replica = _leader(tmp_path / "data", writes=300)
    expected, index = replica.state_machine.snapshot(), replica.applied_index
    tender, storage = _tender(replica, fork=fork)
    try:
        await tender.tend()  # begins
        # The driver goes on applying while the snapshot is made.
        replica.propose(Put("after", b"x", RequestId("t", 999), 999))
        replica.process_ready(lambda messages: None)
        await _until(lambda: replica.snapshot_index == index, tender)
    finally:
        tender.close()
        storage.close()
    stored = replica.storage.snapshot()
    assert stored.metadata.index == index and stored.data == expected
    assert replica.snapshot_bytes == len(expected)
    names = os.listdir(tmp_path / "data")
    assert [name for name in names if name.endswith(".snap")], names
    assert not [name for name in names if name.endswith(".prepared")], names
    replica.storage.close()
    reopened = DiskStorage(tmp_path / "data")
    try:
        assert reopened.snapshot().data == expected
    finally:
        reopened.close()


@needs_fork
async def test_a_full_disk_in_the_child_postpones_the_snapshot(tmp_path: Path) -> None:
    fs = FaultyFileSystem()
    replica = _leader(tmp_path / "data", writes=50, fs=fs)
    fs.fail("write", errno.ENOSPC)
    tender, storage = _tender(replica, fork=True)
    try:
        await tender.tend()
        await _until(lambda: tender._encoding is None, tender)
    finally:
        tender.close()
        storage.close()
    assert replica.snapshot_index == 0
    assert replica.begin_snapshot() is None  # retried a quarter interval later, not now
    assert not [name for name in os.listdir(tmp_path / "data") if ".prepared" in name]


@needs_fork
async def test_the_child_holds_none_of_the_parents_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica = _leader(tmp_path / "data", writes=5)

    def slow_encode(job: SnapshotJob) -> EncodedSnapshot:
        time.sleep(_DEADLINE_S)  # runs in the child only
        raise AssertionError("unreachable in a test")

    monkeypatch.setattr(replica, "encode_snapshot", slow_encode)
    ours, theirs = socket.socketpair()
    tender, storage = _tender(replica, fork=True)
    try:
        await tender.tend()
        child = tender._child
        assert child
        ours.close()  # the parent closes its end while the child runs
        theirs.settimeout(_DEADLINE_S / 2)
        assert theirs.recv(1) == b""  # end of stream at once: the child held no copy
        assert os.waitpid(child, os.WNOHANG) == (0, 0)  # the child was still running
    finally:
        tender.close()  # kills the child; its waiting thread reaps it
        storage.close()
        theirs.close()
    deadline = time.monotonic() + _DEADLINE_S
    while tender._encoding is not None and not tender._encoding[1].done():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    with pytest.raises(ChildProcessError):
        os.waitpid(child, os.WNOHANG)  # reaped
