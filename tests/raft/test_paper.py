"""One test per rule of the Raft paper (and the dissertation's extensions), in paper order.

Each test drives RawNodes directly, or through the small harness in tests/raft/harness.py,
and checks the exact rule its docstring cites.
"""

from __future__ import annotations

import random

import pytest

from kvstore.raft.config import RaftConfig
from kvstore.raft.node import CAMPAIGN_TRANSFER, RawNode
from kvstore.raft.types import ConfState, Entry, HardState, Message, MessageType, Ready, Role
from kvstore.storage.memory import MemoryStorage
from tests.raft.harness import Cluster

VOTE = MessageType.VOTE
APPEND = MessageType.APPEND


def make_node(
    node_id: int = 1,
    peers: tuple[int, ...] = (1, 2, 3),
    *,
    terms: tuple[int, ...] = (),
    hard_state: HardState | None = None,
    **config: object,
) -> tuple[RawNode, MemoryStorage]:
    """A node whose storage already holds entries with `terms` at indexes 1, 2, ..."""
    storage = MemoryStorage(ConfState(voters=peers))
    entries = [Entry(term, index) for index, term in enumerate(terms, start=1)]
    storage.save(hard_state, entries, None)
    options: dict[str, object] = {"pre_vote": False, "check_quorum": False}
    options.update(config)
    raft_config = RaftConfig(id=node_id, peers=peers, **options)  # type: ignore[arg-type]
    return RawNode(raft_config, storage, random.Random(node_id)), storage


def drain(node: RawNode, storage: MemoryStorage) -> Ready:
    """Process one Ready as a driver would and return it."""
    ready = node.ready()
    storage.save(ready.hard_state, ready.entries, ready.snapshot)
    node.advance(ready)
    return ready


def msg(mtype: MessageType, *, from_: int, to: int, term: int, **fields: object) -> Message:
    """A message as a peer would send it; keyword-only, so that from_ and to cannot swap."""
    return Message(mtype, to=to, from_=from_, term=term, **fields)  # type: ignore[arg-type]


def make_leader(
    peers: tuple[int, ...] = (1, 2, 3), **config: object
) -> tuple[RawNode, MemoryStorage]:
    node, storage = make_node(1, peers, **config)
    node.campaign()
    for peer in peers[1:]:
        node.step(msg(MessageType.VOTE_RESPONSE, from_=peer, to=1, term=node.term))
    assert node.role is Role.LEADER
    drain(node, storage)
    return node, storage


# --- §5.1 terms ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["follower", "candidate", "leader"])
def test_any_role_adopts_a_newer_term_and_becomes_follower(role: str) -> None:
    """Current terms are exchanged whenever servers communicate; a server that sees a larger
    term updates its own and reverts to follower. Reference: Raft §5.1"""
    if role == "leader":
        node, _ = make_leader()
    else:
        node, _ = make_node()
        if role == "candidate":
            node.campaign()
    node.step(msg(APPEND, from_=2, to=1, term=node.term + 5))
    assert node.role is Role.FOLLOWER
    assert node.term == node.status().term
    assert node.leader_id == 2


def test_stale_term_requests_are_rejected() -> None:
    """A server receiving a request with a stale term rejects it (answering so that the
    sender learns the current term). Reference: Raft §5.1"""
    node, storage = make_node(terms=(1, 2), hard_state=HardState(term=3), check_quorum=True)
    node.step(msg(APPEND, from_=2, to=1, term=2, index=2, log_term=2, entries=(Entry(2, 3),)))
    ready = drain(node, storage)
    assert node.raft_log.last_index() == 2
    assert [(m.type, m.term) for m in ready.messages] == [(MessageType.APPEND_RESPONSE, 3)]
    node.step(msg(VOTE, from_=2, to=1, term=2, index=9, log_term=2))
    assert drain(node, storage).messages == ()
    assert node.vote == 0


# --- §5.2 leader election -----------------------------------------------------------------


