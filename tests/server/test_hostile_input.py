"""Hostile input on both ports of one real node (`kvstore serve`): every route of the
OpenAPI document with abusive query parameters, every JSON route with a body nested too
deeply, a client that hangs up in the middle of its body. Each gets a 4xx JSON answer (or
none, for the one that left), the node logs no error and no traceback, and keeps serving.

The peer port of the same node gets junk and a crowd of half-open connections (after a
valid handshake, in tests/server/test_transport.py and test_peer_auth.py); the stream's
own hostile input is in tests/server/test_stream.py.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.server.localcluster import LocalCluster
from kvstore.server.openapi import openapi_document

# Query values that no route accepts as they are meant (or that are odd but harmless).
_HOSTILE_VALUES = ("%ff%fe", "%ed%a0%80", "-1", "9" * 40, "1e3", "", "%00", "a" * 3000)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # A short body timeout: how long a client may take to send a body, or to take an answer
    # that is streamed (a snapshot), before it is cut.
    cluster = LocalCluster(
        tmp_path_factory.mktemp("hostile"), 1, extra_args=["--client-body-timeout-ms", "1000"]
    )
    cluster.start()
    try:
        cluster.wait_for_leader(30.0)
        yield cluster
    finally:
        cluster.stop()


def _exchange(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """Send `data` on a new connection; (status, body) of the answer. Only the head is
    awaited for an answer without a length (a watch or a snapshot streams)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        assert match, f"no HTTP answer: {received[:200]!r}"
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if length is not None:
            while len(body) < int(length.group(1)):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
        return int(match.group(1)), body


def _request(method: str, target: str, body: bytes | None = None, **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def _routes() -> list[tuple[str, str, list[str]]]:
    """(method, path with {key} filled in, query parameter names) of every documented route."""
    routes = []
    for path, operations in openapi_document()["paths"].items():
        for method, operation in operations.items():
            if method not in ("get", "put", "post", "delete", "head"):
                continue
            names = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
            routes.append((method.upper(), path.replace("{key}", "k"), names))
    return routes


def _assert_clean_4xx_or_ok(status: int, body: bytes, what: str) -> None:
    assert status < 500, (what, status, body[:200])
    if status >= 400 and not what.startswith("HEAD"):
        assert body.startswith(b"{"), (what, status, body[:200])
        assert "code" in json.loads(body)["error"], (what, body[:200])


def _assert_log_clean(cluster: LocalCluster) -> None:
    log = cluster.log_path(1).read_text(errors="replace")
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


def test_query_parameter_abuse_on_every_route_is_4xx_json(node: LocalCluster) -> None:
    port = node.client_ports[1]
    for method, path, names in _routes():
        body = b"{}" if method in ("POST", "PUT") else None
        for name in [*names, "unknown"]:
            for value in _HOSTILE_VALUES:
                target = f"{path}?{name}={value}&{name}={value}"
                status, answer = _exchange(port, _request(method, target, body))
                _assert_clean_4xx_or_ok(status, answer, f"{method} {target[:80]}")
    _assert_log_clean(node)
    assert node.status(1) is not None


def test_json_nested_too_deeply_is_400_on_every_json_route(node: LocalCluster) -> None:
    port = node.client_ports[1]
    json_routes = [
        (method, path) for method, path, _ in _routes() if method == "POST"
    ]
    assert len(json_routes) >= 5
    for method, path in json_routes:
        for nested in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
            status, answer = _exchange(
                port, _request(method, path, nested, Content_Type="application/json")
            )
            assert status == 400, (path, status, answer[:200])
            assert "nested too deeply" in json.loads(answer)["error"]["message"]
    _assert_log_clean(node)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/txn", b'{"success": [{"op": "put", "key": "\\ud800", "value": ""}]}'),
        ("POST", "/v1/txn", b'{"success": [{"op": "range", "prefix": "a", "start": "\\udfff"}]}'),
        ("PUT", "/v1/auth/roles/r", b'{"permissions": [{"prefix": "\\ud800", "access": "read"}]}'),
        ("POST", "/v1/members/promote", b'{"\\ud800": 1}'),
    ],
)
def test_a_lone_surrogate_in_json_is_400(
    node: LocalCluster, method: str, path: str, body: bytes
) -> None:
    """JSON's \\ud800 parses into a str UTF-8 cannot encode: it failed deep inside (500)."""
    status, answer = _exchange(
        node.client_ports[1], _request(method, path, body, Content_Type="application/json")
    )
    assert status == 400, answer[:200]
    assert "lone surrogate" in json.loads(answer)["error"]["message"]
    _assert_log_clean(node)


