"""kvstore: a fault-tolerant, Raft-replicated key-value store in Python.

The public API for applications is the client library (`Client`, `SyncClient`) and the error
tree in `kvstore.errors`. The server runs with `kvstore serve`; see README.md.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type checkers see the real classes; at run time they load on first use
    from kvstore.client import Client, SyncClient

try:  # one place for the version: pyproject.toml, as installed
    __version__ = metadata.version("kvstore")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Client", "SyncClient", "__version__"]

# The client (aiohttp, asyncio, threads) is imported on first use, not here, so importing
# the I/O-free core (kvstore.raft, kvstore.kv, ...) does not drag it in.
_LAZY = {"Client": "kvstore.client", "SyncClient": "kvstore.client"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
