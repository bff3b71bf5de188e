"""One node process: opens storage, builds the replica, and wires driver, transport and HTTP.

`run_node(config)` is what `kvstore serve` runs (on uvloop when it is installed). It owns
every task of the process in one TaskGroup and the order of shutdown:

SIGTERM/SIGINT -> a leader hands leadership to its most up-to-date follower (waiting up to
`shutdown_transfer_ms`) -> writes in flight get their answers -> the HTTP server stops
(finishing requests in progress) -> the driver stops between two turns -> the transport
closes -> storage closes. The data directory is consistent at every step: only completed
saves are durable and nothing is acknowledged before its save returned.

A damaged data directory (CorruptionError) or a failed write (FatalDiskError) ends the process
with a message naming the file and the offset, and exit status 2 (1 for other failures).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
import sys
import time
from typing import Any

from aiohttp import web

from kvstore.config import ServeConfig
from kvstore.errors import CorruptionError, FatalDiskError, StorageError
from kvstore.raft.config import RaftConfig
from kvstore.raft.types import NONE, Role
from kvstore.server.discovery import split_host_port
from kvstore.server.driver import Driver
from kvstore.server.http import HttpApi
from kvstore.server.metrics import NodeMetrics
from kvstore.server.transport import PeerTransport

logger = logging.getLogger("kvstore.server")

EXIT_STORAGE = 2


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def tune_gc() -> None:
    """Fewer, logged garbage collections. The Raft log, the state machine and the in-flight
    requests are many small objects; with the default thresholds a full collection walks
    all of them every few thousand allocations, and a long one pauses heartbeats. Objects
    alive after start-up are frozen out of collections; collections over 50 ms are logged."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            elapsed = time.perf_counter() - started[0]
            if elapsed > 0.05:
                logger.warning(
                    "event=slow_gc seconds=%.3f generation=%s collected=%s",
                    elapsed,
                    info.get("generation"),
                    info.get("collected"),
                )

    gc.callbacks.append(on_gc)


def open_replica(config: ServeConfig) -> Any:
    """Open (recover) the data directory and build the Replica; raises StorageError."""
    from kvstore.replica import Replica
    from kvstore.storage.disk import DiskStorage

    config.data_dir.mkdir(parents=True, exist_ok=True)
    storage = DiskStorage(config.data_dir)
    raft_config = RaftConfig(
        id=config.id,
        peers=tuple(sorted(config.peer_addresses)),
        election_ticks=config.election_ticks,
        heartbeat_ticks=config.heartbeat_ticks,
    )
    return Replica(
        raft_config,
        storage,
        random.Random(),
        snapshot_entries=config.snapshot_entries,
        snapshot_catch_up_entries=config.snapshot_catch_up_entries,
        snapshot_log_ratio=config.snapshot_log_ratio,
        defer_snapshots=True,
    )


