"""What every benchmark records about its run, where its output goes, and its scratch space.

A figure means little without the code and the machine that produced it, so every benchmark
JSON (failover, throughput, storage, client_overhead) carries the same `"run"` object, built
here by `RunInfo`:

    {"commit": "840b5f7...", "dirty": false, "kvstore_version": "0.1.0",
     "command": "bench/failover.py --trials 2", "python": "3.11.7", "platform": "Linux-...",
     "cores": 2, "load_average_at_start": [1.2, 0.9, 0.7], "load_average_at_end": [...],
     "started_unix": 1764650000.1, "finished_unix": 1764650042.7}

`commit` is `git rev-parse HEAD` of the checkout the benchmark runs from and `dirty` whether
tracked files differ from it (both null outside a git checkout); `command` is the command line
as given, shell-quoted, so the run can be repeated.

`output_path` puts a default output file under bench/results/ (ignored by git) rather than in
whatever directory the benchmark was started from. `ScratchDir` holds the clusters' data
directories and logs during a run (they reach hundreds of megabytes with `--compare etcd`)
and removes them when the run ends, however it ends (success, failure, Ctrl-C), unless the
user asked to keep them.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def _git(*args: str) -> str | None:
    """The output of a git command in the checkout, or None (no git, not a checkout)."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout if completed.returncode == 0 else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout; dirty means tracked files differ from the commit."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head.strip(), None if status is None else bool(status.strip())


def kvstore_version() -> str:
    try:
        from kvstore import __version__
    except ImportError:
        return "unknown"
    return __version__


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class RunInfo:
    """The run's description: create it when the run starts, call `finish()` for the JSON."""

    def __init__(self, argv: Sequence[str] | None = None) -> None:
        # The command as given: the script as invoked plus its arguments (main(argv) in a
        # test passes its own arguments rather than sys.argv's).
        arguments = list(sys.argv[1:] if argv is None else argv)
        self.command = shlex.join([sys.argv[0] or "python", *arguments])
        self.started_unix = time.time()
        self.load_average_at_start = _load_average()
        self.commit, self.dirty = git_commit()

    def describe(self) -> str:
        """One line for the start of a run's output."""
        commit = "no git checkout" if self.commit is None else f"commit {self.commit[:10]}"
        if self.dirty:
            commit += " (uncommitted changes)"
        load = " ".join(f"{x:.2f}" for x in self.load_average_at_start)
        return (
            f"kvstore {kvstore_version()}, {commit}; {os.cpu_count()} cores, "
            f"load average {load}"
        )

    def finish(self) -> dict[str, Any]:
        """The `"run"` object of the JSON, with the load average now."""
        return {
            "commit": self.commit,
            "dirty": self.dirty,
            "kvstore_version": kvstore_version(),
            "command": self.command,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "load_average_at_start": self.load_average_at_start,
            "load_average_at_end": _load_average(),
            "started_unix": self.started_unix,
            "finished_unix": time.time(),
        }


def output_path(given: str | os.PathLike[str] | None, default_name: str) -> Path:
    """Where to write an output file: the path the user named (relative to the current
    directory), or bench/results/<default_name>; its directory is created."""
    path = Path(given) if given else RESULTS_DIR / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class ScratchDir:
    """The directory a benchmark keeps its clusters' data and logs in, while it runs.

    Without `base_dir`, a fresh temporary directory (prefix `prefix`). On exit, however the
    block ends, it is removed unless `keep`; with `base_dir` (the user's directory, which may
    hold other things) only the entries the run created in it are removed. What happened is
    said on `stream` in one line. Stop the processes that write there before leaving the
    block (the benchmarks do so in their own `finally`)."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None,
        *,
        keep: bool,
        prefix: str,
        stream: TextIO | None = None,
    ) -> None:
        self.keep = keep
        self.stream = stream
        self._own = base_dir is None
        if base_dir is None:
            self.path = Path(tempfile.mkdtemp(prefix=prefix))
            self._before: set[str] = set()
        else:
            self.path = Path(base_dir)
            self.path.mkdir(parents=True, exist_ok=True)
            self._before = set(os.listdir(self.path))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def size_bytes(self) -> int:
        total = 0
        for directory, _, files in os.walk(self.path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(directory, name)).st_size
                except OSError:
                    pass
        return total

    def close(self) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        size_mb = self.size_bytes() / 1e6
        if self.keep:
            print(f"data and logs kept in {self.path} ({size_mb:.1f} MB)", file=stream, flush=True)
            return
        if self._own:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for name in set(os.listdir(self.path)) - self._before:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
        print(
            f"removed the run's data and logs ({size_mb:.1f} MB) from {self.path}; "
            "--keep keeps them",
            file=stream,
            flush=True,
        )


class Progress:
    """Progress over `total` steps on `stream` (stderr by default).

    On a terminal, one bar redrawn in place; otherwise (a file, a pipe, CI) one short line
    per step, since carriage returns there make one ever-growing line."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty is not None and isatty())

    def step(self, label: str, detail: str = "") -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        if not self.interactive:
            self.stream.write(
                f"[{self.done}/{self.total}] {label}{': ' + detail if detail else ''} "
                f"({elapsed:.0f} s)\n"
            )
            self.stream.flush()
            return
        width = 30
        filled = int(width * self.done / max(1, self.total))
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{label:<22}{detail:<16} {elapsed:5.0f} s"
        )
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
