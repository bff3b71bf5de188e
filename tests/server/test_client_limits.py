"""The client port's bounds on a real node process (`kvstore serve` on uvloop, one node):
connections beyond the per-source bound are refused with a 503 while a client from another
address is served, a slow head is cut with 408, and nothing of it makes the node log a
traceback. The in-process tests (test_http.py) cover the same on asyncio's own loop; this
one exists because the node runs on uvloop, whose transports differ. Nothing sleeps to
decide: every wait is a socket read with a timeout or a condition with a deadline.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.server.localcluster import LocalCluster

for _module in ("kvstore.raft.node", "kvstore.replica", "kvstore.storage.disk"):
    pytest.importorskip(_module)

PER_SOURCE_MAX = 20


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base: Path = tmp_path_factory.mktemp("limits")
    local = LocalCluster(
        base,
        1,
        extra_args=[
            "--client-connections-per-source-max",
            str(PER_SOURCE_MAX),
            "--client-header-timeout-ms",
            "300",
        ],
    )
    with local:
        local.wait_for_leader(timeout_s=20)
        yield local


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.settimeout(5)
    return sock


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _get(port: int, path: str, source: str) -> bytes:
    with _connect(port, source) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        return _read_to_eof(sock)


def test_beyond_the_per_source_bound_503_and_other_sources_are_served(
    node: LocalCluster,
) -> None:
    port = node.client_ports[1]
    held = [_connect(port) for _ in range(PER_SOURCE_MAX)]
    try:
        # Wait until the node counted them all (its accept may lag the client's connect).
        def counted() -> bool:
            metrics = _get(port, "/metrics", "127.0.0.2").decode()
            return f"kvstore_client_connections {PER_SOURCE_MAX + 1}.0" in metrics

        deadline = time.monotonic() + 10
        while not counted():
            assert time.monotonic() < deadline, "the node did not count the connections"
        refused = [_connect(port) for _ in range(30)]
        try:
            for sock in refused:
                answer = _read_to_eof(sock)
                assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
                assert b"Retry-After: 1" in answer
        finally:
            for sock in refused:
                sock.close()
        assert _get(port, "/healthz", "127.0.0.2").startswith(b"HTTP/1.1 200 ")
        # A held connection still works.
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert _read_to_eof(held[0]).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()


def test_a_head_that_never_finishes_is_cut_with_408(node: LocalCluster) -> None:
    port = node.client_ports[1]
    with _connect(port, "127.0.0.3") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        answer = _read_to_eof(sock)  # the node answers once 300 ms have passed
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert _get(port, "/healthz", "127.0.0.3").startswith(b"HTTP/1.1 200 ")


def test_malformed_requests_leave_no_traceback_in_the_log(node: LocalCluster) -> None:
    port = node.client_ports[1]
    for request in (
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n",
        b"GET /v1/kv?limit=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ):
        with _connect(port, "127.0.0.4") as sock:
            sock.sendall(request)
            answer = _read_to_eof(sock)
        # HTTP/1.0 where the parser never learnt the request's version.
        assert answer[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and answer[9:13] == b"400 ", answer[:100]
        assert b'"code": "bad_request"' in answer
    assert _get(port, "/healthz", "127.0.0.4").startswith(b"HTTP/1.1 200 ")
    log = node.log_path(1).read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-2000:]
