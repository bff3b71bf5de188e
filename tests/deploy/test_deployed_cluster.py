"""Three real `kvstore serve` processes per deployment layout, each configured exactly as the
deployment configures it, on 127.0.0.1: they must find each other and elect a leader.

Layouts: the Kubernetes StatefulSet (the environment of pod kvstore-N read from
deploy/kubernetes/: ConfigMap, env, downward-API fields, $(VAR) references; no KVSTORE_ID, no
KVSTORE_PEERS), the Compose services, and the systemd unit (its ExecStart arguments with the
instance id, and the example environment file). Only what cannot be the same on one machine is
changed: the listen addresses (free 127.0.0.1 ports instead of 0.0.0.0:7001/7101), the data
directory, the cluster secret file (a local file for the Secret or file a deployment mounts),
and KVSTORE_RESOLVE, which maps each node's peer address (kvstore-N.kvstore-peer:7101,
kvstore-N:7101, kvN.example.internal:7101) to its 127.0.0.1 peer port, the way DNS maps it to
the pod's or host's IP.
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
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvstore.server.discovery import derive_statefulset_identity
from kvstore.server.localcluster import popen_serve
from tests.deploy.deployfiles import (
    DEPLOY,
    REPO,
    compose_environment,
    compose_file,
    dockerfile_healthcheck,
    env_file,
    kubernetes_object,
    pod_environment,
    with_test_secret,
)

REPLICAS = 3
STARTUP_DEADLINE_S = 30.0


@dataclass(frozen=True)
class Launch:
    """One node as a deployment starts it, before the changes one machine forces."""

    name: str
    node_id: int
    peer_address: str  # what the other nodes dial for this one
    advertised_url: str
    env: dict[str, str]
    serve_args: tuple[str, ...] = ()  # after `kvstore serve`


@dataclass
class Node:
    launch: Launch
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # The write end of the pipe the node watches (LocalCluster's popen_serve): it stops when
    # this is closed or the test process dies, so a killed run leaves no node behind.
    parent_pipe: int | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"


def statefulset_layout(tmp_path: Path) -> list[Launch]:
    replicas = kubernetes_object("StatefulSet")["spec"]["replicas"]
    assert replicas == REPLICAS
    return [pod_launch(ordinal) for ordinal in range(replicas)]


def pod_launch(ordinal: int) -> Launch:
    """Pod kvstore-<ordinal> of the StatefulSet (one of a set scaled up, too)."""
    env = pod_environment(ordinal)
    node_id, peers, _ = derive_statefulset_identity(
        env["KVSTORE_HOSTNAME"],
        int(env["KVSTORE_STATEFULSET_REPLICAS"]),
        env["KVSTORE_PEER_SERVICE"],
        int(env["KVSTORE_PEER_PORT"]),
    )
    url = env["KVSTORE_ADVERTISE_CLIENT_URL"]
    return Launch(env["KVSTORE_HOSTNAME"], node_id, peers[node_id], url, env)


def compose_layout(tmp_path: Path) -> list[Launch]:
    launches = []
    for name, service in sorted(compose_file()["services"].items()):
        env = compose_environment(service)
        node_id = int(env["KVSTORE_ID"])
        peer_port = env["KVSTORE_LISTEN_PEER"].rpartition(":")[2]
        url = env["KVSTORE_ADVERTISE_CLIENT_URL"]
        launches.append(Launch(name, node_id, f"{name}:{peer_port}", url, env))
    return launches


def systemd_layout(tmp_path: Path) -> list[Launch]:
    unit = (DEPLOY / "systemd" / "kvstore@.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    shared = env_file(DEPLOY / "systemd" / "kvstore.env.example")
    peers = dict(item.split("=", 1) for item in shared["KVSTORE_PEERS"].split(","))
    launches = []
    for node_id in range(1, REPLICAS + 1):
        argv = exec_start.removeprefix("ExecStart=").split()
        assert argv[1] == "serve"
        args = [a.replace("%i", str(node_id)).replace("%S", str(tmp_path)) for a in argv[2:]]
        # deploy/README.md: each host's file names that host in the advertised URL.
        host = peers[str(node_id)].rpartition(":")[0]
        url = f"http://{host}:{shared['KVSTORE_LISTEN_CLIENT'].rpartition(':')[2]}"
        env = {**shared, "KVSTORE_ADVERTISE_CLIENT_URL": url}
        launches.append(
            Launch(f"kvstore@{node_id}", node_id, peers[str(node_id)], url, env, tuple(args))
        )
    return launches


LAYOUTS = {"statefulset": statefulset_layout, "compose": compose_layout, "systemd": systemd_layout}


def _serve_available() -> bool:
    from kvstore import cli

    try:
        parser = cli.build_parser()
    except ImportError:
        return False
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    has_serve = any("serve" in action.choices for action in actions)
    # `kvstore serve` keeps its log on disk: without DiskStorage it cannot start.
    has_disk = (REPO / "kvstore" / "storage" / "disk.py").exists()
    return has_serve and has_disk and (REPO / "kvstore" / "__main__.py").exists()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def process_environment(node: Node, nodes: list[Node], data_dir: Path) -> dict[str, str]:
    resolve = ",".join(
        [f"{n.launch.peer_address}=127.0.0.1:{n.peer_port}" for n in nodes]
        # The advertised client URLs too: a node that lost its volume joins through them.
        + [f"{_host_port(n.launch.advertised_url)}=127.0.0.1:{n.client_port}" for n in nodes]
    )
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return {
        **inherited,
        **with_test_secret(node.launch.env),
        "KVSTORE_LISTEN_CLIENT": f"127.0.0.1:{node.client_port}",
        "KVSTORE_LISTEN_PEER": f"127.0.0.1:{node.peer_port}",
        "KVSTORE_DATA_DIR": str(data_dir),
        "KVSTORE_RESOLVE": resolve,
    }


def _host_port(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


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


def _stop(node: Node) -> None:
    """SIGTERM (a leader hands over leadership), then SIGKILL if it does not exit in time."""
    process = node.process
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    _wait_stopped(node)


def _wait_stopped(node: Node) -> None:
    """Wait for a process that was sent SIGTERM; SIGKILL it if it does not exit in time."""
    process = node.process
    if process is None:
        return
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _logs(nodes: list[Node]) -> str:
    parts = []
    for node in nodes:
        if node.log_path is not None and node.log_path.exists():
            tail = node.log_path.read_text(errors="replace")[-3000:]
            parts.append(f"--- {node.launch.name} ---\n{tail}")
    return "\n".join(parts)


def _start(node: Node, nodes: list[Node], workdir: Path) -> None:
    data_dir = workdir / f"data-{node.launch.name}"
    env = process_environment(node, nodes, data_dir)
    node.log_path = workdir / f"{node.launch.name}.log"
    _close_parent_pipe(node)
    with node.log_path.open("ab") as log:
        node.process, node.parent_pipe = popen_serve(
            [sys.executable, "-m", "kvstore", "serve", *node.launch.serve_args],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _close_parent_pipe(node: Node) -> None:
    if node.parent_pipe is not None:
        os.close(node.parent_pipe)
        node.parent_pipe = None


def stop_all(nodes: list[Node]) -> None:
    """Stop every node that runs, whatever happened before: nothing may outlive the test."""
    for node in nodes:  # SIGTERM to all first: they shut down in parallel
        if node.process is not None and node.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.process.pid, signal.SIGTERM)
    for node in nodes:
        with contextlib.suppress(Exception):
            _wait_stopped(node)
    for node in nodes:  # nothing may outlive the test, whatever happened above
        if node.process is not None and node.process.poll() is None:
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=10)
        _close_parent_pipe(node)


@pytest.fixture(params=sorted(LAYOUTS))
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Node]]:
    if not _serve_available():
        pytest.skip("`python -m kvstore serve` (with DiskStorage) is not available yet")
    launches = LAYOUTS[request.param](tmp_path)
    ports = _free_ports(2 * len(launches))
    nodes = [Node(launch, ports[2 * i], ports[2 * i + 1]) for i, launch in enumerate(launches)]
    try:
        for node in nodes:
            _start(node, nodes, tmp_path)
        yield nodes
    finally:
        stop_all(nodes)


def _agreed(nodes: list[Node], statuses: dict[int, dict[str, Any] | None]) -> bool:
    """Every node names the same leader, by id and by the URL that leader advertises."""
    if any(s is None for s in statuses.values()):
        return False
    leaders = {(s["leader_id"], s.get("leader_url")) for s in statuses.values() if s}
    if len(leaders) != 1:
        return False
    leader_id, leader_url = leaders.pop()
    urls = {n.launch.node_id: n.launch.advertised_url for n in nodes}
    return leader_id in urls and leader_url == urls[leader_id]


def _wait_for_agreed_leader(nodes: list[Node], deadline: float) -> dict[int, dict[str, Any]]:
    """Poll /v1/status until every node names the same leader, or fail at the deadline."""
    statuses: dict[int, dict[str, Any] | None] = {}
    while time.monotonic() < deadline:
        for node in nodes:
            assert node.process is not None
            if node.process.poll() is not None:
                code = node.process.returncode
                pytest.fail(f"{node.launch.name} exited with {code}\n{_logs(nodes)}")
        statuses = {n.launch.node_id: _get_json(n.client_url + "/v1/status") for n in nodes}
        if _agreed(nodes, statuses):
            return {k: v for k, v in statuses.items() if v is not None}
        time.sleep(0.05)
    pytest.fail(f"no agreed leader before the deadline: {statuses}\n{_logs(nodes)}")


def _wait_ready(node: Node, deadline: float) -> None:
    while _http_status(node.client_url + "/readyz") != 200:
        assert time.monotonic() < deadline, f"{node.launch.name} never ready"
        time.sleep(0.05)


def test_configured_nodes_elect_a_leader(
    cluster: list[Node], request: pytest.FixtureRequest
) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    statuses = _wait_for_agreed_leader(cluster, deadline)
    # Each node has the id its deployment gives it (the pod's ordinal + 1 in StatefulSet mode).
    assert {node_id: s["id"] for node_id, s in statuses.items()} == {1: 1, 2: 2, 3: 3}
    roles = {node_id: str(s["role"]).lower() for node_id, s in statuses.items()}
    leader_id = statuses[1]["leader_id"]
    assert roles[leader_id].endswith("leader"), roles
    assert [r.endswith("leader") for r in roles.values()].count(True) == 1, roles
    # The probes the deployments use answer 200 on every node once a leader is known, and
    # the image's HEALTHCHECK command passes against a real node.
    for node in cluster:
        assert _http_status(node.client_url + "/healthz") == 200
        _wait_ready(node, deadline)
    if request.node.callspec.params["cluster"] != "statefulset":
        return  # the checks below do not depend on the layout: once is enough
    healthcheck = [sys.executable, *dockerfile_healthcheck()[1][1:]]
    check_env = {"KVSTORE_LISTEN_CLIENT": f"0.0.0.0:{cluster[0].client_port}"}
    assert subprocess.run(healthcheck, env=check_env, timeout=20).returncode == 0
    # deploy/README.md's "checking the cluster": `kvstore status` shows the leader.
    endpoints = ",".join(node.client_url for node in cluster)
    done = subprocess.run(
        [sys.executable, "-m", "kvstore", "status", "--json", "--endpoints", endpoints],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert str(statuses[leader_id]["id"]) in done.stdout and "leader" in done.stdout


def _put(nodes: list[Node], key: str, value: bytes, deadline: float) -> None:
    """PUT through any live node, following a follower's 307, retrying until the deadline."""
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            request = urllib.request.Request(
                f"{node.client_url}/v1/kv/{key}", data=value, method="PUT"
            )
            status = _send(request)
            if status == 200:
                return
        time.sleep(0.05)
    pytest.fail(f"PUT {key} did not succeed before the deadline\n{_logs(nodes)}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _send(request: urllib.request.Request) -> int | None:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=2.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        location = error.headers.get("Location", "")
        if error.code == 307 and location.startswith("http://127.0.0.1:"):
            redirected = urllib.request.Request(
                location, data=request.data, method=request.get_method()
            )
            return _send(redirected)
        return error.code
    except OSError:
        return None


def _get_value(node: Node, key: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"{node.client_url}/v1/kv/{key}", timeout=2.0) as response:
            body: bytes = response.read()
            return body
    except OSError:
        return None


def _wait_caught_up(node: Node, nodes: list[Node], deadline: float) -> None:
    """deploy/README.md's rule: ready, and applied what the leader had committed."""
    _wait_ready(node, deadline)
    statuses = _wait_for_agreed_leader([n for n in nodes if n.process is not None], deadline)
    leader_commit = statuses[statuses[node.launch.node_id]["leader_id"]]["commit_index"]
    while True:
        status = _get_json(node.client_url + "/v1/status") or {}
        if status.get("applied_index", -1) >= leader_commit:
            return
        assert time.monotonic() < deadline, f"{node.launch.name} did not catch up: {status}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["statefulset"], indirect=True)
def test_rolling_restart_keeps_the_cluster_writable(cluster: list[Node], tmp_path: Path) -> None:
    """The rolling restart of deploy/README.md: one node at a time, the leader last; every
    write during it succeeds and every earlier write survives."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    statuses = _wait_for_agreed_leader(cluster, deadline)
    leader_id = statuses[1]["leader_id"]
    order = sorted(cluster, key=lambda n: n.launch.node_id == leader_id)
    _put(cluster, "before", b"0", deadline)
    for step, node in enumerate(order, start=1):
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        assert node.process is not None
        _stop(node)  # SIGTERM: a leader hands over leadership first
        assert node.process.returncode == 0, f"{node.launch.name}: {node.process.returncode}"
        others = [n for n in cluster if n is not node]
        _put(others, f"during-{step}", str(step).encode(), time.monotonic() + 10.0)
        _start(node, cluster, tmp_path)
        _wait_caught_up(node, cluster, deadline)
    for node in cluster:
        assert _get_value(node, "before") == b"0"
        assert [_get_value(node, f"during-{s}") for s in (1, 2, 3)] == [b"1", b"2", b"3"]


@pytest.mark.parametrize(
    ("hostname", "message"),
    [("kvstore-10000", "above 9999"), ("kvstore", "<statefulset>-<ordinal>")],
)
def test_pod_outside_the_set_refuses_to_start(tmp_path: Path, hostname: str, message: str) -> None:
    """A pod whose name gives no valid id (renamed, an absurd ordinal) must not join under a
    guessed id: `kvstore serve` exits with status 2 and says why. (A pod of a set scaled up
    joins: tests/deploy/test_statefulset_membership.py.)"""
    if not _serve_available():
        pytest.skip("`python -m kvstore serve` (with DiskStorage) is not available yet")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env = {**inherited, **pod_environment(0), "KVSTORE_HOSTNAME": hostname}
    env["KVSTORE_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "data").exists()
