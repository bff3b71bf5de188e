"""bench/snapshot_stall.py runs end to end on a tiny store, both modes, and writes its JSON.

The figures are not checked (benchmarks are not tests; the machine may be loaded): only that
each mode stored its snapshots and the document has the fields bench/README.md shows.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.snapshot_stall import MODES, main


def test_snapshot_stall_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "stall.json"
    assert main(["--keys", "500", "--rounds", "1", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["benchmark"] == "snapshot_stall" and document["run"]["command"]
    (size,) = document["sizes"]
    assert size["keys"] == 500 and size["snapshot_bytes"] > 0
    for mode in MODES:
        (figures,) = size["rounds"][mode]
        assert figures["snapshot_s"] > 0 and figures["stall_max_ms"] >= 0
        assert size["median"][mode]["worst_stall_max_ms"] >= 0
