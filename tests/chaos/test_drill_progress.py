"""What `kvstore chaos` tells its user while a drill runs and in the report.

Fast tests drive the drill's progress hook (`Drill._observe`) with a stepped clock, a
hand-made timeline and history, and check what the console printer writes with and without a
terminal; the report explains every count it prints. One short real drill (slow) checks that
the command prints progress while it runs and the explanations at the end.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvstore.chaos.cli import ConsoleProgress
from kvstore.chaos.drill import OUTCOMES, Drill, DrillConfig, DrillProgress, DrillReport
from kvstore.chaos.nemesis import FaultEvent
from kvstore.chaos.workload import CounterTally, History


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Nemesis:
    timeline: list[FaultEvent] = field(default_factory=list)


@dataclass
class _Workload:
    history: History = field(default_factory=History)
    tally: CounterTally = field(default_factory=CounterTally)


@dataclass
class _Observer:
    interval_s: float = 5.0
    events: list[tuple[float, str]] = field(default_factory=list)
    snapshots: list[DrillProgress] = field(default_factory=list)

    def progress(self, snapshot: DrillProgress) -> None:
        self.snapshots.append(snapshot)

    def event(self, elapsed_s: float, message: str) -> None:
        self.events.append((elapsed_s, message))


def _operation(ok: bool, returned: int | None) -> dict[str, Any]:
    return {"process": 0, "op": "get", "key": "k", "value": None, "expected": None,
            "invoke": 1, "return": returned, "ok": ok, "output": None}  # fmt: skip


def _drill(tmp_path: Path, observer: _Observer, clock: _Clock, **options: Any) -> Drill:
    config = DrillConfig(duration_s=30.0, base_dir=tmp_path / "run", plot=False, **options)
    return Drill(config, clock=clock, observer=observer)


def test_each_fault_is_announced_once_when_injected_healed_and_recovered(
    tmp_path: Path,
) -> None:
    clock, observer = _Clock(), _Observer()
    drill = _drill(tmp_path, observer, clock)
    nemesis, workload = _Nemesis(), _Workload()
    event = FaultEvent("partition", (1, 3), injected_at_s=4.0)
    nemesis.timeline.append(event)
    drill._observe(nemesis, workload)  # type: ignore[arg-type]
    drill._observe(nemesis, workload)  # type: ignore[arg-type]
    assert observer.events == [(4.0, "injected partition on nodes 1, 3")]
    event.healed_at_s, event.took_effect = 7.5, True
    event.recovered_at_s = 7.75
    drill._observe(nemesis, workload)  # type: ignore[arg-type]
    drill._observe(nemesis, workload)  # type: ignore[arg-type]
    assert observer.events[1:] == [
        (7.5, "healed partition on nodes 1, 3; it took effect"),
        (7.75, "recovered: a write acknowledged 250 ms after the heal"),
    ]
    nemesis.timeline.append(FaultEvent("pause-leader", (2,), injected_at_s=9.0, healed_at_s=11.0))
    drill._observe(nemesis, workload)  # type: ignore[arg-type]
    assert observer.events[3:] == [
        (9.0, "injected pause-leader on node 2"),
        (11.0, "healed pause-leader on node 2; it DID NOT take effect"),
    ]


def test_progress_counts_outcomes_every_interval_and_names_the_faults_in_force(
    tmp_path: Path,
) -> None:
    clock, observer = _Clock(), _Observer(interval_s=5.0)
    drill = _drill(tmp_path, observer, clock)
    nemesis, workload = _Nemesis(), _Workload()
    operations = workload.history.operations
    operations += [_operation(True, 2), _operation(True, 3), _operation(False, 4)]
    operations.append(_operation(True, None))  # unknown, whatever `ok` says
    nemesis.timeline.append(FaultEvent("kill-leader", (2,), injected_at_s=3.0))
    clock.now += 4.0
    drill._observe(nemesis, workload)  # type: ignore[arg-type]
    assert observer.snapshots == []  # not yet 5 s since the last one
    clock.now += 1.0
    drill._observe(nemesis, workload)  # type: ignore[arg-type]
    assert observer.snapshots == [DrillProgress(5.0, 30.0, 2, 1, 1, ("kill-leader 2",))]
    operations += [_operation(False, None), _operation(True, 9)]
    nemesis.timeline[0].healed_at_s = 6.0
    clock.now += 1.0
    drill._observe(nemesis, workload, final=True)  # type: ignore[arg-type]
    assert observer.snapshots[-1] == DrillProgress(6.0, 30.0, 3, 1, 2, ())


def test_counter_progress_counts_increments(tmp_path: Path) -> None:
    clock, observer = _Clock(), _Observer()
    drill = _drill(tmp_path, observer, clock, workload="counter")
    workload = _Workload(tally=CounterTally(acknowledged=40, unknown=3))
    drill._observe(_Nemesis(), workload, final=True)  # type: ignore[arg-type]
    snapshot = observer.snapshots[-1]
    assert (snapshot.ok, snapshot.failed, snapshot.unknown) == (40, 0, 3)


def test_console_progress_without_a_terminal_prints_whole_lines() -> None:
    stream = io.StringIO()
    console = ConsoleProgress(stream)
    assert console.interval_s == 5.0
    console.event(4.04, "injected kill-leader on node 2")
    console.progress(DrillProgress(5.0, 60.0, 120, 3, 1, ("kill-leader 2",)))
    console.close()
    assert stream.getvalue() == (
        "   4.0s  injected kill-leader on node 2\n"
        "   5.0s  of 60 s: operations ok 120, failed 3, unknown 1; fault in force: kill-leader 2\n"
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_progress_on_a_terminal_redraws_the_status_under_the_events() -> None:
    stream = _Terminal()
    console = ConsoleProgress(stream)
    assert console.interval_s == 1.0
    console.progress(DrillProgress(1.0, 60.0, 10, 0, 0, ()))
    console.event(1.5, "injected pause-leader on node 1")
    console.progress(DrillProgress(2.0, 60.0, 20, 0, 0, ("pause-leader 1",)))
    console.close()
    output = stream.getvalue()
    # Each event clears the status line first; nothing is left on it at the end.
    assert output.startswith("   1.0s  of 60 s: operations ok 10, failed 0, unknown 0; fault")
    assert "\r\x1b[K   1.5s  injected pause-leader on node 1\n   2.0s  of 60 s" in output
    assert output.endswith("pause-leader 1\r\x1b[K")


def test_the_report_explains_every_count_it_prints(tmp_path: Path) -> None:
    report = DrillReport(config=DrillConfig(duration_s=30.0), run_dir=tmp_path)
    report.counts = {"operations": 10, "ok": 7, "failed": 2, "unknown": 1}
    text = report.render()
    assert "what the counts mean:" in text
    assert [name for name, _ in OUTCOMES] == ["ok", "failed", "unknown", "dropped"]
    for name, _ in OUTCOMES:
        assert f"\n  {name}: " in text, name
    words = " ".join(text.split())  # the explanations are wrapped at 100 columns
    assert "did not take effect" in words and "the checkers drop it" in words
    assert "may or may not have taken effect" in words and "the checkers allow both" in words


@pytest.mark.slow
def test_a_short_drill_shows_progress_and_explains_the_outcomes(tmp_path: Path) -> None:
    """A whole drill from the command line (about 10 s): progress on stderr while it runs
    (stderr is a pipe: whole lines), the explanations in the report on stdout."""
    completed = subprocess.run(
        [sys.executable, "-m", "kvstore", "chaos", "--duration", "10", "--faults", "pause",
         "--processes", "2", "--dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    err = completed.stderr
    assert "\r" not in err
    assert "leader is node " in err
    assert "injected pause-" in err and "healed pause-" in err
    assert " of 10 s: operations ok " in err
    assert "checking " in err
    words = " ".join(completed.stdout.split())
    assert "what the counts mean:" in words
    assert "unknown: no definite answer" in words and "failed: a definite failure" in words
