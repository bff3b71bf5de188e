"""A linearizability checker for the key-value model (get, put, cas, delete, append).

The search is Wing and Gong's, with Lowe's memoization, as Porcupine does it: the history
becomes a doubly linked list of call and return events in time order; the search repeatedly
picks a call that precedes the first remaining return, applies it to the model and "lifts"
it (with its return) out of the list; reaching a return whose call is still in the list is a
dead end, and the search backtracks. A set of visited (linearized operations as a bitset,
model state) pairs cuts every subtree that has been seen before: a pair is only ever seen
again after its first visit failed, because the bitset grows along any path.

Rules that make it sound and fast (each keeps the verdict of the definition; a test checks
them against a brute-force search):

- Keys are independent (linearizability is local, Herlihy and Wing): each key is checked
  alone with a scalar state, unless `partition_by_key=False` asks for one search over the
  whole map (slower; used to test the search itself).
- An unknown outcome (`return` None) returns at infinity: it may take effect at any point
  after its call, including after every observation (which is the same as never). An
  unknown get constrains nothing and is dropped, as is every `ok: false` operation. Once
  every operation with a finite return is placed, the rest are unknown writes, valid in
  any order at the end: the search stops there.
- Unknown writes are tightened before the search (`_bound_unknowns`): one whose unique
  value was read must precede its first reader's return; one whose value nobody observed
  is dropped unless a failed cas or a delete that found the key may follow it.
- A *read-only* operation (a get, a cas that failed its comparison, a delete of an absent
  key) changes no state whatever the state is. If one can go next, putting it next is never
  worse than putting it later: it only drops a constraint and no other operation sees a
  difference. So the search takes it at once and never tries alternatives at that depth.
- An unknown write that would change nothing where it stands is never placed there: it can
  always go at the end instead. Unknown puts of unobserved values are interchangeable, so
  only the first one that can go next is tried at each depth.
- Each depth tries operations with a finite return before unknown writes, and a failed
  configuration also rules out every later one with the same finite operations placed,
  the same state and more unknown writes placed (those could have gone at the end).
- A time budget is a `deadline` callable (True when time is up) that the caller builds
  from its own clock, e.g. `deadline_after(time.monotonic, 30.0)`: this module reads no
  clock. A search that runs out of time reports TIMED_OUT, which callers treat as failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kvstore.verify.history import Operation, OpKind, Output, Value, validate_history

# Compiled operation kinds: small ints compare faster than enum members in the hot loop.
_GET, _PUT, _CAS, _DELETE, _APPEND = range(5)
_KIND_CODES = {
    OpKind.GET: _GET,
    OpKind.PUT: _PUT,
    OpKind.CAS: _CAS,
    OpKind.DELETE: _DELETE,
    OpKind.APPEND: _APPEND,
}
_INVALID = object()  # step() result: the operation cannot go next in this state
_DONE = object()  # next() default: a search has finished
_END = -1  # the end of the event list
_QUANTUM = 512  # search steps a key gets before the next key's turn (and a deadline check)
_SHOWN_LINEARIZED = 6  # how many of the last linearized operations an explanation shows


class Verdict(StrEnum):
    OK = "ok"
    VIOLATION = "violation"
    TIMED_OUT = "timed_out"  # the time budget ran out: a failure, never a pass
    UNCHECKED = "unchecked"  # not searched to the end because another key already failed


@dataclass(frozen=True, slots=True)
class Explanation:
    """Where the search got stuck: the longest prefix it could linearize, and what was left.

    `linearized` holds the last few operations of that prefix (`linearized_count` in all);
    `state` is the model state after them; `stuck` are the operations that could have gone
    next by real time and none of which fits (or leads anywhere).
    """

    key: str | None
    linearized_count: int
    linearized: tuple[Operation, ...]
    state: object
    stuck: tuple[Operation, ...]

    def describe(self) -> str:
        where = "the whole history" if self.key is None else f"key {self.key!r}"
        lines = [
            f"{where}: no linearization extends past {self.linearized_count} operation(s); "
            f"state then {self.state!r}"
        ]
        if self.linearized:
            lines.append("  last linearized:")
            lines.extend(f"    {op.describe()}" for op in self.linearized)
        lines.append("  none of these can go next:")
        lines.extend(f"    {op.describe()}" for op in self.stuck)
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class KeyResult:
    """The verdict for one key (or for the whole history when not partitioned)."""

    key: str | None
    verdict: Verdict
    operations: int
    explanation: Explanation | None = None


@dataclass(frozen=True, slots=True)
class LinearizabilityResult:
    """Verdicts per key. The run passes only if every key is OK."""

    keys: tuple[KeyResult, ...]
    dropped: int = 0  # failed operations and unknown reads, which constrain nothing
    violations: tuple[KeyResult, ...] = field(init=False)
    timed_out: tuple[KeyResult, ...] = field(init=False)

    def __post_init__(self) -> None:
        bad = tuple(k for k in self.keys if k.verdict is Verdict.VIOLATION)
        late = tuple(k for k in self.keys if k.verdict is Verdict.TIMED_OUT)
        object.__setattr__(self, "violations", bad)
        object.__setattr__(self, "timed_out", late)

    @property
    def verdict(self) -> Verdict:
        """VIOLATION if any key has one; otherwise TIMED_OUT unless every key is OK."""
        if self.violations:
            return Verdict.VIOLATION
        if all(k.verdict is Verdict.OK for k in self.keys):
            return Verdict.OK
        return Verdict.TIMED_OUT

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    def describe(self) -> str:
        checked = sum(k.operations for k in self.keys)
        head = (
            f"linearizability: {self.verdict.value} ({len(self.keys)} key(s), "
            f"{checked} operation(s) checked, {self.dropped} dropped)"
        )
        lines = [head]
        for key_result in self.violations:
            assert key_result.explanation is not None
            lines.append(key_result.explanation.describe())
        if self.timed_out:
            names = ", ".join(repr(k.key) for k in self.timed_out)
            lines.append(f"timed out (counts as a failure) on: {names}")
        unchecked = [repr(k.key) for k in self.keys if k.verdict is Verdict.UNCHECKED]
        if unchecked:
            lines.append(f"not searched to the end after the violation: {', '.join(unchecked)}")
        return "\n".join(lines)


def deadline_after(clock: Callable[[], float], seconds: float) -> Callable[[], bool]:
    """A deadline callable for `check_linearizability`, from the caller's clock."""
    end = clock() + seconds
    return lambda: clock() >= end


