"""The safety checkers against small hand-made node states: each one must fire on a broken
history and stay quiet on a correct one."""

from __future__ import annotations

from kvstore.raft.types import Entry, HardState
from kvstore.sim.invariants import (
    Invariant,
    ListLogView,
    ReadRecord,
    SafetyChecker,
    WriteRecord,
    check_log_matching,
    check_reads,
)


def e(index: int, term: int, data: bytes = b"") -> Entry:
    return Entry(term=term, index=index, data=data or f"{index}/{term}".encode())


def kinds(checker: SafetyChecker) -> list[Invariant]:
    return [v.invariant for v in checker.violations]


def test_two_leaders_in_one_term_is_an_election_safety_violation() -> None:
    checker = SafetyChecker()
    log = ListLogView([])
    checker.observe_role(1, 3, True, log)
    checker.observe_role(1, 3, True, log)
    checker.observe_role(2, 4, True, log)
    assert kinds(checker) == []
    checker.observe_role(3, 3, True, log)
    assert kinds(checker) == [Invariant.ELECTION_SAFETY]
    assert "nodes 1 and 3 both lead term 3" in str(checker.violations[0])


def test_same_index_and_term_with_different_data_breaks_log_matching() -> None:
    checker = SafetyChecker()
    checker.observe_persisted(1, None, [e(1, 1, b"a"), e(2, 1, b"b")], prev_term=0)
    checker.observe_persisted(2, None, [e(1, 1, b"a")], prev_term=0)
    checker.observe_persisted(2, None, [e(2, 1, b"b")], prev_term=1)
    assert kinds(checker) == []
    checker.observe_persisted(3, None, [e(2, 1, b"other")], prev_term=1)
    assert kinds(checker) == [Invariant.LOG_MATCHING]


def test_same_index_and_term_after_different_previous_terms_breaks_log_matching() -> None:
    checker = SafetyChecker()
    checker.observe_persisted(1, None, [e(1, 1), e(2, 3, b"x")], prev_term=0)
    checker.observe_persisted(2, None, [e(1, 2), e(2, 3, b"x")], prev_term=0)
    assert kinds(checker) == [Invariant.LOG_MATCHING]


def test_full_log_matching_check() -> None:
    good = {
        1: ListLogView([e(1, 1), e(2, 1), e(3, 2)]),
        2: ListLogView([e(1, 1), e(2, 1), e(3, 3)]),
        3: ListLogView([e(3, 2), e(4, 2)], snapshot_index=2),
    }
    assert check_log_matching(good) == []
    bad = {
        1: ListLogView([e(1, 1), e(2, 1), e(3, 2)]),
        2: ListLogView([e(1, 1), e(2, 2), e(3, 2)]),
    }
    [violation] = check_log_matching(bad)
    assert violation.invariant is Invariant.LOG_MATCHING


def test_a_leader_missing_a_committed_entry_breaks_leader_completeness() -> None:
    checker = SafetyChecker()
    log1 = ListLogView([e(1, 1), e(2, 1)])
    checker.observe_commit(1, term=1, commit_index=2, log=log1)
    # A leader of term 2 with the committed entries: fine.
    checker.observe_role(2, 2, True, ListLogView([e(1, 1), e(2, 1), e(3, 2)]))
    assert kinds(checker) == []
    # A leader of term 3 that lost entry 2: broken.
    checker.observe_role(3, 3, True, ListLogView([e(1, 1), e(2, 3)]))
    assert kinds(checker) == [Invariant.LEADER_COMPLETENESS]


def test_leader_completeness_is_checked_when_an_older_commit_shows_up_later() -> None:
    checker = SafetyChecker()
    checker.observe_role(3, 5, True, ListLogView([e(1, 1), e(2, 5)]))
    # An entry of term 2 turns out to have been committed by term 2 <= 5: leader 3 lacks it.
    checker.observe_commit(1, term=2, commit_index=2, log=ListLogView([e(1, 1), e(2, 2)]))
    assert Invariant.LEADER_COMPLETENESS in kinds(checker)


def test_entries_committed_in_the_leaders_own_term_or_later_are_not_required() -> None:
    checker = SafetyChecker()
    checker.observe_commit(1, term=4, commit_index=1, log=ListLogView([e(1, 4)]))
    checker.observe_role(2, 4, True, ListLogView([]))  # a stale leader of term 4: no proof
    assert kinds(checker) == []


def test_a_committed_entry_that_changes_is_a_violation() -> None:
    checker = SafetyChecker()
    checker.observe_commit(1, term=1, commit_index=1, log=ListLogView([e(1, 1)]))
    checker.observe_commit(2, term=2, commit_index=1, log=ListLogView([e(1, 2)]))
    assert kinds(checker) == [Invariant.STATE_MACHINE_SAFETY]


def test_different_entries_applied_at_one_index_break_state_machine_safety() -> None:
    checker = SafetyChecker()
    checker.observe_applied(1, e(1, 1, b"a"))
    checker.observe_applied(2, e(1, 1, b"a"))
    assert kinds(checker) == []
    checker.observe_applied(3, e(1, 1, b"b"))
    assert kinds(checker) == [Invariant.STATE_MACHINE_SAFETY]


def test_applying_out_of_order_is_a_violation_but_a_restore_resets_the_position() -> None:
    checker = SafetyChecker()
    checker.observe_applied(1, e(1, 1))
    checker.observe_restored(1, 5)
    checker.observe_applied(1, e(6, 1))
    assert kinds(checker) == []
    checker.observe_applied(1, e(8, 1))
    assert kinds(checker) == [Invariant.STATE_MACHINE_SAFETY]


