"""The driver: the one asyncio task that owns the Replica (Raft core + storage + state machine).

Everything that touches Raft state happens on this task, in this order, turn after turn:

1. take up to `inbox_batch_max` items from the inbox (peer messages, proposals, reads,
   control requests) and step them into the core; all reads of one turn share one ReadIndex;
2. tick the core when the tick timer has fired;
3. while the core has a Ready: persist it (inline while saves are fast, otherwise on a
   single-thread executor so heartbeats and HTTP stay on time while the disk syncs), send
   its messages, apply its committed entries, serve its read states, then advance;
4. tend the snapshot: when one is due, freeze the state machine and encode it on a thread of
   its own while turns go on; once encoded, store it and compact the log on the storage
   thread between two saves (`_tend_snapshot`).

HTTP handlers never touch the core: they call `write()` / `read_barrier()`, which enqueue an
item and await a future with a deadline. Proposal futures are resolved by request id from the
applied results, so a write is answered exactly when its entry is applied here.

Rules that hold here:
- Persist before send (Raft §5): a Ready's messages leave only after its save returned,
  with one exception: a leader whose term and vote are already durable sends its appends and
  heartbeats while it saves the same entries (dissertation §10.2.1); it counts its own
  entries toward commit only on a later turn, after the save returned (`_early_messages`).
- A Ready that changes only the commit index is not fsynced on its own: the commit index is
  written with the next entries (a restarted node relearns it from the leader);
  `Replica.complete_snapshot` makes it durable up to a snapshot's index before storing it.
- A `DiskFullError` from save refuses new writes (507) and retries the same save until it
  succeeds, and so does any other `ResourceExhaustedError` (EMFILE, ENFILE, ENOMEM: 503);
  a `FatalDiskError` ends the process (a retried fsync may silently lose data).
- While a save is slow a leader sends keepalives, but for at most one election timeout of
  the same save (kvstore.keepalive): a leader whose disk hangs, or stays full, is replaced
  instead of holding its followers in lease for as long as it lasts.
- Ticks never catch up in a burst after a stall: a late timer fires one tick, so CPU pressure
  delays elections rather than starting them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.errors import (
    DiskFullError,
    KVStoreError,
    NoLeaderError,
    NotLeaderError,
    OverloadedError,
    ProposalDroppedError,
    ResourceExhaustedError,
    UnavailableError,
)
from kvstore.keepalive import KeepalivePolicy
from kvstore.kv.commands import Command, RequestId, WriteResult, encode_command
from kvstore.raft.node import Status
from kvstore.raft.types import NONE, Message, MessageType, Ready, Role
from kvstore.server.config import ServeConfig
from kvstore.server.metrics import NodeMetrics

if TYPE_CHECKING:
    from kvstore.replica import Applied, EncodedSnapshot, Replica, SnapshotJob

logger = logging.getLogger("kvstore.server")

_DISK_FULL_RETRY_S = 0.1
# What a refused request is told to wait before retrying (no leader, overloaded, leadership
# lost): about one election round trip; the client's back-off takes over from there.
_RETRY_AFTER_S = 0.05
_DEADLINE_SWEEP_S = 0.01
# A save or a tick this late is logged: it is how elections under load are explained.
_SLOW_S = 0.1
# Saves are run inline only while they take less than this on average.
_INLINE_SAVE_S = 0.0005
# Leader messages that may be sent before the leader's own save of the same Ready.
_EARLY_TYPES = frozenset({MessageType.APPEND, MessageType.HEARTBEAT})


# --- what the inbox holds: one type per kind of item, dispatched with `match` -------------


@dataclass(slots=True)
class _Proposal:
    """A write to propose; `key` is str(RequestId): how the applied result finds its
    futures."""

    key: str
    data: bytes
    future: asyncio.Future[WriteResult]


@dataclass(slots=True)
class _Read:
    """A linearizable read waiting for its ReadIndex (all reads of a turn share one)."""

    future: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class _PeerDown:
    """The transport lost its connection to `peer`."""

    peer: int


@dataclass(frozen=True, slots=True)
class _SnapshotStatus:
    """The transport finished (ok) or failed sending a snapshot to `peer`."""

    peer: int
    ok: bool


@dataclass(frozen=True, slots=True)
class _Call:
    """A function to run on the driver task between two steps (`Driver.call`)."""

    function: Callable[[], None]


_InboxItem = Message | _Proposal | _Read | _PeerDown | _SnapshotStatus | _Call


@dataclass(slots=True)
class _PendingRead:
    index: int
    futures: list[asyncio.Future[None]] = field(default_factory=list)


class Driver:
    """Owns the Replica; see the module docstring."""

    def __init__(
        self,
        config: ServeConfig,
        replica: Replica,
        metrics: NodeMetrics,
        send: Callable[[Message], None],
        peer_url: Callable[[int], str | None],
    ) -> None:
        self.config = config
        # Snapshots are taken by `_tend_snapshot`, never inside `advance` on the loop.
        assert replica.defer_snapshots, "the driver needs a Replica with defer_snapshots"
        self.replica = replica
        self.node = replica.node
        self.metrics = metrics
        self._send = send
        self._peer_url = peer_url
        self._inbox: collections.deque[_InboxItem] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._request_timeout_s = config.request_timeout_ms / 1000
        # (deadline, future) of every waiting request, in deadline order.
        self._deadlines: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._tick_due = False
        self._tick_interval_s = config.tick_interval_ms / 1000
        self._heartbeat_interval_s = config.heartbeat_ticks * self._tick_interval_s
        self._peer_ids = [peer for peer in config.peer_addresses if peer != config.id]
        self._next_tick_at = 0.0
        self._inline_entries_max = config.inline_save_entries_max
        # Moving average of save durations: decides inline versus worker thread.
        self._save_seconds_average = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-fsync")
        # Snapshot encoding: its own thread, so saves never queue behind it.
        self._snapshot_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kvstore-snapshot"
        )
        # The snapshot being encoded: its job, the encoding's future, when it began.
        self._snapshot: tuple[SnapshotJob, asyncio.Future[EncodedSnapshot], float] | None = None
        self._proposals: dict[str, list[asyncio.Future[WriteResult]]] = {}
        self._pending_count = 0
        metrics.pending_proposals.set_function(lambda: self._pending_count)
        self._read_contexts: dict[bytes, list[asyncio.Future[None]]] = {}
        self._waiting_reads: list[_PendingRead] = []
        self._stopping = False
        self.disk_full = False
        # A save failed for want of file descriptors or memory (EMFILE, ENFILE, ENOMEM):
        # treated as a full disk (the save is retried, writes refused meanwhile) but 503.
        self.resources_exhausted = False
        # Set during a graceful shutdown's leadership transfer: writes in flight then stay
        # pending, since the new leader commits them and this node still applies them.
        self.handing_over = False
        # Requests held during a handover until the new leader is known (wait_out_handover).
        self._leader_waiters: list[asyncio.Future[None]] = []
        self._election_timeout_s = config.election_ticks * self._tick_interval_s
        # Keepalives during one stalled save stop after an election timeout (keepalive.py).
        self._keepalives = KeepalivePolicy.for_timeouts(
            self._heartbeat_interval_s, self._election_timeout_s
        )
        self._keepalives_stopped_for = -1.0  # when the stall last logged began
        status = self.node.status()
        self.leader_id: int = status.leader_id
        self.role: Role = status.role
        self.term: int = status.term
        # (term, vote) as last made durable: a leader's early appends need them unchanged.
        hard_state = replica.storage.initial_state()[0]
        self._durable_term_vote = (hard_state.term, hard_state.vote)
        # Server-generated request ids for clients that send none (curl).
        self._client_id = f"srv{config.id}-{secrets.token_hex(6)}"
        self._seq = itertools.count(1)
        self._outstanding_seqs: set[int] = set()
        # Told, on the driver task, of every batch of applied entries (watches, leases) and
        # of every change of role (the lease keeper); they must not block.
        self.apply_listeners: list[Callable[[Sequence[Applied]], None]] = []
        self.role_listeners: list[Callable[[Role], None]] = []

    # --- inbox (called from other tasks: HTTP handlers, the transport) ---------------------

    def _put(self, item: _InboxItem) -> None:
        self._inbox.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message(self, message: Message) -> None:
        self._put(message)

    def on_peer_down(self, peer: int) -> None:
        self._put(_PeerDown(peer))

    def on_snapshot_status(self, peer: int, ok: bool) -> None:
        self._put(_SnapshotStatus(peer, ok))

    def leader_url(self) -> str | None:
        if self.leader_id == NONE:
            return None
        if self.leader_id == self.config.id:
            return self.config.client_url
        return self._peer_url(self.leader_id)

    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def new_request_id(self) -> tuple[RequestId, int]:
        """A server-made request id and the acked_below that goes with it."""
        seq = next(self._seq)
        self._outstanding_seqs.add(seq)
        return RequestId(client_id=self._client_id, seq=seq), min(self._outstanding_seqs)

    def release_request_id(self, request: RequestId) -> None:
        if request.client_id == self._client_id:
            self._outstanding_seqs.discard(request.seq)

    def check_writable(self) -> None:
        """Raise the error a write would get right now, before any work is done for it."""
        if self.role is not Role.LEADER:
            # A follower's own full disk is no reason to refuse: the leader may have space.
            raise self._not_leader_error()
        if self.disk_full:
            raise DiskFullError("the disk is full: writes are refused until space is free")
        if self.resources_exhausted:
            raise ResourceExhaustedError(
                "the node is out of file descriptors or memory for its disk: writes are "
                "refused until a save succeeds"
            )
        if self._pending_count >= self.config.max_pending_proposals:
            raise OverloadedError(
                f"{self._pending_count} writes pending", retry_after_s=_RETRY_AFTER_S
            )

    async def wait_out_handover(self) -> None:
        """While this node hands leadership over (a graceful shutdown), no write can be
        proposed here and the new leader is about one round trip away: hold the request until
        a leader other than this node is known (at most one election timeout), so the answer
        names it (not_leader with its URL, which the client follows at once) instead of
        no_leader, which sends the client into back-off. Returns at once without a handover."""
        if not self.handing_over:
            return
        deadline = self._loop.time() + self._election_timeout_s
        while self.handing_over and self.leader_id in (NONE, self.config.id):
            left = deadline - self._loop.time()
            if left <= 0:
                return
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._leader_waiters.append(waiter)
            try:
                await asyncio.wait((waiter,), timeout=left)
            finally:
                if waiter in self._leader_waiters:
                    self._leader_waiters.remove(waiter)

    async def hand_over(self, target: int, timeout_s: float) -> bool:
        """Transfer leadership to `target` (a graceful shutdown, dissertation §3.10) and wait
        up to `timeout_s` for another leader to be known; True if one is. Meanwhile
        `handing_over` holds writes as pending (the new leader commits them and this node
        still applies them). If the transfer fails or times out, `handing_over` is reset, so
        the node again answers as any leader: a later loss of leadership fails its pending
        writes at once and requests are no longer held (it stayed set for good before)."""
        self.handing_over = True
        succeeded = False
        try:
            await self.call(lambda: self.node.transfer_leadership(target))
            deadline = self._loop.time() + timeout_s
            while self._loop.time() < deadline:
                if self.role is not Role.LEADER and self.leader_id not in (NONE, self.config.id):
                    succeeded = True
                    return True
                await asyncio.sleep(0.002)
            return False
        finally:
            if not succeeded:
                self.handing_over = False

    def _not_leader_error(self) -> KVStoreError:
        url = self.leader_url()
        if url is None or self.leader_id == self.config.id:
            return NoLeaderError("no leader is known right now", retry_after_s=_RETRY_AFTER_S)
        return NotLeaderError(
            f"node {self.config.id} is not the leader", leader_id=self.leader_id, leader_url=url
        )

    async def write(self, command: Command, request: RequestId) -> WriteResult:
        """Propose a command and wait for its applied result (a WriteResult); TimeoutError
        when the request deadline passes first (the outcome is then unknown)."""
        self.check_writable()
        duplicate = self.replica.state_machine.duplicate_result(request)
        if duplicate is not None:
            return duplicate
        key = str(request)
        future: asyncio.Future[WriteResult] = self._loop.create_future()
        self._proposals.setdefault(key, []).append(future)
        self._pending_count += 1
        self._deadlines.append((self._loop.time() + self._request_timeout_s, future))
        try:
            self._put(_Proposal(key, encode_command(command), future))
            return await future
        finally:
            self._pending_count -= 1
            futures = self._proposals.get(key)
            if futures is not None:
                if future in futures:
                    futures.remove(future)
                if not futures:
                    del self._proposals[key]

    async def read_barrier(self) -> None:
        """Wait until a linearizable read may be served from the local state machine."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._deadlines.append((self._loop.time() + self._request_timeout_s, future))
        self._put(_Read(future))
        await future

    def _expire_deadlines(self) -> None:
        """Fail requests whose deadline passed. One deadline for all requests, so the deque
        is in deadline order and only its head needs looking at (cheaper than a timer each).
        Runs on its own timer, so deadlines hold even while the driver waits for a save."""
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, future = deadlines.popleft()
            if not future.done():
                future.set_exception(TimeoutError())
        if not self._stopping:
            self._deadline_timer = self._loop.call_later(_DEADLINE_SWEEP_S, self._expire_deadlines)

    # --- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_tick_at = loop.time() + self._tick_interval_s
        timer = loop.call_at(self._next_tick_at, self._on_tick_timer)
        self._deadline_timer = loop.call_later(_DEADLINE_SWEEP_S, self._expire_deadlines)
        try:
            while not self._stopping:
                if not self._inbox and not self._tick_due:
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                if self._tick_due:
                    self._tick_due = False
                    now = loop.time()
                    lag = now - self._next_tick_at
                    self.metrics.loop_lag_seconds.observe(max(0.0, lag))
                    if lag > _SLOW_S:
                        logger.warning("event=late_tick seconds=%.3f", lag)
                    self._next_tick_at = now + self._tick_interval_s
                    timer = loop.call_at(self._next_tick_at, self._on_tick_timer)
                    self.node.tick()
                    if lag > self._heartbeat_interval_s:
                        # After a stall, heartbeats first, before a backlog of requests.
                        await self._process_ready()
                self._drain_inbox()
                await self._process_ready()
                await self._tend_snapshot()
        finally:
            timer.cancel()
            self._deadline_timer.cancel()

    def _on_tick_timer(self) -> None:
        self._tick_due = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stop(self) -> None:
        self._stopping = True
        self._on_tick_timer()

    def close(self) -> None:
        self._snapshot_executor.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=True)

    async def _tend_snapshot(self) -> None:
        """Snapshots without stopping the driver. When one is due, the state machine is
        frozen here (copies of references: about 0.1 s for a million keys) and encoded, its
        file written and fsynced, on a thread of its own while the driver goes on committing
        and applying; then the file is renamed into place, named in the log and the log
        compacted on the storage thread, between two saves, the driver waiting only for that.
        Taken in line with `advance`, encoding a million-key store stopped writes for 3-8 s
        on all three nodes at once; with the file written on the storage thread, followers'
        drivers waited a second for a 100 MB snapshot, answered nothing, and the leader, still
        encoding, lost its quorum."""
        if self._snapshot is None:
            if self.replica.compaction_due():
                # A full disk skipped the compaction after the last snapshot: try it again.
                await self._in_worker(self.replica.retry_compaction)
                return
            started = time.perf_counter()
            job = self.replica.begin_snapshot()
            if job is not None:
                encoding = self._loop.run_in_executor(
                    self._snapshot_executor, self.replica.encode_snapshot, job
                )
                self._snapshot = (job, encoding, started)
                frozen_s = time.perf_counter() - started
                if frozen_s > _SLOW_S:
                    logger.warning("event=slow_snapshot_freeze seconds=%.3f", frozen_s)
            return
        job, encoding, began = self._snapshot
        if not encoding.done():
            return
        self._snapshot = None
        try:
            encoded = encoding.result()
        except ResourceExhaustedError as exc:
            self.replica.abandon_snapshot(exc)
            return
        encoded_s = time.perf_counter() - began
        started = time.perf_counter()
        complete = functools.partial(self.replica.complete_snapshot, job, encoded)
        taken = await self._in_worker(complete)
        if taken:
            self.metrics.snapshots.inc()
            logger.info(
                "event=snapshot_taken index=%s bytes=%d encode_seconds=%.3f store_seconds=%.3f",
                taken,
                len(encoded.data),
                encoded_s,
                time.perf_counter() - started,
            )

    def _drain_inbox(self) -> None:
        node = self.node
        reads: list[asyncio.Future[None]] = []
        inbox = self._inbox
        count = min(len(inbox), self.config.inbox_batch_max)
        if count:
            self.metrics.inbox_items.observe(count)
        for _ in range(count):
            match inbox.popleft():
                case Message() as message:
                    try:
                        node.step(message)
                    except KVStoreError as exc:
                        logger.debug("event=step_rejected from=%s error=%r", message.from_, exc)
                case _Proposal() as proposal:
                    self._propose(proposal)
                case _Read(future=future):
                    if not future.done():
                        reads.append(future)
                case _PeerDown(peer=peer):
                    node.report_peer_down(peer)
                case _SnapshotStatus(peer=peer, ok=ok):
                    node.report_snapshot(peer, ok)
                case _Call(function=function):
                    function()
        if reads:
            self._start_read_index(reads)

    def _propose(self, proposal: _Proposal) -> None:
        if proposal.future.done():
            return
        try:
            self.node.propose(proposal.data)
        except ProposalDroppedError:
            self.metrics.proposals_failed.labels(reason="dropped").inc()
            status = self.node.status()
            if status.role is Role.LEADER and status.lead_transferee:
                # A leadership transfer is under way: the new leader is milliseconds away.
                error: KVStoreError = UnavailableError(
                    "leadership is being transferred; retry", retry_after_s=0.01
                )
            elif status.role is Role.LEADER:
                error = OverloadedError(
                    "the leader refused the proposal", retry_after_s=_RETRY_AFTER_S
                )
            else:
                error = self._not_leader_error()
            proposal.future.set_exception(error)
            return
        self.metrics.proposals.inc()

    def _start_read_index(self, futures: list[asyncio.Future[None]]) -> None:
        try:
            context: bytes = self.node.read_index()
        except ProposalDroppedError:
            error = NoLeaderError("no leader is known right now", retry_after_s=_RETRY_AFTER_S)
            for future in futures:
                future.set_exception(error)
            return
        self.metrics.read_index_calls.inc()
        self._read_contexts[context] = futures

    # --- Ready processing --------------------------------------------------------------

    async def _process_ready(self) -> None:
        replica = self.replica
        send = self._send
        while (ready := replica.prepare()) is not None:
            if ready.soft_state is not None:
                self._on_soft_state(ready.soft_state.leader_id, ready.soft_state.role)
            early = self._early_messages(ready)
            for message in early:
                send(message)
            # must_sync: entries, a snapshot or a new term/vote (a commit-only Ready is not
            # saved; see below).
            if ready.must_sync:
                # A small save on a fast disk runs inline: the thread hop would cost more than
                # the fsync it hides. On a slow disk (recent saves slow) every save goes to the
                # worker thread so the loop keeps serving.
                inline = (
                    ready.snapshot is None
                    and len(ready.entries) <= self._inline_entries_max
                    and self._save_seconds_average < _INLINE_SAVE_S
                )
                await self._persist(ready, inline=inline)
            if ready.hard_state is not None:
                self._durable_term_vote = (ready.hard_state.term, ready.hard_state.vote)
            for message in ready.messages:
                if message.type not in _EARLY_TYPES or not early:
                    send(message)
            if ready.committed_entries or ready.snapshot is not None:
                self._apply(ready)
            if ready.read_states:
                self._on_read_states(ready)
            # A Ready that changes only the commit index is not saved: the commit index need
            # not be durable for safety (a node relearns it from the leader), so it is written
            # with the next entries rather than with an fsync of its own on every write's
            # critical path; `Replica.complete_snapshot` makes it durable up to a snapshot.
            self._advance(ready)

    def _early_messages(self, ready: Ready) -> list[Message]:
        """A leader's appends may leave before its own save of the same entries (Raft
        dissertation §10.2.1: the leader writes to its disk in parallel with replicating).
        Safe here because acknowledgements are stepped only on the driver's next turn, after
        this save returned, so the leader never counts its own entries before they are durable.
        Never when the Ready changes term or vote: those must be durable before anything that
        depends on them leaves (Raft §5)."""
        if self.role is not Role.LEADER or not ready.messages:
            return []
        hard_state = ready.hard_state
        if hard_state is not None and (hard_state.term, hard_state.vote) != self._durable_term_vote:
            return []
        return [m for m in ready.messages if m.type in _EARLY_TYPES]

    def _advance(self, ready: Ready) -> None:
        self.replica.advance(ready)
        if ready.hard_state is not None:
            self.term = ready.hard_state.term
            self.metrics.term.set(self.term)

    async def _persist(self, ready: Ready, *, inline: bool) -> None:
        # One stall for the keepalive bound, however many times a full disk makes us retry.
        stalled_since = self._loop.time()
        while True:
            started = time.perf_counter()
            try:
                if inline:
                    self.replica.persist(ready)
                else:
                    save = functools.partial(self.replica.persist, ready)
                    await self._in_worker(save, stalled_since=stalled_since)
            except ResourceExhaustedError as exc:
                if not (self.disk_full or self.resources_exhausted):
                    logger.error(
                        "event=%s error=%r: refusing writes until a save succeeds", exc.code, exc
                    )
                full = isinstance(exc, DiskFullError)
                self.disk_full, self.resources_exhausted = full, not full
                await asyncio.sleep(_DISK_FULL_RETRY_S)
                continue
            elapsed = time.perf_counter() - started
            self.metrics.fsync_seconds.observe(elapsed)
            self._save_seconds_average += (elapsed - self._save_seconds_average) * 0.1
            if elapsed > _SLOW_S:
                logger.warning(
                    "event=slow_save seconds=%.3f entries=%s inline=%s",
                    elapsed,
                    len(ready.entries),
                    inline,
                )
            if ready.entries:
                self.metrics.ready_entries.observe(len(ready.entries))
            if self.disk_full or self.resources_exhausted:
                logger.warning("event=disk_recovered writes=accepted")
                self.disk_full = self.resources_exhausted = False
            return

    async def _in_worker(
        self, function: Callable[[], Any], *, stalled_since: float | None = None
    ) -> Any:
        """Run `function()` on the storage thread; a leader sends keepalives while it waits,
        for as long as the keepalive policy allows since `stalled_since` (default: now).
        Past that bound the followers are let go: a leader whose disk hangs is replaced
        instead of holding the cluster in lease for as long as it hangs (keepalive.py)."""
        loop = self._loop
        started = loop.time() if stalled_since is None else stalled_since
        work = loop.run_in_executor(self._executor, function)
        while not work.done():
            await asyncio.wait((work,), timeout=self._keepalives.interval)
            if work.done():
                break
            stalled_s = loop.time() - started
            if self._keepalives.allows(stalled_s):
                self._send_keepalives()
            elif self.role is Role.LEADER and self._keepalives_stopped_for != started:
                self._keepalives_stopped_for = started  # logged once per stalled save
                logger.warning(
                    "event=keepalives_stopped seconds=%.3f: the save has stalled for an "
                    "election timeout; the followers may elect another leader",
                    stalled_s,
                )
        return work.result()

    def _send_keepalives(self) -> None:
        """A leader whose save is slow (a busy disk can take hundreds of milliseconds) still
        tells its followers it is alive, so a slow disk does not start elections. The
        heartbeat carries commit 0, which moves nothing; it is sent only in a term that is
        already durable, and the core's state cannot change while the driver waits. Only
        for as long as `_in_worker`'s keepalive policy allows (one election timeout)."""
        if self.role is not Role.LEADER:
            return
        term = self.node.status().term
        if self._durable_term_vote[0] != term:
            return
        for peer in self._peer_ids:
            self._send(
                Message(type=MessageType.HEARTBEAT, to=peer, from_=self.config.id, term=term)
            )
        self.metrics.keepalives.inc()

    def _apply(self, ready: Ready) -> None:
        applied = self.replica.apply(ready)
        if ready.snapshot is not None and not ready.snapshot.is_empty():
            logger.info(
                "event=snapshot_restored index=%s term=%s bytes=%s",
                ready.snapshot.metadata.index,
                ready.snapshot.metadata.term,
                len(ready.snapshot.data),
            )
        self.metrics.commits.inc(len(ready.committed_entries))
        self.metrics.applies.inc(len(applied))
        proposals = self._proposals
        if proposals:
            for item in applied:
                command = item.command
                if command is None or command.request is None or item.result is None:
                    continue
                request = command.request
                futures = proposals.get(str(request))
                if futures:
                    for future in futures:
                        if not future.done():
                            future.set_result(item.result)
        if self._waiting_reads:
            self._serve_waiting_reads()
        for listener in self.apply_listeners:
            listener(applied)

    def _on_read_states(self, ready: Ready) -> None:
        applied = self.replica.state_machine.applied_index
        for read_state in ready.read_states:
            futures = self._read_contexts.pop(read_state.context, None)
            if not futures:
                continue
            if read_state.index <= applied:
                _resolve_all(futures)
            else:
                self._waiting_reads.append(_PendingRead(read_state.index, futures))

    def _serve_waiting_reads(self) -> None:
        applied = self.replica.state_machine.applied_index
        still: list[_PendingRead] = []
        for pending in self._waiting_reads:
            if pending.index <= applied:
                _resolve_all(pending.futures)
            else:
                still.append(pending)
        self._waiting_reads = still

    def _on_soft_state(self, leader_id: int, role: Role) -> None:
        if leader_id != self.leader_id:
            self.metrics.leader_changes.inc()
            logger.info(
                "event=leader_changed node=%s leader=%s role=%s",
                self.config.id,
                leader_id,
                role.value,
            )
        if role is Role.PRE_CANDIDATE and self.role is not Role.PRE_CANDIDATE:
            self.metrics.elections.inc()
        was_leader = self.role is Role.LEADER
        leader_changed = leader_id != self.leader_id
        role_changed = role is not self.role
        self.leader_id, self.role = leader_id, role
        if role_changed:
            for listener in self.role_listeners:
                listener(role)
        self.metrics.is_leader.set(1 if role is Role.LEADER else 0)
        if was_leader and role is not Role.LEADER and not self.handing_over:
            self._fail_pending("leadership was lost before the write was applied; outcome unknown")
        if leader_changed or leader_id == NONE or was_leader != (role is Role.LEADER):
            # A ReadIndex request is answered by the leader it went to or by no one: when
            # the leader changes, even straight from one to another, waiting for the answer
            # only runs into the deadline (504), so the read is failed now, retryably.
            self._fail_reads("the leader changed while the read waited; retry")
        if self._leader_waiters and leader_id not in (NONE, self.config.id):
            waiters, self._leader_waiters = self._leader_waiters, []
            _resolve_all(waiters)

    def _fail_pending(self, message: str) -> None:
        error = UnavailableError(message, retry_after_s=_RETRY_AFTER_S)
        for futures in self._proposals.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    def _fail_reads(self, message: str) -> None:
        error = UnavailableError(message, retry_after_s=_RETRY_AFTER_S)
        for futures in self._read_contexts.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        self._read_contexts.clear()

    # --- control (run on the driver task) ----------------------------------------------

    async def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the driver task between turns and return its result."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                future.set_result(function())
            except Exception as exc:
                future.set_exception(exc)

        self._put(_Call(run))
        return await future

    def pending_writes(self) -> int:
        return self._pending_count

    def status(self) -> Status:
        return self.node.status()

    def applied_index(self) -> int:
        return int(self.replica.state_machine.applied_index)


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
