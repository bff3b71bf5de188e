"""The simulator's coordination workload (kvstore/sim/coordination.py): transactions stay
atomic on every node, watchers see exactly the committed history across crashes and
compactions, and no lease expires before its TTL after the last acknowledged keepalive's
send; the checks themselves catch what they are meant to catch."""

from __future__ import annotations

import logging

import pytest

from kvstore.sim.cluster import Simulation
from kvstore.sim.coordination import _Segment
from kvstore.sim.invariants import Invariant
from kvstore.sim.runner import final_checks, run_seed


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("kvstore").setLevel(logging.ERROR)


@pytest.mark.parametrize("seed", range(1, 9))
def test_coordination_seeds_are_clean(seed: int) -> None:
    result = run_seed(seed, {"coordination": True})
    assert result.ok, result.violations or result.liveness_failure


def test_a_seed_exercises_txns_watchers_and_leases_and_replays_exactly() -> None:
    first = Simulation(19, coordination=True)
    first.run()
    result = final_checks(first)
    assert result.ok
    work = first.coordination
    assert work is not None
    assert work.txns > 20 and work.keepalives_acked > 5 and work.revocations > 0
    assert all(sum(len(s.events) for s in w.segments) > 0 for w in work.watchers)
    again = Simulation(19, coordination=True)
    again.run()
    assert final_checks(again).trace_hash == result.trace_hash


def test_the_watch_check_reports_a_missed_event() -> None:
    simulation = Simulation(5, coordination=True)
    simulation.run()
    work = simulation.coordination
    assert work is not None
    segment: _Segment = next(s for w in work.watchers for s in w.segments if len(s.events) > 2)
    del segment.events[1]
    violations = work.check_watchers(simulation.now)
    assert [v.invariant for v in violations] == [Invariant.WATCH_HISTORY]


def test_the_pair_check_reports_a_half_applied_transaction() -> None:
    simulation = Simulation(5, coordination=True)
    simulation.run_to(2000)
    work = simulation.coordination
    assert work is not None
    node = next(n for n in simulation.nodes.values() if n.up)
    machine = node.machine
    assert machine is not None
    machine._data["p0/a"] = (b"torn", 1, 1, 1)  # a transaction applied halfway
    machine._data.pop("p0/b", None)
    work.check_pairs(node, simulation.now)
    assert work.violations and work.violations[0].invariant is Invariant.TXN_ATOMICITY
