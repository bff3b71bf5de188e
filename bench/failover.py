"""Failover benchmark: how long writes stop when the leader of a three-node cluster fails.

Starts a local three-node kvstore cluster (real `kvstore serve` processes on 127.0.0.1, every
node fsyncing), runs a steady write load through the client library (`--writers` concurrent
writers, each with its own Client, writing unique keys back to back), and per trial injects
one fault into the current leader:

- `kill`    SIGKILL; the node is restarted after the failover;
- `term`    SIGTERM, a graceful stop: the leader hands leadership over first; restarted after;
- `pause`   SIGSTOP for `--pause-s` seconds, then SIGCONT; the resumed old leader must step
            down without disturbing the new one (checked: `disturbed` in the JSON);
- `isolate` its peer links are stalled through kvstore.chaos.proxy's ProxyMesh for
            `--pause-s` seconds, then healed (clients still reach it directly).

Per trial it records the timeline (milliseconds after the fault was injected): `noticed`
(a survivor no longer follows the old leader), `elected` (a survivor reports a new leader,
with its term and id; both from polling /v1/status every `--poll-ms`), `first_ack` (the end
of the outage as the client saw it); the client errors and the longest call.

Unavailability is what the client saw: from the last write acknowledged before the outage to
the first write acknowledged after it. Each writer is one client: its unavailability is the
longest gap between its consecutive acknowledged writes, from its last acknowledgement before
the fault until writes have flowed again for `--post-s` seconds after a new leader is known,
and a trial's figure is the worst writer's (headline: min/p50/p90/p99/max over trials). A
response already on its way when the leader dies may arrive just after the fault; the longest
gap does not let it hide the outage, nor does one writer being served while others hang.
`cluster_unavailability_ms` (table column "any p50") is the longest time no writer at all got
an acknowledgement.

After the trials of each fault, every acknowledged write is read back (linearizable reads):
none may be missing or hold another value (lost), and every key, written once by design,
must have version 1 (a higher version means a write was applied twice).

`--compare etcd` runs the same trials with the same load against three-node etcd on
loopback (etcd's JSON gateway, the same attempt timeout), once with etcd's defaults and once
tuned to kvstore's heartbeat and election settings, and prints them side by side with
ratios. Output: a table, `--json PATH`, and a PNG (`--png PATH`): every call's latency around
one SIGKILL trial with the phases marked, and the distribution of unavailability.

    python bench/failover.py --trials 20 --faults kill,term,pause --compare etcd
    python bench/failover.py --trials 2 --faults kill,term --json out.json   # what the test runs
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from etcdcluster import EtcdClient, EtcdCluster, etcd_binary, etcd_status

from kvstore.chaos.proxy import ProxyMesh
from kvstore.client import Client
from kvstore.client.config import ClientConfig
from kvstore.config import ServeConfig
from kvstore.errors import KVStoreError
from kvstore.server.localcluster import LocalCluster, free_port

FAULTS = ("kill", "term", "pause", "isolate")
KEYS_PER_BUCKET = 1000


# --- the systems under test ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node's answer to a status poll."""

    role: str
    term: int
    leader_id: int


class Writer(Protocol):
    async def put(self, key: str, value: str) -> int: ...

    async def close(self) -> None: ...


class System(Protocol):
    """A three-node cluster the benchmark can fault: kvstore or etcd."""

    label: str
    ids: list[int]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def writer(self) -> Writer: ...

    async def status(self, node: int, timeout_s: float) -> NodeView | None: ...

    def running(self, node: int) -> bool: ...

    def inject(self, fault: str, node: int) -> None: ...

    async def recover(self, fault: str, node: int) -> None: ...

    async def read_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]: ...


