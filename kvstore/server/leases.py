"""The leader's side of leases: its expiry clock, keepalives, and revoking what expired.

The replicated lease table is kvstore.kv.leases.LeaseTable; this module owns the node's
`LeaseKeeper` (when each lease expires, by this process's monotonic clock) and keeps it in
step with the driver: a node that becomes leader gives every lease a full TTL from then
(`promote`), one that stops leading forgets every deadline, and grants and revocations are
noted as they are applied. `run` looks for expired leases every `lease_check_interval_ms`
and proposes their `LeaseRevoke` through the log with a server-made request id, like any
write; only the leader does (replicas never expire anything on their own clock).

A keepalive is served by the leader only, after a ReadIndex round confirmed it still leads:
an acknowledged keepalive therefore happened before any later leader was elected, and that
leader's full TTL from its election runs past the keepalive's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from kvstore.errors import KVStoreError, NoLeaderError, NotFoundError
from kvstore.kv.leases import LeaseGrant, LeaseKeeper, LeaseRevoke
from kvstore.raft.types import Role
from kvstore.replica import Applied
from kvstore.server.driver import Driver

logger = logging.getLogger("kvstore.server")


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class LeaseService:
    """The node's lease keeper, wired to its driver; see the module docstring."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.keeper = LeaseKeeper()
        self._interval_s = driver.config.lease_check_interval_ms / 1000
        self._retry_ms = driver.config.request_timeout_ms
        driver.apply_listeners.append(self._on_applied)
        driver.role_listeners.append(self._on_role)
        self.expired_count = 0

    def _on_role(self, role: Role) -> None:
        if role is Role.LEADER:
            self.keeper.promote(self.driver.replica.state_machine.leases, _now_ms())
            logger.info(
                "event=leases_promoted leases=%d", len(self.driver.replica.state_machine.leases)
            )
        else:
            self.keeper.demote()

    def _on_applied(self, applied: Sequence[Applied]) -> None:
        for item in applied:
            command, result = item.command, item.result
            if result is None or not result.ok:
                continue
            if isinstance(command, LeaseGrant):
                self.keeper.granted(result.lease_id, command.ttl_ms, _now_ms())
            elif isinstance(command, LeaseRevoke):
                self.keeper.revoked(command.lease_id)

    async def keepalive(self, lease_id: int) -> int:
        """Renew a lease on the leader; its TTL in ms. NotLeader/NoLeader when this node
        does not lead, NotFoundError when there is no such lease."""
        self.driver.check_writable()
        await self.driver.read_barrier()
        ttl = self.keeper.keepalive(lease_id, _now_ms())
        if ttl is not None:
            return ttl
        if lease_id not in self.driver.replica.state_machine.leases:
            raise NotFoundError(f"no such lease {lease_id}")
        if self.keeper.expiring(lease_id):
            raise NotFoundError(f"lease {lease_id} expired; its revocation is being applied")
        raise NoLeaderError("leadership moved during the keepalive; retry", retry_after_s=0.05)

    def remaining_ms(self, lease_id: int) -> int | None:
        return self.keeper.remaining_ms(lease_id, _now_ms())

    async def run(self) -> None:
        """Revoke expired leases while this node leads, until cancelled."""
        async with asyncio.TaskGroup() as group:
            while True:
                await asyncio.sleep(self._interval_s)
                for lease_id in self.keeper.expired(_now_ms(), self._retry_ms):
                    group.create_task(self._revoke(lease_id), name=f"lease-revoke-{lease_id}")

    async def _revoke(self, lease_id: int) -> None:
        driver = self.driver
        request_id, acked_below = driver.new_request_id()
        try:
            command = LeaseRevoke(
                lease_id, request_id, int(time.time() * 1000), acked_below, expired=True
            )
            result = await driver.write(command, request_id)
            if result.ok:
                self.expired_count += 1
                driver.metrics.leases_expired.inc()
                logger.info("event=lease_expired id=%d keys_deleted=%d", lease_id, result.deleted)
        except (KVStoreError, TimeoutError) as exc:
            # Lost leadership or overloaded: the next leader, or the next check, retries.
            logger.debug("event=lease_revoke_failed id=%d error=%r", lease_id, exc)
        finally:
            driver.release_request_id(request_id)
