"""The `kvstore serve` and `kvstore cluster` subcommands.

`serve` runs one node (configuration: flags > KVSTORE_* environment > TOML file > defaults;
see kvstore/server/config.py). `cluster` runs a local three-node cluster in the foreground, like a
small supervisor: client ports 7001-7003, peer ports 7101-7103, data under ./data; it restarts
a node that dies and stops all three on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kvstore.server.config import add_arguments, default_text, load_config
from kvstore.server.discovery import split_host_port

_RESTART_DELAY_S = 1.0
_CLUSTER_SIZE = 3


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run one node",
        description="Run one kvstore node. Every flag is also a KVSTORE_* environment "
        "variable and a key of the --config TOML file.",
    )
    add_arguments(serve)
    serve.set_defaults(handler=_serve)

    # The first node listens where a lone `kvstore serve` would (ServeConfig's defaults).
    client_port = split_host_port(default_text("listen_client") or "")[1]
    peer_port = split_host_port(default_text("listen_peer") or "")[1]
    size = _CLUSTER_SIZE
    cluster = subparsers.add_parser(
        "cluster",
        help="run a local three-node cluster in the foreground",
        description=f"{size} nodes on 127.0.0.1 (client ports {client_port}-"
        f"{client_port + size - 1}, peer ports {peer_port}-{peer_port + size - 1}); restarts "
        "a node that dies; Ctrl-C stops all.",
    )
    cluster.add_argument("--data-dir", default="data", help="base directory (default %(default)s)")
    cluster.add_argument("--size", type=int, default=size, help="number of nodes (default %(default)s)")
    cluster.add_argument(
        "--client-port", type=int, default=client_port, help="first client port (default %(default)s)"
    )
    cluster.add_argument(
        "--peer-port", type=int, default=peer_port, help="first peer port (default %(default)s)"
    )
    cluster.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for every node")
    cluster.set_defaults(handler=_cluster)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except (ValueError, OSError) as exc:
        print(f"kvstore serve: bad configuration: {exc}", file=sys.stderr)
        return 2
    from kvstore.server.node import run_node

    return run_node(config)


def _cluster(args: argparse.Namespace) -> int:
    from kvstore.server.localcluster import LocalCluster

    extra = [a for a in args.extra if a != "--"]
    cluster = LocalCluster(
        Path(args.data_dir),
        args.size,
        extra_args=extra,
        client_ports=[args.client_port + i for i in range(args.size)],
        peer_ports=[args.peer_port + i for i in range(args.size)],
    )
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster.start()
    print(f"kvstore cluster: {args.size} nodes, data under {Path(args.data_dir).resolve()}")
    for node_id in cluster.ids:
        print(
            f"  node {node_id}: {cluster.client_url(node_id)}  peer 127.0.0.1:"
            f"{cluster.peer_ports[node_id]}  log {cluster.log_path(node_id)}"
        )
    print(f"try: curl -L -X PUT --data hello {cluster.client_url(1)}/v1/kv/greeting")
    print("Ctrl-C stops all nodes.", flush=True)
    try:
        _supervise(cluster, lambda: stopping)
    finally:
        print("kvstore cluster: stopping all nodes", flush=True)
        cluster.stop()
    return 0


def _supervise(cluster: Any, stopping: Any) -> None:
    died_at: dict[int, float] = {}
    while not stopping():
        for node_id in cluster.ids:
            if cluster.pid(node_id) is not None:
                continue
            now = time.monotonic()
            if node_id not in died_at:
                code = cluster.returncode(node_id)
                print(
                    f"kvstore cluster: node {node_id} exited (status {code}); restarting",
                    flush=True,
                )
                died_at[node_id] = now
            elif now - died_at[node_id] >= _RESTART_DELAY_S:
                del died_at[node_id]
                cluster.start_node(node_id)
        time.sleep(0.2)
