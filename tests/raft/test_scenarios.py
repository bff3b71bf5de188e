"""Scenario tests: tricky histories from the paper and from operating clusters."""

from __future__ import annotations

from dataclasses import replace

from kvstore.raft.types import Message, MessageType, Role
from tests.raft.harness import Cluster


def elect_eventually(cluster: Cluster, node_id: int) -> None:
    """Campaign until elected: the first rounds may meet votes already cast in that term."""
    for _ in range(5):
        cluster.nodes[node_id].campaign()
        cluster.stabilize()
        if cluster.nodes[node_id].role is Role.LEADER:
            return
    raise AssertionError(f"node {node_id} was not elected")


def test_figure_8_entry_of_old_term_is_not_committed_by_counting_replicas() -> None:
    """Figure 8: a leader that replicates an entry of an earlier term on a majority must not
    count it committed, because a later leader may still overwrite it. Reference: Raft §5.4.2"""
    cluster = Cluster(ids=(1, 2, 3, 4, 5), pre_vote=False, check_quorum=False)
    # (a) S1 leads and replicates x only to S2.
    cluster.elect(1)
    cluster.partition((1, 2), (3, 4, 5))
    cluster.propose(1, b"x")
    x_index = cluster.nodes[1].raft_log.last_index()
    assert cluster.nodes[2].raft_log.last_index() == x_index
    # (b) S1 crashes; S5 wins with S3 and S4, but its entries reach nobody.
    cluster.crash(1)
    cluster.heal()
    cluster.partition((2,), (3, 4, 5))
    cluster.filters.append(lambda m: not (m.from_ == 5 and m.type is MessageType.APPEND))
    cluster.elect(5)
    cluster.nodes[5].propose(b"y")
    cluster.stabilize()
    assert cluster.nodes[5].raft_log.term(x_index) > cluster.nodes[2].raft_log.term(x_index)
    # (c) S5 crashes; S1 restarts and wins with S2, S3, S4; it gets x (only) onto S3.
    cluster.crash(5)
    cluster.start(1)
    cluster.heal()

    def only_up_to_x(message: Message) -> Message:
        if message.type is MessageType.APPEND and message.to == 3:
            entries = tuple(e for e in message.entries if e.index <= x_index)
            return replace(message, entries=entries)
        return message

    cluster.transforms.append(only_up_to_x)
    cluster.cut.update({(1, 4), (4, 1)})
    elect_eventually(cluster, 1)
    assert cluster.nodes[3].raft_log.term(x_index) == cluster.nodes[1].raft_log.term(x_index)
    # x is on S1, S2, S3 (a majority) but belongs to an older term: not committed.
    assert cluster.nodes[1].raft_log.committed < x_index
    # (d) S1 crashes; S5 restarts and wins with S2, S3, S4, overwriting x everywhere.
    cluster.crash(1)
    cluster.heal()
    cluster.start(5)
    elect_eventually(cluster, 5)
    cluster.tick(5, ids=[2, 3, 4, 5])
    for node_id in (2, 3, 4, 5):
        assert b"x" not in cluster.data_applied(node_id)
        assert b"y" in cluster.data_applied(node_id)


def test_partitioned_leader_steps_down_and_rejoins_as_follower() -> None:
    """Check-quorum: a leader cut off from the majority steps down within an election timeout;
    its uncommitted entries are replaced when it rejoins. Reference: Raft dissertation §6.2"""
    cluster = Cluster(ids=(1, 2, 3, 4, 5))
    cluster.elect(1)
    cluster.propose(1, b"committed")
    cluster.partition((1, 2), (3, 4, 5))
    cluster.nodes[1].propose(b"lost")
    cluster.stabilize()
    # Check-quorum looks every election timeout: within two it has seen a silent quorum.
    cluster.tick(45, ids=[1, 2])
    assert cluster.nodes[1].role is not Role.LEADER
    cluster.tick(60, ids=[3, 4, 5])
    (new_leader,) = cluster.leaders()
    assert new_leader in (3, 4, 5)
    cluster.propose(new_leader, b"new")
    cluster.heal()
    cluster.tick(10)
    for node_id in cluster.ids:
        assert cluster.data_applied(node_id) == [b"committed", b"new"]


