"""LocalCluster: real `python -m kvstore serve` processes on 127.0.0.1, for tests, benchmarks,
chaos drills and `kvstore cluster`.

Every process is started by this class and stopped by its PID (never by name). Ports are free
ports found by binding port 0, unless the caller fixes them (`kvstore cluster` uses
7001-7003 and 7101-7103). Each node logs to `<base_dir>/node<id>.log` and keeps its data in
`<base_dir>/node<id>`.

`peer_addresses` lets chaos tooling put proxies between peers: either one map {peer id:
"host:port"} used by every node, or one map per source node {node id: {peer id: "host:port"}}
(the address node i dials for peer j). A node's own entry is always its real listen address.

Waiting is done by polling a condition with a deadline; nothing here sleeps to decide.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[2]
# Never through an HTTP proxy from the environment: the nodes are on 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A node started with `--parent-pipe-fd` stops (as on SIGINT) when it reads end-of-file on
# that pipe, and is killed if it has not stopped this long after.
_PARENT_GONE_KILL_S = 15.0


def exit_when_pipe_closes(fd: int) -> None:
    """In a node: watch the read end `fd` of a pipe whose write end only the parent holds.
    End-of-file means the parent process is gone (however it died: the kernel closes its
    descriptors), so the node stops as on SIGINT, and is killed if it has not stopped within
    _PARENT_GONE_KILL_S. A daemon thread, blocked in read(), so it costs nothing until then.

    Why not PR_SET_PDEATHSIG: Linux sends that signal when the *thread* that forked the child
    exits, so a node started from a thread pool (`asyncio.to_thread`) died whenever the pool
    retired that worker, and one started without it outlived a killed test run.

    ValueError if `fd` is not an open pipe (checked here, before the node starts)."""
    try:
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError as exc:
        raise ValueError(f"parent pipe fd {fd}: {exc.strerror}") from None
    if not is_pipe:
        raise ValueError(f"parent pipe fd {fd} is not a pipe")

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 4096):
                pass
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(_PARENT_GONE_KILL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-pipe", daemon=True).start()


def popen_serve(
    command: Sequence[str], *, die_with_parent: bool = True, **popen_kwargs: Any
) -> tuple[subprocess.Popen[bytes], int | None]:
    """Start `command`, a `kvstore serve` command line (subprocess.Popen's keyword arguments
    pass through). With `die_with_parent` the node gets `--parent-pipe-fd` and the read end
    of a pipe whose write end only this process holds: the node stops when this process
    dies, however (exit_when_pipe_closes), or when the write end is closed. Returns the
    process and that write end (None without), which the caller closes once the process
    has exited."""
    if not die_with_parent:
        return subprocess.Popen(list(command), **popen_kwargs), None
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [*command, "--parent-pipe-fd", str(read_end)], pass_fds=(read_end,), **popen_kwargs
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return process, write_end


def _peer_maps(
    ids: Sequence[int],
    listen: Mapping[int, str],
    peer_addresses: Mapping[int, Any] | None,
) -> dict[int, dict[int, str]]:
    maps: dict[int, dict[int, str]] = {}
    for node in ids:
        if peer_addresses is None:
            chosen: Mapping[int, str] = listen
        elif all(isinstance(value, str) for value in peer_addresses.values()):
            chosen = peer_addresses
        else:
            chosen = peer_addresses.get(node, listen)
        maps[node] = {peer: chosen.get(peer, listen[peer]) for peer in ids}
        maps[node][node] = listen[node]
    return maps


class LocalCluster:
    """A cluster of node processes on this machine; a context manager (start/stop)."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        peer_addresses: Mapping[int, Any] | None = None,
        client_ports: Sequence[int] | None = None,
        peer_ports: Sequence[int] | None = None,
        cluster_id: str = "kvstore",
        cluster_secret: str | None = None,
        tls: bool = False,
        python: str = sys.executable,
        die_with_parent: bool = True,
    ) -> None:
        """`die_with_parent` (the default): each node stops when this process dies, even by
        SIGKILL, so a killed test run or supervisor leaves no node behind holding ports and
        data locks. Each node inherits the read end of a pipe whose write end only this
        process holds (`exit_when_pipe_closes`); it does not matter which thread starts it."""
        if size < 1:
            raise ValueError("size must be >= 1")
        self.base_dir = Path(base_dir)
        self.size = size
        self.ids = list(range(1, size + 1))
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cluster_id = cluster_id
        # Peers prove this secret in their handshake (kvstore/server/peerauth.py). It goes to
        # each node in a file readable by the owner only, never on the command line (ps).
        self.cluster_secret = cluster_secret or secrets.token_hex(32)
        # TLS on both ports with a development CA under <base_dir>/certs (`kvstore certs
        # init`'s files): https:// client URLs, mutual TLS between peers.
        self.tls = tls
        self.certs_dir = self.base_dir / "certs"
        self.python = python
        self.die_with_parent = die_with_parent
        client = list(client_ports) if client_ports else [free_port() for _ in self.ids]
        peer = list(peer_ports) if peer_ports else [free_port() for _ in self.ids]
        self.client_ports = dict(zip(self.ids, client))
        self.peer_ports = dict(zip(self.ids, peer))
        listen = {i: f"127.0.0.1:{self.peer_ports[i]}" for i in self.ids}
        self.peer_listen = listen
        self.peer_maps = _peer_maps(self.ids, listen, peer_addresses)
        self.client_urls = [self.client_url(i) for i in self.ids]
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, Any] = {}
        # The write end of each node's parent pipe (die_with_parent); closed once it is gone.
        self._parent_pipes: dict[int, int] = {}

    # --- context manager ------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses ------------------------------------------------------------------

    def client_url(self, node_id: int) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_ports[node_id]}"

    @property
    def ca_file(self) -> str:
        """The CA of the nodes' certificates ("" without TLS)."""
        return str(self.certs_dir / "ca.pem") if self.tls else ""

    def _ensure_certificates(self) -> None:
        if not self.tls or all(
            (self.certs_dir / f"node{i}.pem").exists() for i in self.ids
        ):
            return
        from kvstore.server.certs import init_pki

        init_pki(self.certs_dir, nodes=max(self.ids))

    def _opener(self) -> urllib.request.OpenerDirector:
        if not self.tls:
            return _OPENER
        context = ssl.create_default_context(cafile=self.ca_file)
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

    def data_dir(self, node_id: int) -> Path:
        return self.base_dir / f"node{node_id}"

    def log_path(self, node_id: int) -> Path:
        return self.base_dir / f"node{node_id}.log"

    @property
    def secret_path(self) -> Path:
        return self.base_dir / "cluster.secret"

    def _write_secret(self) -> None:
        """Write the secret file (owner-only) unless it already holds this secret."""
        path = self.secret_path
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8").strip() == self.cluster_secret:
                return
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(self.cluster_secret + "\n")

    def command(self, node_id: int) -> list[str]:
        peers = ",".join(f"{p}={a}" for p, a in sorted(self.peer_maps[node_id].items()))
        return [
            self.python,
            "-m",
            "kvstore",
            "serve",
            "--id",
            str(node_id),
            "--cluster-id",
            self.cluster_id,
            "--cluster-secret-file",
            str(self.secret_path),
            "--listen-client",
            f"127.0.0.1:{self.client_ports[node_id]}",
            "--listen-peer",
            self.peer_listen[node_id],
            "--peers",
            peers,
            "--data-dir",
            str(self.data_dir(node_id)),
            *self._tls_args(node_id),
            *self.extra_args,
        ]

    def _tls_args(self, node_id: int) -> list[str]:
        if not self.tls:
            return []
        from kvstore.server.certs import node_tls_args

        return node_tls_args(self.certs_dir, node_id)

    # --- processes ------------------------------------------------------------------

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for node_id in self.ids:
            self.start_node(node_id)

    def start_node(self, node_id: int) -> None:
        if self.pid(node_id) is not None:
            raise RuntimeError(f"node {node_id} is already running")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._write_secret()
        self._ensure_certificates()
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        old = self._logs.pop(node_id, None)
        if old is not None:
            old.close()
        log = open(self.log_path(node_id), "ab")  # noqa: SIM115 - closed in stop()/restart
        self._logs[node_id] = log
        self._close_parent_pipe(node_id)
        process, write_end = popen_serve(
            self.command(node_id),
            die_with_parent=self.die_with_parent,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._processes[node_id] = process
        if write_end is not None:
            self._parent_pipes[node_id] = write_end

    def _close_parent_pipe(self, node_id: int) -> None:
        """Close the write end of a node's parent pipe (its process has exited)."""
        write_end = self._parent_pipes.pop(node_id, None)
        if write_end is not None:
            os.close(write_end)

    def pid(self, node_id: int) -> int | None:
        process = self._processes.get(node_id)
        if process is None or process.poll() is not None:
            return None
        return process.pid

    def returncode(self, node_id: int) -> int | None:
        process = self._processes.get(node_id)
        return None if process is None else process.poll()

    def running(self) -> list[int]:
        return [i for i in self.ids if self.pid(i) is not None]

    def kill(self, node_id: int) -> None:
        """SIGKILL the node and wait for it to exit."""
        process = self._processes.get(node_id)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait()
        self._close_parent_pipe(node_id)

    def terminate(self, node_id: int, timeout_s: float = 10.0) -> int:
        """SIGTERM (graceful: a leader hands over first), wait; SIGKILL after timeout_s."""
        return self.stop_node(node_id, signal.SIGTERM, timeout_s)

    def stop_node(self, node_id: int, signum: int, timeout_s: float = 10.0) -> int:
        """Send `signum` (SIGTERM: a leader hands over first; SIGINT: it does not), wait for
        the exit and return its status; SIGKILL after timeout_s."""
        process = self._processes.get(node_id)
        if process is None:
            raise RuntimeError(f"node {node_id} was never started")
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signum)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_parent_pipe(node_id)
        return int(process.returncode)

    def pause(self, node_id: int) -> None:
        process = self._processes[node_id]
        if process.poll() is None:
            process.send_signal(signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        process = self._processes[node_id]
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every process this cluster started, by PID: `signum` (SIGTERM: a leader
        hands over first; SIGINT: every node stops at once, for stopping the whole cluster),
        then SIGKILL after 5 s."""
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signum)
        deadline = time.monotonic() + 5.0
        for process in self._processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for node_id in list(self._parent_pipes):
            self._close_parent_pipe(node_id)
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    # --- observing ------------------------------------------------------------------

    def status(self, node_id: int, timeout_s: float = 1.0) -> dict[str, Any] | None:
        """GET /v1/status of a node, or None when it does not answer."""
        if self.pid(node_id) is None:
            return None
        try:
            url = self.client_url(node_id) + "/v1/status"
            with self._opener().open(url, timeout=timeout_s) as response:
                document: dict[str, Any] = json.loads(response.read())
                return document
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def leader(self, exclude: Iterable[int] = ()) -> int | None:
        """The leader (its slot here: node<slot>) that a majority of the answering nodes
        agree on, or None. A slot whose data directory was lost runs under a new member id
        (docs/operations.md, Replacing a lost disk): the nodes name the leader by that id."""
        excluded = set(exclude)
        statuses = {i: self.status(i, timeout_s=0.5) for i in self.running()}
        answers = {i: s for i, s in statuses.items() if s is not None}
        for node_id, status in answers.items():
            if status["role"] != "leader" or node_id in excluded:
                continue
            agreeing = sum(
                1
                for other in answers.values()
                if other["leader_id"] == status["id"] and other["term"] == status["term"]
            )
            if agreeing * 2 > self.size:
                return node_id
        return None

    def wait_for_leader(self, timeout_s: float = 10.0, exclude: Iterable[int] = ()) -> int:
        """Poll until a leader (not in `exclude`) is agreed on; TimeoutError otherwise."""
        excluded = tuple(exclude)
        deadline = time.monotonic() + timeout_s
        while True:
            leader = self.leader(excluded)
            if leader is not None:
                return leader
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader within {timeout_s} s; logs in {self.base_dir}")
            time.sleep(0.02)

    def wait_until(self, condition: Any, timeout_s: float = 10.0, what: str = "condition") -> Any:
        """Poll `condition()` until it returns a truthy value; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout_s} s")
            time.sleep(0.01)
