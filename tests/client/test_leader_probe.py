"""The client's way past a leader that stops answering (issue 15): a node that did not
answer is left at once, a hint naming it is not followed straight back, and a call stuck on a
frozen leader moves as soon as another node names a new one (kvstore.client.probe).

The transport here is scripted but asynchronous: a frozen node's request waits until it is
cancelled, as a SIGSTOPped process's would until the attempt timeout. Probe timings are a
few milliseconds; the tests wait for outcomes (which node answered, what was sent), never
for a duration.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvstore import Client
from kvstore.client import ClientConfig
from kvstore.client.transport import HttpResponse, TransportError

from .fakes import error_response, put_ok

A, B, C = "http://n1:7001", "http://n2:7001", "http://n3:7001"


@dataclass
class Nodes:
    """Each endpoint answers as its `mode` says: "frozen" (never, until cancelled), "dead"
    (connection refused), "slow" (after `slow_s`), or "up"; every node names `leader`."""

    leader: str
    modes: dict[str, str] = field(default_factory=dict)
    slow_s: float = 0.05
    sent: list[tuple[str, str, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout_s: float,
    ) -> HttpResponse:
        request_id = (headers or {}).get("Kvstore-Request-Id", "")
        self.sent.append((endpoint, method + " " + path, request_id))
        mode = self.modes.get(endpoint, "up")
        if mode == "dead":
            raise TransportError(f"{endpoint}: connection refused", maybe_sent=False)
        if mode == "frozen":
            try:
                await asyncio.sleep(timeout_s)
            except asyncio.CancelledError:
                self.cancelled.append(endpoint)
                raise
            raise TransportError(f"{endpoint}: timed out", maybe_sent=True, timed_out=True)
        if mode == "slow":
            await asyncio.sleep(self.slow_s)
        if path == "/healthz":
            return HttpResponse(200, {"kvstore-leader": self.leader}, b"{}")
        if endpoint != self.leader:
            return error_response(307, "not_leader", leader=self.leader)
        return put_ok("k", 7, leader=self.leader)

    async def close(self) -> None:
        pass


def make_client(nodes: Nodes, **config: object) -> Client:
    settings: dict[str, object] = {
        "leader_probe_after_s": 0.005,
        "leader_probe_interval_s": 0.005,
        "attempt_timeout_s": 30.0,
        "timeout_s": 60.0,
        **config,
    }
    client = Client(
        [A, B, C],
        config=ClientConfig(**settings),  # type: ignore[arg-type]
        transport=nodes,
        rng=random.Random(3),
        client_id="probe",
    )
    client._round_robin = 0
    return client


async def test_a_call_stuck_on_a_frozen_leader_follows_the_leader_another_node_names() -> None:
    nodes = Nodes(leader=A)
    client = make_client(nodes)
    await client.put("k", b"v")
    assert client.leader_url == A
    nodes.modes[A] = "frozen"
    put = asyncio.ensure_future(client.put("k", b"w"))
    # While the others still name A (not yet elected), the call keeps waiting on A.
    async with asyncio.timeout(10):
        while client._probe.rounds < 2:
            await asyncio.sleep(0.001)
    assert not put.done()
    nodes.leader = C  # the survivors elected C
    async with asyncio.timeout(10):
        result = await put
    assert result.request_id == "probe:2"
    puts = [(endpoint, rid) for endpoint, what, rid in nodes.sent if what.startswith("PUT")]
    assert puts[-2:] == [(A, "probe:2"), (C, "probe:2")], "the same request id, moved to C"
    assert nodes.cancelled == [A], "the frozen attempt was abandoned, not waited out"
    assert client.leader_url == C
    await client.close()


async def test_a_slow_leader_the_others_still_name_is_waited_for() -> None:
    nodes = Nodes(leader=A, modes={A: "slow"}, slow_s=0.05)
    client = make_client(nodes)
    result = await client.put("k", b"v")
    assert result.mod_revision == 7
    puts = [endpoint for endpoint, what, _ in nodes.sent if what.startswith("PUT")]
    assert puts == [A], "no second attempt while the others name the slow node"
    assert client._probe.rounds >= 1
    await client.close()


async def test_a_dead_leader_is_left_at_once_and_its_stale_hint_not_followed_back() -> None:
    """The leader's process died: its in-flight call moves to B without a back-off; B has
    not noticed yet and still names A, a hint the call does not follow straight back."""
    nodes = Nodes(leader=A)
    client = make_client(nodes, backoff_base_s=0.001, backoff_cap_s=0.002)
    await client.put("k", b"v")
    nodes.modes[A] = "dead"
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        nodes.leader = C  # meanwhile the survivors elect C
        await asyncio.sleep(0)

    client._sleep = sleep
    await client.put("k", b"w")
    puts = [endpoint for endpoint, what, _ in nodes.sent if what.startswith("PUT")]
    assert puts[1:3] == [A, B], "the dead leader's call went to B at once"
    assert puts[3] != A, "B's stale hint to A was not followed"
    assert puts[-1] == C
    assert len(sleeps) == 1, "one back-off: after the stale hint, not after the refusal"
    await client.close()


async def test_a_node_that_failed_at_startup_is_trusted_again_when_named() -> None:
    """A hint naming a node that failed earlier in the call is distrusted once only: in a
    long call (a cluster starting up) every node may have refused once, and the leader the
    others name must still be reached."""
    nodes = Nodes(leader=A, modes={A: "dead", B: "dead", C: "dead"})
    client = make_client(nodes, backoff_base_s=0.001, backoff_cap_s=0.002)
    rounds = 0

    async def sleep(seconds: float) -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 3:
            nodes.modes = {}  # every node is up now, and A leads
        await asyncio.sleep(0)

    client._sleep = sleep
    result = await client.put("k", b"v")
    assert result.mod_revision == 7
    await client.close()
