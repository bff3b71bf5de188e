"""Seeded random histories over the harness: loss, duplication, reordering, partitions and
crashes, with the safety properties checked after every step (a small in-package cousin of
kvstore.sim, so that the core is covered even without the simulator)."""

from __future__ import annotations

import random

import pytest

from kvstore.errors import ProposalDroppedError
from kvstore.raft.types import ConfState, Entry, Role
from tests.raft.harness import Cluster


class Checker:
    def __init__(self) -> None:
        self.applied: dict[int, tuple[int, bytes]] = {}
        self.leader_of_term: dict[int, int] = {}

    def check(self, cluster: Cluster) -> None:
        for node_id, node in cluster.nodes.items():
            if node.role is Role.LEADER:
                # Election Safety (Raft §5.2): at most one leader per term.
                assert self.leader_of_term.setdefault(node.term, node_id) == node_id
        for node_id, entries in cluster.applied.items():
            for entry in entries:
                self.check_entry(node_id, entry)
            entries.clear()

    def check_entry(self, node_id: int, entry: Entry) -> None:
        # State Machine Safety (Raft §5.4.3): one entry per index, everywhere.
        known = self.applied.setdefault(entry.index, (entry.term, entry.data))
        assert known == (entry.term, entry.data), (node_id, entry, known)


def run(seed: int, steps: int = 600) -> None:
    rng = random.Random(seed)
    size = rng.choice((3, 5))
    cluster = Cluster(
        ids=range(1, size + 1),
        seed=seed,
        election_ticks=10,
        heartbeat_ticks=2,
        max_inflight_messages=rng.choice((1, 4, 64)),
        max_size_per_message_bytes=rng.choice((64, 1 << 20)),
        pre_vote=rng.random() < 0.8,
        check_quorum=rng.random() < 0.8,
    )
    checker = Checker()
    counter = 0
    for _ in range(steps):
        action = rng.random()
        if action < 0.35:
            for node_id in list(cluster.nodes):
                if rng.random() < 0.9:
                    cluster.nodes[node_id].tick()
        elif action < 0.6:
            leaders = cluster.leaders()
            if leaders:
                counter += 1
                try:
                    cluster.nodes[rng.choice(leaders)].propose(f"{seed}-{counter}".encode())
                except ProposalDroppedError:
                    pass
        elif action < 0.65:
            cluster.heal()
            if rng.random() < 0.5:
                groups = list(cluster.ids)
                rng.shuffle(groups)
                cut = rng.randrange(1, len(groups))
                cluster.partition(groups[:cut], groups[cut:])
        elif action < 0.68 and len(cluster.down) < (size - 1) // 2:
            victim = rng.choice(list(cluster.nodes))
            cluster.crash(victim)
        elif action < 0.72 and cluster.down:
            cluster.start(rng.choice(sorted(cluster.down)))
        elif action < 0.74:
            node_ids = [i for i in cluster.nodes if cluster.nodes[i].role is not Role.LEADER]
            leaders = cluster.leaders()
            if leaders and node_ids:
                cluster.nodes[leaders[0]].transfer_leadership(rng.choice(node_ids))
        elif action < 0.76:
            take_snapshot(cluster, rng.choice(list(cluster.nodes)), rng.randint(0, 3))
        deliver_some(cluster, rng)
        checker.check(cluster)
    # Liveness: heal everything; a leader appears and a write commits everywhere.
    cluster.heal()
    for node_id in sorted(cluster.down):
        cluster.start(node_id)
    proposed = False
    for _ in range(300):
        cluster.tick(1)
        checker.check(cluster)
        leaders = cluster.leaders()
        if leaders:
            try:
                cluster.propose(leaders[0], b"final")
            except ProposalDroppedError:
                continue  # a leadership transfer is finishing
            proposed = True
            break
    assert proposed, "no leader accepted a write after healing"
    # Without pre-vote a node with a stale log may still force one more election round.
    for _ in range(200):
        cluster.tick(1)
        checker.check(cluster)
        final = {node.raft_log.committed for node in cluster.nodes.values()}
        if len(final) == 1 and cluster.leaders():
            break
    assert len(final) == 1, final


def take_snapshot(cluster: Cluster, node_id: int, keep: int) -> None:
    """What a driver does every N applied entries: snapshot, then compact (keeping `keep`)."""
    storage = cluster.storages[node_id]
    applied = cluster.nodes[node_id].status().applied_index
    if applied <= storage.snapshot().metadata.index:
        return
    storage.create_snapshot(applied, ConfState(voters=cluster.ids), b"")
    storage.compact(max(storage.first_index() - 1, applied - keep))


def deliver_some(cluster: Cluster, rng: random.Random) -> None:
    """Process Readies, then deliver the queue with loss, duplication and reordering."""
    for node_id in list(cluster.nodes):
        cluster.process_ready(node_id)
    queue, cluster.queue = cluster.queue, []
    rng.shuffle(queue)
    for message in queue:
        roll = rng.random()
        if roll < 0.05:
            continue  # lost
        if roll < 0.25:
            cluster.queue.append(message)  # delayed to a later step
            continue
        cluster.deliver(message)
        if roll > 0.97:
            cluster.deliver(message)  # duplicated


@pytest.mark.parametrize("seed", range(40))
def test_random_history_is_safe_and_live(seed: int) -> None:
    run(seed)
