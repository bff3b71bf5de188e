"""Partition-heal benchmark: how soon after a partition heals every node serves reads again.

Starts a local three-node kvstore cluster (real `kvstore serve` processes on 127.0.0.1) whose
peer links all go through kvstore.chaos.proxy's ProxyMesh. The cuts STALL connections (no
RST, no FIN, nothing forwarded, and a stalled connection stays stalled after the heal), the
way a network that drops packets looks to TCP. For each partition kind and duration:

- `isolate-leader`  the leader is cut from both followers, both directions;
- `halves`          a seeded random split into one node and two (as the chaos nemesis does);
- `one-way`         the followers' links to the leader are cut; the leader still reaches them;
- `bridge`          the leader and one follower are cut from each other; the other follower
                    (the bridge) still reaches both;

it waits until every node serves a linearizable read, cuts, waits the duration, heals, and
then polls a linearizable read (GET /v1/kv/<key>?consistency=linearizable, each attempt
with a short timeout) on every node until it succeeds. It reports, in milliseconds after the
heal, when the node that leads afterwards first served a read (`leader_ms`) and when the
slowest node did (`slowest_ms`); issue 12 asks for 1 s and 2 s. Per case it also counts, from
the node logs, the dead connections the nodes noticed and redialled (`peer_silent`,
`peer_redial`), and how many times the term moved.

    python bench/partition_heal.py --durations 3,10,20,45 --json out.json
    python bench/partition_heal.py --durations 1 --kinds isolate-leader   # what the test runs

Every loop is bounded, and everything it starts (node processes by PID, proxies) is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvstore.chaos.proxy import ProxyMesh
from kvstore.server.localcluster import LocalCluster, free_port

KINDS = ("isolate-leader", "halves", "one-way", "bridge")
IDS = (1, 2, 3)
KEY = "bench-partition-heal"
_ATTEMPT_TIMEOUT_S = 1.0
_POLL_INTERVAL_S = 0.02
_ATTEMPTS_MAX = 60  # concurrent read attempts per node
_LOG_EVENTS = ("event=peer_silent", "event=peer_redial", "event=peer_connected")


@dataclass
class CaseResult:
    kind: str
    duration_s: float
    leader_before: int
    cut: str
    leader_after: int
    term_before: int
    term_after: int
    leader_ms: float | None
    slowest_ms: float | None
    node_ms: dict[int, float | None]
    log_events: dict[str, int]


class Bench:
    def __init__(self, base_dir: Path, seed: int, deadline_s: float) -> None:
        self.base_dir = base_dir
        self.rng = random.Random(seed)
        self.deadline_s = deadline_s
        self.mesh: ProxyMesh | None = None
        self.cluster: LocalCluster | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        peer_ports = [free_port() for _ in IDS]
        targets = {i: ("127.0.0.1", port) for i, port in zip(IDS, peer_ports)}
        self.mesh = ProxyMesh(targets, random.Random(0))
        await self.mesh.start()
        self.cluster = LocalCluster(
            self.base_dir,
            len(IDS),
            peer_ports=peer_ports,
            peer_addresses=self.mesh.dial_addresses(),
        )
        self.cluster.start()
        self.session = aiohttp.ClientSession(trust_env=False)
        leader = await asyncio.to_thread(self.cluster.wait_for_leader, 30.0)
        url = f"{self.cluster.client_url(leader)}/v1/kv/{KEY}"
        async with self.session.put(url, data=b"v", timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status >= 300:
                raise RuntimeError(f"the first write failed: {r.status} {await r.text()}")

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)
        if self.mesh is not None:
            await self.mesh.close()

    # --- probes ------------------------------------------------------------------------

    async def status(self, node: int) -> dict[str, Any] | None:
        assert self.cluster is not None and self.session is not None
        url = self.cluster.client_url(node) + "/v1/status"
        try:
            timeout = aiohttp.ClientTimeout(total=0.25)
            async with self.session.get(url, timeout=timeout) as response:
                document: dict[str, Any] = await response.json()
                return document
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def read_once(self, node: int) -> bool:
        assert self.cluster is not None and self.session is not None
        url = f"{self.cluster.client_url(node)}/v1/kv/{KEY}?consistency=linearizable"
        try:
            timeout = aiohttp.ClientTimeout(total=_ATTEMPT_TIMEOUT_S)
            async with self.session.get(url, timeout=timeout, allow_redirects=False) as response:
                await response.read()
                return response.status in (200, 404)
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def first_read_s(self, node: int, started: float) -> float | None:
        """Seconds from `started` to the first linearizable read `node` served (bounded).
        A new attempt starts every _POLL_INTERVAL_S while earlier ones are still waiting, so
        an attempt stuck on a dead connection does not delay the measurement by its timeout.
        """
        attempts: set[asyncio.Task[bool]] = set()
        try:
            while time.monotonic() - started < self.deadline_s:
                if len(attempts) < _ATTEMPTS_MAX:
                    attempts.add(asyncio.ensure_future(self.read_once(node)))
                done, attempts = await asyncio.wait(attempts, timeout=_POLL_INTERVAL_S)
                if any(task.result() for task in done):
                    return time.monotonic() - started
            return None
        finally:
            for task in attempts:
                task.cancel()
            await asyncio.gather(*attempts, return_exceptions=True)

    async def leader(self) -> tuple[int, int]:
        """(leader id, term) that a majority agrees on, waiting for one (bounded)."""
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            views = [await self.status(node) for node in IDS]
            leaders = [v for v in views if v is not None and v.get("role") == "leader"]
            if len(leaders) == 1:
                return int(leaders[0]["id"]), int(leaders[0]["term"])
            await asyncio.sleep(0.05)
        raise RuntimeError("no single leader")

    async def all_serving(self) -> None:
        started = time.monotonic()
        times = await asyncio.gather(*(self.first_read_s(node, started) for node in IDS))
        if any(t is None for t in times):
            raise RuntimeError(f"not every node serves reads before the cut: {times}")

    # --- one case ----------------------------------------------------------------------

    def cut(self, kind: str, leader: int) -> str:
        assert self.mesh is not None
        followers = [n for n in IDS if n != leader]
        self.rng.shuffle(followers)
        if kind == "isolate-leader":
            self.mesh.isolate(leader)
            return f"{leader} | {followers}"
        if kind == "halves":
            nodes = list(IDS)
            self.rng.shuffle(nodes)
            self.mesh.partition({nodes[0]}, set(nodes[1:]))
            return f"{nodes[0]} | {sorted(nodes[1:])}"
        if kind == "one-way":
            self.mesh.partition(set(followers), {leader}, one_way=True)
            return f"{sorted(followers)} -/-> {leader}"
        if kind == "bridge":
            bridge, other = followers
            self.mesh.bridge({leader}, {other})
            return f"{leader} | {other} (bridge {bridge})"
        raise ValueError(f"unknown kind {kind!r}")

    def log_counts(self) -> dict[str, int]:
        assert self.cluster is not None
        counts = dict.fromkeys(_LOG_EVENTS, 0)
        for node in IDS:
            path = self.cluster.log_path(node)
            if path.exists():
                text = path.read_text(errors="replace")
                for event in _LOG_EVENTS:
                    counts[event] += text.count(event)
        return counts

    async def run_case(self, kind: str, duration_s: float) -> CaseResult:
        assert self.mesh is not None
        await self.all_serving()
        leader_before, term_before = await self.leader()
        logs_before = self.log_counts()
        cut = self.cut(kind, leader_before)
        await asyncio.sleep(duration_s)
        self.mesh.heal()
        healed = time.monotonic()
        times = await asyncio.gather(*(self.first_read_s(node, healed) for node in IDS))
        leader_after, term_after = await self.leader()
        node_ms = {n: None if t is None else round(t * 1000, 1) for n, t in zip(IDS, times)}
        served = [ms for ms in node_ms.values() if ms is not None]
        logs_after = self.log_counts()
        return CaseResult(
            kind=kind,
            duration_s=duration_s,
            leader_before=leader_before,
            cut=cut,
            leader_after=leader_after,
            term_before=term_before,
            term_after=term_after,
            leader_ms=node_ms[leader_after],
            slowest_ms=max(served) if len(served) == len(IDS) else None,
            node_ms=node_ms,
            log_events={
                event.removeprefix("event="): logs_after[event] - logs_before[event]
                for event in _LOG_EVENTS
            },
        )


def _table(results: list[CaseResult]) -> str:
    lines = [
        f"{'kind':<15}{'dur s':>6}{'leader ms':>11}{'slowest ms':>12}{'terms':>7}"
        f"{'leader':>8}{'silent':>8}{'redial':>8}  cut",
    ]
    for r in results:
        def cell(value: float | None) -> str:
            return "timeout" if value is None else f"{value:.0f}"

        lines.append(
            f"{r.kind:<15}{r.duration_s:>6g}{cell(r.leader_ms):>11}{cell(r.slowest_ms):>12}"
            f"{r.term_after - r.term_before:>7}{f'{r.leader_before}->{r.leader_after}':>8}"
            f"{r.log_events['peer_silent']:>8}{r.log_events['peer_redial']:>8}  {r.cut}"
        )
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    durations = [float(d) for d in args.durations.split(",") if d]
    if not durations or min(durations) <= 0:
        raise SystemExit("durations must be positive seconds")
    base = Path(args.base_dir or tempfile.mkdtemp(prefix="partition-heal-"))
    bench = Bench(base, args.seed, args.deadline_s)
    results: list[CaseResult] = []
    try:
        await bench.start()
        for duration in durations:
            for kind in kinds:
                result = await bench.run_case(kind, duration)
                results.append(result)
                print(_table([result]).splitlines()[-1], flush=True)
    finally:
        await bench.stop()
    print()
    print("Time from the heal to the first linearizable read (ms)")
    print(_table(results))
    if args.json:
        document = {
            "benchmark": "partition_heal",
            "machine": {"python": platform.python_version(), "cpus": _cpus()},
            "arguments": vars(args),
            "results": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(document, indent=2))
    failed = [r for r in results if r.slowest_ms is None]
    return 1 if failed else 0


def _cpus() -> int | None:
    import os

    return os.cpu_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"of {', '.join(KINDS)}")
    parser.add_argument("--durations", default="3,10,20,45", help="partition lengths, seconds")
    parser.add_argument("--seed", type=int, default=1, help="seeds the halves split")
    parser.add_argument(
        "--deadline-s", type=float, default=30.0, help="give up on a node after this long"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--base-dir", default=None, help="data and logs (default: a temp dir)")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
