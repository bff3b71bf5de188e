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


def test_a_probe_resent_on_a_heartbeat_response_carries_no_entries() -> None:
    """A follower that answers heartbeats but not appends for a while (it loads a large
    snapshot) was sent the same probe, up to a message's size of entries, every heartbeat
    interval. The resend is empty; the follower's answer to it brings the entries."""
    cluster = Cluster()
    _lagging_follower(cluster, entries=50)
    cluster.tick(cluster.make_config(1).heartbeat_ticks, ids=[1])
    cluster.heal()
    [probe] = [m for m in _burst_of_heartbeat_responses(cluster, 1, 3)]
    assert probe.type is MessageType.APPEND and probe.entries == ()
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


def _leader_with_compacted_log(cluster: Cluster) -> int:
    """Node 1 leads; node 3 was cut off and the leader compacted past it. Returns the
    follower's match index as the leader knows it."""
    cluster.elect(1)
    match = cluster.nodes[1].status().progress[3].match_index
    cluster.isolate(3)
    for i in range(10):
        cluster.propose(1, f"v{i}".encode())
    applied = cluster.nodes[1].status().applied_index
    cluster.storages[1].create_snapshot(applied, ConfState(voters=(1, 2, 3)), b"state")
    cluster.storages[1].compact(applied)
    cluster.nodes[1].report_peer_down(3)
    cluster.tick(cluster.make_config(1).heartbeat_ticks, ids=[1])
    cluster.heal()
    return match


def test_snapshot_reported_sent_is_not_resent_for_stale_answers() -> None:
    """A follower that reconnects answers, at once, every append the leader queued for it
    while it was away: each answer names the index it already had (the leader's match
    index). The leader sends the snapshot once; the transport reports it delivered within
    a millisecond; the stale answers that keep arriving afterwards must not make it send
    the same snapshot again (a black-box run logged about 100 sends of one snapshot to one
    follower within 4 ms of its reconnecting). The follower's answer to the snapshot
    itself, at the snapshot's index, is what moves the leader on."""
    cluster = Cluster()
    match = _leader_with_compacted_log(cluster)
    node = cluster.nodes[1]
    cluster.queue.clear()
    snapshots = 0
    node.step(Message(MessageType.HEARTBEAT_RESPONSE, 1, 3, node.term))
    for _ in range(100):
        cluster.process_ready(1)
        sent = [m for m in cluster.queue if m.to == 3 and m.type is MessageType.SNAPSHOT]
        cluster.queue.clear()
        snapshots += len(sent)
        if sent:
            node.report_snapshot(3, True)  # the transport delivered it
        node.step(Message(MessageType.APPEND_RESPONSE, 1, 3, node.term, index=match))
    assert snapshots == 1, f"{snapshots} snapshots of the same index for 100 stale answers"
    # The follower's answer to the snapshot resumes replication from after it.
    snapshot_index = cluster.storages[1].snapshot().metadata.index
    node.step(Message(MessageType.APPEND_RESPONSE, 1, 3, node.term, index=snapshot_index))
    progress = node.status().progress[3]
    assert progress.state is ProgressState.REPLICATE
    assert progress.match_index == snapshot_index


def test_snapshot_reported_sent_but_never_installed_is_sent_again_once() -> None:
    """The report says the snapshot arrived, but the follower never answers it (it crashed
    before installing it): a heartbeat interval later the leader probes from after the
    snapshot (one append), the follower rejects that, and the snapshot goes out again,
    once."""
    cluster = Cluster()
    match = _leader_with_compacted_log(cluster)
    node = cluster.nodes[1]
    snapshot_index = cluster.storages[1].snapshot().metadata.index
    node.step(Message(MessageType.HEARTBEAT_RESPONSE, 1, 3, node.term))
    cluster.process_ready(1)
    assert [m.type for m in cluster.queue if m.to == 3] == [MessageType.SNAPSHOT]
    node.report_snapshot(3, True)
    cluster.queue.clear()
    assert _burst_of_heartbeat_responses(cluster, 1, 3) == []
    for _ in range(cluster.make_config(1).heartbeat_ticks):
        node.tick()  # the follower stays silent: nothing is delivered
    cluster.process_ready(1)
    sent = _burst_of_heartbeat_responses(cluster, 1, 3)
    assert [(m.type, m.index) for m in sent] == [(MessageType.APPEND, snapshot_index)]
    rejection = Message(
        MessageType.APPEND_RESPONSE,
        1,
        3,
        node.term,
        index=snapshot_index,
        reject=True,
        reject_hint=match,
    )
    cluster.queue.clear()
    for _ in range(10):
        node.step(rejection)
    cluster.process_ready(1)
    assert [m.type for m in cluster.queue if m.to == 3] == [MessageType.SNAPSHOT]


def test_rejection_sent_before_the_snapshot_does_not_resend_it() -> None:
    """An append at the snapshot's own index, sent before the snapshot and rejected by the
    follower before it installed it, may be answered after the transport reported the
    snapshot delivered (the network held the answer, or duplicated it). Since then the
    leader has sent no append, so no rejection can be an answer to one: it is stale."""
    cluster = Cluster()
    match = _leader_with_compacted_log(cluster)
    node = cluster.nodes[1]
    snapshot_index = cluster.storages[1].snapshot().metadata.index
    node.step(Message(MessageType.HEARTBEAT_RESPONSE, 1, 3, node.term))
    cluster.process_ready(1)
    assert [m.type for m in cluster.queue if m.to == 3] == [MessageType.SNAPSHOT]
    node.report_snapshot(3, True)
    cluster.queue.clear()
    stale = Message(
        MessageType.APPEND_RESPONSE,
        1,
        3,
        node.term,
        index=snapshot_index,
        reject=True,
        reject_hint=match,
    )
    for _ in range(10):
        node.step(stale)
    cluster.process_ready(1)
    assert [m for m in cluster.queue if m.to == 3] == []
