"""Simulated clients: writes proposed through Raft and ReadIndex reads, recorded as a history.

Each client is one process of the history format (kvstore/verify/history.py) with at most one operation
in flight. A write is proposed on the node the client believes leads; it is acknowledged when
that node applies it (as the server answers once its state machine applied the entry), and
its outcome becomes unknown if the node crashes or the operation times out first; after an
unknown outcome the client continues as a new process. A read asks a node (leader or
follower) for a ReadIndex and is served from that node's state machine once its applied index
reaches the read index. Write values are unique, so a read names the write it saw.

The workload draws only from the `random.Random` it is given and reads time from its caller.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.raft.types import Entry, ReadState
from kvstore.sim.invariants import ReadRecord, WriteRecord
from kvstore.verify.history import Operation, OpKind


class Target(Protocol):
    """What the workload needs from the simulated cluster."""

    def is_up(self, node: int) -> bool: ...

    def leader_of(self, node: int) -> int:
        """The leader `node` knows of (0 when none, or when `node` is down)."""
        ...

    def propose_write(self, node: int, data: bytes) -> bool:
        """Propose a write on `node` (the cluster may put it in one entry with others);
        False when the node refused it (not the leader, down)."""
        ...

    def read_index(self, node: int) -> bytes | None:
        """Ask `node` for a ReadIndex: the context its answer will carry (made by the node's
        core, as for the server's reads), or None when it refused at once."""
        ...

    def applied_index(self, node: int) -> int: ...

    def read_value(self, node: int, key: str) -> str | None:
        """The value of `key` in `node`'s state machine now (None when absent)."""
        ...

    def encode_put(self, client: int, seq: int, key: str, value: str) -> bytes: ...

    def decode_puts(self, data: bytes) -> list[tuple[str, str]]:
        """(key, value) of each put of an entry (several for a batch; none for anything
        else)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadConfig:
    clients: int = 3
    keys: int = 3
    read_fraction: float = 0.4
    # Time between a client's operations, and how long it waits for one to finish.
    think_min: int = 5
    think_max: int = 60
    timeout: int = 600


@dataclass(slots=True)
class _Pending:
    process: int
    kind: OpKind
    key: str
    value: str | None
    node: int
    invoke: int
    deadline: int
    context: bytes = b""
    read_index: int | None = None


@dataclass(slots=True)
class _Client:
    number: int
    process: int
    next_time: int
    leader_guess: int
    seq: int = 0
    pending: _Pending | None = None


@dataclass(slots=True)
class WorkloadStats:
    writes_acked: int = 0
    writes_unknown: int = 0
    writes_refused: int = 0
    reads_ok: int = 0
    reads_failed: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Workload:
    """Clients that write and read through the simulated cluster; see the module docstring."""

    def __init__(self, config: WorkloadConfig, node_ids: Sequence[int], rng: random.Random):
        self.config = config
        self._rng = rng
        self._node_ids = tuple(node_ids)
        self._clients = [
            _Client(number, number, rng.randint(0, config.think_max), rng.choice(node_ids))
            for number in range(1, config.clients + 1)
        ]
        self._next_process = config.clients + 1
        self._writes: dict[str, _Pending] = {}  # value -> pending write
        self._reads: dict[bytes, _Pending] = {}  # context -> pending read
        self.history: list[Operation] = []
        self.stats = WorkloadStats()
        # Everything learned about writes, for `check_reads`.
        self._write_key: dict[str, str] = {}
        self._write_index: dict[str, int] = {}
        self._write_acked: dict[str, int] = {}
        self._read_records: list[tuple[str, int, int, str | None]] = []
        self.enabled = True
        self.duplicate_applies: list[tuple[str, int, int]] = []

    # --- driving -------------------------------------------------------------------------

    def next_time(self) -> int | None:
        times = [c.next_time for c in self._clients if c.pending is None and self.enabled]
        times.extend(p.deadline for p in self._pending())
        return min(times) if times else None

    def _pending(self) -> list[_Pending]:
        return [c.pending for c in self._clients if c.pending is not None]

    def act(self, now: int, target: Target) -> list[str]:
        """Invoke operations that are due and time out late ones; returns trace events."""
        events: list[str] = []
        for client in self._clients:
            pending = client.pending
            if pending is not None and pending.deadline <= now:
                events.append(f"timeout {pending.process} {pending.kind.value}")
                self._give_up(client, now)
            if client.pending is None and self.enabled and client.next_time <= now:
                events.append(self._invoke(client, now, target))
        return events

    def _choose_node(self, client: _Client, target: Target) -> int:
        guess = client.leader_guess
        if self._rng.random() < 0.2 or not target.is_up(guess):
            guess = self._rng.choice(self._node_ids)
        return guess

    def _invoke(self, client: _Client, now: int, target: Target) -> str:
        node = self._choose_node(client, target)
        key = f"k{self._rng.randrange(self.config.keys)}"
        deadline = now + self.config.timeout
        if self._rng.random() < self.config.read_fraction:
            context = target.read_index(node)
            pending = _Pending(client.process, OpKind.GET, key, None, node, now, deadline)
            if context is None:
                self._refused(client, pending, now, target)
                return f"read refused {client.process} n{node}"
            pending.context = context
            self._reads[context] = pending
            client.pending = pending
            return f"read {client.process} n{node} {key}"
        client.seq += 1
        value = f"c{client.number}-{client.seq}"
        pending = _Pending(client.process, OpKind.PUT, key, value, node, now, deadline)
        self._write_key[value] = key
        if not target.propose_write(node, target.encode_put(client.number, client.seq, key, value)):
            self._refused(client, pending, now, target)
            return f"write refused {client.process} n{node}"
        self._writes[value] = pending
        client.pending = pending
        return f"write {client.process} n{node} {key}={value}"

    def _refused(self, client: _Client, pending: _Pending, now: int, target: Target) -> None:
        """A definite failure: the node refused before anything was proposed."""
        if pending.kind is OpKind.PUT:
            self.stats.writes_refused += 1
        else:
            self.stats.reads_failed += 1
        self._record(pending, now, ok=False, output=None)
        hint = target.leader_of(pending.node)
        client.leader_guess = hint if hint else self._rng.choice(self._node_ids)
        client.next_time = now + self._rng.randint(self.config.think_min, self.config.think_max)

    def _give_up(self, client: _Client, now: int) -> None:
        pending = client.pending
        assert pending is not None
        client.pending = None
        client.next_time = now + self._rng.randint(self.config.think_min, self.config.think_max)
        client.leader_guess = self._rng.choice(self._node_ids)
        if pending.kind is OpKind.GET:
            self._reads.pop(pending.context, None)
            self.stats.reads_failed += 1
            self._record(pending, now, ok=False, output=None)
            return
        assert pending.value is not None
        self._writes.pop(pending.value, None)
        self.stats.writes_unknown += 1
        self._record(pending, None, ok=False, output=None)
        client.process = self._next_process  # after an unknown outcome: a new process
        self._next_process += 1

    def _complete(self, pending: _Pending, now: int, output: str | None) -> None:
        for client in self._clients:
            if client.pending is pending:
                client.pending = None
                client.leader_guess = pending.node
                think = self._rng.randint(self.config.think_min, self.config.think_max)
                client.next_time = now + think
        self._record(pending, now, ok=True, output=output)

    def _record(
        self, pending: _Pending, returned: int | None, *, ok: bool, output: str | None
    ) -> None:
        self.history.append(
            Operation(
                process=pending.process,
                op=pending.kind,
                key=pending.key,
                value=pending.value,
                expected=None,
                invoke=pending.invoke,
                return_=returned,
                ok=ok,
                output=output,
            )
        )

    # --- what the cluster reports ----------------------------------------------------------

    def on_applied(self, node: int, entry: Entry, now: int, target: Target) -> None:
        for _, value in target.decode_puts(entry.data):
            self._on_write_applied(node, entry.index, value, now)

    def _on_write_applied(self, node: int, index: int, value: str, now: int) -> None:
        first = self._write_index.setdefault(value, index)
        if first != index:
            # Each value is proposed once (or twice in one batch entry, as a retry), so
            # applying it at two indexes means the core duplicated a proposal.
            self.duplicate_applies.append((value, first, index))
        pending = self._writes.get(value)
        if pending is not None and pending.node == node:
            del self._writes[value]
            self._write_acked[value] = now
            self.stats.writes_acked += 1
            self._complete(pending, now, None)

    def on_read_state(self, node: int, read_state: ReadState) -> None:
        pending = self._reads.get(read_state.context)
        if pending is not None and pending.node == node and pending.read_index is None:
            pending.read_index = read_state.index

    def serve_reads(self, node: int, now: int, target: Target) -> None:
        """Serve the node's reads whose read index its state machine has reached."""
        if not self._reads:
            return
        applied = target.applied_index(node)
        for context, pending in list(self._reads.items()):
            if pending.node != node or pending.read_index is None:
                continue
            if applied >= pending.read_index:
                del self._reads[context]
                output = target.read_value(node, pending.key)
                self._read_records.append((pending.key, pending.invoke, now, output))
                self.stats.reads_ok += 1
                self._complete(pending, now, output)

    def on_crash(self, node: int, now: int) -> None:
        """The node died: its clients' connections break (outcomes unknown for writes)."""
        for client in self._clients:
            if client.pending is not None and client.pending.node == node:
                self._give_up(client, now)

    def finish(self, now: int) -> None:
        for client in self._clients:
            if client.pending is not None:
                self._give_up(client, now)

    # --- for the checkers --------------------------------------------------------------------

    def write_records(self) -> list[WriteRecord]:
        return [
            WriteRecord(key, self._write_index[value], self._write_acked.get(value))
            for value, key in sorted(self._write_key.items())
            if value in self._write_index
        ]

    def read_records(self) -> list[ReadRecord]:
        """Completed reads; a value whose write was never seen applied gets index -1 (and a
        read of such a value would itself be a safety problem the checkers report)."""
        records = []
        for key, invoked, returned, output in self._read_records:
            index = 0 if output is None else self._write_index.get(output, -1)
            records.append(ReadRecord(key, invoked, returned, index))
        return records

    def acknowledged_values(self) -> set[str]:
        return set(self._write_acked)
