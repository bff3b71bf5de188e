"""ReadIndex bookkeeping on the leader (Raft dissertation §6.4).

A read request is recorded with the leader's commit index at arrival; the leader then sends a
heartbeat round carrying the request's context. Once a quorum has answered a heartbeat with
that context, the leader knows it was still the leader when the request arrived, so every
request queued up to and including that context may be served at its recorded index.

Requests are keyed by a leader-local sequence number, not by the requester's context: two
followers (or one follower before and after a restart) may well use the same context bytes,
and each must get its own answer. The heartbeat carries that key; the answer carries the
requester's own context.

Invariant: `_queue` holds the keys of `_pending` in arrival order; recorded indexes are
non-decreasing along it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ReadIndexStatus:
    # The key the heartbeat round carries.
    key: bytes
    # The requester's context, returned with the answer.
    context: bytes
    # The node that asked (the leader itself for a local read).
    requester: int
    # The leader's commit index when the request arrived.
    index: int
    acks: set[int] = field(default_factory=set)


class ReadOnly:
    __slots__ = ("_pending", "_queue", "_sequence")

    def __init__(self) -> None:
        self._pending: dict[bytes, ReadIndexStatus] = {}
        self._queue: list[bytes] = []
        # Never reset, so that keys stay unique for the life of this node.
        self._sequence = 0

    def add_request(self, index: int, context: bytes, requester: int) -> bytes:
        """Queue a read; returns the key its heartbeat round must carry."""
        self._sequence += 1
        key = b"r" + self._sequence.to_bytes(8, "big")
        self._pending[key] = ReadIndexStatus(key, context, requester, index)
        self._queue.append(key)
        return key

    def receive_ack(self, voter: int, key: bytes) -> set[int] | None:
        """Record that `voter` answered the heartbeat for `key`; returns the acks so far,
        or None when no such read is pending."""
        status = self._pending.get(key)
        if status is None:
            return None
        status.acks.add(voter)
        return status.acks

    def advance(self, key: bytes) -> list[ReadIndexStatus]:
        """Release every read queued up to and including `key` (a quorum confirmed it)."""
        if key not in self._pending:
            return []
        position = self._queue.index(key)
        released = [self._pending.pop(k) for k in self._queue[: position + 1]]
        del self._queue[: position + 1]
        return released

    def last_pending_key(self) -> bytes:
        """The key of the newest pending read (b"" when none): heartbeats carry it, so that a
        lost round is retried and confirms every older read too."""
        return self._queue[-1] if self._queue else b""

    def pending_count(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        self._pending.clear()
        self._queue.clear()
