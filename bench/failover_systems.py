"""The systems bench/failover.py can fault: a kvstore LocalCluster or three etcd members.

Each is a `System`: start and stop it, hand out a `Writer`, poll one node's view (role, term,
leader), inject a fault (`FAULTS`) into a node and recover it, read a key prefix back. The
trial logic (bench/failover_trial.py) knows only this Protocol.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import aiohttp
from etcdcluster import EtcdClient, EtcdCluster, etcd_status

from kvstore.chaos.proxy import ProxyMesh
from kvstore.client import Client
from kvstore.client.config import ClientConfig
from kvstore.client.transport import tls_context
from kvstore.server.config import ServeConfig
from kvstore.server.localcluster import LocalCluster, free_port

FAULTS = ("kill", "term", "pause", "isolate")
KEYS_PER_BUCKET = 1000


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node's answer to a status poll."""

    role: str
    term: int
    leader_id: int


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """One line of a node's log that marks a step of a failover (`NODE_EVENTS`)."""

    at_unix: float
    node: int
    event: str
    fields: dict[str, str]


# The log events a failover timeline is built from (bench/failover_trial.py: phases).
NODE_EVENTS = frozenset(
    {
        "shutdown_started", "transfer_started", "transfer_done", "became_follower",
        "became_pre_candidate", "became_candidate", "became_leader", "timeout_now",
        "leader_reported_down", "peer_down", "peer_silent", "peer_disconnected",
        "leader_changed", "stopped",
    }
)  # fmt: skip
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \S+ event=(\w+)(.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")


def parse_node_log(text: str, node: int, since_unix: float, until_unix: float) -> list[NodeEvent]:
    """The NODE_EVENTS lines of one node's log between two wall-clock times (the log's
    timestamps are local time with milliseconds, so events are placed to about 1 ms)."""
    events = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None or match.group(3) not in NODE_EVENTS:
            continue
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
        at = stamp.timestamp() + int(match.group(2)) / 1000
        if since_unix - 0.001 <= at <= until_unix:
            fields_ = dict(_FIELD.findall(match.group(4)))
            events.append(NodeEvent(at, node, match.group(3), fields_))
    return events


class Writer(Protocol):
    async def put(self, key: str, value: str) -> int: ...

    async def close(self) -> None: ...


class System(Protocol):
    """A three-node cluster the benchmark can fault: kvstore or etcd."""

    label: str
    ids: list[int]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def writer(self, variant: bool = False) -> Writer: ...

    async def status(self, node: int, timeout_s: float) -> NodeView | None: ...

    def running(self, node: int) -> bool: ...

    def inject(self, fault: str, node: int) -> None: ...

    async def recover(self, fault: str, node: int) -> None: ...

    async def read_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]: ...

    def node_events(self, since_unix: float, until_unix: float) -> list[NodeEvent]: ...

    def client_url(self, node: int) -> str: ...


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

    def __init__(
        self,
        base_dir: Path,
        client_config: ClientConfig,
        *,
        proxies: bool,
        tls: bool = False,
        variant_options: dict[str, object] | None = None,
    ) -> None:
        # tls: TLS on both ports (mutual TLS between peers, https for the clients).
        self.tls = tls
        self.label = "kvstore-tls" if tls else "kvstore"
        self.ids = [1, 2, 3]
        self.base_dir = base_dir
        self.client_config = client_config
        # --ab-option: the ClientConfig fields the variant writers change (odd writer ids).
        self.variant_options = variant_options or {}
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
            self.base_dir,
            len(self.ids),
            peer_ports=peer_ports,
            peer_addresses=addresses,
            tls=self.tls,
        )
        self.cluster.start()
        if self.tls:
            self.client_config = replace(self.client_config, ca_file=self.cluster.ca_file)
        self._session = aiohttp.ClientSession(
            trust_env=False, connector=aiohttp.TCPConnector(ssl=tls_context(self.cluster.ca_file))
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)
        if self.mesh is not None:
            await self.mesh.close()

    def writer(self, variant: bool = False) -> Writer:
        assert self.cluster is not None
        config = self.client_config
        if variant:
            config = replace(config, **self.variant_options)  # type: ignore[arg-type]
        return _KvWriter(self.cluster.client_urls, config)

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
        config = replace(self.client_config, timeout_s=30)
        async with Client(self.cluster.client_urls, config=config) as client:
            listing = await client.list(prefix, limit=KEYS_PER_BUCKET + 1)
        assert not listing.more, f"more than {KEYS_PER_BUCKET} keys under {prefix}"
        return {item.key: (item.value, item.version) for item in listing}

    def client_url(self, node: int) -> str:
        assert self.cluster is not None
        return self.cluster.client_url(node)

    def node_events(self, since_unix: float, until_unix: float) -> list[NodeEvent]:
        """What the nodes logged between the two times (their logs, read back)."""
        assert self.cluster is not None
        events: list[NodeEvent] = []
        for node in self.ids:
            path = self.cluster.log_path(node)
            if path.exists():
                text = path.read_text(errors="replace")
                events.extend(parse_node_log(text, node, since_unix, until_unix))
        return sorted(events, key=lambda event: event.at_unix)


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

    def writer(self, variant: bool = False) -> Writer:
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

    def client_url(self, node: int) -> str:
        return self.cluster.client_url(node)

    def node_events(self, since_unix: float, until_unix: float) -> list[NodeEvent]:
        return []  # etcd's logs are not parsed: its timeline comes from polling only


def kvstore_timing_ms() -> tuple[int, int]:
    """kvstore's default heartbeat interval and (minimum) election timeout in milliseconds."""
    defaults = {f.name: f.default for f in fields(ServeConfig)}
    tick = int(defaults["tick_interval_ms"])
    return tick * int(defaults["heartbeat_ticks"]), tick * int(defaults["election_ticks"])
