"""The node's configuration: one frozen, keyword-only dataclass and where its values come from.

Precedence, highest first: command-line flags, `KVSTORE_*` environment variables, the TOML
file named by `--config` / `KVSTORE_CONFIG`, then the defaults below. Every option has the
same name in all three places: flag `--tick-interval-ms`, variable `KVSTORE_TICK_INTERVAL_MS`,
TOML key `tick-interval-ms` (or `tick_interval_ms`).

StatefulSet mode: when no id is given and `KVSTORE_STATEFULSET_REPLICAS` is set, the id and
the peers are derived from the hostname by `kvstore.server.discovery`; a pod beyond the
bootstrap set joins (`initial_cluster_state` defaults to "existing" for it).

Rules: `ServeConfig` validates itself in `__post_init__` and raises `ValueError` naming the
field, so a bad value stops the node at start with a clear message, never later.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvstore.server.discovery import split_host_port, statefulset_identity_from_environ
from kvstore.server.peerauth import SECRET_BYTES_MIN

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_CLIENT_CERT_AUTH = ("none", "optional", "required")
_INITIAL_CLUSTER_STATES = ("auto", "new", "existing")


def parse_peers(text: str) -> dict[int, str]:
    """Parse "1=host:port,2=host:port" into {1: "host:port", ...}."""
    peers: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        ident, sep, address = item.partition("=")
        if not sep or not ident.strip().isdigit():
            raise ValueError(f"peers: {item!r} is not id=host:port")
        split_host_port(address.strip())
        peers[int(ident)] = address.strip()
    return peers


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    """Everything one `kvstore serve` process needs; see the module docstring."""

    id: int
    peers: tuple[tuple[int, str], ...]  # (id, "host:port" of its peer port), all nodes incl. this
    data_dir: Path
    cluster_id: str = "kvstore"
    # Peer authentication (kvstore/server/peerauth.py). The secret is read from
    # cluster_secret_file by load_config when that is given; repr never shows it.
    cluster_secret: str = field(default="", repr=False)
    cluster_secret_file: str = ""
    # Listen for peers on a non-loopback address with neither a secret nor TLS: only when the
    # network is known to reach no one but the members.
    peer_network_trusted: bool = False
    # TLS (kvstore/server/tls.py). The client port: its certificate and key, and the CA of
    # client certificates (asked for per client_cert_auth: none, optional or required).
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    client_cert_auth: str = "none"
    # The peer port: mutual TLS, all three or none.
    peer_cert_file: str = ""
    peer_key_file: str = ""
    peer_ca_file: str = ""
    # Client authentication and authorization (kvstore/server/auth.py): on or off on every
    # node alike; the root token (bootstrap: the first admin) from a file.
    auth: bool = False
    auth_root_token_file: str = ""
    auth_protect_status: bool = False
    auth_protect_metrics: bool = False
    listen_client: str = "127.0.0.1:7001"
    listen_peer: str = "127.0.0.1:7101"
    advertise_client_url: str = ""  # "" means http://<listen_client>
    log_level: str = "info"
    tick_interval_ms: int = 10
    election_ticks: int = 20
    heartbeat_ticks: int = 5
    snapshot_entries: int = 10_000
    snapshot_catch_up_entries: int = 1_000
    snapshot_log_ratio: float = 1.0
    max_key_bytes: int = 1024
    max_value_bytes: int = 1 << 20
    max_body_bytes: int = (1 << 20) + 1024
    max_pending_proposals: int = 8192
    request_timeout_ms: int = 5000
    peer_queue_frames: int = 8192
    # The peer port's bounds (kvstore/server/transport.py). A snapshot streams in chunks
    # (snapshot_stream.py), so peer_frame_bytes_max bounds messages, not the store.
    peer_frame_bytes_max: int = 256 << 20
    peer_handshake_timeout_ms: int = 1000
    peer_connections_max: int = 64
    peer_connections_per_source_max: int = 8
    # A peer connection on which nothing arrived for this many heartbeat intervals is dead.
    peer_dead_after_heartbeats: int = 5
    inbox_batch_max: int = 4096
    shutdown_transfer_ms: int = 1000
    inline_save_entries_max: int = 16
    # The client port's connections (kvstore/server/connections.py). The total is lowered at
    # start to fit under RLIMIT_NOFILE (raised to its hard limit) less a reserve for files.
    client_connections_max: int = 10_000
    client_connections_per_source_max: int = 1_000
    client_header_timeout_ms: int = 10_000  # first byte of a request head -> whole head
    client_body_timeout_ms: int = 30_000  # whole head -> whole body
    client_idle_timeout_ms: int = 60_000  # no request in progress (keep-alive, or new)
    # Transactions, history, watches and leases (issue 14). The history bounds decide what
    # the replicated state holds: they must be the same on every node.
    txn_ops_max: int = 128
    history_revisions_max: int = 10_000
    history_bytes_max: int = 64 << 20
    history_age_ms: int = 0
    watch_progress_interval_ms: int = 1000
    watch_lag_revisions_max: int = 5_000
    watchers_max: int = 10_000
    lease_check_interval_ms: int = 50
    # Chaos drills only: answer "linearizable" reads from local state without ReadIndex.
    unsafe_local_reads: bool = False
    # Membership (kvstore/server/identity.py, membership.py). With an empty data directory:
    # "auto" asks the peers whether a cluster exists (join it if so, bootstrap when every
    # peer is fresh too), "new" bootstraps, "existing" joins. `join`: client URLs of members
    # to join through (implies "existing").
    initial_cluster_state: str = "auto"
    join: str = ""
    join_as_learner: bool = False
    # The leader promotes a joined learner once it has been caught up this long.
    promote_stable_ms: int = 1000
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.id < 1:
            raise ValueError(f"id must be >= 1, got {self.id}")
        peer_ids = [peer_id for peer_id, _ in self.peers]
        if self.id not in peer_ids:
            raise ValueError(f"peers must include this node's id {self.id}: got {peer_ids}")
        if len(set(peer_ids)) != len(peer_ids) or min(peer_ids) < 1:
            raise ValueError(f"peers: ids must be unique and >= 1, got {peer_ids}")
        if not self.cluster_id or len(self.cluster_id) > 128:
            raise ValueError("cluster_id must be 1..128 characters")
        split_host_port(self.listen_client)
        split_host_port(self.listen_peer)
        self._check_peer_authentication()
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {_LOG_LEVELS}, got {self.log_level!r}")
        self._check_positive()
        if self.initial_cluster_state not in _INITIAL_CLUSTER_STATES:
            raise ValueError(f"initial_cluster_state must be one of {_INITIAL_CLUSTER_STATES}")
        for url in self.join_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"join: {url!r} is not an http:// or https:// URL")
        if self.heartbeat_ticks >= self.election_ticks:
            raise ValueError("heartbeat_ticks must be smaller than election_ticks")
        if self.advertise_client_url and not self.advertise_client_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError("advertise_client_url must start with http:// or https://")

    @property
    def client_tls(self) -> bool:
        return bool(self.cert_file)

    @property
    def peer_tls(self) -> bool:
        return bool(self.peer_cert_file)

    def _check_tls(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (the client port's TLS)")
        if self.ca_file and not self.cert_file:
            raise ValueError("ca_file needs cert_file and key_file (TLS on the client port)")
        if self.client_cert_auth not in _CLIENT_CERT_AUTH:
            raise ValueError(f"client_cert_auth must be one of {_CLIENT_CERT_AUTH}")
        if self.client_cert_auth != "none" and not self.ca_file:
            raise ValueError("client_cert_auth needs ca_file (the CA of client certificates)")
        peer = (self.peer_cert_file, self.peer_key_file, self.peer_ca_file)
        if any(peer) and not all(peer):
            raise ValueError(
                "peer_cert_file, peer_key_file and peer_ca_file go together (mutual TLS "
                "between peers)"
            )
        if self.advertise_client_url.startswith("http://") and self.client_tls:
            raise ValueError("advertise_client_url must be https:// with TLS on the client port")

    def _check_peer_authentication(self) -> None:
        self._check_tls()
        if self.cluster_secret and len(self.cluster_secret.encode()) < SECRET_BYTES_MIN:
            raise ValueError(
                f"cluster_secret must be at least {SECRET_BYTES_MIN} bytes "
                "(`kvstore secret` prints a new one)"
            )
        if self.cluster_secret or self.peer_tls or self.peer_network_trusted:
            return
        host, _ = split_host_port(self.listen_peer)
        if not is_loopback_host(host):
            raise ValueError(
                f"listen_peer {self.listen_peer} is not a loopback address, and peers would "
                "not have to authenticate: set cluster_secret_file (or cluster_secret) or peer "
                "TLS (peer_cert_file, peer_key_file, peer_ca_file), or peer_network_trusted="
                "true if nothing but the members can reach that network"
            )

    def _check_positive(self) -> None:
        for name in (
            "tick_interval_ms",
            "election_ticks",
            "heartbeat_ticks",
            "snapshot_entries",
            "max_key_bytes",
            "max_value_bytes",
            "max_body_bytes",
            "max_pending_proposals",
            "request_timeout_ms",
            "peer_queue_frames",
            "peer_frame_bytes_max",
            "peer_handshake_timeout_ms",
            "peer_connections_max",
            "peer_connections_per_source_max",
            "peer_dead_after_heartbeats",
            "inbox_batch_max",
            "client_connections_max",
            "client_connections_per_source_max",
            "client_header_timeout_ms",
            "client_body_timeout_ms",
            "client_idle_timeout_ms",
            "txn_ops_max",
            "history_revisions_max",
            "history_bytes_max",
            "watch_progress_interval_ms",
            "watch_lag_revisions_max",
            "watchers_max",
            "lease_check_interval_ms",
            "promote_stable_ms",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.shutdown_transfer_ms, self.snapshot_catch_up_entries) < 0 or (
            self.inline_save_entries_max < 0 or self.history_age_ms < 0
        ):
            raise ValueError("shutdown_transfer_ms and snapshot_catch_up_entries must be >= 0")
        if not (0 <= self.snapshot_log_ratio < math.inf):
            raise ValueError(f"snapshot_log_ratio must be >= 0, got {self.snapshot_log_ratio}")

    @property
    def peer_addresses(self) -> dict[int, str]:
        return dict(self.peers)

    @property
    def join_urls(self) -> list[str]:
        return [url.strip() for url in self.join.split(",") if url.strip()]

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_ticks * self.tick_interval_ms / 1000.0

    @property
    def client_url(self) -> str:
        scheme = "https" if self.client_tls else "http"
        return self.advertise_client_url or f"{scheme}://{self.listen_client}"


def is_loopback_host(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or `localhost`; any other name counts
    as reachable from elsewhere (what it resolves to can change)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


# (name, parser from text, help). The name is the dataclass field; flags use dashes.
_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("id", int, "this node's id (>= 1)"),
    ("cluster_id", str, "cluster name; peers with another cluster id are rejected"),
    (
        "cluster_secret",
        str,
        "shared secret peers prove in their handshake (at least 16 bytes; visible in ps: "
        "prefer cluster-secret-file)",
    ),
    ("cluster_secret_file", str, "file holding the cluster secret (surrounding whitespace ignored)"),
    (
        "peer_network_trusted",
        _parse_bool,
        "allow a non-loopback listen-peer without a secret or TLS (only on a network that "
        "reaches no one but the members)",
    ),
    ("cert_file", str, "TLS on the client port: this node's certificate chain (PEM)"),
    ("key_file", str, "TLS on the client port: the key of cert-file (PEM)"),
    ("ca_file", str, "TLS on the client port: the CA of client certificates (PEM)"),
    ("client_cert_auth", str, "ask clients for a certificate signed by ca-file: none, optional, required"),
    ("peer_cert_file", str, "mutual TLS between peers: this node's certificate chain (PEM)"),
    ("peer_key_file", str, "mutual TLS between peers: the key of peer-cert-file (PEM)"),
    ("peer_ca_file", str, "mutual TLS between peers: the CA that signs every member's certificate"),
    ("auth", _parse_bool, "require a token or client certificate and check roles on the client port"),
    ("auth_root_token_file", str, "file holding the root token (user root, may do everything)"),
    ("auth_protect_status", _parse_bool, "with auth: /v1/status needs an authenticated user"),
    ("auth_protect_metrics", _parse_bool, "with auth: /metrics needs an authenticated user"),
    ("listen_client", str, "host:port for the HTTP API"),
    ("listen_peer", str, "host:port for peer traffic"),
    ("advertise_client_url", str, "client URL other nodes give out (default http(s)://LISTEN)"),
    ("peers", str, "peer ports of all nodes: 1=host:port,2=host:port,3=host:port (default: this node only)"),
    ("data_dir", str, "directory of the write-ahead log and snapshots (default data/nodeID)"),
    ("log_level", str, "debug, info, warning, error or critical"),
    ("tick_interval_ms", int, "Raft tick length in milliseconds"),
    ("election_ticks", int, "election timeout in ticks"),
    ("heartbeat_ticks", int, "heartbeat interval in ticks"),
    ("snapshot_entries", int, "take a snapshot and compact the log every N entries or more"),
    (
        "snapshot_log_ratio",
        float,
        "snapshot only once the entries since the last one reach this multiple of its size",
    ),
    ("snapshot_catch_up_entries", int, "entries kept before a snapshot for slow followers"),
    ("max_key_bytes", int, "largest key in UTF-8 bytes"),
    ("max_value_bytes", int, "largest value in bytes"),
    ("max_body_bytes", int, "largest request body in bytes"),
    ("max_pending_proposals", int, "writes in flight before answering 429"),
    ("request_timeout_ms", int, "deadline of one request inside the node"),
    ("peer_queue_frames", int, "frames queued per peer before dropping"),
    ("peer_frame_bytes_max", int, "largest peer frame accepted (snapshots stream in smaller chunks)"),
    ("peer_handshake_timeout_ms", int, "time a peer connection has to complete its handshake"),
    ("peer_connections_max", int, "inbound peer connections at most"),
    ("peer_connections_per_source_max", int, "inbound peer connections from one address at most"),
    (
        "peer_dead_after_heartbeats",
        int,
        "heartbeat intervals without a byte before a peer connection is redialled",
    ),
    ("inbox_batch_max", int, "items the driver takes from its inbox per turn"),
    ("shutdown_transfer_ms", int, "how long a leader waits to hand over on SIGTERM"),
    (
        "inline_save_entries_max",
        int,
        "fsync on the event loop (no thread hop) for Readies of at most N entries",
    ),
    # The client port's connection bounds and timeouts (kvstore/server/connections.py).
    ("client_connections_max", int, "client connections held open at most"),
    ("client_connections_per_source_max", int, "client connections from one address at most"),
    ("client_header_timeout_ms", int, "time for a request head, from its first byte"),
    ("client_body_timeout_ms", int, "time for a request body, after its head"),
    ("client_idle_timeout_ms", int, "close a client connection idle this long"),
    ("txn_ops_max", int, "comparisons, or operations per branch, a transaction may hold"),
    (
        "history_revisions_max",
        int,
        "revisions of history kept for watches and past reads (same on every node)",
    ),
    ("history_bytes_max", int, "bytes of history kept at most (same on every node)"),
    (
        "history_age_ms",
        int,
        "history older than this is compacted; 0 = no age bound (same on every node)",
    ),
    (
        "watch_progress_interval_ms",
        int,
        "a watch with nothing to send reports its revision this often",
    ),
    (
        "watch_lag_revisions_max",
        int,
        "a watcher this many revisions behind is cancelled as too slow",
    ),
    ("watchers_max", int, "watches one node serves at once"),
    ("lease_check_interval_ms", int, "how often the leader looks for expired leases"),
    ("unsafe_local_reads", _parse_bool, "UNSAFE, for chaos drills: skip ReadIndex on reads"),
    (
        "initial_cluster_state",
        str,
        "with an empty data directory: auto (ask the peers: join an existing cluster, "
        "bootstrap a new one only when every peer is fresh too), new (bootstrap), existing (join)",
    ),
    ("join", str, "client URLs of members of the cluster to join (comma-separated)"),
    ("join_as_learner", _parse_bool, "after joining, stay a learner until `member promote`"),
    ("promote_stable_ms", int, "the leader promotes a joined learner caught up this long"),
)


def default_text(name: str) -> str | None:
    """ServeConfig's default of option `name` as the help text and docs/configuration.md
    write it, or None when it has no fixed one (id, peers, data_dir, advertise_client_url).
    Defaults are written once, in the dataclass; tests/server/test_config.py checks the table
    in docs/configuration.md against this."""
    found = next((f for f in fields(ServeConfig) if f.name == name), None)
    if found is None or found.default is MISSING or found.default == "":
        return None
    default = found.default
    return str(default).lower() if isinstance(default, bool) else str(default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option, with default None so that unset flags fall through; the help
    text names ServeConfig's default."""
    parser.add_argument("--config", default=None, help="TOML file with any of these options")
    for name, _, help_text in _OPTIONS:
        default = default_text(name)
        if default is not None:
            help_text += f" (default {default})"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text)


