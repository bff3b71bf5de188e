"""Coordination workloads in the simulator: transactions, watchers and leases, with their
invariants (issue 14). Enabled by `SimConfig.coordination`.

- **Transactions.** A client proposes transactions that write a pair of keys `p<i>/a` and
  `p<i>/b` to one value, or delete the prefix `p<i>/` (both go), on the node it believes
  leads. Atomicity: after every Ready, on every node, each pair's two keys are both absent
  or hold the same value (`check_pairs`); a transaction applied halfway would break it.
- **Watchers.** Each watcher follows one node's revision history (kvstore.kv.history) the
  way the server streams it (whole revisions from its next revision on) and moves to another
  node, from the same next revision, when its node crashes (the client library's rule). At
  the end its events must equal the committed history from its start revision (replayed
  from the applied log on a fresh state machine): nothing missed, repeated, reordered or
  uncommitted. A watcher whose next revision was compacted starts a new segment from the
  node's oldest revision (a real watcher gets `revision_compacted`); each segment is checked.
- **Leases.** A client grants leases, attaches a key to each, and keeps them alive through
  the node it believes leads: a keepalive is a ReadIndex on that node, acknowledged when the
  read state comes back there and that node's `LeaseKeeper` (the server's, kvstore.kv.leases)
  renews the lease; then sometimes it stops (its process "dies"). Every node runs a keeper
  as the server does: promoted when it becomes leader, demoted otherwise, told of grants and
  revocations as it applies them, and a leader proposes `LeaseRevoke(expired=True)` for
  what its keeper finds expired. Invariant: no such revocation is proposed before the
  lease's TTL has run since the client *sent* the last keepalive that was acknowledged (or
  the grant). Counting from the acknowledgement instead is not safe, and this simulator
  found why: a leader paused with its ReadIndex confirmation in its inbox acknowledges a
  keepalive after a newer leader was elected, whose full TTL runs from its election.

Time is the simulation's virtual time (one unit stands for a millisecond in the keeper);
randomness is the `random.Random` given; nothing here reads a clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.kv.commands import (
    KeyValue,
    Put,
    RequestId,
    decode_commands,
    encode_command,
)
from kvstore.kv.history import HistoryConfig
from kvstore.kv.leases import LeaseGrant, LeaseKeeper, LeaseRevoke
from kvstore.kv.state_machine import KvConfig, StateMachine
from kvstore.kv.txn import Txn, TxnDelete, TxnPut
from kvstore.raft.types import Entry, EntryType, ReadState, Role
from kvstore.sim.invariants import Invariant, Violation

PAIRS = 3
LEASE_TTL = 300
KEEPALIVE_EVERY = LEASE_TTL // 3
# A leader retries a revocation not applied after this long.
REVOKE_RETRY = 200


class CoordinationNode(Protocol):
    """What this module needs from a simulated node."""

    id: int
    role: Role
    leader_id: int

    @property
    def up(self) -> bool: ...

    @property
    def stalled(self) -> bool: ...

    @property
    def machine(self) -> StateMachine | None: ...


Propose = Callable[[int, bytes], bool]
ReadIndex = Callable[[int], bytes | None]


@dataclass(slots=True)
class _Segment:
    node: int
    start: int
    next_revision: int
    events: list[tuple[int, str, str, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class _Watcher:
    prefix: str
    segments: list[_Segment] = field(default_factory=list)


@dataclass(slots=True)
class _Lease:
    ttl: int
    key: str
    # When the client sent the grant or the newest keepalive that was acknowledged.
    acknowledged_at: int
    lease_id: int = 0
    alive: bool = True
    next_keepalive: int = 0
    pending_context: bytes | None = None
    pending_node: int = 0
    pending_sent_at: int = 0
    # The read index of the pending keepalive's ReadIndex, once its node answered.
    pending_index: int | None = None
    key_put: bool = False


def kv_config(rng: random.Random) -> KvConfig:
    """A small history, so compaction (and watchers behind it) happens in short runs."""
    return KvConfig(history=HistoryConfig(revisions_max=rng.choice((20, 50, 200, 10_000))))


class CoordinationWorkload:
    """See the module docstring."""

    def __init__(self, node_ids: Iterable[int], rng: random.Random) -> None:
        self._rng = rng
        self._node_ids = tuple(node_ids)
        self.keepers = {node: LeaseKeeper() for node in self._node_ids}
        self._seq = 0
        self._next_action = rng.randint(5, 50)
        self._leader_guess = rng.choice(self._node_ids)
        self.watchers = [_Watcher(prefix) for prefix in ("", "p0/", "lease/")]
        self._leases: dict[str, _Lease] = {}  # by the grant's request seq
        self._lease_by_id: dict[int, _Lease] = {}
        self.violations: list[Violation] = []
        self.applied: dict[int, Entry] = {}
        self._revokes_applied: set[int] = set()
        self.revocations = 0
        self.keepalives_acked = 0
        self.txns = 0

    # --- driving ---------------------------------------------------------------------------

    def next_time(self) -> int:
        return self._next_action

    def act(self, now: int, nodes: Mapping[int, CoordinationNode], propose: Propose,
            read_index: ReadIndex) -> list[str]:  # fmt: skip
        """Due client actions and leaders' expiry checks; returns trace events."""
        events: list[str] = []
        self._expire(now, nodes, propose, events)
        if now < self._next_action:
            return events
        self._next_action = now + self._rng.randint(5, 40)
        node = self._choose(nodes)
        roll = self._rng.random()
        if roll < 0.45:
            events.append(self._txn(node, now, propose))
        elif roll < 0.55 and self._live_leases(now) < 3:
            events.append(self._grant(node, now, propose))
        for lease in self._leases.values():
            if lease.lease_id and lease.alive and not lease.key_put:
                request = self._request()
                # Unique values: the register workload tells writes apart by value.
                value = f"held-{request.seq}".encode()
                put = Put(lease.key, value, request, now, lease=lease.lease_id)
                lease.key_put = propose(node, encode_command(put))
            if lease.lease_id and lease.alive and lease.next_keepalive <= now:
                self._keepalive(lease, nodes, now, read_index, events)
        return events

    def _live_leases(self, now: int) -> int:
        """Leases alive, counting a grant not yet applied for a while (it may be lost)."""
        return sum(
            lease.alive and (lease.lease_id > 0 or now - lease.acknowledged_at < 1000)
            for lease in self._leases.values()
        )

    def _choose(self, nodes: Mapping[int, CoordinationNode]) -> int:
        guess = self._leader_guess
        if not nodes[guess].up or self._rng.random() < 0.2:
            guess = self._rng.choice(self._node_ids)
        hint = nodes[guess].leader_id if nodes[guess].up else 0
        self._leader_guess = hint or guess
        return self._leader_guess

    def _request(self) -> RequestId:
        self._seq += 1
        return RequestId("coord", self._seq)

    def _txn(self, node: int, now: int, propose: Propose) -> str:
        pair = self._rng.randrange(PAIRS)
        request = self._request()
        if self._rng.random() < 0.2:
            ops: tuple[TxnPut | TxnDelete, ...] = (TxnDelete(f"p{pair}/", prefix=True),)
        else:
            value = f"t{request.seq}".encode()
            ops = (TxnPut(f"p{pair}/a", value), TxnPut(f"p{pair}/b", value))
        propose(node, encode_command(Txn((), ops, (), request, now)))
        self.txns += 1
        return f"txn n{node} p{pair} seq={request.seq}"

    def _grant(self, node: int, now: int, propose: Propose) -> str:
        request = self._request()
        lease = _Lease(LEASE_TTL, f"lease/{request.seq}", acknowledged_at=now)
        self._leases[f"coord:{request.seq}"] = lease
        lease.alive = propose(node, encode_command(LeaseGrant(0, LEASE_TTL, request, now)))
        return f"lease grant n{node} seq={request.seq}"

    def _keepalive(
        self,
        lease: _Lease,
        nodes: Mapping[int, CoordinationNode],
        now: int,
        read_index: ReadIndex,
        events: list[str],
    ) -> None:
        if self._rng.random() < 0.03:
            lease.alive = False  # the holder's process dies: keepalives stop
            events.append(f"lease {lease.lease_id} holder stops")
            return
        node = self._choose(nodes)
        context = read_index(node)
        lease.next_keepalive = now + KEEPALIVE_EVERY
        if context is not None:
            lease.pending_context, lease.pending_node = context, node
            lease.pending_sent_at, lease.pending_index = now, None

    def on_read_states(self, node: CoordinationNode, read_states: Iterable[ReadState],
                       now: int) -> None:  # fmt: skip
        """A keepalive's ReadIndex came back on `node`: it is served once the node applied
        up to the read index (`serve_keepalives`), as the server's read barrier does."""
        indexes = {state.context: state.index for state in read_states}
        for lease in self._leases.values():
            context = lease.pending_context
            if lease.pending_node == node.id and context is not None and context in indexes:
                lease.pending_context, lease.pending_index = None, indexes[context]

    def serve_keepalives(self, nodes: Mapping[int, CoordinationNode], now: int) -> None:
        """The leader renews a lease once its keepalive's read index is applied there (an
        expiry committed before it is then applied first, and the renewal refused)."""
        for lease in self._leases.values():
            index = lease.pending_index
            if index is None:
                continue
            node = nodes[lease.pending_node]
            machine = node.machine
            if machine is None or machine.applied_index < index:
                continue
            lease.pending_index = None
            if not node.up or node.stalled or node.role is not Role.LEADER:
                continue
            if self.keepers[node.id].keepalive(lease.lease_id, now) is not None:
                # Counted from when the keepalive was sent, as the client library counts:
                # leadership was confirmed after that, not necessarily at `now` (a leader
                # paused with the confirmation in its inbox acknowledges it late).
                lease.acknowledged_at = max(lease.acknowledged_at, lease.pending_sent_at)
                self.keepalives_acked += 1

    def _expire(self, now: int, nodes: Mapping[int, CoordinationNode], propose: Propose,
                events: list[str]) -> None:  # fmt: skip
        for node_id, keeper in self.keepers.items():
            node = nodes[node_id]
            if not node.up or node.stalled or node.role is not Role.LEADER:
                continue  # a frozen process proposes nothing
            for lease_id in keeper.expired(now, REVOKE_RETRY):
                propose(node_id, encode_command(
                    LeaseRevoke(lease_id, None, now, expired=True)))  # fmt: skip
                self.revocations += 1
                events.append(f"lease expire n{node_id} {lease_id}")

    # --- what the nodes report -------------------------------------------------------------

    def on_role(self, node: CoordinationNode, now: int) -> None:
        """After every Ready: keep the node's keeper in step with its role."""
        keeper = self.keepers[node.id]
        leading = node.up and node.role is Role.LEADER and node.machine is not None
        if leading and not keeper.active:
            assert node.machine is not None
            keeper.promote(node.machine.leases, now)
        elif not leading and keeper.active:
            keeper.demote()

    def on_applied(self, node: CoordinationNode, entry: Entry, now: int) -> None:
        self.applied.setdefault(entry.index, entry)
        if entry.type != EntryType.NORMAL or not entry.data:
            return
        commands = decode_commands(entry.data)
        if len(commands) != 1:
            return  # a batch: puts and deletes only, nothing of a lease
        command = commands[0]
        keeper = self.keepers[node.id]
        machine = node.machine
        if isinstance(command, LeaseGrant) and command.request is not None:
            assert machine is not None
            lease = self._leases.get(str(command.request))
            granted = entry.index if machine.leases.get(entry.index) is not None else 0
            if granted:
                keeper.granted(granted, command.ttl_ms, now)
            if lease is not None and granted and not lease.lease_id:
                # `acknowledged_at` stays the time the grant was sent.
                lease.lease_id = granted
                lease.next_keepalive = now + KEEPALIVE_EVERY
                self._lease_by_id[granted] = lease
        elif isinstance(command, LeaseRevoke):
            keeper.revoked(command.lease_id)
            lease = self._lease_by_id.get(command.lease_id)
            first = entry.index not in self._revokes_applied
            self._revokes_applied.add(entry.index)
            if lease is not None and command.expired and first and lease.alive:
                self._check_expiry(lease, command, now)
            if lease is not None:
                lease.alive = False

    def _check_expiry(self, lease: _Lease, command: LeaseRevoke, now: int) -> None:
        """An expiry takes effect: it must have been proposed (at `time_ms`) no earlier
        than the TTL after the send of the last keepalive acknowledged before now."""
        if command.time_ms < lease.acknowledged_at + lease.ttl:
            self.violations.append(
                Violation(
                    Invariant.LEASE_SAFETY,
                    now,
                    f"lease {command.lease_id} expired by a revocation proposed at "
                    f"t={command.time_ms}, before its TTL {lease.ttl} after the keepalive "
                    f"sent at t={lease.acknowledged_at} (acknowledged)",
                )
            )

    def check_pairs(self, node: CoordinationNode, now: int) -> None:
        machine = node.machine
        if machine is None:
            return
        for pair in range(PAIRS):
            a, b = machine.get(f"p{pair}/a"), machine.get(f"p{pair}/b")
            if _value(a) != _value(b) or (a and b and a.mod_revision != b.mod_revision):
                self.violations.append(
                    Violation(
                        Invariant.TXN_ATOMICITY,
                        now,
                        f"node {node.id} at index {machine.applied_index}: p{pair}/a "
                        f"{_value(a)!r} but p{pair}/b {_value(b)!r}",
                    )
                )

    def pull_watchers(self, nodes: Mapping[int, CoordinationNode]) -> None:
        """Each watcher takes what its node has applied since its next revision."""
        for watcher in self.watchers:
            segment = watcher.segments[-1] if watcher.segments else None
            if segment is None or not nodes[segment.node].up:
                choices = [n for n in self._node_ids if nodes[n].up]
                if not choices:
                    continue
                node = nodes[self._rng.choice(choices)]
                if segment is None:
                    machine = node.machine
                    assert machine is not None
                    start = machine.revision + 1
                    segment = _Segment(node.id, start, start)
                    watcher.segments.append(segment)
                else:
                    segment.node = node.id
            machine = nodes[segment.node].machine
            if machine is None:
                continue
            history = machine.history
            if segment.next_revision <= history.compacted:
                segment = _Segment(segment.node, history.oldest, history.oldest)
                watcher.segments.append(segment)
            for event in history.since(segment.next_revision):
                if event.kv.key.startswith(watcher.prefix):
                    segment.events.append(
                        (event.revision, event.type, event.kv.key, event.kv.value)
                    )
            segment.next_revision = max(segment.next_revision, machine.revision + 1)

    # --- the final check -------------------------------------------------------------------

    def check_watchers(self, now: int) -> list[Violation]:
        """Every watcher's segments against the committed history from their start."""
        reference = _replay(self.applied)
        violations = list(self.violations)
        last_revision = reference[-1][0] if reference else 0
        for number, watcher in enumerate(self.watchers):
            for segment in watcher.segments:
                expected = [
                    event
                    for event in reference
                    if event[0] >= segment.start and event[2].startswith(watcher.prefix)
                ]
                seen = [event for event in segment.events if event[0] <= last_revision]
                if seen != expected[: len(seen)]:
                    violations.append(
                        Violation(
                            Invariant.WATCH_HISTORY,
                            now,
                            f"watcher {number} ({watcher.prefix!r}) from revision "
                            f"{segment.start}: got {_first_difference(seen, expected)}",
                        )
                    )
        return violations


def _value(kv: KeyValue | None) -> bytes | None:
    return None if kv is None else kv.value


def _replay(applied: dict[int, Entry]) -> list[tuple[int, str, str, bytes]]:
    """The committed history: the applied entries 1..n (contiguous) on a fresh machine."""
    machine = StateMachine(KvConfig(history=HistoryConfig(revisions_max=1 << 40,
                                                          bytes_max=1 << 50)))  # fmt: skip
    index = 1
    while index in applied:
        machine.apply(applied[index])
        index += 1
    return [
        (event.revision, event.type, event.kv.key, event.kv.value)
        for event in machine.history.since(1)
    ]


def _first_difference(
    seen: list[tuple[int, str, str, bytes]], expected: list[tuple[int, str, str, bytes]]
) -> str:
    for position, (got, want) in enumerate(zip(seen, expected)):
        if got != want:
            return f"event {position} {got}, expected {want}"
    return f"{len(seen)} events, but only {len(expected)} committed"
