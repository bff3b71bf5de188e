"""Transactions, watches, leases and the recipes against a real three-node cluster, through
Client, SyncClient and the CLI; the watch test kills the node a watch is connected to and
checks that every event arrives once, in order, across the reconnect (it runs last)."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import Client, SyncClient
from kvstore.client import Compare, Election, Lock, Op, SyncElection, SyncLock, WatchEvent
from kvstore.errors import LeaseLostError, NotFoundError, RevisionCompactedError

localcluster = pytest.importorskip("kvstore.server.localcluster")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    cluster = localcluster.LocalCluster(
        tmp_path_factory.mktemp("coordination-cluster"),
        size=3,
        extra_args=["--history-revisions-max", "2000"],
    )
    try:
        cluster.start()
        cluster.wait_for_leader(timeout_s=30.0)
        yield cluster
    finally:
        cluster.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def test_txn_cas_and_exactly_once_through_the_client(cluster: Any) -> None:
    keys = [unique("t") for _ in range(4)]
    async with Client(cluster.client_urls) as kv:
        revisions = [(await kv.put(key, b"0")).mod_revision for key in keys]
        result = await kv.txn(
            compare=[Compare.mod_revision(k, "=", r) for k, r in zip(keys, revisions)],
            success=[Op.put(k, b"1") for k in keys],
            failure=[Op.get(k) for k in keys],
        )
        assert result.succeeded and {r.revision for r in result.responses} == {result.revision}
        again = await kv.txn(
            compare=[Compare.mod_revision(k, "=", r) for k, r in zip(keys, revisions)],
            success=[Op.put(k, b"2") for k in keys],
            failure=[Op.get(k) for k in keys],
        )
        assert not again.succeeded
        assert [r.kvs[0].value for r in again.responses] == [b"1"] * 4
        past = await kv.get(keys[0], revision=revisions[0])
        assert past.value == b"0"


def test_sync_client_pages_and_leases(cluster: Any) -> None:
    prefix = unique("page") + "/"
    with SyncClient(cluster.client_urls) as kv:
        for i in range(12):
            kv.put(f"{prefix}{i:02d}", b"v")
        seen, start = [], None
        while True:
            page = kv.list(prefix, limit=5, start=start)
            seen += [item.key for item in page]
            if page.next is None:
                break
            start = page.next
        assert seen == [f"{prefix}{i:02d}" for i in range(12)]
        lease_id = kv.lease_grant(60_000)
        kv.put(prefix + "leased", b"x", lease=lease_id)
        assert kv.lease_keepalive(lease_id) == 60_000
        assert any(info.id == lease_id for info in kv.leases())
        assert kv.lease_revoke(lease_id) == 1
        assert kv.delete_prefix(prefix).deleted == 12


async def test_a_lock_serialises_holders_with_growing_fencing_tokens(cluster: Any) -> None:
    name = unique("lock")
    order: list[tuple[str, int]] = []
    async with Client(cluster.client_urls) as kv:

        async def worker(label: str) -> None:
            async with Lock(kv, name, ttl_s=2.0) as token:
                order.append((label + "-in", token))
                await asyncio.sleep(0.05)
                order.append((label + "-out", token))

        await asyncio.gather(*(worker(f"w{i}") for i in range(3)))
    tokens = [token for label, token in order if label.endswith("-in")]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    for i in range(0, 6, 2):  # never two holders at once
        assert order[i][0].endswith("-in") and order[i + 1][0].endswith("-out")
        assert order[i][1] == order[i + 1][1]


async def test_a_dead_holders_lease_expires_and_the_next_candidate_leads(cluster: Any) -> None:
    name = unique("election")
    async with Client(cluster.client_urls) as first, Client(cluster.client_urls) as second:
        one = Election(first, name, ttl_s=0.6)
        await one.campaign("one")
        # The first leader's process "dies": its keepalives stop, its lease is not revoked.
        task = one.lease._task
        assert task is not None
        task.cancel()
        two = Election(second, name, ttl_s=5.0)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(two.campaign("two"), 10)
        assert loop.time() - began >= 0.3  # not before the lease could expire
        leader = await two.leader()
        assert leader is not None and leader.value == b"two"
        with pytest.raises(LeaseLostError):
            await asyncio.sleep(0.7)
            one.lease.check()
        await two.resign()


def _cli(
    cluster: Any, *args: str, stdin: str = "", tail: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    endpoints = ",".join(cluster.client_urls)
    command = [sys.executable, "-m", "kvstore.cli", *args, "--endpoints", endpoints, *tail]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=ROOT, input=stdin
    )


def test_cli_txn_watch_lease_and_lock(cluster: Any) -> None:
    key = unique("cli")
    body = {
        "compare": [{"key": key, "target": "create_revision", "op": "=", "value": 0}],
        "success": [{"op": "put", "key": key, "value_text": "first"}],
        "failure": [{"op": "get", "key": key}],
    }
    created = _cli(cluster, "txn", "--json", stdin=json.dumps(body))
    assert created.returncode == 0, created.stderr
    revision = json.loads(created.stdout)["revision"]
    refused = _cli(cluster, "txn", stdin=json.dumps(body))
    assert refused.returncode == 3 and refused.stdout.startswith("FAILED"), refused.stderr
    watched = _cli(
        cluster, "watch", key, "--start-revision", str(revision), "--count", "1", "--json"
    )
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["value"] == "first"
    grant = _cli(cluster, "lease", "grant", "30")
    assert grant.returncode == 0, grant.stderr
    lease_id = grant.stdout.strip()
    assert _cli(cluster, "put", key + "/l", "v", "--lease", lease_id).returncode == 0
    assert _cli(cluster, "lease", "keepalive", lease_id, "--once").returncode == 0
    listed = _cli(cluster, "lease", "list", "--json")
    assert any(str(item["id"]) == lease_id for item in json.loads(listed.stdout))
    assert "deleted=1" in _cli(cluster, "lease", "revoke", lease_id).stdout
    show_token = "import os; print(os.environ['KVSTORE_LOCK_TOKEN'])"
    locked = _cli(cluster, "lock", unique("l"), tail=("--", sys.executable, "-c", show_token))
    assert locked.returncode == 0 and int(locked.stdout.strip()) > 0, locked.stderr
    assert _cli(cluster, "txn", stdin="{nope").returncode == 5


async def test_a_watch_survives_killing_its_node_without_loss_or_repeat(cluster: Any) -> None:
    prefix = unique("w") + "/"
    async with Client(cluster.client_urls, timeout_s=10) as kv:
        start = (await kv.put(prefix + "start", b"0")).revision
        watch = kv.watch(prefix=prefix, start_revision=start, progress_interval_s=0.2)
        received: list[WatchEvent] = []

        async def consume() -> None:
            async for event in watch:
                assert isinstance(event, WatchEvent)
                received.append(event)
                if event.key == prefix + "end":
                    return

        consumer = asyncio.get_running_loop().create_task(consume())
        written = []
        for i in range(60):
            written.append((await kv.put(f"{prefix}{i:03d}", str(i))).revision)
            if i == 20:
                victim = next(n for n in cluster.ids if cluster.client_url(n) == watch.endpoint)
                cluster.kill(victim)
        written.append((await kv.put(prefix + "end", b"")).revision)
        await asyncio.wait_for(consumer, 30)
        await watch.close()
        cluster.start_node(victim)
    assert [event.revision for event in received] == [start, *written]
    assert watch.reconnects >= 1
    with pytest.raises(RevisionCompactedError):
        async with Client(cluster.client_urls) as kv:
            await kv.compact(start)
            async for _ in kv.watch(prefix=prefix, start_revision=start):
                pass


async def test_a_caught_up_watch_reports_progress_at_the_current_revision(cluster: Any) -> None:
    from kvstore.client import WatchProgress

    key = unique("progress")
    async with Client(cluster.client_urls) as kv:
        revision = (await kv.put(key, b"v")).revision
        async with kv.watch(key=key, start_revision=revision, progress=True,
                            progress_interval_s=0.05) as watch:  # fmt: skip
            seen: list[object] = []
            async with asyncio.timeout(10):
                async for item in watch:
                    seen.append(item)
                    if isinstance(item, WatchProgress) and item.revision >= revision:
                        break
    assert isinstance(seen[0], WatchEvent) and seen[0].revision == revision


async def test_an_election_is_observed_as_its_leader_changes(cluster: Any) -> None:
    name = unique("observe")
    async with Client(cluster.client_urls) as kv:
        first, second = Election(kv, name, ttl_s=5.0), Election(kv, name, ttl_s=5.0)
        await first.campaign("a")
        observed = first.observe()
        assert (await anext(observed)).value == b"a"  # type: ignore[union-attr]
        campaign = asyncio.ensure_future(second.campaign("b"))
        await first.resign()
        async with asyncio.timeout(10):
            leader = await anext(observed)
            while leader is None or leader.value != b"b":
                leader = await anext(observed)
        await campaign
        await observed.aclose()
        await second.resign()


# --- Lease, Lock and Election from synchronous code (SyncLease, SyncLock, SyncElection) -----


def _wait(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_sync_lease_is_kept_alive_past_its_ttl_and_revoked_at_the_end(cluster: Any) -> None:
    key = unique("sync-lease")
    with SyncClient(cluster.client_urls) as kv:
        with kv.lease(ttl_s=0.6) as lease:
            kv.put(key, b"mine", lease=lease.id)
            # Four acknowledged keepalives, every ttl/3: the lease has outlived its TTL.
            _wait(lambda: lease.keepalives >= 4)
            assert kv.get(key).value == b"mine"
            assert not lease.lost and lease.remaining_s() > 0
            lease.check()
            assert not lease.wait_lost(timeout_s=0.01)
        assert lease.lost and lease.wait_lost(timeout_s=1.0)
        with pytest.raises(NotFoundError):
            kv.get(key)


def test_a_sync_lock_serialises_threads_and_a_timed_out_acquire_leaves_the_queue(
    cluster: Any,
) -> None:
    name = unique("sync-lock")
    order: list[tuple[str, int]] = []
    guard = threading.Lock()
    with SyncClient(cluster.client_urls) as kv:

        def worker(label: str) -> None:
            with SyncLock(kv, name, ttl_s=2.0) as token:
                with guard:
                    order.append((label + "-in", token))
                with guard:
                    order.append((label + "-out", token))

        threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        tokens = [token for label, token in order if label.endswith("-in")]
        assert len(order) == 6 and tokens == sorted(tokens) and len(set(tokens)) == 3
        for i in range(0, 6, 2):  # never two holders at once
            assert order[i][0].endswith("-in") and order[i + 1][0].endswith("-out")
        holder = SyncLock(kv, name, ttl_s=5.0)
        holder.acquire()
        holder.lease.check()
        waiter = SyncLock(kv, name, ttl_s=5.0)
        with pytest.raises(TimeoutError):
            waiter.acquire(timeout_s=0.3)
        # The waiter left the queue: only the holder's key is under the name.
        assert [item.key for item in kv.list(name + "/")] == [
            f"{name}/{holder.lease.id:016x}"
        ]
        holder.release()
        assert holder.token == 0
        assert kv.list(name + "/").items == ()


def test_a_sync_election_campaigns_resigns_and_is_observed(cluster: Any) -> None:
    name = unique("sync-election")
    with SyncClient(cluster.client_urls) as kv:
        first, second = SyncElection(kv, name, ttl_s=5.0), SyncElection(kv, name, ttl_s=5.0)
        token = first.campaign("a")
        leader = first.leader()
        assert leader is not None and leader.value == b"a"
        assert leader.create_revision == token
        observed = first.observe()
        assert next(observed).value == b"a"  # type: ignore[union-attr]
        with pytest.raises(TimeoutError):
            second.campaign("b", timeout_s=0.3)
        campaign = threading.Thread(target=second.campaign, args=("b",))
        campaign.start()
        _wait(lambda: len(kv.list(name + "/").items) == 2)
        first.resign()
        seen = next(observed)
        while seen is None or seen.value != b"b":
            seen = next(observed)
        observed.close()
        campaign.join(10)
        assert not campaign.is_alive()
        second.resign()
        assert first.leader() is None
