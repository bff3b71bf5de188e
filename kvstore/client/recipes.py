"""Recipes built on leases, transactions and watches: `Lock` (with a fencing token) and
`Election`, in the manner of etcd's concurrency package.

Both queue candidates as keys under a name: each candidate creates `<name>/<lease id hex>`
attached to its own lease (a transaction that creates it only if absent), and the candidate
whose key has the lowest `create_revision` holds the lock (leads). The others each watch the
key just ahead of theirs for its deletion (no thundering herd), then look again. A holder
that dies stops its keepalives, its lease expires, the leader revokes it through the log,
and its key goes: the next in line takes over.

Fencing token: the holder's `create_revision`, which only grows from one holder to the next.
A lease can be lost while its holder still runs (a pause longer than the TTL), so a resource
guarded by the lock must refuse requests carrying a token lower than one it has seen; the
token is what makes a lock safe against such a stale holder (docs/client.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from kvstore.client.lease import Lease
from kvstore.client.txn import Compare, Op
from kvstore.client.watch import WatchEvent
from kvstore.errors import LeaseLostError

if TYPE_CHECKING:
    from kvstore.client.core import Client
    from kvstore.client.results import KeyValue


class _Queue:
    """A candidate's place under `name`: its lease, its key, its create_revision."""

    def __init__(self, client: Client, name: str, ttl_s: float) -> None:
        if not name or name.endswith("/"):
            raise ValueError("the name must be non-empty and not end with '/'")
        self.client = client
        self.prefix = name + "/"
        self.ttl_s = ttl_s
        self.lease: Lease | None = None
        self.key = ""
        self.create_revision = 0

    async def join(self, value: bytes) -> None:
        lease = self.client.lease(self.ttl_s)
        await lease.grant()
        self.lease = lease
        self.key = f"{self.prefix}{lease.id:016x}"
        result = await self.client.txn(
            compare=[Compare.absent(self.key)],
            success=[Op.put(self.key, value, lease=lease.id), Op.get(self.key)],
            failure=[Op.get(self.key)],
        )
        found = result.responses[-1].kvs
        if not found:
            raise LeaseLostError(f"{self.key} vanished as it was created (the lease expired)")
        self.create_revision = found[0].create_revision

    async def wait_first(self) -> None:
        """Until this candidate's key has the lowest create_revision under the prefix."""
        assert self.lease is not None
        while True:
            self.lease.check()
            listing = await self.client.list(self.prefix, limit=10_000)
            ahead = [kv for kv in listing if kv.create_revision < self.create_revision]
            if not any(kv.key == self.key for kv in listing):
                raise LeaseLostError(f"{self.key} is gone: the lease expired or was revoked")
            if not ahead:
                return
            last = max(ahead, key=lambda kv: kv.create_revision)
            await self._wait_deleted(last.key, listing.revision + 1)

    async def _wait_deleted(self, key: str, start_revision: int) -> None:
        assert self.lease is not None
        async with self.client.watch(key=key, start_revision=start_revision) as watch:
            lost = asyncio.ensure_future(self.lease.lost.wait())
            try:
                iterator = aiter(watch)
                while True:
                    step = asyncio.ensure_future(anext(iterator))
                    done, _ = await asyncio.wait((step, lost), return_when=asyncio.FIRST_COMPLETED)
                    if lost in done:
                        step.cancel()
                        self.lease.check()
                    event = step.result()
                    if isinstance(event, WatchEvent) and event.type == "delete":
                        return
            finally:
                lost.cancel()

    async def leave(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            await lease.close()  # revoking the lease deletes the key


class Lock:
    """A distributed lock: `async with Lock(kv, "jobs/cleanup") as token: ...`.

    `acquire()` returns the fencing token (see the module docstring); `lease` is the lease
    that holds it (check `lease.lost`, or call `lease.check()`, before acting on the
    resource)."""

    def __init__(self, client: Client, name: str, *, ttl_s: float = 10.0) -> None:
        self._queue = _Queue(client, name, ttl_s)
        self.token = 0

    @property
    def lease(self) -> Lease:
        assert self._queue.lease is not None, "the lock is not held"
        return self._queue.lease

    async def acquire(self) -> int:
        try:
            await self._queue.join(b"")
            await self._queue.wait_first()
        except BaseException:
            await self._queue.leave()
            raise
        self.token = self._queue.create_revision
        return self.token

    async def release(self) -> None:
        await self._queue.leave()
        self.token = 0

    async def __aenter__(self) -> int:
        return await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


class Election:
    """Leader election: `campaign(value)` returns once this candidate leads (its value is
    the leader's), `resign()` steps down, `leader()` reads the current leader,
    `observe()` yields the leader's value each time it changes."""

    def __init__(self, client: Client, name: str, *, ttl_s: float = 10.0) -> None:
        self._client = client
        self._name = name
        self._queue = _Queue(client, name, ttl_s)

    @property
    def lease(self) -> Lease:
        assert self._queue.lease is not None, "not campaigning"
        return self._queue.lease

    async def campaign(self, value: bytes | str) -> int:
        """Lead; returns the term's fencing token (the create_revision of our key)."""
        raw = value.encode() if isinstance(value, str) else value
        try:
            await self._queue.join(raw)
            await self._queue.wait_first()
        except BaseException:
            await self._queue.leave()
            raise
        return self._queue.create_revision

    async def resign(self) -> None:
        await self._queue.leave()

    async def leader(self) -> KeyValue | None:
        listing = await self._client.list(self._queue.prefix, limit=10_000)
        return min(listing, key=lambda kv: kv.create_revision, default=None)

    async def observe(self) -> AsyncIterator[KeyValue | None]:
        """The leader now, then each time it changes (None while there is none)."""
        current = await self._client.list(self._queue.prefix, limit=10_000)
        leader = min(current, key=lambda kv: kv.create_revision, default=None)
        yield leader
        async with self._client.watch(
            prefix=self._queue.prefix, start_revision=current.revision + 1
        ) as watch:
            async for _ in watch:
                now = await self.leader()
                if (now and now.key) != (leader and leader.key):
                    leader = now
                    yield leader
