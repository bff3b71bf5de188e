"""The exactly-once checker: double applications and counter bounds."""

from __future__ import annotations

import pytest

from kvstore.verify.exactly_once import check_counter, check_exactly_once


def test_each_request_applied_once_passes() -> None:
    applied: dict[int, list[tuple[str, int] | None]] = {
        1: [("c1", 1), ("c1", 2), None, ("c2", 1)],
        2: [("c1", 1), ("c1", 2)],
    }
    result = check_exactly_once(applied, check_counter(3, acknowledged=3, unknown=0))
    assert result.ok, result.describe()
    assert result.applied_requests == 5


def test_a_double_application_is_caught() -> None:
    result = check_exactly_once({1: [("c1", 1)], 2: [("c1", 1), ("c1", 2), ("c1", 1)]})
    assert not result.ok
    [double] = result.duplicates
    assert (double.node, double.request, double.count, double.positions) == (
        2,
        ("c1", 1),
        2,
        (0, 2),
    )
    assert "request ('c1', 1) applied 2 times" in result.describe()


def test_counter_within_bounds() -> None:
    assert check_counter(10, acknowledged=8, unknown=3).ok
    assert check_counter(8, acknowledged=8, unknown=3).ok
    assert check_counter(11, acknowledged=8, unknown=3).ok
    assert check_counter(15, acknowledged=8, unknown=3, initial=4).ok


def test_counter_too_high_means_double_application() -> None:
    counter = check_counter(12, acknowledged=8, unknown=3)
    assert not counter.ok
    assert "1 increment(s) applied more than once" in counter.describe()
    assert not check_exactly_once({}, counter).ok


def test_counter_too_low_means_a_lost_increment() -> None:
    counter = check_counter(7, acknowledged=8, unknown=3)
    assert not counter.ok and "1 acknowledged increment(s) lost" in counter.describe()


def test_counts_cannot_be_negative() -> None:
    with pytest.raises(ValueError):
        check_counter(0, acknowledged=-1, unknown=0)
