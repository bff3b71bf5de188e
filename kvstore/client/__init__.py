"""The kvstore client library: `Client` (asyncio) and `SyncClient` (plain synchronous code).

    async with Client(["http://127.0.0.1:7001", "http://127.0.0.1:7002"]) as kv:
        await kv.put("greeting", b"hello")
        item = await kv.get("greeting")         # KeyValue(value=b"hello", mod_revision=...)

Modules: `core` (Client and its retry loop), `txn` (transactions), `watch` (watches that
survive failover), `lease` (leases kept alive in the background), `recipes` (Lock, Election), `sync` (SyncClient and
SyncLease, SyncLock, SyncElection), `config` (ClientConfig),
`retry` (the pure retry policy and circuit breaker), `transport` (the HTTP exchange behind a
Protocol), `responses` (HTTP answers back into typed errors), `results` (typed results).
"""

from __future__ import annotations

from kvstore.client.config import ClientConfig, Consistency
from kvstore.client.core import Client
from kvstore.client.lease import Lease
from kvstore.client.recipes import Election, Lock
from kvstore.client.results import (
    ClientStats,
    DeleteResult,
    KeyValue,
    LeaseInfo,
    ListResult,
    NodeStatus,
    PeerStatus,
    PutResult,
)
from kvstore.client.sync import SyncClient, SyncElection, SyncLease, SyncLock
from kvstore.client.txn import Compare, Op, OpResult, TxnResult
from kvstore.client.watch import Watch, WatchEvent, WatchProgress

__all__ = [
    "Client",
    "ClientConfig",
    "ClientStats",
    "Compare",
    "Consistency",
    "DeleteResult",
    "Election",
    "KeyValue",
    "Lease",
    "LeaseInfo",
    "ListResult",
    "Lock",
    "NodeStatus",
    "Op",
    "OpResult",
    "PeerStatus",
    "PutResult",
    "SyncClient",
    "SyncElection",
    "SyncLease",
    "SyncLock",
    "TxnResult",
    "Watch",
    "WatchEvent",
    "WatchProgress",
]