def test_node_with_stale_log_cannot_win_election() -> None:
    """A node whose log lacks committed entries asks for votes (and bumps terms) in vain; the
    up-to-date nodes elect one of themselves. Reference: Raft §5.4.1"""
    cluster = Cluster(pre_vote=False, check_quorum=False)
    cluster.elect(1)
    cluster.isolate(3)
    for i in range(3):
        cluster.propose(1, f"v{i}".encode())
    cluster.crash(1)
    cluster.heal()
    cluster.nodes[3].campaign()
    cluster.stabilize()
    assert cluster.nodes[3].role is not Role.LEADER
    cluster.tick(100, ids=[2, 3])
    assert cluster.leaders() == [2]
    assert cluster.data_applied(2)[:3] == [b"v0", b"v1", b"v2"]


def test_rejoining_partitioned_node_does_not_disrupt_leader_with_pre_vote() -> None:
    """A node back from a partition has campaigned in vain meanwhile; with pre-vote it never
    raised its term, so it cannot depose the healthy leader. Reference: Raft dissertation §9.6"""
    cluster = Cluster()
    cluster.elect(1)
    term = cluster.nodes[1].term
    cluster.isolate(3)
    cluster.tick(200)
    assert cluster.nodes[3].term == term
    cluster.heal()
    cluster.tick(50)
    assert cluster.leaders() == [1]
    assert cluster.nodes[1].term == term


def test_without_pre_vote_rejoining_node_raises_terms() -> None:
    """The contrast case: without pre-vote the isolated node's term runs ahead. Reference: Raft dissertation §9.6"""
    cluster = Cluster(pre_vote=False, check_quorum=False)
    cluster.elect(1)
    cluster.isolate(3)
    cluster.tick(200)
    assert cluster.nodes[3].term > cluster.nodes[1].term


def test_fast_backtracking_round_trips_on_long_divergence() -> None:
    """A follower with hundreds of divergent entries is repaired in a few round trips, not one
    per entry. Reference: Raft §5.3"""
    cluster = Cluster(ids=(1, 2, 3, 4, 5), pre_vote=False, check_quorum=False)
    cluster.elect(1)
    cluster.isolate(1)
    for i in range(200):
        cluster.nodes[1].propose(f"stale{i}".encode())
        cluster.stabilize()
    cluster.crash(1)
    cluster.heal()
    cluster.elect(2)
    for i in range(200):
        cluster.nodes[2].propose(f"new{i}".encode())
    cluster.stabilize()
    # A fresh leader starts probing at its own last index, far beyond where 1 diverged.
    cluster.crash(2)
    elect_eventually(cluster, 3)
    cluster.start(1)
    cluster.applied[1] = []
    cluster.sent.clear()
    cluster.tick(10)
    rejections = [m for m in cluster.sent if m.type is MessageType.APPEND_RESPONSE and m.reject]
    assert 1 <= len(rejections) <= 3
    assert cluster.nodes[1].raft_log.slice(1, 204) == cluster.nodes[3].raft_log.slice(1, 204)


def test_persistence_before_send_in_ready() -> None:
    """Every message in a Ready may depend on the Ready's hard state and entries, so the
    driver persists them first; here a vote answer and its vote travel in one Ready.
    Reference: Raft §5.1 (Figure 2)"""
    cluster = Cluster(pre_vote=False)
    node = cluster.nodes[2]
    node.step(Message(MessageType.VOTE, 2, 1, 1))
    ready = node.ready()
    assert [m.type for m in ready.messages] == [MessageType.VOTE_RESPONSE]
    assert ready.hard_state is not None and ready.hard_state.vote == 1
    assert ready.must_sync
    # A crash before persisting loses the vote and the answer together: nothing escaped.
    cluster.crash(2)
    cluster.start(2)
    assert cluster.nodes[2].vote == 0


