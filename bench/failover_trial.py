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
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from failover_systems import KEYS_PER_BUCKET, NodeEvent, NodeView, System
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
    # --ab-option: odd writers run the variant client configuration, even ones the base.
    ab: bool = False

    @staticmethod
    def key(run: str, writer: int, seq: int) -> str:
        return f"{run}/{writer:03d}/{seq // KEYS_PER_BUCKET:06d}/{seq:09d}"

    def buckets(self) -> list[str]:
        """The key prefixes the writers used, each holding at most KEYS_PER_BUCKET keys."""
        seen = {key.rsplit("/", 1)[0] + "/" for key in (*self.acked, *self.unknown)}
        return sorted(seen)

    async def write(self, writer_id: int) -> None:
        writer = self.system.writer(variant=self.ab and writer_id % 2 == 1)
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


class LeaderNews(logging.Handler):
    """When the writers' clients learned a leader: the client library logs `leader url=`
    at DEBUG whenever a Client starts to believe in another leader (kvstore.client.core).
    Installed on the `kvstore.client` logger for the run; keeps (wall time, url)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.learned: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if record.msg == "leader url=%s" and isinstance(args, tuple) and args:
            self.learned.append((record.created, str(args[0])))

    def install(self) -> None:
        client_log = logging.getLogger("kvstore.client")
        client_log.addHandler(self)
        client_log.setLevel(logging.DEBUG)

    def remove(self) -> None:
        logging.getLogger("kvstore.client").removeHandler(self)


LEADER_NEWS = LeaderNews()

# The phases of a failover, each the first matching node log event (ms after the fault); the
# survivors are the nodes other than the old leader. See bench/README.md for what each means.
PHASES = (
    "old_leader_handing_over", "old_leader_stepped_down", "survivor_noticed",
    "campaign_started", "election_won", "old_leader_learned_new", "client_learned_first",
    "client_learned_last", "first_write_acked", "worst_writer_acked",
)  # fmt: skip


def _first(events: list[NodeEvent], fault_unix: float, match: Any) -> float | None:
    for event in events:
        if match(event):
            return round((event.at_unix - fault_unix) * 1000, 1)
    return None


def node_phases(events: list[NodeEvent], old: int, fault_unix: float) -> dict[str, float | None]:
    """The survivors' and the old leader's steps from their logs, ms after the fault."""
    old_id = str(old)

    def survivor(event: NodeEvent, *names: str) -> bool:
        return event.node != old and event.event in names

    def noticed(event: NodeEvent) -> bool:
        about_old = event.fields.get("peer", event.fields.get("leader")) == old_id
        return survivor(event, "timeout_now", "became_pre_candidate", "became_candidate") or (
            survivor(event, "leader_reported_down", "peer_down", "peer_silent") and about_old
        )

    def learned(event: NodeEvent) -> bool:
        named = event.fields.get("leader", "0")
        return event.node == old and event.event == "leader_changed" and named not in ("0", old_id)

    return {
        "old_leader_handing_over": _first(
            events, fault_unix, lambda e: e.node == old and e.event == "transfer_started"
        ),
        "old_leader_stepped_down": _first(
            events, fault_unix, lambda e: e.node == old and e.event == "became_follower"
        ),
        "survivor_noticed": _first(events, fault_unix, noticed),
        "campaign_started": _first(
            events,
            fault_unix,
            lambda e: survivor(e, "became_pre_candidate", "became_candidate", "timeout_now"),
        ),
        "election_won": _first(events, fault_unix, lambda e: survivor(e, "became_leader")),
        "old_leader_learned_new": _first(events, fault_unix, learned),
    }


def client_phases(
    news: list[tuple[float, str]], url: str | None, fault_unix: float, writers: int
) -> dict[str, float | None]:
    """When the first and the last writer's client began to use the new leader `url`."""
    times = sorted(at for at, named in news if named == url and at >= fault_unix)
    first = round((times[0] - fault_unix) * 1000, 1) if times else None
    last = round((times[writers - 1] - fault_unix) * 1000, 1) if len(times) >= writers else None
    return {"client_learned_first": first, "client_learned_last": last}


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
    news_from = len(LEADER_NEWS.learned)
    fault_at = time.perf_counter()
    fault_unix = time.time()
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

    window_unix = fault_unix + (window_end - fault_at)
    phases = node_phases(system.node_events(fault_unix, window_unix), leader, fault_unix)
    new_url = system.client_url(seen.new_leader) if seen.new_leader else None
    news = LEADER_NEWS.learned[news_from:]
    phases.update(client_phases(news, new_url, fault_unix, load.writers))
    phases["first_write_acked"] = ms(naive_end)
    worst_calls = [c for c in window if c.writer == worst_writer]
    phases["worst_writer_acked"] = ms(unavailability(worst_calls, fault_at, window_end)[1])

    groups = {}
    if load.ab:
        for name, parity in (("a", 0), ("b", 1)):
            own = [c for c in window if c.writer % 2 == parity]
            groups[name] = round(writer_unavailability(own, fault_at, window_end)[0] * 1000, 3)
    trial = {
        "fault": fault,
        "unavailability_ms_ab": groups or None,
        "old_leader": leader,
        "old_term": term,
        "timeline_ms": {
            "fault_injected": 0.0,
            "leader_loss_noticed": ms(seen.noticed),
            "new_leader_elected": ms(seen.elected),
            "first_write_acked": ms(gap_end),
            "fault_ended": ms(recovered_at) if timed else None,
        },
        "phases_ms": phases,
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
        "phases_p50_ms": {phase: _phase_median(trials, phase) for phase in PHASES},
        "ab": _ab_summary(trials),
    }


def _ab_summary(trials: list[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """--ab-option: the worst writer's unavailability of each group (a: the base client
    configuration, even writers; b: the variant, odd writers), over the same trials."""
    if not trials or not trials[0].get("unavailability_ms_ab"):
        return None
    summary = {}
    for group in ("a", "b"):
        values = [t["unavailability_ms_ab"][group] for t in trials]
        summary[group] = {
            "p50_ms": percentile(values, 0.50),
            "p90_ms": percentile(values, 0.90),
            "p99_ms": percentile(values, 0.99),
        }
    return summary


def _phase_median(trials: list[dict[str, Any]], phase: str) -> float | None:
    seen = [t["phases_ms"][phase] for t in trials if t["phases_ms"].get(phase) is not None]
    return percentile(seen, 0.50) if seen else None
