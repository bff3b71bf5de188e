"""Throughput and latency of a local three-node cluster, driven over HTTP.

Starts a LocalCluster (real `kvstore serve` processes, every node fsyncing), finds the leader,
and for each concurrency N runs N asyncio workers that PUT 100-byte values under 16-byte keys
straight to the leader (aiohttp, one keep-alive connection per worker, a request id on every
write as the client library sends). Prints acknowledged writes/s, p50/p99 latency and whether
the leader changed, per N; `--json PATH` writes the same figures with the run's commit,
machine and command line (bench/runinfo.py). The clusters' data and logs live in a temporary
directory (or `--base-dir`) that is removed when the run ends, however it ends, unless `--keep`.

Workloads (`--workloads`, comma-separated; each runs at every N):
- `write`   every operation is a PUT to the leader (the default);
- `read90`  90% linearizable GETs (ReadIndex on the leader), 10% PUTs, on 1000 preloaded keys;
- `stale90` the same mix, but the GETs are stale reads spread over all three nodes
            (`consistency=stale`; etcd: serializable range requests);
and `--value-sizes 100,1000,...` sweeps the PUT value size at `--sweep-concurrency` writers.

Client paths (`--client-paths`, comma-separated; kvstore runs every level once per path):
- `http`    bare aiohttp, one keep-alive connection per worker (the default);
- `binary`  the client library (`kvstore.Client`, default ClientConfig) shared by all
            workers: key operations over its binary stream, one WebSocket per node with every
            worker's requests in flight on it (kvstore/client/stream.py);
- `client-http` the same Client with `binary_stream=False`: the library over HTTP.

`--compare etcd` runs the same levels, workloads and sweep against a three-node etcd 3.4 on
loopback (defaults, fsyncing; its JSON gateway: POST /v3/kv/put, /v3/kv/range) in the same
run, after kvstore, and prints the ratios (etcd over its gateway against every kvstore path).
CPU per operation is reported per node role: the leader, the two followers together, and
the benchmark's own process (the client). `--tls` runs the same plan on a second kvstore
cluster with TLS on both ports (mutual TLS between peers, https for the workers) after the
plain one, and prints TLS / plain ratios.

    python bench/throughput.py                       # N = 1, 16, 64, 256; 10 s each
    python bench/throughput.py --quick               # a few seconds; what the test runs
    python bench/throughput.py --workloads write,read90,stale90 --value-sizes 100,10000,100000 \
        --compare etcd
    python bench/throughput.py --tls                 # and on a TLS cluster: the cost of TLS
    python bench/throughput.py --concurrency 256 --duration 5 --soak 600   # the soak, below

`--soak SECONDS`: after each level, the same workload and N again for SECONDS on the same
cluster, and a summary line: its rate as a fraction of the level's (the short run's rate
measured in the same session), the leader changes during it (term increase), its p99 and
its longest operation. Leader changes without a fault, pauses and slow drift show up here
and not in a 5-second level.
    python bench/throughput.py --endpoint http://127.0.0.1:7001   # an already running cluster
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from etcdcluster import EtcdCluster, etcd_binary, etcd_status
from runinfo import RunInfo, ScratchDir, output_path
from stats import percentile

from kvstore.client import Client, ClientConfig
from kvstore.errors import KVStoreError
from kvstore.request_id import RequestId
from kvstore.server.localcluster import LocalCluster

KEY_BYTES = 16
VALUE_BYTES = 100
READ_KEYS = 1000
WORKLOADS = {"write": (0.0, False), "read90": (0.9, False), "stale90": (0.9, True)}
CLIENT_PATHS = ("http", "binary", "client-http")


@dataclass(frozen=True, slots=True)
class Workload:
    """What each worker does: `read_fraction` of its operations are GETs (stale or not)."""

    name: str
    read_fraction: float = 0.0
    stale: bool = False
    value_bytes: int = VALUE_BYTES


@dataclass(frozen=True, slots=True)
class Target:
    """Where the operations go: kvstore (`urls[0]` is the leader) or etcd (any member);
    `tls`: the context of https:// URLs (kvstore-tls: the cluster's development CA)."""

    system: str
    urls: tuple[str, ...]
    tls: ssl.SSLContext | None = None
    # How kvstore is driven (CLIENT_PATHS); etcd always over its JSON gateway ("http").
    client_path: str = "http"
    # The CA of a TLS cluster, for the client library's paths.
    ca_file: str = ""

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, ssl=self.tls if self.tls else True)
        return aiohttp.ClientSession(connector=connector, trust_env=False, **kwargs)

    def read_url(self, worker: int, stale: bool) -> str:
        # Stale reads are spread over every node; linearizable ones go to the leader.
        return self.urls[worker % len(self.urls)] if stale else self.urls[0]


