"""Safety invariants of Raft, checked incrementally while a simulation runs.

`SafetyChecker` is told what each node does (its role and term, what it persists, how far
it has committed and what it applies) and records every broken rule as a `Violation`. The
checks are incremental so they can run after every simulation step:

- Election safety (Raft §5.2): at most one leader per term, over the whole run.
- Log matching (Raft §5.3): entries with the same index and term hold the same data and
  follow entries of the same term. Checked on every persisted entry against a global table
  keyed by (index, term); by induction over indexes this gives the full property. A full
  pairwise check (`check_log_matching`) also runs at the end.
- Leader completeness (Raft §5.4): an entry committed in term T is in the log of every
  leader of a term after T. The term an entry was committed in is not observable, so we use
  the smallest term of any node that reported it committed: that bounds it from above, so
  the check never raises a false alarm.
- State machine safety (Raft §5.4.3): no two nodes apply different entries at one index, a
  node applies indexes in order, and committed entries never change.
- Commit index monotonic: within one incarnation a node's commit index never decreases,
  and the commit index it persists never decreases, across restarts too.
- Membership (dissertation §4.1): a member whose removal is committed at index r is never
  counted for anything at or after r: no leader commits an index >= r with it among its
  voters (`observe_leader_voters`). A leader whose log holds the removal does not count the
  member at all; one that counts it lacks the removal, so committing up to r would commit
  a different entry there. (A deposed leader that resumes may still commit, with the old
  configuration, an index below r that a majority of its term holds: that is no violation,
  the entry is committed either way.)
- Electability under changing membership: `check_electability` counts, for each possible
  candidate, the voters of the configuration in its own log.
- Reads (dissertation §6.4): `check_reads` — a read must reflect every write acknowledged
  before it was invoked.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvstore.errors import CompactedError, UnavailableIndexError
from kvstore.raft import confchange
from kvstore.raft.storage import Storage
from kvstore.raft.types import Entry, EntryType, HardState


class Invariant(enum.Enum):
    ELECTION_SAFETY = "election_safety"
    LOG_MATCHING = "log_matching"
    LEADER_COMPLETENESS = "leader_completeness"
    STATE_MACHINE_SAFETY = "state_machine_safety"
    COMMIT_MONOTONIC = "commit_monotonic"
    MEMBERSHIP = "membership"
    READ_FRESHNESS = "read_freshness"
    LINEARIZABILITY = "linearizability"
    # Issue 14 (kvstore/sim/coordination.py).
    TXN_ATOMICITY = "txn_atomicity"
    WATCH_HISTORY = "watch_history"
    LEASE_SAFETY = "lease_safety"


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: Invariant
    time: int
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant.value} at t={self.time}: {self.detail}"


class LogView(Protocol):
    """What the checker reads of a node's log."""

    def snapshot_index(self) -> int: ...

    def last_index(self) -> int: ...

    def last_term(self) -> int: ...

    def entries_from(self, low: int) -> Sequence[Entry]:
        """Entries in [max(low, snapshot_index + 1), last_index]."""
        ...

    def entry_at(self, index: int) -> Entry | None:
        """The entry at `index`; None when compacted away or beyond the end."""
        ...


class StorageLogView:
    """A `LogView` over the core's read-only `Storage` (what a node has persisted)."""

    __slots__ = ("_storage",)

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def snapshot_index(self) -> int:
        return self._storage.first_index() - 1

    def last_index(self) -> int:
        return self._storage.last_index()

    def last_term(self) -> int:
        return self._storage.term(self._storage.last_index())

    def entries_from(self, low: int) -> Sequence[Entry]:
        storage = self._storage
        low = max(low, storage.first_index())
        high = storage.last_index() + 1
        if low >= high:
            return []
        try:
            return storage.entries(low, high, 1 << 62)
        except (CompactedError, UnavailableIndexError):
            return []

    def entry_at(self, index: int) -> Entry | None:
        storage = self._storage
        if not storage.first_index() <= index <= storage.last_index():
            return None
        try:
            return storage.entries(index, index + 1, 1 << 62)[0]
        except (CompactedError, UnavailableIndexError):
            return None


