"""The driver: the one asyncio task that owns the Replica (Raft core + storage + state machine),
and its Ready loop.

Everything that touches Raft state happens on this task, in this order, turn after turn:

1. take up to `inbox_batch_max` items from the inbox (peer messages, proposals, reads,
   control requests) and step them into the core; all reads of one turn share one ReadIndex,
   and all puts and deletes of one turn share one entry (a batch, kvstore/kv/commands.py,
   within `BATCH_COMMANDS_MAX` commands and `_BATCH_BYTES_MAX` bytes);
2. tick the core when the tick timer has fired;
3. while the core has a Ready: persist it (storage_thread.py: inline while saves are fast,
   otherwise on the storage thread so heartbeats and HTTP stay on time while the disk
   syncs), send its messages, apply its committed entries, serve its read states, then
   advance;
4. tend the snapshot (snapshots.py: encoded on a thread of its own while turns go on,
   stored between two saves).

HTTP handlers never touch the core: they call `write()` / `read_barrier()`, which enqueue an
item and await a future with a deadline (pending.py). Proposal futures are resolved by
request id from the applied results, so a write is answered exactly when its entry is
applied here. A graceful shutdown's leadership transfer is handover.py.

Rules that hold here:
- Persist before send (Raft §5): a Ready's messages leave only after its save returned,
  with one exception: a leader whose term and vote are already durable sends its appends and
  heartbeats while it saves the same entries (dissertation §10.2.1); it counts its own
  entries toward commit only on a later turn, after the save returned (`_early_messages`).
- A Ready that changes only the commit index is not saved: the commit index need not be
  durable for safety (a restarted node relearns it from the leader), so it is written with
  the next entries rather than with an fsync of its own on every write's critical path;
  `Replica.complete_snapshot` makes it durable up to a snapshot's index before storing it.
- Ticks never catch up in a burst after a stall: a late timer fires one tick, so CPU pressure
  delays elections rather than starting them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from kvstore.kv.commands import (
    BATCH_COMMANDS_MAX,
    Command,
    Delete,
    Put,
    RequestId,
    WriteResult,
    encode_batch,
    encode_command,
)
from kvstore.raft.node import Status
from kvstore.raft.types import NONE, Message, MessageType, Ready, Role
from kvstore.server.config import ServeConfig
from kvstore.server.handover import Handover
from kvstore.server.metrics import NodeMetrics
from kvstore.server.pending import PendingRequests, ServerRequestIds
from kvstore.server.snapshots import SnapshotTender
from kvstore.server.storage_thread import StorageThread

if TYPE_CHECKING:
    from kvstore.replica import Applied, Replica

logger = logging.getLogger("kvstore.server")

# What a refused request is told to wait before retrying (no leader, overloaded, leadership
# lost): about one election round trip; the client's back-off takes over from there.
_RETRY_AFTER_S = 0.05
_DEADLINE_SWEEP_S = 0.01
# A tick this late is logged: it is how elections under load are explained.
_SLOW_TICK_S = 0.1
# A batch entry's commands stop growing at this many bytes (a larger write goes alone): far
# below every bound on a replication message, and enough for hundreds of small writes.
_BATCH_BYTES_MAX = 64 * 1024
# Leader messages that may be sent before the leader's own save of the same Ready.
_EARLY_TYPES = frozenset({MessageType.APPEND, MessageType.HEARTBEAT})


# --- what the inbox holds: one type per kind of item, dispatched with `match` -------------


@dataclass(slots=True)
class _Proposal:
    """A write to propose; `key` is str(RequestId): how the applied result finds its
    futures. `batchable`: a put or a delete, which may share an entry with others."""

    key: str
    data: bytes
    future: asyncio.Future[WriteResult]
    batchable: bool


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


class Driver:
    """Owns the Replica; see the module docstring. Its parts: `pending` (requests waiting
    on it), `storage` (where saves run, the disk's health, keepalives), `snapshots` and
    `handover`."""

    def __init__(
        self,
        config: ServeConfig,
        replica: Replica,
        metrics: NodeMetrics,
        send: Callable[[Message], None],
        peer_url: Callable[[int], str | None],
        flush: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        # Snapshots are taken by `snapshots.tend`, never inside `advance` on the loop.
        assert replica.defer_snapshots, "the driver needs a Replica with defer_snapshots"
        self.replica = replica
        self.node = replica.node
        self.metrics = metrics
        self._send = send
        # Writes queued messages to the sockets now (the transport's `flush`): see
        # `_process_ready`.
        self._flush = flush
        self._peer_url = peer_url
        self._inbox: collections.deque[_InboxItem] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._tick_due = False
        self._tick_interval_s = config.tick_interval_ms / 1000
        self._heartbeat_interval_s = config.heartbeat_ticks * self._tick_interval_s
        self._next_tick_at = 0.0
        self._stopping = False
        status = self.node.status()
        self.leader_id: int = status.leader_id
        self.role: Role = status.role
        self.term: int = status.term
        election_timeout_s = config.election_ticks * self._tick_interval_s
        self.pending = PendingRequests(self._loop, config.request_timeout_ms / 1000)
        metrics.pending_proposals.set_function(lambda: self.pending.count)
        self.storage = StorageThread(
            replica,
            metrics,
            node_id=config.id,
            peer_ids=[peer for peer in config.peer_addresses if peer != config.id],
            send=send,
            is_leader=self.is_leader,
            inline_entries_max=config.inline_save_entries_max,
            heartbeat_interval_s=self._heartbeat_interval_s,
            election_timeout_s=election_timeout_s,
        )
        self.snapshots = SnapshotTender(replica, self.storage, metrics)
        self.handover = Handover(
            self._loop, config.id, election_timeout_s, lambda: (self.role, self.leader_id)
        )
        self._request_ids = ServerRequestIds(config.id)
        # Told, on the driver task, of every batch of applied entries (watches, leases) and
        # of every change of role (the lease keeper); they must not block.
        self.apply_listeners: list[Callable[[Sequence[Applied]], None]] = []
        self.role_listeners: list[Callable[[Role], None]] = []

    # --- the parts' state, under the names the HTTP layer and the node read -----------------

    @property
    def disk_full(self) -> bool:
        """The last save failed for want of disk space: writes are refused (507)."""
        return self.storage.disk_full

    @disk_full.setter
    def disk_full(self, value: bool) -> None:
        self.storage.disk_full = value

    @property
    def resources_exhausted(self) -> bool:
        """The last save failed for want of file descriptors or memory (503)."""
        return self.storage.resources_exhausted

    @resources_exhausted.setter
    def resources_exhausted(self, value: bool) -> None:
        self.storage.resources_exhausted = value

    @property
    def handing_over(self) -> bool:
        """A graceful shutdown's leadership transfer is under way (handover.py)."""
        return self.handover.active

    @handing_over.setter
    def handing_over(self, value: bool) -> None:
        self.handover.active = value

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
        return self._request_ids.new()

    def release_request_id(self, request: RequestId) -> None:
        self._request_ids.release(request)

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
        if self.pending.count >= self.config.max_pending_proposals:
            raise OverloadedError(
                f"{self.pending.count} writes pending", retry_after_s=_RETRY_AFTER_S
            )

    def leader_pending(self) -> bool:
        """No request can be served here now, but a leader is about to be known: a graceful
        shutdown's handover is under way, or this node knows no leader (an election is under
        way, e.g. the leader's process died a few milliseconds ago); `Handover`."""
        return self.handover.leader_pending()

    async def wait_for_leader(self) -> None:
        """While `leader_pending()`, hold a request until a leader is known (at most one
        election timeout), so the answer names it (`Handover.wait_for_leader`)."""
        await self.handover.wait_for_leader()

    async def hand_over(self, target: int, timeout_s: float) -> bool:
        """Transfer leadership to `target` (a graceful shutdown, dissertation §3.10) and wait
        up to `timeout_s` for another leader to be known; True if one is (`Handover.run`:
        writes in flight stay pending meanwhile; a failed transfer resets `handing_over`)."""
        transfer = self.call(lambda: self.node.transfer_leadership(target))
        return await self.handover.run(transfer, timeout_s)

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
        return await self.submit(command, request)

    def submit(self, command: Command, request: RequestId) -> asyncio.Future[WriteResult]:
        """Propose a command; the future resolves with its applied result, or fails with
        TimeoutError at the request deadline. Without a task of its own per write: the
        binary stream (kvstore/server/stream.py) answers from the future's callback."""
        self.check_writable()
        duplicate = self.replica.state_machine.duplicate_result(request)
        if duplicate is not None:
            done: asyncio.Future[WriteResult] = self._loop.create_future()
            done.set_result(duplicate)
            return done
        key = str(request)
        future = self.pending.add_write(key)
        future.add_done_callback(functools.partial(self._write_done, key))
        batchable = isinstance(command, (Put, Delete))
        self._put(_Proposal(key, encode_command(command), future, batchable))
        return future

    def _write_done(self, key: str, future: asyncio.Future[WriteResult]) -> None:
        self.pending.remove_write(key, future)

    async def read_barrier(self) -> None:
        """Wait until a linearizable read may be served from the local state machine."""
        await self.start_read()

    def start_read(self) -> asyncio.Future[None]:
        """A future that resolves once a linearizable read may be served here (its ReadIndex
        confirmed and applied), or fails (no leader, leader changed, deadline)."""
        future = self.pending.add_read()
        self._put(_Read(future))
        return future

    def _expire_deadlines(self) -> None:
        """Fail requests whose deadline passed. Runs on its own timer (one sweep for all
        requests is cheaper than a timer each), so deadlines hold even while the driver
        waits for a save."""
        self.pending.expire()
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
                    if lag > _SLOW_TICK_S:
                        logger.warning("event=late_tick seconds=%.3f", lag)
                    self._next_tick_at = now + self._tick_interval_s
                    timer = loop.call_at(self._next_tick_at, self._on_tick_timer)
                    self.node.tick()
                    if lag > self._heartbeat_interval_s:
                        # After a stall, heartbeats first, before a backlog of requests.
                        await self._process_ready()
                self._drain_inbox()
                await self._process_ready()
                await self.snapshots.tend()
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
        self.snapshots.close()
        self.storage.close()

    def _drain_inbox(self) -> None:
        node = self.node
        reads: list[asyncio.Future[None]] = []
        batch: list[_Proposal] = []
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
                    if proposal.future.done():
                        pass  # its deadline passed while it waited: nothing to propose
                    elif proposal.batchable:
                        batch.append(proposal)
                    else:
                        self._propose([proposal])
                case _Read(future=future):
                    if not future.done():
                        reads.append(future)
                case _PeerDown(peer=peer):
                    node.report_peer_down(peer)
                case _SnapshotStatus(peer=peer, ok=ok):
                    node.report_snapshot(peer, ok)
                case _Call(function=function):
                    if batch:
                        # Proposed before, as they came: a leadership transfer, say, would
                        # otherwise refuse writes that arrived before it was asked for.
                        self._propose_batches(batch)
                        batch = []
                    function()
        if batch:
            self._propose_batches(batch)
        if reads:
            self._start_read_index(reads)

    def _propose_batches(self, proposals: list[_Proposal]) -> None:
        """Propose the puts and deletes of one turn in as few entries as the bounds allow
        (`BATCH_COMMANDS_MAX` commands, `_BATCH_BYTES_MAX` bytes): under load one entry, one
        log record and one slot per replication message carry many writes."""
        batch: list[_Proposal] = []
        size = 0
        for proposal in proposals:
            if batch and (
                len(batch) == BATCH_COMMANDS_MAX
                or size + len(proposal.data) > _BATCH_BYTES_MAX
            ):
                self._propose(batch)
                batch, size = [], 0
            batch.append(proposal)
            size += len(proposal.data)
        self._propose(batch)

    def _propose(self, proposals: list[_Proposal]) -> None:
        """Propose one entry: one command alone (the bytes are its own), or a batch."""
        if len(proposals) == 1:
            data = proposals[0].data
        else:
            data = encode_batch([proposal.data for proposal in proposals])
        try:
            self.node.propose(data)
        except ProposalDroppedError:
            self.metrics.proposals_failed.labels(reason="dropped").inc(len(proposals))
            error = self._dropped_error()
            for proposal in proposals:
                if not proposal.future.done():
                    proposal.future.set_exception(error)
            return
        self.metrics.proposals.inc(len(proposals))

    def _dropped_error(self) -> KVStoreError:
        """What a write the core refused to propose is told."""
        status = self.node.status()
        if status.role is Role.LEADER and status.lead_transferee:
            # A leadership transfer is under way: the new leader is milliseconds away.
            return UnavailableError("leadership is being transferred; retry", retry_after_s=0.01)
        if status.role is Role.LEADER:
            return OverloadedError("the leader refused the proposal", retry_after_s=_RETRY_AFTER_S)
        return self._not_leader_error()

    def _start_read_index(self, futures: list[asyncio.Future[None]]) -> None:
        try:
            context: bytes = self.node.read_index()
        except ProposalDroppedError:
            error = NoLeaderError("no leader is known right now", retry_after_s=_RETRY_AFTER_S)
            for future in futures:
                future.set_exception(error)
            return
        self.metrics.read_index_calls.inc()
        self.pending.reads_started(context, futures)

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
            # must_sync: entries, a snapshot or a new term/vote; a Ready that changes only
            # the commit index is not saved (the module docstring says why).
            if ready.must_sync:
                if early and self._flush is not None:
                    # An inline save blocks the loop for its fsync: without this the appends
                    # would wait for it in the queue, and the followers' fsyncs would follow
                    # the leader's instead of running beside it.
                    self._flush()
                await self.storage.persist(ready)
            if ready.hard_state is not None:
                self.storage.durable_term_vote = (ready.hard_state.term, ready.hard_state.vote)
            for message in ready.messages:
                if message.type not in _EARLY_TYPES or not early:
                    send(message)
            if ready.committed_entries or ready.snapshot is not None:
                self._apply(ready)
            if ready.read_states:
                self._on_read_states(ready)
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
        if (
            hard_state is not None
            and (hard_state.term, hard_state.vote) != self.storage.durable_term_vote
        ):
            return []
        return [m for m in ready.messages if m.type in _EARLY_TYPES]

    def _advance(self, ready: Ready) -> None:
        self.replica.advance(ready)
        if ready.hard_state is not None:
            self.term = ready.hard_state.term
            self.metrics.term.set(self.term)

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
        self.pending.on_applied(applied, self.replica.state_machine.applied_index)
        for listener in self.apply_listeners:
            listener(applied)

    def _on_read_states(self, ready: Ready) -> None:
        self.pending.on_read_states(ready.read_states, self.replica.state_machine.applied_index)

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
        if was_leader and role is not Role.LEADER and not self.handover.active:
            self.pending.fail_writes(
                "leadership was lost before the write was applied; outcome unknown",
                _RETRY_AFTER_S,
            )
        if leader_changed or leader_id == NONE or was_leader != (role is Role.LEADER):
            # A ReadIndex request is answered by the leader it went to or by no one: when
            # the leader changes, even straight from one to another, waiting for the answer
            # only runs into the deadline (504), so the read is failed now, retryably.
            self.pending.fail_reads(
                "the leader changed while the read waited; retry", _RETRY_AFTER_S
            )
        self.handover.on_leader(leader_id)

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
        return self.pending.count

    def status(self) -> Status:
        return self.node.status()

    def applied_index(self) -> int:
        return int(self.replica.state_machine.applied_index)