async def _put(
    session: aiohttp.ClientSession, target: Target, key: str, value: bytes, request_id: str
) -> tuple[int, bytes]:
    url = target.urls[0]
    if target.system == "etcd":
        body = {"key": _b64(key.encode()), "value": _b64(value)}
        async with session.post(f"{url}/v3/kv/put", json=body) as response:
            return response.status, await response.read()
    seq = request_id.rsplit(":", 1)[1]
    headers = {"Kvstore-Request-Id": request_id, "Kvstore-Acked-Below": seq}
    async with session.put(f"{url}/v1/kv/{key}", data=value, headers=headers) as response:
        return response.status, await response.read()


async def _get(
    session: aiohttp.ClientSession, target: Target, url: str, key: str, stale: bool
) -> tuple[int, bytes]:
    if target.system == "etcd":
        body = {"key": _b64(key.encode()), "serializable": stale}
        async with session.post(f"{url}/v3/kv/range", json=body) as response:
            return response.status, await response.read()
    consistency = "stale" if stale else "linearizable"
    async with session.get(f"{url}/v1/kv/{key}?consistency={consistency}") as response:
        return response.status, await response.read()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _read_key(index: int) -> str:
    return f"read-{index:011d}"[:KEY_BYTES]


async def _leader_term(session: aiohttp.ClientSession, target: Target) -> tuple[int, int]:
    """(leader id, term) as the first node reports them (etcd: member id and raft term)."""
    url = target.urls[0]
    if target.system == "etcd":
        answer = await etcd_status(session, url, 5.0)
        if answer is None:
            raise RuntimeError(f"etcd at {url} does not answer")
        return answer[1].leader_id, answer[1].term
    async with session.get(url + "/v1/status") as response:
        document: dict[str, Any] = await response.json()
        return int(document["leader_id"]), int(document["term"])


async def _worker(
    session: aiohttp.ClientSession,
    target: Target,
    workload: Workload,
    level_id: str,
    worker: int,
    stop_at: float,
    record_from: float,
    latencies: dict[str, list[float]],
    errors: dict[str, int],
) -> None:
    value = b"v" * workload.value_bytes
    # Unique per level: a later level with the same shape must not reuse a session whose
    # seqs the cluster has already seen (it would refuse them as session_expired).
    client_id = f"bench-{os.getpid()}-{level_id}-{worker}"
    rng = random.Random(worker)
    read_url = target.read_url(worker, workload.stale)
    seq = 0
    while True:
        now = time.perf_counter()
        if now >= stop_at:
            return
        seq += 1
        kind = "read" if rng.random() < workload.read_fraction else "write"
        started = time.perf_counter()
        try:
            if kind == "read":
                key = _read_key(rng.randrange(READ_KEYS))
                status, body = await _get(session, target, read_url, key, workload.stale)
            else:
                key = f"{worker:05d}-{seq:010d}"[:KEY_BYTES].ljust(KEY_BYTES, "k")
                request = str(RequestId(client_id, seq))
                status, body = await _put(session, target, key, value, request)
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        finished = time.perf_counter()
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
            errors.setdefault(f"first_{status}", body[:200].decode("utf-8", "replace"))
        elif started >= record_from:
            latencies[kind].append(finished - started)


async def _client_worker(
    client: Client,
    workload: Workload,
    worker: int,
    stop_at: float,
    record_from: float,
    latencies: dict[str, list[float]],
    errors: dict[str, int],
) -> None:
    """One worker's loop through the client library (request ids, retries: its own)."""
    value = b"v" * workload.value_bytes
    consistency = "stale" if workload.stale else "linearizable"
    rng = random.Random(worker)
    seq = 0
    while time.perf_counter() < stop_at:
        seq += 1
        kind = "read" if rng.random() < workload.read_fraction else "write"
        started = time.perf_counter()
        try:
            if kind == "read":
                await client.get(_read_key(rng.randrange(READ_KEYS)), consistency=consistency)
            else:
                key = f"{worker:05d}-{seq:010d}"[:KEY_BYTES].ljust(KEY_BYTES, "k")
                await client.put(key, value)
        except KVStoreError as exc:
            errors[exc.code] = errors.get(exc.code, 0) + 1
            errors.setdefault(f"first_{exc.code}", str(exc)[:200])
            continue
        if started >= record_from:
            latencies[kind].append(time.perf_counter() - started)


