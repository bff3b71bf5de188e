"""Snapshots without stopping the driver: the server's side of the Replica's one snapshot
path (begin / encode / complete, the path the simulator drives too).

When one is due, the state machine is frozen on the driver task (copies of references:
about 0.1 s for a million keys) and encoded, its file written and fsynced, on a thread of
its own while the driver goes on committing and applying; then the file is renamed into
place, named in the log and the log compacted on the storage thread, between two saves, the
driver waiting only for that. Taken in line with `advance`, encoding a million-key store
stopped writes for 3-8 s on all three nodes at once; with the file written on the storage
thread, followers' drivers waited a second for a 100 MB snapshot, answered nothing, and the
leader, still encoding, lost its quorum.

Invariant: at most one snapshot is being encoded at a time (`_encoding`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from kvstore.errors import ResourceExhaustedError
from kvstore.server.metrics import NodeMetrics
from kvstore.server.storage_thread import StorageThread

if TYPE_CHECKING:
    from kvstore.replica import EncodedSnapshot, Replica, SnapshotJob

logger = logging.getLogger("kvstore.server")

# Freezing the state machine for longer than this is logged.
_SLOW_FREEZE_S = 0.1


class SnapshotTender:
    """Takes the replica's snapshots between the driver's turns; see the module docstring."""

    def __init__(self, replica: Replica, storage: StorageThread, metrics: NodeMetrics) -> None:
        self._replica = replica
        self._storage = storage
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        # Snapshot encoding: its own thread, so saves never queue behind it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-snapshot")
        # The snapshot being encoded: its job, the encoding's future, when it began.
        self._encoding: tuple[SnapshotJob, asyncio.Future[EncodedSnapshot], float] | None = None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def tend(self) -> None:
        """One step, run by the driver after each turn: begin a snapshot when one is due,
        or store the one whose encoding has finished (or retry a skipped compaction)."""
        replica = self._replica
        if self._encoding is None:
            if replica.compaction_due():
                # A full disk skipped the compaction after the last snapshot: try it again.
                await self._storage.run(replica.retry_compaction)
                return
            started = time.perf_counter()
            job = replica.begin_snapshot()
            if job is not None:
                encoding = self._loop.run_in_executor(self._executor, replica.encode_snapshot, job)
                self._encoding = (job, encoding, started)
                frozen_s = time.perf_counter() - started
                if frozen_s > _SLOW_FREEZE_S:
                    logger.warning("event=slow_snapshot_freeze seconds=%.3f", frozen_s)
            return
        job, encoding, began = self._encoding
        if not encoding.done():
            return
        self._encoding = None
        try:
            encoded = encoding.result()
        except ResourceExhaustedError as exc:
            replica.abandon_snapshot(exc)
            return
        encoded_s = time.perf_counter() - began
        started = time.perf_counter()
        taken = await self._storage.run(functools.partial(replica.complete_snapshot, job, encoded))
        if taken:
            self._metrics.snapshots.inc()
            logger.info(
                "event=snapshot_taken index=%s bytes=%d encode_seconds=%.3f store_seconds=%.3f",
                taken,
                len(encoded.data),
                encoded_s,
                time.perf_counter() - started,
            )