def test_nodes_start_as_followers() -> None:
    """When servers start up, they begin as followers. Reference: Raft §5.2"""
    node, _ = make_node()
    assert node.role is Role.FOLLOWER
    assert node.leader_id == 0


def test_leader_sends_heartbeats_every_heartbeat_interval() -> None:
    """Leaders send periodic heartbeats to all followers to keep authority. Reference: Raft §5.2"""
    node, storage = make_leader(heartbeat_ticks=3)
    for _ in range(2):
        node.tick()
    assert not any(m.type is MessageType.HEARTBEAT for m in drain(node, storage).messages)
    node.tick()
    heartbeats = [m for m in drain(node, storage).messages if m.type is MessageType.HEARTBEAT]
    assert sorted(m.to for m in heartbeats) == [2, 3]


def test_follower_times_out_and_starts_election() -> None:
    """A follower that hears nothing for an election timeout increments its term, votes for
    itself and asks every other server for a vote. Reference: Raft §5.2"""
    node, storage = make_node(terms=(1,), hard_state=HardState(term=1))
    for _ in range(40):
        node.tick()
    assert node.role is Role.CANDIDATE
    assert (node.term, node.vote) == (2, 1)
    ready = drain(node, storage)
    assert ready.hard_state == HardState(term=2, vote=1, commit=0)
    votes = [m for m in ready.messages if m.type is VOTE]
    assert sorted(m.to for m in votes) == [2, 3]
    assert all((m.term, m.index, m.log_term) == (2, 1, 1) for m in votes)


@pytest.mark.parametrize(
    ("size", "granted", "rejected", "expected"),
    [
        (1, 0, 0, Role.LEADER),
        (3, 1, 0, Role.LEADER),
        (3, 0, 2, Role.FOLLOWER),
        (3, 0, 1, Role.CANDIDATE),
        (5, 2, 0, Role.LEADER),
        (5, 1, 0, Role.CANDIDATE),
        (5, 0, 3, Role.FOLLOWER),
    ],
)
def test_candidate_wins_with_a_majority_and_loses_without(
    size: int, granted: int, rejected: int, expected: Role
) -> None:
    """A candidate wins once a majority votes for it (its own vote included), and steps back
    once a majority rejects it. Reference: Raft §5.2"""
    peers = tuple(range(1, size + 1))
    node, _ = make_node(1, peers)
    node.campaign()
    voters = list(peers[1:])
    for peer in voters[:granted]:
        node.step(msg(MessageType.VOTE_RESPONSE, from_=peer, to=1, term=node.term))
    for peer in voters[granted : granted + rejected]:
        node.step(msg(MessageType.VOTE_RESPONSE, from_=peer, to=1, term=node.term, reject=True))
    assert node.role is expected


def test_one_vote_per_term_first_come_first_served() -> None:
    """Each server votes for at most one candidate in a term, first-come-first-served, and
    persists the vote before answering. Reference: Raft §5.2"""
    node, storage = make_node(hard_state=HardState(term=1))
    node.step(msg(VOTE, from_=2, to=1, term=2))
    ready = drain(node, storage)
    assert ready.hard_state == HardState(term=2, vote=2, commit=0)
    assert ready.must_sync
    assert [m.reject for m in ready.messages] == [False]
    node.step(msg(VOTE, from_=3, to=1, term=2))
    assert [m.reject for m in drain(node, storage).messages] == [True]
    node.step(msg(VOTE, from_=2, to=1, term=2))
    assert [m.reject for m in drain(node, storage).messages] == [False]


def test_candidate_returns_to_follower_on_append_from_leader_of_its_term() -> None:
    """A candidate that receives an AppendEntries from a leader whose term is at least its own
    recognizes the leader and returns to follower. Reference: Raft §5.2"""
    node, _ = make_node()
    node.campaign()
    node.step(msg(APPEND, from_=2, to=1, term=node.term))
    assert node.role is Role.FOLLOWER
    assert node.leader_id == 2


