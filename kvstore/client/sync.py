"""`SyncClient`: the Client's API for code without an event loop.

Each SyncClient owns a private event loop running in a daemon thread ("kvstore-client-N");
every method hands its coroutine to that loop (`run_coroutine_threadsafe`) and blocks the
calling thread until the answer. So it works from plain synchronous code, from several
threads at once (all calls funnel into the one loop, which owns the Client and its pooled
session), and even from inside another event loop's thread (it blocks that loop, as any
synchronous call would). `close()` closes the session, stops the loop and joins the thread;
`with SyncClient([...]) as kv:` does it for you.

`SyncLease`, `SyncLock` and `SyncElection` are `Lease`, `Lock` and `Election`
(kvstore/client/lease.py, recipes.py) for the same code: the async object lives on the
SyncClient's loop (its keepalives run there, in the background, while the calling thread
does something else), and each method runs the async one there and blocks until it is done.
The waits that may be long (`acquire`, `campaign`, `wait_lost`) take a `timeout_s`; a wait
that times out or is interrupted (Ctrl-C) is cancelled on the loop too, so a candidate that
gave up leaves the queue instead of taking the lock later behind the caller's back.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections.abc import AsyncGenerator, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from kvstore.client.config import ClientConfig, Consistency
from kvstore.client.core import Client
from kvstore.client.lease import Lease, OnLost
from kvstore.client.recipes import Election, Lock
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
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # The caller stopped waiting (KeyboardInterrupt): stop the work on the loop too.
            future.cancel()
            raise

    def _run_within(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        """`_run`, cancelled on the loop after `timeout_s` (TimeoutError); None: no bound."""
        if timeout_s is None:
            return self._run(coroutine)
        return self._run(asyncio.wait_for(coroutine, timeout_s))

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

    def lease(self, ttl_s: float, *, on_lost: OnLost | None = None) -> SyncLease:
        """A lease kept alive in the background: `with kv.lease(5) as lease:` (SyncLease).
        `on_lost(reason)` runs on this client's loop thread: it must not call the client."""
        return SyncLease(self, self._client.lease(ttl_s, on_lost=on_lost))

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


class SyncLease:
    """`Lease` for synchronous code (see the module docstring): `with kv.lease(5) as lease:`
    grants it, keeps it alive on the client's loop every `ttl_s / 3`, and revokes it at the
    end. `lost` (a bool here), `wait_lost()`, `remaining_s()` and `check()` mean what they
    mean on `Lease`."""

    def __init__(self, client: SyncClient, lease: Lease) -> None:
        self._client = client
        self._lease = lease

    @property
    def id(self) -> int:
        return self._lease.id

    @property
    def ttl_s(self) -> float:
        return self._lease.ttl_s

    @property
    def lost(self) -> bool:
        """True once the lease is lost or was revoked (no longer certainly held)."""
        return self._lease.lost.is_set()

    @property
    def lost_reason(self) -> str:
        return self._lease.lost_reason

    @property
    def keepalives(self) -> int:
        """Keepalives acknowledged so far."""
        return self._lease.keepalives

    def grant(self) -> None:
        """Grant the lease and start the keepalives (`with` does it)."""
        self._client._run(self._lease.grant())

    def close(self) -> None:
        """Stop the keepalives and revoke the lease (best effort; `with` does it)."""
        self._client._run(self._lease.close())

    def remaining_s(self) -> float:
        """How long the lease is certainly still held, by the client's clock (0: lost)."""
        return self._lease.remaining_s()

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is certainly still held."""

        async def check() -> None:
            self._lease.check()

        self._client._run(check())

    def wait_lost(self, timeout_s: float | None = None) -> bool:
        """Block until the lease is lost (True) or `timeout_s` passes (False)."""
        try:
            self._client._run_within(self._lease.lost.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def __enter__(self) -> SyncLease:
        self.grant()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncLock:
    """`Lock` for synchronous code: `with SyncLock(kv, "jobs/cleanup") as token: ...`.

    `acquire(timeout_s=None)` blocks until the lock is held and returns the fencing token
    (TimeoutError after `timeout_s`, having left the queue); `release()`; `lease` is the
    SyncLease that holds it (`lock.lease.check()` before acting on the resource)."""

    def __init__(self, client: SyncClient, name: str, *, ttl_s: float = 10.0) -> None:
        self._client = client
        self._lock = Lock(client.client, name, ttl_s=ttl_s)

    @property
    def token(self) -> int:
        """The fencing token while held (0 when not)."""
        return self._lock.token

    @property
    def lease(self) -> SyncLease:
        return SyncLease(self._client, self._lock.lease)

    def acquire(self, *, timeout_s: float | None = None) -> int:
        return self._client._run_within(self._lock.acquire(), timeout_s)

    def release(self) -> None:
        self._client._run(self._lock.release())

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class SyncElection:
    """`Election` for synchronous code: `campaign(value, timeout_s=None)` blocks until this
    candidate leads and returns the term's fencing token (TimeoutError after `timeout_s`,
    having left the queue), `resign()`, `leader()`, and `observe()`, a blocking iterator of
    the leader each time it changes (close it, or leave the loop, to stop)."""

    def __init__(self, client: SyncClient, name: str, *, ttl_s: float = 10.0) -> None:
        self._client = client
        self._election = Election(client.client, name, ttl_s=ttl_s)

    @property
    def lease(self) -> SyncLease:
        return SyncLease(self._client, self._election.lease)

    def campaign(self, value: bytes | str, *, timeout_s: float | None = None) -> int:
        return self._client._run_within(self._election.campaign(value), timeout_s)

    def resign(self) -> None:
        self._client._run(self._election.resign())

    def leader(self) -> KeyValue | None:
        return self._client._run(self._election.leader())

    def observe(self) -> Iterator[KeyValue | None]:
        observed = cast(AsyncGenerator[KeyValue | None, None], self._election.observe())

        async def step() -> tuple[KeyValue | None] | None:
            try:
                return (await anext(observed),)
            except StopAsyncIteration:
                return None

        try:
            while (item := self._client._run(step())) is not None:
                yield item[0]
        finally:
            self._client._run(observed.aclose())