def test_leader_counts_its_own_entries_only_once_they_are_persisted() -> None:
    """The leader's own match index moves at advance(), for the entries its Ready carried
    (etcd-io/raft's self-ack after stableTo), not when it appends them. Its appends may leave
    before its own save (dissertation §10.2.1), so a follower's ack can be stepped before the
    leader's copy is durable: counting that copy would commit an entry held by one follower
    and the leader's memory, which a crash of the leader then loses. Reference: Raft §5.3"""
    cluster = Cluster()
    cluster.elect(1)
    leader = cluster.nodes[1]
    committed = leader.status().commit_index
    leader.propose(b"w")
    ready = leader.ready()
    assert [entry.data for entry in ready.entries] == [b"w"]
    index = ready.entries[-1].index
    # Follower 2 gets the append early, stores the entry and acks it before the leader saves.
    for message in ready.messages:
        if message.to == 2:
            cluster.nodes[2].step(message)
    cluster.process_ready(2)
    acks = [m for m in cluster.queue if m.to == 1]
    cluster.queue.clear()
    assert [m.type for m in acks] == [MessageType.APPEND_RESPONSE] and acks[0].index == index
    leader.step(acks[0])
    assert leader.status().commit_index == committed
    # Once the leader's save returned and it advanced, its own copy counts.
    cluster.storages[1].save(ready.hard_state, ready.entries, ready.snapshot)
    leader.advance(ready)
    assert leader.status().commit_index == index
    assert leader.status().progress[1].match_index == index
    cluster.stabilize()
    assert cluster.data_applied(1) == [b"w"]


def test_single_voter_commits_its_entry_once_persisted() -> None:
    cluster = Cluster(ids=(1,))
    cluster.elect(1)
    node = cluster.nodes[1]
    node.propose(b"x")
    ready = node.ready()
    index = ready.entries[-1].index
    assert node.status().commit_index < index and not ready.committed_entries
    cluster.storages[1].save(ready.hard_state, ready.entries, ready.snapshot)
    node.advance(ready)
    assert node.status().commit_index == index
    cluster.stabilize()
    assert cluster.data_applied(1) == [b"x"]


def test_many_pipelined_appends_with_small_window_and_batches() -> None:
    """Pipelining respects the in-flight window and the byte size of each append."""
    cluster = Cluster(max_inflight_messages=2, max_size_per_message_bytes=200)
    cluster.elect(1)
    for i in range(50):
        cluster.nodes[1].propose(bytes(100) + str(i).encode())
    sent_before = len(cluster.sent)
    cluster.stabilize()
    appends = [m for m in cluster.sent[sent_before:] if m.type is MessageType.APPEND]
    assert all(sum(e.size_bytes() for e in m.entries) <= 240 for m in appends)
    cluster.tick(5)
    assert len(cluster.data_applied(3)) == 50


def test_stuck_candidate_with_higher_term_is_freed_under_check_quorum() -> None:
    """Without pre-vote, an isolated node's term runs ahead; with check-quorum, nodes in lease
    ignore its votes, so the stale leader must learn the higher term from the answers to its
    heartbeats and step down, or the node would stay a candidate forever. Reference: Raft dissertation §6.2"""
    cluster = Cluster(pre_vote=False, check_quorum=True)
    cluster.elect(1)
    cluster.isolate(3)
    cluster.tick(100)
    assert cluster.nodes[3].role is Role.CANDIDATE
    high_term = cluster.nodes[3].term
    cluster.heal()
    cluster.tick(120)
    (leader,) = cluster.leaders()
    assert cluster.nodes[leader].term > high_term
    assert {node.term for node in cluster.nodes.values()} == {cluster.nodes[leader].term}
