"""The `kvstore serve` and `kvstore cluster` subcommands.

`serve` runs one node (configuration: flags > KVSTORE_* environment > TOML file > defaults;
see kvstore/server/config.py). `cluster` runs a local three-node cluster in the foreground,
like a small supervisor (`_Supervisor`): client ports 7001-7003, peer ports 7101-7103, data
under ./data; it refuses to start when a port is taken, prints each node's PID and the leader once
one is elected, restarts a node that crashes (with back-off), leaves down a node stopped on
purpose or one a restart cannot fix, and stops all of them on Ctrl-C, SIGTERM or SIGHUP
(closing the terminal), or when it is killed itself (each node watches a pipe from its parent:
kvstore/server/localcluster.py).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from kvstore.server.config import add_arguments, default_text, load_config
from kvstore.server.discovery import split_host_port

_RESTART_DELAY_S = 1.0
_RESTART_DELAY_MAX_S = 30.0
# A node that ran this long before dying starts its back-off over.
_STABLE_S = 30.0
_CLUSTER_SIZE = 3


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run one node",
        description="Run one kvstore node. Every flag is also a KVSTORE_* environment "
        "variable and a key of the --config TOML file.",
    )
    add_arguments(serve)
    serve.add_argument(
        "--parent-pipe-fd",
        type=int,
        metavar="FD",
        help="stop (as on SIGINT) when this inherited pipe descriptor reaches end-of-file, "
        "i.e. when the supervisor holding its write end dies (`kvstore cluster` and test "
        "clusters pass it); not a configuration option",
    )
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
    cluster.add_argument(
        "--nodes", "--size", dest="size", type=_node_count, default=size,
        help="number of nodes, 1 to 9 (default %(default)s)",
    )  # fmt: skip
    cluster.add_argument(
        "--client-port", type=int, default=client_port, help="first client port (default %(default)s)"
    )
    cluster.add_argument(
        "--peer-port", type=int, default=peer_port, help="first peer port (default %(default)s)"
    )
    cluster.add_argument(
        "--tls",
        action="store_true",
        help="TLS on both ports with a development CA under DATA_DIR/certs (kvstore certs init); "
        "clients need --ca DATA_DIR/certs/ca.pem",
    )
    cluster.add_argument(
        "--restore",
        metavar="FILE",
        help="start a new cluster from a snapshot saved by `kvstore snapshot save` (every "
        "node's data directory must be absent or empty)",
    )
    cluster.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for every node")
    cluster.set_defaults(handler=_cluster)

    secret = subparsers.add_parser(
        "secret",
        help="print a new random cluster secret",
        description="Print a new cluster secret (32 random bytes, hex) for --cluster-secret-file: "
        "`kvstore secret > cluster.secret`, then the same file on every node.",
    )
    secret.set_defaults(handler=_print_secret)

    certs = subparsers.add_parser(
        "certs", help="development certificates", description="Development certificates."
    )
    certs_commands = certs.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)
    init = certs_commands.add_parser(
        "init",
        help="make a development CA and node and client certificates",
        description="Write a development CA (reused if DIR already has one), node<N>.pem for "
        "nodes 1..N (URI SAN urn:kvstore:node:<N>, localhost, 127.0.0.1, ::1 and every --host) "
        "and client-<NAME>.pem for every --client, with their keys (mode 0600). For "
        "development and tests; production certificates come from your CA or cert-manager.",
    )
    init.add_argument("--dir", default="certs", help="output directory (default %(default)s)")
    init.add_argument("--nodes", type=_node_count, default=size, help="node certificates 1..N")
    init.add_argument(
        "--host", action="append", default=[], help="another DNS name or IP in node certificates"
    )
    init.add_argument(
        "--client", action="append", default=None, help="a client certificate for NAME (default admin)"
    )
    init.add_argument("--days", type=int, default=365, help="validity (default %(default)s)")
    init.set_defaults(handler=_certs_init)


def _certs_init(args: argparse.Namespace) -> int:
    from kvstore.server.certs import init_pki

    written = init_pki(
        Path(args.dir),
        nodes=args.nodes,
        hosts=args.host,
        clients=args.client or ["admin"],
        days=args.days,
    )
    for path in written:
        print(path)
    return 0


def _print_secret(args: argparse.Namespace) -> int:
    print(secrets.token_hex(32))
    return 0


def _node_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= count <= 9:
        raise argparse.ArgumentTypeError(f"{count}: a local cluster has 1 to 9 nodes")
    return count


def _serve(args: argparse.Namespace) -> int:
    from kvstore.server.localcluster import exit_when_pipe_closes

    try:
        config = load_config(args)
        if args.parent_pipe_fd is not None:
            exit_when_pipe_closes(args.parent_pipe_fd)
    except (ValueError, OSError) as exc:
        print(f"kvstore serve: bad configuration: {exc}", file=sys.stderr)
        return 2
    from kvstore.server.node import run_node

    return run_node(config)


def _cluster(args: argparse.Namespace) -> int:
    from kvstore.server.localcluster import LocalCluster

    extra = [a for a in args.extra if a != "--"]
    client_ports = [args.client_port + i for i in range(args.size)]
    peer_ports = [args.peer_port + i for i in range(args.size)]
    busy = _busy_ports([*client_ports, *peer_ports])
    if busy:
        print(
            f"kvstore cluster: 127.0.0.1:{busy[0]} is already in use (is another `kvstore "
            "cluster` running? stop it, or choose --client-port and --peer-port)",
            file=sys.stderr,
        )
        return 2
    cluster = LocalCluster(
        Path(args.data_dir),
        args.size,
        extra_args=extra,
        client_ports=client_ports,
        peer_ports=peer_ports,
        tls=args.tls,
    )
    if args.restore and not _restore_cluster(cluster, args.restore):
        return 2
    supervisor = _Supervisor(cluster)
    # SIGHUP too: closing the terminal must not leave the nodes running.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, supervisor.on_stop_signal)
    signal.signal(signal.SIGUSR1, supervisor.on_restart_signal)
    cluster.start()
    print(f"kvstore cluster: {args.size} nodes, data under {Path(args.data_dir).resolve()}")
    for node_id in cluster.ids:
        print(
            f"  node {node_id}: {cluster.client_url(node_id)}  peer 127.0.0.1:"
            f"{cluster.peer_ports[node_id]}  pid {cluster.pid(node_id)}  "
            f"log {cluster.log_path(node_id)}"
        )
    if cluster.tls:
        print(
            f"try: curl --cacert {cluster.ca_file} -L -X PUT --data hello "
            f"{cluster.client_url(1)}/v1/kv/greeting\n"
            f"     kvstore status --ca {cluster.ca_file} --endpoints "
            f"{','.join(cluster.client_urls)}"
        )
    else:
        print(f"try: curl -L -X PUT --data hello {cluster.client_url(1)}/v1/kv/greeting")
    print(
        f"Ctrl-C stops all nodes; a node stopped with SIGTERM stays down until "
        f"`kill -USR1 {os.getpid()}`.",
        flush=True,
    )
    try:
        supervisor.run()
    finally:
        print("kvstore cluster: stopping all nodes", flush=True)
        # The whole cluster stops: SIGINT, so no leader waits to hand over to nodes that are
        # stopping too.
        cluster.stop(signal.SIGINT)
    return 0


def _restore_cluster(cluster: Any, snapshot_file: str) -> bool:
    """Make every node's data directory from the snapshot, all with this cluster's ids as
    the members (kvstore/server/backup.py); False (and why, on stderr) if any fails."""
    from kvstore.errors import KVStoreError
    from kvstore.server.backup import restore_data_dir

    for node_id in cluster.ids:
        try:
            snapshot = restore_data_dir(
                snapshot_file, str(cluster.data_dir(node_id)), tuple(cluster.ids)
            )
        except (KVStoreError, ValueError, OSError) as exc:
            print(f"kvstore cluster: cannot restore node {node_id}: {exc}", file=sys.stderr)
            return False
    metadata = snapshot.metadata
    print(f"kvstore cluster: restored {snapshot_file} (index {metadata.index}) into every node")
    return True


def _busy_ports(ports: list[int]) -> list[int]:
    busy = []
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


class _Supervisor:
    """Keeps the local cluster's nodes running, like a small systemd.

    A node that exits with status 0 was stopped on purpose (SIGTERM): it stays down until
    SIGUSR1. Status 2 (a damaged or locked data directory, a bad setting) cannot be fixed by
    a restart: the node stays down and the reason is printed from its log. Anything else
    (a crash, SIGKILL) is restarted after a back-off that doubles from 1 s to 30 s while the
    node keeps dying within 30 s of its start."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.stopping = False
        self._restart_stopped = False
        self._down: set[int] = set()  # stays down until SIGUSR1
        self._restart_at: dict[int, float] = {}
        self._delay_s = dict.fromkeys(cluster.ids, _RESTART_DELAY_S)
        self._started_at = dict.fromkeys(cluster.ids, time.monotonic())
        self._leader: int | None = None

    def on_stop_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def on_restart_signal(self, signum: int, frame: object) -> None:
        self._restart_stopped = True

    def run(self) -> None:
        while not self.stopping:
            if self._restart_stopped:
                self._restart_stopped = False
                for node_id in sorted(self._down):
                    self._start(node_id)
                self._down.clear()
            for node_id in self.cluster.ids:
                if node_id not in self._down and self.cluster.pid(node_id) is None:
                    self._tend_exited(node_id)
            self._report_leader()
            time.sleep(0.2)

    def _start(self, node_id: int) -> None:
        self.cluster.start_node(node_id)
        self._started_at[node_id] = time.monotonic()
        print(
            f"kvstore cluster: node {node_id} started, pid {self.cluster.pid(node_id)}", flush=True
        )

    def _tend_exited(self, node_id: int) -> None:
        now = time.monotonic()
        restart_at = self._restart_at.get(node_id)
        if restart_at is not None:
            if now >= restart_at:
                del self._restart_at[node_id]
                self._start(node_id)
            return
        code = self.cluster.returncode(node_id)
        self._leader = None
        if code == 0:
            self._down.add(node_id)
            print(
                f"kvstore cluster: node {node_id} stopped (status 0); it stays down until "
                f"`kill -USR1 {os.getpid()}`",
                flush=True,
            )
            return
        if code == 2:
            self._down.add(node_id)
            print(
                f"kvstore cluster: node {node_id} exited (status 2): a restart cannot fix "
                f"this; not restarting. {_last_error(self.cluster.log_path(node_id))}",
                flush=True,
            )
            return
        if now - self._started_at[node_id] > _STABLE_S:
            self._delay_s[node_id] = _RESTART_DELAY_S
        delay = self._delay_s[node_id]
        self._delay_s[node_id] = min(delay * 2, _RESTART_DELAY_MAX_S)
        self._restart_at[node_id] = now + delay
        print(
            f"kvstore cluster: node {node_id} exited (status {code}); restarting in {delay:g} s",
            flush=True,
        )

    def _report_leader(self) -> None:
        if self._leader is not None or len(self.cluster.running()) * 2 <= self.cluster.size:
            return
        leader = self.cluster.leader()
        if leader is not None:
            self._leader = leader
            print(
                f"kvstore cluster: ready: leader is node {leader} "
                f"({self.cluster.client_url(leader)})",
                flush=True,
            )


def _last_error(log_path: Path) -> str:
    """The node's own last words (`kvstore: ...` on stderr), for the supervisor's message."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"see {log_path}"
    for line in reversed(lines[-200:]):
        if line.startswith("kvstore"):
            return f"{line.strip()} (log {log_path})"
    return f"see {log_path}"
