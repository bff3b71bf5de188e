"""First end-to-end checks of the core through the test harness."""

from __future__ import annotations

from kvstore.raft.types import Role
from tests.raft.harness import Cluster


def test_three_nodes_elect_by_ticks_and_replicate() -> None:
    cluster = Cluster()
    cluster.tick(60)
    leaders = cluster.leaders()
    assert len(leaders) == 1
    leader = leaders[0]
    for i in range(10):
        cluster.propose(leader, f"v{i}".encode())
    cluster.tick(10)
    for node_id in cluster.ids:
        assert cluster.data_applied(node_id) == [f"v{i}".encode() for i in range(10)]


def test_single_node_elects_itself_and_commits() -> None:
    cluster = Cluster(ids=(1,))
    cluster.tick(45)
    assert cluster.nodes[1].role is Role.LEADER
    cluster.propose(1, b"x")
    assert cluster.data_applied(1) == [b"x"]


def test_isolated_leader_steps_down_and_cluster_recovers() -> None:
    cluster = Cluster()
    cluster.elect(1)
    cluster.isolate(1)
    cluster.tick(100)
    assert cluster.nodes[1].role is not Role.LEADER
    new_leaders = [i for i in cluster.leaders() if i != 1]
    assert len(new_leaders) == 1
    cluster.heal()
    cluster.tick(20)
    assert cluster.leaders() == new_leaders
    cluster.propose(new_leaders[0], b"after")
    cluster.tick(5)
    for node_id in cluster.ids:
        assert cluster.data_applied(node_id) == [b"after"]


def test_restart_keeps_log_and_rejoins() -> None:
    cluster = Cluster()
    cluster.elect(1)
    cluster.propose(1, b"a")
    cluster.crash(2)
    cluster.propose(1, b"b")
    cluster.start(2, applied=0)
    cluster.applied[2] = []
    cluster.tick(10)
    assert cluster.data_applied(2) == [b"a", b"b"]
    assert cluster.leaders() == [1]
