"""ReadIndex bookkeeping on the leader (Raft dissertation §6.4).

A read request is recorded with the leader's commit index at arrival; the leader then sends a
heartbeat round carrying the request's context. Once a quorum has answered a heartbeat with
that context, the leader knows it was still the leader when the request arrived, so every
request queued up to and including that context may be served at its recorded index.

Invariant: `_queue` holds the contexts of `_pending` in arrival order; recorded indexes are
non-decreasing along it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ReadIndexStatus:
    context: bytes
    # The node that asked (the leader itself for a local read).
    requester: int
    # The leader's commit index when the request arrived.
    index: int
    acks: set[int] = field(default_factory=set)


class ReadOnly:
    __slots__ = ("_pending", "_queue")

    def __init__(self) -> None:
        self._pending: dict[bytes, ReadIndexStatus] = {}
        self._queue: list[bytes] = []

    def add_request(self, index: int, context: bytes, requester: int) -> bool:
        """Queue a read; False if a read with the same context is already pending."""
        if context in self._pending:
            return False
        self._pending[context] = ReadIndexStatus(context, requester, index)
        self._queue.append(context)
        return True

    def receive_ack(self, voter: int, context: bytes) -> set[int] | None:
        """Record that `voter` answered the heartbeat for `context`; returns the acks so far,
        or None when no such read is pending."""
        status = self._pending.get(context)
        if status is None:
            return None
        status.acks.add(voter)
        return status.acks

    def advance(self, context: bytes) -> list[ReadIndexStatus]:
        """Release every read queued up to and including `context` (a quorum confirmed it)."""
        if context not in self._pending:
            return []
        position = self._queue.index(context)
        released = [self._pending.pop(ctx) for ctx in self._queue[: position + 1]]
        del self._queue[: position + 1]
        return released

    def last_pending_context(self) -> bytes:
        return self._queue[-1] if self._queue else b""

    def pending_count(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        self._pending.clear()
        self._queue.clear()
