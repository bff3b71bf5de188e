"""Cluster invariants checked from the nodes' own state, after (or during) a run.

The clients' view (linearizability, lost writes) can miss damage that no read has touched
yet; these rules look inside. Inputs are plain tuples that a drill or the simulator
collects from each node (its log, its state machine, its status across restarts):

- **Log matching / state machine safety** (Raft §5.3, §5.4.3): for `committed` entries given
  as (index, term, data hash) per node, every node that has index i committed holds the
  same term and data there, and a node never reports two different entries at one index.
- **Equal digests**: for (applied index, state digest) pairs per node, equal applied indexes
  mean equal digests, across nodes and across one node's own reports (a replay after a
  restart must rebuild the same state).
- **Monotonic hard state** (Raft §5.1, figure 2: persisted term; commit index never goes
  back): a node's (term, commit index) observations, in the order taken and across
  restarts, never decrease. A term going back means a lost fsync of the hard state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

NodeId = int | str
# Node ids as the caller has them (int or str); a TypeVar because Mapping keys are invariant.
_Node = TypeVar("_Node", int, str)
DataHash = str | bytes
_SHOWN = 20


@dataclass(frozen=True, slots=True)
class InvariantViolation:
    rule: str  # "log_matching", "state_digest", "term_monotonic", "commit_monotonic"
    node: NodeId
    detail: str


@dataclass(frozen=True, slots=True)
class InvariantsResult:
    violations: tuple[InvariantViolation, ...]
    checked: tuple[str, ...]  # the rules that had input

    @property
    def ok(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        rules = ", ".join(self.checked) or "nothing"
        lines = [f"cluster invariants: {verdict} ({len(self.violations)} violation(s); {rules})"]
        lines.extend(f"  {v.rule} on node {v.node}: {v.detail}" for v in self.violations[:_SHOWN])
        return "\n".join(lines)


def check_log_matching(
    committed: Mapping[_Node, Iterable[tuple[int, int, DataHash]]],
) -> list[InvariantViolation]:
    """Every committed index holds one (term, data) across all nodes and reports."""
    first: dict[int, tuple[int, DataHash, NodeId]] = {}
    violations: list[InvariantViolation] = []
    for node, entries in committed.items():
        for index, term, data in entries:
            seen = first.setdefault(index, (term, data, node))
            if seen[:2] != (term, data):
                violations.append(
                    InvariantViolation(
                        "log_matching",
                        node,
                        f"committed index {index} holds term {term} data {_short(data)}, "
                        f"but node {seen[2]} has term {seen[0]} data {_short(seen[1])}",
                    )
                )
    return violations


def check_state_digests(
    applied: Mapping[_Node, Iterable[tuple[int, str]]],
) -> list[InvariantViolation]:
    """Equal applied indexes have equal state digests, across nodes and restarts."""
    first: dict[int, tuple[str, NodeId]] = {}
    violations: list[InvariantViolation] = []
    for node, reports in applied.items():
        for index, digest in reports:
            seen = first.setdefault(index, (digest, node))
            if seen[0] != digest:
                violations.append(
                    InvariantViolation(
                        "state_digest",
                        node,
                        f"at applied index {index} the digest is {_short(digest)}, "
                        f"but node {seen[1]} had {_short(seen[0])}",
                    )
                )
    return violations


def check_hard_state_monotonic(
    observations: Mapping[_Node, Sequence[tuple[int, int]]],
) -> list[InvariantViolation]:
    """Each node's (term, commit index), in the order observed, never goes back."""
    violations: list[InvariantViolation] = []
    for node, seen in observations.items():
        for position in range(1, len(seen)):
            (term_before, commit_before), (term, commit) = seen[position - 1], seen[position]
            if term < term_before:
                violations.append(
                    InvariantViolation(
                        "term_monotonic",
                        node,
                        f"term went back from {term_before} to {term} (observation {position})",
                    )
                )
            if commit < commit_before:
                violations.append(
                    InvariantViolation(
                        "commit_monotonic",
                        node,
                        f"commit index went back from {commit_before} to {commit} "
                        f"(observation {position})",
                    )
                )
    return violations


def check_cluster_invariants(
    *,
    committed: Mapping[_Node, Iterable[tuple[int, int, DataHash]]] | None = None,
    applied: Mapping[_Node, Iterable[tuple[int, str]]] | None = None,
    hard_states: Mapping[_Node, Sequence[tuple[int, int]]] | None = None,
) -> InvariantsResult:
    """Run every rule whose input is given; `checked` says which ran."""
    violations: list[InvariantViolation] = []
    checked: list[str] = []
    if committed is not None:
        checked.append("log matching")
        violations.extend(check_log_matching(committed))
    if applied is not None:
        checked.append("state digests")
        violations.extend(check_state_digests(applied))
    if hard_states is not None:
        checked.append("term and commit monotonic")
        violations.extend(check_hard_state_monotonic(hard_states))
    return InvariantsResult(tuple(violations), tuple(checked))


def _short(data: DataHash) -> str:
    text = data.hex() if isinstance(data, bytes) else data
    return text if len(text) <= 16 else text[:16] + "..."
