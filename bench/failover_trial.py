"""One failover trial and what it measures: the write load, the fault, the outage as the
client saw it, and the final read-back of every acknowledged write (bench/failover.py).

`Load` runs the writers and records every call; `run_trial` waits for a healthy cluster,
injects one fault into the leader, watches the survivors elect a new one and returns the
trial's figures (see bench/failover.py's docstring for their definitions); `check_writes`
reads every key back; `summarize` turns a fault's trials into the JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from failover_systems import KEYS_PER_BUCKET, NodeView, System
from stats import percentile

from kvstore.errors import KVStoreError


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
