"""`kvstore cluster` (what `make run` runs): three nodes in the foreground, endpoints and PIDs
printed, a node that dies is restarted, one stopped on purpose stays down until SIGUSR1,
SIGHUP (closing the terminal) stops everything, and so does killing the supervisor; a taken
port is refused up front. Ports are chosen free (consecutive)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


def _command(tmp_path: Path, client_base: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kvstore",
        "cluster",
        "--data-dir",
        str(tmp_path / "data"),
        "--client-port",
        str(client_base),
        "--peer-port",
        str(client_base + 3),
    ]


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" in status.read_text()
    except OSError:
        return True


def test_cluster_command_serves_restarts_and_stops(tmp_path: Path) -> None:
    client_base = _consecutive_free_ports(6)
    process = subprocess.Popen(
        _command(tmp_path, client_base),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    children: list[int] = []
    try:
        urls = [f"http://127.0.0.1:{client_base + i}" for i in range(3)]

        def ready() -> bool:
            # Every node, not only the first: under load the others may still be starting
            # (a PUT to node 2 was refused while node 1 was already ready).
            try:
                return all(call(f"{url}/readyz", timeout_s=1).status == 200 for url in urls)
            except OSError:
                return False

        wait_until(ready, 30, "every node is ready")
        assert call(f"{urls[1]}/v1/kv/greeting", "PUT", b"hello").status == 200
        assert call(f"{urls[2]}/v1/kv/greeting").body == b"hello"
        children = wait_until(lambda: (c := _children(process.pid)) and len(c) == 3 and c, 5)
        os.kill(children[0], signal.SIGKILL)
        wait_until(
            lambda: len(set(_children(process.pid)) - set(children)) == 1, 15, "node restarted"
        )
        # Stopped on purpose: the supervisor leaves it down (it says so), until SIGUSR1.
        os.kill(children[1], signal.SIGTERM)
        wait_until(lambda: len(_children(process.pid)) == 2, 15, "node stopped")
        os.kill(process.pid, signal.SIGUSR1)
        wait_until(lambda: len(_children(process.pid)) == 3, 15, "node started again")
    finally:
        children = _children(process.pid)
        # Closing the terminal: the nodes must not outlive the supervisor.
        process.send_signal(signal.SIGHUP)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0
    assert f"http://127.0.0.1:{client_base}" in output
    assert "restarting in 1 s" in output and "stopping all nodes" in output
    assert "stays down" in output and "ready: leader is node" in output
    assert output.count(" pid ") >= 3
    for child in children:
        wait_until(lambda child=child: _gone(child), 5, f"node pid {child} gone")


def test_nodes_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    client_base = _consecutive_free_ports(6)
    process = subprocess.Popen(
        _command(tmp_path, client_base),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        children = wait_until(lambda: (c := _children(process.pid)) and len(c) == 3 and c, 20)
    finally:
        process.kill()
        process.wait()
    for child in children:
        wait_until(lambda child=child: _gone(child), 10, f"node pid {child} gone")


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """A second `make run` while one runs used to loop forever restarting nodes that could
    not bind; now it says which port is taken and exits 2 at once."""
    client_base = _consecutive_free_ports(6)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", client_base + 4))
        taken.listen()
        result = subprocess.run(
            _command(tmp_path, client_base), capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 2
    assert f"127.0.0.1:{client_base + 4} is already in use" in result.stderr
    assert not (tmp_path / "data").exists()
