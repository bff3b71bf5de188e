"""Who leads, as the other nodes say: the client's way past a leader that stopped answering.

A leader that is frozen (SIGSTOP, a hung disk, a stalled VM) holds every request sent to it
until the attempt times out, while the survivors elect a new leader in about one election
timeout. `LeaderProbe` lets a waiting call notice that election: it asks every node
`GET /healthz` (cheap, and every answer of the API names the leader in `Kvstore-Leader`),
and `named_leader(besides=E)` returns as soon as a node other than `E` names a leader other
than `E`, or None once every node answered (or timed out) without doing so.

Rules that hold here:
- one round at a time per client, shared by all its waiting calls, and at most one round per
  `leader_probe_interval_s`: a client with hundreds of calls stuck on one node asks each
  other node about twenty times a second, not hundreds;
- every probe request is bounded (`_probe_timeout_s`), and its task is owned here: a round's
  tasks end by themselves within that bound, and `close()` cancels any still running;
- a probe never changes what a call sends: the caller decides (kvstore.client.core).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from kvstore.client.config import ClientConfig
from kvstore.client.transport import Transport, TransportError

Clock = Callable[[], float]


def normalize_url(url: str) -> str:
    """scheme://host:port without a trailing slash (http:// when no scheme is given)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


class LeaderProbe:
    """One client's rounds of "who leads?" asked of every node; see the module docstring."""

    def __init__(
        self, transport: Transport, endpoints: Sequence[str], config: ClientConfig, clock: Clock
    ) -> None:
        self._transport = transport
        self._endpoints = tuple(endpoints)
        self._interval_s = config.leader_probe_interval_s
        # Long enough for a live node on a busy machine, short enough not to matter when a
        # node is frozen (the round does not wait for it: see named_leader).
        self._probe_timeout_s = max(0.05, min(0.25, 2 * config.leader_probe_interval_s))
        self._clock = clock
        # The latest round: when it began, and per endpoint the leader it named ("" for none;
        # None when it did not answer).
        self._round_started = float("-inf")
        self._round: dict[str, asyncio.Task[str | None]] = {}
        # Every probe task still running (a round's may outlive the next round's start).
        self._tasks: set[asyncio.Task[str | None]] = set()
        self.rounds = 0

    async def named_leader(self, *, besides: str, answered: asyncio.Future[Any]) -> str | None:
        """A leader other than `besides` that a node other than `besides` names, from the
        current round (a new one if the last began over an interval ago); None when no node
        does, or as soon as `answered` (the caller's own request) is done."""
        if self._clock() - self._round_started >= self._interval_s:
            self._start_round()
        pending: set[asyncio.Future[Any]] = {answered}
        pending.update(task for endpoint, task in self._round.items() if endpoint != besides)
        while True:
            for endpoint, task in self._round.items():
                if endpoint == besides or not task.done() or task.cancelled():
                    continue
                named = task.result()
                if named and normalize_url(named) != besides:
                    return normalize_url(named)
            pending = {future for future in pending if not future.done()}
            if answered.done() or pending == {answered} or not pending:
                return None
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    def _start_round(self) -> None:
        self._round_started = self._clock()
        self.rounds += 1
        self._round = {}
        for endpoint in self._endpoints:
            task = asyncio.ensure_future(self._ask(endpoint))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self._round[endpoint] = task

    async def _ask(self, endpoint: str) -> str | None:
        """The leader `endpoint` names ("" for none), or None when it did not answer."""
        try:
            response = await self._transport.request(
                endpoint, "GET", "/healthz", timeout_s=self._probe_timeout_s
            )
        except TransportError:
            return None
        return response.headers.get("kvstore-leader", "").strip()

    async def close(self) -> None:
        tasks, self._tasks, self._round = list(self._tasks), set(), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
