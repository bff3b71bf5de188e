"""bench/snapshot_transfer.py runs end to end on a tiny store and writes its JSON.

The figures are not checked (benchmarks are not tests; the machine may be loaded); what is
checked is that the empty node caught up through exactly one streamed snapshot, that every
phase's load wrote something, and that the document has the fields bench/README.md shows
(the receiving node's install time, loop stall and peak RSS among them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_snapshot_transfer_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "snapshot_transfer.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "snapshot_transfer.py"),
            "--keys", "2000",
            "--writers", "4",
            "--load-seconds", "0.5",
            "--deadline-s", "60",
            "--json", str(out),
            "--base-dir", str(tmp_path / "cluster"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "caught up in" in completed.stdout
    document = json.loads(out.read_text())
    assert document["benchmark"] == "snapshot_transfer"
    assert document["run"]["command"]
    [result] = document["results"]
    assert result["keys"] == 2000 and result["snapshot_bytes"] > 2000 * 100
    assert result["catch_up_s"] > 0
    assert result["snapshot_sends"] == 1
    assert result["wire_transfer_s"] is not None and result["loopback_mb_per_s"] > 0
    for phase in ("before", "during", "after"):
        assert result[phase]["writes"] > 0, phase
    # The receiving node's side: install time, its loop, its memory, the leader's term.
    assert result["install_s"] is not None and result["load_s"] is not None
    assert result["receiver_longest_stall_s"] >= 0
    assert result["receiver_peak_rss_mb"] > 0 and result["leader_peak_rss_mb"] > 0
    assert isinstance(result["terms_moved"], int)
    assert result["writes_during_to_after"] > 0
