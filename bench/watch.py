"""Watch latency and events/s, and 4-key compare-and-swap transactions/s, on a local cluster.

Starts a three-node LocalCluster (real `kvstore serve` processes, fsyncing) and, with
`--compare etcd`, a three-node etcd 3.4 in the same run after it, and runs the same load on
both over HTTP (kvstore's API; etcd's JSON gateway: POST /v3/watch, /v3/kv/put, /v3/kv/txn):

- **watch latency**, for each W in `--watchers` (default 1 and 1000): W watch streams on one
  prefix, spread round-robin over the three nodes (etcd: members), all opened and confirmed
  before the first write. One writer then puts `--events` keys under the prefix to the
  leader, one at a time, `--interval-ms` apart. A sample is the time from the put's
  acknowledgement (its HTTP answer) to the event's arrival at one watcher, for every
  (event, watcher) pair: p50 and p99 (an event can arrive before the acknowledgement: the
  sample is then negative, and counted as it is); also from the put's send, which is
  never negative (the ratios use that one). Then a burst: `--burst` puts from 16
  writers at once; **events/s** = events delivered to all watchers / time from the first put
  to the last delivery.
- **4-key CAS txn/s**: `--txn-workers` workers, each owning 4 keys, each in a loop sending
  one transaction "if all 4 mod_revisions are what I last wrote, put all 4" to the leader
  for `--duration` seconds; transactions/s that succeeded, p50 and p99 latency, and the
  failures (0 expected: nobody else writes those keys).

All watchers live in this one process, so at 1000 watchers its own JSON parsing costs part
of the latency, equally for both systems (the machine's cores are shared with the nodes).
`--json PATH` writes the figures with the run's commit, machine and command
(bench/runinfo.py); the clusters' data and logs are removed at the end unless `--keep`.

    python bench/watch.py                         # W = 1, 1000; 200 events; 10 s of txns
    python bench/watch.py --compare etcd --json bench/results/watch.json
    python bench/watch.py --quick                 # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from etcdcluster import EtcdCluster, etcd_binary, prefix_end
from runinfo import RunInfo, ScratchDir, output_path
from stats import percentile

from kvstore.server.localcluster import LocalCluster

_OPEN_TIMEOUT_S = 60.0
_DELIVERY_TIMEOUT_S = 60.0


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


@dataclass(slots=True)
class System:
    """How to talk to one system: its name, leader URL and every member's URL."""

    name: str
    leader: str
    urls: tuple[str, ...]
    session: aiohttp.ClientSession
    client_id: str = ""
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # --- writes -------------------------------------------------------------------------

    async def put(self, key: str, value: str) -> int:
        if self.name == "kvstore":
            headers = {"Kvstore-Request-Id": f"{self.client_id}:{next(self.seq)}"}
            url = f"{self.leader}/v1/kv/{key}"
            async with self.session.put(url, data=value.encode(), headers=headers) as answer:
                body = await answer.json(content_type=None)
                if answer.status != 200:
                    raise RuntimeError(f"put {key}: {answer.status} {body}")
                return int(body["revision"])
        body = await self._etcd("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(body["header"]["revision"])

    async def cas4(self, keys: list[str], revisions: list[int], value: str) -> int | None:
        """If all 4 keys are at `revisions`, put `value` in each; the new revision, or None
        when the comparison failed."""
        if self.name == "kvstore":
            txn = {
                "compare": [
                    {"key": k, "target": "mod_revision", "op": "=", "value": r}
                    for k, r in zip(keys, revisions)
                ],
                "success": [{"op": "put", "key": k, "value_text": value} for k in keys],
            }
            headers = {"Kvstore-Request-Id": f"{self.client_id}:{next(self.seq)}"}
            async with self.session.post(f"{self.leader}/v1/txn", json=txn,
                                         headers=headers) as answer:  # fmt: skip
                body = await answer.json(content_type=None)
                if answer.status != 200:
                    raise RuntimeError(f"txn: {answer.status} {body}")
            return int(body["revision"]) if body["succeeded"] else None
        etcd_txn = {
            "compare": [
                {"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": str(r)}
                for k, r in zip(keys, revisions)
            ],
            "success": [{"request_put": {"key": _b64(k), "value": _b64(value)}} for k in keys],
        }
        body = await self._etcd("/v3/kv/txn", etcd_txn)
        return int(body["header"]["revision"]) if body.get("succeeded") else None

    async def _etcd(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(self.leader + path, json=body) as answer:
            document: dict[str, Any] = await answer.json(content_type=None)
            if answer.status != 200 or "error" in document:
                raise RuntimeError(f"etcd {path}: {answer.status} {document}")
            return document

    # --- watches ------------------------------------------------------------------------

    async def open_watch(self, url: str, prefix: str) -> aiohttp.ClientResponse:
        """A watch stream on `prefix` from now, confirmed (its first line read)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        if self.name == "kvstore":
            response = await self.session.get(
                f"{url}/v1/watch", params={"prefix": prefix, "progress_ms": "600000"},
                timeout=timeout,
            )  # fmt: skip
        else:
            create = {
                "create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
            }
            response = await self.session.post(f"{url}/v3/watch", json=create, timeout=timeout)
        if response.status != 200:
            raise RuntimeError(f"watch on {url}: {response.status} {await response.text()}")
        await response.content.readline()  # created
        return response

    def event_keys(self, line: bytes) -> list[str]:
        document = json.loads(line)
        if self.name == "kvstore":
            return [event["key"] for event in document.get("events", ())]
        events = document.get("result", {}).get("events", ())
        return [base64.b64decode(event["kv"]["key"]).decode() for event in events]


class Delivery:
    """Arrival times of every event at every watcher: key -> [times]."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = {}
        self.count = 0
        self.changed = asyncio.Event()

    def record(self, keys: list[str]) -> None:
        now = time.perf_counter()
        for key in keys:
            self.arrivals.setdefault(key, []).append(now)
        self.count += len(keys)
        self.changed.set()

    async def wait_for(self, total: int, timeout_s: float) -> bool:
        deadline = time.perf_counter() + timeout_s
        while self.count < total:
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return False
        return True


async def _reader(system: System, response: aiohttp.ClientResponse, delivery: Delivery) -> None:
    async for line in response.content:
        keys = system.event_keys(line)
        if keys:
            delivery.record(keys)


async def watch_level(system: System, watchers: int, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"w{watchers}-{secrets.token_hex(3)}/"
    delivery = Delivery()
    streams = await _open_all(system, watchers, prefix)
    readers = [asyncio.ensure_future(_reader(system, s, delivery)) for s in streams]
    try:
        acks: dict[str, float] = {}
        sends: dict[str, float] = {}
        for i in range(args.events):
            key = f"{prefix}{i:06d}"
            sends[key] = time.perf_counter()
            await system.put(key, "v")
            acks[key] = time.perf_counter()
            await asyncio.sleep(args.interval_ms / 1000)
        complete = await delivery.wait_for(args.events * watchers, _DELIVERY_TIMEOUT_S)
        samples = [
            (arrival - acks[key]) * 1000
            for key, times in delivery.arrivals.items()
            if key in acks
            for arrival in times
        ]
        from_send = [
            (arrival - sends[key]) * 1000
            for key, times in delivery.arrivals.items()
            if key in sends
            for arrival in times
        ]
        events_per_s, burst_complete = await _burst(system, prefix, watchers, delivery, args)
    finally:
        for reader in readers:
            reader.cancel()
        for stream in streams:
            stream.close()
        await asyncio.gather(*readers, return_exceptions=True)
    result = {
        "system": system.name,
        "watchers": watchers,
        "events": args.events,
        "samples": len(samples),
        "complete": complete and burst_complete,
        "p50_ms": percentile(samples, 0.5) if samples else None,
        "p99_ms": percentile(samples, 0.99) if samples else None,
        "from_send_p50_ms": percentile(from_send, 0.5) if from_send else None,
        "from_send_p99_ms": percentile(from_send, 0.99) if from_send else None,
        "events_per_s": events_per_s,
    }
    print(
        f"{system.name:<8} watchers={watchers:<5} after ack p50 {_ms(result['p50_ms'])} "
        f"p99 {_ms(result['p99_ms'])}; after send p50 {_ms(result['from_send_p50_ms'])} "
        f"p99 {_ms(result['from_send_p99_ms'])}; delivered {events_per_s:,.0f} events/s"
        + ("" if result["complete"] else "  (INCOMPLETE: events missing at the deadline)"),
        flush=True,
    )
    return result


async def _open_all(system: System, watchers: int, prefix: str) -> list[aiohttp.ClientResponse]:
    semaphore = asyncio.Semaphore(64)

    async def one(index: int) -> aiohttp.ClientResponse:
        async with semaphore:
            return await system.open_watch(system.urls[index % len(system.urls)], prefix)

    async with asyncio.timeout(_OPEN_TIMEOUT_S):
        return list(await asyncio.gather(*(one(i) for i in range(watchers))))


async def _burst(
    system: System, prefix: str, watchers: int, delivery: Delivery, args: argparse.Namespace
) -> tuple[float, bool]:
    """`args.burst` puts from 16 writers at once; events delivered per second."""
    before = delivery.count
    keys = iter(range(args.burst))
    started = time.perf_counter()

    async def writer() -> None:
        for i in keys:
            await system.put(f"{prefix}burst{i:06d}", "b")

    await asyncio.gather(*(writer() for _ in range(16)))
    complete = await delivery.wait_for(before + args.burst * watchers, _DELIVERY_TIMEOUT_S)
    last = max((max(times) for key, times in delivery.arrivals.items() if "burst" in key),
               default=started)  # fmt: skip
    delivered = delivery.count - before
    return delivered / max(1e-9, last - started), complete


async def txn_level(system: System, args: argparse.Namespace) -> dict[str, Any]:
    base = f"t-{secrets.token_hex(3)}"
    latencies: list[float] = []
    failures = 0

    async def setup(number: int) -> tuple[list[str], list[int]]:
        keys = [f"{base}/{number}/{k}" for k in range(4)]
        return keys, [await system.put(key, "0") for key in keys]

    async def worker(keys: list[str], revisions: list[int]) -> None:
        nonlocal failures
        value = 0
        while time.perf_counter() < stop_at:
            value += 1
            began = time.perf_counter()
            revision = await system.cas4(keys, revisions, str(value))
            latencies.append((time.perf_counter() - began) * 1000)
            if revision is None:
                failures += 1
            else:
                revisions = [revision] * 4

    # Every worker has put its keys before the clock starts.
    states = await asyncio.gather(*(setup(n) for n in range(args.txn_workers)))
    started = time.perf_counter()
    stop_at = started + args.duration
    await asyncio.gather(*(worker(keys, revisions) for keys, revisions in states))
    elapsed = time.perf_counter() - started
    succeeded = len(latencies) - failures
    result = {
        "system": system.name,
        "workers": args.txn_workers,
        "duration_s": elapsed,
        "txn_per_s": succeeded / elapsed,
        "failures": failures,
        "p50_ms": percentile(latencies, 0.5) if latencies else None,
        "p99_ms": percentile(latencies, 0.99) if latencies else None,
    }
    print(
        f"{system.name:<8} 4-key CAS txn, {args.txn_workers} workers: "
        f"{result['txn_per_s']:,.0f} txn/s  p50 {_ms(result['p50_ms'])} "
        f"p99 {_ms(result['p99_ms'])}  failed comparisons {failures}",
        flush=True,
    )
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:7.2f} ms"


async def _bench(system: System, args: argparse.Namespace) -> dict[str, Any]:
    watch = [await watch_level(system, watchers, args) for watchers in args.watchers]
    txn = await txn_level(system, args)
    return {"watch": watch, "txn": txn}


async def _with_session(
    name: str, leader: str, urls: tuple[str, ...], args: argparse.Namespace
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        system = System(name, leader, urls, session, client_id=f"bench{secrets.token_hex(4)}")
        return await _bench(system, args)


def _run_loop(coroutine: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    return uvloop.run(coroutine)  # type: ignore[arg-type]


def _run_kvstore(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    with LocalCluster(base / "kvstore", 3) as cluster:
        leader = cluster.wait_for_leader(timeout_s=30)
        urls = tuple(cluster.client_url(n) for n in cluster.ids)
        print(f"kvstore cluster under {base}; leader node {leader}", flush=True)
        return _run_loop(_with_session("kvstore", cluster.client_url(leader), urls, args))


def _run_etcd(
    base: Path, args: argparse.Namespace, leader_of: Callable[..., Any]
) -> dict[str, Any]:
    etcd = EtcdCluster(base / "etcd")
    try:
        etcd.start()
        leader_url, _ = _run_loop(leader_of(etcd))  # type: ignore[arg-type]
        print(f"etcd cluster under {base}; leader at {leader_url}", flush=True)
        return _run_loop(_with_session("etcd", leader_url, tuple(etcd.client_urls), args))
    finally:
        etcd.stop()


def _ratios(results: dict[str, dict[str, Any]]) -> None:
    mine, theirs = results.get("kvstore"), results.get("etcd")
    if not mine or not theirs:
        return
    print("\nkvstore / etcd (same run; latency ratios from the put's send, always > 0):")
    for ours, other in zip(mine["watch"], theirs["watch"]):
        if ours["from_send_p50_ms"] and other["from_send_p50_ms"]:
            print(
                f"  watchers={ours['watchers']:<5} latency p50 "
                f"{ours['from_send_p50_ms'] / other['from_send_p50_ms']:5.2f}x"
                f"  p99 {ours['from_send_p99_ms'] / other['from_send_p99_ms']:5.2f}x"
                f"  events/s {ours['events_per_s'] / other['events_per_s']:5.2f}x"
            )
    txn_ours, txn_other = mine["txn"], theirs["txn"]
    if txn_other["txn_per_s"]:
        print(f"  4-key CAS txn/s {txn_ours['txn_per_s'] / txn_other['txn_per_s']:5.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--watchers", default="1,1000", help="comma-separated W values")
    parser.add_argument("--events", type=int, default=200, help="paced puts per W")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="between paced puts")
    parser.add_argument("--burst", type=int, default=500, help="puts of the events/s burst")
    parser.add_argument("--txn-workers", type=int, default=16, help="concurrent txn workers")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of transactions")
    parser.add_argument("--quick", action="store_true", help="W=1,10, few events, 1 s of txns")
    parser.add_argument("--compare", choices=["etcd"], help="also run three-node etcd")
    parser.add_argument("--json", dest="json_path", help="write the results as JSON here")
    parser.add_argument("--base-dir", help="directory for the clusters' data and logs")
    parser.add_argument("--keep", action="store_true", help="keep the clusters' data and logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.watchers, args.events, args.burst, args.duration = "1,10", 20, 50, 1.0
        args.txn_workers = 4
    args.watchers = [int(w) for w in str(args.watchers).split(",") if w]
    if args.compare == "etcd" and etcd_binary() is None:
        parser.error("--compare etcd needs an etcd binary on PATH (apt-get install etcd-server)")
    run = RunInfo(argv)
    print(f"watch and txn benchmark: {run.describe()}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        with ScratchDir(args.base_dir, keep=args.keep, prefix="kvwatch-") as base:
            results["kvstore"] = _run_kvstore(base, args)
            if args.compare == "etcd":
                from throughput import _etcd_leader_url

                results["etcd"] = _run_etcd(base, args, _etcd_leader_url)
    except KeyboardInterrupt:
        print("interrupted: the clusters were stopped", file=sys.stderr)
        return 130
    _ratios(results)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json_path:
        document = {
            "benchmark": "watch",
            "run": run.finish(),
            "settings": {
                "watchers": args.watchers,
                "events": args.events,
                "interval_ms": args.interval_ms,
                "burst": args.burst,
                "txn_workers": args.txn_workers,
                "duration_s": args.duration,
                "compare": args.compare,
            },
            "results": results,
        }
        path = output_path(args.json_path, "watch.json")
        path.write_text(json.dumps(document, indent=2))
        print(f"json: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
