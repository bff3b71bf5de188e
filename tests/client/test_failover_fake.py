"""The client's failover and exactly-once path over real sockets, against FakeCluster.

FakeCluster (tests/client/fake_cluster.py) has no Raft: it only answers like the HTTP API
contract says, so these tests pin the client's side (a write whose answer was lost is retried
with the same request id and applied once; calls ride through killed leaders within their
deadline) and run in about a second. tests/client/test_cluster.py repeats the kill test
against real kvstore processes.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kvstore import Client
from kvstore.client import ClientConfig

from .fake_cluster import FakeCluster

BENCH = Path(__file__).resolve().parents[2] / "bench" / "client_overhead.py"


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    cluster = FakeCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("client_overhead", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["client_overhead"] = module
    spec.loader.exec_module(module)
    return module


async def test_a_write_whose_answer_was_lost_is_applied_once(cluster: FakeCluster) -> None:
    async with Client(cluster.client_urls, config=ClientConfig(timeout_s=3.0)) as kv:
        await kv.put("k", b"0")
        cluster.crash_next_write_after_apply()
        result = await kv.cas("k", b"1", mod_revision=1)
        assert result.version == 2
        assert cluster.applied[result.request_id] == 1
        assert (await kv.get("k")).value == b"1"
        assert kv.stats.retries >= 1
    assert cluster.store["k"].version == 2


async def test_a_killed_leader_is_replaced_without_losing_calls(cluster: FakeCluster) -> None:
    async with Client(cluster.client_urls) as kv:
        await kv.put("k", b"a")
        old_leader = kv.leader_url
        assert old_leader == cluster.client_url(1)
        cluster.kill(1)
        await kv.put("k", b"b")
        assert kv.leader_url not in (None, old_leader)
        cluster.start_node(1)
    assert all(count == 1 for count in cluster.applied.values())


async def test_increment_loops_survive_leader_kills(cluster: FakeCluster) -> None:
    bench = load_bench()
    report = await bench.measure_failover(cluster, kills=3, timeout_s=2.0, pause_s=0.2)
    assert report.other_errors == [] and report.unknown_outcomes == 0
    assert report.successes > 10
    assert report.counters == report.expected
    assert report.longest_call_s <= 2.0 + 0.25
    assert all(count == 1 for count in cluster.applied.values())
