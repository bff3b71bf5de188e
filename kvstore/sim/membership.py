"""Membership changes in a simulated cluster: the operator that makes them, one at a time.

The nemesis decides what should change (grow the cluster by a learner that is then
promoted, remove a member, or replace a node whose disk was lost); `Operator` carries each
plan out through whichever node leads at the time, as the server's self-healing does: one
`propose_conf_change` at a time, retried until the change is committed (a leader may crash
or be deposed before it commits, and its successor may not hold it), a learner promoted
only once the core finds it caught up.

A node whose disk is lost never comes back under its id: a new node (a new id, never used
before) starts with empty storage and no configuration, is added as a learner whose member
context (kvstore/kv/members.py) names the lost member's slot and asks for promotion, and
then the operator heals as the server's healer does, through the same rule
(`kv.members.heal_step`, asked with the member table of the leader's state machine and the
core's `learner_caught_up`): once the learner has caught up, the lost member is removed,
then the learner promoted: remove before promote, so that with three voters the majority
never grows to three of four while one of them is dead (docs/architecture.md section 11).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.errors import RaftError
from kvstore.kv import members
from kvstore.raft import confchange
from kvstore.raft.confchange import ConfChange, ConfChangeType
from kvstore.raft.types import ConfState, EntryType, Role
from kvstore.storage.memory import MemoryStorage

if TYPE_CHECKING:
    from kvstore.sim.cluster import Simulation

RETRY_DELAY = 15
"""Time units between two attempts of the same change (a refused or uncommitted one)."""


class Step(enum.Enum):
    ADD = "add"
    PROMOTE = "promote"
    REMOVE = "remove"
    # The self-healing rule: remove what the learner replaces, then promote it.
    HEAL = "heal"


_CHANGE_TYPE = {
    Step.ADD: ConfChangeType.ADD_LEARNER,
    Step.PROMOTE: ConfChangeType.PROMOTE,
    Step.REMOVE: ConfChangeType.REMOVE,
}


@dataclass(frozen=True, slots=True)
class Goal:
    step: Step
    node: int
    # ADD: the member context; HEAL: the member the learner replaces.
    context: bytes = b""
    replaces: int = 0

    def reached(self, conf: ConfState) -> bool:
        if self.step is Step.ADD:
            return self.node in conf.learners or self.node in conf.voters
        if self.step is Step.PROMOTE:
            return self.node in conf.voters
        if self.step is Step.HEAL:
            return self.node in conf.voters and self.replaces in conf.removed
        return self.node in conf.removed

    def moot(self, conf: ConfState) -> bool:
        """The goal can no longer be reached (a learner to promote was removed meanwhile)."""
        if self.step in (Step.PROMOTE, Step.HEAL):
            return self.node not in conf.learners and self.node not in conf.voters
        if self.step is Step.ADD:
            return self.node in conf.removed
        return False


class Operator:
    """Carries out membership goals in order, one committed change at a time."""

    def __init__(self, simulation: Simulation) -> None:
        self._sim = simulation
        self._goals: deque[Goal] = deque()
        self._next_try = 0

    @property
    def busy(self) -> bool:
        return bool(self._goals)

    def plan(self, *goals: Goal) -> None:
        self._goals.extend(goals)
        self._sim.trace("plan " + " ".join(f"{g.step.value} n{g.node}" for g in goals))

    def act(self) -> None:
        """Called every step: try the next goal at the leader when it is time."""
        sim = self._sim
        if not self._goals or sim.now < self._next_try:
            return
        leader = sim.leader()
        if leader is None or leader.raw is None or leader.stalled:
            return
        raw = leader.raw
        status = raw.status()
        conf = status.conf_state
        committed = status.conf_index <= status.commit_index
        goal = self._goals[0]
        if committed and goal.reached(conf):
            self._goals.popleft()
            sim.counters[f"membership_{goal.step.value}"] += 1
            sim.trace(f"membership {goal.step.value} n{goal.node} done")
            return
        if committed and goal.moot(conf):
            self._goals.popleft()
            sim.trace(f"membership {goal.step.value} n{goal.node} moot")
            return
        self._next_try = sim.now + RETRY_DELAY
        if goal.reached(conf):
            return  # proposed, not yet committed
        if goal.step is Step.HEAL:
            if not committed or leader.machine is None:
                return
            change = members.heal_step(
                conf, leader.machine.members.infos(), raw.learner_caught_up
            )
            if change is None:
                return  # not caught up yet
        else:
            change = ConfChange(_CHANGE_TYPE[goal.step], goal.node, goal.context)
        try:
            raw.propose_conf_change(change)
        except RaftError as exc:
            sim.trace(f"membership {goal.step.value} n{goal.node} refused: {exc.code}")
            return
        sim.trace(
            f"membership {goal.step.value} n{goal.node} proposed "
            f"{change.type.name.lower()} n{change.node_id} at n{leader.id}"
        )


def stored_conf_state(storage: MemoryStorage, peers: tuple[int, ...]) -> ConfState:
    """The configuration a node would start with from `storage`: the last CONF_CHANGE entry
    of its log, else its snapshot's (or bootstrap) configuration (as RawNode does)."""
    first, index = storage.first_index(), storage.last_index()
    while index >= first:
        entry = storage.entries(index, index + 1, 1 << 30)[0]
        if entry.type is EntryType.CONF_CHANGE:
            return confchange.decode(entry.data).conf_state
        index -= 1
    conf = storage.initial_state()[1]
    if not conf.voters and peers:
        return ConfState(voters=tuple(sorted(peers)))
    return conf


def voter_count(simulation: Simulation) -> int:
    """How many voters the leader's configuration has (0 with no leader)."""
    leader = simulation.leader()
    if leader is None or leader.raw is None or leader.role is not Role.LEADER:
        return 0
    return len(leader.raw.conf_state.voters)
