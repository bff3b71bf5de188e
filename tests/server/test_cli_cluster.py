"""`kvstore cluster` (what `make run` runs): three nodes in the foreground, endpoints printed, a
node that dies is restarted, SIGINT stops everything. Ports are chosen free (consecutive)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server.test_cluster import call, wait_until

pytestmark = pytest.mark.slow

for _module in ("kvstore.raft.node", "kvstore.replica", "kvstore.storage.disk"):
    pytest.importorskip(_module)


def _consecutive_free_ports(count: int) -> int:
    for base in range(30_000 + os.getpid() % 20_000, 60_000, 97):
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free port range")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_cluster_command_serves_restarts_and_stops(tmp_path: Path) -> None:
    client_base = _consecutive_free_ports(6)
    peer_base = client_base + 3
    command = [
        sys.executable,
        "-m",
        "kvstore",
        "cluster",
        "--data-dir",
        str(tmp_path / "data"),
        "--client-port",
        str(client_base),
        "--peer-port",
        str(peer_base),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    children: list[int] = []
    try:
        urls = [f"http://127.0.0.1:{client_base + i}" for i in range(3)]

        def ready() -> bool:
            try:
                return call(f"{urls[0]}/readyz", timeout_s=1).status == 200
            except OSError:
                return False

        wait_until(ready, 20, "the cluster is ready")
        assert call(f"{urls[1]}/v1/kv/greeting", "PUT", b"hello").status == 200
        assert call(f"{urls[2]}/v1/kv/greeting").body == b"hello"
        children = wait_until(lambda: (c := _children(process.pid)) and len(c) == 3 and c, 5)
        os.kill(children[0], signal.SIGKILL)
        wait_until(
            lambda: len(set(_children(process.pid)) - set(children)) == 1, 15, "node restarted"
        )
    finally:
        children = _children(process.pid)
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0
    assert f"http://127.0.0.1:{client_base}" in output
    assert "restarting" in output and "stopping all nodes" in output
    deadline = time.monotonic() + 5
    for child in children:
        while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
            time.sleep(0.05)
        assert (
            not Path(f"/proc/{child}").exists()
            or "zombie" in Path(f"/proc/{child}/status").read_text()
        )