async def _wait_exit(running: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while running():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


class _KvWriter:
    def __init__(self, urls: list[str], config: ClientConfig) -> None:
        self.client = Client(urls, config=config)

    async def put(self, key: str, value: str) -> int:
        return (await self.client.put(key, value)).revision

    async def close(self) -> None:
        await self.client.close()


class KvstoreSystem:
    """A LocalCluster with kvstore's defaults; peer links go through proxies for `isolate`."""

    def __init__(self, base_dir: Path, client_config: ClientConfig, *, proxies: bool) -> None:
        self.label = "kvstore"
        self.ids = [1, 2, 3]
        self.base_dir = base_dir
        self.client_config = client_config
        self.proxies = proxies
        self.mesh: ProxyMesh | None = None
        self.cluster: LocalCluster | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        peer_ports = [free_port() for _ in self.ids]
        addresses = None
        if self.proxies:
            targets = {i: ("127.0.0.1", port) for i, port in zip(self.ids, peer_ports)}
            self.mesh = ProxyMesh(targets, random.Random(0))
            await self.mesh.start()
            addresses = self.mesh.dial_addresses()
        self.cluster = LocalCluster(
            self.base_dir, len(self.ids), peer_ports=peer_ports, peer_addresses=addresses
        )
        self.cluster.start()
        self._session = aiohttp.ClientSession(trust_env=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)
        if self.mesh is not None:
            await self.mesh.close()

    def writer(self) -> Writer:
        assert self.cluster is not None
        return _KvWriter(self.cluster.client_urls, self.client_config)

    async def status(self, node: int, timeout_s: float) -> NodeView | None:
        assert self.cluster is not None and self._session is not None
        if self.cluster.pid(node) is None:
            return None
        url = self.cluster.client_url(node) + "/v1/status"
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._session.get(url, timeout=timeout) as response:
                document = await response.json()
            return NodeView(document["role"], int(document["term"]), int(document["leader_id"]))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            return None

    def running(self, node: int) -> bool:
        assert self.cluster is not None
        return self.cluster.pid(node) is not None

    def inject(self, fault: str, node: int) -> None:
        assert self.cluster is not None
        pid = self.cluster.pid(node)
        assert pid is not None, f"node {node} is not running"
        if fault == "kill":
            os.kill(pid, signal.SIGKILL)
        elif fault == "term":
            os.kill(pid, signal.SIGTERM)
        elif fault == "pause":
            self.cluster.pause(node)
        elif fault == "isolate":
            assert self.mesh is not None, "isolate needs the proxy mesh"
            self.mesh.isolate(node)
        else:
            raise ValueError(f"unknown fault {fault!r}")

    async def recover(self, fault: str, node: int) -> None:
        cluster = self.cluster
        assert cluster is not None
        if fault in ("kill", "term"):
            if not await _wait_exit(lambda: cluster.pid(node) is not None, 15.0):
                cluster.kill(node)
            cluster.start_node(node)
        elif fault == "pause":
            cluster.resume(node)
        elif fault == "isolate":
            assert self.mesh is not None
            self.mesh.heal()

    async def read_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        assert self.cluster is not None
        async with Client(self.cluster.client_urls, timeout_s=30) as client:
            listing = await client.list(prefix, limit=KEYS_PER_BUCKET + 1)
        assert not listing.more, f"more than {KEYS_PER_BUCKET} keys under {prefix}"
        return {item.key: (item.value, item.version) for item in listing}


class _EtcdWriter:
    def __init__(self, urls: list[str], attempt_timeout_s: float, timeout_s: float) -> None:
        self.client = EtcdClient(urls, attempt_timeout_s=attempt_timeout_s, timeout_s=timeout_s)

    async def put(self, key: str, value: str) -> int:
        return await self.client.put(key, value)

    async def close(self) -> None:
        await self.client.close()


class EtcdSystem:
    """Three etcd members on loopback; `fault=isolate` is not supported (no per-link proxies:
    an etcd member dials every peer at the one address that peer advertises)."""

    def __init__(
        self, base_dir: Path, client_config: ClientConfig, *, heartbeat_ms: int, election_ms: int
    ) -> None:
        self.label = f"etcd {heartbeat_ms}/{election_ms}"
        self.cluster = EtcdCluster(base_dir, heartbeat_ms=heartbeat_ms, election_ms=election_ms)
        self.ids = list(self.cluster.ids)
        self.client_config = client_config
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.cluster.start()
        self._session = aiohttp.ClientSession(trust_env=False)
        deadline = time.monotonic() + 30
        while len(self.cluster.member_ids) < len(self.ids):
            for node in self.ids:
                answer = await etcd_status(self._session, self.cluster.client_url(node), 0.5)
                if answer is not None:
                    self.cluster.member_ids[answer[0]] = node
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd did not come up; logs in {self.cluster.base_dir}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        await asyncio.to_thread(self.cluster.stop)

    def writer(self) -> Writer:
        config = self.client_config
        return _EtcdWriter(self.cluster.client_urls, config.attempt_timeout_s, config.timeout_s)

    async def status(self, node: int, timeout_s: float) -> NodeView | None:
        assert self._session is not None
        if self.cluster.pid(node) is None:
            return None
        answer = await etcd_status(self._session, self.cluster.client_url(node), timeout_s)
        if answer is None:
            return None
        _, status = answer
        leader = self.cluster.member_ids.get(status.leader_id, 0)
        return NodeView(status.role, status.term, leader)

    def running(self, node: int) -> bool:
        return self.cluster.pid(node) is not None

    def inject(self, fault: str, node: int) -> None:
        signals = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "pause": signal.SIGSTOP}
        if fault not in signals:
            raise ValueError(f"fault {fault!r} is not supported against etcd")
        self.cluster.signal(node, signals[fault])

    async def recover(self, fault: str, node: int) -> None:
        if fault == "pause":
            self.cluster.signal(node, signal.SIGCONT)
            return
        if not await _wait_exit(lambda: self.cluster.pid(node) is not None, 15.0):
            self.cluster.signal(node, signal.SIGKILL)
            await _wait_exit(lambda: self.cluster.pid(node) is not None, 5.0)
        self.cluster.start_node(node)

    async def read_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        client = EtcdClient(self.cluster.client_urls, attempt_timeout_s=5.0, timeout_s=30.0)
        try:
            return await client.range_prefix(prefix)
        finally:
            await client.close()


