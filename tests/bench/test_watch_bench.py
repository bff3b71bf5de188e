"""bench/watch.py runs (quick mode, kvstore only) and writes its JSON; figures are not
checked (the machine is shared: benchmarks compare side by side, tests only run them)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "watch.py"


@pytest.mark.timeout(300)
def test_watch_bench_runs_in_quick_mode(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("watch_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["watch_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    out = tmp_path / "watch.json"
    assert module.main(["--quick", "--json", str(out), "--base-dir", str(tmp_path / "d")]) == 0
    document = json.loads(out.read_text())
    kvstore = document["results"]["kvstore"]
    assert [level["watchers"] for level in kvstore["watch"]] == [1, 10]
    assert all(level["complete"] for level in kvstore["watch"])
    assert kvstore["txn"]["failures"] == 0 and kvstore["txn"]["txn_per_s"] > 0
    assert document["run"]["command"]
