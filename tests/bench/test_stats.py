"""bench/stats.py: the one percentile definition every benchmark reports with.

Nearest rank: the ceil(q * n)-th smallest sample. Checked on hand-computed cases, against its
defining property on random samples, and by scanning bench/ for a second definition.
"""

from __future__ import annotations

import ast
import importlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_modules() -> Iterator[None]:
    """Put bench/ on sys.path the way the scripts do, for the length of this module."""
    sys.path.insert(0, str(BENCH))
    try:
        yield
    finally:
        sys.path.remove(str(BENCH))


def _stats() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("stats")
    finally:
        sys.path.remove(str(BENCH))


stats = _stats()


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        (list(range(1, 11)), 0.5, 5),
        (list(range(1, 11)), 0.9, 9),
        (list(range(1, 11)), 0.99, 10),
        (list(range(1, 11)), 0.0, 1),
        (list(range(1, 11)), 1.0, 10),
        ([10, 1, 7, 3], 0.5, 3),  # unsorted input; even count: the lower middle
        ([10, 1, 7, 3], 0.75, 7),
        ([42.0], 0.99, 42.0),
        (list(range(1, 101)), 0.07, 7),  # 0.07 * 100 is 7.000000000000001 in binary
        (list(range(1, 101)), 0.99, 99),
    ],
)
def test_nearest_rank_on_hand_computed_cases(values: list[float], q: float, expected: float) -> None:
    assert stats.percentile(values, q) == expected


def test_every_whole_percent_of_one_to_a_hundred_is_itself() -> None:
    values = list(range(100, 0, -1))
    assert [stats.percentile(values, k / 100) for k in range(1, 101)] == list(range(1, 101))


def test_empty_is_nan_and_q_outside_zero_to_one_is_refused() -> None:
    assert math.isnan(stats.percentile([], 0.5))
    assert math.isnan(stats.median([]))
    for q in (-0.01, 1.01, 50):
        with pytest.raises(ValueError, match=r"q must be in 0\.\.1"):
            stats.percentile([1.0], q)


def test_median_is_the_fiftieth_percentile() -> None:
    assert stats.median([4, 1, 3, 2]) == 2
    assert stats.median([5, 1, 3]) == 3


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50),
    st.floats(0, 1),
)
def test_the_defining_property(values: list[float], q: float) -> None:
    """The result is a sample; at least q of the samples are at or below it, and fewer than q
    are strictly below it (so no smaller sample would do)."""
    result = stats.percentile(values, q)
    n = len(values)
    assert result in values
    at_or_below = sum(1 for v in values if v <= result)
    below = sum(1 for v in values if v < result)
    assert at_or_below >= q * n - 1e-6
    assert below < max(q * n, 1) + 1e-6


DEFINITIONS = frozenset({"percentile", "median", "quantile", "quantiles"})


def test_no_benchmark_defines_its_own_percentile() -> None:
    """Only bench/stats.py defines a percentile or median, and nothing uses `statistics`."""
    for path in sorted(BENCH.glob("*.py")):
        if path.name == "stats.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = node.name.lstrip("_").lower()
                assert name not in DEFINITIONS, f"{path.name}:{node.lineno}: {node.name}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                module = getattr(node, "module", None)
                assert "statistics" not in names and module != "statistics", path.name


def test_failover_summary_uses_it(bench_modules: None) -> None:
    """The failover parts import cleanly, and the summary's p50/p90/p99 are nearest-rank."""
    trial_module = importlib.import_module("failover_trial")
    importlib.import_module("failover_report")
    trials = [
        {
            "unavailability_ms": value,
            "cluster_unavailability_ms": value / 2,
            "client_errors": 1,
            "longest_call_ms": value,
            "disturbed": None,
            "phases_ms": {"election_won": value / 4},
        }
        for value in (40.0, 10.0, 30.0, 20.0)
    ]
    summary = trial_module.summarize(trials)
    assert (summary["min_ms"], summary["p50_ms"], summary["p90_ms"]) == (10.0, 20.0, 40.0)
    assert (summary["p99_ms"], summary["max_ms"], summary["cluster_p50_ms"]) == (40.0, 40.0, 10.0)
    assert summary["trials"] == 4 and summary["client_errors"] == 4
    assert summary["phases_p50_ms"]["election_won"] == 5.0  # nearest-rank median of 2.5..10
