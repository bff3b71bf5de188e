"""A leader whose save hangs (issue 12 item 3), in the simulator.

While a save hangs the node neither ticks nor steps (as the server's driver waits for it) and
sends only the keepalives `kvstore.keepalive.KeepalivePolicy` allows. Without a bound they
kept the followers in lease for the whole hang: no election, no write committed. With the
server's bound (one election timeout) a new leader is elected within a few election timeouts
and writes commit again, every safety invariant holding, also once the old leader's save
returns and it learns of the newer term.
"""

from __future__ import annotations

import pytest

from kvstore.raft.types import Role
from kvstore.sim.cluster import Simulation
from kvstore.sim.network import NetworkConfig
from kvstore.sim.node import SimNode

HANG = 3000


def _hang_the_leader(seed: int, limit: float | None) -> tuple[Simulation, SimNode, int]:
    """A quiet cluster (no nemesis, no loss) whose leader's next save hangs for HANG;
    returns the simulation, the leader and the time (within 10) its save began to hang."""
    simulation = Simulation(
        seed,
        liveness=False,
        fault_time=20_000,
        fault_gap_min=10**9,
        fault_gap_max=10**9,
        network=NetworkConfig(drop_probability=0.0, duplicate_probability=0.0),
        keepalive_limit_elections=limit,
    )
    simulation.run_to(1000)
    leader = simulation.leader()
    assert leader is not None
    simulation.hang_save(leader, HANG)
    for _ in range(200):
        if leader.hung_ready is not None:
            return simulation, leader, simulation.now
        simulation.run_to(simulation.now + 10)
    raise AssertionError("the leader saved nothing: the workload is idle")


def _election_timeout(simulation: Simulation) -> int:
    periods = [node.tick_period for node in simulation.all_nodes()]
    return simulation.config.election_ticks * max(periods)


def _others_leading(simulation: Simulation, leader: SimNode) -> bool:
    return any(
        node.role is Role.LEADER and node.term > leader.term
        for node in simulation.all_nodes()
        if node is not leader
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_unbounded_keepalives_keep_the_cluster_leaderless_for_the_whole_hang(seed: int) -> None:
    simulation, leader, hung_at = _hang_the_leader(seed, limit=None)
    committed = simulation.checker.committed_count()
    while leader.hung_ready is not None:
        assert not _others_leading(simulation, leader), f"t={simulation.now}"
        assert simulation.checker.committed_count() == committed, "nothing commits meanwhile"
        simulation.run_to(simulation.now + 10)
    assert simulation.now >= hung_at - 10 + HANG, "the hang lasted its whole length"
    assert simulation.counters["keepalives"] > HANG // _election_timeout(simulation)
    assert not simulation.checker.violations


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bounded_keepalives_let_a_new_leader_take_over_within_a_few_election_timeouts(
    seed: int,
) -> None:
    simulation, leader, hung_at = _hang_the_leader(seed, limit=1.0)
    committed = simulation.checker.committed_count()
    bound = hung_at + 4 * _election_timeout(simulation)
    while not _others_leading(simulation, leader):
        assert simulation.now <= bound, "no new leader within four election timeouts"
        simulation.run_to(simulation.now + 5)
    assert leader.hung_ready is not None, "elected while the old leader still hangs"
    simulation.run_to(hung_at + HANG - 10)
    assert simulation.checker.committed_count() > committed, "writes commit again"
    # The save returns: the old leader steps the newer term and follows.
    simulation.run_to(hung_at + HANG + 4 * _election_timeout(simulation))
    assert leader.hung_ready is None and leader.role is not Role.LEADER
    assert not simulation.checker.violations, simulation.checker.violations
