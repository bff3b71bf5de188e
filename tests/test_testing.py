"""kvstore.testing: the public helpers an application's tests use (a real local cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.testing import Cluster, kvstore_cluster, local_cluster

pytestmark = pytest.mark.slow

__all__ = ["kvstore_cluster"]  # the fixture, imported as an application's conftest would


def test_fixture_cluster_survives_faults(kvstore_cluster: Cluster) -> None:
    cluster = kvstore_cluster
    assert cluster.nodes == (1, 2, 3) and len(cluster.endpoints) == 3
    with cluster.sync_client(timeout_s=10) as kv:
        kv.put("job/1", b"queued")
        leader = cluster.leader()
        cluster.kill(leader)
        assert cluster.wait_for_leader(other_than=leader) != leader
        assert kv.get("job/1").value == b"queued"
        kv.put("job/2", b"queued")
        cluster.restart(leader)
        assert leader in cluster.running()
        follower = next(node for node in cluster.nodes if node != cluster.leader())
        with cluster.paused(follower):
            kv.put("job/3", b"queued")  # a majority is still up
        assert [item.key for item in kv.list("job/")] == ["job/1", "job/2", "job/3"]
    assert cluster.log(leader).exists()


def test_a_temporary_data_dir_is_removed_and_every_node_stopped() -> None:
    with local_cluster(1) as cluster:
        data_dir, pid = cluster.data_dir, cluster.pid(1)
        assert pid is not None and data_dir.exists()
    assert not data_dir.exists()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
        f"/proc/{pid}/status"
    ).read_text()
