"""Membership changes in the core, one rule per test (dissertation chapter 4).

Single-server changes (§4.1): add a learner, promote it, remove a member. A configuration is
in force on a node once its entry is in the node's log, committed or not, and reverts when
the entry is truncated; one change at a time; a leader proposes one only after an entry of
its own term committed. Learners get the log but never vote nor count (etcd-io/raft's
learners). A removed leader hands over (§4.2.2); a removed server cannot disrupt (§4.2.3).
"""

from __future__ import annotations

import random

import pytest

from kvstore.errors import ConfChangeRefusedError, ProposalDroppedError
from kvstore.raft import confchange
from kvstore.raft.confchange import ConfChange, ConfChangeType
from kvstore.raft.config import RaftConfig
from kvstore.raft.node import RawNode
from kvstore.raft.types import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Role,
)
from kvstore.storage.memory import MemoryStorage
from tests.raft.harness import Cluster

ADD = ConfChangeType.ADD_LEARNER
PROMOTE = ConfChangeType.PROMOTE
REMOVE = ConfChangeType.REMOVE


def change(cluster: Cluster, leader: int, kind: ConfChangeType, node: int) -> int:
    index = cluster.nodes[leader].propose_conf_change(ConfChange(kind, node))
    cluster.stabilize()
    return index


def started(ids: tuple[int, ...] = (1, 2, 3), **config: object) -> Cluster:
    cluster = Cluster(ids, **config)
    cluster.elect(1)
    return cluster


def joined(cluster: Cluster, node: int) -> None:
    """Start `node` empty and add it as a learner, then let it catch up."""
    cluster.add_node(node)
    change(cluster, 1, ADD, node)
    cluster.tick(cluster.nodes[1]._config.heartbeat_ticks)


def conf_entry(term: int, index: int, conf: ConfState, kind: ConfChangeType, node: int) -> Entry:
    data = confchange.encode(confchange.ConfChangeEntry(ConfChange(kind, node), conf))
    return Entry(term, index, EntryType.CONF_CHANGE, data)


# --- learners ------------------------------------------------------------------------------


def test_learner_gets_the_log_but_never_counts_toward_commit() -> None:
    """Learners receive replication but are not voters: a leader with only a learner's
    acknowledgement commits nothing."""
    cluster = started()
    joined(cluster, 4)
    cluster.propose(1, b"a")
    assert b"a" in cluster.data_applied(4)
    cluster.isolate(2)
    cluster.isolate(3)
    committed = cluster.nodes[1].raft_log.committed
    cluster.propose(1, b"b")
    assert cluster.nodes[4].raft_log.last_index() == cluster.nodes[1].raft_log.last_index()
    assert cluster.nodes[1].raft_log.committed == committed


def test_learner_never_campaigns_nor_takes_over_on_timeout_now() -> None:
    cluster = started()
    joined(cluster, 4)
    learner = cluster.nodes[4]
    term = learner.term
    cluster.isolate(4)
    cluster.tick(200, ids=[4])
    assert learner.role is Role.FOLLOWER and learner.term == term
    cluster.heal()
    cluster.nodes[1].transfer_leadership(4)
    cluster.stabilize()
    assert cluster.leaders() == [1]


def test_check_quorum_counts_voters_not_learners() -> None:
    """Dissertation §6.2 with learners: a leader that hears only from a learner steps down."""
    cluster = started()
    joined(cluster, 4)
    cluster.isolate(2)
    cluster.isolate(3)
    cluster.tick(2 * cluster.nodes[1]._config.election_ticks, ids=[1, 4])
    assert cluster.nodes[1].role is Role.FOLLOWER


def test_joining_node_without_configuration_takes_no_part() -> None:
    """A node started empty for an existing cluster (no peers) has no configuration: it never
    campaigns, and nothing counts it until a leader adds it."""
    cluster = started()
    cluster.add_node(4)
    node = cluster.nodes[4]
    assert node.conf_state == ConfState()
    cluster.tick(200, ids=[4])
    assert node.role is Role.FOLLOWER and node.term == 0


# --- §4.1: in force when appended, one at a time, after an entry of the leader's term -----


