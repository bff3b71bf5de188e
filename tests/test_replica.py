"""The Replica: three of them over MemoryStorage, with messages delivered by hand.

No network and no clock: the test decides which messages arrive and when the nodes tick, so
every scenario is exact (elections, snapshots, duplicate proposals across a leader change).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvstore.errors import DiskFullError, ProposalDroppedError
from kvstore.kv.commands import Command, Delete, Put, RequestId, WriteResult
from kvstore.raft.config import RaftConfig
from kvstore.raft.types import ConfState, HardState, Message, MessageType, Role, Snapshot
from kvstore.replica import Applied, Replica
from kvstore.storage.base import DurableStorage
from kvstore.storage.disk import DiskStorage
from kvstore.storage.memory import MemoryStorage
from kvstore.storage.snapshot import encode_snapshot_file
from tests.storage.faults import FaultyFileSystem

PEERS = (1, 2, 3)


class Cluster:
    """Three replicas; `isolated` nodes neither send nor receive."""

    def __init__(
        self,
        *,
        seed: int = 1,
        snapshot_entries: int = 10_000,
        catch_up: int = 0,
        log_ratio: float = 0.0,
        log_bytes: int = 64 << 20,
        defer: bool = False,
        storages: dict[int, DurableStorage] | None = None,
    ) -> None:
        self.seed = seed
        self.snapshot_entries = snapshot_entries
        self.catch_up = catch_up
        self.log_ratio = log_ratio
        self.log_bytes = log_bytes
        self.defer = defer
        self.storages: dict[int, DurableStorage] = storages or {i: MemoryStorage() for i in PEERS}
        self.starts = 0
        self.replicas = {i: self._start(i) for i in PEERS}
        self.in_flight: list[Message] = []
        self.isolated: set[int] = set()
        self.applied: dict[int, list[Applied]] = {i: [] for i in PEERS}
        self.snapshots_restored: dict[int, list[int]] = {i: [] for i in PEERS}

    def _start(self, node_id: int) -> Replica:
        # Every start gets its own seed, as every real start does (ReadIndex contexts).
        self.starts += 1
        first_start = self.starts <= len(PEERS)
        seed = self.seed * 100 + node_id if first_start else f"{self.seed}/{self.starts}"
        return Replica(
            RaftConfig(id=node_id, peers=PEERS, election_ticks=10, heartbeat_ticks=2),
            self.storages[node_id],
            random.Random(seed),
            snapshot_entries=self.snapshot_entries,
            snapshot_catch_up_entries=self.catch_up,
            snapshot_log_ratio=self.log_ratio,
            snapshot_log_bytes=self.log_bytes,
            defer_snapshots=self.defer,
        )

    def restart(self, node_id: int) -> None:
        """A crash and restart: volatile state is lost, MemoryStorage keeps what was saved."""
        self.replicas[node_id] = self._start(node_id)
        self.in_flight = [m for m in self.in_flight if node_id not in (m.to, m.from_)]

    def send(self, messages: Sequence[Message]) -> None:
        self.in_flight.extend(messages)

    def process(self) -> bool:
        """Run every replica's pending Ready; True if any had one."""
        progressed = False
        for node_id, replica in self.replicas.items():
            while (outcome := replica.process_ready(self.send)) is not None:
                progressed = True
                self.applied[node_id].extend(outcome.applied)
                if outcome.snapshot_restored:
                    self.snapshots_restored[node_id].append(outcome.snapshot_restored)
        return progressed

    def deliver(self, keep: set[int] | None = None) -> bool:
        """Deliver the messages in flight (from `keep` only, if given; the rest are lost)."""
        messages, self.in_flight = self.in_flight, []
        for message in messages:
            if message.to in self.isolated or message.from_ in self.isolated:
                continue
            if keep is not None and message.from_ not in keep:
                continue
            self.replicas[message.to].node.step(message)
            if message.type == MessageType.SNAPSHOT:
                self.replicas[message.from_].node.report_snapshot(message.to, True)
        return bool(messages)

    def stabilize(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            progressed = self.process()
            if not self.deliver() and not progressed:
                return
        raise AssertionError("the cluster did not settle")

    def tick(self, times: int) -> None:
        for _ in range(times):
            for node_id, replica in self.replicas.items():
                if node_id not in self.isolated:
                    replica.node.tick()
            self.stabilize()

    def elect(self, node_id: int) -> Replica:
        """Make `node_id` leader now: the others are told their leader is down (as the
        transport would on a closed connection), which voids its lease, then it campaigns."""
        for other, replica in self.replicas.items():
            leader_id = replica.node.status().leader_id
            if other != node_id and leader_id not in (0, node_id):
                replica.node.report_peer_down(leader_id)
        self.replicas[node_id].node.campaign()
        self.stabilize()
        # The first in rank of the nodes told campaigns at once too (report_peer_down), so
        # the vote may split or go to it: let an election settle, then hand leadership over.
        for _ in range(100):
            if self.replicas[node_id].node.status().role == Role.LEADER:
                break
            current = next(
                (
                    replica
                    for other, replica in self.replicas.items()
                    if other not in self.isolated and replica.node.status().role == Role.LEADER
                ),
                None,
            )
            if current is not None and current.node.term >= max(
                replica.node.term for replica in self.replicas.values()
            ):
                current.node.transfer_leadership(node_id)
                self.stabilize()
            else:
                self.tick(1)
        leader = self.replicas[node_id]
        assert leader.node.status().role == Role.LEADER
        return leader

    def write(self, leader: int, command: Command) -> WriteResult:
        self.replicas[leader].propose(command)
        self.stabilize()
        for applied in reversed(self.applied[leader]):
            if applied.command == command:
                assert applied.result is not None
                return applied.result
        raise AssertionError(f"{command} was not applied on {leader}")

    def digests(self, nodes: Sequence[int] = PEERS) -> set[str]:
        return {self.replicas[i].state_machine.digest() for i in nodes}


def test_elects_commits_a_put_and_all_state_machines_agree() -> None:
    cluster = Cluster()
    cluster.elect(1)
    result = cluster.write(1, Put("greeting", b"hello", RequestId("c1", 1), 1_000))
    assert result.ok and result.revision == 1
    for replica in cluster.replicas.values():
        kv = replica.state_machine.get("greeting")
        assert kv is not None and kv.value == b"hello" and kv.mod_revision == 1
    assert len(cluster.digests()) == 1
    applied_indexes = {r.applied_index for r in cluster.replicas.values()}
    assert len(applied_indexes) == 1
    # The leader's empty entry was applied too, as nothing but an index.
    assert cluster.applied[1][0].command is None and cluster.applied[1][0].result is None


def test_follower_refuses_proposals() -> None:
    cluster = Cluster()
    cluster.elect(1)
    with pytest.raises(ProposalDroppedError):
        cluster.replicas[2].propose(Put("k", b"v", None, 0))


def test_messages_leave_only_after_their_ready_was_saved() -> None:
    """Raft §5: term, vote and entries are durable before any message that depends on them
    leaves the node (MemoryStorage is what was saved, so check against it at send time)."""
    cluster = Cluster()
    checked = 0

    def send_checked(messages: Sequence[Message]) -> None:
        nonlocal checked
        for message in messages:
            storage = cluster.storages[message.from_]
            if message.type not in (MessageType.PRE_VOTE, MessageType.PRE_VOTE_RESPONSE):
                assert storage.initial_state()[0].term >= message.term
            if message.entries:
                assert storage.last_index() >= message.entries[-1].index
                checked += 1
        cluster.in_flight.extend(messages)

    cluster.send = send_checked  # type: ignore[method-assign]
    cluster.elect(1)
    for seq in range(1, 4):
        cluster.write(1, Put("k", b"v", RequestId("c", seq), seq))
    assert checked > 0


def test_one_ready_at_a_time() -> None:
    cluster = Cluster()
    replica = cluster.replicas[1]
    replica.node.campaign()
    ready = replica.prepare()
    assert ready is not None and ready.messages
    assert replica.prepare() is None and not replica.has_ready()
    replica.persist(ready)
    sent: list[Message] = []
    outcome = replica.finish(ready, sent.extend)
    assert sent == list(ready.messages) and outcome.messages == ready.messages
    assert replica.prepare() is None  # nothing new until the peers answer


def test_snapshots_trigger_and_a_lagging_replica_catches_up_through_one() -> None:
    cluster = Cluster(snapshot_entries=5, catch_up=0)
    cluster.elect(1)
    cluster.isolated.add(3)
    results = [
        cluster.write(1, Put(f"key{i % 7}", str(i).encode(), RequestId("writer", i + 1), 10 * i))
        for i in range(23)
    ]
    cluster.write(1, Delete("key0", None, 1_000))
    leader = cluster.replicas[1]
    assert leader.snapshot_index >= 20
    assert leader.storage.first_index() > cluster.replicas[3].applied_index + 1  # compacted
    cluster.isolated.clear()
    cluster.tick(10)  # heartbeats find the follower behind the compacted log
    assert cluster.snapshots_restored[3], "the lagging follower got no snapshot"
    assert len(cluster.digests()) == 1
    lagging = cluster.replicas[3].state_machine
    assert lagging.get("key0") is None and lagging.revision == leader.state_machine.revision
    # The session table travelled inside the snapshot: a retry is still answered once.
    cluster.elect(3)
    first = results[-1]
    retried = cluster.write(3, Put("key1", b"22", RequestId("writer", 23), 5_000))
    assert retried == first
    assert len(cluster.digests()) == 1


def test_snapshots_are_paced_by_the_size_of_the_last_one() -> None:
    """With snapshot_log_ratio r, a snapshot waits until the entries applied since the last
    one carry r times its size: a large store is not serialized every few writes."""
    cluster = Cluster(snapshot_entries=5, catch_up=0, log_ratio=1.0)
    cluster.elect(1)
    leader = cluster.replicas[1]
    big = b"x" * 2_000  # the first snapshot holds this value: about 2 kB
    cluster.write(1, Put("big", big, RequestId("w", 1), 1))
    seq = 1
    while leader.snapshot_index == 0:
        seq += 1
        cluster.write(1, Put("small", b"s", RequestId("w", seq), seq))
        assert seq < 100, "no first snapshot"
    first_index = leader.snapshot_index
    first_bytes = len(leader.storage.snapshot().data)
    assert first_bytes > 2_000
    # Small writes must now add up to first_bytes before the next snapshot.
    while leader.snapshot_index == first_index:
        seq += 1
        cluster.write(1, Put("small", b"s", RequestId("w", seq), seq))
        assert seq < 10_000, "no second snapshot"
    entries_between = leader.snapshot_index - first_index
    # Each small write is well under 200 bytes of entry, so reaching first_bytes took
    # more than first_bytes / 200 of them: far more than snapshot_entries = 5.
    assert entries_between >= first_bytes // 200 > 5, entries_between
    # Count pacing alone (ratio 0) snapshots every snapshot_entries entries.
    by_count = Cluster(snapshot_entries=5, catch_up=0, log_ratio=0.0)
    by_count.elect(1)
    by_count.write(1, Put("big", big, RequestId("w", 1), 1))
    for i in range(2, 13):
        by_count.write(1, Put("small", b"s", RequestId("w", i), i))
    assert by_count.replicas[1].snapshot_index >= 10


def test_a_log_of_few_large_entries_is_snapshotted_by_its_bytes() -> None:
    """A batch entry carries up to 1,024 writes: counting entries alone, a log of a few
    large entries never reached snapshot_entries and grew without a snapshot. Once the
    entries applied since the last snapshot carry snapshot_log_bytes, one is taken."""
    cluster = Cluster(snapshot_entries=10_000, catch_up=0, log_ratio=1.0, log_bytes=20_000)
    cluster.elect(1)
    leader = cluster.replicas[1]
    for seq in range(1, 6):  # 5 entries of about 5 kB: far fewer than 10,000
        cluster.write(1, Put(f"k{seq}", b"x" * 5_000, RequestId("w", seq), seq))
    assert leader.snapshot_index > 0
    assert leader.snapshot_index <= leader.applied_index < 10


def test_a_deferred_snapshot_is_encoded_while_the_replica_goes_on() -> None:
    """The server's way: advance takes no snapshot; begin_snapshot freezes the state, the
    replica applies more entries, the frozen state encodes to exactly the bytes of the
    moment it was frozen, and complete_snapshot stores it, making the commit index durable
    up to it first; a restart from that storage rebuilds the same state."""
    cluster = Cluster(snapshot_entries=5, catch_up=1, defer=True)
    cluster.elect(1)
    for i in range(8):
        cluster.write(1, Put(f"k{i}", b"v", RequestId("c", i + 1), i))
    leader, storage = cluster.replicas[1], cluster.storages[1]
    assert leader.snapshot_index == 0 and not leader.snapshot_due()  # advance took none
    job = leader.begin_snapshot()
    assert job is not None
    index, digest = leader.applied_index, leader.state_machine.digest()
    for i in range(8, 14):
        cluster.write(1, Put(f"k{i % 3}", b"w", RequestId("c", i + 1), i))
    encoded = leader.encode_snapshot(job)
    assert hashlib.sha256(encoded.data).hexdigest() == digest  # the state as of the freeze
    # A commit index that is not durable yet (commit-only Readies are not fsynced).
    durable = storage.initial_state()[0]
    storage.save(dataclasses.replace(durable, commit=1), [], None)
    assert leader.complete_snapshot(job, encoded) == index
    assert leader.snapshot_index == index and storage.snapshot().metadata.index == index
    assert storage.initial_state()[0].commit >= index
    assert storage.first_index() == index  # compacted to catch_up = 1 entry before it
    assert leader.complete_snapshot(job, encoded) == 0  # not newer than the one stored
    # The restarted node starts from the snapshot, replays what its durable commit covers,
    # and learns the rest from the next leader.
    cluster.restart(1)
    cluster.process()
    assert cluster.replicas[1].applied_index >= index
    cluster.elect(2)
    cluster.write(2, Put("after", b"restart", RequestId("d", 1), 100))
    assert len(cluster.digests()) == 1
    assert cluster.replicas[1].state_machine.get("after") is not None


def test_deferred_snapshots_are_staggered_across_nodes() -> None:
    """All replicas apply the same entries; with deferred (server) snapshots their
    thresholds differ by node (x1, x1.25, x1.5) so that they do not all encode at once."""
    cluster = Cluster(snapshot_entries=8, catch_up=0, defer=True)
    cluster.elect(1)  # the new leader's empty entry: applied index 1
    due: dict[int, int] = {}
    for i in range(12):
        cluster.write(1, Put(f"k{i}", b"v", RequestId("c", i + 1), i))
        for node in (1, 2, 3):
            replica = cluster.replicas[node]
            if node not in due and replica.begin_snapshot() is not None:
                due[node] = replica.applied_index
    assert due == {1: 8, 2: 10, 3: 12}  # 8 entries x 1, x 1.25, x 1.5


def test_restart_restores_from_the_snapshot_and_replays_the_log() -> None:
    cluster = Cluster(snapshot_entries=4, catch_up=2)
    cluster.elect(1)
    for i in range(10):
        cluster.write(1, Put(f"k{i}", b"v", RequestId("c", i + 1), i))
    before = cluster.replicas[2].state_machine.digest()
    assert cluster.replicas[2].snapshot_index > 0
    commit = cluster.storages[2].initial_state()[0].commit
    cluster.restart(2)
    restarted = cluster.replicas[2]
    assert 0 < restarted.applied_index == restarted.snapshot_index < commit
    cluster.process()  # replays the committed entries after the snapshot, no peer needed
    assert restarted.applied_index == commit
    assert restarted.state_machine.digest() == before
    cluster.write(1, Put("after", b"restart", RequestId("c", 11), 11))
    assert len(cluster.digests()) == 1


def test_duplicate_request_applies_once_across_a_leader_change() -> None:
    """The client's first attempt reaches the followers' logs but its answer is lost with
    the leader; the retry goes to the new leader. Both copies commit; one applies."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.write(1, Put("counter", b"0", RequestId("c", 1), 100))
    command = Put("counter", b"1", RequestId("c", 2), 200, if_revision=1)
    cluster.replicas[1].propose(command)
    cluster.process()
    cluster.deliver(keep={1})  # the appends reach 2 and 3 ...
    cluster.process()
    cluster.in_flight.clear()  # ... but their acknowledgements are lost
    cluster.isolated.add(1)
    cluster.elect(2)
    cluster.replicas[2].propose(command)  # the client's retry, same request id
    cluster.stabilize()
    cluster.isolated.clear()
    cluster.tick(10)
    copies = [a for a in cluster.applied[2] if a.command == command]
    assert len(copies) == 2, "both copies should be in the log"
    assert copies[0].result == copies[1].result and copies[0].result is not None
    assert copies[0].result.ok and copies[0].result.revision == 2
    assert cluster.replicas[2].state_machine.revision == 2
    kv = cluster.replicas[2].state_machine.get("counter")
    assert kv is not None and kv.version == 2
    assert len(cluster.digests()) == 1


def test_read_index_answers_come_back_in_the_outcome() -> None:
    """ReadIndex (dissertation §6.4) through the Replica: the ReadState is handed to the
    driver once the leader confirmed its leadership; once the replica has applied up to its
    index, the read is served from local state."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.write(1, Put("k", b"v", None, 1))
    seen: list[tuple[int, bytes, int]] = []
    follower = cluster.replicas[2]
    context = follower.node.read_index()
    for _ in range(20):
        for node_id, replica in cluster.replicas.items():
            while (outcome := replica.process_ready(cluster.send)) is not None:
                seen.extend((node_id, rs.context, rs.index) for rs in outcome.read_states)
        if not cluster.deliver():
            break
    assert [(node, answered) for node, answered, _ in seen] == [(2, context)]
    assert follower.applied_index >= seen[0][2]  # the driver serves the read from here on
    kv = follower.state_machine.get("k")
    assert kv is not None and kv.value == b"v"


def test_replica_validates_its_options() -> None:
    with pytest.raises(ValueError):
        Replica(
            RaftConfig(id=1, peers=PEERS), MemoryStorage(), random.Random(1), snapshot_entries=0
        )


def test_hard_state_is_kept_across_restart() -> None:
    cluster = Cluster()
    cluster.elect(1)
    term = cluster.replicas[1].node.status().term
    cluster.restart(1)
    hard_state, _ = cluster.storages[1].initial_state()
    assert isinstance(hard_state, HardState) and hard_state.term == term
    assert cluster.replicas[1].node.status().term == term


def _random_run(seed: int) -> None:
    """Random ticks, message loss and reordering, partitions, crashes (also between persist
    and finish) and client retries with the same request ids; then heal and settle. Every
    request is answered, none applied twice, and all state machines agree."""
    rng = random.Random(seed)
    cluster = Cluster(
        seed=seed, snapshot_entries=rng.choice([3, 7, 50]), catch_up=rng.choice([0, 2])
    )
    pending: dict[int, Put] = {}
    answered: set[int] = set()
    next_seq = 1

    def collect() -> None:
        for applied in (a for node in PEERS for a in cluster.applied[node]):
            command = applied.command
            request = None if command is None else command.request
            if request is not None and pending.pop(request.seq, None) is not None:
                answered.add(request.seq)

    def propose(node_id: int) -> None:
        nonlocal next_seq
        if pending and rng.random() < 0.5:
            original = pending[rng.choice(sorted(pending))]
        else:
            acked = min(pending, default=next_seq)
            original = Put(
                f"k{next_seq}", b"v", RequestId("c", next_seq), next_seq, acked_below=acked
            )
            pending[next_seq] = original
            next_seq += 1
        try:
            cluster.replicas[node_id].propose(original)
        except ProposalDroppedError:
            pass

    for _ in range(300):
        roll = rng.random()
        node_id = rng.choice(PEERS)
        if roll < 0.35:
            for other in PEERS:
                if other not in cluster.isolated:
                    cluster.replicas[other].node.tick()
        elif roll < 0.6:
            # Deliver most messages in a random order; lose some, delay some.
            messages, cluster.in_flight = cluster.in_flight, []
            rng.shuffle(messages)
            delayed = [m for m in messages if rng.random() < 0.1]
            cluster.in_flight = [m for m in messages if m not in delayed and rng.random() > 0.1]
            cluster.deliver()
            cluster.in_flight.extend(delayed)
        elif roll < 0.8:
            propose(node_id)
        elif roll < 0.86:
            cluster.isolated ^= {node_id}
        elif roll < 0.89:
            replica = cluster.replicas[node_id]
            ready = replica.prepare()
            if ready is not None:
                replica.persist(ready)  # crash after the fsync, before send/apply/advance
            cluster.restart(node_id)
        cluster.process()
        collect()

    cluster.isolated.clear()
    for _ in range(60):
        if not pending:
            break
        cluster.tick(3)
        for node_id in PEERS:
            if cluster.replicas[node_id].node.status().role == Role.LEADER:
                for seq in sorted(pending):  # the client retries what it still waits for
                    cluster.replicas[node_id].propose(pending[seq])
        cluster.stabilize()
        collect()
    assert not pending, (
        f"seed {seed}: requests never answered: {sorted(pending)}; "
        f"{[cluster.replicas[i].node.status() for i in PEERS]}"
    )
    cluster.tick(5)
    assert len(cluster.digests()) == 1, f"seed {seed}: state machines differ"
    machine = cluster.replicas[1].state_machine
    machine.check_invariants()
    items, _ = machine.list("k", 0)
    assert all(kv.version == 1 for kv in items), f"seed {seed}: a request applied twice"
    assert machine.revision == len(items) == len(answered) == next_seq - 1


@pytest.mark.parametrize("seed", range(50))
def test_random_faults_apply_every_request_exactly_once(seed: int) -> None:
    _random_run(seed)


def test_disk_storage_replicas_snapshot_restart_and_agree(tmp_path: Path) -> None:
    """The same Replica over the real write-ahead log and snapshot files: every node
    snapshots and compacts, one restarts from its directory (snapshot + log replay) and
    rejoins; the state machines agree."""
    storages: dict[int, DurableStorage] = {i: DiskStorage(tmp_path / str(i)) for i in PEERS}
    cluster = Cluster(snapshot_entries=5, catch_up=2, storages=storages)
    try:
        cluster.elect(1)
        for i in range(12):
            cluster.write(1, Put(f"k{i % 4}", str(i).encode(), RequestId("c", i + 1), i))
        before = cluster.replicas[2].state_machine.digest()
        assert cluster.replicas[2].snapshot_index > 0
        storages[2].close()
        storages[2] = DiskStorage(tmp_path / "2")
        cluster.restart(2)
        cluster.process()
        assert cluster.replicas[2].state_machine.digest() == before
        cluster.write(1, Put("after", b"restart", RequestId("c", 13), 13))
        assert len(cluster.digests()) == 1
    finally:
        for storage in storages.values():
            storage.close()


class SnapshotDiskFull(MemoryStorage):
    """MemoryStorage whose snapshots fail with ENOSPC while `full` (as DiskStorage's do:
    DiskFullError, storage unchanged)."""

    full = False
    attempts = 0

    def create_snapshot(
        self, index: int, conf_state: ConfState, data: bytes, prepared: str | None = None
    ) -> Snapshot:
        if self.full:
            self.attempts += 1
            raise DiskFullError("no space left for the snapshot file")
        return super().create_snapshot(index, conf_state, data, prepared)


def test_a_full_disk_postpones_the_snapshot_and_the_node_carries_on() -> None:
    """The replica keeps applying, retries a quarter interval later (not on every Ready),
    and snapshots once space is back."""
    storage = SnapshotDiskFull()
    storage.full = True
    storages: dict[int, DurableStorage] = {1: storage, 2: MemoryStorage(), 3: MemoryStorage()}
    cluster = Cluster(snapshot_entries=8, catch_up=0, storages=storages)
    cluster.elect(1)
    leader = cluster.replicas[1]
    for seq in range(1, 16):
        cluster.write(1, Put("k", str(seq).encode(), RequestId("c", seq), seq))
    assert leader.applied_index == 16 and leader.snapshot_index == 0
    assert storage.attempts == 5  # at applied 8, 10, 12, 14, 16: every 8 // 4 entries
    storage.full = False
    for seq in range(16, 20):
        cluster.write(1, Put("k", str(seq).encode(), RequestId("c", seq), seq))
    assert leader.snapshot_index > 16
    assert len(cluster.digests()) == 1


class CompactionDiskFull(DiskStorage):
    """DiskStorage whose log compaction meets a full disk while `full`: every write of
    `compact()` (the COMPACT record, or the rewritten segment) fails with ENOSPC from the
    file system, as a disk filling up between the snapshot and the compaction does."""

    def __init__(self, directory: Path, *, compact_after_entries: int) -> None:
        self.faults = FaultyFileSystem()
        super().__init__(directory, fs=self.faults, compact_after_entries=compact_after_entries)
        self.full = False
        self.refused = 0

    def compact(self, index: int) -> None:
        if self.full:
            self.faults.fail("write", errno.ENOSPC)
        try:
            super().compact(index)
        except DiskFullError:
            self.refused += 1
            raise
        finally:
            self.faults.heal()


@pytest.mark.parametrize("compact_after_entries", [10_000, 1], ids=["record", "rewrite"])
@pytest.mark.parametrize("defer", [False, True], ids=["inline", "deferred"])
def test_a_full_disk_during_compaction_keeps_the_snapshot_and_retries_later(
    tmp_path: Path, compact_after_entries: int, defer: bool
) -> None:
    """Issue 12 item 2: ENOSPC from the compaction after a snapshot was stored ended the
    driver (exit 1 with a traceback). Now the snapshot stays stored, the log keeps its
    entries, the node carries on, and the compaction is retried a quarter interval later;
    the directory recovers to the same state."""
    storage = CompactionDiskFull(tmp_path / "1", compact_after_entries=compact_after_entries)
    storage.full = True
    storages: dict[int, DurableStorage] = {1: storage, 2: MemoryStorage(), 3: MemoryStorage()}
    cluster = Cluster(snapshot_entries=8, catch_up=1, defer=defer, storages=storages)
    try:
        cluster.elect(1)
        leader = cluster.replicas[1]
        seq = 0

        def write_some(count: int) -> None:
            nonlocal seq
            for _ in range(count):
                seq += 1
                cluster.write(1, Put(f"k{seq % 3}", str(seq).encode(), RequestId("c", seq), seq))
                if defer and (job := leader.begin_snapshot()) is not None:
                    leader.complete_snapshot(job, leader.encode_snapshot(job))
                elif defer and leader.compaction_due():
                    leader.retry_compaction()  # what the server's driver does between saves

        write_some(10)
        assert leader.snapshot_index >= 8, "the snapshot is stored"
        assert storage.snapshot().metadata.index == leader.snapshot_index
        assert storage.first_index() == 1, "compaction skipped"
        # Tried at applied index 8 (the snapshot's) and 10 (8 // 4 later): not every Ready.
        assert storage.refused == 2
        storage.full = False
        write_some(3)  # a quarter interval (8 // 4) later the compaction is retried
        assert storage.first_index() == leader.snapshot_index, "compacted once space is back"
        assert len(cluster.digests()) == 1
        digest = leader.state_machine.digest()
        storage.close()
        storages[1] = DiskStorage(tmp_path / "1")
        cluster.restart(1)
        cluster.process()
        assert cluster.replicas[1].state_machine.digest() == digest
    finally:
        for each in storages.values():
            each.close()


def test_a_snapshot_decoded_ahead_is_installed_and_its_file_taken_over(tmp_path: Path) -> None:
    """The server's follower decodes a leader's snapshot on a worker thread and offers it
    (`decode_snapshot`, `offer_decoded`) before the SNAPSHOT message is stepped: the Ready
    then installs that state without decoding the bytes again, and the storage renames the
    received file into place instead of encoding and writing it a second time."""
    storages: dict[int, DurableStorage] = {i: DiskStorage(tmp_path / str(i)) for i in PEERS}
    cluster = Cluster(snapshot_entries=5, catch_up=0, storages=storages)
    try:
        cluster.elect(1)
        cluster.isolated.add(3)
        for i in range(12):
            cluster.write(1, Put(f"k{i % 4}", str(i).encode(), RequestId("c", i + 1), i))
        cluster.isolated.clear()
        follower = cluster.replicas[3]
        inodes: list[int] = []

        def receive(message: Message) -> Message:
            assert message.snapshot is not None
            received = tmp_path / "3" / "incoming-1-1.part"
            received.write_bytes(encode_snapshot_file(message.snapshot))
            inodes.append(received.stat().st_ino)
            follower.offer_decoded(follower.decode_snapshot(message.snapshot, str(received)))
            assert not received.exists()  # taken over by the storage
            return message

        def no_decoding(data: bytes, index: int) -> None:
            raise AssertionError("the offered state was decoded again")

        follower.state_machine.restore = no_decoding  # type: ignore[method-assign]
        delivered = cluster.deliver

        def deliver(keep: set[int] | None = None) -> bool:
            cluster.in_flight = [
                receive(m) if m.type is MessageType.SNAPSHOT and m.to == 3 else m
                for m in cluster.in_flight
            ]
            return delivered(keep)

        cluster.deliver = deliver  # type: ignore[method-assign]
        cluster.tick(10)
        assert cluster.snapshots_restored[3] and len(inodes) == 1
        assert len(cluster.digests()) == 1
        [installed] = (tmp_path / "3").glob("*.snap")
        assert installed.stat().st_ino == inodes[0]
        assert list((tmp_path / "3").glob("*.prepared")) == []
        cluster.write(1, Put("after", b"install", RequestId("c", 13), 13))
        assert len(cluster.digests()) == 1
    finally:
        for storage in storages.values():
            storage.close()
