"""The driver's disk: where saves run (inline or on one storage thread), what the node knows
of its disk's health, and the keepalives a leader sends while it waits for a slow save.

Rules that hold here:
- Every save, snapshot store and compaction runs on the one storage thread (or inline, for a
  small save on a fast disk), so they never overlap and happen in the driver's order.
- A `DiskFullError` from a save refuses new writes (507, `disk_full`) and retries the same
  save until it succeeds, and so does any other `ResourceExhaustedError` (EMFILE, ENFILE,
  ENOMEM: 503, `resources_exhausted`); a `FatalDiskError` propagates and ends the process
  (a retried fsync may silently lose data).
- While a save is slow a leader sends keepalives (heartbeats with commit 0, only in a term
  already durable), but for at most one election timeout of the same save
  (kvstore.keepalive): a leader whose disk hangs, or stays full, is replaced instead of
  holding its followers in lease for as long as it lasts.
- Invariant: `durable_term_vote` is the (term, vote) of the last hard state made durable;
  the driver sets it after each save (a leader's early appends need it unchanged).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from kvstore.errors import DiskFullError, ResourceExhaustedError
from kvstore.keepalive import KeepalivePolicy
from kvstore.raft.types import Message, MessageType, Ready
from kvstore.server.metrics import NodeMetrics

if TYPE_CHECKING:
    from kvstore.replica import Replica

logger = logging.getLogger("kvstore.server")

T = TypeVar("T")

_DISK_FULL_RETRY_S = 0.1
# A save this slow is logged: it is how elections under load are explained.
_SLOW_SAVE_S = 0.1
# Saves are run inline only while they take less than this on average.
_INLINE_SAVE_S = 0.0005


class StorageThread:
    """Runs the replica's disk work for the driver; see the module docstring."""

    def __init__(
        self,
        replica: Replica,
        metrics: NodeMetrics,
        *,
        node_id: int,
        peer_ids: list[int],
        send: Callable[[Message], None],
        is_leader: Callable[[], bool],
        inline_entries_max: int,
        heartbeat_interval_s: float,
        election_timeout_s: float,
    ) -> None:
        self._replica = replica
        self._metrics = metrics
        self._node_id = node_id
        self._peer_ids = peer_ids
        self._send = send
        self._is_leader = is_leader
        self._inline_entries_max = inline_entries_max
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-fsync")
        # Moving average of save durations: decides inline versus the storage thread.
        self._save_seconds_average = 0.0
        self.disk_full = False
        # A save failed for want of file descriptors or memory (EMFILE, ENFILE, ENOMEM):
        # treated as a full disk (the save is retried, writes refused meanwhile) but 503.
        self.resources_exhausted = False
        hard_state = replica.storage.initial_state()[0]
        self.durable_term_vote = (hard_state.term, hard_state.vote)
        # Keepalives during one stalled save stop after an election timeout (keepalive.py).
        self.keepalives = KeepalivePolicy.for_timeouts(heartbeat_interval_s, election_timeout_s)
        self._keepalives_stopped_for = -1.0  # when the stall last logged began

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def persist(self, ready: Ready) -> None:
        """Save `ready` (its entries, snapshot and hard state), retrying while the disk is
        full or out of resources. A small save on a fast disk runs inline: the thread hop
        would cost more than the fsync it hides. On a slow disk (recent saves slow) every
        save goes to the storage thread so the loop keeps serving."""
        inline = (
            ready.snapshot is None
            and len(ready.entries) <= self._inline_entries_max
            and self._save_seconds_average < _INLINE_SAVE_S
        )
        # One stall for the keepalive bound, however many times a full disk makes us retry.
        stalled_since = self._loop.time()
        while True:
            started = time.perf_counter()
            try:
                if inline:
                    self._replica.persist(ready)
                else:
                    save = functools.partial(self._replica.persist, ready)
                    await self.run(save, stalled_since=stalled_since)
            except ResourceExhaustedError as exc:
                if not (self.disk_full or self.resources_exhausted):
                    logger.error(
                        "event=%s error=%r: refusing writes until a save succeeds", exc.code, exc
                    )
                full = isinstance(exc, DiskFullError)
                self.disk_full, self.resources_exhausted = full, not full
                await asyncio.sleep(_DISK_FULL_RETRY_S)
                continue
            self._saved(ready, time.perf_counter() - started, inline)
            return

    def _saved(self, ready: Ready, elapsed: float, inline: bool) -> None:
        self._metrics.fsync_seconds.observe(elapsed)
        self._save_seconds_average += (elapsed - self._save_seconds_average) * 0.1
        if elapsed > _SLOW_SAVE_S:
            logger.warning(
                "event=slow_save seconds=%.3f entries=%s inline=%s",
                elapsed,
                len(ready.entries),
                inline,
            )
        if ready.entries:
            self._metrics.ready_entries.observe(len(ready.entries))
        if self.disk_full or self.resources_exhausted:
            logger.warning("event=disk_recovered writes=accepted")
            self.disk_full = self.resources_exhausted = False

    async def run(self, function: Callable[[], T], *, stalled_since: float | None = None) -> T:
        """Run `function()` on the storage thread; a leader sends keepalives while it waits,
        for as long as the keepalive policy allows since `stalled_since` (default: now).
        Past that bound the followers are let go: a leader whose disk hangs is replaced
        instead of holding the cluster in lease for as long as it hangs (keepalive.py)."""
        loop = self._loop
        started = loop.time() if stalled_since is None else stalled_since
        work = loop.run_in_executor(self._executor, function)
        while not work.done():
            await asyncio.wait((work,), timeout=self.keepalives.interval)
            if work.done():
                break
            stalled_s = loop.time() - started
            if self.keepalives.allows(stalled_s):
                self._send_keepalives()
            elif self._is_leader() and self._keepalives_stopped_for != started:
                self._keepalives_stopped_for = started  # logged once per stalled save
                logger.warning(
                    "event=keepalives_stopped seconds=%.3f: the save has stalled for an "
                    "election timeout; the followers may elect another leader",
                    stalled_s,
                )
        return work.result()

    def set_peer_ids(self, peer_ids: list[int]) -> None:
        """The peers keepalives go to, after a membership change."""
        self._peer_ids = list(peer_ids)

    def _send_keepalives(self) -> None:
        """A leader whose save is slow (a busy disk can take hundreds of milliseconds) still
        tells its followers it is alive, so a slow disk does not start elections. The
        heartbeat carries commit 0, which moves nothing; it is sent only in a term that is
        already durable, and the core's state cannot change while the driver waits. Only
        for as long as `run`'s keepalive policy allows (one election timeout)."""
        if not self._is_leader():
            return
        term = self._replica.node.status().term
        if self.durable_term_vote[0] != term:
            return
        for peer in self._peer_ids:
            self._send(Message(type=MessageType.HEARTBEAT, to=peer, from_=self._node_id, term=term))
        self._metrics.keepalives.inc()