def check_linearizability(
    history: Sequence[Operation],
    *,
    initial: Value = None,
    partition_by_key: bool = True,
    deadline: Callable[[], bool] | None = None,
    max_steps: int | None = None,
    stop_at_first_violation: bool = True,
) -> LinearizabilityResult:
    """Check that `history` is linearizable for a key-value map whose keys start `initial`.

    The keys' searches take turns (a few hundred steps each), as Porcupine runs them in
    parallel, so one hard key cannot hide an easy violation on another. With
    `stop_at_first_violation` (the default) the first violation ends the check and the keys
    still being searched are UNCHECKED. When `deadline()` turns true, every key still being
    searched is TIMED_OUT. `deadline` is called once per round (a round gives each key still
    being searched up to 512 search steps), never per step. `max_steps` is a deterministic
    budget instead (or as well): the search steps of all keys together, counted in whole
    quanta of 512, after which the keys still being searched are TIMED_OUT.

    Raises HistoryError if the history breaks a rule of the format (`validate_history`).
    """
    validate_history(history)
    by_key: dict[str, list[Operation]] = {}
    for op in history:
        if _constrains(op):
            by_key.setdefault(op.key, []).append(op)
    reduced = {key: _bound_unknowns(ops, initial) for key, ops in by_key.items()}
    kept = sum(len(timed) for timed in reduced.values())
    if partition_by_key:
        groups: list[tuple[str | None, list[_Timed]]] = list(reduced.items())
    else:
        groups = [(None, [timed for ops in reduced.values() for timed in ops])]
    searches = [_Search(key, timed, initial) for key, timed in groups]
    running = [(search, search.run()) for search in searches]
    expired = deadline if deadline is not None else _never
    budget: float = max_steps if max_steps is not None else _INFINITY
    stop: Verdict | None = None
    while running and stop is None:
        still: list[tuple[_Search, Iterator[None]]] = []
        for search, steps in running:
            if next(steps, _DONE) is not _DONE:
                budget -= _QUANTUM
                still.append((search, steps))
            elif stop_at_first_violation and search.result.verdict is Verdict.VIOLATION:
                stop = Verdict.UNCHECKED
        running = still
        if running and stop is None and (budget <= 0 or expired()):
            stop = Verdict.TIMED_OUT
    for search, _ in running:
        assert stop is not None
        search.result = KeyResult(search.key, stop, len(search.operations))
    return LinearizabilityResult(tuple(s.result for s in searches), len(history) - kept)


