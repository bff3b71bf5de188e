"""The drill's checkers one at a time, without processes: what each one passes and fails.

The whole drills (tests/chaos/test_drills.py) are slow and run each checker only on what one
run happened to produce; here each `Drill._check_*` method gets a hand-made input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.chaos.drill import Drill, DrillConfig, NodeState
from kvstore.chaos.nemesis import FaultEvent
from kvstore.chaos.workload import CounterTally


@dataclass
class _Workload:
    """The parts of a chaos Workload the checkers read."""

    tally: CounterTally = field(default_factory=CounterTally)


def _drill(tmp_path: Path, **options: Any) -> Drill:
    config = DrillConfig(duration_s=10.0, base_dir=tmp_path / "run", plot=False, **options)
    return Drill(config, clock=lambda: 0.0)


def _event(name: str, **fields: Any) -> FaultEvent:
    values: dict[str, Any] = {"took_effect": True, "recovered_at_s": 5.0, **fields}
    return FaultEvent(name, (1,), injected_at_s=1.0, **values)


def _node(commit: int, applied: list[object]) -> NodeState:
    committed = [(index, 1, f"h{index}") for index in range(1, commit + 1)]
    return NodeState(1, commit, 0, committed, applied, {commit: "digest"})


def test_activity_passes_when_faults_took_effect_and_writes_flowed(tmp_path: Path) -> None:
    drill = _drill(tmp_path)
    drill.report.counts = {"ok": 100}
    drill.report.timeline = [_event("kill")]
    outcome = drill._check_activity(_Workload())  # type: ignore[arg-type]
    assert outcome.ok, outcome.detail
    assert outcome.detail == "100 operations acknowledged, 1 faults took effect"


def test_activity_names_every_reason_a_drill_tested_too_little(tmp_path: Path) -> None:
    drill = _drill(tmp_path)
    drill.report.counts = {"ok": 29}  # 3 per second of 10 s are needed
    drill.report.timeline = [
        _event("pause", took_effect=False),
        _event("disk-torn", disk_outcome_ok=False),
        _event("partition", recovered_at_s=None),
    ]
    outcome = drill._check_activity(_Workload())  # type: ignore[arg-type]
    assert not outcome.ok
    assert outcome.detail == (
        "only 29 operations acknowledged (< 30); faults that did not take effect: pause; "
        "disk faults mishandled by the node: disk-torn; "
        "no write acknowledged after healing: partition"
    )
    drill.report.timeline = []
    assert "no fault was injected" in drill._check_activity(_Workload()).detail  # type: ignore[arg-type]


def test_activity_counts_the_counters_acknowledged_increments(tmp_path: Path) -> None:
    drill = _drill(tmp_path, workload="counter")
    drill.report.counts = {"ok": 0}
    drill.report.timeline = [_event("kill")]
    workload = _Workload(CounterTally(acknowledged=30))
    assert drill._check_activity(workload).ok  # type: ignore[arg-type]


def test_exactly_once_fails_on_a_request_applied_twice(tmp_path: Path) -> None:
    drill = _drill(tmp_path)
    nodes = {1: _node(2, ["c:1", "c:2"]), 2: _node(2, ["c:1", "c:1"])}
    outcome = drill._check_exactly_once(_Workload(), {}, nodes)  # type: ignore[arg-type]
    assert not outcome.ok
    clean = {1: _node(2, ["c:1", "c:2"])}
    assert drill._check_exactly_once(_Workload(), {}, clean).ok  # type: ignore[arg-type]


def test_exactly_once_checks_the_counter_and_the_retry_storm(tmp_path: Path) -> None:
    drill = _drill(tmp_path, workload="counter")
    nodes = {1: _node(1, ["c:1"])}
    tally = CounterTally(acknowledged=5, unknown=1, storm_duplicates_sent=3)
    for final, ok in (("5", True), ("6", True), ("4", False), ("7", False)):
        outcome = drill._check_exactly_once(_Workload(tally), {"counter": final}, nodes)  # type: ignore[arg-type]
        assert outcome.ok is ok, (final, outcome.detail)
        assert "retry storm: 3 duplicates answered, 0 answered differently" in outcome.detail
    tally.storm_mismatches.append("c:9 answered 1 then 2")
    outcome = drill._check_exactly_once(_Workload(tally), {"counter": "5"}, nodes)  # type: ignore[arg-type]
    assert not outcome.ok
    assert "(first: c:9 answered 1 then 2)" in outcome.detail


def test_invariants_fail_when_the_nodes_did_not_converge_or_a_node_is_unreadable(
    tmp_path: Path,
) -> None:
    drill = _drill(tmp_path)
    nodes = {1: _node(3, []), 2: _node(2, [])}
    outcome = drill._check_invariants(nodes, {}, converged=True)
    assert outcome.ok, outcome.detail
    assert outcome.detail.endswith("; common commit index 2")
    outcome = drill._check_invariants(nodes, {3: "CorruptionError: bad crc"}, converged=False)
    assert not outcome.ok
    assert "the nodes did not converge within 30 s after healing" in outcome.detail
    assert "node 3 unreadable: CorruptionError: bad crc" in outcome.detail
    # Hard states accumulate across checks (a term or commit index going back is caught).
    assert drill.hard_states == {1: [(1, 3), (1, 3)], 2: [(1, 2), (1, 2)]}


class _Nemesis:
    """Records the faults the drill injects; each heals at once."""

    def __init__(self) -> None:
        self.injected: list[str] = []

    async def inject(self, name: str) -> FaultEvent:
        self.injected.append(name)
        return FaultEvent(name, (1,), injected_at_s=0.0)

    async def heal(self, event: FaultEvent) -> None:
        return None


class _Probe:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def __aenter__(self) -> _Probe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def put(self, key: str, value: str) -> None:
        return None


def test_a_slow_start_does_not_leave_a_short_drill_without_faults(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The fault window counts from the workload's start: three nodes that took most of the
    duration to start on a loaded machine still get their faults (a 10 s drill whose nodes
    took 4 s to start injected none, and failed its activity check)."""
    import asyncio
    import time
    from types import SimpleNamespace

    import kvstore.chaos.drill as drill_module

    monkeypatch.setattr(drill_module, "Client", _Probe)
    config = DrillConfig(
        duration_s=1.0, warmup_s=0.05, tail_s=0.5, fault_s=(0.01, 0.01), calm_s=(0.01, 0.01),
        faults="pause", base_dir=tmp_path / "run", plot=False,
    )  # fmt: skip
    origin = time.monotonic()
    drill = Drill(config, clock=lambda: time.monotonic() - origin)
    drill.started_at = -0.9  # the nodes took 0.9 s of the 1 s duration to start
    drill.workload_started_s = drill.now_s()
    drill.cluster = SimpleNamespace(client_urls=[], ca_file=None)  # type: ignore[assignment]
    nemesis = _Nemesis()

    async def run() -> None:
        workload = asyncio.create_task(asyncio.sleep(30))
        try:
            await asyncio.wait_for(drill._fault_cycles(nemesis, workload), timeout=10)  # type: ignore[arg-type]
        finally:
            workload.cancel()

    asyncio.run(run())
    assert nemesis.injected, "no fault was injected"


