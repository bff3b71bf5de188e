"""bench/partition_heal.py runs end to end with one short partition and writes its JSON.

The figures are not checked against the issue's goals (benchmarks are not tests; the machine
may be loaded); what is checked is that every node served a linearizable read again after
the heal, within the bench's own deadline, and that the cut really stalled connections that
the nodes then noticed and redialled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_partition_heal_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "partition_heal.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "partition_heal.py"),
            "--durations", "1",
            "--kinds", "isolate-leader",
            "--deadline-s", "20",
            "--json", str(out),
            "--base-dir", str(tmp_path / "cluster"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "Time from the heal to the first linearizable read" in completed.stdout
    document = json.loads(out.read_text())
    assert document["benchmark"] == "partition_heal"
    [result] = document["results"]
    assert result["kind"] == "isolate-leader" and result["duration_s"] == 1
    assert set(result["node_ms"]) == {"1", "2", "3"}
    assert all(ms is not None and ms >= 0 for ms in result["node_ms"].values())
    assert result["slowest_ms"] == max(result["node_ms"].values())
    # The isolated leader's peers went silent: it noticed and redialled.
    assert result["log_events"]["peer_silent"] >= 1
    assert result["log_events"]["peer_redial"] >= 1
