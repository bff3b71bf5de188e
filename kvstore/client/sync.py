"""`SyncClient`: the Client's API for code without an event loop.

Each SyncClient owns a private event loop running in a daemon thread ("kvstore-client-N");
every method hands its coroutine to that loop (`run_coroutine_threadsafe`) and blocks the
calling thread until the answer. So it works from plain synchronous code, from several
threads at once (all calls funnel into the one loop, which owns the Client and its pooled
session), and even from inside another event loop's thread (it blocks that loop, as any
synchronous call would). `close()` closes the session, stops the loop and joins the thread;
`with SyncClient([...]) as kv:` does it for you.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from kvstore.client.config import ClientConfig, Consistency
from kvstore.client.core import Client
from kvstore.client.results import (
    ClientStats,
    DeleteResult,
    KeyValue,
    LeaseInfo,
    ListResult,
    NodeStatus,
    PutResult,
)
from kvstore.client.txn import Compare, Op, TxnResult
from kvstore.client.watch import WatchEvent, WatchProgress

T = TypeVar("T")

_thread_numbers = itertools.count(1)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Stop a SyncClient's loop and thread (close() or garbage collection)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=5.0)
    if not thread.is_alive() and not loop.is_closed():
        loop.close()


class SyncClient:
    """Same operations as `Client`, blocking; takes the same constructor arguments."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        config: ClientConfig | None = None,
        timeout_s: float | None = None,
        **client_kwargs: Any,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever,
            name=f"kvstore-client-{next(_thread_numbers)}",
            daemon=True,
        )
        self._thread.start()
        # If the owner forgets close(), at least the thread and loop do not outlive the object.
        self._finalizer = weakref.finalize(self, _stop_loop, self._loop, self._thread)
        self._closed = False

        async def make() -> Client:
            return Client(endpoints, config=config, timeout_s=timeout_s, **client_kwargs)

        try:
            self._client = self._run(make())
        except BaseException:
            self._finalizer()
            raise

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("SyncClient called from its own event loop thread (deadlock)")
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("this SyncClient is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session, stop the private loop and join its thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._client.close())
        finally:
            self._finalizer()

    @property
    def client(self) -> Client:
        """The underlying async Client (use only through this SyncClient's loop)."""
        return self._client

    @property
    def config(self) -> ClientConfig:
        return self._client.config

    @property
    def client_id(self) -> str:
        return self._client.client_id

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._client.endpoints

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    @property
    def leader_url(self) -> str | None:
        return self._client.leader_url

    def get(
        self,
        key: str,
        *,
        consistency: Consistency | str | None = None,
        revision: int | None = None,
        timeout_s: float | None = None,
    ) -> KeyValue:
        return self._run(
            self._client.get(key, consistency=consistency, revision=revision, timeout_s=timeout_s)
        )

    def put(
        self,
        key: str,
        value: bytes | str,
        *,
        if_revision: int | None = None,
        create_only: bool = False,
        lease: int = 0,
        timeout_s: float | None = None,
    ) -> PutResult:
        return self._run(
            self._client.put(
                key,
                value,
                if_revision=if_revision,
                create_only=create_only,
                lease=lease,
                timeout_s=timeout_s,
            )
        )

    def cas(
        self,
        key: str,
        value: bytes | str,
        *,
        mod_revision: int | None = None,
        create_only: bool = False,
        timeout_s: float | None = None,
    ) -> PutResult:
        return self._run(
            self._client.cas(
                key, value, mod_revision=mod_revision, create_only=create_only, timeout_s=timeout_s
            )
        )

    def delete(
        self, key: str, *, if_revision: int | None = None, timeout_s: float | None = None
    ) -> DeleteResult:
        return self._run(self._client.delete(key, if_revision=if_revision, timeout_s=timeout_s))

    def list(
        self,
        prefix: str = "",
        *,
        limit: int | None = None,
        start: str | None = None,
        revision: int | None = None,
        consistency: Consistency | str | None = None,
        timeout_s: float | None = None,
    ) -> ListResult:
        return self._run(
            self._client.list(
                prefix,
                limit=limit,
                start=start,
                revision=revision,
                consistency=consistency,
                timeout_s=timeout_s,
            )
        )

    def delete_prefix(self, prefix: str, *, timeout_s: float | None = None) -> DeleteResult:
        return self._run(self._client.delete_prefix(prefix, timeout_s=timeout_s))

    def txn(
        self,
        compare: Sequence[Compare | Mapping[str, object]] = (),
        success: Sequence[Op | Mapping[str, object]] = (),
        failure: Sequence[Op | Mapping[str, object]] = (),
        *,
        timeout_s: float | None = None,
    ) -> TxnResult:
        return self._run(self._client.txn(compare, success, failure, timeout_s=timeout_s))

    def compact(self, revision: int, *, timeout_s: float | None = None) -> int:
        return self._run(self._client.compact(revision, timeout_s=timeout_s))

    def lease_grant(self, ttl_ms: int, *, lease_id: int = 0, timeout_s: float | None = None) -> int:
        return self._run(self._client.lease_grant(ttl_ms, lease_id=lease_id, timeout_s=timeout_s))

    def lease_keepalive(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        return self._run(self._client.lease_keepalive(lease_id, timeout_s=timeout_s))

    def lease_revoke(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        return self._run(self._client.lease_revoke(lease_id, timeout_s=timeout_s))

    def leases(self, *, timeout_s: float | None = None) -> tuple[LeaseInfo, ...]:
        return self._run(self._client.leases(timeout_s=timeout_s))

    def members(self, *, timeout_s: float | None = None) -> dict[str, object]:
        return self._run(self._client.members(timeout_s=timeout_s))

    def add_member(
        self,
        name: str,
        peer_address: str,
        *,
        client_url: str = "",
        promote: bool = False,
        timeout_s: float | None = None,
    ) -> dict[str, object]:
        return self._run(
            self._client.add_member(
                name, peer_address, client_url=client_url, promote=promote, timeout_s=timeout_s
            )
        )

    def promote_member(self, member: int, *, timeout_s: float | None = None) -> dict[str, object]:
        return self._run(self._client.promote_member(member, timeout_s=timeout_s))

    def remove_member(self, member: int, *, timeout_s: float | None = None) -> dict[str, object]:
        return self._run(self._client.remove_member(member, timeout_s=timeout_s))

    def transfer_leader(self, to: int, *, timeout_s: float | None = None) -> int:
        return self._run(self._client.transfer_leader(to, timeout_s=timeout_s))

    def watch(
        self,
        *,
        key: str | None = None,
        prefix: str | None = None,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress: bool = False,
    ) -> Iterator[WatchEvent | WatchProgress]:
        """The async watch as a blocking iterator (close it, or leave the loop, to stop)."""
        watch = self._client.watch(
            key=key, prefix=prefix, start_revision=start_revision, prev_kv=prev_kv,
            progress=progress,
        )  # fmt: skip
        iterator = aiter(watch)

        async def step() -> WatchEvent | WatchProgress | None:
            try:
                return await anext(iterator)
            except StopAsyncIteration:
                return None

        try:
            while (item := self._run(step())) is not None:
                yield item
        finally:
            self._run(watch.close())

    def status(self, endpoint: str | None = None, *, timeout_s: float | None = None) -> NodeStatus:
        return self._run(self._client.status(endpoint, timeout_s=timeout_s))

    def cluster_status(self, *, timeout_s: float = 1.0) -> dict[str, NodeStatus | None]:
        return self._run(self._client.cluster_status(timeout_s=timeout_s))
