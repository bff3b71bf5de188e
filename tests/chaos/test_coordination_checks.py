"""The chaos drill's lock and watch checks (kvstore/chaos/coordination.py) catch what they
are meant to catch, without running a drill."""

from __future__ import annotations

import random

from kvstore.chaos.coordination import LockWorkload, _Action, _difference


def _workload(*actions: _Action) -> LockWorkload:
    workload = LockWorkload(["http://127.0.0.1:1"], 1, random.Random(1), record=None)
    workload.actions.extend(actions)
    return workload


def test_the_lock_check_passes_holders_in_token_order_one_at_a_time() -> None:
    ok, detail = _workload(_Action(5, 1, 0.0, 1.0, False), _Action(9, 2, 1.0, 2.0, False)).check()
    assert ok, detail


def test_the_lock_check_catches_a_later_token_first_and_two_holders_at_once() -> None:
    ok, detail = _workload(_Action(9, 1, 0.0, 1.0, False), _Action(5, 2, 1.5, 2.0, False)).check()
    assert not ok and "tokens must grow" in detail
    ok, detail = _workload(_Action(5, 1, 0.0, 1.0, False), _Action(9, 2, 0.5, 2.0, False)).check()
    assert not ok and "acted at once" in detail
    # The earlier holder had been told its lease was lost: fencing protects the resource.
    ok, detail = _workload(_Action(5, 1, 0.0, 1.0, True), _Action(9, 2, 0.5, 2.0, False)).check()
    assert ok and "1 overlaps after a lost lease" in detail


def test_the_watch_comparison_names_the_first_difference() -> None:
    history = [(1, "put", "r-1", b"a"), (2, "put", "r-2", b"b"), (3, "delete", "r-1", b"")]
    assert "missed 1 events" in _difference(history[:2], history)
    assert "event 1 is" in _difference([history[0], history[2]], history)
    assert "beyond the history" in _difference([*history, history[2]], history)
