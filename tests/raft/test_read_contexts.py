"""ReadIndex contexts (dissertation §6.4): made by the core, unique across restarts, and a
follower takes only the answer to a request of its own incarnation that still awaits one.

Regression for a stale linearizable read: a follower numbered its contexts from 1 in every
process and took any answer of the current term, so after a restart in the same term its new
read could be served at the index the leader had answered to its predecessor's request,
from before a write acknowledged in between.
"""

from __future__ import annotations

import random

import pytest

from kvstore.raft import node as raft_node
from kvstore.raft.config import RaftConfig
from kvstore.raft.node import RawNode
from kvstore.raft.types import Message, MessageType, ReadState
from kvstore.storage.memory import MemoryStorage
from tests.raft.harness import Cluster


def _hold_read_rounds(cluster: Cluster) -> list[Message]:
    """From now on, heartbeats that carry a ReadIndex key are held back (a slow round)."""
    held: list[Message] = []

    def keep(message: Message) -> bool:
        if message.type is MessageType.HEARTBEAT and message.context:
            held.append(message)
            return False
        return True

    cluster.filters.append(keep)
    return held


def test_answer_to_a_read_of_an_earlier_incarnation_is_not_taken_for_a_new_read() -> None:
    """Follower 2 asks for a read; the leader's heartbeat round for it is slow; 2 restarts in
    the same term; a write W commits and is acknowledged; 2's new read begins. When the old
    round completes, its answer (an index from before W) must not serve the new read."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.propose(1, b"a")
    held = _hold_read_rounds(cluster)
    old = cluster.nodes[2].read_index()
    cluster.stabilize()
    assert held and cluster.read_states[2] == []
    term = cluster.nodes[2].term
    cluster.crash(2)
    cluster.start(2)
    cluster.propose(1, b"W")
    w_index = cluster.nodes[1].raft_log.last_index()
    assert cluster.data_applied(1) == [b"a", b"W"]  # W is acknowledged
    assert cluster.nodes[2].term == term and cluster.nodes[2].leader_id == 1
    new = cluster.nodes[2].read_index()
    cluster.stabilize()
    # The held rounds complete: the old one's answer reaches the new incarnation first.
    cluster.filters.clear()
    for message in held:
        cluster.deliver(message)
    cluster.stabilize()
    # Served at the old answer's index, the new read would miss W.
    assert cluster.read_states[2] == [ReadState(w_index, new)]
    assert new != old


def test_contexts_are_unique_within_and_across_incarnations() -> None:
    storage = MemoryStorage()
    config = RaftConfig(id=1, peers=(1,))
    contexts: set[bytes] = set()
    for seed in range(3):
        node = RawNode(config, storage, random.Random(seed))
        node.campaign()
        for _ in range(3):
            contexts.add(node.read_index())
    assert len(contexts) == 9
    # Replays stay deterministic: the same seed makes the same contexts.
    again = RawNode(config, storage, random.Random(0))
    again.campaign()
    assert again.read_index() in contexts


def _follower_with_leader() -> RawNode:
    node = RawNode(RaftConfig(id=2, peers=(1, 2, 3)), MemoryStorage(), random.Random(7))
    node.step(Message(MessageType.HEARTBEAT, 2, 1, 1))
    assert node.leader_id == 1
    node.advance(node.ready())
    return node


def _answer(node: RawNode, context: bytes, index: int = 0) -> list[ReadState]:
    node.step(Message(MessageType.READ_INDEX_RESPONSE, 2, 1, 1, index=index, context=context))
    if not node.has_ready():
        return []
    ready = node.ready()
    node.advance(ready)
    return list(ready.read_states)


def test_follower_drops_an_answer_to_a_context_it_did_not_issue() -> None:
    node = _follower_with_leader()
    context = node.read_index()
    assert _answer(node, b"\x00" * 15 + b"\x01") == []
    other = bytes(context[:8]) + (999).to_bytes(8, "big")  # our nonce, a number never issued
    assert _answer(node, other) == []
    assert _answer(node, context, index=4) == [ReadState(4, context)]


def test_follower_takes_one_answer_per_request() -> None:
    node = _follower_with_leader()
    context = node.read_index()
    assert _answer(node, context, index=3) == [ReadState(3, context)]
    assert _answer(node, context, index=3) == []  # a duplicated answer


def test_outstanding_reads_are_bounded_and_the_oldest_is_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(raft_node, "_READS_OUTSTANDING_MAX", 4)
    node = _follower_with_leader()
    contexts = [node.read_index() for _ in range(5)]
    assert _answer(node, contexts[0], index=1) == []
    assert _answer(node, contexts[4], index=2) == [ReadState(2, contexts[4])]
    assert _answer(node, contexts[1], index=2) == [ReadState(2, contexts[1])]


def test_a_new_term_forgets_outstanding_reads() -> None:
    node = _follower_with_leader()
    context = node.read_index()
    node.step(Message(MessageType.HEARTBEAT, 2, 3, 2))  # a new leader, term 2
    assert node.term == 2
    node.advance(node.ready())
    # Even an answer in the new term for that context is not taken: nobody asked node 3.
    node.step(Message(MessageType.READ_INDEX_RESPONSE, 2, 3, 2, index=5, context=context))
    assert not node.has_ready() or node.ready().read_states == ()
