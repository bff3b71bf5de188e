"""What the client library costs per call, and how it rides through a killed leader.

Two measurements, printed as figures (medians and percentiles), optionally saved as JSON:

1. **Overhead per call**: loops of GETs of one key (linearizable, then stale) against the
   leader, through `kvstore.Client` versus a bare `aiohttp` request of the same URL and
   query on one pooled session, alternating call by call within the same run (so drift in
   the machine's load hits both alike). overhead = median(client) - median(bare), and the
   median of the paired differences.
2. **Failover** (`--kills N`, `--fault kill|term`): several workers run compare-and-set
   increment loops on a few counters through one Client while the leader is SIGKILLed (or
   SIGTERMed: a graceful handover) and restarted N times; reports
   the longest call, the retries per failover, the longest gap between successful
   increments, and checks each counter equals the increments that returned success.

By default it starts its own three-node `LocalCluster` in a temporary directory; `--endpoints`
measures the overhead against a running cluster instead (failover needs its own cluster).

    python bench/client_overhead.py                      # overhead, 2000 gets each way
    python bench/client_overhead.py --kills 3 --json out.json
    python bench/client_overhead.py --quick              # what tests run: small and fast
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yarl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import median, percentile

from kvstore import Client
from kvstore.client import ClientConfig, Consistency
from kvstore.errors import DeadlineExceededError, KVStoreError, PreconditionFailedError

OVERHEAD_KEY = "bench/client-overhead"


def _summary_us(samples: Sequence[float]) -> dict[str, float]:
    return {
        "median_us": round(median(samples) * 1e6, 1),
        "p90_us": round(percentile(samples, 0.90) * 1e6, 1),
        "p99_us": round(percentile(samples, 0.99) * 1e6, 1),
    }


async def measure_overhead(
    endpoints: Sequence[str], *, iterations: int = 2000, consistency: str = "linearizable"
) -> dict[str, Any]:
    """Latency of a GET through Client vs bare aiohttp, same leader, same run.

    The two alternate call by call (bare, client, bare, client, ...), so both see the same
    load on a shared machine; besides each side's median, the median of the paired
    differences (client - the bare call just before it) is reported.
    """
    config = ClientConfig(read_consistency=Consistency(consistency))
    async with Client(endpoints, config=config) as client:
        await client.put(OVERHEAD_KEY, b"x" * 64)
        await client.get(OVERHEAD_KEY)
        leader = client.leader_url or client.endpoints[0]
        url = yarl.URL(f"{leader}/v1/kv/{OVERHEAD_KEY.replace('/', '%2F')}", encoded=True)
        query = {"consistency": consistency}
        client_samples: list[float] = []
        bare_samples: list[float] = []
        async with aiohttp.ClientSession() as session:
            for _ in range(iterations):
                start = time.perf_counter()
                async with session.get(url, params=query) as response:
                    await response.read()
                    assert response.status == 200, response.status
                bare_samples.append(time.perf_counter() - start)
                start = time.perf_counter()
                await client.get(OVERHEAD_KEY)
                client_samples.append(time.perf_counter() - start)
        stats = client.stats
    client_summary = _summary_us(client_samples)
    bare_summary = _summary_us(bare_samples)
    paired = [ours - bare for ours, bare in zip(client_samples, bare_samples)]
    return {
        "iterations": len(client_samples),
        "consistency": consistency,
        "endpoint": leader,
        "client": client_summary,
        "bare_aiohttp": bare_summary,
        "overhead_median_us": round(client_summary["median_us"] - bare_summary["median_us"], 1),
        "overhead_paired_median_us": round(median(paired) * 1e6, 1),
        "ratio_median": round(client_summary["median_us"] / bare_summary["median_us"], 3),
        "client_retries": stats.retries,
    }


@dataclass
class FailoverReport:
    """What the increment loops saw while the leader was killed and restarted."""

    kills: int
    # "kill" (SIGKILL) or "term" (SIGTERM: the leader hands over before it exits).
    fault: str = "kill"
    successes: int = 0
    # cas calls that raised DeadlineExceededError with outcome_unknown=True.
    unknown_outcomes: int = 0
    # cas comparisons lost to another worker (a normal part of the loop).
    conflicts: int = 0
    other_errors: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    longest_call_s: float = 0.0
    longest_gap_s: float = 0.0
    calls: int = 0
    retries: int = 0
    retries_per_failover: float = 0.0
    leader_changes: int = 0
    deadline_s: float = 0.0
    failover_s: list[float] = field(default_factory=list)
    # Retries by reason (transport, timeout, not_leader, no_leader, unavailable, ...), from
    # the client's DEBUG log.
    retry_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        """Every counter equals the increments that returned success (no loss, no double)."""
        return self.unknown_outcomes == 0 and self.counters == self.expected


async def _increment_loop(
    client: Client, key: str, report: FailoverReport, stop: asyncio.Event, timeline: list[float]
) -> None:
    """Read-modify-write increments of `key` until `stop`, timing every call."""

    async def timed(coroutine: Any) -> Any:
        start = time.monotonic()
        try:
            return await coroutine
        finally:
            elapsed = time.monotonic() - start
            report.calls += 1
            report.longest_call_s = max(report.longest_call_s, elapsed)

    while not stop.is_set():
        try:
            current = await timed(client.get(key))
            value, revision = int(current.value), current.mod_revision
            await timed(client.cas(key, str(value + 1).encode(), mod_revision=revision))
        except PreconditionFailedError:
            report.conflicts += 1
            continue
        except DeadlineExceededError as exc:
            if exc.outcome_unknown:
                report.unknown_outcomes += 1
            else:
                report.other_errors.append(repr(exc))
            continue
        except KVStoreError as exc:
            report.other_errors.append(repr(exc))
            continue
        report.successes += 1
        report.expected[key] = report.expected.get(key, 0) + 1
        timeline.append(time.monotonic())


def _kill_and_restart(cluster: Any, kills: int, pause_s: float, fault: str) -> list[float]:
    """Stop the leader `kills` times (SIGKILL, or SIGTERM: a graceful leadership transfer),
    restarting it each time; returns the time each took until another node led."""
    failovers: list[float] = []
    for _ in range(kills):
        time.sleep(pause_s)  # pacing only: let the workload run against a settled leader
        leader = cluster.wait_for_leader(timeout_s=15.0)
        killed_at = time.monotonic()
        if fault == "term":
            cluster.terminate(leader)
        else:
            cluster.kill(leader)
        cluster.wait_for_leader(timeout_s=15.0, exclude=(leader,))
        failovers.append(time.monotonic() - killed_at)
        cluster.start_node(leader)
        deadline = time.monotonic() + 15.0
        while cluster.status(leader) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(pause_s)
    return failovers


class _RetryReasons(logging.Handler):
    """Counts the client's retries by reason, from its DEBUG records ("retry ... reason=X")."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__(logging.DEBUG)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("retry ") and " reason=" in message:
            reason = message.split(" reason=", 1)[1].split(" ", 1)[0]
            self.counts[reason] = self.counts.get(reason, 0) + 1