# --- the load -----------------------------------------------------------------------------


@dataclass(slots=True)
class Call:
    """One put as the client saw it (perf_counter seconds)."""

    writer: int
    invoke: float
    ret: float
    ok: bool


@dataclass(slots=True)
class Load:
    """`writers` writers putting unique keys back to back; every call is recorded."""

    system: System
    writers: int
    run: str
    calls: list[Call] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    last_ack: float = 0.0
    stopping: bool = False

    @staticmethod
    def key(run: str, writer: int, seq: int) -> str:
        return f"{run}/{writer:03d}/{seq // KEYS_PER_BUCKET:06d}/{seq:09d}"

    def buckets(self) -> list[str]:
        """The key prefixes the writers used, each holding at most KEYS_PER_BUCKET keys."""
        seen = {key.rsplit("/", 1)[0] + "/" for key in (*self.acked, *self.unknown)}
        return sorted(seen)

    async def write(self, writer_id: int) -> None:
        writer = self.system.writer()
        seq = 0
        try:
            while not self.stopping:
                seq += 1
                key = self.key(self.run, writer_id, seq)
                value = f"{self.run}:{writer_id}:{seq}"
                invoke = time.perf_counter()
                try:
                    await writer.put(key, value)
                except (KVStoreError, TimeoutError, aiohttp.ClientError, RuntimeError):
                    self.unknown.add(key)
                    self.calls.append(Call(writer_id, invoke, time.perf_counter(), False))
                    continue
                now = time.perf_counter()
                self.calls.append(Call(writer_id, invoke, now, True))
                self.acked[key] = value
                self.last_ack = max(self.last_ack, now)
        finally:
            await writer.close()


# --- one trial ----------------------------------------------------------------------------


@dataclass(slots=True)
class Observed:
    """What polling the survivors saw after the fault (perf_counter seconds)."""

    noticed: float | None = None
    elected: float | None = None
    new_leader: int = 0
    new_term: int = 0


async def _views(system: System, nodes: list[int], timeout_s: float) -> dict[int, NodeView]:
    answers = await asyncio.gather(*(system.status(n, timeout_s) for n in nodes))
    return {n: v for n, v in zip(nodes, answers) if v is not None}


async def _watch(
    system: System, old_leader: int, old_term: int, poll_s: float, seen: Observed
) -> None:
    survivors = [n for n in system.ids if n != old_leader]
    while seen.elected is None:
        views = await _views(system, survivors, timeout_s=0.2)
        now = time.perf_counter()
        for view in views.values():
            if seen.noticed is None and (view.leader_id != old_leader or view.role != "follower"):
                seen.noticed = now
            new = view.leader_id not in (0, old_leader) and view.term > old_term
            if new and views.get(view.leader_id, view).term == view.term:
                seen.noticed = seen.noticed or now
                seen.elected = now
                seen.new_leader, seen.new_term = view.leader_id, view.term
                return
        await asyncio.sleep(poll_s)


