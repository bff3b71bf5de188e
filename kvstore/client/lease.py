"""`Lease`: a lease kept alive in the background while the application holds it.

    async with kv.lease(ttl_s=5) as lease:
        await kv.put("services/me", b"10.0.0.7:80", lease=lease.id)
        await lease.lost.wait()      # or: lease.check() before acting on what it guards

The lease is granted on entry (through the log, exactly once), then a background task sends
a keepalive to the leader every `ttl_s / 3`. The server's rule (docs/api.md, Leases) is
that a lease never expires before its TTL after the last keepalive the leader acknowledged;
the client counts from when it *sent* that keepalive (earlier than the leader's
acknowledgement, so on the safe side). When no keepalive has been acknowledged for a TTL,
or the server answers that the lease is gone, the lease is *lost*: `lost` is set, the
`on_lost` callback (if any) runs once, and `check()` raises `LeaseLostError`. On exit the
keepalives stop and the lease is revoked (best effort: if that fails, it expires).

Time is the client's injected monotonic clock (`Client(clock=...)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from kvstore.errors import KVStoreError, LeaseLostError, NotFoundError

if TYPE_CHECKING:
    from kvstore.client.core import Client

log = logging.getLogger("kvstore.client")

OnLost = Callable[[str], None]


class Lease:
    """See the module docstring."""

    def __init__(
        self,
        client: Client,
        ttl_s: float,
        *,
        lease_id: int = 0,
        on_lost: OnLost | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if not 0.01 <= ttl_s <= 7 * 24 * 3600:
            raise ValueError("ttl_s must be between 0.01 and a week")
        self._client = client
        self.ttl_s = ttl_s
        self.id = lease_id
        self._on_lost = on_lost
        self._sleep = sleep or asyncio.sleep
        self.lost = asyncio.Event()
        self.lost_reason = ""
        # The client's clock when the newest acknowledged keepalive (or the grant) was sent.
        self.acknowledged_sent_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.keepalives = 0

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    async def __aenter__(self) -> Lease:
        await self.grant()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def grant(self) -> None:
        """Grant the lease and start the keepalives."""
        sent_at = self._client.clock()
        self.id = await self._client.lease_grant(self.ttl_ms, lease_id=self.id)
        self.acknowledged_sent_at = sent_at
        self._task = asyncio.get_running_loop().create_task(
            self._keep_alive(), name=f"kvstore-lease-{self.id}"
        )

    def remaining_s(self) -> float:
        """How long the lease is certainly still held, by the client's clock (0: lost)."""
        if self.lost.is_set():
            return 0.0
        return max(0.0, self.acknowledged_sent_at + self.ttl_s - self._client.clock())

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is certainly still held."""
        if self.remaining_s() <= 0:
            self._lose(self.lost_reason or "no keepalive acknowledged within the TTL")
            raise LeaseLostError(f"lease {self.id} lost: {self.lost_reason}")

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        log.warning("lease id=%d lost reason=%s", self.id, reason)
        if self._on_lost is not None:
            self._on_lost(reason)

    async def _keep_alive(self) -> None:
        interval = self.ttl_s / 3
        while not self.lost.is_set():
            await self._sleep(interval)
            left = self.remaining_s()
            if left <= 0:
                self._lose("no keepalive acknowledged within the TTL")
                return
            sent_at = self._client.clock()
            try:
                await self._client.lease_keepalive(self.id, timeout_s=max(0.01, left))
            except NotFoundError:
                self._lose("the lease expired or was revoked on the server")
                return
            except KVStoreError as exc:
                log.debug("lease id=%d keepalive failed: %r", self.id, exc)
                continue
            self.acknowledged_sent_at = max(self.acknowledged_sent_at, sent_at)
            self.keepalives += 1

    async def close(self) -> None:
        """Stop the keepalives and revoke the lease (best effort)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.id and not self.lost.is_set():
            try:
                await self._client.lease_revoke(self.id, timeout_s=min(2.0, self.ttl_s))
            except KVStoreError as exc:
                log.debug("lease id=%d revoke failed (it will expire): %r", self.id, exc)
            # The application let it go: no callback.
            self.lost_reason = "revoked"
            self.lost.set()
