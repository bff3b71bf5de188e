"""A three-node etcd cluster on 127.0.0.1 and a small asyncio client for its JSON gateway, so
the benchmarks can run the same load against etcd in the same run (`--compare etcd`).

Every etcd process is started here and stopped by its PID (SIGTERM, then SIGKILL), never by
name. Each member keeps its data in `<base_dir>/etcd<id>` and logs to `<base_dir>/etcd<id>.log`;
a restarted member reuses its data directory and so rejoins as the same member.

The client speaks etcd's gRPC-gateway (`/v3/kv/put`, `/v3/kv/range`, base64 keys and
values), as a Python program without a gRPC stack would. It has no request ids: a put retried
after a timeout may be applied twice, which the failover benchmark's final check reports.
Waiting is done by polling with deadlines; nothing here sleeps to decide an outcome.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kvstore.server.localcluster import free_port


def etcd_binary() -> str | None:
    """The etcd binary on PATH (Debian's etcd-server puts it in /usr/bin), or None."""
    return shutil.which("etcd")


def _b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix" (last byte plus one)."""
    data = prefix.encode()
    return (data[:-1] + bytes([data[-1] + 1])).decode()


@dataclass(frozen=True, slots=True)
class EtcdStatus:
    role: str
    term: int
    leader_id: int


class EtcdCluster:
    """Three (or `size`) etcd members; `heartbeat_ms` and `election_ms` are etcd's flags."""

    def __init__(
        self, base_dir: Path, size: int = 3, *, heartbeat_ms: int = 100, election_ms: int = 1000
    ) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("no etcd on PATH (apt-get install etcd-server)")
        self.binary = binary
        self.base_dir = Path(base_dir)
        self.ids = list(range(1, size + 1))
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.client_ports = {i: free_port() for i in self.ids}
        self.peer_ports = {i: free_port() for i in self.ids}
        self.client_urls = [self.client_url(i) for i in self.ids]
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, Any] = {}
        # etcd member id (hex string from the API, as an int) -> our node id.
        self.member_ids: dict[int, int] = {}

    def client_url(self, node_id: int) -> str:
        return f"http://127.0.0.1:{self.client_ports[node_id]}"

    def command(self, node_id: int) -> list[str]:
        cluster = ",".join(f"etcd{i}=http://127.0.0.1:{self.peer_ports[i]}" for i in self.ids)
        peer_url = f"http://127.0.0.1:{self.peer_ports[node_id]}"
        return [
            self.binary,
            "--name", f"etcd{node_id}",
            "--data-dir", str(self.base_dir / f"etcd{node_id}"),
            "--listen-client-urls", self.client_url(node_id),
            "--advertise-client-urls", self.client_url(node_id),
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"bench-{os.getpid()}",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for node_id in self.ids:
            self.start_node(node_id)

    def start_node(self, node_id: int) -> None:
        if self.pid(node_id) is not None:
            raise RuntimeError(f"etcd{node_id} is already running")
        old = self._logs.pop(node_id, None)
        if old is not None:
            old.close()
        log = open(self.base_dir / f"etcd{node_id}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs[node_id] = log
        self._processes[node_id] = subprocess.Popen(
            self.command(node_id),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def pid(self, node_id: int) -> int | None:
        process = self._processes.get(node_id)
        if process is None or process.poll() is not None:
            return None
        return process.pid

    def signal(self, node_id: int, signum: signal.Signals) -> None:
        pid = self.pid(node_id)
        if pid is not None:
            os.kill(pid, signum)

    def stop(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        deadline = time.monotonic() + 10.0
        for process in self._processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs.values():
            log.close()
        self._logs.clear()


class EtcdClient:
    """Puts and ranges over the JSON gateway: sticks to the member that last answered, moves
    to the next on any failure, within a per-call deadline; attempts time out after
    `attempt_timeout_s` (a paused member must not hold a call for long)."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        attempt_timeout_s: float = 0.1,
        timeout_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.attempt_timeout_s = attempt_timeout_s
        self.timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._current = self._rng.randrange(len(endpoints))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), trust_env=False
        )

    async def close(self) -> None:
        await self._session.close()

    async def _post(self, url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self._session.post(url, json=body, timeout=timeout) as response:
            document: dict[str, Any] = await response.json(content_type=None)
            if response.status != 200 or "error" in document:
                raise RuntimeError(f"etcd answered {response.status}: {document}")
            return document

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the current member, failing over to the next until the deadline."""
        deadline = time.monotonic() + self.timeout_s
        backoff_s = 0.01
        failures = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"etcd {path}: no answer within {self.timeout_s} s")
            endpoint = self.endpoints[self._current]
            try:
                return await self._post(endpoint + path, body, min(left, self.attempt_timeout_s))
            except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError):
                self._current = (self._current + 1) % len(self.endpoints)
                failures += 1
                if failures % len(self.endpoints) == 0:
                    # Every member failed once: back off (full jitter) before the next round.
                    await asyncio.sleep(self._rng.uniform(0, min(0.25, backoff_s)))
                    backoff_s *= 2

    async def put(self, key: str, value: str) -> int:
        document = await self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(document["header"]["revision"])

    async def range_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """Every key under `prefix` (linearizable): key -> (value, version)."""
        body = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        document = await self.call("/v3/kv/range", body)
        found: dict[str, tuple[bytes, int]] = {}
        for item in document.get("kvs", []):
            key = base64.b64decode(item["key"]).decode()
            found[key] = (base64.b64decode(item.get("value", "")), int(item.get("version", 0)))
        return found


async def etcd_status(
    session: aiohttp.ClientSession, url: str, timeout_s: float
) -> tuple[int, EtcdStatus] | None:
    """(member id, status) of one member, or None when it does not answer in time."""
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(url + "/v3/maintenance/status", json={}, timeout=timeout) as r:
            document = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    try:
        member = int(document["header"]["member_id"])
        leader = int(document.get("leader", 0))
        term = int(document.get("raftTerm", document["header"].get("raft_term", 0)))
    except (KeyError, TypeError, ValueError):
        return None
    role = "leader" if leader == member else "follower"
    return member, EtcdStatus(role=role, term=term, leader_id=leader)