def test_a_client_that_hangs_up_mid_body_is_no_error_of_the_node(node: LocalCluster) -> None:
    port = node.client_ports[1]
    for data in (
        _request("PUT", "/v1/kv/k", Content_Length="100") + b"x",
        _request("POST", "/v1/txn", Content_Length="100") + b"{",
        _request("PUT", "/v1/kv/k", Transfer_Encoding="chunked") + b"ffff\r\nabc",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(data)
    # Wait until the node has seen all three go (only the scraping connection is left).
    deadline = time.monotonic() + 15
    while True:
        _, metrics = _exchange(port, _request("GET", "/metrics"))
        open_now = re.search(rb"\nkvstore_client_connections (\d+)", metrics)
        assert open_now is not None
        if int(open_now.group(1)) <= 1:
            break
        assert time.monotonic() < deadline, "the node kept the connections"
        time.sleep(0.05)
    _assert_log_clean(node)


def test_a_snapshot_client_that_never_reads_does_not_hold_the_save_for_ever(
    node: LocalCluster,
) -> None:
    """One snapshot save runs at a time per node: a client that never read its file held
    it (and a store-sized buffer) for as long as it stayed connected; every other save got
    429 meanwhile."""
    port = node.client_ports[1]
    value = b"x" * 100_000
    for i in range(80):  # 8 MB: more than the socket buffers between the two ends hold
        assert _exchange(port, _request("PUT", f"/v1/kv/snap/{i}", value))[0] == 200
    with socket.socket() as deaf:
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deaf.connect(("127.0.0.1", port))
        deaf.sendall(_request("GET", "/v1/snapshot"))
        deadline = time.monotonic() + 20
        while True:
            status, body = _exchange(port, _request("GET", "/v1/snapshot"))
            if status == 200:
                assert body.startswith(b"KVSNAP01")
                break
            assert status == 429, body[:200]
            assert time.monotonic() < deadline, "the save stayed held by a client not reading"
            time.sleep(0.1)
    _assert_log_clean(node)


def _dropped(sock: socket.socket, timeout_s: float = 10.0) -> bool:
    """True once the node has closed (or reset) the connection; what it sent is ignored."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionError:
        pass
    return True


def test_hostile_bytes_on_the_peer_port_are_dropped(node: LocalCluster) -> None:
    """Before any handshake: junk, an HTTP request, a length prefix of 4 GiB and one just
    over the handshake bound, a frame whose checksum is wrong, and a crowd of connections
    that send nothing. Each is dropped (the crowd after the handshake timeout, or evicted),
    nothing reaches the node's state, and clients are served throughout."""
    address = ("127.0.0.1", node.peer_ports[1])
    before = node.status(1)
    assert before is not None
    for payload in (
        bytes(range(256)) * 8,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\xff\xff\xff\xff\x00\x00\x00\x00",
        (4097).to_bytes(4, "big") + b"\x00" * 4 + b"x" * 64,
        (5).to_bytes(4, "big") + b"\x00\x00\x00\x00" + b"hello",
    ):
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(payload)
            assert _dropped(sock)
    crowd = [socket.create_connection(address, timeout=10) for _ in range(100)]
    try:
        status, _ = _exchange(node.client_ports[1], _request("PUT", "/v1/kv/peer-probe", b"ok"))
        assert status == 200
        assert all(_dropped(sock) for sock in crowd)
    finally:
        for sock in crowd:
            sock.close()
    after = node.status(1)
    assert after is not None and after["term"] == before["term"] and after["role"] == "leader"
    _assert_log_clean(node)


def test_the_node_still_serves_after_the_probes(node: LocalCluster, tmp_path: Path) -> None:
    port = node.client_ports[1]
    status, _ = _exchange(port, _request("PUT", "/v1/kv/after", b"fine"))
    assert status == 200
    status, body = _exchange(port, _request("GET", "/v1/kv/after"))
    assert (status, body) == (200, b"fine")
