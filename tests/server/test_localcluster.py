"""LocalCluster's node processes live exactly as long as the process that started them.

A node must not die because the thread that started it exited (a thread pool retiring a
worker, `asyncio.to_thread`), and must not outlive its parent when the parent is killed
(a test run or `kvstore cluster` killed with SIGKILL would otherwise leave nodes holding
ports and data directories). Each test starts one single-node cluster and stops every
process it starts by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kvstore.server.localcluster import LocalCluster, exit_when_pipe_closes


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan is reaped by init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.02)


def test_a_node_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, 1, die_with_parent=True)
    starter = threading.Thread(target=cluster.start, name="short-lived-starter")
    starter.start()
    starter.join()
    try:
        # Either the node comes up, or it died when its starting thread exited.
        _wait(
            lambda: cluster.returncode(1) is not None or cluster.status(1) is not None,
            30.0,
            "node up or exited",
        )
        assert cluster.returncode(1) is None, "the node died with the thread that started it"
    finally:
        cluster.stop(signal.SIGINT)


_SUPERVISOR = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from kvstore.server.localcluster import LocalCluster

    cluster = LocalCluster(Path(sys.argv[1]), 1)
    # Started from a worker thread that is retired when asyncio.run returns.
    asyncio.run(asyncio.to_thread(cluster.start))
    print(cluster.pid(1), flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.1)
    """
)


def test_nodes_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    supervisor = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR, str(tmp_path)],
        stdout=subprocess.PIPE,
        env=env,
    )
    node_pid = 0
    try:
        assert supervisor.stdout is not None
        line = supervisor.stdout.readline()
        node_pid = int(line)
        assert _alive(node_pid), "the node died with the thread that started it"
        supervisor.kill()
        supervisor.wait()
        _wait(lambda: not _alive(node_pid), 20.0, "the orphaned node's exit")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        if node_pid and _alive(node_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node_pid, signal.SIGKILL)


def test_the_parent_pipe_must_be_an_open_pipe(tmp_path: Path) -> None:
    with (tmp_path / "file").open("w") as file, pytest.raises(ValueError, match="not a pipe"):
        exit_when_pipe_closes(file.fileno())
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(ValueError, match="parent pipe fd"):
        exit_when_pipe_closes(read_end)