def test_election_timeouts_are_randomized() -> None:
    """Election timeouts are chosen randomly from a fixed interval, here [et, 2et), so that
    split votes are rare. Reference: Raft §5.2"""
    seen = set()
    for seed in range(50):
        storage = MemoryStorage()
        config = RaftConfig(id=1, peers=(1, 2, 3), election_ticks=10, pre_vote=False)
        node = RawNode(config, storage, random.Random(seed))
        ticks = 0
        while node.role is Role.FOLLOWER:
            node.tick()
            ticks += 1
        assert 10 <= ticks < 20
        seen.add(ticks)
    assert len(seen) > 3


# --- §5.3 log replication -------------------------------------------------------------------


def test_leader_appends_proposal_and_replicates_it() -> None:
    """The leader appends the command to its log, then issues AppendEntries carrying the
    previous entry's index and term. Reference: Raft §5.3"""
    node, storage = make_leader()
    for peer in (2, 3):
        node.step(msg(MessageType.APPEND_RESPONSE, from_=peer, to=1, term=node.term, index=1))
    drain(node, storage)
    node.propose(b"cmd")
    ready = drain(node, storage)
    assert [(e.index, e.term, e.data) for e in ready.entries] == [(2, 1, b"cmd")]
    appends = [m for m in ready.messages if m.type is APPEND]
    assert sorted(m.to for m in appends) == [2, 3]
    for m in appends:
        assert (m.index, m.log_term, m.commit) == (1, 1, 1)
        assert [e.data for e in m.entries] == [b"cmd"]


def test_leader_commits_once_a_majority_stores_the_entry() -> None:
    """An entry is committed once the leader has replicated it on a majority; the leader then
    applies it and tells followers the new commit index. Reference: Raft §5.3"""
    node, storage = make_leader(peers=(1, 2, 3, 4, 5))
    node.propose(b"cmd")
    drain(node, storage)
    node.step(msg(MessageType.APPEND_RESPONSE, from_=2, to=1, term=1, index=2))
    assert node.raft_log.committed == 0
    node.step(msg(MessageType.APPEND_RESPONSE, from_=3, to=1, term=1, index=2))
    assert node.raft_log.committed == 2
    ready = drain(node, storage)
    assert [e.data for e in ready.committed_entries] == [b"", b"cmd"]
    told = {m.to for m in ready.messages if m.type is APPEND and m.commit == 2}
    assert told == {2, 3}  # 4 and 5 are still being probed; heartbeats carry it to them


def test_follower_learns_commit_and_applies() -> None:
    """Once a follower learns an entry is committed, it applies it in log order. Reference: Raft §5.3"""
    node, storage = make_node(2)
    entries = (Entry(1, 1, data=b"a"), Entry(1, 2, data=b"b"))
    node.step(msg(APPEND, from_=1, to=2, term=1, index=0, log_term=0, entries=entries, commit=1))
    ready = drain(node, storage)
    assert [e.data for e in ready.committed_entries] == [b"a"]
    node.step(msg(MessageType.HEARTBEAT, from_=1, to=2, term=1, commit=2))
    assert [e.data for e in drain(node, storage).committed_entries] == [b"b"]


@pytest.mark.parametrize(
    ("index", "log_term", "accepted"),
    [(0, 0, True), (2, 2, True), (3, 3, True), (3, 2, False), (4, 3, False), (2, 1, False)],
)
def test_follower_rejects_append_without_matching_previous_entry(
    index: int, log_term: int, accepted: bool
) -> None:
    """A follower refuses new entries unless its log holds an entry at the previous index with
    the previous term (consistency check). Reference: Raft §5.3"""
    node, storage = make_node(2, terms=(1, 2, 3), hard_state=HardState(term=3))
    node.step(msg(APPEND, from_=1, to=2, term=3, index=index, log_term=log_term, entries=()))
    (response,) = drain(node, storage).messages
    assert response.reject is (not accepted)