class Node:
    """The running parts of one node and their shutdown order."""

    def __init__(self, config: ServeConfig, replica: Any) -> None:
        self.config = config
        self.replica = replica
        self.metrics = NodeMetrics(config.id)
        self.transport: PeerTransport
        self.driver = Driver(config, replica, self.metrics, self._send, self._peer_url)
        self.transport = PeerTransport(
            node_id=config.id,
            cluster_id=config.cluster_id,
            client_url=config.client_url,
            listen=config.listen_peer,
            peers=config.peer_addresses,
            on_message=self.driver.on_message,
            on_peer_down=self.driver.on_peer_down,
            on_snapshot_status=self.driver.on_snapshot_status,
            queue_frames_max=config.peer_queue_frames,
            on_drop=lambda peer: self.metrics.peer_dropped.inc(),
            handshake_timeout_s=config.peer_handshake_timeout_ms / 1000.0,
            frame_bytes_max=config.peer_frame_bytes_max,
            connections_max=config.peer_connections_max,
            connections_per_source_max=config.peer_connections_per_source_max,
            ping_interval_s=config.heartbeat_interval_s,
            dead_after_s=config.peer_dead_after_heartbeats * config.heartbeat_interval_s,
        )
        self.http = HttpApi(self.driver, config.cluster_id)
        self._runner: web.ServerRunner | None = None
        self._stop = asyncio.Event()

    def _send(self, message: Any) -> None:
        self.transport.send(message)

    def _peer_url(self, peer: int) -> str | None:
        return self.transport.peer_urls.get(peer)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        await self.transport.start()
        self._runner = web.ServerRunner(
            self.http.build_server(), handle_signals=False, shutdown_timeout=5.0
        )
        await self._runner.setup()
        host, port = split_host_port(self.config.listen_client)
        await web.TCPSite(self._runner, host, port, reuse_address=True, backlog=1024).start()
        logger.info(
            "event=started id=%s client=%s peer=%s data_dir=%s",
            self.config.id,
            self.config.client_url,
            self.config.listen_peer,
            self.config.data_dir,
        )
        if self.config.unsafe_local_reads:
            logger.warning(
                "event=unsafe_local_reads: linearizable reads skip ReadIndex (chaos drills only)"
            )
        driver_task = loop.create_task(self.driver.run(), name="driver")
        stop_task = loop.create_task(self._stop.wait(), name="stop-signal")
        try:
            await asyncio.wait((driver_task, stop_task), return_when=asyncio.FIRST_COMPLETED)
            if driver_task.done():
                driver_task.result()  # a fatal error of the driver ends the process
            else:
                await self._shutdown(driver_task)
        finally:
            stop_task.cancel()
            driver_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await driver_task
            await self._close()

    async def _shutdown(self, driver_task: asyncio.Task[None]) -> None:
        logger.info("event=shutdown_started id=%s", self.config.id)
        await self._hand_over()
        await self._drain_writes(self.config.shutdown_transfer_ms / 1000)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.driver.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(driver_task, 5.0)

    async def _hand_over(self) -> None:
        """On the leader: transfer leadership to the follower with the highest match index."""
        driver = self.driver
        if not driver.is_leader() or len(self.config.peers) < 2:
            return
        status = driver.status()
        followers = [
            (p.match_index, peer) for peer, p in status.progress.items() if peer != self.config.id
        ]
        if not followers:
            return
        _, target = max(followers)
        driver.handing_over = True
        logger.info("event=transfer_leadership to=%s", target)
        await driver.call(lambda: driver.node.transfer_leadership(target))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_transfer_ms / 1000
        while loop.time() < deadline:
            if driver.role is not Role.LEADER and driver.leader_id not in (NONE, self.config.id):
                logger.info("event=transfer_done leader=%s", driver.leader_id)
                return
            await asyncio.sleep(0.002)
        logger.warning("event=transfer_timeout: stopping as leader")

    async def _drain_writes(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.driver.pending_writes() and loop.time() < deadline:
            await asyncio.sleep(0.005)

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.transport.close()
        self.driver.close()
        with contextlib.suppress(Exception):
            self.replica.storage.close()
        logger.info("event=stopped id=%s", self.config.id)


async def _main(config: ServeConfig) -> int:
    try:
        replica = open_replica(config)
    except CorruptionError as exc:
        logger.critical(
            "event=corruption path=%s offset=%s reason=%s", exc.path, exc.offset, exc.reason
        )
        print(
            f"kvstore: cannot start: {exc} (the node must not vote or serve; see README Operations)",
            file=sys.stderr,
        )
        return EXIT_STORAGE
    except StorageError as exc:
        print(f"kvstore: cannot open {config.data_dir}: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    node = Node(config, replica)
    tune_gc()
    try:
        await node.run()
    except FatalDiskError as exc:
        logger.critical("event=fatal_disk_error error=%s", exc)
        print(f"kvstore: stopping after a failed write or fsync: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    return 0


def run_node(config: ServeConfig) -> int:
    """Run one node until SIGTERM/SIGINT; returns the process exit status."""
    configure_logging(config.log_level)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_main(config))
    return uvloop.run(_main(config))
