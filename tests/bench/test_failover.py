"""bench/failover.py runs end to end (2 short trials per fault) and writes its JSON and PNG.

The figures are not checked (benchmarks are not tests); what is checked is that every trial
has its timeline and that the final read-back found no acknowledged write lost and none
applied twice. No etcd is needed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
            "--base-dir", str(tmp_path / "clusters"),
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "Unavailability" in completed.stdout
    document = json.loads(out.read_text())
    assert document["benchmark"] == "failover"
    assert len(document["machine"]["load_average_at_start"]) == 3
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
