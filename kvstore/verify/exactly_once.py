"""The exactly-once checker: no request applied twice, and a counter that adds up.

Two views of the same promise (docs/architecture.md §8, Raft dissertation §6.3):

- From the nodes: the request ids whose effects each node's state machine applied, in
  order. A retried request may sit in the log twice, but the session table must turn the
  second copy into a no-op, so it must not appear twice here. Feed this checker what was
  *applied* (e.g. the state machine's apply trace, or the session table's history), not the
  raw log.
- From the clients: a counter that every client incremented by one per request. It must
  end within [initial + acknowledged, initial + acknowledged + unknown]: below means an
  acknowledged increment was lost, above means some request was applied twice (or an
  increment that failed definitely took effect).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

NodeId = int | str
# Node ids as the caller has them (int or str); a TypeVar because Mapping keys are invariant.
_Node = TypeVar("_Node", int, str)
_SHOWN = 20


@dataclass(frozen=True, slots=True)
class DoubleApplication:
    node: NodeId
    request: Hashable  # e.g. (client_id, seq) or kvstore.kv.commands.RequestId
    count: int
    positions: tuple[int, ...]  # where in that node's applied sequence it appears


@dataclass(frozen=True, slots=True)
class CounterCheck:
    final: int
    initial: int
    acknowledged: int
    unknown: int

    @property
    def low(self) -> int:
        return self.initial + self.acknowledged

    @property
    def high(self) -> int:
        return self.initial + self.acknowledged + self.unknown

    @property
    def ok(self) -> bool:
        return self.low <= self.final <= self.high

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        detail = ""
        if self.final < self.low:
            detail = f": {self.low - self.final} acknowledged increment(s) lost"
        elif self.final > self.high:
            detail = f": {self.final - self.high} increment(s) applied more than once"
        return (
            f"counter: {verdict}, final {self.final} in [{self.low}, {self.high}]? "
            f"({self.acknowledged} acknowledged, {self.unknown} unknown){detail}"
        )


@dataclass(frozen=True, slots=True)
class ExactlyOnceResult:
    applied_requests: int
    duplicates: tuple[DoubleApplication, ...]
    counter: CounterCheck | None = None

    @property
    def ok(self) -> bool:
        return not self.duplicates and (self.counter is None or self.counter.ok)

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        lines = [
            f"exactly-once: {verdict} ({self.applied_requests} applied request id(s) checked, "
            f"{len(self.duplicates)} applied more than once)"
        ]
        for double in self.duplicates[:_SHOWN]:
            lines.append(
                f"  node {double.node}: request {double.request!r} applied {double.count} "
                f"times (positions {list(double.positions)})"
            )
        if self.counter is not None:
            lines.append("  " + self.counter.describe())
        return "\n".join(lines)


def find_double_applications(
    applied: Mapping[_Node, Iterable[Hashable | None]],
) -> list[DoubleApplication]:
    """Request ids that some node applied more than once (None = an entry without an id)."""
    doubles: list[DoubleApplication] = []
    for node, requests in applied.items():
        seen: dict[Hashable, list[int]] = {}
        for position, request in enumerate(requests):
            if request is not None:
                seen.setdefault(request, []).append(position)
        for request, positions in seen.items():
            if len(positions) > 1:
                doubles.append(DoubleApplication(node, request, len(positions), tuple(positions)))
    return doubles


def check_counter(final: int, acknowledged: int, unknown: int, *, initial: int = 0) -> CounterCheck:
    """A counter incremented by one per request ends within [acknowledged, + unknown]."""
    if acknowledged < 0 or unknown < 0:
        raise ValueError("acknowledged and unknown are counts, >= 0")
    return CounterCheck(final, initial, acknowledged, unknown)


def check_exactly_once(
    applied: Mapping[_Node, Iterable[Hashable | None]],
    counter: CounterCheck | None = None,
) -> ExactlyOnceResult:
    """No node applied a request id twice, and (if given) the counter adds up."""
    materialized = {node: list(requests) for node, requests in applied.items()}
    total = sum(sum(r is not None for r in requests) for requests in materialized.values())
    doubles = find_double_applications(materialized)
    return ExactlyOnceResult(total, tuple(doubles), counter)