def test_configuration_takes_effect_on_append_not_commit() -> None:
    """Dissertation §4.1: a server uses the latest configuration in its log, committed or
    not. Here the entry reaches the follower but no acknowledgement comes back."""
    cluster = started()
    cluster.add_node(4)
    cluster.drop_types(MessageType.APPEND_RESPONSE)
    index = change(cluster, 1, ADD, 4)
    leader, follower = cluster.nodes[1], cluster.nodes[2]
    assert leader.raft_log.committed < index <= follower.raft_log.last_index()
    assert leader.learners == (4,) and follower.learners == (4,)
    assert leader.status().conf_index == index


def test_status_names_the_last_change_once_it_is_applied_too() -> None:
    """`status().conf_index` is the index of the last membership change, also after the
    change is applied and folded into the base configuration (it read 0 then)."""
    cluster = started()
    cluster.add_node(4)
    index = change(cluster, 1, ADD, 4)
    for node in (1, 2, 3):
        assert cluster.nodes[node].raft_log.applied >= index
        assert cluster.nodes[node].status().conf_index == index


def test_truncated_configuration_entry_takes_its_configuration_with_it() -> None:
    """Dissertation §4.1: when a conflicting leader truncates an uncommitted conf entry, the
    follower goes back to the configuration before it."""
    storage = MemoryStorage(ConfState(voters=(1, 2, 3)))
    node = RawNode(RaftConfig(id=2, peers=(1, 2, 3)), storage, random.Random(2))
    new_conf = ConfState(voters=(1, 2, 3), learners=(4,))
    entries = (Entry(1, 1), conf_entry(1, 2, new_conf, ADD, 4))
    node.step(Message(MessageType.APPEND, 2, 1, 1, log_term=0, index=0, entries=entries))
    assert node.learners == (4,)
    # A leader of term 2 has a different entry at index 2: ours is truncated.
    replacement = (Entry(2, 2),)
    node.step(Message(MessageType.APPEND, 2, 3, 2, log_term=1, index=1, entries=replacement))
    assert node.raft_log.last_term() == 2
    assert node.conf_state == ConfState(voters=(1, 2, 3))


def test_at_most_one_change_in_flight() -> None:
    cluster = started()
    cluster.add_node(4)
    cluster.add_node(5)
    cluster.drop_types(MessageType.APPEND_RESPONSE)
    change(cluster, 1, ADD, 4)
    with pytest.raises(ConfChangeRefusedError, match="not committed"):
        cluster.nodes[1].propose_conf_change(ConfChange(ADD, 5))
    cluster.heal()
    cluster.tick(cluster.nodes[1]._config.heartbeat_ticks)
    change(cluster, 1, ADD, 5)
    assert cluster.nodes[1].learners == (4, 5)


def test_new_leader_proposes_no_change_before_an_entry_of_its_term_commits() -> None:
    """Dissertation §4.1's fix: until an entry of its term commits, a leader may not know the
    latest committed configuration, and a change of its own could be counted by a majority
    that does not overlap one of a deposed leader's change."""
    cluster = started()
    cluster.drop_types(MessageType.APPEND_RESPONSE)
    cluster.nodes[1].transfer_leadership(2)
    cluster.stabilize()
    assert cluster.nodes[2].role is Role.LEADER
    with pytest.raises(ConfChangeRefusedError, match="not committed an entry of term"):
        cluster.nodes[2].propose_conf_change(ConfChange(ADD, 4))


def test_invalid_changes_are_refused_and_change_nothing() -> None:
    cluster = started()
    leader = cluster.nodes[1]
    before = leader.raft_log.last_index()
    for bad in (ConfChange(ADD, 2), ConfChange(PROMOTE, 2), ConfChange(REMOVE, 9)):
        with pytest.raises(ConfChangeRefusedError):
            leader.propose_conf_change(bad)
    assert leader.raft_log.last_index() == before
    with pytest.raises(ProposalDroppedError):
        cluster.nodes[2].propose_conf_change(ConfChange(ADD, 4))


def test_removed_id_is_never_reused() -> None:
    cluster = started()
    change(cluster, 1, REMOVE, 3)
    assert cluster.nodes[1].conf_state.removed == (3,)
    with pytest.raises(ConfChangeRefusedError, match="never reused"):
        cluster.nodes[1].propose_conf_change(ConfChange(ADD, 3))
    assert confchange.next_member_id(cluster.nodes[1].conf_state) == 4


