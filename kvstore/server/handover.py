"""Handing leadership over on a graceful shutdown (Raft dissertation §3.10), seen from the
driver: the transfer itself is the core's (`RawNode.transfer_leadership`); what lives here is
what the server does around it.

- While `active`, a leader's writes in flight stay pending instead of failing when it steps
  down: the new leader commits them and this node still applies them.
- A request that reaches the node meanwhile is held until a leader other than this node is
  known (at most one election timeout), so its answer names the new leader (not_leader with
  its URL, which the client follows at once) instead of no_leader, which sends the client
  into back-off. The same hold serves a node that knows no leader at all (an election is
  under way: the leader's process died a few milliseconds ago), with or without a handover:
  its answer then names the winner, or it serves the request itself if it won (issue 15).
- A transfer that fails or times out resets `active`, so the node answers as any leader
  again.

Everything here runs on the driver's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from kvstore.raft.types import NONE, Role
from kvstore.server.pending import resolve_all

# How often `run` looks whether the transfer has happened.
_POLL_S = 0.002


class Handover:
    """The server's side of a leadership transfer; see the module docstring."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        node_id: int,
        election_timeout_s: float,
        leadership: Callable[[], tuple[Role, int]],
    ) -> None:
        self._loop = loop
        self._node_id = node_id
        self._election_timeout_s = election_timeout_s
        # (role, leader id) as the driver last learned them from a Ready.
        self._leadership = leadership
        self.active = False
        # Requests held until a leader is known (`wait_for_leader`).
        self.waiters: list[asyncio.Future[None]] = []

    def _other_leader_known(self) -> bool:
        return self._leadership()[1] not in (NONE, self._node_id)

    def leader_pending(self) -> bool:
        """No request can be served here now, but a leader is about to be known: a handover
        is under way and no other leader is known yet, or no leader is known at all."""
        if self.active:
            return not self._other_leader_known()
        role, leader_id = self._leadership()
        return leader_id == NONE and role is not Role.LEADER

    async def wait_for_leader(self) -> None:
        """Hold a request while `leader_pending()`, until a leader is known or one election
        timeout has passed; at once when a leader is known."""
        deadline = self._loop.time() + self._election_timeout_s
        while self.leader_pending():
            left = deadline - self._loop.time()
            if left <= 0:
                return
            waiter: asyncio.Future[None] = self._loop.create_future()
            self.waiters.append(waiter)
            try:
                await asyncio.wait((waiter,), timeout=left)
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)

    def on_leader(self, leader_id: int) -> None:
        """The driver learned of leader `leader_id`: release the held requests, each of
        which looks again whether the leader it waits for is known."""
        if self.waiters and leader_id != NONE:
            waiters, self.waiters = self.waiters, []
            resolve_all(waiters)

    async def run(self, transfer: Awaitable[object], timeout_s: float) -> bool:
        """Start the transfer (`transfer`, run on the driver task) and wait up to
        `timeout_s` for another leader to be known; True if one is."""
        self.active = True
        succeeded = False
        try:
            await transfer
            deadline = self._loop.time() + timeout_s
            while self._loop.time() < deadline:
                role, _ = self._leadership()
                if role is not Role.LEADER and self._other_leader_known():
                    succeeded = True
                    return True
                await asyncio.sleep(_POLL_S)
            return False
        finally:
            if not succeeded:
                self.active = False