class _StuckWorkload:
    """A workload that does not stop when asked (a lock holder stuck behind a fault)."""

    def stop(self) -> None:
        return None


def test_a_workload_that_does_not_stop_is_cancelled_and_the_drill_goes_on(
    tmp_path: Path,
) -> None:
    """asyncio.wait_for cancelled the workload itself on its timeout, and asking a cancelled
    task for its exception raised CancelledError: the drill aborted before its checks."""
    import asyncio

    drill = _drill(tmp_path)

    async def run() -> bool:
        task = asyncio.create_task(asyncio.sleep(30))
        await drill.stop_workload(_StuckWorkload(), task, timeout_s=0.05)  # type: ignore[arg-type]
        return task.cancelled()

    assert asyncio.run(run())


def test_a_watch_drill_keeps_the_whole_history_its_checker_reads(tmp_path: Path) -> None:
    """A 120 s watch drill wrote more revisions than the default history keeps, and its
    checker's final read of the history from the start got RevisionCompactedError."""
    args = _drill(tmp_path, workload="watch").node_args()
    kept = int(args[args.index("--history-revisions-max") + 1])
    assert kept >= 1_000_000
    assert "--history-revisions-max" not in _drill(tmp_path / "b", workload="register").node_args()


def test_a_wiped_node_starts_a_history_of_its_own(tmp_path: Path) -> None:
    """A wiped slot comes back as a new member: reading its gone directory records nothing
    (it recorded (0, 0), and created an empty log there, so a slot killed and later wiped
    failed "term went back" and "commit went back" in a run with kill and wipe faults), and
    the new member's (term, commit) are kept under its own member id."""
    from kvstore.chaos.drill import member_key, read_hard_state
    from kvstore.server.identity import Identity, write_identity
    from kvstore.storage.disk import DiskStorage

    wiped = tmp_path / "node3"
    assert read_hard_state(wiped) is None
    assert not wiped.exists()
    assert member_key(wiped, 3) == 3
    DiskStorage(wiped).close()
    write_identity(wiped, Identity(member_id=4, cluster_id="kvstore", name="3", joined=True))
    assert read_hard_state(wiped) == (0, 0)
    assert member_key(wiped, 3) == 4
