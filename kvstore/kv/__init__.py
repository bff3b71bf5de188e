"""The replicated key-value state machine: commands, apply, snapshots, exactly-once sessions.

- `kvstore.kv.commands`: Put/Delete, RequestId, results, the strict log encoding;
- `kvstore.kv.sessions`: the replicated per-client session table (dissertation §6.3);
- `kvstore.kv.state_machine`: StateMachine (apply, get, list, snapshot, restore, digest).
"""

from kvstore.kv.commands import (
    Command,
    Delete,
    KeyValue,
    Put,
    RequestId,
    WriteError,
    WriteResult,
    decode_command,
    encode_command,
    parse_request_id,
)
from kvstore.kv.sessions import SessionConfig
from kvstore.kv.state_machine import KvConfig, StateMachine

__all__ = [
    "Command",
    "Delete",
    "KeyValue",
    "KvConfig",
    "Put",
    "RequestId",
    "SessionConfig",
    "StateMachine",
    "WriteError",
    "WriteResult",
    "decode_command",
    "encode_command",
    "parse_request_id",
]