async def wait_healthy(system: System, load: Load, timeout_s: float) -> tuple[int, int]:
    """Poll until every node runs and agrees on one leader and term, and a write was
    acknowledged after that; returns (leader, term)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = await _views(system, system.ids, timeout_s=0.5)
        leaders = {(v.leader_id, v.term) for v in views.values()}
        if len(views) == len(system.ids) and len(leaders) == 1:
            leader, term = leaders.pop()
            if leader and views[leader].role == "leader":
                agreed_at = time.perf_counter()
                while load.last_ack <= agreed_at and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                if load.last_ack > agreed_at:
                    return leader, term
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{system.label}: cluster not healthy within {timeout_s} s")


def unavailability(calls: list[Call], fault_at: float, until: float) -> tuple[float, float, float]:
    """(gap start, gap end, naive end): the longest gap between consecutive acknowledgements
    from the last one before the fault up to `until`; naive end is the first ack after."""
    acks = sorted(c.ret for c in calls if c.ok and c.ret <= until)
    before = [a for a in acks if a < fault_at]
    after = [a for a in acks if a >= fault_at]
    start = before[-1] if before else fault_at
    if not after:
        return start, until, until
    points = [start, *after]
    gap_start, gap_end = max(itertools.pairwise(points), key=lambda pair: pair[1] - pair[0])
    return gap_start, gap_end, after[0]


def writer_unavailability(calls: list[Call], fault_at: float, until: float) -> tuple[float, int]:
    """The headline: the same longest gap, but per writer (each writer is one client waiting
    on its own calls), and the worst writer's: (gap in seconds, writer). A cluster that keeps
    acknowledging one writer's calls while the others hang is unavailable to those others."""
    worst, worst_writer = 0.0, -1
    for writer in sorted({c.writer for c in calls}):
        own = [c for c in calls if c.writer == writer]
        start, end, _ = unavailability(own, fault_at, until)
        if end - start > worst:
            worst, worst_writer = end - start, writer
    return worst, worst_writer


async def _survivors_agree(system: System, old_leader: int) -> tuple[int, int] | None:
    """The (leader, term) every survivor reports, or None when they disagree."""
    views = await _views(system, [n for n in system.ids if n != old_leader], timeout_s=0.2)
    agreed = {(v.leader_id, v.term) for v in views.values()}
    return agreed.pop() if len(agreed) == 1 else None


async def _disturbance(
    system: System, old_leader: int, before: tuple[int, int] | None, timeout_s: float
) -> tuple[bool | None, dict[int, list[Any]]]:
    """After a pause or isolation ends: wait for the old leader to follow the new one; True
    when leader or term differ from what the survivors agreed on just before the fault ended
    (the returning old leader disturbed the new one). Also every node's [role, leader, term]
    as last seen."""
    if before is None:
        return None, {}
    views: dict[int, NodeView] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = await _views(system, system.ids, timeout_s=0.5)
        survivors = [v for node, v in views.items() if node != old_leader]
        if any((v.leader_id, v.term) != before for v in survivors):
            return True, _as_lists(views)
        old = views.get(old_leader)
        # The old leader has come back and follows the new one in its term (a member that has
        # just stepped down may not know the leader, or report the new term, at once).
        if old is not None and old.role == "follower" and (old.leader_id, old.term) == before:
            return False, _as_lists(views)
        await asyncio.sleep(0.02)
    return True, _as_lists(views)


def _as_lists(views: dict[int, NodeView]) -> dict[int, list[Any]]:
    return {node: [v.role, v.leader_id, v.term] for node, v in sorted(views.items())}


