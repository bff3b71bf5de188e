"""Real local clusters for an application's own tests: `kvstore.testing`.

An application that embeds the client library tests against the real thing: three (or any
number of) `kvstore serve` processes on 127.0.0.1 with free ports and a temporary data
directory, stopped by PID when the test ends. Faults are one call away: kill a node
(SIGKILL), stop it gracefully (SIGTERM: a leader hands over first), pause it (SIGSTOP, a
frozen process whose sockets stay open), resume and restart it.

    from kvstore.testing import local_cluster

    def test_survives_the_leader_dying() -> None:
        with local_cluster(nodes=3) as cluster, cluster.sync_client() as kv:
            kv.put("job/1", b"queued")
            cluster.kill(cluster.leader())
            assert kv.get("job/1").value == b"queued"   # the client finds the new leader

With pytest, load the plugin once (`pytest_plugins = ["kvstore.testing"]` in conftest.py)
and ask for the `kvstore_cluster` fixture: a fresh three-node cluster per test, its node logs
kept in the test's `tmp_path`. Starting a cluster takes about a second; a module- or
session-scoped fixture of your own (`with local_cluster() as cluster: yield cluster`) shares
one among many tests.

Everything here waits for conditions with deadlines (a leader agreed on by a majority, a
node answering), never for a fixed time.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from kvstore.client import Client, ClientConfig, SyncClient
from kvstore.server.localcluster import LocalCluster

__all__ = ["Cluster", "local_cluster"]

_START_TIMEOUT_S = 20.0


class Cluster:
    """A running local cluster: endpoints, clients, and faults by node id (1..nodes).

    Use it as a context manager (or call `start()` / `stop()`); `local_cluster()` and the
    `kvstore_cluster` fixture do that for you."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        data_dir: Path | str | None = None,
        node_args: Sequence[str] = (),
        cluster_id: str = "kvstore-test",
    ) -> None:
        """`data_dir`: where node data and logs go (default: a temporary directory removed
        by `stop()`; a directory you pass is kept, logs included). `node_args`: extra
        `kvstore serve` flags for every node, e.g. `["--request-timeout-ms", "2000"]`."""
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self._owned_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kvstore-test-"))
        self._local = LocalCluster(
            self.data_dir, nodes, extra_args=list(node_args), cluster_id=cluster_id
        )
        self.nodes: tuple[int, ...] = tuple(self._local.ids)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> Cluster:
        """Start every node and wait until a leader is elected."""
        self._local.start()
        try:
            self.wait_for_leader(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node by PID (SIGTERM, then SIGKILL) and remove a temporary data dir."""
        self._local.stop()
        if self._owned_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses and clients ---------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The client URLs of every node, for `Client(endpoints)`."""
        return list(self._local.client_urls)

    def url(self, node: int) -> str:
        return self._local.client_url(node)

    def client(self, *, config: ClientConfig | None = None, **kwargs: Any) -> Client:
        """An asyncio `Client` for every node (use it with `async with`)."""
        return Client(self.endpoints, config=config, **kwargs)

    def sync_client(self, *, config: ClientConfig | None = None, **kwargs: Any) -> SyncClient:
        """A blocking `SyncClient` for every node (use it with `with`)."""
        return SyncClient(self.endpoints, config=config, **kwargs)

    def log(self, node: int) -> Path:
        """The node's log file (stdout and stderr)."""
        return self._local.log_path(node)

    # --- observing ---------------------------------------------------------------------

    def leader(self, timeout_s: float = 10.0) -> int:
        """The id of the leader a majority agrees on, waiting for one up to `timeout_s`."""
        return self.wait_for_leader(timeout_s)

    def wait_for_leader(self, timeout_s: float = 10.0, *, other_than: int | None = None) -> int:
        """Wait until a majority agrees on a leader (not `other_than`); TimeoutError else."""
        exclude = () if other_than is None else (other_than,)
        return self._local.wait_for_leader(timeout_s, exclude=exclude)

    def running(self) -> list[int]:
        """The nodes whose process is alive (paused ones included)."""
        return self._local.running()

    def status(self, node: int) -> dict[str, Any] | None:
        """The node's /v1/status document, or None when it does not answer within 1 s."""
        return self._local.status(node)

    def pid(self, node: int) -> int | None:
        return self._local.pid(node)

    # --- faults ------------------------------------------------------------------------

    def kill(self, node: int) -> None:
        """SIGKILL: the process dies at once, as in a crash (what was fsynced survives)."""
        self._local.kill(node)

    def terminate(self, node: int, timeout_s: float = 10.0) -> int:
        """SIGTERM: a graceful stop (a leader hands over first); returns the exit status."""
        return self._local.terminate(node, timeout_s)

    def pause(self, node: int) -> None:
        """SIGSTOP: the process freezes with its sockets open (a hung machine)."""
        self._local.pause(node)

    def resume(self, node: int) -> None:
        """SIGCONT after `pause`."""
        self._local.resume(node)

    @contextmanager
    def paused(self, node: int) -> Iterator[None]:
        """Pause the node for the duration of a `with` block."""
        self.pause(node)
        try:
            yield
        finally:
            self.resume(node)

    def restart(self, node: int, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Start a node that was killed or terminated (it keeps its data directory), and
        wait until it answers /v1/status."""
        if self._local.pid(node) is not None:
            raise RuntimeError(f"node {node} is running; kill or terminate it first")
        self._local.start_node(node)
        self._local.wait_until(
            lambda: self._local.status(node) is not None, timeout_s, f"node {node} answering"
        )


@contextmanager
def local_cluster(
    nodes: int = 3,
    *,
    data_dir: Path | str | None = None,
    node_args: Sequence[str] = (),
) -> Iterator[Cluster]:
    """A started `Cluster`, stopped when the block ends (even on an exception)."""
    with Cluster(nodes, data_dir=data_dir, node_args=node_args) as cluster:
        yield cluster


try:
    import pytest
except ImportError:  # pytest is only needed for the fixture
    pass
else:

    @pytest.fixture
    def kvstore_cluster(tmp_path: Path) -> Iterator[Cluster]:
        """A fresh three-node cluster for one test; node logs stay in `tmp_path`."""
        with local_cluster(3, data_dir=tmp_path / "kvstore") as cluster:
            yield cluster

    __all__ += ["kvstore_cluster"]
