"""Requests waiting on the driver: writes until their entry is applied, reads until their
ReadIndex is confirmed and applied, each with the one request deadline; and the request ids
the server makes for clients that send none.

The driver owns one `PendingRequests` and touches it only from its own task (the HTTP
handlers' `Driver.write` / `Driver.read_barrier` run on the same event loop). Rules:

- A write's future is found by its key, str(RequestId), from the applied results: a write is
  answered exactly when its entry is applied, whichever proposal (a retry, another node's)
  put the entry in the log. Invariant: `count` is the number of writes between
  `add_write` and `remove_write`, so a retried key counts once per waiting request.
- A ReadIndex request is answered by the leader it went to or by no one: its futures are
  kept by context until the read state arrives, then until the state machine has applied
  its index (`waiting_reads`).
- Every request has the same timeout, so the deadlines are appended in deadline order and
  only the head of the deque needs looking at (`expire`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.errors import UnavailableError
from kvstore.kv.commands import RequestId, WriteResult
from kvstore.raft.types import ReadState

if TYPE_CHECKING:
    from kvstore.replica import Applied


@dataclass(slots=True)
class _WaitingRead:
    """Reads whose ReadIndex is known (`index`) and waits for the apply to reach it."""

    index: int
    futures: list[asyncio.Future[None]] = field(default_factory=list)


class PendingRequests:
    """Writes and reads waiting on the driver; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_timeout_s: float) -> None:
        self._loop = loop
        self._request_timeout_s = request_timeout_s
        # (deadline, future) of every waiting request, in deadline order.
        self._deadlines: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self.proposals: dict[str, list[asyncio.Future[WriteResult]]] = {}
        self.count = 0
        self.read_contexts: dict[bytes, list[asyncio.Future[None]]] = {}
        self._waiting_reads: list[_WaitingRead] = []

    # --- writes ---------------------------------------------------------------------------

    def add_write(self, key: str) -> asyncio.Future[WriteResult]:
        """A future for the applied result of the write `key`, failed at its deadline."""
        future: asyncio.Future[WriteResult] = self._loop.create_future()
        self.proposals.setdefault(key, []).append(future)
        self.count += 1
        self._deadlines.append((self._loop.time() + self._request_timeout_s, future))
        return future

    def remove_write(self, key: str, future: asyncio.Future[WriteResult]) -> None:
        """The request that added `future` is done waiting (answered, failed or cancelled)."""
        self.count -= 1
        futures = self.proposals.get(key)
        if futures is not None:
            if future in futures:
                futures.remove(future)
            if not futures:
                del self.proposals[key]

    def on_applied(self, applied: Sequence[Applied], applied_index: int) -> None:
        """Resolve the writes whose entries were applied, and the reads now served."""
        proposals = self.proposals
        if proposals:
            for item in applied:
                command = item.command
                if command is None or command.request is None or item.result is None:
                    continue
                futures = proposals.get(str(command.request))
                if futures:
                    for future in futures:
                        if not future.done():
                            future.set_result(item.result)
        if self._waiting_reads:
            self._serve_waiting_reads(applied_index)

    def fail_writes(self, message: str, retry_after_s: float) -> None:
        error = UnavailableError(message, retry_after_s=retry_after_s)
        for futures in self.proposals.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    # --- reads ----------------------------------------------------------------------------

    def add_read(self) -> asyncio.Future[None]:
        """A future resolved when a linearizable read may be served, failed at its deadline."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._deadlines.append((self._loop.time() + self._request_timeout_s, future))
        return future

    def reads_started(self, context: bytes, futures: list[asyncio.Future[None]]) -> None:
        """`futures` wait for the read state of the ReadIndex request `context`."""
        self.read_contexts[context] = futures

    def on_read_states(self, read_states: Iterable[ReadState], applied_index: int) -> None:
        for read_state in read_states:
            futures = self.read_contexts.pop(read_state.context, None)
            if not futures:
                continue
            if read_state.index <= applied_index:
                resolve_all(futures)
            else:
                self._waiting_reads.append(_WaitingRead(read_state.index, futures))

    def _serve_waiting_reads(self, applied_index: int) -> None:
        still: list[_WaitingRead] = []
        for waiting in self._waiting_reads:
            if waiting.index <= applied_index:
                resolve_all(waiting.futures)
            else:
                still.append(waiting)
        self._waiting_reads = still

    def fail_reads(self, message: str, retry_after_s: float) -> None:
        """Fail the reads still waiting for a read state (their leader changed)."""
        error = UnavailableError(message, retry_after_s=retry_after_s)
        for futures in self.read_contexts.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        self.read_contexts.clear()

    # --- deadlines ------------------------------------------------------------------------

    def expire(self) -> None:
        """Fail with TimeoutError the requests whose deadline has passed."""
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, future = deadlines.popleft()
            if not future.done():
                future.set_exception(TimeoutError())


class ServerRequestIds:
    """Request ids the server makes for clients that send none (curl): one client id per
    process, a sequence number per request, and the acked_below that lets the state machine
    forget the answers no request of this process can still ask for again."""

    def __init__(self, node_id: int) -> None:
        self._client_id = f"srv{node_id}-{secrets.token_hex(6)}"
        self._seq = itertools.count(1)
        self._outstanding_seqs: set[int] = set()

    def new(self) -> tuple[RequestId, int]:
        """A server-made request id and the acked_below that goes with it."""
        seq = next(self._seq)
        self._outstanding_seqs.add(seq)
        return RequestId(client_id=self._client_id, seq=seq), min(self._outstanding_seqs)

    def release(self, request: RequestId) -> None:
        if request.client_id == self._client_id:
            self._outstanding_seqs.discard(request.seq)


def resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
