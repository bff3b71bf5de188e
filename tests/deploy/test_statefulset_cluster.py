"""Three real `kvstore serve` processes configured exactly as the StatefulSet configures its
pods, on 127.0.0.1: they must find each other and elect a leader.

The environment of pod kvstore-N is read from deploy/kubernetes/ (ConfigMap, env, downward
API fields, $(VAR) references); only what cannot be the same on one machine is changed: the
listen addresses (free 127.0.0.1 ports instead of 0.0.0.0:7001/7101), the data directory, and
KVSTORE_RESOLVE, which maps each pod's DNS name kvstore-N.kvstore-peer:7101 to its 127.0.0.1
peer port the way cluster DNS would map it to the pod's IP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvstore.server.discovery import derive_statefulset_identity
from tests.deploy.deployfiles import REPO, kubernetes_object, pod_environment

REPLICAS = 3
STARTUP_DEADLINE_S = 30.0


@dataclass
class Pod:
    ordinal: int
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"


def _serve_available() -> bool:
    from kvstore import cli

    try:
        parser = cli.build_parser()
    except ImportError:
        return False
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    has_serve = any("serve" in action.choices for action in actions)
    return has_serve and (REPO / "kvstore" / "__main__.py").exists()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pod_process_environment(pod: Pod, pods: list[Pod], data_dir: Path) -> dict[str, str]:
    manifest = pod_environment(pod.ordinal)
    # The peer addresses every node derives, mapped like cluster DNS maps them to pod IPs.
    _, peers = derive_statefulset_identity(
        manifest["KVSTORE_HOSTNAME"],
        int(manifest["KVSTORE_STATEFULSET_REPLICAS"]),
        manifest["KVSTORE_PEER_SERVICE"],
        int(manifest["KVSTORE_PEER_PORT"]),
    )
    resolve = ",".join(f"{peers[p.ordinal + 1]}=127.0.0.1:{p.peer_port}" for p in pods)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return {
        **inherited,
        **manifest,
        "KVSTORE_LISTEN_CLIENT": f"127.0.0.1:{pod.client_port}",
        "KVSTORE_LISTEN_PEER": f"127.0.0.1:{pod.peer_port}",
        "KVSTORE_DATA_DIR": str(data_dir),
        "KVSTORE_RESOLVE": resolve,
    }


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            document: dict[str, Any] = json.load(response)
            return document
    except (OSError, ValueError):
        return None


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _stop(pod: Pod) -> None:
    process = pod.process
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _logs(pods: list[Pod]) -> str:
    parts = []
    for pod in pods:
        if pod.log_path is not None and pod.log_path.exists():
            tail = pod.log_path.read_text(errors="replace")[-3000:]
            parts.append(f"--- kvstore-{pod.ordinal} ---\n{tail}")
    return "\n".join(parts)


@pytest.fixture
def statefulset_pods(tmp_path: Path) -> Iterator[list[Pod]]:
    if not _serve_available():
        pytest.skip("`python -m kvstore serve` is not available yet")
    assert kubernetes_object("StatefulSet")["spec"]["replicas"] == REPLICAS
    ports = _free_ports(2 * REPLICAS)
    pods = [Pod(i, ports[2 * i], ports[2 * i + 1]) for i in range(REPLICAS)]
    try:
        for pod in pods:
            data_dir = tmp_path / f"data-kvstore-{pod.ordinal}"
            env = pod_process_environment(pod, pods, data_dir)
            pod.log_path = tmp_path / f"kvstore-{pod.ordinal}.log"
            with pod.log_path.open("wb") as log:
                pod.process = subprocess.Popen(
                    [sys.executable, "-m", "kvstore", "serve"],
                    cwd=tmp_path,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
        yield pods
    finally:
        for pod in pods:
            with contextlib.suppress(Exception):
                _stop(pod)
        for pod in pods:  # nothing may outlive the test, whatever happened above
            if pod.process is not None and pod.process.poll() is None:
                os.kill(pod.process.pid, signal.SIGKILL)
                pod.process.wait(timeout=10)


def _advertised_url(node_id: int) -> str:
    return pod_environment(node_id - 1)["KVSTORE_ADVERTISE_CLIENT_URL"]


def _agreed(statuses: dict[int, dict[str, Any] | None]) -> bool:
    """Every node names the same leader, by id and by the URL that leader's pod advertises."""
    if any(s is None for s in statuses.values()):
        return False
    leaders = {(s["leader_id"], s.get("leader_url")) for s in statuses.values() if s}
    if len(leaders) != 1:
        return False
    leader_id, leader_url = leaders.pop()
    return leader_id in range(1, REPLICAS + 1) and leader_url == _advertised_url(leader_id)


def _wait_for_agreed_leader(pods: list[Pod], deadline: float) -> dict[int, dict[str, Any]]:
    """Poll /v1/status until every node names the same leader, or fail at the deadline."""
    statuses: dict[int, dict[str, Any] | None] = {}
    while time.monotonic() < deadline:
        for pod in pods:
            assert pod.process is not None
            if pod.process.poll() is not None:
                code = pod.process.returncode
                pytest.fail(f"kvstore-{pod.ordinal} exited with {code}\n{_logs(pods)}")
        statuses = {pod.ordinal: _get_json(pod.client_url + "/v1/status") for pod in pods}
        if _agreed(statuses):
            return {k: v for k, v in statuses.items() if v is not None}
        time.sleep(0.05)
    pytest.fail(f"no agreed leader before the deadline: {statuses}\n{_logs(pods)}")


def test_statefulset_configured_nodes_elect_a_leader(statefulset_pods: list[Pod]) -> None:
    pods = statefulset_pods
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    statuses = _wait_for_agreed_leader(pods, deadline)
    # Each node took its id from its pod name, and exactly one of them leads.
    assert {ordinal: s["id"] for ordinal, s in statuses.items()} == {0: 1, 1: 2, 2: 3}
    leader_id = statuses[0]["leader_id"]
    roles = {s["id"]: str(s["role"]).lower() for s in statuses.values()}
    assert roles[leader_id].endswith("leader"), roles
    assert [r.endswith("leader") for r in roles.values()].count(True) == 1, roles
    # The probes the manifest uses answer 200 on every pod once a leader is known.
    for pod in pods:
        assert _http_status(pod.client_url + "/healthz") == 200
        while _http_status(pod.client_url + "/readyz") != 200:
            assert time.monotonic() < deadline, f"kvstore-{pod.ordinal} never ready"
            time.sleep(0.05)
