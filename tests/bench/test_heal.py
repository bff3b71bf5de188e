"""bench/heal.py runs end to end on a tiny store and writes its JSON.

The figures are not checked (benchmarks are not tests; the machine may be loaded); what is
checked is that the lost node's replacement was promoted under a new id, that every phase's
load wrote something, and that the document has the fields bench/README.md shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_heal_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "heal.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "heal.py"),
            "--keys", "2000",
            "--writers", "4",
            "--load-seconds", "0.5",
            "--deadline-s", "90",
            "--json", str(out),
            "--base-dir", str(tmp_path / "cluster"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "full redundancy again in" in completed.stdout
    document = json.loads(out.read_text())
    assert document["benchmark"] == "heal"
    assert document["run"]["command"]
    [result] = document["results"]
    assert result["keys"] == 2000 and result["snapshot_bytes"] > 2000 * 100
    assert result["heal_s"] > 0 and result["new_member_id"] > 3
    assert result["installed_s"] is not None and result["installed_s"] <= result["heal_s"]
    assert isinstance(result["terms_moved"], int)
    for phase in ("before", "during", "after"):
        assert result[phase]["writes"] > 0, phase
