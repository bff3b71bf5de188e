"""Chaos drills against real node processes: the CI smoke set, and proof the checkers bite.

Each smoke run is a whole drill (kvstore.chaos.drill): a three-node cluster behind
fault-injecting proxies, a workload, one fault family toggled on and off, heal, final reads,
and every checker. A run that fails keeps its folder (history, timeline, logs, data, plot)
and the assertion message says where.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from kvstore.chaos.cli import main as chaos_main
from kvstore.chaos.drill import DrillConfig, DrillReport, run_drill
from kvstore.chaos.matrix import MATRICES, MatrixRun
from kvstore.chaos.nemesis import ALL_FAULTS, expand_faults
from kvstore.cli import build_parser

pytestmark = pytest.mark.slow

SMOKE = MATRICES["smoke"]
CI_DURATION_S = 20.0
"""Each smoke run's length in CI: half the matrix's 40 s, which `kvstore chaos --matrix smoke`
(`make chaos`) keeps. 20 s leaves 13 s between warm-up and tail, two or three fault cycles
of the run's family, and keeps the whole set at about six minutes of the CI run."""


def _run(config: DrillConfig) -> DrillReport:
    return asyncio.run(run_drill(config))


def test_the_smoke_set_covers_every_fault_and_workload() -> None:
    covered = {fault for run in SMOKE for fault in expand_faults(run.faults)}
    assert covered == set(ALL_FAULTS)
    assert {run.workload for run in SMOKE} == {"register", "counter", "append", "watch", "lock"}
    assert len(SMOKE) == 20


@pytest.mark.parametrize("run", SMOKE, ids=[run.name for run in SMOKE])
def test_smoke_drill(run: MatrixRun) -> None:
    report = _run(
        DrillConfig(
            duration_s=min(run.duration_s, CI_DURATION_S),
            faults=run.faults,
            workload=run.workload,
            seed=run.seed,
        )
    )
    summary = report.render()
    print(summary)
    assert report.ok, summary
    # The faults really happened and the workload really ran.
    assert report.timeline and all(event.took_effect for event in report.timeline)
    if run.workload not in ("counter", "lock"):
        assert report.counts["ok"] >= 3 * min(run.duration_s, CI_DURATION_S)
    if run.workload in ("watch", "lock"):
        check = report.check(run.workload)
        assert check is not None and check.ok, summary
    shutil.rmtree(report.run_dir, ignore_errors=True)


def test_stale_reads_served_as_linearizable_are_caught() -> None:
    """Nodes that skip ReadIndex (an unsafe setting) answer reads from a cut-off follower's
    stale state: the linearizability checker must fail the run, and the run folder must hold
    what is needed to look into it."""
    report = _run(
        DrillConfig(duration_s=16.0, faults="isolate-follower", seed=8, unsafe_local_reads=True)
    )
    try:
        linearizability = report.check("linearizability")
        assert linearizability is not None and not linearizability.ok, report.render()
        assert not report.ok and report.kept
        for name in ("history.jsonl", "timeline.json", "report.json", "node1.log", "node1"):
            assert (report.run_dir / name).exists(), name
        assert "artifacts:" in report.render()
    finally:
        shutil.rmtree(report.run_dir, ignore_errors=True)


def test_a_drill_that_did_too_little_fails() -> None:
    report = _run(
        DrillConfig(
            duration_s=10.0, warmup_s=1.0, faults="slow-links", seed=3, processes=1,
            min_ok_per_s=1e6, plot=False,
        )
    )  # fmt: skip
    try:
        activity = report.check("activity")
        assert activity is not None and not activity.ok
        assert "operations acknowledged" in activity.detail
        assert not report.ok
    finally:
        shutil.rmtree(report.run_dir, ignore_errors=True)


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        expand_faults("kill,meteor")
    with pytest.raises(ValueError, match="duration_s"):
        DrillConfig(duration_s=5.0)
    args = build_parser().parse_args(["chaos", "--faults", "meteor"])
    assert chaos_main(args) == 2
    assert "unknown fault 'meteor'" in capsys.readouterr().err


def test_a_drill_with_tls_and_auth_passes() -> None:
    """Issue 16: TLS on both ports (mutual TLS between peers, through the fault proxies) and
    --auth with a root token that every client of the drill carries; the checkers pass."""
    report = _run(
        DrillConfig(duration_s=16.0, faults="kill,partition", seed=16, secure=True, plot=False)
    )
    assert report.ok, report.render()
    assert report.to_json()["secure"] is True