def _never() -> bool:
    return False


def _constrains(op: Operation) -> bool:
    """False for operations that cannot affect the verdict: failures and unknown reads."""
    if op.return_ is None:
        return op.op is not OpKind.GET
    return op.ok


class _Unobserved:
    """The state after an unknown write of a value that no operation observed.

    No get read such a value and no cas expected it, so every operation behaves the same
    whichever of them wrote it: one token for all of them lets the memo see equal states.
    """

    def __repr__(self) -> str:
        return "<a value nobody observed>"


_UNOBSERVED = _Unobserved()
_INFINITY = float("inf")


@dataclass(frozen=True, slots=True)
class _Timed:
    """An operation prepared for the search."""

    op: Operation
    end: float  # by when it must have taken effect: its return, or inf when unknown
    unobserved: bool  # an unknown write of a value nobody observed


def _bound_unknowns(operations: list[Operation], initial: Value) -> list[_Timed]:
    """Prepare one key's operations, tightening or dropping unknown writes where sound.

    Appends are left alone (their pieces show inside later values). For an unknown put or
    cas of value V (other than `initial`):

    - If only it writes V and a get read V (or a cas expecting V succeeded), it must take
      effect before the first such observer returns: that is its end, not infinity.
    - If nothing observed V (no get read it, no cas expected it), it may still matter, but
      only to a failed cas or a delete that found the key (any foreign value satisfies
      them). If none of those can follow it, drop it: any linearization can move it (and
      the unknown cas ops that it made fail) to the very end, where it changes nothing.
      Otherwise it is marked `unobserved` and writes the shared token `_UNOBSERVED`.
    """
    ends = [_INFINITY if op.return_ is None else float(op.return_) for op in operations]
    if any(op.op is OpKind.APPEND for op in operations):
        return [_Timed(op, end, False) for op, end in zip(operations, ends)]
    writers: dict[Value, int] = {}
    needed_by: dict[Value, float] = {}  # value -> earliest return of an op that needs it
    observed: set[Value] = set()
    latest_negative = -_INFINITY  # the last return of a failed cas or a delete that found
    for op, end in zip(operations, ends):
        if op.op in (OpKind.PUT, OpKind.CAS):
            writers[op.value] = writers.get(op.value, 0) + 1
        if op.op is OpKind.GET or (op.op is OpKind.CAS and op.output is True):
            seen = op.output if op.op is OpKind.GET else op.expected
            needed_by[seen] = min(needed_by.get(seen, _INFINITY), end)
        if op.op is OpKind.CAS:
            observed.add(op.expected)
        failed_cas = op.op is OpKind.CAS and op.output is False
        if failed_cas or (op.op is OpKind.DELETE and op.output is True):
            latest_negative = max(latest_negative, end)
    observed.update(needed_by)
    timed: list[_Timed] = []
    for op, end in zip(operations, ends):
        unknown_write = op.return_ is None and op.op in (OpKind.PUT, OpKind.CAS)
        if not unknown_write or op.value == initial:
            timed.append(_Timed(op, end, False))
        elif op.value not in observed:
            if latest_negative >= op.invoke:
                timed.append(_Timed(op, end, True))
        elif writers[op.value] == 1 and op.value in needed_by:
            # An observer that returned before this write began makes the history
            # non-linearizable; the search finds that with the end at the call.
            timed.append(_Timed(op, max(needed_by[op.value], float(op.invoke)), False))
        else:
            timed.append(_Timed(op, end, False))
    return timed


