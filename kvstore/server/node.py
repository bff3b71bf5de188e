"""One node process: opens storage, builds the replica, and wires driver, transport and HTTP.

`run_node(config)` is what `kvstore serve` runs (on uvloop when it is installed). It owns
every task of the process in one TaskGroup and the order of shutdown:

SIGTERM -> a leader hands leadership to its most up-to-date follower (waiting up to
`shutdown_transfer_ms`) -> writes in flight get their answers -> the HTTP server stops
(finishing requests in progress) -> the driver stops between two turns -> the transport
closes -> storage closes. SIGINT (Ctrl-C, and `kvstore cluster` stopping every node at once)
is the same without the handover: when the whole cluster stops, a leader waiting to hand over
to followers that are stopping too only delays it. The data directory is consistent at every
step: only completed saves are durable and nothing is acknowledged before its save returned.

Exit status 2 means a restart cannot help until a person acts (systemd's unit does not
restart it; `kvstore cluster` leaves the node down): a damaged data directory
(CorruptionError, naming the file and offset), a failed write or fsync (FatalDiskError), an
address that cannot be listened on (in use, not this host's). 1 is any other failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import random
import signal
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from kvstore.errors import CorruptionError, FatalDiskError, StorageError
from kvstore.kv.history import HistoryConfig
from kvstore.kv.state_machine import KvConfig
from kvstore.raft.config import RaftConfig
from kvstore.raft.node import Status
from kvstore.server import stream
from kvstore.server.auth import AuthApi, AuthGate, read_root_token
from kvstore.server.backup import SnapshotApi
from kvstore.server.config import ServeConfig
from kvstore.server.connections import limits_from_config, raise_nofile_limit
from kvstore.server.coordination import CoordinationApi
from kvstore.server.discovery import split_host_port
from kvstore.server.driver import Driver
from kvstore.server.http import HttpApi
from kvstore.server.identity import Identity, StartRefusedError, resolve_identity
from kvstore.server.leases import LeaseService
from kvstore.server.membership import Healer, MemberBook, MembershipApi
from kvstore.server.metrics import NodeMetrics, NodeState
from kvstore.server.snapshot_stream import snapshot_file_opener
from kvstore.server.tls import TlsContexts, contexts_from_config, install_sighup
from kvstore.server.transport import PeerTransport
from kvstore.server.watch import WatchApi, WatchHub

logger = logging.getLogger("kvstore.server")

EXIT_STORAGE = 2
# A restart cannot help (see the module docstring); the same status as a storage failure.
EXIT_CANNOT_START = 2


class ListenError(Exception):
    """A port could not be listened on: `what` (client or peer), `address`, the OS's reason."""

    def __init__(self, what: str, address: str, error: OSError) -> None:
        # asyncio's own text repeats the address ("error while attempting to bind on ..."):
        # the errno's is enough.
        reason = os.strerror(error.errno) if error.errno else str(error)
        super().__init__(f"cannot listen on {address} ({what} port): {reason.lower()}")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def tune_gc(metrics: NodeMetrics | None = None) -> None:
    """Fewer, shorter, measured garbage collections. The Raft log, the state machine and the
    in-flight requests are many small objects; with the default thresholds a full collection
    walks all of them every few thousand allocations, and a long one pauses heartbeats.
    Objects alive after start-up are frozen out of collections. A young collection walks
    every object of the young generation and under a write load finds them all alive (the
    soak's collections all reported collected=0), so its pause grows with the threshold: at
    50,000 the soak's young collections took 0.05-0.55 s on a loaded machine, longer than
    the followers' silence rule. At 10,000 each takes about a third to a fifth of that, for
    about three times the (small) total; generations 1 and 2 still run every million and
    hundred million allocations, as before (bench/README.md, issue 15). Every collection's
    wall time goes to `kvstore_gc_pause_seconds`, and collections over 50 ms are logged."""
    gc.freeze()
    gc.set_threshold(10_000, 100, 100)
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            elapsed = time.perf_counter() - started[0]
            if metrics is not None:
                generation = str(info.get("generation"))
                metrics.gc_pause_seconds.labels(generation=generation).observe(elapsed)
            if elapsed > 0.05:
                logger.warning(
                    "event=slow_gc seconds=%.3f generation=%s collected=%s",
                    elapsed,
                    info.get("generation"),
                    info.get("collected"),
                )

    gc.callbacks.append(on_gc)


_SNAPSHOT_TIMEOUT_MS = 60_000


