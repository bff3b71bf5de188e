"""Snapshots without stopping the driver: the server's side of the Replica's one snapshot
path (begin / encode / complete, the path the simulator drives too).

When one is due, a forked child process encodes the state machine and writes and fsyncs its
file (`_ForkedEncoding`): the child's memory is a copy-on-write image of the parent at the
fork, so nothing is copied beforehand (`Replica.begin_snapshot(copy=False)`) and the
encoding, seconds of Python for a million keys, holds no lock the parent's event loop
needs. The parent reads the encoding back from the finished file on a thread of its own (one
read and a checksum, which release the GIL), then the file is renamed into place, named in the log and
the log compacted on the storage thread, between two saves, the driver waiting only for
that. Where fork is missing (or with `fork=False`), the state machine is frozen on the
driver task (copies of references: 0.1 s or more for a million keys) and encoded on a
thread instead; that thread's Python competes with the event loop for the GIL: at a
million keys the loop then waited seconds at a time, and a leader so starved lost its
followers (the soak of bench/README.md).

Earlier, taken in line with `advance`, encoding a million-key store stopped writes for 3-8
s on all three nodes at once; with the file written on the storage thread, followers'
drivers waited a second for a 100 MB snapshot, answered nothing, and the leader, still
encoding, lost its quorum.

Rules for the child (`_encode_in_child`): it runs only `Replica.encode_snapshot` (msgpack
and plain file writes: no lock another thread of the parent may have held at the fork), it
first closes every inherited descriptor but its report pipe (so a socket the parent closes
is really closed, and the child can never write to one) and resets the signals the parent
handles, it dies with the parent (PR_SET_PDEATHSIG: a killed node leaves no child writing
into its data directory; recovery removes the prepared file), and it ends with `os._exit`,
never returning into the parent's code. It reports on its pipe: the prepared file's path,
or the error as the JSON of kvstore/errors.py, which the parent raises as the thread path
would have.

Invariant: at most one snapshot is being encoded at a time (`_encoding`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NoReturn

from kvstore.errors import (
    ERRORS,
    KVStoreError,
    ResourceExhaustedError,
    from_json,
    http_status,
)
from kvstore.replica import EncodedSnapshot
from kvstore.server.metrics import NodeMetrics
from kvstore.server.storage_thread import StorageThread
from kvstore.storage.fs import FileSystem
from kvstore.storage.snapshot import load_snapshot

if TYPE_CHECKING:
    from kvstore.replica import Replica, SnapshotJob

logger = logging.getLogger("kvstore.server")

# Freezing the state machine (or forking) for longer than this is logged.
_SLOW_FREEZE_S = 0.1
FORK_AVAILABLE = hasattr(os, "fork") and sys.platform.startswith("linux")
"""Whether snapshots are encoded in a forked child by default (Linux: PR_SET_PDEATHSIG)."""
_PR_SET_PDEATHSIG = 1
_REPORT_BYTES_MAX = 64 << 10


class SnapshotTender:
    """Takes the replica's snapshots between the driver's turns; see the module docstring."""

    def __init__(
        self,
        replica: Replica,
        storage: StorageThread,
        metrics: NodeMetrics,
        *,
        fork: bool = FORK_AVAILABLE,
    ) -> None:
        self._replica = replica
        self._storage = storage
        self._metrics = metrics
        self._fork = fork
        self._loop = asyncio.get_running_loop()
        # Snapshot encoding (or waiting for the child's): its own thread, so saves never
        # queue behind it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-snapshot")
        # The snapshot being encoded: its job, the encoding's future, when it began.
        self._encoding: tuple[SnapshotJob, asyncio.Future[EncodedSnapshot], float] | None = None
        # Invariant: the pid of the child encoding `_encoding`'s job, while it runs, else 0.
        self._child = 0

    def close(self) -> None:
        if self._child:
            # The waiting thread reaps it (its pipe ends with it); its outcome is moot.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._child, signal.SIGKILL)
        if self._encoding is not None:
            self._encoding[1].add_done_callback(_ignore_outcome)
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
            job = replica.begin_snapshot(copy=not self._fork)
            if job is not None:
                encoding = self._encode(job)
                self._encoding = (job, encoding, started)
                frozen_s = time.perf_counter() - started
                if frozen_s > _SLOW_FREEZE_S:
                    logger.warning(
                        "event=slow_snapshot_freeze seconds=%.3f fork=%s", frozen_s, self._fork
                    )
            return
        job, encoding, began = self._encoding
        if not encoding.done():
            return
        self._encoding = None
        self._child = 0
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

    def _encode(self, job: SnapshotJob) -> asyncio.Future[EncodedSnapshot]:
        """Start encoding `job`: in a forked child, or on the snapshot thread."""
        replica = self._replica
        if not self._fork:
            return self._loop.run_in_executor(self._executor, replica.encode_snapshot, job)
        report_read, report_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            _encode_in_child(replica, job, report_write)
        os.close(report_write)
        self._child = pid
        return self._loop.run_in_executor(
            self._executor, _wait_for_child, pid, report_read, job.index
        )


def _ignore_outcome(future: asyncio.Future[EncodedSnapshot]) -> None:
    if not future.cancelled():
        future.exception()


def _encode_in_child(replica: Replica, job: SnapshotJob, report_fd: int) -> NoReturn:
    """The forked child: encode and write the snapshot, report on `report_fd`, exit. Never
    returns, whatever happens (see the module docstring for its rules)."""
    status = 1
    report: dict[str, object] = {"error": {"code": KVStoreError.code, "message": "no report"}}
    try:
        gc.disable()  # a collection would only copy the parent's pages
        _detach_child(report_fd)
        report, status = {"prepared": replica.encode_snapshot(job).prepared}, 0
    except KVStoreError as exc:
        report = exc.to_json()
    except BaseException as exc:  # a bug: the parent raises it as an internal error
        report = {"error": {"code": KVStoreError.code, "message": f"snapshot child: {exc!r}"}}
    finally:
        try:
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(report_fd, data) :]
        finally:
            os._exit(status)


def _detach_child(report_fd: int) -> None:
    """Die with the parent, leave its signals alone, and hold none of its descriptors."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nobody waits for us
        os._exit(1)
    with contextlib.suppress(ValueError):  # only the main thread may; ours is the forker
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
    os.closerange(3, report_fd)
    os.closerange(report_fd + 1, os.sysconf("SC_OPEN_MAX"))