@pytest.mark.parametrize(
    ("index", "log_term", "entries", "expected_terms"),
    [
        (2, 2, ((3, 3),), (1, 2, 3)),
        (1, 1, ((4, 2), (4, 3)), (1, 4, 4)),
        (0, 0, ((1, 1),), (1, 2, 3)),
        (0, 0, ((1, 1), (4, 2)), (1, 4)),
        (3, 3, ((3, 4),), (1, 2, 3, 3)),
    ],
)
def test_follower_deletes_conflicting_entries_and_appends_new_ones(
    index: int,
    log_term: int,
    entries: tuple[tuple[int, int], ...],
    expected_terms: tuple[int, ...],
) -> None:
    """If an existing entry conflicts with a new one (same index, different term), the
    follower deletes it and all that follow, then appends the new entries. Reference: Raft §5.3"""
    node, storage = make_node(2, terms=(1, 2, 3), hard_state=HardState(term=4))
    new = tuple(Entry(term, i) for term, i in entries)
    node.step(msg(APPEND, from_=1, to=2, term=4, index=index, log_term=log_term, entries=new))
    drain(node, storage)
    log = node.raft_log
    assert tuple(log.term(i) for i in range(1, log.last_index() + 1)) == expected_terms
    assert storage.last_index() == len(expected_terms)


FIGURE_7_LEADER = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)
FIGURE_7_FOLLOWERS = {
    "a": (1, 1, 1, 4, 4, 5, 5, 6, 6),
    "b": (1, 1, 1, 4),
    "c": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6),
    "d": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7),
    "e": (1, 1, 1, 4, 4, 4, 4),
    "f": (1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3),
}


@pytest.mark.parametrize("case", sorted(FIGURE_7_FOLLOWERS))
def test_leader_brings_every_figure_7_follower_in_line(case: str) -> None:
    """The leader forces followers' logs to duplicate its own: it finds the last matching
    entry, the follower deletes what follows, and the leader sends the rest (Figure 7).
    Reference: Raft §5.3"""
    cluster = Cluster(pre_vote=False, check_quorum=False)
    logs = {1: FIGURE_7_LEADER, 2: FIGURE_7_FOLLOWERS[case], 3: ()}
    for node_id, terms in logs.items():
        storage = MemoryStorage()
        storage.save(
            HardState(term=7, commit=3 if terms else 0),
            [Entry(term, i) for i, term in enumerate(terms, start=1)],
            None,
        )
        cluster.storages[node_id] = storage
        cluster.start(node_id, applied=3 if terms else 0)
    cluster.isolate(3)
    cluster.nodes[1].campaign()
    cluster.nodes[1].step(msg(MessageType.VOTE_RESPONSE, from_=3, to=1, term=8))
    assert cluster.nodes[1].role is Role.LEADER
    cluster.stabilize()
    cluster.propose(1, b"new")
    cluster.tick(10, ids=[1])
    leader_log = cluster.nodes[1].raft_log
    follower_log = cluster.nodes[2].raft_log
    assert follower_log.last_index() == leader_log.last_index() == 12
    assert follower_log.slice(1, 13) == leader_log.slice(1, 13)


def test_fast_backtracking_skips_a_term_per_round_trip() -> None:
    """After a rejection the leader skips every entry of a conflicting term in one round trip
    (the optimization sketched at the end of §5.3). Reference: Raft §5.3"""
    leader_terms = (1,) + (2,) * 50 + (5,) * 50
    follower_terms = (1,) + (3,) * 60 + (4,) * 60
    cluster = Cluster(pre_vote=False, check_quorum=False)
    for node_id, terms in {1: leader_terms, 2: follower_terms, 3: ()}.items():
        storage = MemoryStorage()
        storage.save(
            HardState(term=5, commit=1 if terms else 0),
            [Entry(t, i) for i, t in enumerate(terms, start=1)],
            None,
        )
        cluster.storages[node_id] = storage
        cluster.start(node_id, applied=1 if terms else 0)
    cluster.isolate(3)
    cluster.nodes[1].campaign()
    cluster.nodes[1].step(msg(MessageType.VOTE_RESPONSE, from_=3, to=1, term=6))
    cluster.sent.clear()
    cluster.stabilize()
    rejections = [m for m in cluster.sent if m.type is MessageType.APPEND_RESPONSE and m.reject]
    assert len(rejections) <= 3, rejections
    assert cluster.nodes[2].raft_log.last_index() == len(leader_terms) + 1