def open_replica(config: ServeConfig, *, joined: bool = False) -> Any:
    """Open (recover) the data directory and build the Replica; raises StorageError.
    `joined`: a member that joined a running cluster (identity.py) has no bootstrap
    configuration: it learns the membership from the leader."""
    from kvstore.replica import Replica
    from kvstore.storage.disk import DiskStorage

    # DiskStorage creates the directory durably (fsynced in its parent).
    storage = DiskStorage(config.data_dir)
    raft_config = RaftConfig(
        id=config.id,
        peers=() if joined else tuple(sorted(config.peer_addresses)),
        election_ticks=config.election_ticks,
        heartbeat_ticks=config.heartbeat_ticks,
        # The transport reports every snapshot stream's outcome (snapshot_stream.py); the
        # core's own timeout is only a backstop, and must outlast a large transfer.
        snapshot_timeout_ticks=max(
            2 * config.election_ticks, _SNAPSHOT_TIMEOUT_MS // config.tick_interval_ms
        ),
    )
    return Replica(
        raft_config,
        storage,
        random.Random(),
        snapshot_entries=config.snapshot_entries,
        snapshot_catch_up_entries=config.snapshot_catch_up_entries,
        snapshot_log_ratio=config.snapshot_log_ratio,
        defer_snapshots=True,
        kv_config=kv_config(config),
    )


def kv_config(config: ServeConfig) -> KvConfig:
    """The state machine's configuration from the node's (it must be the same on every
    node: it bounds replicated state)."""
    return KvConfig(
        history=HistoryConfig(
            revisions_max=config.history_revisions_max,
            bytes_max=config.history_bytes_max,
            age_ms=config.history_age_ms,
        )
    )


class _ClientSite(web.TCPSite):
    """aiohttp's TCPSite with a bound on the TLS handshake: a connection is counted against
    the client port's bounds (kvstore/server/connections.py) only once its handshake is
    done, so the handshake gets the head's timeout instead of asyncio's 60 s."""

    def __init__(self, *args: Any, ssl_handshake_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ssl_handshake_timeout_s = ssl_handshake_timeout_s

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._ssl_handshake_timeout_s,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )


class Node:
    """The running parts of one node and their shutdown order."""

    def __init__(
        self,
        config: ServeConfig,
        replica: Any,
        tls: TlsContexts | None = None,
        root_token_digest: str = "",
        identity: Identity | None = None,
    ) -> None:
        self.config = config
        identity = identity or Identity(config.id, config.cluster_id, str(config.id))
        self.tls = tls
        self.replica = replica
        self.metrics = NodeMetrics(config.id)
        self.metrics.watch_storage(replica.storage)
        self.transport: PeerTransport
        self.driver = Driver(
            config, replica, self.metrics, self._send, self._peer_url, self._flush
        )
        self.transport = PeerTransport(
            node_id=config.id,
            cluster_id=config.cluster_id,
            client_url=config.client_url,
            listen=config.listen_peer,
            peers={},
            on_message=self.driver.on_message,
            on_peer_down=self.driver.on_peer_down,
            cluster_secret=config.cluster_secret.encode(),
            tls=tls if config.peer_tls else None,
            on_snapshot_status=self.driver.on_snapshot_status,
            queue_frames_max=config.peer_queue_frames,
            on_drop=lambda peer: self.metrics.peer_dropped.inc(),
            on_handshake_refused=lambda direction: self.metrics.peer_handshakes_refused.labels(
                direction=direction
            ).inc(),
            handshake_timeout_s=config.peer_handshake_timeout_ms / 1000.0,
            frame_bytes_max=config.peer_frame_bytes_max,
            connections_max=config.peer_connections_max,
            connections_per_source_max=config.peer_connections_per_source_max,
            ping_interval_s=config.heartbeat_interval_s,
            dead_after_s=config.peer_dead_after_heartbeats * config.heartbeat_interval_s,
            snapshot_directory=str(config.data_dir),
            open_snapshot=snapshot_file_opener(str(config.data_dir)),
            name_slot=int(identity.name) if identity.name.isdigit() else 0,
        )
        # A received snapshot is decoded off the loop and its file kept (snapshot_stream.py).
        self.transport.snapshots.receiver = replica
        self.http = HttpApi(self.driver, config.cluster_id)
        self.http.member_name = identity.name
        AuthApi(self.http)
        if config.auth:
            self.http.auth_gate = AuthGate(
                table=lambda: self.replica.state_machine.auth,
                root_digest=root_token_digest,
                protect_status=config.auth_protect_status,
                protect_metrics=config.auth_protect_metrics,
                on_denied=lambda code: self.metrics.auth_denied.labels(code=code).inc(),
            )
        self.streams = stream.install(self.http)
        self.leases = LeaseService(self.driver)
        self.watch_hub = WatchHub(self.driver)
        CoordinationApi(self.http, self.leases)
        # The bootstrap book: the one this node joined with, and --peers (which wins: it
        # says how this node reaches each slot).
        bootstrap = {**identity.peers, **config.peer_addresses}
        self.book = MemberBook(
            self.driver,
            name=identity.name,
            bootstrap=bootstrap,
            own_peer_address=config.peer_addresses.get(config.id, config.listen_peer),
            set_peers=self.transport.set_peers,
        )
        self.book.refresh()
        self.healer = Healer(self.driver, self.book, config.promote_stable_ms / 1000)
        MembershipApi(self.http, self.book)
        WatchApi(self.http, self.watch_hub)
        SnapshotApi(self.http, self.driver)
        self.metrics.bind_node(
            commit_index=lambda: self.driver.status().commit_index,
            applied_index=self.driver.applied_index,
            disk_full=lambda: 1 if self.driver.disk_full else 0,
        )
        self.metrics.watch_node(self._node_state)
        self._runner: web.ServerRunner | None = None
        self._stop = asyncio.Event()
        # False after SIGINT: stop without handing leadership over (see the module docstring).
        self._hand_over_on_stop = True

    def _node_state(self) -> NodeState:
        """For /metrics: read at each scrape (the data directory is listed then too)."""
        status = self.driver.status()
        last = status.last_index
        lag = {
            peer: max(0, last - progress.match_index)
            for peer, progress in status.progress.items()
            if peer != self.config.id
        }
        wal_bytes = snapshot_bytes = 0
        with contextlib.suppress(OSError), os.scandir(self.config.data_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".wal"):
                    wal_bytes += entry.stat().st_size
                elif entry.name.endswith(".snap"):
                    snapshot_bytes += entry.stat().st_size
        return NodeState(
            last_index=last,
            peer_lag=lag,
            snapshot_index=self.replica.snapshot_index,
            snapshot_bytes=self.replica.snapshot_bytes,
            wal_bytes=wal_bytes,
            snapshot_files_bytes=snapshot_bytes,
            voters=len(status.conf_state.voters),
            learners=len(status.conf_state.learners),
        )

    def _send(self, message: Any) -> None:
        self.transport.send(message)

    def _flush(self) -> None:
        self.transport.flush()

    def _peer_url(self, peer: int) -> str | None:
        return self.transport.peer_urls.get(peer)

    def request_stop(self, *, hand_over: bool = True) -> None:
        self._hand_over_on_stop = self._hand_over_on_stop and hand_over
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(
            signal.SIGINT, functools.partial(self.request_stop, hand_over=False)
        )
        watch_task: asyncio.Task[None] | None = None
        if self.tls is not None:
            tls = self.tls
            install_sighup(loop, lambda: tls.reload("sighup"))
            watch_task = loop.create_task(tls.watch(), name="tls-watch")
        try:
            await self._run(loop)
        finally:
            if watch_task is not None:
                watch_task.cancel()

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await self.transport.start()
        except OSError as exc:
            raise ListenError("peer", self.config.listen_peer, exc) from exc
        # One descriptor per client connection: raise the soft limit to the hard one and keep
        # the connection bound under it (kvstore/server/connections.py, FD_RESERVE).
        limits = limits_from_config(self.config, raise_nofile_limit())
        if limits.connections_max < self.config.client_connections_max:
            logger.warning(
                "event=client_connections_lowered max=%d configured=%d (RLIMIT_NOFILE)",
                limits.connections_max,
                self.config.client_connections_max,
            )
        self._runner = web.ServerRunner(
            self.http.build_server(limits), handle_signals=False, shutdown_timeout=5.0
        )
        await self._runner.setup()
        host, port = split_host_port(self.config.listen_client)
        try:
            listener = None if self.tls is None else self.tls.client_listener
            await _ClientSite(
                self._runner,
                host,
                port,
                reuse_address=True,
                backlog=1024,
                ssl_context=listener,
                ssl_handshake_timeout_s=self.config.client_header_timeout_ms / 1000,
            ).start()
        except OSError as exc:
            raise ListenError("client", self.config.listen_client, exc) from exc
        peer_auth = "+".join(
            name
            for name, on in (("tls", self.config.peer_tls), ("secret", self.config.cluster_secret))
            if on
        )
        logger.info(
            "event=started id=%s client=%s peer=%s data_dir=%s peer_auth=%s",
            self.config.id,
            self.config.client_url,
            self.config.listen_peer,
            self.config.data_dir,
            peer_auth or "none",
        )
        if self.config.unsafe_local_reads:
            logger.warning("event=unsafe_local_reads read_index=skipped use=chaos_drills_only")
        driver_task = loop.create_task(self.driver.run(), name="driver")
        lease_task = loop.create_task(self.leases.run(), name="lease-expiry")
        healer_task = loop.create_task(self.healer.run(), name="healer")
        stop_task = loop.create_task(self._stop.wait(), name="stop-signal")
        try:
            await asyncio.wait((driver_task, stop_task), return_when=asyncio.FIRST_COMPLETED)
            if driver_task.done():
                driver_task.result()  # a fatal error of the driver ends the process
            else:
                await self._shutdown(driver_task)
        finally:
            stop_task.cancel()
            healer_task.cancel()
            lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lease_task
            driver_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await driver_task
            await self._close()

    async def _shutdown(self, driver_task: asyncio.Task[None]) -> None:
        logger.info(
            "event=shutdown_started id=%s hand_over=%s", self.config.id, self._hand_over_on_stop
        )
        if self._hand_over_on_stop:
            await self._hand_over()
        await self._drain_writes(self.config.shutdown_transfer_ms / 1000)
        self.watch_hub.close()  # watches end now rather than hold the cleanup below
        if self._runner is not None:
            # No new connections, then the open streams end (clients go elsewhere at once)
            # rather than hold the cleanup below for its timeout.
            for site in list(self._runner.sites):
                await site.stop()
            await self.streams.close()
            await self._runner.cleanup()
            self._runner = None
        self.driver.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(driver_task, 5.0)

    async def _hand_over(self) -> None:
        """On the leader: transfer leadership to the follower with the highest match index."""
        driver = self.driver
        if not driver.is_leader() or len(driver.status().conf_state.voters) < 2:
            return
        status = driver.status()
        target = handover_target(status, self.config.id, self.transport.is_connected)
        if target is None:
            return
        logger.info("event=transfer_leadership to=%s", target)
        if await driver.hand_over(target, self.config.shutdown_transfer_ms / 1000):
            logger.info("event=transfer_done leader=%s", driver.leader_id)
        else:
            logger.warning("event=transfer_timeout role=leader action=stopping")

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