def _read_only(op: Operation) -> bool:
    """True if the operation changes no state in any state it can be linearized in."""
    if op.return_ is None:
        return False
    if op.op is OpKind.GET:
        return True
    return op.op in (OpKind.CAS, OpKind.DELETE) and op.output is False


# A compiled operation: (kind code, state slot, value, expected, outcome known, output).
_Compiled = tuple[int, int, object, Value, bool, Output]
# A choice on the search path: (call node, state before it, linearized before it, forced?,
# whether an interchangeable put was already tried at that depth, the phase at that depth).
_Choice = tuple[int, object, int, bool, bool, int]


def _step_value(current: object, op: _Compiled) -> object:
    """The value after `op` on a key holding `current`, or _INVALID if `op` cannot go here."""
    kind, _, value, expected, known, output = op
    if kind == _GET:
        return current if current == output else _INVALID
    if kind == _PUT:
        return value
    if kind == _CAS:
        if current == expected:
            return value if (output is not False or not known) else _INVALID
        return current if (output is False or not known) else _INVALID
    if kind == _DELETE:
        if known and output is not None and output is not (current is not None):
            return _INVALID
        return None
    assert kind == _APPEND and isinstance(value, str)
    return ("" if current is None else str(current)) + value


def _step_map(state: object, op: _Compiled) -> object:
    """The whole-map version of `_step_value`: the state is a tuple with one slot per key."""
    assert isinstance(state, tuple)
    slot = op[1]
    current = state[slot]
    after = _step_value(current, op)
    if after is _INVALID or after is current:
        return after if after is _INVALID else state
    return (*state[:slot], after, *state[slot + 1 :])


