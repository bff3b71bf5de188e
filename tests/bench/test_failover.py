"""bench/failover.py runs end to end (2 short trials per fault) and writes its JSON and PNG.

The figures are not checked (benchmarks are not tests); what is checked is that every trial
has its timeline, that the final read-back found no acknowledged write lost and none applied
twice, that the JSON describes the run (commit, machine, command line), that progress is one
line per trial when stderr is not a terminal, and that the clusters' data is removed at the
end. No etcd is needed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.test_runinfo import assert_run_info

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ("kill", "term", "pause")
TIMELINE = (
    "fault_injected",
    "leader_loss_noticed",
    "new_leader_elected",
    "first_write_acked",
    "fault_ended",
)


@pytest.mark.slow
def test_failover_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    png = tmp_path / "failover.png"
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    (clusters / "keep-me").write_text("not the benchmark's")
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "failover.py"),
            "--trials", "2",
            "--faults", ",".join(FAULTS),
            "--pause-s", "1",
            "--settle-s", "0.2",
            "--post-s", "0.2",
            "--json", str(out),
            "--png", str(png),
            "--base-dir", str(clusters),
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "Unavailability" in completed.stdout
    document = json.loads(out.read_text())
    assert document["benchmark"] == "failover"
    assert_run_info(document["run"], "--trials 2", "--faults kill,term,pause")
    assert document["settings"]["trials"] == 2
    # stderr is a pipe here: one line per trial, no carriage-return redraws.
    assert "\r" not in completed.stderr
    steps = [line for line in completed.stderr.splitlines() if line.startswith("[")]
    assert len(steps) == 2 * len(FAULTS), completed.stderr
    assert steps[0].startswith(f"[1/{2 * len(FAULTS)}] kvstore kill: ")
    assert "ms unavailable" in steps[0]
    # The run's data and logs are gone; what was in --base-dir before is left alone.
    assert sorted(p.name for p in clusters.iterdir()) == ["keep-me"]
    assert f"figure: {png}" in completed.stdout and f"json: {out}" in completed.stdout
    results = document["results"]
    assert [(r["system"], r["fault"]) for r in results] == [("kvstore", f) for f in FAULTS]
    for result in results:
        summary = result["summary"]
        assert summary["trials"] == 2
        for name in ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "longest_call_ms"):
            assert summary[name] >= 0, (result["fault"], name)
        assert result["writes"]["acknowledged"] > 0
        assert result["writes"]["lost"] == 0
        assert result["writes"]["applied_twice"] == 0
        assert result["calls_of_median_trial"]
        for trial in result["trials"]:
            assert set(TIMELINE) <= set(trial["timeline_ms"])
            assert trial["new_leader"] in (1, 2, 3) and trial["new_leader"] != trial["old_leader"]
            assert trial["new_term"] > trial["old_term"]
            assert trial["unavailability_ms"] > 0
            assert trial["client_errors"] >= 0
            if result["fault"] == "pause":
                assert trial["disturbed"] is not None
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