# --- §5.4 safety ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("our_terms", "index", "log_term", "granted"),
    [
        ((1, 2), 2, 2, True),
        ((1, 2), 3, 2, True),
        ((1, 2), 1, 2, False),
        ((1, 2), 5, 1, False),
        ((1, 2), 1, 3, True),
        ((), 0, 0, True),
    ],
)
def test_vote_only_for_a_log_at_least_as_up_to_date(
    our_terms: tuple[int, ...], index: int, log_term: int, granted: bool
) -> None:
    """A voter denies its vote if its own log is more up to date: compare last terms, then
    last indexes. Reference: Raft §5.4.1"""
    node, storage = make_node(2, terms=our_terms, hard_state=HardState(term=3))
    node.step(msg(VOTE, from_=1, to=2, term=4, index=index, log_term=log_term))
    (response,) = drain(node, storage).messages
    assert response.reject is (not granted)


def test_leader_does_not_count_replicas_of_earlier_terms() -> None:
    """A leader never commits an entry of an earlier term by counting replicas; it commits it
    only through a later entry of its own term. Reference: Raft §5.4.2"""
    node, storage = make_node(1, terms=(1, 2), hard_state=HardState(term=2, commit=1))
    node.campaign()
    node.step(msg(MessageType.VOTE_RESPONSE, from_=2, to=1, term=3))
    assert node.role is Role.LEADER
    drain(node, storage)
    node.step(msg(MessageType.APPEND_RESPONSE, from_=2, to=1, term=3, index=2))
    assert node.raft_log.committed == 1
    node.step(msg(MessageType.APPEND_RESPONSE, from_=2, to=1, term=3, index=3))
    assert node.raft_log.committed == 3


def test_new_leader_appends_an_empty_entry_of_its_term() -> None:
    """A new leader commits an entry of its own term at the start of its term (a no-op) so
    that earlier entries commit and ReadIndex can start. Reference: Raft §5.4.2"""
    node, storage = make_node(1, terms=(1, 1), hard_state=HardState(term=1))
    node.campaign()
    node.step(msg(MessageType.VOTE_RESPONSE, from_=2, to=1, term=2))
    ready = drain(node, storage)
    assert [(e.term, e.index, e.data) for e in ready.entries] == [(2, 3, b"")]


# --- persistence (§5 Figure 2: "updated on stable storage before responding") -----------


def test_ready_carries_state_to_persist_with_the_messages_that_depend_on_it() -> None:
    """Persistent state (term, vote, log) is updated on stable storage before responding to
    RPCs: the Ready that holds an answer also holds that state, with must_sync set.
    Reference: Raft §5.1 (Figure 2)"""
    node, storage = make_node(2, hard_state=HardState(term=1))
    node.step(
        msg(APPEND, from_=1, to=2, term=2, index=0, log_term=0, entries=(Entry(2, 1, data=b"x"),))
    )
    ready = node.ready()
    assert ready.must_sync
    assert ready.hard_state is not None and ready.hard_state.term == 2
    assert [e.data for e in ready.entries] == [b"x"]
    assert [m.index for m in ready.messages] == [1]
    storage.save(ready.hard_state, ready.entries, ready.snapshot)
    node.advance(ready)
    assert not node.has_ready()
    node.step(msg(MessageType.HEARTBEAT, from_=1, to=2, term=2, commit=1))
    ready = node.ready()
    assert ready.hard_state == HardState(term=2, vote=0, commit=1)
    assert not ready.must_sync  # a commit index alone needs no fsync


# --- extensions: pre-vote, check-quorum, transfer -------------------------------------------