async def run_trial(
    system: System, load: Load, fault: str, args: argparse.Namespace
) -> tuple[dict[str, Any], list[Call]]:
    leader, term = await wait_healthy(system, load, args.healthy_timeout_s)
    await asyncio.sleep(args.settle_s)  # steady load before the fault (not a correctness wait)
    seen = Observed()
    calls_from = len(load.calls)
    fault_at = time.perf_counter()
    system.inject(fault, leader)
    watcher = asyncio.create_task(
        _watch(system, leader, term, args.poll_ms / 1000, seen), name="failover-watch"
    )
    timed = fault in ("pause", "isolate")
    limit = fault_at + (args.pause_s if timed else args.trial_timeout_s)
    while time.perf_counter() < limit:
        known = seen.elected is not None and load.last_ack > seen.elected
        if known and time.perf_counter() > seen.elected + args.post_s:  # type: ignore[operator]
            break
        await asyncio.sleep(0.01)
    if timed:
        await asyncio.sleep(max(0.0, limit - time.perf_counter()))
    window_end = time.perf_counter()
    before = await _survivors_agree(system, leader) if timed and seen.elected else None
    await system.recover(fault, leader)
    recovered_at = time.perf_counter()
    if seen.elected is None:
        # No failover before the fault ended (or the deadline): the outage lasts until writes
        # flow again after recovery.
        await _ack_after(load, recovered_at, args.trial_timeout_s)
        window_end = time.perf_counter()
    disturbed, after = await _disturbance(system, leader, before, 10.0) if timed else (None, {})
    watcher.cancel()
    calls = [c for c in load.calls[calls_from:] if c.invoke <= window_end]
    earlier = [
        c for c in load.calls[max(0, calls_from - 2000) : calls_from] if c.ret >= fault_at - 1
    ]
    window = earlier + calls
    gap_start, gap_end, naive_end = unavailability(window, fault_at, window_end)
    writer_gap, worst_writer = writer_unavailability(window, fault_at, window_end)
    in_fault = [c for c in window if c.ret >= fault_at]

    def ms(at: float | None) -> float | None:
        return None if at is None else round((at - fault_at) * 1000, 3)

    trial = {
        "fault": fault,
        "old_leader": leader,
        "old_term": term,
        "timeline_ms": {
            "fault_injected": 0.0,
            "leader_loss_noticed": ms(seen.noticed),
            "new_leader_elected": ms(seen.elected),
            "first_write_acked": ms(gap_end),
            "fault_ended": ms(recovered_at) if timed else None,
        },
        "new_leader": seen.new_leader or None,
        "new_term": seen.new_term or None,
        "unavailability_ms": round(writer_gap * 1000, 3),
        "worst_writer": worst_writer,
        "cluster_unavailability_ms": round((gap_end - gap_start) * 1000, 3),
        "last_ack_before_ms": ms(gap_start),
        "naive_first_ack_after_ms": ms(naive_end),
        "client_errors": sum(1 for c in in_fault if not c.ok),
        "longest_call_ms": round(max((c.ret - c.invoke for c in in_fault), default=0.0) * 1000, 3),
        "acked_in_window": sum(1 for c in in_fault if c.ok),
        "disturbed": disturbed,
        "before_fault_ended": list(before) if before else None,
        "after_fault_ended": after,
    }
    relative = [
        Call(c.writer, c.invoke - fault_at, c.ret - fault_at, c.ok)
        for c in window
        if c.ret >= fault_at - 1.0
    ]
    return trial, relative


async def _ack_after(load: Load, at: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while load.last_ack <= at and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


# --- checking and summarizing -----------------------------------------------------------------


async def check_writes(system: System, load: Load) -> dict[str, Any]:
    """Read every key the load wrote back: acknowledged ones must be there with their value
    (else lost), and no key may have version > 1 (written once, so > 1 = applied twice)."""
    lost: list[str] = []
    twice: list[str] = []
    for prefix in load.buckets():
        found = await system.read_prefix(prefix)
        for key, (_, version) in found.items():
            if version > 1:
                twice.append(key)
        for key, value in load.acked.items():
            if key.startswith(prefix) and (key not in found or found[key][0] != value.encode()):
                lost.append(key)
    return {
        "acknowledged": len(load.acked),
        "unknown_outcome": len(load.unknown),
        "lost": len(lost),
        "applied_twice": len(twice),
        "lost_examples": lost[:5],
        "applied_twice_examples": twice[:5],
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of an unsorted list; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    values = [t["unavailability_ms"] for t in trials]
    return {
        "trials": len(trials),
        "min_ms": min(values, default=math.nan),
        "p50_ms": percentile(values, 0.50),
        "p90_ms": percentile(values, 0.90),
        "p99_ms": percentile(values, 0.99),
        "max_ms": max(values, default=math.nan),
        "cluster_p50_ms": percentile([t["cluster_unavailability_ms"] for t in trials], 0.50),
        "cluster_p99_ms": percentile([t["cluster_unavailability_ms"] for t in trials], 0.99),
        "client_errors": sum(t["client_errors"] for t in trials),
        "longest_call_ms": max((t["longest_call_ms"] for t in trials), default=math.nan),
        "disturbed": sum(1 for t in trials if t["disturbed"]),
    }


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def step(self, label: str, last: dict[str, Any] | None) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(1, self.total))
        tail = f" last {last['unavailability_ms']:.0f} ms" if last else ""
        elapsed = time.monotonic() - self.started
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{label:<22}{tail:<16} {elapsed:5.0f} s"
        )
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


