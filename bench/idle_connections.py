"""Hold many idle connections (and a few slowloris ones) against one node's client port and
time a normal client meanwhile (issue 12, item 7).

    kvstore cluster &                      # or any node; then:
    python bench/idle_connections.py --url http://127.0.0.1:7001 --connections 10000

The idle connections come from `--sources` loopback addresses (127.0.0.2, 127.0.0.3, ...),
so the per-source bound (client_connections_per_source_max) does not refuse them all;
`--sources 1` shows the per-source bound at work instead. The normal client sends
`--probes` GET /healthz and PUT requests from 127.0.0.1 on fresh connections and reports
their latency. Only loopback addresses are used; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import median


async def _open(host: str, port: int, source: str) -> Any:
    try:
        return await asyncio.open_connection(host, port, local_addr=(source, 0))
    except OSError:
        return None


async def _request(host: str, port: int, request: bytes) -> tuple[float, bytes]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.1", 0))
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    return time.perf_counter() - started, answer.split(b"\r\n", 1)[0]


def _rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


async def main(args: argparse.Namespace) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rss_before = _rss_mib(args.pid)
    sources = [f"127.0.0.{2 + i}" for i in range(args.sources)]
    opened_at = time.perf_counter()
    held: list[Any] = []
    for start in range(0, args.connections, 500):
        batch = [
            _open(host, port, sources[i % len(sources)])
            for i in range(start, min(start + 500, args.connections))
        ]
        held.extend(await asyncio.gather(*batch))
    open_seconds = time.perf_counter() - opened_at
    # Slowloris: heads that never finish, one byte at a time.
    slow = [await _open(host, port, sources[0]) for _ in range(args.slowloris)]
    for pair in slow:
        if pair is not None:
            pair[1].write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
    get = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    put = (
        b"PUT /v1/kv/bench-idle HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
        b"Connection: close\r\n\r\nx"
    )
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    for i in range(args.probes):
        if slow and i % 10 == 0:
            for pair in slow:
                if pair is not None and not pair[1].is_closing():
                    pair[1].write(b"X")
        seconds, status = await _request(host, port, put if i % 2 else get)
        latencies.append(seconds)
        statuses[status.decode()] = statuses.get(status.decode(), 0) + 1
        await asyncio.sleep(args.probe_interval_s)
    # How many idle connections the node still holds open, and how many it refused.
    alive = refused = 0
    for pair in held:
        if pair is None:
            refused += 1
            continue
        reader = pair[0]
        try:
            async with asyncio.timeout(0.001):
                data = await reader.read(64)
        except TimeoutError:
            alive += 1
            continue
        refused += 1 if data.startswith(b"HTTP/1.1 503") else 0
    result = {
        "connections": args.connections,
        "sources": args.sources,
        "open_seconds": round(open_seconds, 2),
        "held_open_by_node": alive,
        "refused_503": refused,
        "probe_statuses": statuses,
        "probe_ms_p50": round(median(latencies) * 1000, 2),
        "probe_ms_max": round(max(latencies) * 1000, 2),
        "node_rss_mib_before": rss_before,
        "node_rss_mib_during": _rss_mib(args.pid),
    }
    for pair in held + slow:
        if pair is not None:
            pair[1].close()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7001")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--slowloris", type=int, default=50)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--probe-interval-s", type=float, default=0.05)
    parser.add_argument("--pid", type=int, default=None, help="the node's pid, for its RSS")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