async def measure_failover(
    cluster: Any,
    *,
    kills: int = 3,
    fault: str = "kill",
    workers: int = 4,
    keys: int = 2,
    timeout_s: float = 5.0,
    pause_s: float = 1.0,
    prefix: str = "bench/failover",
) -> FailoverReport:
    """Increment loops through one Client while `cluster`'s leader is killed `kills` times."""
    report = FailoverReport(kills=kills, fault=fault, deadline_s=timeout_s)
    names = [f"{prefix}/{index}" for index in range(keys)]
    config = ClientConfig(timeout_s=timeout_s)
    client_log = logging.getLogger("kvstore.client")
    handler = _RetryReasons(report.retry_reasons)
    previous_level = client_log.level
    client_log.addHandler(handler)
    client_log.setLevel(logging.DEBUG)
    try:
        await _run_failover(cluster, report, config, names, workers, pause_s)
    finally:
        client_log.removeHandler(handler)
        client_log.setLevel(previous_level)
    return report


async def _run_failover(
    cluster: Any,
    report: FailoverReport,
    config: ClientConfig,
    names: Sequence[str],
    workers: int,
    pause_s: float,
) -> None:
    stop = asyncio.Event()
    timeline: list[float] = []
    async with Client(cluster.client_urls, config=config) as client:
        for name in names:
            await client.put(name, b"0")
        start = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for index in range(workers):
                group.create_task(
                    _increment_loop(client, names[index % len(names)], report, stop, timeline),
                    name=f"increment-{index}",
                )
            try:
                report.failover_s = await asyncio.to_thread(
                    _kill_and_restart, cluster, report.kills, pause_s, report.fault
                )
            finally:
                stop.set()
        end = time.monotonic()
        for name in names:
            report.counters[name] = int((await client.get(name)).value)
            report.expected.setdefault(name, 0)
        stats = client.stats
    points = [start, *sorted(timeline), end]
    report.longest_gap_s = max(later - earlier for earlier, later in itertools.pairwise(points))
    report.retries = stats.retries
    report.leader_changes = stats.leader_changes
    report.retries_per_failover = stats.retries / report.kills if report.kills else 0.0


