"""bench/runinfo.py and what the benchmarks do with it: the run's description in every JSON,
progress readable when output is not a terminal, scratch directories removed however a run
ends, default outputs under bench/results/, and a clear error for a bad `--plot-from`.

The unit tests are fast; the ones that start a cluster are marked slow.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RUN_FIELDS = {
    "commit",
    "dirty",
    "kvstore_version",
    "command",
    "python",
    "platform",
    "cores",
    "load_average_at_start",
    "load_average_at_end",
    "started_unix",
    "finished_unix",
}


def _runinfo() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("runinfo")
    finally:
        sys.path.remove(str(BENCH))


runinfo = _runinfo()


def _git_head() -> str | None:
    completed = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return completed.stdout.strip() if completed.returncode == 0 else None


def assert_run_info(run: dict[str, object], *arguments: str) -> None:
    """The fields every benchmark JSON's "run" object has, with plausible values."""
    assert set(run) == RUN_FIELDS
    assert run["commit"] == _git_head()
    assert run["dirty"] in ((True, False) if run["commit"] else (None,))
    assert run["cores"] == os.cpu_count()
    for name in ("load_average_at_start", "load_average_at_end"):
        load = run[name]
        assert isinstance(load, list) and len(load) == 3, name
    assert isinstance(run["started_unix"], float) and isinstance(run["finished_unix"], float)
    assert run["started_unix"] <= run["finished_unix"]
    from kvstore import __version__

    assert run["kvstore_version"] == __version__
    command = run["command"]
    assert isinstance(command, str)
    for argument in arguments:
        assert argument in command, (argument, command)


def test_run_info_names_commit_machine_version_and_command() -> None:
    info = runinfo.RunInfo(["--trials", "2", "--png", "a b.png"])
    run = info.finish()
    assert_run_info(run, "--trials 2")
    # Quoted as a shell would need it, so the command can be pasted back.
    assert run["command"].endswith("--trials 2 --png 'a b.png'")
    assert "cores" in info.describe() and "load average" in info.describe()


def test_progress_without_a_terminal_prints_one_line_per_step() -> None:
    stream = io.StringIO()
    progress = runinfo.Progress(3, stream)
    for step in range(3):
        progress.step("kvstore kill", f"{step} ms unavailable")
    output = stream.getvalue()
    assert "\r" not in output
    lines = output.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[1/3] kvstore kill: 0 ms unavailable (")
    assert lines[2].startswith("[3/3] ")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line() -> None:
    stream = _Terminal()
    progress = runinfo.Progress(2, stream)
    progress.step("kvstore kill")
    progress.step("kvstore kill")
    output = stream.getvalue()
    assert output.count("\r") == 2
    assert output.count("\n") == 1 and output.endswith("\n")


def test_scratch_dir_is_removed_when_the_run_is_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    said = io.StringIO()
    scratch = runinfo.ScratchDir(None, keep=False, prefix="kvtest-", stream=said)
    with pytest.raises(KeyboardInterrupt), scratch as base:
        (base / "node1").mkdir()
        (base / "node1" / "wal").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    assert f"removed the run's data and logs (0.0 MB) from {base}" in said.getvalue()


def test_scratch_dir_is_kept_with_keep_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    said = io.StringIO()
    with runinfo.ScratchDir(None, keep=True, prefix="kvtest-", stream=said) as base:
        (base / "etcd1.log").write_text("log")
    assert (base / "etcd1.log").exists()
    assert f"data and logs kept in {base}" in said.getvalue()


def test_scratch_dir_in_a_named_directory_removes_only_what_the_run_created(
    tmp_path: Path,
) -> None:
    (tmp_path / "mine.txt").write_text("the user's")
    scratch = runinfo.ScratchDir(tmp_path, keep=False, prefix="x", stream=io.StringIO())
    with pytest.raises(RuntimeError), scratch as base:
        (base / "kvstore-kill" / "node1").mkdir(parents=True)
        (base / "fsync-probe").write_bytes(b"")
        raise RuntimeError("the run failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_default_outputs_go_under_bench_results(tmp_path: Path) -> None:
    assert runinfo.output_path(None, "failover.png") == BENCH / "results" / "failover.png"
    named = runinfo.output_path(tmp_path / "sub" / "out.png", "failover.png")
    assert named == tmp_path / "sub" / "out.png" and named.parent.is_dir()
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", "bench/results/failover.png"]
    )
    assert ignored.returncode == 0, "bench/results/ must be ignored by git"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file or directory"),
        ("{", "not a JSON written by failover.py --json"),
        ('{"results": [{"system": "kvstore", "fault": "kill"}]}', "missing field 'trials'"),
    ],
)
def test_plot_from_a_missing_or_malformed_file_is_one_line_and_exit_2(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    saved = tmp_path / "saved.json"
    if content is not None:
        saved.write_text(content)
    png = tmp_path / "again.png"
    completed = subprocess.run(
        [sys.executable, str(BENCH / "failover.py"), "--plot-from", str(saved), "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.startswith(f"failover.py: --plot-from {saved}: ")
    assert reason in completed.stderr
    assert not png.exists()


def test_storage_json_records_the_run(tmp_path: Path) -> None:
    output = tmp_path / "storage.json"
    completed = subprocess.run(
        [sys.executable, str(BENCH / "storage.py"), "--quick", "--dir", str(tmp_path),
         "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    document = json.loads(output.read_text())
    assert document["benchmark"] == "storage"
    assert_run_info(document["run"], "--quick")
    assert f"json: {output}" in completed.stdout


@pytest.mark.slow
def test_throughput_records_the_run_and_removes_its_cluster(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    output = tmp_path / "throughput.json"
    completed = subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), "--concurrency", "1", "--duration",
         "0.3", "--warmup", "0.1", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    document = json.loads(output.read_text())
    assert document["benchmark"] == "throughput"
    assert_run_info(document["run"], "--concurrency 1")
    assert document["settings"]["duration_s"] == 0.3
    # The cluster's data and logs lived under TMPDIR, and are gone.
    assert list(scratch.iterdir()) == []
    assert "removed the run's data and logs" in completed.stderr


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (from /proc; Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_failover_interrupted_stops_its_cluster_and_removes_its_data(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) once the cluster runs: the nodes are stopped, the data removed, exit 130."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "failover.py"), "--trials", "20", "--faults", "kill",
         "--png", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
        # As an interactive shell starts it: SIGINT not ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(scratch.glob("kvfailover-*/kvstore-kill/node1.log")):
            assert time.monotonic() < deadline, "the cluster did not start"
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, out[-2000:] + err[-2000:]
    assert "removed the run's data and logs" in err
    assert list(scratch.iterdir()) == []
    assert _processes_mentioning(str(scratch)) == []
