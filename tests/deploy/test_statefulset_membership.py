"""The StatefulSet's membership in the process-level harness of test_deployed_cluster.py: real
`kvstore serve` processes configured exactly as deploy/kubernetes/ configures pod kvstore-N
(deploy/README.md, "Kubernetes: a lost volume, scaling").

- A pod whose volume is lost comes back with an empty data directory and the same command
  line: it joins as a learner under a new id, the leader removes the id its slot held and
  promotes it, and every acknowledged write is on it.
- Scaling up 3 -> 5 starts kvstore-3 and kvstore-4 with the same template: they join (never
  bootstrap) and are promoted while writes go on; one of them loses its volume and heals into
  its slot as well. Scaling down 5 -> 3 is the documented operator step, `kvstore member
  remove --name` for the slots above the new size, then the pods go.

Every pod that may exist (kvstore-0..4) gets its 127.0.0.1 ports and its KVSTORE_RESOLVE entry
up front, as the headless Service's DNS names a pod once it exists. Waits are conditions with
deadlines.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deployfiles import kubernetes_object
from tests.deploy.test_deployed_cluster import (
    STARTUP_DEADLINE_S,
    Node,
    _free_ports,
    _get_json,
    _get_value,
    _logs,
    _put,
    _serve_available,
    _start,
    _stop,
    pod_launch,
    stop_all,
)

SCALED_REPLICAS = 5
HEAL_DEADLINE_S = 45.0


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[list[Node]]:
    """kvstore-0..4 with ports and resolver entries; kvstore-0..2 (spec.replicas) started."""
    if not _serve_available():
        pytest.skip("`python -m kvstore serve` (with DiskStorage) is not available yet")
    replicas = kubernetes_object("StatefulSet")["spec"]["replicas"]
    ports = _free_ports(2 * SCALED_REPLICAS)
    nodes = [
        Node(pod_launch(ordinal), ports[2 * ordinal], ports[2 * ordinal + 1])
        for ordinal in range(SCALED_REPLICAS)
    ]
    try:
        for node in nodes[:replicas]:
            _start(node, nodes, tmp_path)
        yield nodes
    finally:
        stop_all(nodes)


def _running(nodes: list[Node]) -> list[Node]:
    return [n for n in nodes if n.process is not None and n.process.poll() is None]


def _leader_members(nodes: list[Node]) -> tuple[Node, dict[str, Any]] | None:
    """The running node that says it leads, and its GET /v1/members; None if none does."""
    for node in _running(nodes):
        status = _get_json(node.client_url + "/v1/status")
        if status and str(status.get("role", "")).lower().endswith("leader"):
            members = _get_json(node.client_url + "/v1/members")
            if members is not None and members.get("leader_id") == status.get("id"):
                return node, members
    return None


def _voters_by_name(members: dict[str, Any]) -> dict[str, int]:
    """{name (the slot): member id} of the voters, with no learner left."""
    if members.get("learners"):
        return {}
    infos = members["members"]
    return {str(infos[str(v)]["name"]): int(v) for v in members["voters"]}


def _wait_for_voters(
    nodes: list[Node],
    names: set[str],
    deadline: float,
    keys: list[str] | None = None,
    gone: int = 0,
) -> dict[str, Any]:
    """Poll the leader until its voters are exactly the members named `names` (no learner),
    member `gone` not among them; with `keys`, write one more key per round meanwhile (the
    writes go on)."""
    members: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process is not None and node.process.poll() not in (None, 0):
                pytest.fail(f"{node.launch.name} exited with {node.process.returncode}")
        if keys is not None:
            key = f"during-{len(keys)}"
            _put(_running(nodes), key, key.encode(), deadline)
            keys.append(key)
        found = _leader_members(nodes)
        if found is not None:
            members = found[1]
            voters = _voters_by_name(members)
            if set(voters) == names and gone not in voters.values():
                return members
        time.sleep(0.1)
    pytest.fail(f"voters never became {sorted(names)}: {members}\n{_logs(nodes)}")


def _assert_every_write_on(nodes: list[Node], keys: list[str]) -> None:
    for node in nodes:
        missing = [key for key in keys if _get_value(node, key) != key.encode()]
        assert not missing, f"{node.launch.name} lacks acknowledged writes {missing[:5]}"


def _lose_volume(
    lost: Node, pods: list[Node], tmp_path: Path, keys: list[str], deadline: float
) -> None:
    """The pod dies with its volume; the others acknowledge writes meanwhile; the
    StatefulSet's new pod starts with the same command line and an empty volume."""
    assert lost.process is not None
    lost.process.kill()
    lost.process.wait(timeout=10)
    shutil.rmtree(tmp_path / f"data-{lost.launch.name}")
    for _ in range(5):
        keys.append(f"gone-{len(keys)}")
        _put(_running(pods), keys[-1], keys[-1].encode(), deadline)
    _start(lost, pods, tmp_path)


