"""Backup and restore: a consistent snapshot of a live cluster to a file, and a new cluster
from one (etcd's `snapshot save` / `snapshot restore`).

`GET /v1/snapshot` (any node) answers with a snapshot file (kvstore/storage/snapshot.py:
magic, crc32 of the body, length, body) of the whole state machine, taken fresh for the
request: after a linearizable read barrier (the state includes every write acknowledged
before the request arrived), the driver freezes the state machine at its applied index (a
copy of references, as for a local snapshot), and a worker thread encodes it while the node
goes on serving. The file's name-independent header carries its own checksum; the response
also names its index and term (`Kvstore-Snapshot-Index`, `Kvstore-Snapshot-Term`). One save
runs at a time per node (a second gets 429 and retries): the encoding is as large as the
store. A client that takes no chunk of the file for the client body timeout is cut, so a
client that never reads cannot hold the node's one save (and its memory) for ever.

`restore_data_dir(snapshot_file, data_dir)` verifies a saved file and makes it the whole
content of a new node's data directory: the snapshot installed as if a leader had sent it,
and a hard state at its term with the commit index at its index. Every node of the new
cluster is restored from the same file, so they all start from the same state and the same
membership (the file's, or the `voters` given, the same for every node), and the first
leader appends after it. A damaged file is refused with CorruptionError naming the file and the
offset; a data directory that already holds anything is refused too (nothing is overwritten).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from aiohttp import web

from kvstore.errors import OverloadedError, StorageError
from kvstore.raft.types import ConfState, HardState, Snapshot, SnapshotMetadata
from kvstore.storage.fs import FileSystem
from kvstore.storage.snapshot import encode_snapshot_file, load_snapshot

if TYPE_CHECKING:
    from kvstore.replica import SnapshotJob
    from kvstore.server.driver import Driver
    from kvstore.server.http import HttpApi

logger = logging.getLogger("kvstore.server")

CONTENT_TYPE = "application/vnd.kvstore.snapshot"
INDEX_HEADER = "Kvstore-Snapshot-Index"
TERM_HEADER = "Kvstore-Snapshot-Term"
_WRITE_BYTES = 1 << 20
_RETRY_AFTER_S = 1.0


class SnapshotApi:
    """`GET /v1/snapshot`: see the module docstring."""

    def __init__(self, http: HttpApi, driver: Driver) -> None:
        self._driver = driver
        self._busy = False
        http.add_routes({("/v1/snapshot", "GET"): self.save})

    async def save(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._busy:
            raise OverloadedError(
                "a snapshot is being saved on this node", retry_after_s=_RETRY_AFTER_S
            )
        self._busy = True
        try:
            driver = self._driver
            if driver.leader_pending():
                await driver.wait_for_leader()
            await driver.read_barrier()
            job: SnapshotJob = await driver.call(driver.replica.freeze_for_backup)
            loop = asyncio.get_running_loop()
            content = await loop.run_in_executor(None, _encode, job)
            response = web.StreamResponse(
                headers={
                    "Content-Type": CONTENT_TYPE,
                    "Content-Length": str(len(content)),
                    INDEX_HEADER: str(job.index),
                    TERM_HEADER: str(job.term),
                }
            )
            await response.prepare(request)
            if not await self._send(request, response, content):
                return response
            logger.info(
                "event=snapshot_saved index=%d term=%d bytes=%d", job.index, job.term, len(content)
            )
            return response
        finally:
            self._busy = False


    async def _send(
        self, request: web.BaseRequest, response: web.StreamResponse, content: bytes
    ) -> bool:
        """Write the file a chunk at a time; False if the client took no chunk within the
        client body timeout: its connection is then cut (closing would wait for unread
        bytes forever), which frees this node's one save for others."""
        timeout_s = self._driver.config.client_body_timeout_ms / 1000
        view = memoryview(content)
        try:
            for offset in range(0, len(content), _WRITE_BYTES):
                async with asyncio.timeout(timeout_s):
                    await response.write(view[offset : offset + _WRITE_BYTES])
            await response.write_eof()
        except TimeoutError:
            logger.warning("event=snapshot_client_stalled timeout_s=%s", timeout_s)
            if request.transport is not None:
                request.transport.abort()
            return False
        return True


def _encode(job: SnapshotJob) -> bytes:
    metadata = SnapshotMetadata(index=job.index, term=job.term, conf_state=job.conf_state)
    return encode_snapshot_file(Snapshot(metadata=metadata, data=job.frozen.encode()))


def verify_snapshot_file(path: str) -> Snapshot:
    """Load and check a saved snapshot; CorruptionError(path, offset, reason) if damaged,
    StorageError if it cannot be read or holds no state."""
    try:
        snapshot = load_snapshot(FileSystem(), path)
    except OSError as exc:
        raise StorageError(f"cannot read snapshot file {path}: {exc}") from exc
    if snapshot.is_empty():
        raise StorageError(f"snapshot file {path} holds no state (index 0)")
    return snapshot


def restore_data_dir(
    snapshot_path: str, data_dir: str, voters: tuple[int, ...] | None = None
) -> Snapshot:
    """Make `data_dir` (absent or empty) a node's data directory holding only the snapshot
    in `snapshot_path`; returns the snapshot as installed. `voters`: the members of the new
    cluster (every node of it must be restored with the same), instead of the file's. See
    the module docstring."""
    from kvstore.storage.disk import DiskStorage

    snapshot = verify_snapshot_file(snapshot_path)
    if voters is not None:
        if not voters or any(voter < 1 for voter in voters) or len(set(voters)) != len(voters):
            raise ValueError(f"voters must be distinct ids >= 1, got {voters}")
        conf_state = ConfState(voters=tuple(sorted(voters)))
        metadata = dataclasses.replace(snapshot.metadata, conf_state=conf_state)
        snapshot = dataclasses.replace(snapshot, metadata=metadata)
    if os.path.isdir(data_dir) and os.listdir(data_dir):
        raise StorageError(
            f"data directory {data_dir} is not empty: a restore only creates a new one"
        )
    storage = DiskStorage(data_dir)
    try:
        metadata = snapshot.metadata
        storage.save(HardState(term=metadata.term, commit=metadata.index), [], snapshot)
    finally:
        storage.close()
    return snapshot