async def _run_trials(
    system: System, fault: str, args: argparse.Namespace, progress: Progress
) -> tuple[Load, list[dict[str, Any]], list[list[Call]]]:
    load = Load(system, args.writers, run=f"fo-{fault}-{os.getpid()}-{time.time_ns()}")
    tasks = [asyncio.create_task(load.write(w), name=f"writer-{w}") for w in range(args.writers)]
    trials: list[dict[str, Any]] = []
    timelines: list[list[Call]] = []
    try:
        for _ in range(args.trials):
            trial, calls = await run_trial(system, load, fault, args)
            trials.append(trial)
            timelines.append(calls)
            progress.step(f"{system.label} {fault}", trial)
        await wait_healthy(system, load, args.healthy_timeout_s)
    finally:
        load.stopping = True
        await asyncio.gather(*tasks, return_exceptions=True)
    return load, trials, timelines


async def run_fault(
    system: System, fault: str, args: argparse.Namespace, progress: Progress
) -> dict[str, Any]:
    """Start `system`, run the load and `args.trials` trials of `fault`, check the writes;
    the system's processes are stopped whatever happens."""
    try:
        await system.start()
        load, trials, timelines = await _run_trials(system, fault, args, progress)
        check = await check_writes(system, load)
    finally:
        await system.stop()
    return {
        "system": system.label,
        "fault": fault,
        "summary": summarize(trials),
        "trials": trials,
        "writes": check,
        "timelines": timelines,
    }


# --- running the comparison -----------------------------------------------------------------


def kvstore_timing_ms() -> tuple[int, int]:
    """kvstore's default heartbeat interval and (minimum) election timeout in milliseconds."""
    defaults = {f.name: f.default for f in fields(ServeConfig)}
    tick = int(defaults["tick_interval_ms"])
    return tick * int(defaults["heartbeat_ticks"]), tick * int(defaults["election_ticks"])


def make_systems(fault: str, base: Path, args: argparse.Namespace) -> list[System]:
    config = ClientConfig(attempt_timeout_s=args.attempt_timeout_ms / 1000, timeout_s=5.0)
    systems: list[System] = [
        KvstoreSystem(base / f"kvstore-{fault}", config, proxies=fault == "isolate")
    ]
    if args.compare == "etcd" and fault != "isolate":
        heartbeat_ms, election_ms = kvstore_timing_ms()
        # etcd refuses an election timeout under 5 heartbeats: tuned is the closest it allows.
        tuned = (heartbeat_ms, max(election_ms, 5 * heartbeat_ms))
        for beat, election in ((100, 1000), tuned):
            directory = base / f"etcd-{beat}-{election}-{fault}"
            systems.append(EtcdSystem(directory, config, heartbeat_ms=beat, election_ms=election))
    return systems


