"""Backup and restore end to end: `kvstore snapshot save` from a live three-node cluster, a
new cluster restored from the file (as `kvstore cluster --restore` does it), and damaged or
misused files refused with a clear message. Real processes on 127.0.0.1; every wait polls a
condition with a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.server.backup import restore_data_dir, verify_snapshot_file
from kvstore.server.cli import _restore_cluster
from kvstore.server.localcluster import LocalCluster, free_port

pytestmark = pytest.mark.slow

_KEYS = 200
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with _OPENER.open(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _put(cluster: LocalCluster, key: str, value: str) -> None:
    def attempt() -> bool:
        leader = cluster.wait_for_leader(timeout_s=10)
        url = f"{cluster.client_url(leader)}/v1/kv/{key}"
        return _request("PUT", url, value.encode())[0] == 200

    _wait_until(attempt, 10, f"write of {key}")


def _kvstore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _cluster(base: Path) -> LocalCluster:
    ports = [free_port() for _ in range(6)]
    return LocalCluster(base, 3, client_ports=ports[:3], peer_ports=ports[3:])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A live cluster with _KEYS keys, saved from a follower; then one more write that the
    snapshot must not hold. Yields (the snapshot file, a scratch directory)."""
    base = tmp_path_factory.mktemp("backup")
    cluster = _cluster(base / "old")
    try:
        cluster.start()
        leader = cluster.wait_for_leader(timeout_s=15)
        for i in range(_KEYS):
            _put(cluster, f"k{i}", f"v{i}")
        follower = next(i for i in cluster.ids if i != leader)
        file = base / "backup.snap"
        result = _kvstore(
            "snapshot", "save", str(file), "--endpoints", cluster.client_url(follower)
        )
        assert result.returncode == 0, result.stderr
        assert f"saved {file}" in result.stdout
        _put(cluster, "after", "not in the snapshot")
    finally:
        cluster.stop()
    yield file, base


def test_save_writes_a_whole_checksummed_snapshot(saved: tuple[Path, Path]) -> None:
    file, _ = saved
    snapshot = verify_snapshot_file(str(file))
    assert snapshot.metadata.index > _KEYS
    assert snapshot.metadata.conf_state.voters == (1, 2, 3)
    assert not os.path.exists(f"{file}.part")


def test_a_cluster_restored_from_the_file_holds_every_write_before_the_save(
    saved: tuple[Path, Path],
) -> None:
    file, base = saved
    cluster = _cluster(base / "new")
    assert _restore_cluster(cluster, str(file))
    try:
        cluster.start()
        leader = cluster.wait_for_leader(timeout_s=15)
        url = cluster.client_url(leader)
        for i in range(0, _KEYS, 17):
            assert _request("GET", f"{url}/v1/kv/k{i}") == (200, f"v{i}".encode())
        assert _request("GET", f"{url}/v1/kv/after")[0] == 404
        _put(cluster, "new", "written after the restore")
        status, body = _request("GET", f"{url}/v1/kv/new")
        assert (status, body) == (200, b"written after the restore")
    finally:
        cluster.stop()


def test_a_damaged_file_is_refused_naming_the_file_and_offset(
    saved: tuple[Path, Path], tmp_path: Path
) -> None:
    file, _ = saved
    content = bytearray(file.read_bytes())
    content[len(content) // 2] ^= 0x01
    damaged = tmp_path / "damaged.snap"
    damaged.write_bytes(bytes(content))
    result = _kvstore("snapshot", "restore", str(damaged), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert str(damaged) in result.stderr and "offset" in result.stderr, result.stderr
    assert not (tmp_path / "d").exists()


def test_restore_never_overwrites_a_data_directory(saved: tuple[Path, Path], tmp_path: Path) -> None:
    file, _ = saved
    data_dir = tmp_path / "node"
    result = _kvstore("snapshot", "restore", str(file), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    again = _kvstore("snapshot", "restore", str(file), "--data-dir", str(data_dir))
    assert again.returncode == 2
    assert "not empty" in again.stderr


def test_restore_with_other_voters_records_them(saved: tuple[Path, Path], tmp_path: Path) -> None:
    file, _ = saved
    snapshot = restore_data_dir(str(file), str(tmp_path / "n"), voters=(4, 5, 6))
    assert snapshot.metadata.conf_state.voters == (4, 5, 6)


def test_save_reports_every_unreachable_node(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = _kvstore("snapshot", "save", str(tmp_path / "x.snap"), "--endpoints", url)
    assert result.returncode == 1
    assert url in result.stderr
    assert not (tmp_path / "x.snap").exists()


def test_the_endpoint_answers_json_errors_and_a_status_names_the_snapshot(
    saved: tuple[Path, Path],
) -> None:
    """The HTTP side alone: the headers name the index and term of what is sent."""
    _, base = saved
    cluster = _cluster(base / "http")
    try:
        cluster.start()
        leader = cluster.wait_for_leader(timeout_s=15)
        _put(cluster, "x", "1")
        request = urllib.request.Request(f"{cluster.client_url(leader)}/v1/snapshot")
        with _OPENER.open(request, timeout=30) as response:
            body = response.read()
            index = int(response.headers["Kvstore-Snapshot-Index"])
        assert index >= 2 and body.startswith(b"KVSNAP01")
        status, error = _request("POST", f"{cluster.client_url(leader)}/v1/snapshot")
        assert status == 405 and "error" in json.loads(error)
    finally:
        cluster.stop()


def test_save_sends_the_token_and_reports_a_refusal(tmp_path: Path) -> None:
    """Under --auth the endpoint is an admin's: the CLI sends --token as a bearer token and
    names the node's refusal (a stand-in node here, which refuses everyone)."""
    import http.server
    import threading

    seen: list[str | None] = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"error": {"code": "permission_denied", "message": "no"}})
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        file = tmp_path / "x.snap"
        result = _kvstore("snapshot", "save", str(file), "--endpoints", url, "--token", "t0k")
    finally:
        thread.join(10)
        server.server_close()
    assert seen == ["Bearer t0k"]
    assert result.returncode == 1
    assert "HTTP 403: no" in result.stderr
    assert not file.exists()
