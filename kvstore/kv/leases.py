"""Leases: keys that go away with the process that keeps them alive (etcd's lease model).

Two halves, kept apart on purpose:

- `LeaseTable` is replicated state: each lease's id, its TTL and the keys attached to it.
  It changes only through applied commands (`LeaseGrant`, `LeaseRevoke`, a `Put` with a
  lease, any delete) and travels in snapshots. Revoking a lease deletes its keys in one
  revision (the state machine does that).
- `LeaseKeeper` is the leader's own clock of when each lease expires. It is never
  replicated: replicas never expire anything on their own clock. Only the leader consults
  it, and an expired lease is revoked by proposing a `LeaseRevoke` through the log like any
  write. Keepalives touch only the keeper (no log entry per keepalive). A node that becomes
  leader restarts every lease's clock at a full TTL (`LeaseKeeper.promote`), so a failover
  never expires a lease early: the old leader confirmed its leadership (a ReadIndex round)
  before acknowledging a keepalive, so a later leader was elected after that keepalive.

Time in the keeper is an injected number of milliseconds (monotonic on the server, virtual
in the simulator); this module reads no clock.

Invariants (`LeaseTable`): `_key_lease` maps exactly the keys of every lease's `keys` to
that lease; a key is attached to at most one lease.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import ProtocolError
from kvstore.kv.commands import (
    UINT64_MAX,
    CommandKind,
    RequestId,
    check_common,
    request_from_obj,
    request_to_obj,
)

LEASES_FORMAT_VERSION = 1
LEASE_TTL_MS_MAX = 7 * 24 * 3600 * 1000
"""The longest TTL a lease may have (a week)."""
LEASE_ID_MAX = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """Create lease `lease_id` (0: the state machine picks the entry's index) with `ttl_ms`."""

    lease_id: int
    ttl_ms: int
    request: RequestId | None
    time_ms: int
    acked_below: int = 0

    def __post_init__(self) -> None:
        check_common(None, self.request, self.time_ms, None, self.acked_below)
        _check_id(self.lease_id, allow_zero=True)
        if not _is_count(self.ttl_ms) or not 1 <= self.ttl_ms <= LEASE_TTL_MS_MAX:
            raise ValueError(f"lease ttl_ms must be in 1..{LEASE_TTL_MS_MAX}")

    def to_obj(self) -> list[Any]:
        return [
            int(CommandKind.LEASE_GRANT),
            self.lease_id,
            self.ttl_ms,
            request_to_obj(self.request),
            self.time_ms,
            self.acked_below,
        ]

    @staticmethod
    def from_obj(obj: list[Any]) -> LeaseGrant:
        if len(obj) != 6:
            raise ProtocolError("lease grant: expected an array of 6")
        _, lease_id, ttl_ms, request, time_ms, acked_below = obj
        return LeaseGrant(lease_id, ttl_ms, request_from_obj(request), time_ms, acked_below)


@dataclass(frozen=True, slots=True)
class LeaseRevoke:
    """Revoke lease `lease_id` and delete its keys in one revision. `expired`: proposed by a
    leader whose keeper saw the lease expire (for logs and metrics; applied the same)."""

    lease_id: int
    request: RequestId | None
    time_ms: int
    acked_below: int = 0
    expired: bool = False

    def __post_init__(self) -> None:
        check_common(None, self.request, self.time_ms, None, self.acked_below)
        _check_id(self.lease_id, allow_zero=False)
        if not isinstance(self.expired, bool):
            raise ValueError("lease revoke: expired must be a bool")

    def to_obj(self) -> list[Any]:
        return [
            int(CommandKind.LEASE_REVOKE),
            self.lease_id,
            request_to_obj(self.request),
            self.time_ms,
            self.acked_below,
            self.expired,
        ]

    @staticmethod
    def from_obj(obj: list[Any]) -> LeaseRevoke:
        if len(obj) != 6:
            raise ProtocolError("lease revoke: expected an array of 6")
        _, lease_id, request, time_ms, acked_below, expired = obj
        return LeaseRevoke(lease_id, request_from_obj(request), time_ms, acked_below, expired)


@dataclass(slots=True)
class Lease:
    lease_id: int
    ttl_ms: int
    keys: set[str] = field(default_factory=set)


class LeaseTable:
    """The replicated leases; see the module docstring."""

    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        self._key_lease: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: int) -> bool:
        return lease_id in self._leases

    def get(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id)

    def leases(self) -> list[Lease]:
        return [self._leases[lease_id] for lease_id in sorted(self._leases)]

    def grant(self, lease_id: int, ttl_ms: int) -> None:
        assert lease_id not in self._leases
        self._leases[lease_id] = Lease(lease_id, ttl_ms)

    def revoke(self, lease_id: int) -> list[str]:
        """Remove the lease; returns its keys, sorted (the caller deletes them)."""
        lease = self._leases.pop(lease_id)
        for key in lease.keys:
            del self._key_lease[key]
        return sorted(lease.keys)

    def attach(self, key: str, lease_id: int) -> None:
        """`key` was written with `lease_id` (0: without a lease, which detaches it)."""
        self.detach(key)
        if lease_id:
            self._leases[lease_id].keys.add(key)
            self._key_lease[key] = lease_id

    def detach(self, key: str) -> None:
        """`key` was deleted or rewritten: it no longer belongs to its lease."""
        old = self._key_lease.pop(key, None)
        if old is not None:
            self._leases[old].keys.discard(key)

    def lease_of(self, key: str) -> int:
        return self._key_lease.get(key, 0)

    def check_invariants(self) -> None:
        pairs = {(key, lease.lease_id) for lease in self._leases.values() for key in lease.keys}
        assert pairs == set(self._key_lease.items()), "lease key index out of step"

    def to_obj(self) -> list[Any]:
        """[version, [[id, ttl_ms, [keys sorted]], ...] sorted by id]."""
        return [
            LEASES_FORMAT_VERSION,
            [[lease.lease_id, lease.ttl_ms, sorted(lease.keys)] for lease in self.leases()],
        ]

    def load_obj(self, obj: Any, keys_present: Iterable[str] | None = None) -> None:
        """Replace the table by a decoded `to_obj`; ProtocolError (and no change) if bad.
        `keys_present`: the store's keys, every attached key must be among them."""
        if not isinstance(obj, list) or len(obj) != 2 or obj[0] != LEASES_FORMAT_VERSION:
            raise ProtocolError("leases: expected [version 1, leases]")
        if not isinstance(obj[1], list):
            raise ProtocolError("leases: the leases are not an array")
        present = None if keys_present is None else set(keys_present)
        leases: dict[int, Lease] = {}
        key_lease: dict[str, int] = {}
        for item in obj[1]:
            if not isinstance(item, list) or len(item) != 3 or not isinstance(item[2], list):
                raise ProtocolError("leases: expected [id, ttl_ms, keys]")
            lease_id, ttl_ms, keys = item
            try:
                _check_id(lease_id, allow_zero=False)
            except ValueError as exc:
                raise ProtocolError(f"leases: {exc}") from exc
            if lease_id in leases or not _is_count(ttl_ms) or not 1 <= ttl_ms <= LEASE_TTL_MS_MAX:
                raise ProtocolError(f"leases: duplicate lease or bad TTL for {lease_id}")
            for key in keys:
                if type(key) is not str or key in key_lease:
                    raise ProtocolError(f"leases: bad or doubly attached key under {lease_id}")
                if present is not None and key not in present:
                    raise ProtocolError(f"leases: key {key!r} of {lease_id} is not in the store")
                key_lease[key] = lease_id
            leases[lease_id] = Lease(lease_id, ttl_ms, set(keys))
        self._leases, self._key_lease = leases, key_lease


