"""Exactly-once writes: the replicated session table (Raft dissertation §6.3)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.kv.commands import Command, Delete, Put, RequestId, WriteResult, encode_command
from kvstore.kv.sessions import SessionConfig
from kvstore.kv.state_machine import KvConfig, StateMachine
from kvstore.raft.types import Entry


def apply(machine: StateMachine, command: Command) -> WriteResult:
    result = machine.apply(
        Entry(term=1, index=machine.applied_index + 1, data=encode_command(command))
    )
    assert result is not None
    return result


def machine_with(**bounds: int) -> StateMachine:
    return StateMachine(KvConfig(sessions=SessionConfig(**bounds)))


def put(key: str, value: bytes, client: str, seq: int, time_ms: int = 0, **kw: object) -> Put:
    return Put(key, value, RequestId(client, seq), time_ms, **kw)  # type: ignore[arg-type]


def test_duplicate_applies_once_and_returns_the_first_answer() -> None:
    machine = StateMachine()
    first = apply(machine, put("k", b"v1", "c", 1))
    apply(machine, Put("other", b"x", None, 0))
    again = apply(machine, put("k", b"v1", "c", 1))
    assert again == first
    assert machine.revision == 2
    kv = machine.get("k")
    assert kv is not None and kv.version == 1
    assert machine.duplicate_result(RequestId("c", 1)) == first
    assert machine.duplicate_result(RequestId("c", 2)) is None
    assert machine.duplicate_result(RequestId("nobody", 1)) is None


def test_failed_precondition_is_recorded_and_answered_again() -> None:
    machine = StateMachine()
    apply(machine, Put("k", b"v", None, 0))
    failed = apply(machine, put("k", b"new", "c", 1, if_revision=7))
    assert failed.error == "precondition_failed" and failed.current_revision == 1
    apply(machine, Put("k", b"w", None, 0))  # now mod_revision 2
    # The retry would now also fail, but differently; it must answer the first failure.
    assert apply(machine, put("k", b"new", "c", 1, if_revision=7)) == failed
    deleted = apply(machine, Delete("gone", RequestId("c", 2), 0))
    apply(machine, Put("gone", b"", None, 0))
    assert apply(machine, Delete("gone", RequestId("c", 2), 0)) == deleted
    assert deleted.error == "not_found"


def test_dedup_survives_snapshot_and_restore() -> None:
    machine = StateMachine()
    first = apply(machine, put("k", b"v", "c", 1, time_ms=100))
    restored = StateMachine()
    restored.restore(machine.snapshot(), machine.applied_index)
    assert restored.digest() == machine.digest()
    assert apply(restored, put("k", b"v", "c", 1, time_ms=200)) == first
    assert restored.revision == 1


def test_acked_below_drops_results_and_refuses_old_seqs() -> None:
    machine = StateMachine()
    for seq in (1, 2, 3):
        apply(machine, put(f"k{seq}", b"v", "c", seq))
    apply(machine, put("k4", b"v", "c", 4, acked_below=3))
    session = machine.sessions.get("c")
    assert session is not None and session.seqs == [3, 4] and session.discarded_below == 3
    late = apply(machine, put("k1", b"again", "c", 1))
    assert not late.ok and late.error == "session_expired"
    assert machine.revision == 4
    kv = machine.get("k1")
    assert kv is not None and kv.value == b"v"
    assert machine.duplicate_result(RequestId("c", 2)) == late
    # A seq still remembered answers normally.
    assert apply(machine, put("k3", b"v", "c", 3)).revision == 3


def test_per_client_cap_keeps_the_newest_results() -> None:
    machine = machine_with(max_results_per_session=3)
    for seq in range(1, 6):
        apply(machine, put("k", str(seq).encode(), "c", seq))
    session = machine.sessions.get("c")
    assert session is not None and session.seqs == [3, 4, 5]
    assert apply(machine, put("k", b"2", "c", 2)).error == "session_expired"
    assert apply(machine, put("k", b"5", "c", 5)).revision == 5
    assert machine.revision == 5


def test_out_of_order_seqs_within_the_window_apply_once_each() -> None:
    machine = StateMachine()
    apply(machine, put("a", b"", "c", 5))
    apply(machine, put("b", b"", "c", 3))  # a concurrent request that arrived late
    apply(machine, put("b", b"", "c", 3))
    apply(machine, put("a", b"", "c", 5))
    assert machine.revision == 2
    session = machine.sessions.get("c")
    assert session is not None and session.seqs == [3, 5]


def test_least_recently_active_client_is_evicted() -> None:
    machine = machine_with(max_sessions=2)
    apply(machine, put("k", b"", "a", 1, time_ms=1))
    apply(machine, put("k", b"", "b", 1, time_ms=2))
    apply(machine, put("k", b"", "a", 2, time_ms=3))  # a is now more recent than b
    apply(machine, put("k", b"", "c", 1, time_ms=4))
    assert machine.sessions.get("b") is None
    assert machine.sessions.get("a") is not None and machine.sessions.get("c") is not None
    assert len(machine.sessions) == 2


def test_total_bound_evicts_whole_sessions() -> None:
    machine = machine_with(max_results_per_session=3, max_results_total=6)
    for seq in range(1, 5):
        apply(machine, put("k", b"", "a", seq))  # 3 results + 1 forgotten range
    for seq in range(1, 4):
        apply(machine, put("k", b"", "b", seq))
    assert machine.sessions.get("a") is None
    assert machine.sessions.entry_count == 3


def test_a_slow_request_is_not_refused_because_newer_ones_filled_the_window() -> None:
    """Seq 2 stalls (its leader died) while 3..6 apply and push 1 and 3 out of the kept
    results: 2 still applies once when it arrives, while retries of 1 and 3 are refused."""
    machine = machine_with(max_results_per_session=3)
    for seq in (1, 3, 4, 5, 6):
        apply(machine, put(f"k{seq}", b"", "c", seq))
    session = machine.sessions.get("c")
    assert session is not None and session.seqs == [4, 5, 6]
    assert (session.forgotten_starts, session.forgotten_ends) == ([1, 3], [2, 4])
    late = apply(machine, put("k2", b"", "c", 2))
    assert late.ok and machine.revision == 6
    assert (session.forgotten_starts, session.forgotten_ends) == ([1], [4])  # merged
    for seq in (1, 3):
        assert apply(machine, put(f"k{seq}", b"", "c", seq)).error == "session_expired"
    assert machine.revision == 6


def test_forgotten_ranges_are_bounded_too() -> None:
    machine = machine_with(max_results_per_session=2)
    for seq in range(1, 16, 2):  # a client that leaves a hole after every request
        apply(machine, put(f"k{seq}", b"", "c", seq))
    session = machine.sessions.get("c")
    assert session is not None and session.seqs == [13, 15]
    assert (session.forgotten_starts, session.forgotten_ends) == ([9, 11], [10, 12])
    assert session.discarded_below == 8
    assert machine.sessions.entry_count == 4
    assert apply(machine, put("k6", b"", "c", 6)).error == "session_expired"  # below the floor
    assert apply(machine, put("k10", b"", "c", 10)).ok  # a hole above it still applies
    restored = machine_with(max_results_per_session=2)
    restored.restore(machine.snapshot(), machine.applied_index)
    assert restored.digest() == machine.digest()


def test_sessions_expire_by_log_time_only() -> None:
    machine = machine_with(session_ttl_ms=1_000)
    first = apply(machine, put("k", b"", "old", 1, time_ms=10_000))
    apply(machine, put("k", b"", "fresh", 1, time_ms=10_500))
    # A command with an older time (another leader's clock) does not move the clock back.
    apply(machine, Put("x", b"", None, 5))
    assert machine.clock_ms == 10_500
    assert machine.duplicate_result(RequestId("old", 1)) == first  # read-only: no touch
    apply(machine, Put("x", b"", None, 11_000))  # idle exactly the TTL: still alive
    assert machine.sessions.get("old") is not None
    apply(machine, Put("x", b"", None, 11_001))
    assert machine.sessions.get("old") is None
    assert machine.sessions.get("fresh") is not None
    apply(machine, Put("x", b"", None, 11_501))
    assert len(machine.sessions) == 0
    # The documented limitation: after expiry the same request applies again.
    again = apply(machine, put("k", b"", "old", 1, time_ms=11_600))
    assert again.ok and again.revision > first.revision


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(min_value=1, max_value=12),
            st.integers(min_value=0, max_value=3),
            st.integers(min_value=0, max_value=400),
        ),
        max_size=60,
    ),
    st.integers(min_value=0, max_value=2**32),
)
def test_bounded_table_is_deterministic_and_never_applies_twice(
    ops: list[tuple[str, int, int, int]], seed: int
) -> None:
    """Two replicas applying the same log agree (one of them restarting from its own
    snapshot now and then), no request is applied twice while its client's session is alive,
    and the bounds hold after every entry."""
    rng = random.Random(seed)
    config = {
        "session_ttl_ms": 1_000,
        "max_sessions": 3,
        "max_results_per_session": 4,
        "max_results_total": 8,
    }
    replica_a, replica_b = machine_with(**config), machine_with(**config)
    # The session object that recorded each applied request (kept alive, so `is` is exact).
    applied: dict[tuple[str, int], object] = {}
    time_ms = 0
    for client, seq, ack_back, step in ops:
        time_ms += step
        command = put(
            f"{client}{seq}", b"", client, seq, time_ms, acked_below=max(0, seq - ack_back)
        )
        before = replica_a.revision
        result = apply(replica_a, command)
        assert apply(replica_b, command) == result
        if replica_a.revision != before:
            session = replica_a.sessions.get(client)
            # Applied again only if the whole session went away in between.
            assert applied.get((client, seq)) is not session
            applied[(client, seq)] = session
        assert len(replica_a.sessions) <= 3 and replica_a.sessions.entry_count <= 8
        assert replica_a.digest() == replica_b.digest()
        replica_a.check_invariants()
        replica_b.check_invariants()
        if rng.random() < 0.2:
            restarted = machine_with(**config)
            restarted.restore(replica_b.snapshot(), replica_b.applied_index)
            assert restarted.sessions.entry_count == replica_b.sessions.entry_count
            replica_b = restarted
    restored = machine_with(**config)
    restored.restore(replica_a.snapshot(), replica_a.applied_index)
    assert restored.digest() == replica_a.digest()


def test_session_config_validates() -> None:
    with pytest.raises(ValueError):
        SessionConfig(session_ttl_ms=0)
    with pytest.raises(ValueError):
        SessionConfig(max_results_per_session=10, max_results_total=19)
