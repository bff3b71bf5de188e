"""The simulated network between nodes: delay, loss, duplication, reordering and partitions.

Messages are scheduled in a heap ordered by (delivery time, sequence number), so delivery
order is a pure function of the seed: two messages with random delays overtake each other
(reordering), a message may be dropped or delivered twice, and a partition blocks directed
links. Every decision draws from the one `random.Random` the simulation hands in.

Rules that hold here:
- A link is checked twice: when a message is sent and again when it would be delivered, so a
  partition that starts while a message is in flight also cuts that message.
- A message to a node that is down when it arrives is lost (the connection is gone).
- Partitions are sets of blocked *directed* links, so one-way (asymmetric) partitions are as
  easy to express as symmetric ones; `heal()` unblocks everything.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvstore.raft.types import Message


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkConfig:
    """How unreliable the network is. Times are in simulated time units."""

    delay_min: int = 1
    delay_max: int = 10
    drop_probability: float = 0.02
    duplicate_probability: float = 0.02

    def __post_init__(self) -> None:
        if not 0 <= self.delay_min <= self.delay_max:
            raise ValueError("delay_min must satisfy 0 <= delay_min <= delay_max")
        for name in ("drop_probability", "duplicate_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class NetworkStats:
    sent: int
    delivered: int
    dropped: int
    duplicated: int
    blocked: int


class Network:
    """Directed links between node ids, with faults; see the module docstring."""

    def __init__(self, node_ids: Iterable[int], config: NetworkConfig, rng: random.Random):
        self.node_ids: tuple[int, ...] = tuple(sorted(node_ids))
        self.config = config
        self._rng = rng
        # Invariant: heap entries are (deliver_at, sequence, message); sequence is unique.
        self._queue: list[tuple[int, int, Message]] = []
        self._sequence = 0
        self._blocked: set[tuple[int, int]] = set()
        self._sent = 0
        self._delivered = 0
        self._dropped = 0
        self._duplicated = 0
        self._blocked_count = 0
        # Called with each message the network loses (the sender may want to know, e.g.
        # a snapshot that never arrived must be reported as failed).
        self.on_drop: Callable[[Message], None] | None = None

    def add_node(self, node: int) -> None:
        """A node joins (a membership change): partitions made from now on include it."""
        if node not in self.node_ids:
            self.node_ids = tuple(sorted((*self.node_ids, node)))

    # --- links and partitions ----------------------------------------------------------

    def can_send(self, source: int, destination: int) -> bool:
        return (source, destination) not in self._blocked

    def blocked_links(self) -> frozenset[tuple[int, int]]:
        return frozenset(self._blocked)

    def heal(self) -> None:
        """Remove every partition."""
        self._blocked.clear()

    def block(self, source: int, destination: int) -> None:
        """Cut the one-way link source -> destination."""
        if source != destination:
            self._blocked.add((source, destination))

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Symmetric partition: nodes talk only within their group. Nodes not named in any
        group form one more group of their own."""
        group_of: dict[int, int] = {}
        for number, group in enumerate(groups):
            for node in group:
                group_of[node] = number
        rest = -1
        for source in self.node_ids:
            for destination in self.node_ids:
                if group_of.get(source, rest) != group_of.get(destination, rest):
                    self.block(source, destination)

    def partition_one_way(self, sources: Iterable[int], destinations: Iterable[int]) -> None:
        """Asymmetric partition: messages from `sources` to `destinations` are lost, while
        the other direction still works."""
        for source in sources:
            for destination in destinations:
                self.block(source, destination)

    def partition_bridge(self, left: Iterable[int], bridge: int, right: Iterable[int]) -> None:
        """Two halves that cannot reach each other, both connected to one `bridge` node."""
        left_ids, right_ids = set(left), set(right)
        assert bridge not in left_ids and bridge not in right_ids
        for a in sorted(left_ids):
            for b in sorted(right_ids):
                self.block(a, b)
                self.block(b, a)

    def isolate(self, node: int) -> None:
        """Cut a node off from everyone, both ways."""
        others = [other for other in self.node_ids if other != node]
        self.partition_one_way([node], others)
        self.partition_one_way(others, [node])

    # --- sending and delivering --------------------------------------------------------

    def send(self, message: Message, now: int) -> None:
        """Accept a message from a node; it arrives later, maybe twice, maybe never."""
        self._sent += 1
        if not self.can_send(message.from_, message.to):
            self._blocked_count += 1
            self._drop(message)
            return
        config = self.config
        if config.drop_probability and self._rng.random() < config.drop_probability:
            self._drop(message)
            return
        self._schedule(message, now)
        if config.duplicate_probability and self._rng.random() < config.duplicate_probability:
            self._duplicated += 1
            self._schedule(message, now)

    def _schedule(self, message: Message, now: int) -> None:
        delay = self._rng.randint(self.config.delay_min, self.config.delay_max)
        self._sequence += 1
        heapq.heappush(self._queue, (now + delay, self._sequence, message))

    def _drop(self, message: Message) -> None:
        self._dropped += 1
        if self.on_drop is not None:
            self.on_drop(message)

    def requeue(self, message: Message, at: int) -> None:
        """Hold a message that arrived at a paused node until `at` (its bytes wait in the
        socket buffer; order among held messages is kept)."""
        self._sequence += 1
        heapq.heappush(self._queue, (at, self._sequence, message))

    def next_delivery_time(self) -> int | None:
        return self._queue[0][0] if self._queue else None

    def deliver_due(self, now: int, is_up: Callable[[int], bool]) -> list[Message]:
        """Every message due at or before `now`, in delivery order; messages whose link has
        been cut meanwhile, or whose destination is down, are lost."""
        due: list[Message] = []
        queue = self._queue
        while queue and queue[0][0] <= now:
            _, _, message = heapq.heappop(queue)
            if not self.can_send(message.from_, message.to):
                self._blocked_count += 1
                self._drop(message)
            elif not is_up(message.to):
                self._drop(message)
            else:
                self._delivered += 1
                due.append(message)
        return due

    def in_flight(self) -> int:
        return len(self._queue)

    def stats(self) -> NetworkStats:
        return NetworkStats(
            sent=self._sent,
            delivered=self._delivered,
            dropped=self._dropped,
            duplicated=self._duplicated,
            blocked=self._blocked_count,
        )