def test_last_voter_cannot_be_removed() -> None:
    cluster = started((1,))
    with pytest.raises(ConfChangeRefusedError, match="last voter"):
        cluster.nodes[1].propose_conf_change(ConfChange(REMOVE, 1))


# --- promotion -----------------------------------------------------------------------------


def test_learner_is_promoted_only_when_caught_up() -> None:
    """Dissertation §4.2.1: a new voter that lags would stall commits while it catches up."""
    cluster = started(promote_lag_entries_max=5)
    cluster.add_node(4)
    cluster.isolate(4)
    change(cluster, 1, ADD, 4)
    for number in range(10):
        cluster.propose(1, b"w%d" % number)
    with pytest.raises(ConfChangeRefusedError):
        cluster.nodes[1].propose_conf_change(ConfChange(PROMOTE, 4))
    cluster.heal()
    cluster.tick(cluster.nodes[1]._config.heartbeat_ticks)
    change(cluster, 1, PROMOTE, 4)
    assert cluster.nodes[1].voters == (1, 2, 3, 4)
    # Four voters: a commit needs three of them.
    cluster.isolate(3)
    cluster.isolate(4)
    committed = cluster.nodes[1].raft_log.committed
    cluster.propose(1, b"x")
    assert cluster.nodes[1].raft_log.committed == committed


def test_promoted_learner_can_be_elected() -> None:
    cluster = started()
    joined(cluster, 4)
    change(cluster, 1, PROMOTE, 4)
    cluster.nodes[1].transfer_leadership(4)
    cluster.stabilize()
    assert cluster.leaders() == [4]


# --- removal -------------------------------------------------------------------------------


def test_removing_a_voter_shrinks_the_majority() -> None:
    cluster = started()
    change(cluster, 1, REMOVE, 3)
    cluster.isolate(2)
    committed = cluster.nodes[1].raft_log.committed
    cluster.propose(1, b"alone")
    assert cluster.nodes[1].raft_log.committed == committed  # needs 2 of {1, 2}
    cluster.heal()
    cluster.isolate(3)
    cluster.propose(1, b"pair")
    assert b"pair" in cluster.data_applied(2)


def test_removed_node_that_missed_its_removal_cannot_disrupt() -> None:
    """Dissertation §4.2.3: a server removed while cut off times out and campaigns with a
    higher term; the others drop its messages, so the leader keeps its term."""
    cluster = started()
    cluster.isolate(3)
    change(cluster, 1, REMOVE, 3)
    cluster.heal()
    leader_term = cluster.nodes[1].term
    for _ in range(10):
        cluster.nodes[3].campaign()
        cluster.tick(cluster.nodes[3]._config.election_ticks, ids=[3])
    cluster.stabilize()
    assert cluster.leaders() == [1] and cluster.nodes[1].term == leader_term
    assert cluster.nodes[2].term == leader_term


def test_leader_that_removes_itself_hands_over_and_steps_down() -> None:
    """Dissertation §4.2.2: the leader keeps managing the cluster while its removal is
    uncommitted, without counting itself; once it commits, it steps down. It first tells
    the most up-to-date voter to campaign at once, so no election timeout is lost."""
    cluster = started()
    cluster.propose(1, b"before")
    index = change(cluster, 1, REMOVE, 1)
    assert cluster.nodes[1].role is Role.FOLLOWER and cluster.nodes[1].is_removed
    assert 1 not in cluster.nodes[2].voters
    leaders = cluster.leaders()
    assert len(leaders) == 1 and leaders[0] in (2, 3)
    new_leader = leaders[0]
    cluster.propose(new_leader, b"after")
    assert b"after" in cluster.data_applied(2) and b"after" in cluster.data_applied(3)
    assert cluster.nodes[new_leader].raft_log.committed > index
    # The old leader never comes back: it knows it is out, and never campaigns again.
    term = cluster.nodes[1].term
    cluster.isolate(1)
    cluster.tick(200, ids=[1])
    assert cluster.nodes[1].term == term and cluster.nodes[1].role is Role.FOLLOWER
    cluster.heal()
    assert cluster.leaders() == [new_leader]