def _format_overhead(result: dict[str, Any]) -> str:
    return (
        f"GET x{result['iterations']} ({result['consistency']}) against {result['endpoint']} "
        "(medians, same run):\n"
        f"  bare aiohttp   {result['bare_aiohttp']['median_us']:8.1f} us "
        f"(p99 {result['bare_aiohttp']['p99_us']:.1f})\n"
        f"  kvstore.Client {result['client']['median_us']:8.1f} us "
        f"(p99 {result['client']['p99_us']:.1f})\n"
        f"  overhead       {result['overhead_median_us']:8.1f} us per call "
        f"(x{result['ratio_median']}; median of paired differences "
        f"{result['overhead_paired_median_us']:.1f} us)"
    )


def _format_failover(report: FailoverReport) -> str:
    verdict = "OK" if report.consistent else "MISMATCH"
    return (
        f"failover: {report.kills} x SIG{report.fault.upper()} of the leader, "
        f"{report.successes} increments ok, "
        f"{report.unknown_outcomes} unknown, {report.conflicts} cas conflicts, "
        f"{len(report.other_errors)} other errors\n"
        f"  counters {report.counters} expected {report.expected}: {verdict}\n"
        f"  longest call {report.longest_call_s * 1000:.0f} ms (deadline {report.deadline_s:.1f} s), "
        f"longest gap between increments {report.longest_gap_s * 1000:.0f} ms\n"
        f"  retries {report.retries} = {report.retries_per_failover:.1f} per failover "
        f"{dict(sorted(report.retry_reasons.items()))}; "
        f"new leader elected in {', '.join(f'{s * 1000:.0f}' for s in report.failover_s)} ms"
    )


async def _overheads(endpoints: Sequence[str], iterations: int, results: dict[str, Any]) -> None:
    for consistency, name in (("linearizable", "overhead"), ("stale", "overhead_stale")):
        results[name] = await measure_overhead(
            endpoints, iterations=iterations, consistency=consistency
        )
        print(_format_overhead(results[name]))


async def _main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.endpoints:
        await _overheads(args.endpoints.split(","), args.iterations, results)
        return results
    from kvstore.server.localcluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="kvstore-bench-") as directory:
        cluster = LocalCluster(args.base_dir or Path(directory), size=3)
        try:
            cluster.start()
            cluster.wait_for_leader(timeout_s=30.0)
            await _overheads(cluster.client_urls, args.iterations, results)
            if args.kills:
                report = await measure_failover(cluster, kills=args.kills, fault=args.fault)
                results["failover"] = {**asdict(report), "consistent": report.consistent}
                print(_format_failover(report))
        finally:
            cluster.stop()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", help="measure overhead against this running cluster")
    parser.add_argument("--iterations", type=int, default=2000, help="gets each way")
    parser.add_argument("--kills", type=int, default=0, help="leader kills for the failover run")
    parser.add_argument(
        "--fault", choices=("kill", "term"), default="kill", help="SIGKILL or SIGTERM the leader"
    )
    parser.add_argument("--quick", action="store_true", help="200 gets, 1 kill (for tests)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--base-dir", type=Path, help="keep the cluster's data and logs here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 200)
        args.kills = min(args.kills, 1) if args.endpoints is None else 0
    results = asyncio.run(_main_async(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    failover = results.get("failover")
    return 0 if failover is None or failover["consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
