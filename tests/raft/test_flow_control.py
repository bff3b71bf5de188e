"""Work per incoming message on the leader is bounded (probe / replicate / snapshot flow).

Regression tests for a leader that locked up for 10-48 s after a partition healed: hundreds
of heartbeat responses from a lagging follower arrived at once (its stalled connection
resumed; heartbeats go out with every ReadIndex round), and each one rebuilt an append of up
to 1 MiB, or resent a snapshot. A burst of heartbeat responses may now cause at most one
append (or one snapshot) per follower per heartbeat interval, counted in ticks.
"""

from __future__ import annotations

from kvstore.raft.progress import ProgressState
from kvstore.raft.types import ConfState, Message, MessageType
from tests.raft.harness import Cluster

_BURST = 500


def _burst_of_heartbeat_responses(cluster: Cluster, leader: int, follower: int) -> list[Message]:
    """Step `_BURST` heartbeat responses from `follower` into `leader` in one go (as a resumed
    connection delivers them), and return what the leader sends to `follower` because of it."""
    node = cluster.nodes[leader]
    cluster.queue.clear()
    for _ in range(_BURST):
        node.step(Message(MessageType.HEARTBEAT_RESPONSE, leader, follower, node.term))
    cluster.process_ready(leader)
    sent = [m for m in cluster.queue if m.to == follower]
    cluster.queue.clear()
    return sent


def _lagging_follower(cluster: Cluster, entries: int) -> None:
    """Node 1 leads; node 3 misses `entries` entries and the leader probes it."""
    cluster.elect(1)
    cluster.isolate(3)
    for i in range(entries):
        cluster.propose(1, f"v{i}".encode() * 100)
    # The transport saw 3's connection close: probe it (one append in flight at a time).
    cluster.nodes[1].report_peer_down(3)
    cluster.propose(1, b"last")
    assert cluster.nodes[1].status().progress[3].state is ProgressState.PROBE


def test_burst_of_heartbeat_responses_sends_at_most_one_probe() -> None:
    cluster = Cluster()
    _lagging_follower(cluster, entries=50)
    # A heartbeat interval passes (the probe sent by the last proposal is lost).
    cluster.tick(cluster.make_config(1).heartbeat_ticks, ids=[1])
    cluster.heal()
    sent = _burst_of_heartbeat_responses(cluster, 1, 3)
    appends = [m for m in sent if m.type is MessageType.APPEND]
    assert len(appends) == 1, f"{len(appends)} appends for {_BURST} heartbeat responses"
    # Right after, within the same heartbeat interval, another burst sends nothing new.
    assert _burst_of_heartbeat_responses(cluster, 1, 3) == []
    # And the follower still catches up.
    cluster.tick(2 * cluster.make_config(1).heartbeat_ticks)
    assert cluster.nodes[3].raft_log.last_index() == cluster.nodes[1].raft_log.last_index()


def test_probe_just_sent_is_not_resent_by_heartbeat_responses() -> None:
    """A probe sent in this heartbeat interval is in flight: heartbeat responses that arrive
    meanwhile (ReadIndex rounds) must not send another one."""
    cluster = Cluster()
    _lagging_follower(cluster, entries=5)
    cluster.heal()
    assert _burst_of_heartbeat_responses(cluster, 1, 3) == []


def test_burst_of_heartbeat_responses_with_a_full_window_sends_at_most_one_append() -> None:
    cluster = Cluster(max_inflight_messages=4)
    cluster.elect(1)
    cluster.cut.add((1, 3))  # appends to 3 vanish: its window fills up
    for i in range(10):
        cluster.propose(1, f"v{i}".encode())
    progress = cluster.nodes[1].status().progress[3]
    assert progress.state is ProgressState.REPLICATE
    cluster.tick(cluster.make_config(1).heartbeat_ticks, ids=[1])
    cluster.heal()
    sent = _burst_of_heartbeat_responses(cluster, 1, 3)
    appends = [m for m in sent if m.type is MessageType.APPEND]
    assert len(appends) <= 1, f"{len(appends)} appends for {_BURST} heartbeat responses"
    cluster.tick(4 * cluster.make_config(1).heartbeat_ticks)
    assert cluster.nodes[3].raft_log.last_index() == cluster.nodes[1].raft_log.last_index()


def test_burst_of_heartbeat_responses_sends_at_most_one_snapshot() -> None:
    cluster = Cluster()
    cluster.elect(1)
    cluster.isolate(3)
    for i in range(10):
        cluster.propose(1, f"v{i}".encode())
    applied = cluster.nodes[1].status().applied_index
    cluster.storages[1].create_snapshot(applied, ConfState(voters=(1, 2, 3)), b"state")
    cluster.storages[1].compact(applied)
    cluster.nodes[1].report_peer_down(3)
    cluster.tick(cluster.make_config(1).heartbeat_ticks, ids=[1])
    cluster.heal()
    # Two bursts, as two stalled connections resuming: the snapshot is sent once, and not
    # again while it is pending (the transport has not reported on it).
    sent = _burst_of_heartbeat_responses(cluster, 1, 3)
    sent += _burst_of_heartbeat_responses(cluster, 1, 3)
    snapshots = [m for m in sent if m.type is MessageType.SNAPSHOT]
    assert len(snapshots) == 1, f"{len(snapshots)} snapshots for {2 * _BURST} responses"
    assert [m for m in sent if m.type is MessageType.APPEND] == []
    assert cluster.nodes[1].status().progress[3].state is ProgressState.SNAPSHOT


def test_snapshot_failures_are_retried_at_most_once_per_heartbeat_interval() -> None:
    """The transport reports each snapshot send as failed at once (the connection is down):
    a burst of heartbeat responses must not turn that into a snapshot per response."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.isolate(3)
    for i in range(10):
        cluster.propose(1, f"v{i}".encode())
    applied = cluster.nodes[1].status().applied_index
    cluster.storages[1].create_snapshot(applied, ConfState(voters=(1, 2, 3)), b"state")
    cluster.storages[1].compact(applied)
    cluster.nodes[1].report_peer_down(3)
    cluster.tick(cluster.make_config(1).heartbeat_ticks, ids=[1])
    node = cluster.nodes[1]
    snapshots = 0
    cluster.queue.clear()
    for _ in range(_BURST):
        node.step(Message(MessageType.HEARTBEAT_RESPONSE, 1, 3, node.term))
        if node.status().progress[3].state is ProgressState.SNAPSHOT:
            snapshots += 1
            node.report_snapshot(3, False)
    assert snapshots == 1
