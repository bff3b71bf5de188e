"""Self-healing replacement on a real three-node cluster (docs/operations.md, "Replacing a
lost disk"): a node's data directory is deleted while writes go on, and the node is started
again with the same command line. It must heal by itself: join as a learner under a new id,
catch up from a snapshot and the log, the old id removed, the new one promoted, three voters
again; and every acknowledged write must be on the new member. Every wait polls a condition
with a deadline; processes are stopped by PID (LocalCluster)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.server.identity import read_identity
from kvstore.server.localcluster import LocalCluster, free_port, popen_serve
from tests.server.test_cluster import call, wait_until

pytestmark = pytest.mark.slow

# Small snapshots, so the new member catches up from a snapshot and then the log; a short
# stable period, so the test does not wait a second per step.
_ARGS = [
    "--snapshot-entries",
    "100",
    "--snapshot-catch-up-entries",
    "20",
    "--promote-stable-ms",
    "300",
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path, 3, extra_args=_ARGS)
    try:
        local.start()
        local.wait_for_leader(timeout_s=20)
        wait_until(lambda: all(local.status(i) for i in local.ids), 20.0, "every node up")
        yield local
    finally:
        local.stop()


class Writer(threading.Thread):
    """Writes k0, k1, ... through any node (following redirects) until stopped; remembers
    the keys whose write was acknowledged (200)."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.acked: dict[str, str] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        index = 0
        while not self.stopping.is_set():
            key, value = f"k{index:06d}", f"v{index}"
            index += 1
            for node in self.cluster.running():
                try:
                    response = call(
                        f"{self.cluster.client_url(node)}/v1/kv/{key}",
                        "PUT",
                        value.encode(),
                        timeout_s=3.0,
                    )
                except OSError:
                    continue
                if response.status == 200:
                    self.acked[key] = value
                    break


def members(cluster: LocalCluster, node: int) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = call(f"{cluster.client_url(node)}/v1/members").json()
    except (OSError, ValueError):
        return None
    return document


def _identity_id(cluster: LocalCluster, slot: int) -> int:
    identity = read_identity(cluster.data_dir(slot))
    assert identity is not None
    return identity.member_id


def wipe_and_heal(
    cluster: LocalCluster, writer: Writer, victim: int, lost_id: int
) -> dict[str, Any]:
    """SIGKILL slot `victim` (member `lost_id`), delete its data directory, start it again
    with the same command line, and wait until the leader has three voters without
    `lost_id` and no learner, and writes went on; the leader's member list then."""
    cluster.kill(victim)
    shutil.rmtree(cluster.data_dir(victim))
    written_while_down = len(writer.acked)
    cluster.start_node(victim)  # the same command line

    def healed() -> dict[str, Any] | None:
        for node in cluster.running():
            document = members(cluster, node)
            if document is None or document["leader_id"] != document["id"]:
                continue
            voters = document["voters"]
            if len(voters) == 3 and lost_id not in voters and not document["learners"]:
                return document
        return None

    document: dict[str, Any] = wait_until(healed, 40.0, f"three voters again, {lost_id} replaced")
    wait_until(lambda: len(writer.acked) >= written_while_down + 50, 20.0, "writes go on")
    return document


def test_a_node_whose_data_directory_was_lost_heals_by_itself(cluster: LocalCluster) -> None:
    writer = Writer(cluster)
    writer.start()
    try:
        wait_until(lambda: len(writer.acked) >= 150, 30.0, "150 writes before the loss")
        leader = cluster.wait_for_leader()
        victim = next(i for i in cluster.ids if i != leader)
        document = wipe_and_heal(cluster, writer, victim, lost_id=victim)
        first_id = _identity_id(cluster, victim)
        # The same slot loses its disk again: the member it became (a new id, not in
        # anyone's --peers) is replaced the same way.
        document = wipe_and_heal(cluster, writer, victim, lost_id=first_id)
    finally:
        writer.stopping.set()
        writer.join(10)

    identity = read_identity(cluster.data_dir(victim))
    assert identity is not None and identity.joined and identity.name == str(victim)
    new_id = identity.member_id
    assert new_id > first_id > 3 and new_id in document["voters"]
    assert {victim, first_id} <= set(document["removed"])
    entry = document["members"][str(new_id)]
    assert entry["name"] == str(victim) and entry["replaces"] == first_id
    assert entry["peer_address"] == cluster.peer_listen[victim]

    # The new member answers as itself and has applied everything the leader committed.
    leader_status = cluster.status(document["id"])
    assert leader_status is not None
    commit = leader_status["commit_index"]

    def caught_up() -> bool:
        status = cluster.status(victim)
        return status is not None and status["id"] == new_id and status["applied_index"] >= commit

    wait_until(caught_up, 20.0, "the new member applied the leader's commit index")
    new_status = cluster.status(victim)
    assert new_status is not None and new_status["name"] == str(victim)
    new_url = cluster.client_url(victim)
    missing = []
    for key, value in writer.acked.items():
        response = call(
            f"{new_url}/v1/kv/{urllib.parse.quote(key)}?consistency=stale", follow=False
        )
        if response.status != 200 or response.body != value.encode():
            missing.append(key)
    assert not missing, (
        f"{len(missing)} acknowledged writes missing on the new member: {missing[:5]}"
    )
    log = cluster.log_path(victim).read_text()
    assert "event=cluster_exists" in log and f"member_id={new_id}" in log
    assert "snapshot_restored" in log, "the new member caught up from a snapshot"
    # Every node agrees on the membership.
    for node in cluster.ids:
        listed = members(cluster, node)
        assert listed is not None and sorted(listed["voters"]) == sorted(document["voters"]), (
            json.dumps(listed)
        )


