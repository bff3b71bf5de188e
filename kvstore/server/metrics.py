"""Prometheus metrics of one node, in a registry of its own (so tests can run many nodes).

The driver and the HTTP layer update these; `GET /metrics` renders the registry in the
Prometheus text format. Names follow Prometheus conventions (`_total`, `_seconds`).
Besides kvstore's own series the registry carries the process (CPU, memory, descriptors),
the Python runtime and its garbage collector, and `kvstore_build_info`; `bind_node` adds the
gauges read from the running node at each scrape (commit and applied index, disk full).
prometheus-client's `*_created` series (one per counter and histogram, a timestamp of when
the process made it) are turned off: they doubled the page and nobody graphs them.

The storage keeps its own plain counters (`kvstore.storage.wal.StorageMetrics`: fsyncs, time
in fsync, bytes written) so that kvstore/storage needs no Prometheus; `StorageCollector` reads
them when `/metrics` is scraped (`NodeMetrics.watch_storage`).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from kvstore import __version__
from kvstore.storage.wal import StorageMetrics

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_GC_PAUSE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

_LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class NodeMetrics:
    """All metrics of one node; attributes are prometheus-client collectors."""

    def __init__(self, node_id: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.proposals = Counter("kvstore_proposals_total", "Writes proposed to Raft", registry=r)
        self.proposals_failed = Counter(
            "kvstore_proposals_failed_total",
            "Writes refused or lost before commit",
            ["reason"],
            registry=r,
        )
        self.commits = Counter("kvstore_commits_total", "Log entries committed", registry=r)
        self.applies = Counter(
            "kvstore_applies_total", "Log entries applied to the state machine", registry=r
        )
        self.fsync_seconds = Histogram(
            "kvstore_fsync_seconds",
            "Time to persist one Ready (write + fsync)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ready_entries = Histogram(
            "kvstore_ready_entries",
            "Entries persisted per Ready (group commit size)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.keepalives = Counter(
            "kvstore_keepalive_heartbeats_total",
            "Heartbeat rounds a leader sent while waiting for a slow save",
            registry=r,
        )
        self.snapshots = Counter(
            "kvstore_snapshots_total", "Snapshots of the state machine taken", registry=r
        )
        self.elections = Counter(
            "kvstore_elections_started_total", "Elections this node started", registry=r
        )
        self.leader_changes = Counter(
            "kvstore_leader_changes_total", "Times this node saw the leader change", registry=r
        )
        self.loop_lag_seconds = Histogram(
            "kvstore_event_loop_lag_seconds",
            "How late the driver's tick timer fired",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.request_seconds = Histogram(
            "kvstore_request_seconds",
            "HTTP request latency by route and method",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.reads = Counter("kvstore_reads_total", "Reads served", ["consistency"], registry=r)
        self.read_index_calls = Counter(
            "kvstore_read_index_total", "ReadIndex requests (one per batch of reads)", registry=r
        )
        self.pending_proposals = Gauge(
            "kvstore_pending_proposals", "Writes waiting for their answer", registry=r
        )
        self.inbox_items = Histogram(
            "kvstore_driver_inbox_items",
            "Items the driver took from its inbox per turn",
            buckets=(1, 4, 16, 64, 256, 1024, 4096),
            registry=r,
        )
        self.peer_handshakes_refused = Counter(
            "kvstore_peer_handshakes_refused_total",
            "Peer connections refused before their handshake completed (in: dialled to us; "
            "out: our dials), e.g. a wrong secret or certificate",
            ["direction"],
            registry=r,
        )
        self.auth_denied = Counter(
            "kvstore_auth_denied_total",
            "Client requests refused by authentication (401) or authorization (403)",
            ["code"],
            registry=r,
        )
        self.peer_dropped = Counter(
            "kvstore_peer_messages_dropped_total",
            "Messages dropped on full peer queues",
            registry=r,
        )
        self.client_connections = Gauge(
            "kvstore_client_connections", "Open connections on the client port", registry=r
        )
        self.client_connections_refused = Counter(
            "kvstore_client_connections_refused_total",
            "Client connections refused at accept (503): bound=per_source or total",
            ["bound"],
            registry=r,
        )
        self.client_connections_closed = Counter(
            "kvstore_client_connections_closed_total",
            "Client connections the node closed: idle_timeout, header_timeout, "
            "body_timeout or evicted (the longest idle, to make room at the total bound)",
            ["reason"],
            registry=r,
        )
        # Issue 14: watches and leases (server/watch.py, server/leases.py).
        self.watchers = Gauge("kvstore_watchers", "Watch streams this node serves", registry=r)
        self.leases_expired = Counter(
            "kvstore_leases_expired_total",
            "Leases this node revoked as their leader because they expired",
            registry=r,
        )
        self.is_leader = Gauge("kvstore_is_leader", "1 when this node is the leader", registry=r)
        self.term = Gauge("kvstore_term", "Current Raft term", registry=r)
        self.node_info = Gauge("kvstore_node_info", "This node's id", ["id"], registry=r)
        self.node_info.labels(id=str(node_id)).set(1)
        self.build_info = Gauge(
            "kvstore_build_info", "The running kvstore", ["version", "python"], registry=r
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        self.gc_pause_seconds = Histogram(
            "kvstore_gc_pause_seconds",
            "Wall time of each garbage collection, by generation",
            ["generation"],
            buckets=_GC_PAUSE_BUCKETS_S,
            registry=r,
        )
        self.commit_index = Gauge(
            "kvstore_commit_index", "Highest log index known committed", registry=r
        )
        self.applied_index = Gauge(
            "kvstore_applied_index", "Highest log index applied to the state machine", registry=r
        )
        self.disk_full = Gauge(
            "kvstore_disk_full", "1 while writes are refused for a full disk", registry=r
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def bind_node(
        self,
        *,
        commit_index: Callable[[], float],
        applied_index: Callable[[], float],
        disk_full: Callable[[], float],
    ) -> None:
        """Read these from the running node at each scrape (no bookkeeping on hot paths)."""
        self.commit_index.set_function(commit_index)
        self.applied_index.set_function(applied_index)
        self.disk_full.set_function(disk_full)

    def watch_node(self, read: Callable[[], NodeState]) -> None:
        """Export `read()`'s figures at every scrape: the log's last index, each peer's lag
        as the leader sees it, the latest snapshot and the disk the data directory takes."""
        self.registry.register(NodeStateCollector(read))

    def watch_storage(self, storage: object) -> None:
        """Export `storage.metrics` (a StorageMetrics) on every scrape; storage without one
        (MemoryStorage) exports nothing."""
        self.registry.register(StorageCollector(storage))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class NodeState:
    """What `NodeStateCollector` reads from a running node when scraped."""

    last_index: int
    # On the leader: peer id -> entries it lacks (last index - its match index); else empty.
    peer_lag: Mapping[int, int]
    snapshot_index: int
    snapshot_bytes: int
    # Bytes of write-ahead log segments and of snapshot files in the data directory.
    wal_bytes: int
    snapshot_files_bytes: int
    # The configuration in force on this node (docs/architecture.md section 11).
    voters: int = 0
    learners: int = 0


class NodeStateCollector(Collector):
    """A node's log, peers and disk use, read from the node when scraped."""

    def __init__(self, read: Callable[[], NodeState]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        yield GaugeMetricFamily("kvstore_last_index", "Last index of the Raft log", state.last_index)
        lag = GaugeMetricFamily(
            "kvstore_peer_lag_entries",
            "On the leader: entries a peer lacks (last index - its match index)",
            labels=["peer"],
        )
        for peer, entries in sorted(state.peer_lag.items()):
            lag.add_metric([str(peer)], entries)
        yield lag
        yield GaugeMetricFamily(
            "kvstore_snapshot_index", "Index of the latest snapshot", state.snapshot_index
        )
        yield GaugeMetricFamily(
            "kvstore_snapshot_bytes", "Size of the latest snapshot's state", state.snapshot_bytes
        )
        yield GaugeMetricFamily(
            "kvstore_wal_bytes", "Write-ahead log segments on disk", state.wal_bytes
        )
        yield GaugeMetricFamily(
            "kvstore_snapshot_files_bytes", "Snapshot files on disk", state.snapshot_files_bytes
        )
        yield GaugeMetricFamily(
            "kvstore_voters", "Voters in the configuration in force here", state.voters
        )
        yield GaugeMetricFamily(
            "kvstore_learners", "Learners in the configuration in force here", state.learners
        )


class StorageCollector(Collector):
    """The storage's `StorageMetrics`, read when scraped (it only counts, never exports)."""

    def __init__(self, storage: object) -> None:
        self._storage = storage

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families depend on the storage; registration needs no names

    def collect(self) -> Iterator[Metric]:
        metrics = getattr(self._storage, "metrics", None)
        if not isinstance(metrics, StorageMetrics):
            return
        yield CounterMetricFamily(
            "kvstore_storage_fsyncs",
            "fsyncs of the write-ahead log, snapshot files and directories",
            value=metrics.fsync_count,
        )
        yield CounterMetricFamily(
            "kvstore_storage_fsync_seconds",
            "Time spent in fsyncs of the write-ahead log and its directory",
            value=metrics.fsync_seconds_total,
        )
        yield GaugeMetricFamily(
            "kvstore_storage_last_fsync_seconds",
            "Duration of the latest fsync of the write-ahead log or its directory",
            value=metrics.last_fsync_seconds,
        )
        yield CounterMetricFamily(
            "kvstore_storage_written_bytes",
            "Bytes written to the write-ahead log",
            value=metrics.bytes_written,
        )