def _wait_for_child(pid: int, report_fd: int, index: int) -> EncodedSnapshot:
    """On the snapshot thread: the child's report, its exit, then the file it prepared, read
    back and verified (`load_snapshot` reads the state machine's bytes straight into one
    bytes object and checksums them: the GIL is released for both; a load that copied
    them twice more under the GIL stalled the loop 60-220 ms at a million keys). Raises the
    error the child reported; ResourceExhaustedError if it ended without a report (killed:
    the kernel's out-of-memory killer) so the snapshot is tried again later."""
    chunks: list[bytes] = []
    try:
        while chunk := os.read(report_fd, _REPORT_BYTES_MAX):
            chunks.append(chunk)
    finally:
        os.close(report_fd)
        _, wait_status = os.waitpid(pid, 0)
    try:
        report = json.loads(b"".join(chunks))
    except ValueError:
        raise ResourceExhaustedError(
            f"the snapshot child ended without a report (wait status {wait_status})"
        ) from None
    body: dict[str, object] = report if isinstance(report, dict) else {}
    prepared = body.get("prepared")
    if not isinstance(prepared, str):
        error = body.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        cls = ERRORS.get(code, KVStoreError) if isinstance(code, str) else KVStoreError
        raise from_json(http_status(cls), body)
    snapshot = load_snapshot(FileSystem(), prepared)
    if snapshot.metadata.index != index:
        raise KVStoreError(f"{prepared} holds index {snapshot.metadata.index}, not {index}")
    return EncodedSnapshot(snapshot.data, prepared)
