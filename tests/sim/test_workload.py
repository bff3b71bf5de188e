"""The simulated clients against a fake cluster: acknowledgements, refusals, unknown
outcomes after crashes and timeouts, ReadIndex reads served once applied."""

from __future__ import annotations

import random

from kvstore.raft.types import Entry, ReadState
from kvstore.sim.workload import Workload, WorkloadConfig
from kvstore.verify.history import OpKind


class FakeMachine:
    def __init__(self) -> None:
        self.applied_index = 0
        self.values: dict[str, str] = {}

    def apply(self, entry: Entry) -> None:
        assert entry.index == self.applied_index + 1
        self.applied_index = entry.index
        for key, value in decode_puts(entry.data):
            self.values[key] = value

    def get(self, key: str) -> str | None:
        return self.values.get(key)


def encode_put(key: str, value: str) -> bytes:
    return f"{key}={value}".encode()


def decode_puts(data: bytes) -> list[tuple[str, str]]:
    """`k=v`, or several joined by `;` (a batch)."""
    puts = [part.partition("=") for part in data.decode().split(";")]
    return [(key, value) for key, sep, value in puts if sep]


class FakeCluster:
    """Node 1 leads and accepts everything; node 2 refuses; node 3 is down."""

    def __init__(self) -> None:
        self.proposed: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, bytes]] = []
        self.machine = FakeMachine()

    def is_up(self, node: int) -> bool:
        return node != 3

    def leader_of(self, node: int) -> int:
        return 1

    def propose_write(self, node: int, data: bytes) -> bool:
        if node != 1:
            return False
        self.proposed.append((node, data))
        return True

    def read_index(self, node: int) -> bytes | None:
        if node != 1:
            return None
        context = f"ctx{len(self.reads)}".encode()
        self.reads.append((node, context))
        return context

    def applied_index(self, node: int) -> int:
        return self.machine.applied_index

    def read_value(self, node: int, key: str) -> str | None:
        return self.machine.get(key)

    def encode_put(self, client: int, seq: int, key: str, value: str) -> bytes:
        return encode_put(key, value)

    def decode_puts(self, data: bytes) -> list[tuple[str, str]]:
        return decode_puts(data)


def make(read_fraction: float, **kw: int) -> Workload:
    config = WorkloadConfig(clients=1, keys=1, read_fraction=read_fraction, **kw)
    return Workload(config, [1], random.Random(4))


def test_a_write_is_acknowledged_when_its_node_applies_it() -> None:
    cluster = FakeCluster()
    workload = make(0.0)
    workload.act(workload.next_time() or 0, cluster)
    [(node, data)] = cluster.proposed
    entry = Entry(term=1, index=1, data=data)
    cluster.machine.apply(entry)
    workload.on_applied(node, entry, 100, cluster)
    [op] = workload.history
    assert op.op is OpKind.PUT and op.ok and op.return_ == 100 and op.key == "k0"
    assert workload.stats.writes_acked == 1
    [record] = workload.write_records()
    assert record.index == 1 and record.acked_at == 100


def test_a_write_whose_node_crashes_has_an_unknown_outcome_and_a_new_process() -> None:
    cluster = FakeCluster()
    workload = make(0.0)
    workload.act(workload.next_time() or 0, cluster)
    workload.on_crash(1, 50)
    [op] = workload.history
    assert op.return_ is None and not op.ok
    assert workload.stats.writes_unknown == 1
    workload.act(10_000, cluster)
    workload.finish(10_001)
    assert workload.history[1].process != op.process


def test_a_read_is_served_once_the_node_applied_up_to_the_read_index() -> None:
    cluster = FakeCluster()
    workload = make(1.0)
    workload.act(workload.next_time() or 0, cluster)
    [(node, context)] = cluster.reads
    workload.on_read_state(node, ReadState(index=1, context=context))
    workload.serve_reads(node, 20, cluster)
    assert workload.history == []  # applied 0 < read index 1
    cluster.machine.apply(Entry(term=1, index=1, data=encode_put("k0", "c9-1")))
    workload.serve_reads(node, 30, cluster)
    [op] = workload.history
    assert op.op is OpKind.GET and op.ok and op.output == "c9-1" and op.return_ == 30


def test_a_timed_out_read_is_a_definite_failure() -> None:
    cluster = FakeCluster()
    workload = make(1.0, timeout=10)
    start = workload.next_time() or 0
    workload.act(start, cluster)
    workload.act(start + 10, cluster)
    assert workload.history[0].op is OpKind.GET
    assert workload.history[0].return_ == start + 10 and not workload.history[0].ok


def test_every_write_of_a_batch_entry_is_acknowledged() -> None:
    cluster = FakeCluster()
    workload = Workload(WorkloadConfig(clients=2, keys=2, read_fraction=0.0), [1], random.Random(4))
    workload.act(10_000, cluster)
    assert len(cluster.proposed) == 2
    batch = b";".join(data for _, data in cluster.proposed)
    entry = Entry(term=1, index=1, data=batch)
    cluster.machine.apply(entry)
    workload.on_applied(1, entry, 10_050, cluster)
    assert workload.stats.writes_acked == 2
    assert all(op.ok and op.return_ == 10_050 for op in workload.history)