def _from_toml(path: str) -> dict[str, Any]:
    with open(path, "rb") as file:
        document = tomllib.load(file)
    known = {name for name, _, _ in _OPTIONS}
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown option {key!r}")
        values[name] = value
    return values


def load_config(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeConfig:
    """Merge flags > environment > TOML file > defaults into a validated ServeConfig."""
    env = os.environ if environ is None else environ
    flags = vars(args) if args is not None else {}
    config_path = flags.get("config") or env.get("KVSTORE_CONFIG")
    raw: dict[str, Any] = _from_toml(config_path) if config_path else {}
    for name, _, _ in _OPTIONS:
        variable = "KVSTORE_" + name.upper()
        if env.get(variable, "") != "":
            raw[name] = env[variable]
        if flags.get(name) is not None:
            raw[name] = flags[name]
    values: dict[str, Any] = {}
    for name, parse, _ in _OPTIONS:
        if name not in raw:
            continue
        value = raw[name]
        try:
            values[name] = value if not isinstance(value, str) or parse is str else parse(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
    _apply_statefulset(values, env)
    return _build(values)


def _apply_statefulset(values: dict[str, Any], env: Mapping[str, str]) -> None:
    if "id" in values:
        return
    identity = statefulset_identity_from_environ(env)
    if identity is None:
        return
    values["id"] = identity.node_id
    values.setdefault("peers", identity.peers)
    if identity.joins:  # a pod beyond the bootstrap set never bootstraps: it joins
        values.setdefault("initial_cluster_state", "existing")


def _build(values: dict[str, Any]) -> ServeConfig:
    if "id" not in values:
        raise ValueError("id is required (--id, KVSTORE_ID, or StatefulSet mode)")
    peers = values.pop("peers", None)
    if isinstance(peers, str):
        peers = parse_peers(peers)
    if isinstance(peers, Mapping):
        peers = {int(k): str(v) for k, v in peers.items()}
    if not peers:
        peers = {int(values["id"]): values.get("listen_peer", default_text("listen_peer"))}
    data_dir = Path(values.pop("data_dir", f"data/node{values['id']}"))
    _read_secret_file(values)
    names = {f.name for f in fields(ServeConfig)}
    assert set(values) <= names, set(values) - names
    return ServeConfig(peers=tuple(sorted(peers.items())), data_dir=data_dir, **values)


def _read_secret_file(values: dict[str, Any]) -> None:
    path = values.get("cluster_secret_file")
    if not path:
        return
    if values.get("cluster_secret"):
        raise ValueError("cluster_secret and cluster_secret_file are both set: keep one")
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cluster_secret_file: cannot read {path}: {exc}") from exc
    if not secret:
        raise ValueError(f"cluster_secret_file: {path} is empty")
    values["cluster_secret"] = secret


def option_names() -> Sequence[str]:
    """The option names, for documentation and tests."""
    return [name for name, _, _ in _OPTIONS]
