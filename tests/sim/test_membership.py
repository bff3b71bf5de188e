"""Membership changes in the simulator: the replacement of a node whose disk was lost, the
invariants for a changing membership, and that the seeds exercise every kind of change."""

from __future__ import annotations

import pytest

from kvstore.raft import confchange
from kvstore.raft.types import ConfState, Entry, EntryType
from kvstore.sim.cluster import Simulation
from kvstore.sim.invariants import Invariant, SafetyChecker
from kvstore.sim.membership import Goal, Step
from kvstore.sim.network import NetworkConfig
from kvstore.sim.runner import final_checks, run_seeds


def _quiet(seed: int) -> Simulation:
    """No nemesis, no loss: only what a test does."""
    return Simulation(
        seed,
        liveness=False,
        fault_time=10**9,
        fault_gap_min=10**9,
        fault_gap_max=10**9,
        network=NetworkConfig(drop_probability=0.0, duplicate_probability=0.0),
        nodes=3,
    )


def _replace(simulation: Simulation, victim: int) -> int:
    """Wipe `victim`'s disk and plan its replacement as the nemesis does; the new id."""
    simulation.wipe_node(simulation.nodes[victim])
    node = simulation.add_node()
    simulation.start_node(node)
    simulation.operator.plan(
        Goal(Step.ADD, node.id), Goal(Step.REMOVE, victim), Goal(Step.PROMOTE, node.id)
    )
    return node.id


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_node_whose_disk_was_lost_is_replaced_while_writes_continue(seed: int) -> None:
    """The lost voter never runs again; a new node under a new id joins as a learner,
    catches up, the lost member is removed, the learner promoted, and the new member holds
    every write acknowledged before and during the replacement."""
    simulation = _quiet(seed)
    simulation.run_to(1500)
    leader = simulation.leader()
    assert leader is not None
    victim = next(i for i in sorted(simulation.nodes) if i != leader.id)
    replacement = _replace(simulation, victim)
    done = simulation.run_until(lambda: not simulation.operator.busy, 20_000)
    assert done, f"seed {seed}: replacement unfinished at t={simulation.now}"
    simulation.workload.enabled = False
    simulation.run_to(simulation.now + 2000)
    assert not simulation.checker.violations
    leader = simulation.leader()
    assert leader is not None and leader.raw is not None
    voters = tuple(sorted(i for i in (1, 2, 3, replacement) if i != victim))
    assert leader.raw.conf_state == ConfState(voters=voters, removed=(victim,))
    new, old = simulation.nodes[replacement], simulation.nodes[victim]
    assert old.lost and not old.up
    assert new.machine is not None and leader.machine is not None
    assert new.machine.applied_index == leader.machine.applied_index
    assert new.machine.digest() == leader.machine.digest()
    assert simulation.workload.acknowledged_values(), "the workload wrote during the run"
    # The history checkers (linearizability, reads, no lost or duplicated write) over
    # every operation of the run, and log matching over every log, the lost one's too.
    result = final_checks(simulation)
    assert result.ok, result.violations


def test_a_removed_member_counted_by_a_leader_is_a_violation() -> None:
    checker = SafetyChecker()

    removal = confchange.encode(
        confchange.ConfChangeEntry(
            confchange.ConfChange(confchange.ConfChangeType.REMOVE, 3),
            ConfState(voters=(1, 2), removed=(3,)),
        )
    )

    class Log:
        def snapshot_index(self) -> int:
            return 0

        def last_index(self) -> int:
            return 1

        def last_term(self) -> int:
            return 1

        def entries_from(self, low: int) -> list[Entry]:
            return [Entry(1, 1, EntryType.CONF_CHANGE, removal)][low - 1 :]

        def entry_at(self, index: int) -> Entry | None:
            return Entry(1, 1, EntryType.CONF_CHANGE, removal) if index == 1 else None

    checker.observe_commit(1, 1, 1, Log())
    checker.observe_leader_voters(1, 1, (1, 2), 1)
    # A deposed leader of the old configuration may still commit below the removal...
    checker.observe_leader_voters(2, 1, (1, 2, 3), 0)
    assert not checker.violations
    # ...but counting node 3 for the removal's index or beyond is a violation.
    checker.observe_leader_voters(2, 2, (1, 2, 3), 1)
    assert [v.invariant for v in checker.violations] == [Invariant.MEMBERSHIP]


def test_seeds_exercise_every_membership_change_and_stay_safe() -> None:
    summary = run_seeds(range(1, 13))
    assert summary.ok, summary.line()
    counters = summary.counters
    for name in (
        "disks_lost",
        "membership_add",
        "membership_promote",
        "membership_remove",
        "membership_heal",
    ):
        assert counters[name] > 0, name