def test_a_pod_that_lost_its_volume_heals_into_its_slot(pods: list[Node], tmp_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    bootstrap = pods[:3]
    members = _wait_for_voters(bootstrap, {"1", "2", "3"}, deadline)
    keys = [f"before-{i}" for i in range(20)]
    for key in keys:
        _put(bootstrap, key, key.encode(), deadline)
    lost = pods[1]  # kvstore-1 (slot 2), whatever its role
    _lose_volume(lost, pods, tmp_path, keys, deadline)
    heal_deadline = time.monotonic() + HEAL_DEADLINE_S
    members = _wait_for_voters(bootstrap, {"1", "2", "3"}, heal_deadline, keys, gone=2)
    new_id = _voters_by_name(members)["2"]
    assert new_id != 2, "a wiped pod must never vote under the id its slot held"
    assert 2 in members["removed"]
    # The members dial it at its pod's DNS name (its slot), not its listen address.
    assert members["members"][str(new_id)]["peer_address"] == lost.launch.peer_address
    log = (tmp_path / f"{lost.launch.name}.log").read_text(errors="replace")
    assert "event=joined" in log and "replaces=2" in log
    _assert_every_write_on(bootstrap, keys)


def test_scaling_the_statefulset_up_and_down(pods: list[Node], tmp_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    _wait_for_voters(pods[:3], {"1", "2", "3"}, deadline)
    keys: list[str] = []
    # `kubectl scale statefulset/kvstore --replicas=5`: kvstore-3 and kvstore-4 start with the
    # same template; they join as learners and the leader promotes them once caught up.
    for node in pods[3:]:
        _start(node, pods, tmp_path)
    deadline = time.monotonic() + HEAL_DEADLINE_S
    members = _wait_for_voters(pods, {"1", "2", "3", "4", "5"}, deadline, keys)
    by_name = _voters_by_name(members)
    assert by_name["4"] not in (1, 2, 3) and by_name["5"] not in (1, 2, 3)
    for node in pods[3:]:
        member = members["members"][str(by_name[str(node.launch.node_id)])]
        assert member["peer_address"] == node.launch.peer_address
        log = (tmp_path / f"{node.launch.name}.log").read_text(errors="replace")
        assert "event=joined" in log and "event=bootstrap" not in log
    _assert_every_write_on(pods, keys)

    # A pod of the scaled-up part loses its volume: it heals into its slot (name 5) too.
    _lose_volume(pods[4], pods, tmp_path, keys, deadline)
    old = by_name["5"]
    members = _wait_for_voters(pods, {"1", "2", "3", "4", "5"}, deadline, keys, gone=old)
    by_name = _voters_by_name(members)
    assert old in members["removed"] and by_name["5"] != old

    # Scaling down to 3 (deploy/README.md): first `kvstore member remove --name` for every
    # slot above the new size, highest first, then `kubectl scale --replicas=3`.
    for name in ("5", "4"):
        found = _leader_members(pods)
        assert found is not None
        leader = found[0]
        endpoints = [leader.client_url] + [n.client_url for n in _running(pods) if n is not leader]
        remove = ["member", "remove", "--name", name, "--endpoints", ",".join(endpoints)]
        done = subprocess.run(
            [sys.executable, "-m", "kvstore", *remove],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        keys.append(f"after-remove-{name}")
        _put(_running(pods), keys[-1], keys[-1].encode(), deadline)
    members = _wait_for_voters(pods, {"1", "2", "3"}, deadline, keys)
    assert {by_name["4"], by_name["5"]} <= set(members["removed"])
    for node in reversed(pods[3:]):  # the controller stops kvstore-4, then kvstore-3
        _stop(node)
    for i in range(5):  # three voters of three: writes go on without the removed pods
        keys.append(f"scaled-down-{i}")
        _put(pods[:3], keys[-1], keys[-1].encode(), deadline)
    _assert_every_write_on(pods[:3], keys)