class ListLogView:
    """A `LogView` over a plain list of entries (hand-made states in tests)."""

    __slots__ = ("_entries", "_snapshot_index", "_snapshot_term")

    def __init__(
        self, entries: Sequence[Entry], snapshot_index: int = 0, snapshot_term: int = 0
    ) -> None:
        self._entries = list(entries)
        self._snapshot_index = snapshot_index
        self._snapshot_term = snapshot_term

    def snapshot_index(self) -> int:
        return self._snapshot_index

    def last_index(self) -> int:
        return self._entries[-1].index if self._entries else self._snapshot_index

    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self._snapshot_term

    def entries_from(self, low: int) -> Sequence[Entry]:
        return [entry for entry in self._entries if entry.index >= low]

    def entry_at(self, index: int) -> Entry | None:
        found = self.entries_from(index)
        return found[0] if found and found[0].index == index else None


@dataclass(slots=True)
class _Committed:
    term: int
    data: bytes
    # The smallest term of a node that reported this entry committed: >= the commit term.
    commit_term: int


class SafetyChecker:
    """Records violations of Raft's safety rules; see the module docstring."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []
        self.now = 0
        self._leader_of_term: dict[int, int] = {}
        self._entry_identity: dict[tuple[int, int], tuple[int | None, bytes]] = {}
        self._committed: dict[int, _Committed] = {}
        self._max_committed = 0
        # Current leaders: node -> (term, log). Invariant: checked against every committed
        # entry with a smaller commit term when it took office or when the entry appeared.
        self._leaders: dict[int, tuple[int, LogView]] = {}
        self._commit: dict[int, int] = {}
        self._persisted_commit: dict[int, int] = {}
        self._applied: dict[int, tuple[int, bytes]] = {}
        self._applied_index: dict[int, int] = {}
        self._state_digest: dict[int, str] = {}
        # Members whose removal is committed, with the index of the removal.
        self._removed: dict[int, int] = {}

    def _violate(self, invariant: Invariant, detail: str) -> None:
        self.violations.append(Violation(invariant, self.now, detail))

    # --- elections and leader completeness ---------------------------------------------

    def observe_role(self, node: int, term: int, is_leader: bool, log: LogView) -> None:
        """Call after every step for every live node."""
        if not is_leader:
            self._leaders.pop(node, None)
            return
        known = self._leader_of_term.setdefault(term, node)
        if known != node:
            self._violate(
                Invariant.ELECTION_SAFETY, f"nodes {known} and {node} both lead term {term}"
            )
        current = self._leaders.get(node)
        if current is not None and current[0] == term:
            return
        self._leaders[node] = (term, log)
        self._check_leader_has_committed(node, term, log)

    def _check_leader_has_committed(self, node: int, term: int, log: LogView) -> None:
        first = log.snapshot_index() + 1
        have = {entry.index: entry for entry in log.entries_from(first)}
        for index, committed in self._committed.items():
            if committed.commit_term >= term or index < first:
                continue
            self._check_contains(node, term, index, committed, have.get(index))

    def _check_contains(
        self, node: int, term: int, index: int, committed: _Committed, entry: Entry | None
    ) -> None:
        if entry is None or entry.term != committed.term or entry.data != committed.data:
            found = "nothing" if entry is None else f"term {entry.term}"
            self._violate(
                Invariant.LEADER_COMPLETENESS,
                f"leader {node} of term {term} lacks entry {index} (term {committed.term}, "
                f"committed by term <= {committed.commit_term}); its log has {found}",
            )

    # --- persistence: log matching and persisted commit --------------------------------

    def observe_persisted(
        self,
        node: int,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        prev_term: int | None,
    ) -> None:
        """A node durably saved `entries` (consecutive) whose predecessor has `prev_term`
        (None when unknown, e.g. compacted away)."""
        if hard_state is not None:
            before = self._persisted_commit.get(node, 0)
            if hard_state.commit < before:
                self._violate(
                    Invariant.COMMIT_MONOTONIC,
                    f"node {node} persisted commit {hard_state.commit} after {before}",
                )
            self._persisted_commit[node] = max(before, hard_state.commit)
        previous = prev_term
        for entry in entries:
            self._check_identity(node, entry, previous)
            previous = entry.term

    def _check_identity(self, node: int, entry: Entry, previous: int | None) -> None:
        key = (entry.index, entry.term)
        known = self._entry_identity.get(key)
        if known is None:
            self._entry_identity[key] = (previous, entry.data)
            return
        known_previous, known_data = known
        if known_data != entry.data or (
            previous is not None and known_previous is not None and known_previous != previous
        ):
            self._violate(
                Invariant.LOG_MATCHING,
                f"node {node} entry {entry.index} term {entry.term}: previous term "
                f"{previous} data {entry.data!r}, elsewhere previous term {known_previous} "
                f"data {known_data!r}",
            )
        elif known_previous is None and previous is not None:
            self._entry_identity[key] = (previous, entry.data)

    def observe_restart(self, node: int, persisted_commit: int) -> None:
        """A node restarted from its storage, whose hard state has `persisted_commit`."""
        before = self._persisted_commit.get(node, 0)
        if persisted_commit < before:
            self._violate(
                Invariant.COMMIT_MONOTONIC,
                f"node {node} restarted with commit {persisted_commit}, persisted {before}",
            )
        self._commit[node] = persisted_commit
        self._applied_index.pop(node, None)

    # --- commitment ----------------------------------------------------------------------

    def observe_commit(self, node: int, term: int, commit_index: int, log: LogView) -> None:
        """The node's in-memory commit index, observed after its Ready was persisted."""
        before = self._commit.get(node, 0)
        if commit_index < before:
            self._violate(
                Invariant.COMMIT_MONOTONIC,
                f"node {node} commit index went from {before} to {commit_index}",
            )
            return
        self._commit[node] = commit_index
        if commit_index == before:
            return
        for entry in log.entries_from(before + 1):
            if entry.index > commit_index:
                break
            self._record_committed(node, term, entry)

    def _record_committed(self, node: int, term: int, entry: Entry) -> None:
        known = self._committed.get(entry.index)
        if known is None:
            known = _Committed(entry.term, entry.data, term)
            self._committed[entry.index] = known
            self._max_committed = max(self._max_committed, entry.index)
            if entry.type is EntryType.CONF_CHANGE:
                record = confchange.decode(entry.data)
                if record.change.type is confchange.ConfChangeType.REMOVE:
                    self._removed.setdefault(record.change.node_id, entry.index)
        elif known.term != entry.term or known.data != entry.data:
            self._violate(
                Invariant.STATE_MACHINE_SAFETY,
                f"node {node} committed entry {entry.index} term {entry.term}, but term "
                f"{known.term} was committed there before",
            )
            return
        elif term < known.commit_term:
            known.commit_term = term
        else:
            return
        for leader, (leader_term, leader_log) in sorted(self._leaders.items()):
            if leader_term > known.commit_term and entry.index > leader_log.snapshot_index():
                found = leader_log.entry_at(entry.index)
                self._check_contains(leader, leader_term, entry.index, known, found)

    def observe_leader_voters(
        self, node: int, term: int, voters: Sequence[int], commit_index: int
    ) -> None:
        """A leader's commit index is `commit_index`, counted over `voters`."""
        for voter in voters:
            removed_at = self._removed.get(voter)
            if removed_at is not None and commit_index >= removed_at:
                self._violate(
                    Invariant.MEMBERSHIP,
                    f"leader {node} of term {term} commits up to {commit_index} counting "
                    f"node {voter}, whose removal committed at index {removed_at}",
                )

    # --- application ---------------------------------------------------------------------

    def observe_applied(self, node: int, entry: Entry) -> None:
        """A node applied `entry` to its state machine."""
        last = self._applied_index.get(node)
        if last is not None and entry.index != last + 1:
            self._violate(
                Invariant.STATE_MACHINE_SAFETY,
                f"node {node} applied index {entry.index} right after {last}",
            )
        self._applied_index[node] = entry.index
        identity = (entry.term, entry.data)
        known = self._applied.setdefault(entry.index, identity)
        if known != identity:
            self._violate(
                Invariant.STATE_MACHINE_SAFETY,
                f"node {node} applied entry {entry.index} term {entry.term} data "
                f"{entry.data!r}; another node applied term {known[0]} data {known[1]!r}",
            )

    def observe_state(self, node: int, index: int, digest: str) -> None:
        """A node's whole state machine at applied `index` (after a snapshot restore, or
        whenever it is cheap to compute) hashes to `digest`."""
        known = self._state_digest.setdefault(index, digest)
        if known != digest:
            self._violate(
                Invariant.STATE_MACHINE_SAFETY,
                f"node {node} state at index {index} differs from another node's",
            )

    def observe_restored(self, node: int, index: int) -> None:
        """A node's state machine was replaced by a snapshot at `index`."""
        self._applied_index[node] = index

    def check_electability(
        self, logs: Mapping[int, LogView], voters_of: Mapping[int, Sequence[int]] | None = None
    ) -> None:
        """No node lacking a committed entry can win an election (Raft §5.4.1, Figure 8).

        Raft grants a vote only to a candidate whose log is at least as up-to-date (last
        term, then last index) as the voter's. A committed entry sits, with an entry of its
        committing term after it, on a majority that never loses it; so a node lacking it has
        a less up-to-date log than that majority, and the voters it could win are a minority.
        `logs` are all nodes' persisted logs, crashed ones included (they restart with them).
        `voters_of` gives each node's configuration (from its own log): a node is a
        candidate only if it is a voter there, and needs a majority of those voters; without
        it every node is a voter of one configuration of all of them.
        Checking this as a state invariant catches the Figure 8 hazard when it is created,
        not only in the rare run where an election then overwrites the entry.
        """
        index = self._max_committed
        if index == 0:
            return
        committed = self._committed[index]
        last = {node: (log.last_term(), log.last_index()) for node, log in logs.items()}
        for node, log in sorted(logs.items()):
            voters_here = tuple(logs) if voters_of is None else tuple(voters_of.get(node, ()))
            if node not in voters_here:
                continue
            majority = len(voters_here) // 2 + 1
            if log.snapshot_index() >= index:
                continue
            entry = log.entry_at(index)
            if entry is not None and entry.term == committed.term:
                continue
            voters = sorted(
                other
                for other in voters_here
                if other in last and last[other] <= last[node]
            )
            if len(voters) >= majority:
                self._violate(
                    Invariant.LEADER_COMPLETENESS,
                    f"node {node} lacks committed entry {index} (term {committed.term}) yet "
                    f"its log (last term {last[node][0]}, index {last[node][1]}) is as "
                    f"up-to-date as those of {voters}, a majority that could elect it",
                )
                return

    def committed_count(self) -> int:
        return len(self._committed)