class _Search:
    """One Wing-Gong/Lowe search over the operations of one partition."""

    def __init__(self, key: str | None, timed: list[_Timed], initial: Value) -> None:
        self.key = key
        self.operations = [t.op for t in timed]
        self.ends = [t.end for t in timed]
        operations = self.operations
        self.result = KeyResult(key, Verdict.UNCHECKED, len(operations))
        slots: dict[str, int] = {}
        for op in operations:
            slots.setdefault(op.key, len(slots))
        self.compiled: list[_Compiled] = [
            (
                _KIND_CODES[t.op.op],
                slots[t.op.key],
                _UNOBSERVED if t.unobserved else t.op.value,
                t.op.expected,
                not t.op.unknown,
                t.op.output,
            )
            for t in timed
        ]
        # Unknown puts of unobserved values are interchangeable once called: the search
        # tries only the first of them that can go next at each point.
        self.interchangeable = [t.unobserved and t.op.op is OpKind.PUT for t in timed]
        self.read_only = [_read_only(op) for op in operations]
        self.step: Callable[[object, _Compiled], object]
        if key is None:
            self.initial: object = (initial,) * len(slots)
            self.step = _step_map
        else:
            self.initial = initial
            self.step = _step_value
        self._build_list()
        self.finite_mask = sum(1 << i for i, end in enumerate(self.ends) if end != _INFINITY)
        # Failed configurations: (finite operations linearized, state) -> the sets of
        # unknown operations linearized with them (kept minimal: no set contains another).
        self.failed: dict[tuple[int, object], list[int]] = {}
        self.best_count = -1
        self.best_path: list[int] = []
        self.best_state: object = self.initial
        self.best_stuck: list[int] = []

    def _build_list(self) -> None:
        """Events in time order as a doubly linked list; node 0 is the head sentinel.

        At equal times calls come before returns, so touching operations count as
        concurrent (the permissive reading, as Porcupine does).
        """
        events: list[tuple[float, int, int]] = []
        for index, op in enumerate(self.operations):
            events.append((op.invoke, 0, index))
            events.append((self.ends[index], 1, index))
        events.sort()
        count = len(events) + 1
        self.next = [_END] * count
        self.prev = [_END] * count
        self.op_of = [-1] * count  # the operation of a call node, -1 for returns and head
        self.match = [_END] * count  # a call node's return node
        return_node: dict[int, int] = {}
        for node, (_, is_return, index) in enumerate(events, start=1):
            self.prev[node] = node - 1
            self.next[node - 1] = node
            if is_return:
                return_node[index] = node
        for node, (_, is_return, index) in enumerate(events, start=1):
            if not is_return:
                self.op_of[node] = index
                self.match[node] = return_node[index]

    def _lift(self, node: int) -> None:
        nxt, prv = self.next, self.prev
        nxt[prv[node]] = nxt[node]
        prv[nxt[node]] = prv[node]  # a call always has its return after it
        ret = self.match[node]
        nxt[prv[ret]] = nxt[ret]
        if nxt[ret] != _END:
            prv[nxt[ret]] = prv[ret]

    def _unlift(self, node: int) -> None:
        nxt, prv = self.next, self.prev
        ret = self.match[node]
        nxt[prv[ret]] = ret
        if nxt[ret] != _END:
            prv[nxt[ret]] = ret
        nxt[prv[node]] = node
        prv[nxt[node]] = node

    def _first_candidate(self, state: object) -> tuple[int, bool]:
        """Where a new depth starts: a forced read-only call, or else the list's head."""
        node = self._forced(state)
        return (node, True) if node != _END else (self.next[0], False)

    def _forced(self, state: object) -> int:
        """A read-only call that can go next in `state`, or _END if there is none."""
        nxt, op_of, read_only, compiled, step = (
            self.next,
            self.op_of,
            self.read_only,
            self.compiled,
            self.step,
        )
        node = nxt[0]
        while node != _END:
            index = op_of[node]
            if index < 0:
                return _END
            if read_only[index] and step(state, compiled[index]) is not _INVALID:
                return node
            node = nxt[node]
        return _END

    def run(self) -> Iterator[None]:
        """Search for a linearization, yielding every _QUANTUM steps; sets `self.result`.

        See the module docstring for the rules.
        """
        nxt, op_of, compiled, step = self.next, self.op_of, self.compiled, self.step
        interchangeable = self.interchangeable
        finite = [end != _INFINITY for end in self.ends]
        unknown = [op.unknown for op in self.operations]
        # Most operations have a known outcome: they take the short path below.
        special = [op.unknown or not end for op, end in zip(self.operations, finite)]
        subsumes = not all(finite)  # else the visited set already says everything
        # Operations with a finite end still to place; at zero the rest are unknown writes,
        # which can all go at the end in any order (each is valid in every state).
        remaining = sum(finite)
        bits = [1 << index for index in range(len(self.operations))]
        visited: set[tuple[int, object]] = set()
        calls: list[_Choice] = []
        # Each depth tries the operations with a finite end first (phase 0) and unknown
        # writes only after (phase 1), so configurations with fewer unknown writes fail
        # first and subsume the rest (see _subsumed).
        state, linearized, skip, phase = self.initial, 0, False, 0
        node, forced = self._first_candidate(state)
        steps = 0
        while remaining:
            steps += 1
            if steps % _QUANTUM == 0:
                yield
            index = op_of[node] if node != _END else -1
            if index >= 0:
                if not special[index]:
                    if phase:  # phase 1 is for unknown writes only
                        node = nxt[node]
                        continue
                    after = step(state, compiled[index])
                else:
                    if finite[index] == phase:  # phase 0 wants finite, phase 1 infinite
                        node = nxt[node]
                        continue
                    if interchangeable[index]:
                        if skip:
                            node = nxt[node]
                            continue
                        skip = True
                    after = step(state, compiled[index])
                    if unknown[index] and after == state:
                        # An unknown write that changes nothing here can always go at the
                        # end instead, where it is just as valid: never try it here.
                        node = nxt[node]
                        continue
                if after is not _INVALID:
                    grown = linearized | bits[index]
                    if (grown, after) not in visited and not (
                        subsumes and self._subsumed(grown, after)
                    ):
                        visited.add((grown, after))
                        calls.append((node, state, linearized, forced, skip, phase))
                        state, linearized, skip, phase = after, grown, False, 0
                        remaining -= finite[index]
                        self._lift(node)
                        node, forced = self._first_candidate(state)
                        continue
                if not forced:
                    node = nxt[node]
                    continue
            elif phase == 0 and not forced:
                node, phase = nxt[0], 1
                continue
            # A dead end: a return whose call is unlinearized, or a forced call whose
            # subtree has already failed. Backtrack past every forced choice.
            self._remember_dead_end(calls, state)
            if not calls:
                self.result = self._violation()
                return
            node, state, linearized, skip, phase, freed = self._backtrack(calls, linearized, state)
            if node == _END:
                self.result = self._violation()
                return
            remaining += freed
            node, forced = nxt[node], False
        self.result = KeyResult(self.key, Verdict.OK, len(self.operations))

    def _subsumed(self, linearized: int, state: object) -> bool:
        """True if a failed configuration had the same known operations linearized, the
        same state, and a subset of the unknown ones: it could do all this one can (the
        extra unknown writes could go at the end), so this one fails too."""
        failed = self.failed.get((linearized & self.finite_mask, state))
        if not failed:
            return False
        unknowns = linearized & ~self.finite_mask
        return any(not (other & ~unknowns) for other in failed)

    def _backtrack(
        self, calls: list[_Choice], linearized: int, state: object
    ) -> tuple[int, object, int, bool, int, int]:
        """Undo choices up to the last one that was not forced, recording each abandoned
        configuration as failed; returns that choice and how many finite ends it frees,
        or _END as the node when the first configuration has failed."""
        freed = 0
        subsumes = self.finite_mask != (1 << len(self.operations)) - 1
        while True:
            if subsumes:
                key = (linearized & self.finite_mask, state)
                unknowns = linearized & ~self.finite_mask
                failed = [other for other in self.failed.get(key, ()) if unknowns & ~other]
                failed.append(unknowns)
                self.failed[key] = failed
            node, state, linearized, was_forced, skip, phase = calls.pop()
            freed += self.ends[self.op_of[node]] != _INFINITY
            self._unlift(node)
            if not was_forced:
                return node, state, linearized, skip, phase, freed
            if not calls:
                return _END, state, linearized, skip, phase, freed

    def _remember_dead_end(self, calls: list[_Choice], state: object) -> None:
        if len(calls) <= self.best_count:
            return
        self.best_count = len(calls)
        self.best_path = [self.op_of[entry[0]] for entry in calls]
        self.best_state = state
        stuck: list[int] = []
        node = self.next[0]
        while node != _END and self.op_of[node] >= 0:
            stuck.append(self.op_of[node])
            node = self.next[node]
        if node != _END:
            # The first return: its operation had to go before anything after it.
            for index, call in enumerate(self.op_of):
                if call >= 0 and self.match[index] == node and call not in stuck:
                    stuck.append(call)
        self.best_stuck = stuck

    def _violation(self) -> KeyResult:
        ops = self.operations
        shown = self.best_path[-_SHOWN_LINEARIZED:]
        explanation = Explanation(
            key=self.key,
            linearized_count=max(self.best_count, 0),
            linearized=tuple(ops[i] for i in shown),
            state=self.best_state,
            stuck=tuple(ops[i] for i in self.best_stuck),
        )
        return KeyResult(self.key, Verdict.VIOLATION, len(ops), explanation)
