"""RawNode: the Raft core as a pure state machine (etcd-io/raft's RawNode, h11's sans-I/O).

The driver feeds it ticks (`tick()`), network messages (`step()`) and client requests
(`propose()`, `read_index()`, `transfer_leadership()`), and collects its output with
`ready()`: hard state and entries to persist, messages to send, committed entries to apply,
ReadIndex answers. It then calls `advance(ready)`. Nothing here does I/O, reads a clock or
uses module-level randomness; time is a count of ticks and randomness is an injected
`random.Random`.

Rules that hold in this module:
- Raft §5.1: a message with a newer term makes us a follower of that term first; one with an
  older term is ignored, or answered so that its sender learns our term.
- Raft §5.2 / dissertation §9.6: elections use randomized timeouts and, when enabled, a
  pre-vote round that changes no term; check-quorum makes a leader step down when it has not
  heard from a quorum for an election timeout, and makes a node that has heard from a live
  leader within an election timeout ignore (pre-)vote requests (except a forced campaign of a
  leadership transfer, marked by CAMPAIGN_TRANSFER in Message.context).
- Raft §5.3: replication per follower with Progress (probe / replicate / snapshot), bounded
  in flight by count and bytes; rejections carry a hint for fast backtracking.
- Raft §5.4.2: a leader counts replicas only for entries of its own term, and appends an empty
  entry when it takes office so that earlier entries commit through it.
- A leader counts its own copy of an entry only once it is durable: its match index moves in
  `advance()` for the entries the Ready carried, never at append time, so nothing depends on
  when the driver steps acks relative to its save.
- Persistence: every message produced is handed out in a Ready together with (or after) the
  hard state and entries it depends on, and the driver persists before sending.
- Membership lives in `_voters` and `_learners` (from the ConfState), never in a hard-coded
  count. Dissertation §4.1: a configuration takes effect on a node as soon as its entry is
  in the node's log (appended, not committed), and a truncated entry takes its
  configuration with it (`_sync_conf`); at most one change is in flight (a leader proposes
  the next only once the last is committed), and a leader proposes one only after an entry
  of its own term committed (the fix §4.1 gives for single-server changes). Quorums,
  commit, check-quorum, ReadIndex and leadership transfer all use the current
  configuration; learners get the log but never vote nor count. A leader that removed
  itself hands leadership to the most up-to-date voter once the removal commits
  (dissertation §4.2.2), then steps down; (pre-)vote messages from removed ids are dropped
  (dissertation §4.2.3).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from kvstore.errors import (
    CompactedError,
    ConfChangeRefusedError,
    ProposalDroppedError,
    StorageError,
    UnavailableIndexError,
)
from kvstore.raft import confchange, quorum
from kvstore.raft.config import RaftConfig
from kvstore.raft.log import RaftLog
from kvstore.raft.progress import Inflights, Progress, ProgressState
from kvstore.raft.read_only import ReadOnly
from kvstore.raft.storage import Storage
from kvstore.raft.types import (
    NONE,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SoftState,
)

logger = logging.getLogger("kvstore.raft")

CAMPAIGN_TRANSFER = b"kvstore:campaign-transfer"
"""Message.context of a VOTE sent by a candidate that campaigns because of TIMEOUT_NOW:
receivers grant it even while they still hear from the old leader (dissertation §3.10)."""

_EMPTY_READY = Ready()

_PEER_DOWN_STAGGER_TICKS = 2
"""Ticks between the campaigns of successive survivors after report_peer_down (see
RawNode._peer_down_delay_ticks): long enough for a pre-vote and a vote round trip."""

_READS_OUTSTANDING_MAX = 4096
"""ReadIndex requests a follower remembers awaiting an answer; beyond this the oldest is
forgotten (a request or answer lost in the same term is never answered; its reader has a
deadline)."""

# Messages that carry the term they are about rather than the sender's (see RawNode._send).
_VOTE_TYPES = frozenset(
    {
        MessageType.VOTE,
        MessageType.VOTE_RESPONSE,
        MessageType.PRE_VOTE,
        MessageType.PRE_VOTE_RESPONSE,
    }
)

_RESPONSE_TYPES = frozenset(
    {
        MessageType.VOTE_RESPONSE,
        MessageType.PRE_VOTE_RESPONSE,
        MessageType.APPEND_RESPONSE,
        MessageType.HEARTBEAT_RESPONSE,
        MessageType.READ_INDEX_RESPONSE,
    }
)


@dataclass(frozen=True, slots=True)
class ConfEntry:
    """A CONF_CHANGE entry of the log and the configuration it starts."""

    index: int
    term: int
    conf_state: ConfState


@dataclass(frozen=True, slots=True)
class ProgressStatus:
    match_index: int
    next_index: int
    state: ProgressState
    recent_active: bool


@dataclass(frozen=True, slots=True)
class Status:
    id: int
    term: int
    vote: int
    role: Role
    leader_id: int
    commit_index: int
    applied_index: int
    last_index: int
    lead_transferee: int
    progress: dict[int, ProgressStatus] = field(default_factory=dict)
    conf_state: ConfState = field(default_factory=ConfState)
    # The index of the last membership change in the log, and whether it is committed.
    conf_index: int = 0


class RawNode:
    """One Raft peer. Not thread-safe: one driver owns it."""

    def __init__(self, config: RaftConfig, storage: Storage, rng: random.Random) -> None:
        self.id = config.id
        self._config = config
        self._storage = storage
        self._rng = rng
        # ReadIndex contexts are this incarnation's random nonce and a counter, so they are
        # unique across restarts (each start gets a differently seeded rng: the server seeds
        # from the OS, the simulator from its run's rng). An answer to a request of an
        # earlier incarnation can never be taken for an answer to ours.
        self._read_nonce = rng.getrandbits(64).to_bytes(8, "big")
        self._read_sequence = 0
        # Pre-vote rounds in a row since a leader was last heard (or elected): logging.
        self._pre_campaigns = 0
        # Contexts a follower sent to the leader and awaits the answer to, oldest first.
        self._reads_outstanding: dict[bytes, None] = {}
        self._log = RaftLog(storage)
        hard_state, conf_state = storage.initial_state()
        if not conf_state.voters and config.peers:
            # A new cluster's first start: the bootstrap configuration. A node that joins an
            # existing cluster starts with no configuration and learns it from the leader.
            if self.id not in config.peers:
                raise ValueError(f"config.peers {config.peers} must include id {self.id}")
            conf_state = ConfState(voters=tuple(sorted(config.peers)))
        self._voters: tuple[int, ...] = ()
        self._learners: tuple[int, ...] = ()
        self._removed: frozenset[int] = frozenset()
        self._known_ids: frozenset[int] = frozenset()
        # The configuration before the first entry of `_conf_entries`: the snapshot's, or one
        # folded in from an applied conf entry (`_fold_applied_conf`).
        self._conf_base = conf_state
        # The index of the conf entry last folded into `_conf_base` (0 when the base came
        # from storage or a snapshot, whose metadata does not say): for `status()` only.
        self._conf_base_index = 0
        # Invariant: the CONF_CHANGE entries of the log after `_conf_base`, in index order;
        # the last one (else the base) is the configuration in force (dissertation §4.1).
        self._conf_entries: list[ConfEntry] = self._read_conf_entries(storage)
        self.term = hard_state.term
        self.vote = hard_state.vote
        if hard_state.commit > self._log.last_index():
            # The disk lost log entries that were durable and committed: refuse to start.
            raise StorageError(
                f"hard state commit {hard_state.commit} is beyond the last log index "
                f"{self._log.last_index()}: the log was truncated or lost"
            )
        self._log.committed = max(self._log.committed, hard_state.commit)
        if config.applied > 0:
            self._log.applied_to(min(config.applied, self._log.committed))
        self.role = Role.FOLLOWER
        self.leader_id = NONE
        self._progress: dict[int, Progress] = {}
        self._votes: dict[int, bool] = {}
        self._messages: list[Message] = []
        self._read_states: list[ReadState] = []
        self._read_only = ReadOnly()
        # Reads that arrived before this leader committed an entry of its term (§6.4).
        # ReadIndex requests (requester, context) waiting for an entry of this term to commit.
        self._pending_read_index: list[tuple[int, bytes]] = []
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        # Ticks since this node started: when something was last sent to a follower.
        self._tick_count = 0
        self._randomized_election_timeout = config.election_ticks
        self._snapshot_timeout_ticks = config.snapshot_timeout_ticks or 2 * config.election_ticks
        self.lead_transferee = NONE
        self._uncommitted_size_bytes = 0
        self._prev_hard_state = HardState(self.term, self.vote, self._log.committed)
        self._prev_soft_state = SoftState(NONE, Role.FOLLOWER)
        self._ready_outstanding = False
        self._broadcast_pending = False
        self._set_conf(self.conf_state)
        self._become_follower(self.term, NONE)

    # === public API ===========================================================================

    def tick(self) -> None:
        """Advance logical time by one tick."""
        self._tick_count += 1
        if self.role is Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def step(self, message: Message) -> None:
        """Handle a message from the network."""
        if message.to != self.id:
            logger.debug("event=message_ignored node=%d reason=not_for_us to=%d", self.id, message.to)
            return
        if message.from_ in self._removed and message.type in _VOTE_TYPES:
            # Dissertation §4.2.3: a removed server must not disrupt the cluster with
            # elections. (A leader that removed itself still replicates until the removal
            # commits, then sends TIMEOUT_NOW: those messages are taken.)
            logger.debug(
                "event=message_ignored node=%d reason=removed_sender from=%d", self.id, message.from_
            )
            return
        if message.type in _RESPONSE_TYPES and message.from_ not in self._known_ids:
            logger.debug(
                "event=message_ignored node=%d reason=unknown_sender type=%s from=%d",
                self.id,
                message.type.name,
                message.from_,
            )
            return
        self._step(message)

    def propose(self, data: bytes) -> None:
        """Append `data` as a new entry; raises ProposalDroppedError unless leader."""
        if self.role is not Role.LEADER:
            raise ProposalDroppedError(f"node {self.id} is not the leader")
        if self.lead_transferee != NONE:
            raise ProposalDroppedError(f"leadership transfer to {self.lead_transferee} under way")
        if self.id not in self._voters:
            raise ProposalDroppedError(f"node {self.id} is leaving the cluster")
        entry = Entry(self.term, self._log.last_index() + 1, data=data)
        if not self._increase_uncommitted_size(entry.size_bytes()):
            raise ProposalDroppedError("too many uncommitted bytes")
        self._append_entries([entry])
        # Appends go out when the driver asks for the next Ready, so that every proposal
        # made in between travels in one message per follower.
        self._broadcast_pending = True

    def propose_conf_change(self, change: confchange.ConfChange) -> int:
        """Append a membership change (dissertation §4.1, one server at a time); returns its
        index. It takes effect here at once, and on each node when appended there.

        ProposalDroppedError when not the leader (or a transfer is under way);
        ConfChangeRefusedError when a change is still uncommitted, when no entry of this
        term has committed yet (§4.1's fix: otherwise a change of a deposed leader's term
        and ours could both be counted by majorities that do not overlap), when the change
        is not valid from the current configuration, or when promoting a learner that has
        not caught up (§4.2.1: it would stall commits while it does)."""
        if self.role is not Role.LEADER:
            raise ProposalDroppedError(f"node {self.id} is not the leader")
        if self.lead_transferee != NONE:
            raise ProposalDroppedError(f"leadership transfer to {self.lead_transferee} under way")
        if not self._committed_entry_in_current_term():
            raise ConfChangeRefusedError(
                f"leader {self.id} has not committed an entry of term {self.term} yet"
            )
        pending = self._last_conf_index()
        if pending > self._log.committed:
            raise ConfChangeRefusedError(f"the membership change at index {pending} is not committed yet")
        try:
            conf = confchange.apply_change(self.conf_state, change)
        except ValueError as exc:
            raise ConfChangeRefusedError(str(exc)) from None
        if change.type is confchange.ConfChangeType.PROMOTE:
            self._check_caught_up(change.node_id)
        data = confchange.encode(confchange.ConfChangeEntry(change, conf))
        entry = Entry(self.term, self._log.last_index() + 1, EntryType.CONF_CHANGE, data)
        if not self._increase_uncommitted_size(entry.size_bytes()):
            raise ProposalDroppedError("too many uncommitted bytes")
        logger.info(
            "event=conf_change_proposed node=%d index=%d change=%s member=%d",
            self.id,
            entry.index,
            change.type.name,
            change.node_id,
        )
        self._append_entries([entry])
        self._broadcast_pending = True
        return entry.index

    def learner_caught_up(self, learner: int) -> bool:
        """On the leader: whether PROMOTE of `learner` would pass the test below now (the
        server's healer and the simulator's operator ask before proposing)."""
        try:
            self._check_caught_up(learner)
        except ConfChangeRefusedError:
            return False
        return True

    def _check_caught_up(self, learner: int) -> None:
        """Dissertation §4.2.1 (etcd's "learner in sync", Consul's "stable and at most 250
        entries behind"): promote only a learner that is alive and close to our log."""
        progress = self._progress.get(learner)
        lag_max = self._config.promote_lag_entries_max
        if progress is None or not progress.recent_active:
            raise ConfChangeRefusedError(f"learner {learner} has not been heard from lately")
        lag = self._log.last_index() - progress.match_index
        if lag > lag_max or progress.state is not ProgressState.REPLICATE:
            raise ConfChangeRefusedError(
                f"learner {learner} is {lag} entries behind (at most {lag_max} to be promoted)"
            )

    def read_index(self) -> bytes:
        """Ask for a linearizable read point (dissertation §6.4); returns the context that
        the answer, a ReadState in a later Ready, carries. Contexts are unique across
        restarts (see `_new_read_context`); ProposalDroppedError when no leader is known."""
        if self.role is Role.LEADER:
            context = self._new_read_context()
            self._leader_read_index(self.id, context)
            return context
        if self.leader_id == NONE:
            raise ProposalDroppedError(f"node {self.id} knows no leader")
        context = self._new_read_context()
        outstanding = self._reads_outstanding
        outstanding[context] = None
        if len(outstanding) > _READS_OUTSTANDING_MAX:
            del outstanding[next(iter(outstanding))]
        self._send(MessageType.READ_INDEX, self.leader_id, context=context)
        return context

    def _new_read_context(self) -> bytes:
        """This incarnation's nonce (8 random bytes) and a counter (8 bytes)."""
        self._read_sequence += 1
        return self._read_nonce + self._read_sequence.to_bytes(8, "big")

    def transfer_leadership(self, to: int) -> None:
        """Hand leadership to `to` (dissertation §3.10); a follower forwards to the leader."""
        if self.role is Role.LEADER:
            self._leader_transfer(to)
        elif self.leader_id != NONE:
            self._send(MessageType.TRANSFER_LEADER, self.leader_id, transferee=to)

    def campaign(self) -> None:
        """Start an election now (with a pre-vote round when enabled)."""
        self._hup(transfer=False)

    def report_peer_down(self, peer: int) -> None:
        """The transport saw the connection to `peer` close.

        A leader drops that follower back to probing. A follower that loses its leader's
        connection (a crashed process's socket is closed by the kernel) forgets the leader's
        lease and campaigns after a short staggered delay instead of a full election timeout;
        the pre-vote round still decides, so a report on one follower deposes no one. The
        core trusts the report: made on every follower at once for a live leader, it deposes
        it (each grants the other's pre-vote; the xfail test_report_peer_down_on_all_
        followers_blip_does_not_depose_live_leader), so the server's transport reports a
        peer down only with evidence it is gone (a refused redial, or silence)."""
        if self.role is Role.LEADER:
            progress = self._progress.get(peer)
            if progress is not None and progress.state is ProgressState.REPLICATE:
                progress.become_probe()
            return
        if self.role is Role.FOLLOWER and peer != NONE and peer == self.leader_id:
            # The leader's lease is void: grant pre-votes now and campaign soon.
            logger.info("event=leader_reported_down node=%d leader=%d", self.id, peer)
            self.leader_id = NONE
            self._election_elapsed = 0
            self._randomized_election_timeout = self._peer_down_delay_ticks(peer)

    def _peer_down_delay_ticks(self, leader: int) -> int:
        """When to campaign after the leader's connection closed: staggered by our rank among
        the other voters (_PEER_DOWN_STAGGER_TICKS apart, plus 0..1 tick of jitter). All
        survivors notice within a millisecond; staggering lets the first one win while the
        others, asked for their vote, stand down, instead of splitting the vote."""
        others = [voter for voter in self._voters if voter != leader]
        rank = others.index(self.id) if self.id in others else len(others)
        delay = rank * _PEER_DOWN_STAGGER_TICKS + self._rng.randint(0, 1)
        return min(delay, self._config.election_ticks - 1)

    def report_snapshot(self, peer: int, ok: bool) -> None:
        """The driver finished (ok) or failed to send the snapshot to `peer`."""
        if self.role is not Role.LEADER:
            return
        progress = self._progress.get(peer)
        if progress is None or progress.state is not ProgressState.SNAPSHOT:
            return
        if not ok:
            progress.pending_snapshot = 0
        progress.become_probe()
        # Wait for the follower's answer (or a heartbeat round) before the next append.
        progress.probe_sent = True
        # Until then a rejection answers an append sent before the snapshot (the follower
        # sent it before installing the snapshot, or the network held it): sending the
        # snapshot again for it would send it twice for one need.
        progress.snapshot_answer_due = ok

    def has_ready(self) -> bool:
        log = self._log
        if self._messages or self._read_states or self._broadcast_pending:
            return True
        if log.has_unstable_entries() or log.unstable_snapshot() is not None:
            return True
        if log.committed > log.applied:
            return True
        previous = self._prev_hard_state
        if (
            previous.term != self.term
            or previous.vote != self.vote
            or previous.commit != log.committed
        ):
            return True
        soft = self._prev_soft_state
        return soft.leader_id != self.leader_id or soft.role is not self.role

    def ready(self) -> Ready:
        """Collect the pending work; the caller must process it and call advance() before
        asking for the next Ready."""
        assert not self._ready_outstanding, "ready() called again before advance()"
        if self._broadcast_pending:
            self._broadcast_pending = False
            if self.role is Role.LEADER:
                self._broadcast_append()
        if not self.has_ready():
            return _EMPTY_READY
        log = self._log
        previous = self._prev_hard_state
        term_or_vote_changed = previous.term != self.term or previous.vote != self.vote
        hard_state: HardState | None = None
        if term_or_vote_changed or previous.commit != log.committed:
            hard_state = HardState(self.term, self.vote, log.committed)
        soft_state: SoftState | None = None
        previous_soft = self._prev_soft_state
        if previous_soft.leader_id != self.leader_id or previous_soft.role is not self.role:
            soft_state = SoftState(self.leader_id, self.role)
        entries = log.unstable_entries()
        snapshot = log.unstable_snapshot()
        committed = tuple(
            log.next_committed_entries(self._config.max_committed_size_per_ready_bytes)
        )
        if committed and self.role is Role.LEADER:
            self._reduce_uncommitted_size(committed)
        messages = tuple(self._messages)
        self._messages.clear()
        read_states = tuple(self._read_states)
        self._read_states.clear()
        # A commit index alone needs no fsync: it can be relearned from the leader.
        must_sync = bool(entries) or snapshot is not None or term_or_vote_changed
        self._ready_outstanding = True
        return Ready(
            soft_state=soft_state,
            hard_state=hard_state,
            entries=entries,
            snapshot=snapshot,
            committed_entries=committed,
            messages=messages,
            read_states=read_states,
            must_sync=must_sync,
        )

    def advance(self, ready: Ready) -> None:
        """The driver persisted, sent and applied `ready`."""
        if ready is _EMPTY_READY:
            return
        self._ready_outstanding = False
        if ready.soft_state is not None:
            self._prev_soft_state = ready.soft_state
        if ready.hard_state is not None:
            self._prev_hard_state = ready.hard_state
        log = self._log
        if ready.snapshot is not None:
            log.stable_snapshot_to(ready.snapshot.metadata.index)
            log.applied_to(ready.snapshot.metadata.index)
        if ready.entries:
            last = ready.entries[-1]
            log.stable_to(last.index, last.term)
            if self.role is Role.LEADER:
                self._self_ack()
        if ready.committed_entries:
            log.applied_to(ready.committed_entries[-1].index)
        if self._conf_entries and self._conf_entries[0].index <= log.applied:
            self._fold_applied_conf()

    def _self_ack(self) -> None:
        """The leader's own entries count toward commit only once durable (etcd-io/raft's
        self-ack after stableTo): its appends may leave before its save returns, and a
        follower's ack stepped meanwhile must not commit an entry that a crash of the leader
        would lose from all but one follower. Raft §5.3: an entry is committed once stored on
        a majority, and only what is on disk is stored."""
        own = self._progress.get(self.id)
        if own is None or not own.maybe_update(self._log.stable_last_index()):
            return
        # A single-voter cluster commits here.
        self._after_match_changed()

    def _after_match_changed(self) -> bool:
        """A match index or the voters changed: commit what a majority now holds; True when
        the commit index moved."""
        if not self._maybe_commit():
            return False
        self._release_pending_read_index()
        # The new commit index reaches followers with the next Ready's appends.
        self._broadcast_pending = True
        self._maybe_hand_over()
        return True

    def status(self) -> Status:
        progress: dict[int, ProgressStatus] = {}
        if self.role is Role.LEADER:
            progress = {
                peer: ProgressStatus(pr.match_index, pr.next_index, pr.state, pr.recent_active)
                for peer, pr in self._progress.items()
            }
        return Status(
            id=self.id,
            term=self.term,
            vote=self.vote,
            role=self.role,
            leader_id=self.leader_id,
            commit_index=self._log.committed,
            applied_index=self._log.applied,
            last_index=self._log.last_index(),
            lead_transferee=self.lead_transferee,
            progress=progress,
            conf_state=self.conf_state,
            conf_index=self._last_conf_index() or self._conf_base_index,
        )

    @property
    def voters(self) -> tuple[int, ...]:
        return self._voters

    @property
    def learners(self) -> tuple[int, ...]:
        return self._learners

    @property
    def conf_state(self) -> ConfState:
        """The membership in force: that of the last CONF_CHANGE entry in the log, committed
        or not (dissertation §4.1), else the snapshot's."""
        if self._conf_entries:
            return self._conf_entries[-1].conf_state
        return self._conf_base

    def conf_state_at(self, index: int) -> ConfState:
        """The membership as of log index `index` (at least the applied index): what a
        snapshot taken at `index` must record."""
        assert index >= self._log.applied, f"conf_state_at({index}) below applied"
        conf = self._conf_base
        for conf_entry in self._conf_entries:
            if conf_entry.index > index:
                break
            conf = conf_entry.conf_state
        return conf

    @property
    def is_removed(self) -> bool:
        """This node was removed from the configuration (it takes no further part)."""
        return self.id in self._removed

    # === membership (dissertation §4) ==========================================================

    def _read_conf_entries(self, storage: Storage) -> list[ConfEntry]:
        """The CONF_CHANGE entries of the stored log, read once at start (the write-ahead log
        holds every change after the snapshot, whose metadata holds the configuration before
        them: together they give the configuration after a crash)."""
        found: list[ConfEntry] = []
        low, high = storage.first_index(), storage.last_index() + 1
        while low < high:
            entries = storage.entries(low, high, 8 << 20)
            for entry in entries:
                if entry.type is EntryType.CONF_CHANGE:
                    found.append(ConfEntry(entry.index, entry.term, _decode_conf(entry)))
            low = entries[-1].index + 1
        return found

    def _last_conf_index(self) -> int:
        return self._conf_entries[-1].index if self._conf_entries else 0

    def _sync_conf(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """The log just changed by appending `entries` (possibly after truncating an
        uncommitted suffix): forget the configurations of truncated entries, adopt those of
        new CONF_CHANGE entries (dissertation §4.1: in force once in the log)."""
        if not entries:
            return
        log, conf_entries = self._log, self._conf_entries
        before = self.conf_state
        # An append replaces at most the suffix from its first entry on.
        first = entries[0].index
        while (
            conf_entries
            and conf_entries[-1].index >= first
            and not log.match_term(conf_entries[-1].index, conf_entries[-1].term)
        ):
            conf_entries.pop()
        last = self._last_conf_index()
        for entry in entries:
            if (
                entry.type is EntryType.CONF_CHANGE
                and entry.index > last
                and log.match_term(entry.index, entry.term)
            ):
                conf_entries.append(ConfEntry(entry.index, entry.term, _decode_conf(entry)))
                last = entry.index
        after = self.conf_state
        if after != before:
            self._set_conf(after)

    def _fold_applied_conf(self) -> None:
        """Fold the conf entries at or below the applied index into the base: they are
        committed (never truncated), and snapshots are never taken below applied."""
        conf_entries, applied = self._conf_entries, self._log.applied
        folded = 0
        while folded < len(conf_entries) and conf_entries[folded].index <= applied:
            folded += 1
        if folded:
            self._conf_base = conf_entries[folded - 1].conf_state
            self._conf_base_index = conf_entries[folded - 1].index
            del conf_entries[:folded]

    def _set_conf(self, conf: ConfState) -> None:
        """Make `conf` the configuration in force: who votes, who counts, who is replicated."""
        self._voters = tuple(sorted(conf.voters))
        self._learners = tuple(sorted(conf.learners))
        self._removed = frozenset(conf.removed)
        self._known_ids = frozenset(self._progress_ids())
        logger.info(
            "event=conf_changed node=%d voters=%s learners=%s",
            self.id,
            ",".join(map(str, self._voters)),
            ",".join(map(str, self._learners)),
        )
        if self.role is not Role.LEADER:
            return
        if self.lead_transferee != NONE and self.lead_transferee not in self._voters:
            self.lead_transferee = NONE
        config = self._config
        for peer in self._known_ids - self._progress.keys():
            inflights = Inflights(config.max_inflight_messages, config.max_inflight_bytes)
            self._progress[peer] = Progress(self._log.last_index() + 1, inflights)
        for peer in self._progress.keys() - self._known_ids - {self.id}:
            del self._progress[peer]
        # The majority changed: entries may commit now (e.g. a slow voter was removed).
        self._after_match_changed()

    def _maybe_hand_over(self) -> None:
        """Dissertation §4.2.2: a leader that is not in the configuration it committed steps
        down, first telling the most up-to-date voter to campaign at once (TIMEOUT_NOW)."""
        if (
            self.role is not Role.LEADER
            or self.id in self._voters
            or self._last_conf_index() > self._log.committed
        ):
            return
        candidates = [
            (progress.match_index, peer)
            for peer, progress in self._progress.items()
            if peer in self._voters
        ]
        logger.info("event=leader_removed node=%d term=%d action=step_down", self.id, self.term)
        if candidates:
            _, successor = max(candidates)
            self._send_timeout_now(successor)
        self._become_follower(self.term, NONE)


    @property
    def raft_log(self) -> RaftLog:
        """The in-memory log view (read it, never change it: tests and checkers)."""
        return self._log

    # === role changes =========================================================================

    def _progress_ids(self) -> tuple[int, ...]:
        return self._voters + self._learners

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NONE
            # Answers of the older term are ignored anyway (Raft §5.1).
            self._reads_outstanding.clear()
        self.leader_id = NONE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_randomized_election_timeout()
        self.lead_transferee = NONE
        self._votes = {}
        self._uncommitted_size_bytes = 0
        self._read_only.reset()
        self._pending_read_index.clear()
        self._progress = {}
        self._broadcast_pending = False

    def _reset_randomized_election_timeout(self) -> None:
        ticks = self._config.election_ticks
        self._randomized_election_timeout = ticks + self._rng.randrange(ticks)

    def _become_follower(self, term: int, leader_id: int) -> None:
        self._reset(term)
        self.leader_id = leader_id
        if self.role is not Role.FOLLOWER:
            logger.info("event=became_follower node=%d term=%d", self.id, term)
        self.role = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        assert self.role is not Role.LEADER, "leader cannot become pre-candidate"
        # Dissertation §9.6: a pre-vote round changes neither term nor vote.
        self._votes = {}
        self.leader_id = NONE
        # A shortened timeout (report_peer_down) is good for one quick attempt only.
        self._reset_randomized_election_timeout()
        self.role = Role.PRE_CANDIDATE
        # A node cut off from a majority campaigns every election timeout (three times a
        # second): the 1st, 10th, 100th... attempt in a row is worth an INFO line.
        self._pre_campaigns += 1
        attempts = self._pre_campaigns
        level = logging.INFO if str(attempts).strip("0") == "1" else logging.DEBUG
        message = "event=became_pre_candidate node=%d term=%d attempt=%d"
        logger.log(level, message, self.id, self.term, attempts)

    def _become_candidate(self) -> None:
        assert self.role is not Role.LEADER, "leader cannot become candidate"
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        logger.info("event=became_candidate node=%d term=%d", self.id, self.term)

    def _become_leader(self) -> None:
        assert self.role is not Role.FOLLOWER, "follower cannot become leader directly"
        self._reset(self.term)
        self.leader_id = self.id
        self.role = Role.LEADER
        self._pre_campaigns = 0
        last_index = self._log.last_index()
        config = self._config
        for peer in self._progress_ids():
            inflights = Inflights(config.max_inflight_messages, config.max_inflight_bytes)
            self._progress[peer] = Progress(last_index + 1, inflights)
        own = self._progress.get(self.id)
        if own is not None:
            # Only what is durable counts (`_self_ack`); the rest follows at advance().
            own.match_index = self._log.stable_last_index()
            own.become_replicate()
            own.recent_active = True
        # Raft §5.4.2: an empty entry of the new term lets earlier entries commit.
        self._append_entries([Entry(self.term, last_index + 1)])
        logger.info("event=became_leader node=%d term=%d", self.id, self.term)

    # === elections ============================================================================

    def _promotable(self) -> bool:
        return self.id in self._voters

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._randomized_election_timeout:
            self._election_elapsed = 0
            self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._config.election_ticks:
            self._election_elapsed = 0
            if self._config.check_quorum:
                self._check_quorum()
            if self.role is Role.LEADER and self.lead_transferee != NONE:
                logger.info(
                    "event=transfer_aborted node=%d to=%d", self.id, self.lead_transferee
                )
                self.lead_transferee = NONE
        if self.role is not Role.LEADER:
            return
        if self._heartbeat_elapsed >= self._config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat(self._read_only.last_pending_key())

    def _check_quorum(self) -> None:
        """Raft dissertation §6.2: step down without contact from a quorum for a timeout."""
        active = [peer for peer, pr in self._progress.items() if pr.recent_active]
        if self.id not in active:
            active.append(self.id)
        if not quorum.quorum_active(self._voters, active):
            logger.info("event=quorum_lost node=%d action=step_down", self.id)
            self._become_follower(self.term, NONE)
            return
        for peer, pr in self._progress.items():
            if peer != self.id:
                pr.recent_active = False

    def _hup(self, transfer: bool) -> None:
        if self.role is Role.LEADER or not self._promotable():
            return
        if self._config.pre_vote and not transfer:
            self._campaign(pre_vote=True, transfer=False)
        else:
            self._campaign(pre_vote=False, transfer=transfer)

    def _campaign(self, pre_vote: bool, transfer: bool) -> None:
        if pre_vote:
            self._become_pre_candidate()
            vote_type = MessageType.PRE_VOTE
            # Ask for votes for the term we would use, without moving to it.
            term = self.term + 1
        else:
            self._become_candidate()
            vote_type = MessageType.VOTE
            term = self.term
        if self._poll(self.id, True) is quorum.VoteResult.WON:
            # A single-voter cluster wins at once.
            if pre_vote:
                self._campaign(pre_vote=False, transfer=False)
            else:
                self._become_leader()
            return
        last_index = self._log.last_index()
        last_term = self._log.last_term()
        context = CAMPAIGN_TRANSFER if transfer else b""
        for peer in self._voters:
            if peer != self.id:
                self._send(
                    vote_type, peer, term=term, log_term=last_term, index=last_index, context=context
                )

    def _poll(self, voter: int, granted: bool) -> quorum.VoteResult:
        self._votes.setdefault(voter, granted)
        return quorum.vote_result(self._voters, self._votes)

    # === stepping =============================================================================

    def _step(self, m: Message) -> None:
        if m.term > self.term:
            if not self._accept_higher_term(m):
                return
        elif m.term < self.term:
            self._answer_stale(m)
            return
        if m.type is MessageType.VOTE or m.type is MessageType.PRE_VOTE:
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _accept_higher_term(self, m: Message) -> bool:
        """Raft §5.1 for a message of a newer term; False when it must be ignored."""
        if m.type is MessageType.VOTE or m.type is MessageType.PRE_VOTE:
            forced = m.context == CAMPAIGN_TRANSFER
            in_lease = (
                self._config.check_quorum
                and self.leader_id != NONE
                and self._election_elapsed < self._config.election_ticks
            )
            if in_lease and not forced:
                # We heard from a live leader recently: do not let this node disrupt it.
                return False
        if m.type is MessageType.PRE_VOTE:
            return True  # a pre-vote never changes our term
        if m.type is MessageType.PRE_VOTE_RESPONSE and not m.reject:
            return True  # the term moves only when the pre-candidate wins
        if m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            self._become_follower(m.term, m.from_)
        else:
            self._become_follower(m.term, NONE)
        return True

    def _answer_stale(self, m: Message) -> None:
        """A message from an older term: tell the sender our term where that helps."""
        config = self._config
        if (config.check_quorum or config.pre_vote) and m.type in (
            MessageType.HEARTBEAT,
            MessageType.APPEND,
        ):
            # A leader cut off by a partition learns the new term and steps down; without
            # this, it could keep a follower from ever campaigning under check-quorum.
            self._send(MessageType.APPEND_RESPONSE, m.from_)
        elif m.type is MessageType.PRE_VOTE:
            self._send(MessageType.PRE_VOTE_RESPONSE, m.from_, term=self.term, reject=True)

    def _handle_vote_request(self, m: Message) -> None:
        """Raft §5.2, §5.4.1: one vote per term, only for an up-to-date log."""
        is_pre_vote = m.type is MessageType.PRE_VOTE
        can_vote = (
            self.vote == m.from_
            or (self.vote == NONE and self.leader_id == NONE)
            or (is_pre_vote and m.term > self.term)
        )
        response_type = MessageType.PRE_VOTE_RESPONSE if is_pre_vote else MessageType.VOTE_RESPONSE
        if can_vote and self._log.is_up_to_date(m.index, m.log_term):
            # The response carries the asked-for term so that the candidate counts it.
            self._send(response_type, m.from_, term=m.term)
            if not is_pre_vote:
                self._election_elapsed = 0
                self.vote = m.from_
        else:
            self._send(response_type, m.from_, term=self.term, reject=True)

    def _step_candidate(self, m: Message) -> None:
        own_response = (
            MessageType.PRE_VOTE_RESPONSE
            if self.role is Role.PRE_CANDIDATE
            else MessageType.VOTE_RESPONSE
        )
        mtype = m.type
        if mtype is MessageType.APPEND:
            self._become_follower(m.term, m.from_)
            self._handle_append(m)
        elif mtype is MessageType.HEARTBEAT:
            self._become_follower(m.term, m.from_)
            self._handle_heartbeat(m)
        elif mtype is MessageType.SNAPSHOT:
            self._become_follower(m.term, m.from_)
            self._handle_snapshot(m)
        elif mtype is own_response:
            result = self._poll(m.from_, not m.reject)
            if result is quorum.VoteResult.WON:
                if self.role is Role.PRE_CANDIDATE:
                    self._campaign(pre_vote=False, transfer=False)
                else:
                    self._become_leader()
                    self._broadcast_append()
            elif result is quorum.VoteResult.LOST:
                self._become_follower(self.term, NONE)

    def _step_follower(self, m: Message) -> None:
        mtype = m.type
        if mtype is MessageType.APPEND:
            self._heard_from_leader(m.from_)
            self._handle_append(m)
        elif mtype is MessageType.HEARTBEAT:
            self._heard_from_leader(m.from_)
            self._handle_heartbeat(m)
        elif mtype is MessageType.SNAPSHOT:
            self._heard_from_leader(m.from_)
            self._handle_snapshot(m)
        elif mtype is MessageType.TIMEOUT_NOW:
            logger.info("event=timeout_now node=%d from=%d action=campaign", self.id, m.from_)
            self._hup(transfer=True)
        elif mtype is MessageType.READ_INDEX_RESPONSE:
            # Only the answer to a request of this incarnation that still awaits one: a node
            # restarted in the same term must never serve a new read at the index answered
            # to its predecessor's request, which may predate writes acknowledged since; a
            # duplicate answer is dropped too.
            if m.context in self._reads_outstanding:
                del self._reads_outstanding[m.context]
                self._read_states.append(ReadState(m.index, m.context))
            else:
                logger.debug("event=read_index_answer_dropped node=%d", self.id)
        elif (
            mtype is MessageType.TRANSFER_LEADER
            and self.leader_id != NONE
            and self.leader_id != m.from_
        ):
            # Forward to the leader we know. (A READ_INDEX reaching a non-leader is dropped:
            # forwarding it would route the answer to the wrong node; the reader retries.)
            self._send(mtype, self.leader_id, transferee=m.transferee)

    def _heard_from_leader(self, leader: int) -> None:
        self._election_elapsed = 0
        self.leader_id = leader
        self._pre_campaigns = 0
        if self._randomized_election_timeout < self._config.election_ticks:
            # report_peer_down shortened the timeout, but the leader is alive after all.
            self._reset_randomized_election_timeout()

    # === follower side of replication =========================================================

    def _handle_append(self, m: Message) -> None:
        log = self._log
        entries = m.entries
        if entries and (
            entries[0].index != m.index + 1 or entries[-1].index != m.index + len(entries)
        ):
            logger.warning("event=append_dropped node=%d from=%d reason=malformed", self.id, m.from_)
            return
        if m.index < log.committed:
            self._send(MessageType.APPEND_RESPONSE, m.from_, index=log.committed)
            return
        last_new_index = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new_index is not None and (
            (self._conf_entries and self._conf_entries[-1].index > m.index)
            or any(entry.type is EntryType.CONF_CHANGE for entry in entries)
        ):
            self._sync_conf(entries)
        if last_new_index is not None:
            self._send(MessageType.APPEND_RESPONSE, m.from_, index=last_new_index)
            return
        # Raft §5.3 with fast backtracking: hint the last index whose term is <= the leader's
        # log_term at m.index, and that term, so the leader skips whole terms per round trip.
        hint_index = min(m.index, log.last_index())
        hint_index, hint_term = log.find_conflict_by_term(hint_index, m.log_term)
        self._send(
            MessageType.APPEND_RESPONSE,
            m.from_,
            index=m.index,
            reject=True,
            reject_hint=hint_index,
            log_term=hint_term,
        )

    def _handle_heartbeat(self, m: Message) -> None:
        self._log.commit_to(min(m.commit, self._log.last_index()))
        self._send(MessageType.HEARTBEAT_RESPONSE, m.from_, context=m.context)

    def _handle_snapshot(self, m: Message) -> None:
        snapshot = m.snapshot
        if snapshot is None or snapshot.is_empty():
            logger.warning("event=snapshot_ignored node=%d from=%d reason=empty", self.id, m.from_)
            return
        if self._restore(snapshot):
            index = self._log.last_index()
        else:
            index = self._log.committed
        self._send(MessageType.APPEND_RESPONSE, m.from_, index=index)

    def _restore(self, snapshot: Snapshot) -> bool:
        """Raft §7 InstallSnapshot receiver; False when the snapshot brings nothing new."""
        metadata = snapshot.metadata
        log = self._log
        if metadata.index <= log.committed:
            return False
        if log.match_term(metadata.index, metadata.term):
            # We already have the snapshot's last entry: just fast-forward the commit.
            log.commit_to(metadata.index)
            return False
        logger.info(
            "event=snapshot_restoring node=%d index=%d term=%d",
            self.id,
            metadata.index,
            metadata.term,
        )
        log.restore(snapshot)
        self._apply_conf_state(metadata.conf_state)
        return True

    def _apply_conf_state(self, conf_state: ConfState) -> None:
        """A snapshot replaced the whole log: its configuration is the one in force."""
        if conf_state.voters:
            self._conf_base = conf_state
            self._conf_base_index = 0
            self._conf_entries.clear()
            self._set_conf(conf_state)

    # === leader ===============================================================================

    def _step_leader(self, m: Message) -> None:
        mtype = m.type
        if mtype is MessageType.READ_INDEX:
            self._leader_read_index(m.from_, m.context)
            return
        if mtype is MessageType.TRANSFER_LEADER:
            self._leader_transfer(m.transferee)
            return
        progress = self._progress.get(m.from_)
        if progress is None:
            return
        if mtype is MessageType.APPEND_RESPONSE:
            progress.recent_active = True
            if m.reject:
                self._handle_append_rejection(m, progress)
            else:
                self._handle_append_success(m, progress)
        elif mtype is MessageType.HEARTBEAT_RESPONSE:
            self._handle_heartbeat_response(m, progress)

    def _handle_append_rejection(self, m: Message, progress: Progress) -> None:
        next_probe_index = m.reject_hint
        if m.log_term > 0:
            # Skip every entry of ours whose term is above the follower's term at the hint.
            next_probe_index, _ = self._log.find_conflict_by_term(m.reject_hint, m.log_term)
        if progress.maybe_decrease_to(m.index, next_probe_index):
            if progress.state is ProgressState.REPLICATE:
                progress.become_probe()
            self._send_append(m.from_, progress)

    def _handle_append_success(self, m: Message, progress: Progress) -> None:
        if m.index > self._log.last_index():
            # Nothing we sent can be acknowledged beyond our log: a confused peer.
            logger.warning(
                "event=ack_ignored node=%d index=%d from=%d reason=beyond_log", self.id, m.index, m.from_
            )
            return
        was_paused = progress.is_paused()
        # Whether this answers the probe outstanding: an append at next_index - 1 (or later).
        answers_probe = progress.state is ProgressState.PROBE and m.index >= progress.next_index - 1
        probe_sent = progress.probe_sent
        updated = progress.maybe_update(m.index)
        if not updated and not (progress.match_index == m.index and answers_probe):
            return
        if progress.state is ProgressState.PROBE:
            if answers_probe:
                progress.become_replicate()
            else:
                # An answer to an append sent before the probe now outstanding: after a
                # snapshot the probe starts past it, and a follower that reconnects answers
                # at once every append queued while it was away. It moves the match index,
                # but replicating from there would send the same snapshot again for each
                # such answer (about 100 in 4 ms in a black-box run): keep waiting for the
                # answer to the probe (or a heartbeat interval, `_handle_heartbeat_response`).
                progress.probe_sent = probe_sent
        elif progress.state is ProgressState.SNAPSHOT:
            if progress.match_index + 1 >= self._log.first_index():
                progress.become_probe()
                progress.become_replicate()
        else:
            progress.inflights.free_le(m.index)
        if self._after_match_changed():
            if self.role is not Role.LEADER:
                return  # a removal of this leader committed: it handed over
        elif was_paused:
            self._send_append(m.from_, progress)
        while self._send_append(m.from_, progress, send_if_empty=False):
            pass
        if m.from_ == self.lead_transferee and progress.match_index == self._log.last_index():
            self._send_timeout_now(m.from_)

    def _handle_heartbeat_response(self, m: Message, progress: Progress) -> None:
        progress.recent_active = True
        # The work one response may cause is bounded by time, not by responses: heartbeats
        # go out with every ReadIndex round, and a stalled connection that resumes delivers
        # hundreds of their responses at once; resending per response rebuilt an append of
        # up to a message's size (or a snapshot) for each and locked the leader up.
        ticks_since_sent = self._tick_count - progress.sent_tick
        if (
            progress.state is ProgressState.SNAPSHOT
            and ticks_since_sent >= self._snapshot_timeout_ticks
        ):
            # The follower is alive but neither the snapshot's outcome nor its answer came
            # back (a lost message the transport did not notice): `snapshot_timeout_ticks`
            # (two election timeouts by default) after the snapshot went out, probe again, which sends a fresh snapshot if
            # still needed. Until then a pending snapshot is never sent again (a SNAPSHOT
            # progress is paused, so `_send_append` below sends nothing).
            progress.pending_snapshot = 0
            progress.become_probe()
        if (
            progress.match_index < self._log.last_index()
            and ticks_since_sent >= self._config.heartbeat_ticks
        ):
            # Whatever went to the follower last went a heartbeat interval ago and it still
            # lags: that append may be lost without the transport noticing. Send once more
            # (etcd-io/raft resumes a paused probe on a heartbeat response the same way).
            # A probe goes again without its entries: its answer says where the follower
            # stands, and the entries follow it. With them, a follower that answers
            # heartbeats but not appends for a while (loading a large snapshot) was sent the
            # same megabyte every heartbeat interval, which both sides encoded and decoded.
            with_entries = True
            if progress.state is ProgressState.PROBE:
                progress.probe_sent = False
                with_entries = False
            elif progress.inflights.full():
                # Free one slot so that the next append goes out; if the follower lacks the
                # entries before it, it rejects and we fall back to probing from its real
                # match index.
                progress.inflights.free_first_one()
            self._send_append(m.from_, progress, with_entries=with_entries)
        self._heartbeat_read_ack(m)

    def _heartbeat_read_ack(self, m: Message) -> None:
        """A heartbeat response carrying a ReadIndex key counts as that round's ack."""
        if not m.context:
            return
        acks = self._read_only.receive_ack(m.from_, m.context)
        if acks is None:
            return
        if quorum.vote_result(self._voters, dict.fromkeys(acks, True)) is not (
            quorum.VoteResult.WON
        ):
            return
        for status in self._read_only.advance(m.context):
            self._answer_read(status.requester, status.index, status.context)

    def _maybe_commit(self) -> bool:
        match = {peer: pr.match_index for peer, pr in self._progress.items()}
        index = quorum.committed_index(self._voters, match)
        # Raft §5.4.2: only an entry of the current term commits by counting replicas.
        return self._log.maybe_commit(index, self.term)

    def _append_entries(self, entries: list[Entry]) -> None:
        # Our own match index moves when the entries are durable (`_self_ack` in advance()).
        self._log.append(entries)
        if any(entry.type is EntryType.CONF_CHANGE for entry in entries):
            self._sync_conf(entries)

    def _increase_uncommitted_size(self, size_bytes: int) -> bool:
        limit = self._config.max_uncommitted_entries_bytes
        if self._uncommitted_size_bytes > 0 and self._uncommitted_size_bytes + size_bytes > limit:
            return False
        self._uncommitted_size_bytes += size_bytes
        return True

    def _reduce_uncommitted_size(self, entries: tuple[Entry, ...]) -> None:
        size = sum(entry.size_bytes() for entry in entries if entry.data)
        self._uncommitted_size_bytes = max(0, self._uncommitted_size_bytes - size)

    def _broadcast_append(self) -> None:
        for peer, progress in self._progress.items():
            if peer != self.id:
                self._send_append(peer, progress)

    def _send_append(
        self, to: int, progress: Progress, send_if_empty: bool = True, with_entries: bool = True
    ) -> bool:
        """Send the next append to `to` when its progress allows; True if one was sent.
        `with_entries=False`: an empty append (a probe resent: see
        `_handle_heartbeat_response`)."""
        log = self._log
        if not send_if_empty and progress.next_index > log.last_index():
            return False  # nothing new to send: the common case after every ack
        if progress.is_paused():
            return False
        previous_index = progress.next_index - 1
        try:
            previous_term = log.term(previous_index)
            entries = (
                log.entries(progress.next_index, self._config.max_size_per_message_bytes)
                if with_entries
                else []
            )
        except CompactedError:
            return self._send_snapshot(to, progress)
        except UnavailableIndexError:
            raise AssertionError(
                f"next index {progress.next_index} of {to} beyond last {log.last_index()}"
            ) from None
        if not entries and not send_if_empty:
            return False
        self._send(
            MessageType.APPEND,
            to,
            log_term=previous_term,
            index=previous_index,
            entries=tuple(entries),
            commit=log.committed,
        )
        if entries:
            progress.sent_entries(len(entries), sum(entry.size_bytes() for entry in entries))
        else:
            progress.sent_entries(0, 0)
        progress.sent_tick = self._tick_count
        return True

    def _send_snapshot(self, to: int, progress: Progress) -> bool:
        """Raft §7: the follower needs entries we compacted; send the latest snapshot."""
        if not progress.recent_active:
            return False
        snapshot = self._storage.snapshot()
        if snapshot.is_empty():
            logger.warning("event=no_snapshot_to_send node=%d to=%d", self.id, to)
            return False
        progress.become_snapshot(snapshot.metadata.index)
        progress.sent_tick = self._tick_count
        logger.info(
            "event=snapshot_sending node=%d index=%d to=%d", self.id, snapshot.metadata.index, to
        )
        self._send(MessageType.SNAPSHOT, to, snapshot=snapshot)
        return True

    def _broadcast_heartbeat(self, context: bytes) -> None:
        committed = self._log.committed
        for peer, progress in self._progress.items():
            if peer != self.id:
                # Never tell a follower to commit beyond what it is known to hold.
                commit = min(progress.match_index, committed)
                self._send(MessageType.HEARTBEAT, peer, commit=commit, context=context)

    def _send_timeout_now(self, to: int) -> None:
        self._send(MessageType.TIMEOUT_NOW, to)

    def _send(
        self,
        type: MessageType,
        to: int,
        *,
        term: int | None = None,
        log_term: int = 0,
        index: int = 0,
        entries: tuple[Entry, ...] = (),
        commit: int = 0,
        reject: bool = False,
        reject_hint: int = 0,
        snapshot: Snapshot | None = None,
        context: bytes = b"",
        transferee: int = 0,
    ) -> None:
        """Queue a message from this node: the one place that stamps `from_` and `term`
        (etcd-io/raft's `send`). Every message carries the current term, except (pre-)vote
        requests and their answers, which carry the term they are about and must name it:
        a pre-vote asks for term + 1 without taking it, and a granted vote echoes the
        candidate's term (Raft §5.2, dissertation §9.6)."""
        if type in _VOTE_TYPES:
            assert term is not None, f"{type.name} must name its term"
        else:
            assert term is None, f"{type.name} always carries the current term"
            term = self.term
        assert transferee == NONE or type is MessageType.TRANSFER_LEADER, type.name
        self._messages.append(
            Message(
                type,
                to,
                self.id,
                term,
                log_term=log_term,
                index=index,
                entries=entries,
                commit=commit,
                reject=reject,
                reject_hint=reject_hint,
                snapshot=snapshot,
                context=context,
                transferee=transferee,
            )
        )

    # === ReadIndex (dissertation §6.4) ========================================================

    def _committed_entry_in_current_term(self) -> bool:
        return self._log.term_or_zero(self._log.committed) == self.term

    def _leader_read_index(self, requester: int, context: bytes) -> None:
        if self._voters == (self.id,):
            self._answer_read(requester, self._log.committed, context)
            return
        if not self._committed_entry_in_current_term():
            # The commit index is not known to be current until an entry of our term commits.
            self._pending_read_index.append((requester, context))
            return
        self._start_read(requester, context)

    def _start_read(self, requester: int, context: bytes) -> None:
        key = self._read_only.add_request(self._log.committed, context, requester)
        self._read_only.receive_ack(self.id, key)
        self._broadcast_heartbeat(key)

    def _release_pending_read_index(self) -> None:
        if not self._pending_read_index or not self._committed_entry_in_current_term():
            return
        pending = self._pending_read_index
        self._pending_read_index = []
        for requester, context in pending:
            self._start_read(requester, context)

    def _answer_read(self, requester: int, index: int, context: bytes) -> None:
        if requester == self.id:
            self._read_states.append(ReadState(index, context))
        else:
            self._send(MessageType.READ_INDEX_RESPONSE, requester, index=index, context=context)

    # === leadership transfer (dissertation §3.10) =============================================

    def _leader_transfer(self, transferee: int) -> None:
        if transferee not in self._voters:
            logger.info("event=transfer_ignored node=%d to=%d reason=not_a_voter", self.id, transferee)
            return
        if self.lead_transferee != NONE:
            if self.lead_transferee == transferee:
                return
            self.lead_transferee = NONE
        if transferee == self.id:
            return
        # The transfer must finish within an election timeout, or it is aborted.
        self._election_elapsed = 0
        self.lead_transferee = transferee
        logger.info("event=transfer_started node=%d to=%d", self.id, transferee)
        progress = self._progress[transferee]
        if progress.match_index == self._log.last_index():
            self._send_timeout_now(transferee)
        else:
            self._send_append(transferee, progress)


def _decode_conf(entry: Entry) -> ConfState:
    """The configuration a CONF_CHANGE entry starts. Its bytes were checked by the codec
    when they came from a peer or the disk, and made by a leader's `apply_change`: a
    failure here is our own bug."""
    try:
        return confchange.decode(entry.data).conf_state
    except ValueError as exc:
        raise AssertionError(f"CONF_CHANGE entry {entry.index} does not decode: {exc}") from None