async def _preload(session: aiohttp.ClientSession, target: Target) -> None:
    """The keys the read mixes read, written once (32 at a time)."""
    value = b"r" * VALUE_BYTES

    async def one(index: int) -> None:
        # One client id per key: seqs of one client must not complete out of order here,
        # since each write says every lower seq is acknowledged (Kvstore-Acked-Below).
        request_id = f"preload-{os.getpid()}-{index}:1"
        status, body = await _put(session, target, _read_key(index), value, request_id)
        if status != 200:
            raise RuntimeError(f"preload failed: {status} {body[:200]!r}")

    for first in range(0, READ_KEYS, 32):
        await asyncio.gather(*(one(i) for i in range(first, min(READ_KEYS, first + 32))))


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux); 0.0 when unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(
    target: Target,
    workload: Workload,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    pids: dict[int, int] | None = None,
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with target.session(timeout=timeout) as session:
        before = await _leader_term(session, target)
        record_from = time.perf_counter() + warmup_s
        stop_at = record_from + duration_s
        pids = pids or {}
        cpu_before = {node: _cpu_seconds(pid) for node, pid in pids.items()}
        client_before = time.process_time()
        latencies: dict[str, list[float]] = {"read": [], "write": []}
        level_id = f"{workload.name}-{workload.value_bytes}-{concurrency}-{time.time_ns():x}"
        errors: dict[str, int] = {}
        if target.client_path == "http":
            await asyncio.gather(
                *(
                    _worker(
                        session,
                        target,
                        workload,
                        level_id,
                        w,
                        stop_at,
                        record_from,
                        latencies,
                        errors,
                    )
                    for w in range(concurrency)
                )
            )
        else:
            # One client for all workers: its requests share its connections (the binary
            # stream pipelines them on one WebSocket per node).
            config = ClientConfig(
                binary_stream=target.client_path == "binary", ca_file=target.ca_file
            )
            async with Client(list(target.urls), config=config) as client:
                await asyncio.gather(
                    *(
                        _client_worker(client, workload, w, stop_at, record_from, latencies, errors)
                        for w in range(concurrency)
                    )
                )
        cpu_after = {node: _cpu_seconds(pid) for node, pid in pids.items()}
        client_cpu_s = time.process_time() - client_before
        after = await _leader_term(session, target)
    cpu = {node: cpu_after[node] - cpu_before[node] for node in pids}
    return {
        "system": target.system,
        "client_path": target.client_path,
        "workload": workload.name,
        "value_bytes": workload.value_bytes,
        "concurrency": concurrency,
        "duration_s": duration_s,
        **_latency_figures(latencies, duration_s),
        "errors": errors,
        "leader_changed": before != after,
        "term_before": before[1],
        "term": after[1],
        **_cpu_figures(cpu, after[0], client_cpu_s, latencies),
    }


def _latency_figures(latencies: dict[str, list[float]], duration_s: float) -> dict[str, Any]:
    """ops/s and p50/p99/max (ms) of all operations, and per kind (p50_ms etc. of all)."""
    everything = sorted(latencies["read"] + latencies["write"])
    figures: dict[str, Any] = {
        "ops": len(everything),
        "ops_per_s": len(everything) / duration_s,
        "p50_ms": percentile(everything, 0.50) * 1000,
        "p99_ms": percentile(everything, 0.99) * 1000,
        "max_ms": (everything[-1] * 1000) if everything else float("nan"),
    }
    for kind in ("write", "read"):
        values = sorted(latencies[kind])
        figures[f"{kind}s"] = len(values)
        figures[f"{kind}s_per_s"] = len(values) / duration_s
        figures[f"{kind}_p50_ms"] = percentile(values, 0.50) * 1000
        figures[f"{kind}_p99_ms"] = percentile(values, 0.99) * 1000
    return figures


def _cpu_figures(
    cpu: dict[int, float], leader_id: int, client_cpu_s: float, latencies: dict[str, list[float]]
) -> dict[str, Any]:
    """CPU per acknowledged operation (whole level incl. warmup): a contention-independent
    cost. Named per write for the write workload's history; per operation in the mixes."""
    operations = max(1, len(latencies["read"]) + len(latencies["write"]))
    return {
        "leader_cpu_ms_per_write": cpu.get(leader_id, 0.0) * 1000 / operations if cpu else None,
        "followers_cpu_ms_per_write": (
            (sum(cpu.values()) - cpu.get(leader_id, 0.0)) * 1000 / operations if cpu else None
        ),
        "cluster_cpu_ms_per_write": sum(cpu.values()) * 1000 / operations if cpu else None,
        "client_cpu_ms_per_write": client_cpu_s * 1000 / operations,
    }


def _print(result: dict[str, Any]) -> None:
    mix = result["workload"] != "write"
    rate = (
        f"{result['ops_per_s']:>9,.0f} ops/s ({result['reads_per_s']:,.0f} reads)"
        if mix
        else f"{result['writes_per_s']:>9,.0f} writes/s"
    )
    system = result["system"]
    if system.startswith("kvstore"):
        system = f"{system.replace('kvstore', 'kv')}/{result.get('client_path', 'http')}"
    print(
        f"{system:<15}{result['workload']:<8}{result['value_bytes']:>7} B "
        f"N={result['concurrency']:<4} {rate}  "
        f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
        f"leader changed: {'YES' if result['leader_changed'] else 'no'}"
        + (
            f"  cpu/op leader {result['leader_cpu_ms_per_write']:.2f} ms"
            f" followers {result['followers_cpu_ms_per_write']:.2f} ms"
            f" cluster {result['cluster_cpu_ms_per_write']:.2f} ms"
            f" client {result['client_cpu_ms_per_write']:.2f} ms"
            if result.get("leader_cpu_ms_per_write") is not None
            else ""
        )
        + (f"  errors {result['errors']}" if result["errors"] else ""),
        flush=True,
    )


def _plan(args: argparse.Namespace) -> list[tuple[Workload, int]]:
    """(workload, concurrency) pairs: every workload at every level, then the size sweep."""
    levels = [int(n) for n in args.concurrency.split(",")]
    plan = []
    for name in args.workloads:
        read_fraction, stale = WORKLOADS[name]
        plan += [(Workload(name, read_fraction, stale), n) for n in levels]
    for size in args.value_sizes:
        plan.append((Workload("write", value_bytes=size), args.sweep_concurrency))
    return plan


async def _bench(
    target: Target, args: argparse.Namespace, pids: dict[int, int]
) -> list[dict[str, Any]]:
    plan = _plan(args)
    if any(workload.read_fraction for workload, _ in plan):
        async with target.session() as session:
            await _preload(session, target)
    results = []
    for workload, concurrency in plan:
        result = await run_level(target, workload, concurrency, args.duration, args.warmup, pids)
        _print(result)
        results.append(result)
        if args.soak:
            soak = await run_level(target, workload, concurrency, args.soak, 0.0, pids)
            soak["soak_of_level"] = len(results) - 1
            soak["rate_of_level"] = (
                soak["ops_per_s"] / result["ops_per_s"] if result["ops_per_s"] else None
            )
            _print(soak)
            _print_soak(result, soak)
            results.append(soak)
    return results


def _print_soak(level: dict[str, Any], soak: dict[str, Any]) -> None:
    ratio = soak["rate_of_level"]
    print(
        f"soak of {soak['duration_s']:.0f} s: {soak['ops_per_s']:,.0f} ops/s = "
        + (f"{ratio:.0%}" if ratio is not None else "n/a")
        + f" of the {level['duration_s']:.0f}-s level's {level['ops_per_s']:,.0f}; "
        f"leader changes {soak['term'] - soak['term_before']} (term {soak['term_before']} -> "
        f"{soak['term']}); p99 {soak['p99_ms']:.0f} ms; longest {soak['max_ms']:.0f} ms; "
        f"errors {sum(n for n in soak['errors'].values() if isinstance(n, int))}",
        flush=True,
    )


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
    return percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000


def _run_with_cluster(args: argparse.Namespace) -> list[Any]:
    """kvstore's cluster (then etcd's, with --compare) in a scratch directory that is removed
    when the run ends, unless --keep (bench/runinfo.py)."""
    with ScratchDir(args.base_dir, keep=args.keep, prefix="kvbench-") as base:
        p50, p99 = raw_fsync_ms(base)
        args.raw_fsync_ms = {"p50": p50, "p99": p99}
        print(f"raw fdatasync on this disk: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        results = _run_kvstore(base / "plain", args, tls=False)
        if args.tls:
            results += _run_kvstore(base / "tls", args, tls=True)
        if args.compare == "etcd":
            results += _run_etcd(base / "etcd", args)
    return results


def _run_kvstore(base: Path, args: argparse.Namespace, *, tls: bool) -> list[Any]:
    """The plan against a fresh three-node kvstore cluster (with TLS on both ports: system
    `kvstore-tls`, its clients verifying the cluster's development CA)."""
    extra = args.node_args.split() if args.node_args else []
    with LocalCluster(base, 3, extra_args=extra, tls=tls) as cluster:
        leader = cluster.wait_for_leader(timeout_s=20)
        url = cluster.client_url(leader)
        print(f"cluster under {base}; leader is node {leader} at {url}", flush=True)
        pids = {node: pid for node in cluster.ids if (pid := cluster.pid(node)) is not None}
        others = [cluster.client_url(n) for n in cluster.ids if n != leader]
        context = ssl.create_default_context(cafile=cluster.ca_file) if tls else None
        system = "kvstore-tls" if tls else "kvstore"
        ca_file = cluster.ca_file if tls else ""
        results: list[Any] = []
        for path in args.client_paths:
            target = Target(system, (url, *others), context, path, ca_file)
            results += _run(target, args, pids)
        return results


def _run_etcd(base: Path, args: argparse.Namespace) -> list[Any]:
    """The same plan against three etcd members with etcd's defaults (leader first)."""
    etcd = EtcdCluster(base)
    try:
        etcd.start()
        leader_url, members = _run_loop(_etcd_leader_url(etcd))
        print(f"etcd under {base}; leader at {leader_url}", flush=True)
        # Keyed by etcd member id, which is what its status calls the leader.
        pids = {
            members[etcd.client_url(node)]: pid
            for node in etcd.ids
            if (pid := etcd.pid(node)) is not None
        }
        others = [url for url in etcd.client_urls if url != leader_url]
        return _run(Target("etcd", (leader_url, *others)), args, pids)
    finally:
        etcd.stop()


async def _etcd_leader_url(
    etcd: EtcdCluster, timeout_s: float = 30.0
) -> tuple[str, dict[str, int]]:
    """The leader's client URL and every member's id by URL, once all answer."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(trust_env=False) as session:
        while time.monotonic() < deadline:
            answers = [await etcd_status(session, url, 0.5) for url in etcd.client_urls]
            members = {url: a[0] for url, a in zip(etcd.client_urls, answers) if a is not None}
            for url, answer in zip(etcd.client_urls, answers):
                if answer is not None and answer[1].role == "leader" and len(members) == 3:
                    return url, members
            await asyncio.sleep(0.05)
    raise TimeoutError(f"etcd elected no leader within {timeout_s} s")


def _run_loop(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _run(target: Target, args: argparse.Namespace, pids: dict[int, int] | None = None) -> Any:
    return _run_loop(_bench(target, args, pids or {}))


def print_ratios(results: list[dict[str, Any]]) -> None:
    """kvstore / etcd for each client path and (workload, value size, N) both ran: above 1
    means kvstore did more operations per second; for latency, above 1 means kvstore was
    slower."""
    etcd = {
        (r["workload"], r["value_bytes"], r["concurrency"]): r
        for r in results
        if r["system"] == "etcd"
    }
    mine = [r for r in results if r["system"] == "kvstore"]
    if not etcd or not mine:
        return
    print("\nkvstore / etcd (same run): ops/s ratio (> 1: kvstore faster), p50 and p99 ratios")
    for r in mine:
        theirs = etcd.get((r["workload"], r["value_bytes"], r["concurrency"]))
        if theirs is None or not theirs["ops_per_s"] or not theirs["p50_ms"]:
            continue
        print(
            f"{r.get('client_path', 'http'):<12}{r['workload']:<8}{r['value_bytes']:>7} B "
            f"N={r['concurrency']:<4} ops/s {r['ops_per_s'] / theirs['ops_per_s']:5.2f}x"
            f"  p50 {r['p50_ms'] / theirs['p50_ms']:5.2f}x"
            f"  p99 {r['p99_ms'] / theirs['p99_ms']:5.2f}x"
        )


def print_tls_cost(results: list[dict[str, Any]]) -> None:
    """kvstore-tls / kvstore for each (workload, value size, N) both ran."""
    plain = {
        (r["client_path"], r["workload"], r["value_bytes"], r["concurrency"]): r
        for r in results
        if r["system"] == "kvstore"
    }
    tls = [r for r in results if r["system"] == "kvstore-tls"]
    if not tls:
        return
    print("\nTLS / plain (same run): throughput ratio, p50 and p99 latency ratios")
    for r in tls:
        mine = plain.get((r["client_path"], r["workload"], r["value_bytes"], r["concurrency"]))
        if mine is None or not mine["ops_per_s"] or not mine["p50_ms"]:
            continue
        print(
            f"{r['client_path']:<12}{r['workload']:<8}{r['value_bytes']:>7} B N={r['concurrency']:<4}"
            f" ops/s {r['ops_per_s'] / mine['ops_per_s']:5.2f}x"
            f"  p50 {r['p50_ms'] / mine['p50_ms']:5.2f}x  p99 {r['p99_ms'] / mine['p99_ms']:5.2f}x"
        )


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
    parser.add_argument("--soak", type=float, default=0.0,
                        help="after each level, the same again for this many seconds")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="keep the clusters' data and logs (removed at the end otherwise)")  # fmt: skip
    parser.add_argument("--node-args", default="", help="extra flags for every node")
    parser.add_argument("--workloads", default="write", help=f"from {','.join(WORKLOADS)}")
    parser.add_argument("--value-sizes", default="", help="PUT value sizes to sweep (bytes)")
    parser.add_argument("--sweep-concurrency", type=int, default=16, help="N of the sweep")
    parser.add_argument("--compare", choices=["etcd"], help="also run three-node etcd")
    parser.add_argument("--client-paths", default="http",
                        help=f"how kvstore is driven, from {','.join(CLIENT_PATHS)}")  # fmt: skip
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run the plan on a cluster with TLS on both ports (system kvstore-tls) and "
        "print TLS / plain ratios",
    )
    args = parser.parse_args(argv)
    args.client_paths = [path for path in args.client_paths.split(",") if path]
    if not args.client_paths or set(args.client_paths) - set(CLIENT_PATHS):
        parser.error(f"unknown client paths; choose from {','.join(CLIENT_PATHS)}")
    if args.quick:
        args.concurrency, args.duration, args.warmup = "1,16", 1.0, 0.3
    args.workloads = [w for w in args.workloads.split(",") if w]
    if set(args.workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads; choose from {sorted(WORKLOADS)}")
    args.value_sizes = [int(size) for size in args.value_sizes.split(",") if size]
    if args.compare == "etcd" and etcd_binary() is None:
        parser.error("--compare etcd needs an etcd binary on PATH (apt-get install etcd-server)")
    if (args.compare or args.tls) and args.endpoint:
        parser.error("--compare and --tls start their own clusters; they cannot use --endpoint")
    run = RunInfo(argv)
    print(f"throughput benchmark: {run.describe()}", flush=True)
    try:
        if args.endpoint:
            url = args.endpoint.rstrip("/")
            results = []
            for path in args.client_paths:
                results += _run(Target("kvstore", (url,), None, path), args)
        else:
            results = _run_with_cluster(args)
    except KeyboardInterrupt:
        print("interrupted: the clusters were stopped", file=sys.stderr)
        return 130
    print_ratios(results)
    print_tls_cost(results)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json_path:
        document = {
            "benchmark": "throughput",
            "run": run.finish(),
            "raw_fsync_ms": getattr(args, "raw_fsync_ms", None),
            "settings": {
                "concurrency": args.concurrency,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "soak_s": args.soak,
                "workloads": args.workloads,
                "value_sizes": args.value_sizes,
                "sweep_concurrency": args.sweep_concurrency,
                "endpoint": args.endpoint,
                "node_args": args.node_args,
                "compare": args.compare,
                "tls": args.tls,
                "client_paths": args.client_paths,
            },
            "key_bytes": KEY_BYTES,
            "value_bytes": VALUE_BYTES,
            "results": results,
        }
        json_path = output_path(args.json_path, "throughput.json")
        json_path.write_text(json.dumps(document, indent=2))
        print(f"json: {json_path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
