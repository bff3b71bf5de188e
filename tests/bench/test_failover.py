"""bench/failover.py runs end to end (2 short trials per fault) and writes its JSON and PNG.

The figures are not checked (benchmarks are not tests); what is checked is that every trial
has its timeline, that the final read-back found no acknowledged write lost and none applied
twice, that the JSON describes the run (commit, machine, command line), that progress is one
line per trial when stderr is not a terminal, and that the clusters' data is removed at the
end. No etcd is needed.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

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
        # The nodes' logs and the client's name the steps of the failover (in at least one
        # trial each: a loaded machine may leave one phase of one trial outside the window).
        phases = [trial["phases_ms"] for trial in result["trials"]]
        assert any(p["election_won"] is not None for p in phases), phases
        assert any(p["client_learned_first"] is not None for p in phases), phases
        assert result["summary"]["phases_p50_ms"]["election_won"] is not None
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0


@pytest.fixture(scope="module")
def failover_modules() -> Iterator[tuple[ModuleType, ModuleType]]:
    """bench/failover_systems.py and failover_trial.py, imported the way the script does."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield importlib.import_module("failover_systems"), importlib.import_module("failover_trial")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _at(clock: str) -> float:
    return datetime.datetime.strptime(clock, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def test_phases_come_from_the_first_matching_log_line_of_each_step(
    failover_modules: tuple[ModuleType, ModuleType],
) -> None:
    systems, trial = failover_modules
    fault = _at("2026-12-02 11:55:45.880")
    survivor_log = "\n".join(
        [
            "2026-12-02 11:55:45,870 INFO kvstore.raft event=became_candidate node=3 term=1",
            "2026-12-02 11:55:45,891 INFO kvstore.server event=peer_disconnected peer=1 direction=in",
            "2026-12-02 11:55:45,893 INFO kvstore.server event=peer_down peer=2 reason=silent",
            "2026-12-02 11:55:45,895 INFO kvstore.server event=peer_down peer=1 reason=redial_refused",
            "2026-12-02 11:55:45,896 INFO kvstore.raft event=became_pre_candidate node=3 term=1 attempt=1",
            "garbage line",
            "2026-12-02 11:55:45,912 INFO kvstore.raft event=became_leader node=3 term=2",
        ]
    )
    old_log = "2026-12-02 11:55:45,950 INFO kvstore.server event=leader_changed node=1 leader=3 role=follower"
    events = sorted(
        systems.parse_node_log(survivor_log, 3, fault, fault + 1)
        + systems.parse_node_log(old_log, 1, fault, fault + 1),
        key=lambda event: event.at_unix,
    )
    # The line before the fault is left out; the other peer's silence is not about the leader.
    assert events[0].event == "peer_disconnected"
    phases = trial.node_phases(events, 1, fault)
    assert phases["survivor_noticed"] == pytest.approx(15, abs=0.5)
    assert phases["campaign_started"] == pytest.approx(16, abs=0.5)
    assert phases["election_won"] == pytest.approx(32, abs=0.5)
    assert phases["old_leader_learned_new"] == pytest.approx(70, abs=0.5)
    assert phases["old_leader_handing_over"] is None
    news = [(fault + 0.040, "http://b"), (fault + 0.030, "http://a"), (fault + 0.050, "http://a")]
    assert trial.client_phases(news, "http://a", fault, 2) == {
        "client_learned_first": pytest.approx(30, abs=0.5),
        "client_learned_last": pytest.approx(50, abs=0.5),
    }
    # Not every writer learned it: no last.
    assert trial.client_phases(news, "http://a", fault, 3)["client_learned_last"] is None
