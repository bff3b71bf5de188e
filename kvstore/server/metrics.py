"""Prometheus metrics of one node, in a registry of its own (so tests can run many nodes).

The driver and the HTTP layer update these; `GET /metrics` renders the registry in the
Prometheus text format. Names follow Prometheus conventions (`_total`, `_seconds`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.is_leader = Gauge("kvstore_is_leader", "1 when this node is the leader", registry=r)
        self.term = Gauge("kvstore_term", "Current Raft term", registry=r)
        self.node_info = Gauge("kvstore_node_info", "This node's id", ["id"], registry=r)
        self.node_info.labels(id=str(node_id)).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
