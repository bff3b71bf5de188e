"""Write throughput and latency of a local three-node cluster, driven over HTTP.

Starts a LocalCluster (real `kvstore serve` processes, every node fsyncing), finds the leader,
and for each concurrency N runs N asyncio workers that PUT 100-byte values under 16-byte keys
straight to the leader (aiohttp, one keep-alive connection per worker, a request id on every
write as the client library sends). Prints acknowledged writes/s, p50/p99 latency and whether
the leader changed, per N; `--json PATH` writes the same figures.

    python bench/throughput.py                       # N = 1, 16, 64, 256; 10 s each
    python bench/throughput.py --quick               # a few seconds; what the test runs
    python bench/throughput.py --endpoint http://127.0.0.1:7001   # an already running cluster
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvstore.server.localcluster import LocalCluster

KEY_BYTES = 16
VALUE_BYTES = 100


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


async def _status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/v1/status") as response:
        document: dict[str, Any] = await response.json()
        return document


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    concurrency: int,
    worker: int,
    stop_at: float,
    record_from: float,
    latencies: list[float],
    errors: dict[str, int],
) -> None:
    value = b"v" * VALUE_BYTES
    client_id = f"bench-{os.getpid()}-{concurrency}-{worker}"
    seq = 0
    while True:
        now = time.perf_counter()
        if now >= stop_at:
            return
        seq += 1
        key = f"{worker:05d}-{seq:010d}"[:KEY_BYTES].ljust(KEY_BYTES, "k")
        headers = {"Kvstore-Request-Id": f"{client_id}:{seq}", "Kvstore-Acked-Below": str(seq)}
        started = time.perf_counter()
        try:
            async with session.put(f"{url}/v1/kv/{key}", data=value, headers=headers) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        finished = time.perf_counter()
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
            errors.setdefault(f"first_{status}", body[:200].decode("utf-8", "replace"))
        elif started >= record_from:
            latencies.append(finished - started)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux); 0.0 when unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(
    url: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    pids: dict[int, int] | None = None,
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        before = await _status(session, url)
        record_from = time.perf_counter() + warmup_s
        stop_at = record_from + duration_s
        pids = pids or {}
        cpu_before = {node: _cpu_seconds(pid) for node, pid in pids.items()}
        client_before = time.process_time()
        latencies: list[float] = []
        errors: dict[str, int] = {}
        await asyncio.gather(
            *(
                _worker(session, url, concurrency, w, stop_at, record_from, latencies, errors)
                for w in range(concurrency)
            )
        )
        cpu_after = {node: _cpu_seconds(pid) for node, pid in pids.items()}
        client_cpu_s = time.process_time() - client_before
        after = await _status(session, url)
    latencies.sort()
    all_writes = max(1, len(latencies))
    cpu = {node: cpu_after[node] - cpu_before[node] for node in pids}
    leader_id = after["leader_id"]
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "writes": len(latencies),
        "writes_per_s": len(latencies) / duration_s,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
        "errors": errors,
        "leader_changed": before["leader_id"] != after["leader_id"]
        or before["term"] != after["term"],
        "term": after["term"],
        # CPU per acknowledged write (whole level incl. warmup): contention-independent cost.
        "leader_cpu_ms_per_write": cpu.get(leader_id, 0.0) * 1000 / all_writes if cpu else None,
        "cluster_cpu_ms_per_write": sum(cpu.values()) * 1000 / all_writes if cpu else None,
        "client_cpu_ms_per_write": client_cpu_s * 1000 / all_writes,
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"N={result['concurrency']:<4} {result['writes_per_s']:>9,.0f} writes/s  "
        f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
        f"leader changed: {'YES' if result['leader_changed'] else 'no'}"
        + (
            f"  cpu/write leader {result['leader_cpu_ms_per_write']:.2f} ms"
            f" cluster {result['cluster_cpu_ms_per_write']:.2f} ms"
            f" client {result['client_cpu_ms_per_write']:.2f} ms"
            if result.get("leader_cpu_ms_per_write") is not None
            else ""
        )
        + (f"  errors {result['errors']}" if result["errors"] else ""),
        flush=True,
    )


async def _bench(
    url: str, levels: list[int], duration_s: float, warmup_s: float, pids: dict[int, int]
) -> list[Any]:
    results = []
    for concurrency in levels:
        result = await run_level(url, concurrency, duration_s, warmup_s, pids)
        _print(result)
        results.append(result)
    return results


def raw_fsync_ms(directory: Path, count: int = 100) -> tuple[float, float]:
    """p50 and p99 of a plain 200-byte write + fdatasync in `directory`: the disk the nodes
    fsync on, measured in the same run (the figures mean little without it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fsync-probe"
    samples: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fdatasync(fd)
            samples.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    samples.sort()
    return _percentile(samples, 0.5) * 1000, _percentile(samples, 0.99) * 1000


def _run_with_cluster(args: argparse.Namespace, levels: list[int]) -> list[Any]:
    base = Path(args.base_dir) if args.base_dir else Path(tempfile.mkdtemp(prefix="kvbench-"))
    p50, p99 = raw_fsync_ms(base)
    args.raw_fsync_ms = {"p50": p50, "p99": p99}
    load = os.getloadavg()[0]
    print(
        f"raw fdatasync on this disk: p50 {p50:.2f} ms, p99 {p99:.2f} ms; load average {load:.1f}"
    )
    extra = args.node_args.split() if args.node_args else []
    with LocalCluster(base, 3, extra_args=extra) as cluster:
        leader = cluster.wait_for_leader(timeout_s=20)
        url = cluster.client_url(leader)
        print(f"cluster under {base}; leader is node {leader} at {url}", flush=True)
        pids = {node: pid for node in cluster.ids if (pid := cluster.pid(node)) is not None}
        return _run(url, levels, args, pids)


def _run(
    url: str, levels: list[int], args: argparse.Namespace, pids: dict[int, int] | None = None
) -> list[Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_bench(url, levels, args.duration, args.warmup, pids or {}))
    return uvloop.run(_bench(url, levels, args.duration, args.warmup, pids or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,16,64,256", help="comma-separated N values")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per N")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not measured per N")
    parser.add_argument("--quick", action="store_true", help="N=1,16 for 1 s each (smoke test)")
    parser.add_argument("--json", dest="json_path", help="write the results as JSON here")
    parser.add_argument("--endpoint", help="use this running node (the leader) instead")
    parser.add_argument("--base-dir", help="directory for the cluster's data and logs")
    parser.add_argument("--node-args", default="", help="extra flags for every node")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.duration, args.warmup = "1,16", 1.0, 0.3
    levels = [int(n) for n in args.concurrency.split(",")]
    started = time.time()
    if args.endpoint:
        results = _run(args.endpoint.rstrip("/"), levels, args)
    else:
        results = _run_with_cluster(args, levels)
    if args.json_path:
        document = {
            "benchmark": "throughput",
            "started_unix": started,
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "load_average_at_end": os.getloadavg()[0],
                "raw_fsync_ms": getattr(args, "raw_fsync_ms", None),
            },
            "key_bytes": KEY_BYTES,
            "value_bytes": VALUE_BYTES,
            "results": results,
        }
        Path(args.json_path).write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
