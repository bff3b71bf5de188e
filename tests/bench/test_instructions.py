"""bench/instructions.py runs end to end (one short round) and writes its JSON; the figures
are not checked, only that node 1, under callgrind, led and served the writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="needs valgrind")
def test_instructions_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "instructions.py"),
            "--rounds", "1",
            "--seconds", "2",
            "--burst", "2",
            "--json", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    document = json.loads(out.read_text())
    [result] = document["results"]
    assert result["ratio_to_first"] == 1.0
    [round_] = result["rounds"]
    assert round_["writes"] > 0 and round_["writes"] % 2 == 0  # bursts of 2
    assert round_["instructions_per_write"] > 0
    assert document["run"]["command"]
