"""One definition of a percentile for every benchmark, so their figures compare.

`percentile(values, q)` is the nearest-rank percentile: the smallest sample such that at
least a fraction `q` of the samples are at or below it, i.e. the `ceil(q * n)`-th smallest of
n samples (the smallest for q = 0). It is always a sample that was measured, never a value
interpolated between two, and it needs no assumption about the distribution. `median` is
`percentile(values, 0.5)`: for an even count the lower of the two middle samples.

Benchmarks report p50/p90/p99 of latencies, of unavailability per trial and of rates per
repeat with these two functions only (bench/failover.py, bench/throughput.py,
bench/client_overhead.py, bench/storage.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank percentile `q` (0 <= q <= 1) of `values`, in any order; nan if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile: q must be in 0..1, got {q}")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    # round() first: 0.07 * 100 is 7.000000000000001 in binary floating point, whose ceil
    # would skip a rank.
    rank = math.ceil(round(q * len(ordered), 9))
    return ordered[max(0, rank - 1)]


def median(values: Iterable[float]) -> float:
    """`percentile(values, 0.5)`: the lower middle sample for an even count; nan if empty."""
    return percentile(values, 0.5)