class LeaseKeeper:
    """The leader's expiry clock (milliseconds, injected); see the module docstring.

    Invariant: while active, every lease of the table it was told about has a deadline at
    least its TTL after the later of (the moment this node became leader, the lease's grant
    being applied here, its last keepalive acknowledged here)."""

    def __init__(self) -> None:
        self._deadlines: dict[int, int] = {}
        self._ttls: dict[int, int] = {}
        self.active = False
        # Leases whose revocation was proposed and not yet applied: not proposed again
        # before this time.
        self._revoking: dict[int, int] = {}

    def promote(self, table: LeaseTable, now_ms: int) -> None:
        """This node became leader: every lease gets a full TTL from now (etcd's rule)."""
        self.active = True
        self._ttls = {lease.lease_id: lease.ttl_ms for lease in table.leases()}
        self._deadlines = {lease_id: now_ms + ttl for lease_id, ttl in self._ttls.items()}
        self._revoking.clear()

    def demote(self) -> None:
        """No longer leader: forget every deadline (the next leader starts afresh)."""
        self.active = False
        self._deadlines.clear()
        self._ttls.clear()
        self._revoking.clear()

    def granted(self, lease_id: int, ttl_ms: int, now_ms: int) -> None:
        """A grant was applied here."""
        if self.active:
            self._ttls[lease_id] = ttl_ms
            self._deadlines[lease_id] = now_ms + ttl_ms

    def revoked(self, lease_id: int) -> None:
        """A revocation was applied here."""
        self._deadlines.pop(lease_id, None)
        self._ttls.pop(lease_id, None)
        self._revoking.pop(lease_id, None)

    def expiring(self, lease_id: int) -> bool:
        """This leader has proposed the lease's revocation: it is expired, whether or not
        the revocation has been applied yet."""
        return lease_id in self._revoking

    def keepalive(self, lease_id: int, now_ms: int) -> int | None:
        """Renew the lease at `now_ms` (after leadership was confirmed); its TTL, or None if
        this keeper does not know it (not leader, or no such lease) or has already proposed
        its revocation (`expiring`): renewing it then would acknowledge a keepalive for a
        lease whose expiry is about to commit (the simulator found that one)."""
        ttl = self._ttls.get(lease_id)
        if not self.active or ttl is None or lease_id in self._revoking:
            return None
        self._deadlines[lease_id] = max(self._deadlines[lease_id], now_ms + ttl)
        return ttl

    def remaining_ms(self, lease_id: int, now_ms: int) -> int | None:
        deadline = self._deadlines.get(lease_id)
        return None if deadline is None else max(0, deadline - now_ms)

    def expired(self, now_ms: int, retry_ms: int) -> list[int]:
        """Leases past their deadline whose revocation is to be proposed now (each again
        after `retry_ms` if its revocation was not applied by then)."""
        if not self.active:
            return []
        due = [
            lease_id
            for lease_id, deadline in self._deadlines.items()
            if deadline <= now_ms and self._revoking.get(lease_id, -1) <= now_ms
        ]
        for lease_id in due:
            self._revoking[lease_id] = now_ms + retry_ms
        return sorted(due)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def _check_id(lease_id: object, *, allow_zero: bool) -> None:
    if (
        not isinstance(lease_id, int)
        or isinstance(lease_id, bool)
        or not (0 if allow_zero else 1) <= lease_id <= LEASE_ID_MAX
    ):
        raise ValueError(f"lease id must be an integer in 1..2**63-1: {lease_id!r}")