async def run_all(args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    plans = [(fault, make_systems(fault, base, args)) for fault in args.faults]
    progress = Progress(sum(len(systems) for _, systems in plans) * args.trials)
    results = []
    for fault, systems in plans:
        # Same fault, systems one after the other: the closest to side by side two cores allow.
        for system in systems:
            results.append(await run_fault(system, fault, args, progress))
    return results


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def print_table(results: list[dict[str, Any]]) -> None:
    print()
    print(
        "Unavailability (ms) per trial: the worst writer's wait from its last acknowledged write"
        " before the fault to its first after it;\n'any p50': median time no writer at all got"
        " an acknowledgement; errors: failed client calls; longest: longest single call (ms);"
        "\nlost / twice: acknowledged writes missing / keys applied twice at the final read-back"
    )
    header = (
        f"{'fault':<8}{'system':<16}{'trials':>6}{'min':>8}{'p50':>8}{'p90':>8}{'p99':>8}"
        f"{'max':>8}{'any p50':>9}  {'errors':>6}{'longest':>9}  {'lost':>4}{'twice':>6}"
        "  vs kvstore p50/p99"
    )
    print(header)
    print("-" * len(header))
    baseline: dict[str, dict[str, Any]] = {}
    for result in results:
        s, w, fault = result["summary"], result["writes"], result["fault"]
        if result["system"] == "kvstore":
            baseline[fault] = s
        ratio = ""
        base = baseline.get(fault)
        if base is not None and result["system"] != "kvstore" and base["p50_ms"] > 0:
            ratio = f"{s['p50_ms'] / base['p50_ms']:.1f}x / {s['p99_ms'] / base['p99_ms']:.1f}x"
        print(
            f"{fault:<8}{result['system']:<16}{s['trials']:>6}{_fmt(s['min_ms']):>8}"
            f"{_fmt(s['p50_ms']):>8}{_fmt(s['p90_ms']):>8}{_fmt(s['p99_ms']):>8}"
            f"{_fmt(s['max_ms']):>8}{_fmt(s['cluster_p50_ms']):>9}  {s['client_errors']:>6}{_fmt(s['longest_call_ms']):>9}"
            f"  {w['lost']:>4}{w['applied_twice']:>6}  {ratio}"
        )
    disturbed = [r for r in results if r["summary"]["disturbed"]]
    for result in disturbed:
        print(
            f"note: {result['system']} {result['fault']}: the returning old leader disturbed "
            f"the new one in {result['summary']['disturbed']} trial(s)"
        )


def _median_trial(result: dict[str, Any]) -> int:
    values = [t["unavailability_ms"] for t in result["trials"]]
    target = percentile(values, 0.5)
    return values.index(target)


def draw_png(results: list[dict[str, Any]], path: Path) -> bool:
    """Left: every call's latency around the median kvstore trial of the first fault, phases
    marked; right: the distribution of unavailability per system and fault."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install -e '.[bench]')", file=sys.stderr)
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    shown = next((r for r in results if r["system"] == "kvstore" and r["trials"]), None)
    if shown is not None:
        _plot_timeline(left, shown, _median_trial(shown))
    labels, data = [], []
    for result in results:
        labels.append(f"{result['system']}\n{result['fault']}")
        data.append([t["unavailability_ms"] for t in result["trials"]])
    right.boxplot(data, whis=(0, 100), showfliers=False)
    for position, values in enumerate(data, start=1):
        jitter = random.Random(position)
        right.scatter(
            [position + jitter.uniform(-0.15, 0.15) for _ in values], values, s=10, alpha=0.6
        )
    right.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    right.set_yscale("log")
    right.set_ylabel("unavailability (ms, log scale)")
    right.set_title("Unavailability per trial (box: min/quartiles/max)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _median_calls(result: dict[str, Any]) -> list[Call]:
    """The calls of the median trial: from this run, or from a saved JSON (--plot-from)."""
    if "timelines" in result:
        calls: list[Call] = result["timelines"][_median_trial(result)]
        return calls
    return [Call(**call) for call in result["calls_of_median_trial"]]


def _plot_timeline(axes: Any, result: dict[str, Any], index: int) -> None:
    trial = result["trials"][index]
    calls = _median_calls(result)
    worst = trial.get("worst_writer")
    groups = [
        ("acknowledged write", "tab:blue", [c for c in calls if c.ok and c.writer != worst]),
        (f"writer {worst} (waited longest)", "tab:orange", [
            c for c in calls if c.ok and c.writer == worst
        ]),
        ("failed call", "tab:red", [c for c in calls if not c.ok]),
    ]  # fmt: skip
    for label, color, group in groups:
        if group:
            points = [(c.ret * 1000, (c.ret - c.invoke) * 1000) for c in group]
            axes.scatter(*zip(*points), s=8, label=label, color=color)
    timeline = trial["timeline_ms"]
    marks = [
        ("fault_injected", "fault injected", "black"),
        ("leader_loss_noticed", "leader loss noticed", "tab:brown"),
        ("new_leader_elected", f"new leader {trial['new_leader']} (term {trial['new_term']})",
         "tab:green"),
        ("first_write_acked", "first write acknowledged", "tab:purple"),
    ]  # fmt: skip
    for name, label, color in marks:
        if timeline.get(name) is not None:
            axes.axvline(timeline[name], color=color, linestyle="--", linewidth=1, label=label)
    axes.axvspan(trial["last_ack_before_ms"], timeline["first_write_acked"], color="tab:red",
                 alpha=0.1, label=f"no writer acknowledged "
                 f"({trial['cluster_unavailability_ms']:.0f} ms)")  # fmt: skip
    unavailable = trial["unavailability_ms"]
    axes.set_xlim(-max(150.0, unavailable), max(timeline["first_write_acked"], unavailable) + 300)
    axes.set_yscale("log")
    axes.set_xlabel("time the call returned, relative to the fault (ms)")
    axes.set_ylabel("call latency (ms, log scale)")
    axes.set_title(
        f"{result['system']} {result['fault']}: median trial ({index + 1}), every client call;"
        f"\nworst writer unavailable {unavailable:.0f} ms",
        fontsize=10,
    )
    axes.legend(fontsize=7, loc="upper right")


def write_json(results: list[dict[str, Any]], args: argparse.Namespace, started: float) -> None:
    heartbeat_ms, election_ms = kvstore_timing_ms()
    document = {
        "benchmark": "failover",
        "started_unix": started,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_start": args.load_at_start,
            "load_average_at_end": os.getloadavg(),
            "etcd": etcd_binary(),
        },
        "settings": {
            "writers": args.writers,
            "attempt_timeout_ms": args.attempt_timeout_ms,
            "pause_s": args.pause_s,
            "poll_ms": args.poll_ms,
            "kvstore_heartbeat_ms": heartbeat_ms,
            "kvstore_election_ms": election_ms,
        },
        "results": [
            {
                **{k: v for k, v in r.items() if k != "timelines"},
                "calls_of_median_trial": [
                    asdict(c) for c in r["timelines"][_median_trial(r)]
                ] if r["trials"] else [],
            }
            for r in results
        ],
    }  # fmt: skip
    Path(args.json_path).write_text(json.dumps(document, indent=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20, help="trials per fault and system")
    parser.add_argument("--faults", default="kill,term,pause", help=f"from {','.join(FAULTS)}")
    parser.add_argument("--compare", choices=["etcd"], help="also run three-node etcd")
    parser.add_argument("--writers", type=int, default=8, help="concurrent writers")
    parser.add_argument("--attempt-timeout-ms", type=float, default=100.0,
                        help="per-attempt timeout of both clients (default 100)")  # fmt: skip
    parser.add_argument("--pause-s", type=float, default=2.0, help="SIGSTOP/isolation length")
    parser.add_argument("--settle-s", type=float, default=0.5, help="load before each fault")
    parser.add_argument("--post-s", type=float, default=0.5,
                        help="load measured after a new leader is known")  # fmt: skip
    parser.add_argument("--poll-ms", type=float, default=5.0, help="status polling interval")
    parser.add_argument("--trial-timeout-s", type=float, default=20.0)
    parser.add_argument("--healthy-timeout-s", type=float, default=60.0)
    parser.add_argument("--json", dest="json_path", help="write every figure as JSON here")
    parser.add_argument("--png", default="failover.png", help="figure path ('' for none)")
    parser.add_argument("--base-dir", help="directory for data and logs (default: a temp dir)")
    parser.add_argument("--plot-from", help="only redraw the PNG from a JSON this wrote")
    args = parser.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
    if args.compare == "etcd" and etcd_binary() is None:
        parser.error("--compare etcd needs an etcd binary on PATH (apt-get install etcd-server)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_from:
        saved = json.loads(Path(args.plot_from).read_text())["results"]
        return 0 if draw_png(saved, Path(args.png or "failover.png")) else 1
    base = Path(args.base_dir) if args.base_dir else Path(tempfile.mkdtemp(prefix="kvfailover-"))
    started = time.time()
    args.load_at_start = os.getloadavg()
    print(
        f"failover benchmark under {base}; {os.cpu_count()} cpus, load average "
        f"{' '.join(f'{x:.2f}' for x in args.load_at_start)}; {args.writers} writers, "
        f"attempt timeout {args.attempt_timeout_ms:.0f} ms",
        flush=True,
    )
    try:
        import uvloop

        results = uvloop.run(run_all(args, base))
    except ImportError:
        results = asyncio.run(run_all(args, base))
    print_table(results)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json_path:
        write_json(results, args, started)
    if args.png and draw_png(results, Path(args.png)):
        print(f"figure: {Path(args.png).resolve()}")
    broken = [r for r in results if r["writes"]["lost"] or r["writes"]["applied_twice"]]
    for result in broken:
        why = (
            " (etcd's gateway has no request ids: a put retried after an attempt timeout can"
            " apply twice)"
            if result["system"] != "kvstore"
            else ""
        )
        print(f"writes lost or applied twice: {result['system']} {result['fault']}: "
              f"{result['writes']}{why}")  # fmt: skip
    return 1 if any(r["system"] == "kvstore" for r in broken) else 0


if __name__ == "__main__":
    sys.exit(main())
