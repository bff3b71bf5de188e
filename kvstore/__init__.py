"""kvstore: a fault-tolerant, Raft-replicated key-value store in Python.

The public API for applications is the client library (`Client`, `SyncClient`) and the error
tree in `kvstore.errors`. The server runs with `kvstore serve`; see README.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
