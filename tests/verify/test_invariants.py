"""Cluster invariants from the nodes' own state."""

from __future__ import annotations

from kvstore.verify.invariants import check_cluster_invariants


def test_agreeing_nodes_pass() -> None:
    result = check_cluster_invariants(
        committed={1: [(1, 1, "h1"), (2, 1, "h2")], 2: [(1, 1, "h1")], 3: []},
        applied={1: [(2, "d2")], 2: [(1, "d1"), (2, "d2")]},
        hard_states={1: [(1, 0), (1, 2), (2, 2)], 2: [(1, 1), (1, 1)]},
    )
    assert result.ok, result.describe()
    assert result.checked == ("log matching", "state digests", "term and commit monotonic")


def test_a_diverged_log_is_caught() -> None:
    result = check_cluster_invariants(
        committed={1: [(1, 1, "h1"), (2, 1, "h2")], 2: [(1, 1, "h1"), (2, 2, "other")]}
    )
    [violation] = result.violations
    assert violation.rule == "log_matching" and violation.node == 2
    assert "committed index 2 holds term 2" in result.describe()


def test_one_node_reporting_two_entries_at_one_index_is_caught() -> None:
    result = check_cluster_invariants(committed={1: [(5, 3, b"\x01"), (5, 3, b"\x02")]})
    assert [v.rule for v in result.violations] == ["log_matching"]


def test_different_digests_at_one_applied_index_are_caught() -> None:
    result = check_cluster_invariants(applied={1: [(7, "aaaa")], 2: [(7, "bbbb")]})
    assert [v.rule for v in result.violations] == ["state_digest"]
    restarted = check_cluster_invariants(applied={1: [(7, "aaaa"), (7, "cccc")]})
    assert not restarted.ok


def test_a_term_going_back_across_a_restart_is_caught() -> None:
    result = check_cluster_invariants(hard_states={3: [(4, 10), (3, 10)]})
    [violation] = result.violations
    assert violation.rule == "term_monotonic" and violation.node == 3
    assert "term went back from 4 to 3" in result.describe()


def test_a_commit_index_going_back_is_caught() -> None:
    result = check_cluster_invariants(hard_states={1: [(4, 10), (5, 9)]})
    assert [v.rule for v in result.violations] == ["commit_monotonic"]


def test_nothing_given_checks_nothing() -> None:
    result = check_cluster_invariants()
    assert result.ok and result.checked == ()