def handover_target(status: Status, node_id: int, connected: Callable[[int], bool]) -> int | None:
    """Whom a stopping leader hands over to: the voter with the highest match index among
    those it is connected to (a follower that is down keeps its last match index, and a
    transfer to it would time out, stopping the node without a handover); any voter if none
    is connected; None without another voter (a learner never leads)."""
    followers = [
        (p.match_index, peer)
        for peer, p in status.progress.items()
        if peer != node_id and peer in status.conf_state.voters
    ]
    reachable = [(match, peer) for match, peer in followers if connected(peer)]
    if not followers:
        return None
    return max(reachable or followers)[1]


async def _main(config: ServeConfig) -> int:
    try:
        tls = contexts_from_config(config)
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"kvstore: cannot load the TLS files: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    try:
        root_token_digest = read_root_token(config.auth_root_token_file)
    except ValueError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    try:
        identity = await resolve_identity(config)
        if identity.member_id != config.id:
            # A member that joined under a new id: --id was its name (the slot).
            peers = dict(config.peers)
            peers.setdefault(identity.member_id, config.listen_peer)
            config = dataclasses.replace(
                config, id=identity.member_id, peers=tuple(sorted(peers.items()))
            )
        replica = open_replica(config, joined=identity.joined)
    except StartRefusedError as exc:
        logger.critical("event=cannot_join error=%s", exc)
        print(f"kvstore: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except CorruptionError as exc:
        logger.critical(
            "event=corruption path=%s offset=%s reason=%s", exc.path, exc.offset, exc.reason
        )
        print(
            f"kvstore: cannot start: {exc} (the node must not vote or serve; see "
            "docs/operations.md, Fatal disk errors)",
            file=sys.stderr,
        )
        return EXIT_STORAGE
    except StorageError as exc:
        print(f"kvstore: cannot open {config.data_dir}: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    node = Node(config, replica, tls, root_token_digest, identity)
    tune_gc(node.metrics)
    try:
        await node.run()
    except ListenError as exc:
        logger.critical("event=cannot_listen error=%s", exc)
        print(f"kvstore: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
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
