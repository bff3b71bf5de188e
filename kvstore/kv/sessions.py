"""The replicated client session table that makes writes exactly-once (dissertation §6.3).

For each client id the table remembers the results of its recent requests by seq, so a retry
of a request that was already applied gets the first answer back and applies nothing. The
table is part of the replicated state: it changes only through `apply` of log entries and is
carried in snapshots, so every replica holds the same table at the same applied index.

Bounds (all deterministic: they depend only on the applied log, never on a local clock):
- per client, everything below the client's `acked_below` is dropped (the client said it has
  those answers); at most `max_results_per_session` results are kept (the newest seqs). The
  seqs of dropped results are remembered compactly as ranges ("forgotten": applied, answer
  gone), at most `max_results_per_session` ranges, beyond which the oldest ranges go too;
- at most `max_sessions` clients and `max_results_total` results + ranges overall; beyond
  that the least recently active client is evicted;
- a client idle longer than `session_ttl_ms` is expired. Time is the largest `time_ms`
  applied so far (the proposing leader's clock carried in each command), never a node's own.

Each session keeps a floor, `discarded_below`: every seq below it is either answered-and-
forgotten or will never be applied. A request with such a seq, or one in a forgotten range,
is refused with `WriteError.SESSION_EXPIRED` instead of being applied a second time. A seq
above the floor that is neither answered nor forgotten was never applied and applies now, so a
request that stalled (its leader died) while newer ones filled the window still applies once.

Known limitation: a request from a client whose whole session was expired or evicted cannot
be told apart from one of a new client, and would be applied again. The TTL is generous (an
hour by default) and the client count bounded so memory stays finite; a client that retries
for longer than the TTL loses exactly-once for that request.

Invariants:
- every seq >= discarded_below that was applied has its result in `results` or lies in a
  forgotten range, never both;
- `seqs` is `results`' keys in ascending order;
- the session dict is ordered by `last_active_ms` (least recently active first), because a
  session is moved to the end whenever it is touched, at the current (monotone) clock.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import ProtocolError
from kvstore.kv.commands import KeyValue, RequestId, WriteError, WriteResult
from kvstore.kv.txn import outcome_from_obj, outcome_to_obj


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Bounds of the session table. Must be the same on every replica: they decide what the
    replicated state holds, so replicas with different bounds would diverge."""

    session_ttl_ms: int = 3_600_000
    max_sessions: int = 10_000
    max_results_per_session: int = 1_000
    max_results_total: int = 200_000

    def __post_init__(self) -> None:
        for name in (
            "session_ttl_ms",
            "max_sessions",
            "max_results_per_session",
            "max_results_total",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_results_total < 2 * self.max_results_per_session:
            # A session holds up to max_results_per_session results and as many ranges.
            raise ValueError("max_results_total must be >= 2 * max_results_per_session")


@dataclass(slots=True)
class Session:
    """One client's recent answers. Mutable: it lives inside the state machine only."""

    client_id: str
    last_active_ms: int
    # Invariant: seqs below this are never applied (again); see the module docstring.
    discarded_below: int = 0
    results: dict[int, WriteResult] = field(default_factory=dict)
    # Invariant: sorted(results), all >= discarded_below.
    seqs: list[int] = field(default_factory=list)
    # Seqs that were applied but whose results were dropped to respect the per-session
    # bound, as half-open ranges [starts[i], ends[i]): sorted, disjoint, never adjacent
    # (merged), all >= discarded_below, disjoint from `results`. A client's seqs are mostly
    # consecutive, so this stays a few ranges even when thousands of results were dropped,
    # and a slow request far below the newest ones is not refused just because newer ones
    # pushed its neighbours' answers out.
    forgotten_starts: list[int] = field(default_factory=list)
    forgotten_ends: list[int] = field(default_factory=list)

    def size(self) -> int:
        """What this session counts against the table's bounds: results + ranges."""
        return len(self.results) + len(self.forgotten_starts)

    def is_forgotten(self, seq: int) -> bool:
        position = bisect.bisect_right(self.forgotten_starts, seq) - 1
        return position >= 0 and seq < self.forgotten_ends[position]

    def drop_below(self, seq: int) -> None:
        """Forget everything about seqs below `seq`: they will be refused from now on."""
        if seq <= self.discarded_below:
            return
        self.discarded_below = seq
        cut = bisect.bisect_left(self.seqs, seq)
        for old in self.seqs[:cut]:
            del self.results[old]
        del self.seqs[:cut]
        starts, ends = self.forgotten_starts, self.forgotten_ends
        cut = bisect.bisect_right(ends, seq)
        del starts[:cut], ends[:cut]
        if starts and starts[0] < seq:
            starts[0] = seq

    def add(self, seq: int, result: WriteResult) -> None:
        assert seq >= self.discarded_below and seq not in self.results
        assert not self.is_forgotten(seq)
        self.results[seq] = result
        if not self.seqs or seq > self.seqs[-1]:
            self.seqs.append(seq)
        else:
            bisect.insort(self.seqs, seq)

    def trim(self, max_entries: int) -> None:
        """Keep at most `max_entries` results (the newest seqs) and as many ranges."""
        while len(self.seqs) > max_entries:
            oldest = self.seqs.pop(0)
            del self.results[oldest]
            self._forget(oldest)
        if len(self.forgotten_starts) > max_entries:
            # A client that leaves many holes: give up remembering the oldest ranges.
            self.drop_below(self.forgotten_ends[-max_entries - 1])

    def _forget(self, seq: int) -> None:
        starts, ends = self.forgotten_starts, self.forgotten_ends
        position = bisect.bisect_right(starts, seq)
        merge_left = position > 0 and ends[position - 1] == seq
        merge_right = position < len(starts) and starts[position] == seq + 1
        if merge_left and merge_right:
            ends[position - 1] = ends[position]
            del starts[position], ends[position]
        elif merge_left:
            ends[position - 1] = seq + 1
        elif merge_right:
            starts[position] = seq
        else:
            starts.insert(position, seq)
            ends.insert(position, seq + 1)


class SessionTable:
    """The per-client session table. Used by `StateMachine` only, inside `apply`."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        # Ordered least recently active first (see the module invariant).
        self._sessions: dict[str, Session] = {}
        # Invariant: the sum of session.size() over all sessions.
        self._entry_count = 0

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def entry_count(self) -> int:
        """Results and forgotten ranges held, over all sessions (bounded by
        `max_results_total`)."""
        return self._entry_count

    def get(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def expire(self, clock_ms: int) -> None:
        """Expire every session idle for longer than the TTL at `clock_ms`."""
        deadline = clock_ms - self.config.session_ttl_ms
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.last_active_ms >= deadline:
                return
            self._evict(oldest.client_id)

    def lookup(self, request: RequestId) -> WriteResult | WriteError | None:
        """Without changing anything: the recorded answer of `request`, SESSION_EXPIRED if
        its seq is below what the session remembers, or None (not applied yet / unknown)."""
        session = self._sessions.get(request.client_id)
        if session is None:
            return None
        result = session.results.get(request.seq)
        if result is not None:
            return result
        if request.seq < session.discarded_below or session.is_forgotten(request.seq):
            return WriteError.SESSION_EXPIRED
        return None

    def begin(
        self, request: RequestId, acked_below: int, clock_ms: int
    ) -> WriteResult | WriteError | None:
        """Start applying `request`: touch its session (creating it), drop what the client
        acknowledged, then answer as `lookup` does. None means: apply it, then `record`."""
        session = self._sessions.pop(request.client_id, None)
        if session is None:
            session = Session(client_id=request.client_id, last_active_ms=clock_ms)
        session.last_active_ms = clock_ms
        self._sessions[request.client_id] = session  # now the most recently active
        size = session.size()
        session.drop_below(acked_below)
        self._entry_count += session.size() - size
        self._evict_over_bounds(keep=request.client_id)
        return self.lookup(request)

    def record(self, request: RequestId, result: WriteResult) -> None:
        """Remember the answer of a request that `begin` let through."""
        session = self._sessions[request.client_id]
        size = session.size()
        session.add(request.seq, result)
        session.trim(self.config.max_results_per_session)
        self._entry_count += session.size() - size
        self._evict_over_bounds(keep=request.client_id)

    def _evict_over_bounds(self, keep: str) -> None:
        while (
            len(self._sessions) > self.config.max_sessions
            or self._entry_count > self.config.max_results_total
        ):
            oldest = next(iter(self._sessions))
            assert oldest != keep, "max_results_total >= 2 * max_results_per_session"
            self._evict(oldest)

    def _evict(self, client_id: str) -> None:
        session = self._sessions.pop(client_id)
        self._entry_count -= session.size()

    def check_invariants(self) -> None:
        """Assert the module's invariants (tests and the simulator; O(size))."""
        count = 0
        last_active = -1
        for client_id, session in self._sessions.items():
            assert client_id == session.client_id
            assert session.last_active_ms >= last_active, "sessions out of activity order"
            last_active = session.last_active_ms
            assert session.seqs == sorted(session.results)
            assert all(seq >= session.discarded_below for seq in session.seqs)
            starts, ends = session.forgotten_starts, session.forgotten_ends
            assert len(starts) == len(ends)
            bounds = [bound for pair in zip(starts, ends) for bound in pair]
            assert all(a < b for a, b in itertools.pairwise(bounds)), "ranges overlap or touch"
            assert not starts or starts[0] >= session.discarded_below
            assert not any(session.is_forgotten(seq) for seq in session.seqs)
            assert len(session.seqs) <= self.config.max_results_per_session
            assert len(starts) <= self.config.max_results_per_session
            count += session.size()
        assert count == self._entry_count
        assert len(self._sessions) <= self.config.max_sessions
        assert count <= self.config.max_results_total

    # --- snapshot encoding -------------------------------------------------------------

    def to_obj(self) -> list[Any]:
        """A canonical python structure (sessions in activity order, results by seq)."""
        return [
            [
                session.client_id,
                session.last_active_ms,
                session.discarded_below,
                [[seq, result_to_obj(session.results[seq])] for seq in session.seqs],
                [
                    bound
                    for pair in zip(session.forgotten_starts, session.forgotten_ends)
                    for bound in pair
                ],
            ]
            for session in self._sessions.values()
        ]

    def load_obj(self, obj: Any) -> None:
        """Replace the table by one decoded from `to_obj`'s structure; ProtocolError if bad."""
        if not isinstance(obj, list):
            raise ProtocolError("sessions: expected an array")
        sessions: dict[str, Session] = {}
        count = 0
        for item in obj:
            session = _session_from_obj(item)
            if session.client_id in sessions:
                raise ProtocolError(f"sessions: duplicate client {session.client_id!r}")
            sessions[session.client_id] = session
            count += session.size()
        self._sessions = sessions
        self._entry_count = count


def _session_from_obj(obj: Any) -> Session:
    if not isinstance(obj, list) or len(obj) != 5:
        raise ProtocolError("session: expected an array of 5")
    client_id, last_active_ms, discarded_below, results, forgotten = obj
    if not isinstance(client_id, str):
        raise ProtocolError("session: client id is not a string")
    _expect_count(last_active_ms, "session.last_active_ms")
    _expect_count(discarded_below, "session.discarded_below")
    if not isinstance(results, list):
        raise ProtocolError("session: results is not an array")
    session = Session(
        client_id=client_id, last_active_ms=last_active_ms, discarded_below=discarded_below
    )
    for pair in results:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ProtocolError("session: result entry is not a pair")
        seq, result = pair
        _expect_count(seq, "session.seq")
        if seq < discarded_below or (session.seqs and seq <= session.seqs[-1]):
            raise ProtocolError("session: result seqs out of order or below the floor")
        session.add(seq, result_from_obj(result))
    _load_forgotten(session, forgotten)
    return session


def _load_forgotten(session: Session, flat: Any) -> None:
    if not isinstance(flat, list) or len(flat) % 2:
        raise ProtocolError("session: forgotten ranges must be a flat array of pairs")
    previous_end = session.discarded_below - 1  # so the first range may start at the floor
    for position in range(0, len(flat), 2):
        start, end = flat[position], flat[position + 1]
        _expect_count(start, "session.forgotten")
        _expect_count(end, "session.forgotten")
        if not previous_end < start < end:
            raise ProtocolError("session: forgotten ranges unsorted, empty or adjacent")
        session.forgotten_starts.append(start)
        session.forgotten_ends.append(end)
        previous_end = end
    if any(session.is_forgotten(seq) for seq in session.seqs):
        raise ProtocolError("session: a seq is both answered and forgotten")


# --- result encoding --------------------------------------------------------------------


def key_value_to_obj(kv: KeyValue) -> list[Any]:
    return [kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version]


def key_value_from_obj(obj: Any) -> KeyValue:
    if not isinstance(obj, list) or len(obj) != 5:
        raise ProtocolError("key value: expected an array of 5")
    key, value, create_revision, mod_revision, version = obj
    if not isinstance(key, str) or not key or not isinstance(value, bytes):
        raise ProtocolError("key value: key must be a non-empty string and value bytes")
    _expect_count(create_revision, "key_value.create_revision")
    _expect_count(mod_revision, "key_value.mod_revision")
    _expect_count(version, "key_value.version")
    return KeyValue(key, value, create_revision, mod_revision, version)


def result_to_obj(result: WriteResult) -> list[Any]:
    """[ok, revision, key_value, prev, error], then [deleted, lease_id, txn] only when one of
    those is set (so results of puts and deletes encode as they always did)."""
    obj = [
        result.ok,
        result.revision,
        None if result.key_value is None else key_value_to_obj(result.key_value),
        None if result.prev is None else key_value_to_obj(result.prev),
        result.error,
    ]
    if result.deleted or result.lease_id or result.txn is not None:
        outcome = None if result.txn is None else outcome_to_obj(result.txn)
        obj.extend((result.deleted, result.lease_id, outcome))
    return obj


def result_from_obj(obj: Any) -> WriteResult:
    if not isinstance(obj, list) or len(obj) not in (5, 8):
        raise ProtocolError("result: expected an array of 5 or 8")
    deleted, lease_id, txn = 0, 0, None
    if len(obj) == 8:
        deleted, lease_id, outcome = obj[5:]
        _expect_count(deleted, "result.deleted")
        _expect_count(lease_id, "result.lease_id")
        txn = None if outcome is None else outcome_from_obj(outcome)
    ok, revision, key_value, prev, error = obj[:5]
    if not isinstance(ok, bool):
        raise ProtocolError("result.ok is not a bool")
    _expect_count(revision, "result.revision")
    if error is not None and error not in {e.value for e in WriteError}:
        raise ProtocolError(f"result.error is unknown: {error!r}")
    return WriteResult(
        ok=ok,
        revision=revision,
        key_value=None if key_value is None else key_value_from_obj(key_value),
        prev=None if prev is None else key_value_from_obj(prev),
        error=error,
        txn=txn,
        deleted=deleted,
        lease_id=lease_id,
    )


def _expect_count(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{what}: expected a non-negative integer, got {value!r}")
