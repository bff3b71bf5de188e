"""bench/storage.py runs (--quick) and writes the JSON fields the closing note relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def test_storage_bench_quick_writes_json(tmp_path: Path) -> None:
    output = tmp_path / "storage.json"
    completed = subprocess.run(
        [
            sys.executable,
            "bench/storage.py",
            "--quick",
            "--dir",
            str(tmp_path),
            "--json",
            str(output),
        ],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "WAL/raw" in completed.stdout
    report = json.loads(output.read_text())
    assert [row["entries_per_batch"] for row in report["results"]] == [1, 16, 256]
    for row in report["results"]:
        for key in (
            "wal_entries_per_s",
            "wal_fsyncs_per_s",
            "raw_fsyncs_per_s",
            "ratio_wal_to_raw",
        ):
            assert row[key] > 0, key
        assert row["payload_bytes"] == 100
    assert set(report["targets"]) >= {"ratio_1_entry_met", "entries_per_s_256_met"}
    assert list(tmp_path.iterdir()) == [output]  # the bench cleaned up after itself
