"""The linearizability checker on small hand-made histories, and properties (Hypothesis)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.verify.history import HistoryError, Operation, OpKind, Value, validate_history
from kvstore.verify.linearizability import Verdict, check_linearizability, deadline_after


def op(
    process: int,
    kind: str,
    key: str,
    invoke: int,
    ret: int | None,
    value: Value = None,
    *,
    expected: Value = None,
    ok: bool = True,
    output: object = None,
) -> Operation:
    operation = Operation(
        process, OpKind(kind), key, value, expected, invoke, ret, ok and ret is not None,
        output if ok and ret is not None else None,  # type: ignore[arg-type]
    )  # fmt: skip
    operation.validate()
    return operation


def verdict(history: list[Operation], **options: object) -> Verdict:
    validate_history(history)
    result = check_linearizability(history, **options)  # type: ignore[arg-type]
    unpartitioned = check_linearizability(history, partition_by_key=False, **options)  # type: ignore[arg-type]
    assert unpartitioned.verdict is result.verdict
    return result.verdict


def test_empty_history_is_linearizable() -> None:
    assert check_linearizability([]).ok


def test_sequential_put_then_get() -> None:
    history = [op(1, "put", "k", 0, 10, "v1"), op(2, "get", "k", 20, 30, output="v1")]
    assert verdict(history) is Verdict.OK


def test_stale_read_is_a_violation() -> None:
    """The second put returned before the read began; the read still sees the first."""
    history = [
        op(1, "put", "k", 0, 10, "v1"),
        op(1, "put", "k", 20, 30, "v2"),
        op(2, "get", "k", 40, 50, output="v1"),
    ]
    assert verdict(history) is Verdict.VIOLATION
    result = check_linearizability(history)
    [bad] = result.violations
    assert bad.key == "k" and bad.explanation is not None
    assert any(o.output == "v1" for o in bad.explanation.stuck)
    assert "get(k)='v1'" in result.describe()


def test_concurrent_read_may_see_either_value() -> None:
    for seen in ("v1", "v2"):
        history = [
            op(1, "put", "k", 0, 10, "v1"),
            op(1, "put", "k", 20, 40, "v2"),
            op(2, "get", "k", 25, 35, output=seen),
        ]
        assert verdict(history) is Verdict.OK


def test_read_of_a_missing_key_is_none() -> None:
    assert verdict([op(1, "get", "k", 0, 1, output=None)]) is Verdict.OK
    assert verdict([op(1, "get", "k", 0, 1, output="ghost")]) is Verdict.VIOLATION
    assert verdict([op(1, "get", "k", 0, 1, output="")], initial="") is Verdict.OK


def test_read_that_goes_back_in_time_is_a_violation() -> None:
    """Two reads concurrent with a write: once one has seen v2, a later one cannot see v1."""
    history = [
        op(1, "put", "k", 0, 10, "v1"),
        op(1, "put", "k", 20, 100, "v2"),
        op(2, "get", "k", 30, 40, output="v2"),
        op(3, "get", "k", 50, 60, output="v1"),
    ]
    assert verdict(history) is Verdict.VIOLATION


def test_unknown_write_may_or_may_not_be_seen() -> None:
    for seen in ("v1", "v2"):
        history = [
            op(1, "put", "k", 0, 10, "v1"),
            op(2, "put", "k", 20, None, "v2"),  # timed out: outcome unknown
            op(3, "get", "k", 1000, 1010, output=seen),
        ]
        assert verdict(history) is Verdict.OK


def test_unknown_write_cannot_be_seen_before_it_was_invoked() -> None:
    history = [
        op(1, "put", "k", 0, 10, "v1"),
        op(3, "get", "k", 20, 30, output="v2"),
        op(2, "put", "k", 40, None, "v2"),
    ]
    assert verdict(history) is Verdict.VIOLATION


def test_unknown_write_once_seen_stays_until_overwritten() -> None:
    history = [
        op(1, "put", "k", 0, 10, "v1"),
        op(2, "put", "k", 20, None, "v2"),
        op(3, "get", "k", 30, 40, output="v2"),
        op(3, "get", "k", 50, 60, output="v1"),
    ]
    assert verdict(history) is Verdict.VIOLATION


def test_failed_write_must_not_be_seen() -> None:
    history = [
        op(1, "put", "k", 0, 10, "v1", ok=False),
        op(2, "get", "k", 20, 30, output="v1"),
    ]
    assert verdict(history) is Verdict.VIOLATION
    assert check_linearizability(history).dropped == 1


def test_cas_succeeds_only_on_a_match() -> None:
    good = [
        op(1, "put", "k", 0, 10, "v1"),
        op(1, "cas", "k", 20, 30, "v2", expected="v1", output=True),
        op(1, "cas", "k", 40, 50, "v3", expected="v1", output=False),
        op(1, "get", "k", 60, 70, output="v2"),
    ]
    assert verdict(good) is Verdict.OK
    swapped_wrongly = [*good[:2], op(1, "cas", "k", 40, 50, "v3", expected="v1", output=True)]
    assert verdict(swapped_wrongly) is Verdict.VIOLATION
    failed_wrongly = [good[0], op(1, "cas", "k", 20, 30, "v2", expected="v1", output=False)]
    assert verdict(failed_wrongly) is Verdict.VIOLATION


def test_cas_expecting_none_creates_only_when_absent() -> None:
    history = [
        op(1, "cas", "k", 0, 10, "v1", expected=None, output=True),
        op(1, "cas", "k", 20, 30, "v2", expected=None, output=False),
    ]
    assert verdict(history) is Verdict.OK


def test_unknown_cas_may_have_swapped() -> None:
    for seen in ("v1", "v2"):
        history = [
            op(1, "put", "k", 0, 10, "v1"),
            op(2, "cas", "k", 20, None, "v2", expected="v1"),
            op(3, "get", "k", 100, 110, output=seen),
        ]
        assert verdict(history) is Verdict.OK


def test_delete_then_read_is_absent() -> None:
    history = [
        op(1, "put", "k", 0, 10, "v1"),
        op(1, "delete", "k", 20, 30, output=True),
        op(1, "delete", "k", 40, 50, output=False),
        op(1, "get", "k", 60, 70, output=None),
    ]
    assert verdict(history) is Verdict.OK
    assert verdict([*history[:2], op(1, "get", "k", 60, 70, output="v1")]) is Verdict.VIOLATION
    assert verdict([op(1, "delete", "k", 0, 1, output=True)]) is Verdict.VIOLATION


def test_append_concatenates() -> None:
    history = [
        op(1, "append", "k", 0, 10, "a"),
        op(2, "append", "k", 5, 15, "b"),
        op(3, "get", "k", 20, 30, output="ba"),
    ]
    assert verdict(history, initial="") is Verdict.OK
    history[-1] = op(3, "get", "k", 20, 30, output="a")
    assert verdict(history, initial="") is Verdict.VIOLATION


def test_keys_are_independent_and_reported_separately() -> None:
    history = [
        op(1, "put", "a", 0, 10, "a1"),
        op(2, "get", "a", 20, 30, output="a1"),
        op(3, "put", "b", 0, 10, "b1"),
        op(4, "get", "b", 20, 30, output=None),
    ]
    result = check_linearizability(history, stop_at_first_violation=False)
    assert {k.key: k.verdict for k in result.keys} == {"a": Verdict.OK, "b": Verdict.VIOLATION}
    assert not result.ok


def test_running_out_of_time_is_timed_out_never_ok() -> None:
    history = [op(i, "put", "k", i, i + 1, f"v{i}") for i in range(2000)]
    result = check_linearizability(history, deadline=lambda: True)
    assert result.verdict is Verdict.TIMED_OUT and not result.ok
    assert "timed out" in result.describe()


def test_deadline_after_uses_the_callers_clock() -> None:
    now = [100.0]
    expired = deadline_after(lambda: now[0], 5.0)
    assert not expired()
    now[0] = 105.0
    assert expired()


# --- properties ----------------------------------------------------------------------------

KEYS = ("a", "b", "c")


def _run_model(rng: random.Random, count: int) -> list[Operation]:
    """Operations applied one by one to a map; each gets an interval around its instant.

    Writes use unique values. Some outcomes are unknown (the effect happened, or not) and
    some writes fail definitely (no effect). The result is linearizable by construction.
    """
    state: dict[str, str | None] = dict.fromkeys(KEYS)
    history: list[Operation] = []
    for i in range(count):
        key, instant = rng.choice(KEYS), 100 * (i + 1)
        invoke, ret = instant - rng.randrange(0, 400), instant + rng.randrange(0, 400)
        kind = rng.choice(("get", "get", "put", "cas", "delete"))
        fate = rng.random()
        current, value = state[key], f"v{i}"
        if kind == "get":
            history.append(op(i, "get", key, invoke, ret, output=current))
            continue
        if fate < 0.1:  # a definite failure: no effect
            expected = current if kind == "cas" else None
            history.append(op(i, kind, key, invoke, ret, value if kind != "delete" else None,
                              expected=expected, ok=False))  # fmt: skip
            continue
        unknown = fate < 0.25
        effect = not unknown or rng.random() < 0.5
        if kind == "put":
            history.append(op(i, "put", key, invoke, None if unknown else ret, value))
            state[key] = value if effect else current
        elif kind == "cas":
            expected = current if rng.random() < 0.7 else f"v{rng.randrange(count)}"
            swapped = effect and expected == current
            history.append(op(i, "cas", key, invoke, None if unknown else ret, value,
                              expected=expected, output=expected == current))  # fmt: skip
            state[key] = value if swapped else current
        else:
            history.append(op(i, "delete", key, invoke, None if unknown else ret,
                              output=current is not None))  # fmt: skip
            state[key] = None if effect else current
    return history


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 60))
def test_histories_of_a_sequential_model_are_linearizable(seed: int, count: int) -> None:
    history = _run_model(random.Random(seed), count)
    result = check_linearizability(history)
    assert result.ok, result.describe()


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 60), pick=st.integers(0, 10**6))
def test_a_mutated_read_in_a_sequential_history_is_caught(seed: int, count: int, pick: int) -> None:
    rng = random.Random(seed)
    history = [
        Operation(o.process, o.op, o.key, o.value, o.expected, 10 * i, 10 * i + 5, True, o.output)
        for i, o in enumerate(_run_model(rng, count))
        if o.ok and o.return_ is not None
    ]
    reads = [i for i, o in enumerate(history) if o.op is OpKind.GET]
    if not reads:
        return
    index = reads[pick % len(reads)]
    read = history[index]
    wrong = rng.choice([None, "never-written", *(o.value for o in history if o.value)])
    if wrong == read.output:
        wrong = "never-written"
    history[index] = Operation(read.process, read.op, read.key, None, None, read.invoke,
                               read.return_, True, wrong)  # fmt: skip
    assert check_linearizability(history).verdict is Verdict.VIOLATION


# --- against a brute-force checker ---------------------------------------------------------


def _brute_force_linearizable(history: list[Operation], initial: Value = None) -> bool:
    """Try every order of every subset of the unknown outcomes: the definition, slowly."""
    definite = [o for o in history if o.ok and o.return_ is not None]
    unknown = [o for o in history if o.return_ is None and o.op is not OpKind.GET]
    for mask in range(1 << len(unknown)):
        chosen = definite + [o for i, o in enumerate(unknown) if mask >> i & 1]
        if any(_valid_order(order, initial) for order in itertools.permutations(chosen)):
            return True
    return False


def _valid_order(order: tuple[Operation, ...], initial: Value) -> bool:
    for later, second in enumerate(order):
        for first in order[later + 1 :]:  # `first` is placed after `second`
            if first.return_ is not None and first.return_ < second.invoke:
                return False
    state: dict[str, Value] = {}
    for o in order:
        current = state.get(o.key, initial)
        known = o.return_ is not None
        if o.op is OpKind.GET:
            if o.output != current:
                return False
        elif o.op is OpKind.PUT:
            state[o.key] = o.value
        elif o.op is OpKind.CAS:
            matched = current == o.expected
            if known and o.output is not matched:
                return False
            if matched:
                state[o.key] = o.value
        elif o.op is OpKind.DELETE:
            if known and o.output is not None and o.output is not (current is not None):
                return False
            state[o.key] = None
    return True


@st.composite
def _small_histories(draw: st.DrawFn) -> list[Operation]:
    """Repeated values ("a", "b", "c"), or unique ones as workloads write (v0, v1, ...)."""
    count = draw(st.integers(0, 6))
    unique = draw(st.booleans())
    seen: list[Value] = [f"v{i}" for i in range(count)] if unique else ["a", "b", "c"]
    values = st.sampled_from(seen)
    history = []
    for process in range(count):
        kind = draw(st.sampled_from(["get", "put", "put", "cas", "delete"]))
        key = draw(st.sampled_from(["x", "x", "y"]))
        invoke = draw(st.integers(0, 12))
        ret = (
            None
            if kind != "get" and draw(st.integers(0, 3)) == 0
            else invoke + draw(st.integers(0, 6))
        )
        ok = ret is None or draw(st.integers(0, 7)) > 0
        value = (f"v{process}" if unique else draw(values)) if kind in ("put", "cas") else None
        expected = draw(st.sampled_from([*seen, None])) if kind == "cas" else None
        output: object = None
        if ok and ret is not None:
            if kind == "get":
                output = draw(st.sampled_from([*seen, None]))
            elif kind == "cas":
                output = draw(st.booleans())
            elif kind == "delete":
                output = draw(st.sampled_from([True, False, None]))
        history.append(
            op(process, kind, key, invoke, ret, value, expected=expected, ok=ok, output=output)
        )
    return history


@settings(max_examples=400, deadline=None)
@given(history=_small_histories())
def test_agrees_with_brute_force_on_small_histories(history: list[Operation]) -> None:
    """Every pruning rule (forced reads, bounded and dropped unknowns, subsumption) keeps
    the verdict of the definition, with repeated values and unknown outcomes."""
    expected = Verdict.OK if _brute_force_linearizable(history) else Verdict.VIOLATION
    assert check_linearizability(history).verdict is expected
    assert check_linearizability(history, partition_by_key=False).verdict is expected


def test_a_step_budget_is_deterministic() -> None:
    history = [op(i, "put", "k", i, i + 1, f"v{i}") for i in range(3000)]
    assert check_linearizability(history, max_steps=1000).verdict is Verdict.TIMED_OUT
    assert check_linearizability(history, max_steps=10_000).verdict is Verdict.OK


def test_a_malformed_history_is_refused_loudly() -> None:
    reused = [op(1, "put", "k", 0, None, "v1"), op(1, "get", "k", 5, 6, output="v1")]
    with pytest.raises(HistoryError, match="reused after the unknown outcome"):
        check_linearizability(reused)
