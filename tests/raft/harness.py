"""A tiny deterministic network of RawNodes for the core's tests.

Each node has a MemoryStorage; `stabilize()` drives every node's Ready in the order the
contract requires (persist, then send, then apply, then advance) and delivers messages until
the network is quiet. Tests cut links, drop message types or intercept messages to build the
histories they need. No wall clock, no threads.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import replace

from kvstore.raft.config import RaftConfig
from kvstore.raft.node import RawNode
from kvstore.raft.types import Entry, Message, MessageType, ReadState, Role
from kvstore.storage.memory import MemoryStorage

MessageFilter = Callable[[Message], bool]
MessageTransform = Callable[[Message], Message]


class Cluster:
    def __init__(self, ids: Iterable[int] = (1, 2, 3), *, seed: int = 0, **config: object) -> None:
        self.ids = tuple(ids)
        self.rng = random.Random(seed)
        self.config_overrides = config
        self.storages: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RawNode] = {}
        self.applied: dict[int, list[Entry]] = {}
        self.read_states: dict[int, list[ReadState]] = {}
        self.queue: list[Message] = []
        self.cut: set[tuple[int, int]] = set()
        self.down: set[int] = set()
        self.filters: list[MessageFilter] = []
        self.transforms: list[MessageTransform] = []
        self.sent: list[Message] = []
        self.snapshots_installed: list[tuple[int, int]] = []
        self.starts: dict[int, int] = {}
        # Nodes started to join an existing cluster (no bootstrap configuration).
        self.joining: set[int] = set()
        for node_id in self.ids:
            self.storages[node_id] = MemoryStorage()
            self.applied[node_id] = []
            self.read_states[node_id] = []
            self.start(node_id)

    def make_config(self, node_id: int) -> RaftConfig:
        peers = () if node_id in self.joining else tuple(i for i in self.ids if i not in self.joining)
        base = RaftConfig(id=node_id, peers=peers)
        return replace(base, **self.config_overrides)  # type: ignore[arg-type]

    def start(self, node_id: int, applied: int = 0) -> None:
        """(Re)start a node from its storage. Each start gets a differently seeded rng, as
        every real start does (ReadIndex contexts depend on it); runs still replay."""
        config = replace(self.make_config(node_id), applied=applied)
        starts = self.starts.get(node_id, 0)
        self.starts[node_id] = starts + 1
        rng = random.Random(node_id) if starts == 0 else random.Random(f"{node_id}/{starts}")
        self.nodes[node_id] = RawNode(config, self.storages[node_id], rng)
        self.down.discard(node_id)

    def add_node(self, node_id: int) -> None:
        """Start a node that joins the existing cluster: empty storage, no configuration
        (the leader must add it as a learner for it to hear anything)."""
        self.ids = (*self.ids, node_id)
        self.joining.add(node_id)
        self.storages[node_id] = MemoryStorage()
        self.applied[node_id] = []
        self.read_states[node_id] = []
        self.start(node_id)

    def crash(self, node_id: int) -> None:
        """Lose the node's volatile state; storage (what it persisted) survives."""
        self.down.add(node_id)
        del self.nodes[node_id]

    # --- driving ------------------------------------------------------------------------

    def process_ready(self, node_id: int) -> bool:
        node = self.nodes[node_id]
        if not node.has_ready():
            return False
        ready = node.ready()
        storage = self.storages[node_id]
        storage.save(ready.hard_state, ready.entries, ready.snapshot)
        self.queue.extend(ready.messages)
        if ready.snapshot is not None:
            self.snapshots_installed.append((node_id, ready.snapshot.metadata.index))
        self.applied[node_id].extend(ready.committed_entries)
        self.read_states[node_id].extend(ready.read_states)
        node.advance(ready)
        return True

    def deliver(self, message: Message) -> None:
        self.sent.append(message)
        delivered = self._deliver(message)
        if message.type is MessageType.SNAPSHOT and message.from_ in self.nodes:
            # The transport reports the outcome of a snapshot send, as the server's does.
            self.nodes[message.from_].report_snapshot(message.to, delivered)

    def _deliver(self, message: Message) -> bool:
        if message.to in self.down or message.from_ in self.down or message.to not in self.nodes:
            return False
        if (message.from_, message.to) in self.cut:
            return False
        if any(not keep(message) for keep in self.filters):
            return False
        for transform in self.transforms:
            message = transform(message)
        self.nodes[message.to].step(message)
        return True

    def stabilize(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            progressed = False
            for node_id in self.ids:
                if node_id not in self.down:
                    progressed |= self.process_ready(node_id)
            if self.queue:
                queue, self.queue = self.queue, []
                for message in queue:
                    self.deliver(message)
                progressed = True
            if not progressed:
                return
        raise AssertionError("network did not stabilize")

    def tick(self, ticks: int = 1, ids: Iterable[int] | None = None) -> None:
        for _ in range(ticks):
            for node_id in ids if ids is not None else self.ids:
                if node_id not in self.down:
                    self.nodes[node_id].tick()
            self.stabilize()

    def elect(self, node_id: int) -> None:
        self.nodes[node_id].campaign()
        self.stabilize()
        assert self.nodes[node_id].role is Role.LEADER, self.nodes[node_id].status()

    def propose(self, node_id: int, data: bytes) -> None:
        self.nodes[node_id].propose(data)
        self.stabilize()

    # --- partitions ---------------------------------------------------------------------

    def isolate(self, node_id: int) -> None:
        for other in self.ids:
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def partition(self, *groups: Iterable[int]) -> None:
        sets = [set(group) for group in groups]
        for a in self.ids:
            for b in self.ids:
                if a != b and not any(a in group and b in group for group in sets):
                    self.cut.add((a, b))

    def heal(self) -> None:
        self.cut.clear()
        self.filters.clear()
        self.transforms.clear()

    def drop_types(self, *types: MessageType) -> None:
        dropped = set(types)
        self.filters.append(lambda message: message.type not in dropped)

    # --- queries ------------------------------------------------------------------------

    def leaders(self) -> list[int]:
        return [i for i, node in self.nodes.items() if node.role is Role.LEADER]

    def data_applied(self, node_id: int) -> list[bytes]:
        return [entry.data for entry in self.applied[node_id] if entry.data]