def check_log_matching(logs: Mapping[int, LogView], now: int = 0) -> list[Violation]:
    """The whole log matching property over every pair of logs (Raft §5.3): if two logs
    hold an entry with the same index and term, they agree on every entry up to it."""
    violations: list[Violation] = []
    tables = {
        node: {entry.index: entry for entry in log.entries_from(1)}
        for node, log in sorted(logs.items())
    }
    nodes = sorted(tables)
    for position, a in enumerate(nodes):
        for b in nodes[position + 1 :]:
            problem = _compare_logs(tables[a], tables[b])
            if problem:
                violations.append(
                    Violation(Invariant.LOG_MATCHING, now, f"nodes {a} and {b}: {problem}")
                )
    return violations


def _compare_logs(a: Mapping[int, Entry], b: Mapping[int, Entry]) -> str | None:
    common = sorted(set(a) & set(b), reverse=True)
    matching = False  # once an index matches in term, every earlier one must match fully
    for index in common:
        left, right = a[index], b[index]
        if left.term == right.term:
            if left.data != right.data:
                return f"entry {index} term {left.term} holds different data"
            matching = True
        elif matching:
            return f"entry {index} differs (terms {left.term}, {right.term}) below a match"
    return None


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """A write as the checker sees it: its key, its log index, and when it was
    acknowledged to the client (None if it never was)."""

    key: str
    index: int
    acked_at: int | None


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """A completed linearizable read: the log index of the write whose value it returned
    (0 when it found the key absent)."""

    key: str
    invoked_at: int
    returned_at: int
    value_index: int


def check_reads(
    reads: Iterable[ReadRecord], writes: Iterable[WriteRecord], now: int = 0
) -> list[Violation]:
    """Every read reflects each write to its key acknowledged before the read was invoked
    (values are unique, so the value read names the write it came from)."""
    acked: dict[str, list[tuple[int, int]]] = {}
    for write in writes:
        if write.acked_at is not None:
            acked.setdefault(write.key, []).append((write.acked_at, write.index))
    violations: list[Violation] = []
    for read in reads:
        newest = max(
            (index for at, index in acked.get(read.key, ()) if at < read.invoked_at), default=0
        )
        if read.value_index < newest:
            violations.append(
                Violation(
                    Invariant.READ_FRESHNESS,
                    now,
                    f"read of {read.key!r} invoked at t={read.invoked_at} returned the write "
                    f"at index {read.value_index}, but the write at index {newest} was "
                    f"acknowledged before it",
                )
            )
    return violations