def test_serve_join_adds_a_learner_that_the_operator_promotes(cluster: LocalCluster) -> None:
    """`kvstore serve --join URL --join-as-learner`: a new process joins a running cluster
    under the next id, catches up, stays a learner (the healer promotes only members that
    asked for it) until `member promote`; `member add`'s name and addresses are listed."""
    port_client, port_peer = free_port(), free_port()
    data_dir = cluster.base_dir / "joiner"
    command = [
        sys.executable, "-m", "kvstore", "serve", "--id", "9",
        "--join", ",".join(cluster.client_urls),
        "--join-as-learner", "true",
        "--cluster-id", cluster.cluster_id,
        "--cluster-secret-file", str(cluster.secret_path),
        "--listen-client", f"127.0.0.1:{port_client}",
        "--listen-peer", f"127.0.0.1:{port_peer}",
        "--data-dir", str(data_dir),
        *_ARGS,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with open(cluster.base_dir / "joiner.log", "wb") as log:
        # It stops when this test process dies, even by SIGKILL (popen_serve's pipe).
        process, parent_pipe = popen_serve(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        for index in range(50):
            call(f"{cluster.client_urls[0]}/v1/kv/j{index}", "PUT", b"x")
        leader = cluster.wait_for_leader()

        def joined() -> dict[str, Any] | None:
            document = members(cluster, leader)
            if document is None or not document["learners"]:
                return None
            entry = document["members"][str(document["learners"][0])]
            return document if entry.get("lag", 1 << 30) <= 5 else None

        document = wait_until(joined, 30.0, "the joined learner caught up")
        member = document["learners"][0]
        assert member == 4 and document["members"]["4"]["name"] == "9"
        assert document["members"]["4"]["peer_address"] == f"127.0.0.1:{port_peer}"
        identity = read_identity(data_dir)
        assert identity is not None and identity.member_id == 4 and identity.joined
        # Caught up for longer than --promote-stable-ms, and still a learner.
        time.sleep(0.6)  # the healer's period; the assertion is on state, not on timing
        again = members(cluster, leader)
        assert again is not None and again["learners"] == [4]
        promoted = subprocess.run(
            [sys.executable, "-m", "kvstore", "member", "promote", "4", "--endpoints",
             ",".join(cluster.client_urls)],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip
        assert promoted.returncode == 0, promoted.stderr
        final = members(cluster, leader)
        assert final is not None and final["voters"] == [1, 2, 3, 4]
        status = call(f"http://127.0.0.1:{port_client}/v1/status").json()
        assert status["id"] == 4 and status["voters"] == [1, 2, 3, 4]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if parent_pipe is not None:
            os.close(parent_pipe)


def test_a_lost_disk_heals_with_peer_tls_too(tmp_path: Path) -> None:
    """With mutual TLS between peers the certificates name the slots
    (urn:kvstore:node:<slot>, `kvstore certs init`); the member that replaces slot 3 under
    a new id presents slot 3's certificate, which the others accept for the member holding
    that slot."""
    cluster = LocalCluster(tmp_path, 3, tls=True, extra_args=_ARGS)
    try:
        cluster.start()
        leader = cluster.wait_for_leader(timeout_s=20)
        victim = next(i for i in cluster.ids if i != leader)
        cluster.kill(victim)
        shutil.rmtree(cluster.data_dir(victim))
        cluster.start_node(victim)

        def healed() -> bool:
            status = cluster.status(leader)
            mine = cluster.status(victim)
            return (
                status is not None
                and mine is not None
                and mine["id"] != victim
                and sorted(status["voters"]) == sorted({*cluster.ids, mine["id"]} - {victim})
                and not status["learners"]
            )

        cluster.wait_until(healed, 40.0, "the slot healed under a new id with peer TLS")
    finally:
        cluster.stop()