def test_leader_being_removed_takes_no_new_proposals() -> None:
    cluster = started()
    cluster.drop_types(MessageType.APPEND_RESPONSE)
    change(cluster, 1, REMOVE, 1)
    with pytest.raises(ProposalDroppedError, match="leaving"):
        cluster.nodes[1].propose(b"x")


# --- reads and transfer use the current configuration -------------------------------------


def test_read_index_needs_a_quorum_of_the_current_voters() -> None:
    cluster = started()
    joined(cluster, 4)
    change(cluster, 1, PROMOTE, 4)
    cluster.isolate(3)
    cluster.isolate(4)
    cluster.nodes[1].read_index()
    cluster.stabilize()
    assert cluster.read_states[1] == []  # 2 of 4 voters is no quorum
    cluster.heal()
    cluster.tick(cluster.nodes[1]._config.heartbeat_ticks)
    assert len(cluster.read_states[1]) == 1


def test_transfer_to_a_removed_member_is_ignored() -> None:
    cluster = started()
    change(cluster, 1, REMOVE, 3)
    cluster.nodes[1].transfer_leadership(3)
    cluster.stabilize()
    assert cluster.leaders() == [1] and cluster.nodes[1].lead_transferee == 0


# --- durability: snapshots and restarts -------------------------------------------------


def test_configuration_is_recovered_from_the_log_after_a_restart() -> None:
    """The ConfState is in the write-ahead log: a node restarted from storage uses the
    latest conf entry it holds, not its bootstrap peers."""
    cluster = started()
    joined(cluster, 4)
    change(cluster, 1, PROMOTE, 4)
    change(cluster, 1, REMOVE, 3)
    cluster.crash(2)
    cluster.start(2)
    assert cluster.nodes[2].conf_state == ConfState(voters=(1, 2, 4), removed=(3,))


def test_snapshot_records_the_configuration_at_its_index() -> None:
    """A snapshot stands for the log up to its index: it records the configuration of the
    last conf entry at or before that index, not a later one."""
    cluster = started()
    leader = cluster.nodes[1]
    cluster.propose(1, b"a")
    applied = leader.raft_log.applied
    before = leader.conf_state_at(applied)
    cluster.add_node(4)
    cluster.drop_types(MessageType.APPEND_RESPONSE)
    index = change(cluster, 1, ADD, 4)
    assert leader.raft_log.applied == applied < index
    assert leader.conf_state_at(applied) == before
    assert leader.conf_state_at(index).learners == (4,)


def test_learner_added_after_compaction_catches_up_from_a_snapshot() -> None:
    cluster = started()
    for number in range(5):
        cluster.propose(1, b"v%d" % number)
    leader = cluster.nodes[1]
    applied = leader.raft_log.applied
    storage = cluster.storages[1]
    storage.create_snapshot(applied, leader.conf_state_at(applied), b"state")
    storage.compact(applied)
    joined(cluster, 4)
    assert (4, applied) in cluster.snapshots_installed
    learner = cluster.nodes[4]
    assert learner.conf_state == ConfState(voters=(1, 2, 3), learners=(4,))
    assert learner.raft_log.last_index() == leader.raft_log.last_index()
    cluster.crash(4)
    cluster.start(4, applied=applied)
    assert cluster.nodes[4].conf_state == ConfState(voters=(1, 2, 3), learners=(4,))


def test_replace_a_lost_voter_remove_before_promote() -> None:
    """The replacement of a voter whose disk was lost, with three voters: the dead member
    is removed first (the majority of {1, 2} is two, no worse than two of three with one
    dead), then the new one is promoted; growing to four first would need three of four."""
    cluster = started()
    cluster.propose(1, b"a")
    cluster.crash(3)
    cluster.add_node(4)
    change(cluster, 1, ADD, 4)
    cluster.tick(cluster.nodes[1]._config.heartbeat_ticks)
    change(cluster, 1, REMOVE, 3)
    change(cluster, 1, PROMOTE, 4)
    assert cluster.nodes[1].conf_state == ConfState(voters=(1, 2, 4), removed=(3,))
    cluster.propose(1, b"b")
    normal = [e.data for e in cluster.applied[4] if e.type is EntryType.NORMAL and e.data]
    assert normal == [b"a", b"b"]
