"""The kvstore client library: `Client` (asyncio) and `SyncClient` (plain synchronous code).

    async with Client(["http://127.0.0.1:7001", "http://127.0.0.1:7002"]) as kv:
        await kv.put("greeting", b"hello")
        item = await kv.get("greeting")         # KeyValue(value=b"hello", mod_revision=...)

Modules: `core` (Client and its retry loop), `sync` (SyncClient), `config` (ClientConfig),
`retry` (the pure retry policy and circuit breaker), `transport` (the HTTP exchange behind a
Protocol), `responses` (HTTP answers back into typed errors), `results` (typed results).
"""

from __future__ import annotations

from kvstore.client.config import ClientConfig, Consistency
from kvstore.client.core import Client
from kvstore.client.results import (
    ClientStats,
    DeleteResult,
    KeyValue,
    ListResult,
    NodeStatus,
    PeerStatus,
    PutResult,
)
from kvstore.client.sync import SyncClient

__all__ = [
    "Client",
    "ClientConfig",
    "ClientStats",
    "Consistency",
    "DeleteResult",
    "KeyValue",
    "ListResult",
    "NodeStatus",
    "PeerStatus",
    "PutResult",
    "SyncClient",
]