def test_pre_vote_does_not_change_terms() -> None:
    """A pre-candidate asks whether it could win before incrementing its term, so a node that
    cannot win never disrupts the cluster by bumping terms. Reference: Raft dissertation §9.6"""
    node, storage = make_node(pre_vote=True, hard_state=HardState(term=3))
    node.campaign()
    assert node.role is Role.PRE_CANDIDATE
    assert node.term == 3
    ready = drain(node, storage)
    pre_votes = [m for m in ready.messages if m.type is MessageType.PRE_VOTE]
    assert [m.term for m in pre_votes] == [4, 4]
    voter, voter_storage = make_node(2, pre_vote=True, hard_state=HardState(term=3))
    voter.step(pre_votes[0])
    assert voter.term == 3 and voter.vote == 0
    (answer,) = drain(voter, voter_storage).messages
    node.step(answer)
    assert node.role is Role.CANDIDATE and node.term == 4


def test_check_quorum_leader_steps_down_without_quorum_contact() -> None:
    """With check-quorum a leader that has not heard from a majority for an election timeout
    steps down. Reference: Raft dissertation §6.2"""
    node, _ = make_leader(check_quorum=True, election_ticks=10, heartbeat_ticks=2)
    for _ in range(10):
        node.tick()
    # No follower answered anything since the election: only the leader itself is active.
    assert node.role is Role.FOLLOWER


def test_follower_in_lease_ignores_vote_requests_unless_forced() -> None:
    """A server that heard from a current leader within the minimum election timeout ignores
    RequestVote, except a campaign forced by a leadership transfer. Reference: Raft dissertation §4.2.3 and §3.10"""
    node, storage = make_node(2, check_quorum=True, hard_state=HardState(term=1))
    node.step(msg(MessageType.HEARTBEAT, from_=1, to=2, term=1))
    drain(node, storage)
    node.step(msg(VOTE, from_=3, to=2, term=2, index=5, log_term=1))
    assert node.term == 1 and drain(node, storage).messages == ()
    node.step(msg(VOTE, from_=3, to=2, term=2, index=5, log_term=1, context=CAMPAIGN_TRANSFER))
    assert node.term == 2 and node.vote == 3


# --- §5.5 crashes, §5.6 timing ----------------------------------------------------------------


def test_append_is_idempotent() -> None:
    """Raft RPCs are idempotent: a follower that receives the same AppendEntries twice (a
    retry after a crash or a duplicate) ignores what it already has. Reference: Raft §5.5"""
    node, storage = make_node(2)
    append = msg(
        APPEND,
        from_=1,
        to=2,
        term=1,
        index=0,
        log_term=0,
        entries=(Entry(1, 1), Entry(1, 2)),
        commit=1,
    )
    node.step(append)
    first = drain(node, storage)
    node.step(append)
    second = drain(node, storage)
    assert second.entries == ()
    assert [m.index for m in first.messages] == [2]
    # Below our commit index the answer is simply "I have up to my commit index".
    assert [(m.reject, m.index) for m in second.messages] == [(False, 1)]
    assert node.raft_log.last_index() == 2


def test_old_append_does_not_truncate_newer_entries() -> None:
    """A delayed AppendEntries carrying a prefix of what the follower already has must not
    truncate the entries after it. Reference: Raft §5.5"""
    node, storage = make_node(2)
    node.step(
        msg(APPEND, from_=1, to=2, term=1, index=0, log_term=0, entries=(Entry(1, 1), Entry(1, 2)))
    )
    drain(node, storage)
    node.step(msg(APPEND, from_=1, to=2, term=1, index=0, log_term=0, entries=(Entry(1, 1),)))
    drain(node, storage)
    assert node.raft_log.last_index() == 2


def test_heartbeat_interval_must_be_below_election_timeout() -> None:
    """broadcastTime << electionTimeout: the configuration refuses a heartbeat interval that is
    not below the election timeout. Reference: Raft §5.6"""
    with pytest.raises(ValueError, match="election_ticks"):
        RaftConfig(id=1, peers=(1,), election_ticks=4, heartbeat_ticks=4)
