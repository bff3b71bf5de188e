"""Coordination in chaos drills: watchers and a lock, checked after the faults (issue 14).

- `WatchRecorder` (workload `watch`: the register workload plus watchers): a few
  `Client.watch(prefix="r")` iterators, started before the faults from the store's next
  revision, record every event they deliver while nodes are killed, paused and partitioned
  (each reconnects on its own, from its next revision). After healing, each is allowed to
  catch up to the final revision, and the history itself is read once more from a fresh
  watch on the converged cluster. Check: every watcher's events equal that history exactly
  (nothing missed, repeated or reordered, across every reconnect).
- `LockWorkload` (workload `lock`): processes take one `Lock` in turns, each holder acting on
  a shared resource (a record of who acted, with which fencing token, from when to when)
  and writing the lock's key in the register history (so the linearizability check covers
  it too). Check: in the order the holders began to act, the tokens strictly increase, and
  no holder began before the previous one (with a lower token) was done, unless that one had
  already been told its lease was lost (fencing is then what keeps the resource safe: the
  check counts those).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.client import Client, ClientConfig, Lock, Watch, WatchEvent
from kvstore.errors import KVStoreError, LeaseLostError

logger = logging.getLogger("kvstore.chaos")

WATCHERS = 3
WATCH_PREFIX = "r"
_CATCH_UP_TIMEOUT_S = 30.0

Event = tuple[int, str, str, bytes]


@dataclass(slots=True)
class _Recorded:
    watch: Watch
    events: list[Event] = field(default_factory=list)
    error: str = ""


class WatchRecorder:
    """See the module docstring."""

    def __init__(
        self, endpoints: Sequence[str], rng: random.Random, client_config: ClientConfig
    ) -> None:
        self.endpoints = list(endpoints)
        self._rng = rng
        self._client_config = client_config
        self._client: Client | None = None
        self._recorded: list[_Recorded] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.start_revision = 0

    async def start(self) -> None:
        self._client = Client(self.endpoints, config=self._client_config)
        listing = await self._client.list(WATCH_PREFIX, limit=1)
        self.start_revision = listing.revision + 1
        for number in range(WATCHERS):
            watch = self._client.watch(
                prefix=WATCH_PREFIX, start_revision=self.start_revision, progress_interval_s=0.3
            )
            recorded = _Recorded(watch)
            self._recorded.append(recorded)
            self._tasks.append(
                asyncio.create_task(self._follow(recorded), name=f"chaos-watch-{number}")
            )

    async def _follow(self, recorded: _Recorded) -> None:
        try:
            async for event in recorded.watch:
                if isinstance(event, WatchEvent):
                    recorded.events.append((event.revision, event.type, event.key, event.value))
        except KVStoreError as exc:
            recorded.error = f"{type(exc).__name__}: {exc}"

    async def finish(self) -> tuple[bool, str]:
        """Let every watcher reach the final revision, read the history, compare."""
        client = self._client
        assert client is not None
        try:
            final_revision = (await client.list(WATCH_PREFIX, limit=1)).revision
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _CATCH_UP_TIMEOUT_S
            while loop.time() < deadline and any(
                r.watch.next_revision <= final_revision and not r.error for r in self._recorded
            ):
                await asyncio.sleep(0.05)
            reference = await self._history(client, final_revision)
        finally:
            for task in self._tasks:
                task.cancel()
            for recorded in self._recorded:
                await recorded.watch.close()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await client.close()
        return self._compare(reference, final_revision)

    async def _history(self, client: Client, final_revision: int) -> list[Event]:
        events: list[Event] = []
        if final_revision < self.start_revision:
            return events
        watch = client.watch(
            prefix=WATCH_PREFIX,
            start_revision=self.start_revision,
            progress=True,
            progress_interval_s=0.2,
        )
        async with watch, asyncio.timeout(_CATCH_UP_TIMEOUT_S):
            # `next_revision` moves a whole line at a time: stop on what the items say.
            async for item in watch:
                if item.revision > final_revision:
                    break
                if isinstance(item, WatchEvent):
                    events.append((item.revision, item.type, item.key, item.value))
                elif item.revision == final_revision:
                    break  # a progress line: everything up to the final revision was sent
        return events

    def _compare(self, reference: list[Event], final_revision: int) -> tuple[bool, str]:
        problems: list[str] = []
        for number, recorded in enumerate(self._recorded):
            seen = [event for event in recorded.events if event[0] <= final_revision]
            if recorded.error:
                problems.append(f"watcher {number} ended: {recorded.error}")
            elif seen != reference:
                problems.append(f"watcher {number}: {_difference(seen, reference)}")
        reconnects = sum(r.watch.reconnects for r in self._recorded)
        detail = (
            f"{len(self._recorded)} watchers, {len(reference)} events from revision "
            f"{self.start_revision} to {final_revision}, {reconnects} reconnects"
        )
        if problems:
            return False, "; ".join([*problems, detail])
        return True, detail


def _difference(seen: list[Event], reference: list[Event]) -> str:
    for position, (got, want) in enumerate(zip(seen, reference)):
        if got != want:
            return f"event {position} is {got[:3]}, the history has {want[:3]}"
    if len(seen) < len(reference):
        return f"missed {len(reference) - len(seen)} events from {reference[len(seen)][:3]}"
    return f"{len(seen) - len(reference)} events beyond the history"


@dataclass(slots=True)
class _Action:
    token: int
    process: int
    began: float
    ended: float
    lease_lost: bool


class LockWorkload:
    """See the module docstring; `run` until `stop`."""

    def __init__(self, endpoints: Sequence[str], processes: int, rng: random.Random,
                 record: Any, client_config: ClientConfig | None = None) -> None:  # fmt: skip
        self.endpoints = list(endpoints)
        self._client_config = client_config or ClientConfig(timeout_s=5.0)
        self.processes = processes
        self._rng = rng
        self._record = record  # Workload._record's signature: the register history
        self._stop = asyncio.Event()
        self.actions: list[_Action] = []
        self.acquired = 0
        self.lost = 0
        self.failures = 0

    def stop(self) -> None:
        self._stop.set()

    async def run(self, new_process: Any) -> None:
        config = self._client_config
        async with Client(self.endpoints, config=config) as client, asyncio.TaskGroup() as group:
            for slot in range(self.processes):
                rng = random.Random(self._rng.getrandbits(64))
                group.create_task(self._loop(client, slot, rng, new_process), name=f"lock-{slot}")

    async def _loop(self, client: Client, slot: int, rng: random.Random, new_process: Any) -> None:
        process = new_process()
        serial = 0
        while not self._stop.is_set():
            lock = Lock(client, "chaos-lock", ttl_s=2.0)
            try:
                token = await lock.acquire()
            except KVStoreError:
                self.failures += 1
                await asyncio.sleep(0.05)
                continue
            self.acquired += 1
            try:
                serial += 1
                lost = await self._act(client, lock, token, process, f"l{slot}-{serial}", rng)
                if lost:
                    process = new_process()
            finally:
                with contextlib.suppress(KVStoreError):
                    await lock.release()
            await asyncio.sleep(rng.uniform(0, 0.02))

    async def _act(self, client: Client, lock: Lock, token: int, process: int, value: str,
                   rng: random.Random) -> bool:  # fmt: skip
        """Act on the resource holding the lock; True if the write's outcome is unknown."""
        try:
            lock.lease.check()
        except LeaseLostError:
            self.lost += 1
            return False
        began = time.monotonic()
        invoke = time.monotonic_ns()
        unknown = False
        try:
            await client.put("lock-owner", value.encode())
            self._record(process, "put", "lock-owner", value, None, invoke,
                         time.monotonic_ns(), True, None)  # fmt: skip
        except KVStoreError:
            self._record(process, "put", "lock-owner", value, None, invoke, None, True, None)
            unknown = True
        await asyncio.sleep(rng.uniform(0.005, 0.03))
        lost = lock.lease.lost.is_set()
        self.lost += int(lost)
        self.actions.append(_Action(token, process, began, time.monotonic(), lost))
        return unknown

    def check(self) -> tuple[bool, str]:
        problems: list[str] = []
        excused = 0
        ordered = sorted(self.actions, key=lambda action: action.began)
        for before, after in itertools.pairwise(ordered):
            if after.token <= before.token:
                problems.append(
                    f"token {after.token} acted at {after.began:.3f} after token "
                    f"{before.token} (tokens must grow with each holder)"
                )
            elif after.began < before.ended:
                if before.lease_lost:
                    excused += 1  # fencing rejects the stale holder's later requests
                else:
                    problems.append(
                        f"holders {before.token} and {after.token} acted at once "
                        f"({after.began:.3f} < {before.ended:.3f}) with no lease lost"
                    )
        detail = (
            f"{len(self.actions)} holders acted in token order, {self.acquired} acquisitions, "
            f"{self.lost} leases lost, {excused} overlaps after a lost lease, "
            f"{self.failures} failed acquisitions"
        )
        if problems:
            return False, "; ".join([*problems[:3], detail])
        return True, detail
