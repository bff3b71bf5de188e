"""The keepalive policy shared by the server's driver and the simulator (kvstore.keepalive)."""

from __future__ import annotations

import math

import pytest

from kvstore.keepalive import KeepalivePolicy


def test_keepalives_go_out_for_one_election_timeout_of_a_stalled_save() -> None:
    policy = KeepalivePolicy.for_timeouts(heartbeat_interval=0.05, election_timeout=0.2)
    assert policy.interval == 0.05
    sent = [t for t in (0.05, 0.1, 0.15, 0.2, 0.25, 10.0) if policy.allows(t)]
    assert sent == [0.05, 0.1, 0.15]


def test_without_a_bound_keepalives_never_stop() -> None:
    assert KeepalivePolicy(interval=2, limit=math.inf).allows(10**9)


@pytest.mark.parametrize("interval, limit", [(0, 1), (-1, 1), (1, -1), (1, math.nan)])
def test_nonsense_is_refused(interval: float, limit: float) -> None:
    with pytest.raises(ValueError):
        KeepalivePolicy(interval=interval, limit=limit)
