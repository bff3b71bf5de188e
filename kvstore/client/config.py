"""The client library's knobs: one frozen dataclass, every field with a default and a name.

`ClientConfig` is what `Client` and `SyncClient` are tuned with. It is validated in
`__post_init__` (a ValueError names the offending field), so a bad value fails at
construction, not on the first call in production. The names carry their units last
(`timeout_s`, `backoff_cap_s`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from enum import StrEnum


class Consistency(StrEnum):
    """How fresh a read must be."""

    # The leader confirms it is still the leader (ReadIndex) before answering; works on any node.
    LINEARIZABLE = "linearizable"
    # Whatever the answering node has applied; may lag behind acknowledged writes.
    STALE = "stale"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Tuning of one client; every knob has a default suitable for a LAN cluster."""

    # The per-call deadline: every call (all its attempts, back-offs and redirects) returns or
    # raises within this many seconds.
    timeout_s: float = 5.0
    # The most HTTP attempts one call makes (redirects to the leader count as attempts): a
    # safety net against hot loops; with the back-off below the deadline is what binds.
    max_attempts: int = 50
    # The longest single attempt; a hung node (SIGSTOP, partition) costs at most this much
    # before the call moves on to another replica. Always clipped to the time left. A frozen
    # leader rarely costs that much: see leader_probe_after_s.
    attempt_timeout_s: float = 1.0
    # An attempt with no answer after this long asks the other nodes who leads (GET /healthz:
    # every answer names the leader), again every leader_probe_interval_s while it waits; as
    # soon as one names a leader other than the node waited on, the attempt is abandoned and
    # the call goes there (a write keeps its request id, so it still applies once). A frozen
    # leader then costs about one election instead of attempt_timeout_s; a slow but live
    # leader, which the others still name, is waited for. One probe round at a time per
    # client, shared by all its waiting calls.
    leader_probe_after_s: float = 0.1
    leader_probe_interval_s: float = 0.05
    # The longest single attempt of a stale read (any node answers from what it applied, in
    # well under a millisecond when it runs): with two of three nodes frozen, a stale read
    # waited 2 x attempt_timeout_s before reaching the live one.
    stale_attempt_timeout_s: float = 0.25
    # Establishing a TCP connection; refused connections fail at once anyway.
    connect_timeout_s: float = 0.5
    # Capped exponential back-off with full jitter: before retry n (n = 0, 1, ...) the client
    # sleeps uniform(0, min(backoff_cap_s, backoff_base_s * 2**n)).
    backoff_base_s: float = 0.02
    backoff_cap_s: float = 0.25
    # A server's Retry-After is honoured (slept at least that long) up to this many seconds;
    # anything longer is clipped so a call can still finish within its deadline.
    retry_after_max_s: float = 2.0
    # How many not-leader hints in a row are followed at once, without back-off, before the
    # client assumes the hints are stale and backs off like for any transient failure.
    immediate_redirects_max: int = 3
    # Circuit breaker per endpoint: after this many consecutive transport failures the endpoint
    # is skipped for breaker_cooldown_s, then one probe call is let through.
    breaker_failure_threshold: int = 3
    breaker_cooldown_s: float = 1.0
    # Reads default to this consistency.
    read_consistency: Consistency = Consistency.LINEARIZABLE
    # Pooled HTTP connections in total (aiohttp's TCPConnector limit).
    max_connections: int = 100
    # Key operations (put, delete, get) over the binary stream: one WebSocket per node with
    # many requests in flight (kvstore.client.stream); False for HTTP only. Either way a
    # node that does not offer the stream is used over HTTP, as are lists and status.
    binary_stream: bool = True
    # With the binary stream: keep a stream open to every endpoint, not only to the nodes
    # used, so that after a leader change the new leader's stream is already open (its dial,
    # an HTTP upgrade, would otherwise add several milliseconds to the failover). Costs one
    # idle WebSocket per client on each node; False dials a node's stream on its first use.
    standby_streams: bool = True
    # TLS (https:// endpoints): the CA that signs the nodes' certificates ("" = the system's
    # trust store), and a client certificate and its key to present ("" = none). Files (PEM).
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # A bearer token (nodes with --auth): sent as `Authorization: Bearer` on every request.
    token: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if value <= 0 and field.name != "immediate_redirects_max":
                raise ValueError(f"ClientConfig.{field.name} must be > 0, got {value!r}")
            if value < 0:
                raise ValueError(f"ClientConfig.{field.name} must be >= 0, got {value!r}")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(
                f"ClientConfig.backoff_cap_s ({self.backoff_cap_s}) must be >= "
                f"backoff_base_s ({self.backoff_base_s})"
            )
        if self.key_file and not self.cert_file:
            raise ValueError("ClientConfig.key_file needs cert_file")
        if not isinstance(self.read_consistency, Consistency):
            object.__setattr__(self, "read_consistency", Consistency(self.read_consistency))