def test_different_state_digests_at_one_index_are_a_violation() -> None:
    checker = SafetyChecker()
    checker.observe_state(1, 10, "abc")
    checker.observe_state(2, 10, "abc")
    checker.observe_state(2, 11, "xyz")
    assert kinds(checker) == []
    checker.observe_state(3, 10, "abd")
    assert kinds(checker) == [Invariant.STATE_MACHINE_SAFETY]


def test_commit_index_going_backwards_in_memory_is_a_violation() -> None:
    checker = SafetyChecker()
    log = ListLogView([e(1, 1), e(2, 1), e(3, 1)])
    checker.observe_commit(1, 1, 3, log)
    checker.observe_commit(1, 1, 3, log)
    assert kinds(checker) == []
    checker.observe_commit(1, 1, 2, log)
    assert kinds(checker) == [Invariant.COMMIT_MONOTONIC]


def test_a_restart_may_lower_the_in_memory_commit_but_not_the_persisted_one() -> None:
    checker = SafetyChecker()
    log = ListLogView([e(1, 1), e(2, 1), e(3, 1)])
    checker.observe_persisted(1, HardState(term=1, vote=1, commit=2), [], 0)
    checker.observe_commit(1, 1, 3, log)  # in memory only, then a crash
    checker.observe_restart(1, persisted_commit=2)
    checker.observe_commit(1, 1, 2, log)
    assert kinds(checker) == []
    checker.observe_restart(1, persisted_commit=1)
    assert kinds(checker) == [Invariant.COMMIT_MONOTONIC]


def test_persisting_a_lower_commit_is_a_violation() -> None:
    checker = SafetyChecker()
    checker.observe_persisted(1, HardState(term=1, vote=1, commit=5), [], 0)
    checker.observe_persisted(1, HardState(term=2, vote=0, commit=5), [], 0)
    assert kinds(checker) == []
    checker.observe_persisted(1, HardState(term=2, vote=0, commit=4), [], 0)
    assert kinds(checker) == [Invariant.COMMIT_MONOTONIC]


def test_a_read_must_reflect_writes_acknowledged_before_it_was_invoked() -> None:
    writes = [
        WriteRecord("k", index=3, acked_at=10),
        WriteRecord("k", index=7, acked_at=20),
        WriteRecord("k", index=9, acked_at=None),  # never acknowledged
        WriteRecord("j", index=8, acked_at=5),
    ]
    fine = [
        ReadRecord("k", invoked_at=15, returned_at=30, value_index=3),
        ReadRecord("k", invoked_at=20, returned_at=30, value_index=3),  # concurrent with ack
        ReadRecord("k", invoked_at=21, returned_at=30, value_index=7),
        ReadRecord("k", invoked_at=21, returned_at=30, value_index=9),
        ReadRecord("x", invoked_at=50, returned_at=60, value_index=0),
    ]
    assert check_reads(fine, writes) == []
    stale = [ReadRecord("k", invoked_at=21, returned_at=30, value_index=3)]
    [violation] = check_reads(stale, writes)
    assert violation.invariant is Invariant.READ_FRESHNESS
    absent = [ReadRecord("j", invoked_at=6, returned_at=7, value_index=0)]
    assert len(check_reads(absent, writes)) == 1


def test_a_node_lacking_a_committed_entry_must_not_be_electable() -> None:
    """Figure 8 of the Raft paper, at the moment of the unsafe commit: S1 (term 4) counted
    replicas of its old entry (2, term 2) on S1, S2, S3 and committed it, but S5 holds
    (2, term 3) and S3, S4 and S5 would all vote for it."""
    checker = SafetyChecker()
    logs = {
        1: ListLogView([e(1, 1), e(2, 2), e(3, 4)]),
        2: ListLogView([e(1, 1), e(2, 2)]),
        3: ListLogView([e(1, 1), e(2, 2)]),
        4: ListLogView([e(1, 1)]),
        5: ListLogView([e(1, 1), e(2, 3)]),
    }
    checker.observe_commit(1, term=4, commit_index=2, log=logs[1])
    checker.check_electability(logs)
    assert kinds(checker) == [Invariant.LEADER_COMPLETENESS]
    assert "node 5 lacks committed entry 2" in checker.violations[0].detail


def test_after_a_safe_commit_nodes_lacking_the_entry_cannot_gather_a_majority() -> None:
    """The same history with the §5.4.2 rule: S1 commits only once (3, term 4) is on a
    majority, and then S5 can win no more than S4's vote."""
    checker = SafetyChecker()
    logs = {
        1: ListLogView([e(1, 1), e(2, 2), e(3, 4)]),
        2: ListLogView([e(1, 1), e(2, 2), e(3, 4)]),
        3: ListLogView([e(1, 1), e(2, 2), e(3, 4)]),
        4: ListLogView([e(1, 1)]),
        5: ListLogView([e(1, 1), e(2, 3)]),
    }
    checker.observe_commit(1, term=4, commit_index=3, log=logs[1])
    checker.check_electability(logs)
    assert kinds(checker) == []


def test_electability_counts_a_compacted_entry_as_present() -> None:
    checker = SafetyChecker()
    checker.observe_commit(1, term=2, commit_index=2, log=ListLogView([e(1, 1), e(2, 2)]))
    logs = {
        1: ListLogView([e(1, 1), e(2, 2)]),
        2: ListLogView([], snapshot_index=2, snapshot_term=2),
        3: ListLogView([e(1, 1)]),
    }
    checker.check_electability(logs)
    assert kinds(checker) == []
