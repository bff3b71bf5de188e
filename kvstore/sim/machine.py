"""The simulator's own small key-value state machine, used until the real one is wired in.

It applies "put key value" entries and keeps a hash chain over every applied entry
(`digest`), so two nodes at the same applied index with different histories are caught by a
cheap comparison, and snapshots carry the chain so the comparison survives log compaction.
"""

from __future__ import annotations

import hashlib

import msgpack

from kvstore.raft.types import Entry

_PUT = b"P"


def encode_put(key: str, value: str) -> bytes:
    return _PUT + msgpack.packb([key, value])


def decode_put(data: bytes) -> tuple[str, str] | None:
    if not data.startswith(_PUT):
        return None
    key, value = msgpack.unpackb(data[1:])
    assert isinstance(key, str) and isinstance(value, str)
    return key, value


class SimStateMachine:
    """A map of strings with a hash chain over applied entries."""

    __slots__ = ("_chain", "_data", "applied_index")

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._chain = b""
        self.applied_index = 0

    def apply(self, entry: Entry) -> None:
        assert entry.index == self.applied_index + 1, (entry.index, self.applied_index)
        self.applied_index = entry.index
        self._chain = hashlib.sha256(
            b"%s|%d|%d|%s" % (self._chain, entry.index, entry.term, entry.data)
        ).digest()
        decoded = decode_put(entry.data)
        if decoded is not None:
            self._data[decoded[0]] = decoded[1]

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def digest(self) -> str:
        return self._chain.hex()

    def snapshot(self) -> bytes:
        packed: bytes = msgpack.packb([self.applied_index, self._chain, self._data])
        return packed

    def restore(self, data: bytes, index: int) -> None:
        applied, chain, values = msgpack.unpackb(data)
        assert applied == index, (applied, index)
        self.applied_index = applied
        self._chain = chain
        self._data = dict(values)
