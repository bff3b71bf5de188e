"""The nemesis: faults injected into a simulated cluster during its fault period.

At random intervals it picks one action: a network partition (symmetric, one-way, bridge,
isolating the leader), healing the network, crashing a node at a random point of its Ready
cycle (restarted later from its storage), a leadership transfer, a spurious "peer down"
report (a connection blip, which must not depose a live leader), an immediate campaign, or a
change of a node's tick rate (clock drift), or pausing a process (SIGSTOP) for a while:
it neither ticks nor handles messages, which wait for it, and a paused leader wakes up
believing it still leads. A node's save can hang (a dying disk): the node then neither
ticks nor steps until it returns, sending only the keepalives the server's policy allows
(kvstore.keepalive). A node's disk can fill up for a while such that the compaction
after a snapshot fails (the snapshot stays stored; the replica retries the compaction later).
With `SimConfig.membership`, it also changes the membership (carried out by
`kvstore.sim.membership.Operator`, one change at a time, under all the faults above): it grows
the cluster by a new node (added as a learner, promoted once caught up), removes a member
(the leader too, which then hands over), or wipes a voter's disk: that id never runs again,
and a new node under a new id replaces it (added as a learner, the lost member removed,
then the learner promoted).
Snapshot streams can break for a while (`snapshot_stream_outcome`): a snapshot's connection
drops mid-stream (the follower never gets it) or after its last chunk but before the
follower's ACK reached the leader (the follower installs it, the leader hears it failed), as
with the server's streamed snapshots (kvstore/server/snapshot_stream.py).
When a node crashes, each live peer "notices" it
after a short random delay and calls `report_peer_down`, as the server's transport does when
a connection closes.

Every choice draws from the nemesis's own `random.Random`, itself drawn from the seed.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from kvstore.errors import RaftError
from kvstore.kv import members
from kvstore.sim.membership import Goal, Step
from kvstore.sim.node import CrashStage, SimNode

if TYPE_CHECKING:
    from kvstore.sim.cluster import Simulation


class Nemesis:
    """Schedules and performs faults; see the module docstring."""

    def __init__(self, simulation: Simulation, rng: random.Random) -> None:
        self._sim = simulation
        self._rng = rng
        self._stopped = False
        self._actions = [
            (self._partition, 3),
            (self._one_way, 2),
            (self._bridge, 1),
            (self._isolate_leader, 2),
            (self._heal, 3),
            (self._crash, 4),
            (self._transfer, 2),
            (self._blip, 1),
            (self._campaign, 1),
            (self._drift, 1),
            (self._pause, 2),
            (self._fill_disk, 1),
            (self._hang_disk, 1),
            (self._break_snapshot_streams, 1),
        ]
        # The coordination workload (issue 14) assumes the initial node set: with it, the
        # membership stays fixed.
        if simulation.config.membership and not simulation.config.coordination:
            self._actions += [(self._grow, 1), (self._shrink, 1), (self._wipe, 2)]
        # Until this time, snapshot streams break (`snapshot_stream_outcome`).
        self._streams_broken_until = -1
        self._schedule_next()

    def stop(self) -> None:
        self._stopped = True

    def _schedule_next(self) -> None:
        config = self._sim.config
        delay = self._rng.randint(config.fault_gap_min, config.fault_gap_max)
        self._sim.schedule(delay, "nemesis", self._act)

    def _act(self) -> None:
        if self._stopped:
            return
        actions = [action for action, _ in self._actions]
        weights = [weight for _, weight in self._actions]
        action = self._rng.choices(actions, weights)[0]
        self._sim.counters[action.__name__.lstrip("_")] += 1
        action()
        self._schedule_next()

    def _ids(self) -> list[int]:
        return sorted(self._sim.nodes)

    # --- network ---------------------------------------------------------------------------

    def _partition(self) -> None:
        ids = self._ids()
        self._rng.shuffle(ids)
        cut = self._rng.randint(1, len(ids) - 1)
        self._sim.network.heal()
        self._sim.network.partition([ids[:cut], ids[cut:]])
        self._sim.trace(f"partition {sorted(ids[:cut])} | {sorted(ids[cut:])}")

    def _one_way(self) -> None:
        ids = self._ids()
        sources = self._rng.sample(ids, self._rng.randint(1, len(ids) - 1))
        destinations = [i for i in ids if i not in sources]
        self._sim.network.partition_one_way(sources, destinations)
        self._sim.trace(f"one-way {sorted(sources)} -> {destinations}")

    def _bridge(self) -> None:
        ids = self._ids()
        self._rng.shuffle(ids)
        half = (len(ids) - 1) // 2
        left, bridge, right = ids[:half], ids[half], ids[half + 1 :]
        self._sim.network.heal()
        self._sim.network.partition_bridge(left, bridge, right)
        self._sim.trace(f"bridge {sorted(left)} - {bridge} - {sorted(right)}")

    def _isolate_leader(self) -> None:
        leader = self._sim.leader()
        if leader is not None:
            self._sim.network.isolate(leader.id)
            self._sim.trace(f"isolate n{leader.id}")

    def _heal(self) -> None:
        self._sim.network.heal()
        self._sim.trace("heal network")

    # --- nodes -----------------------------------------------------------------------------

    def _crash(self) -> None:
        live = self._sim.live_nodes()
        if not live:
            return
        leader = self._sim.leader()
        if leader is not None and self._rng.random() < 0.4:
            node = leader
        else:
            node = self._rng.choice(live)
        stage = self._rng.choice(list(CrashStage))
        self._sim.crash_node(node, stage)
        downtime = self._rng.randint(10, 600)
        incarnation = node.incarnation

        def restart() -> None:
            if not node.up and node.incarnation == incarnation:
                self._sim.start_node(node)

        self._sim.schedule(downtime, f"restart n{node.id}", restart)

    def _pause(self) -> None:
        live = [node for node in self._sim.live_nodes() if not node.stalled]
        if not live:
            return
        leader = self._sim.leader()
        node = leader if leader is not None and self._rng.random() < 0.5 else None
        if node is None or node.paused:
            node = self._rng.choice(live)
        self._sim.pause_node(node, self._rng.randint(20, 400))

    def _hang_disk(self) -> None:
        """A node's next save hangs for a while (the leader's, half of the time): with
        keepalives bounded by the keepalive policy, the others elect a new leader."""
        live = [node for node in self._sim.live_nodes() if not node.stalled]
        if not live:
            return
        leader = self._sim.leader()
        node = leader if leader is not None and self._rng.random() < 0.5 else None
        if node is None or node.stalled:
            node = self._rng.choice(live)
        self._sim.hang_save(node, self._rng.randint(50, 800))

    def _fill_disk(self) -> None:
        """The disk of one node fills for a while: its log compactions fail with
        DiskFullError (MemoryStorage.compact_disk_full), whatever the node does meanwhile
        (crashes and restarts included: the disk stays full)."""
        node = self._rng.choice(self._sim.all_nodes())
        if node.storage.compact_disk_full:
            return
        node.storage.compact_disk_full = True
        duration = self._rng.randint(50, 1000)
        self._sim.trace(f"disk full n{node.id} for {duration}")

        def free() -> None:
            node.storage.compact_disk_full = False

        self._sim.schedule(duration, f"disk freed n{node.id}", free)

    # --- membership ----------------------------------------------------------------------

    def _voters(self) -> tuple[int, ...] | None:
        """The leader's voters when a new membership plan may start (none in progress)."""
        leader = self._sim.leader()
        if self._sim.operator.busy or leader is None or leader.raw is None:
            return None
        return leader.raw.voters

    def _room(self) -> bool:
        return len(self._sim.nodes) < self._sim.config.nodes_max

    def _grow(self) -> None:
        """A new node joins: added as a learner, promoted once caught up."""
        voters = self._voters()
        if voters is None or len(voters) >= 5 or not self._room():
            return
        node = self._sim.add_node()
        self._sim.start_node(node)
        self._sim.operator.plan(Goal(Step.ADD, node.id), Goal(Step.PROMOTE, node.id))

    def _shrink(self) -> None:
        """A member is removed (the leader itself, sometimes); it keeps running, removed."""
        voters = self._voters()
        if voters is None or len(voters) <= 3:
            return
        self._sim.operator.plan(Goal(Step.REMOVE, self._rng.choice(voters)))

    def _wipe(self) -> None:
        """A voter's disk is lost: a new node under a new id replaces it. Remove before
        promote: with three voters, the majority never becomes three of four with one dead."""
        voters = self._voters()
        if voters is None or not self._room():
            return
        lost = self._sim.nodes[self._rng.choice(voters)]
        leader = self._sim.leader()
        table = None if leader is None else leader.machine
        infos = {} if table is None else table.members.infos()
        name = members.member_name(lost.id, infos.get(lost.id))
        self._sim.wipe_node(lost)
        node = self._sim.add_node()
        delay = self._rng.randint(10, 300)

        def start() -> None:
            if not node.up:  # the heal may have started it already
                self._sim.start_node(node)

        self._sim.schedule(delay, f"start n{node.id}", start)
        # The same slot back under a new id, as `kvstore serve` joins after a lost disk.
        context = members.encode_context(
            members.MemberInfo(name, f"sim-n{node.id}:0", replaces=lost.id, promote=True)
        )
        self._sim.operator.plan(
            Goal(Step.ADD, node.id, context=context), Goal(Step.HEAL, node.id, replaces=lost.id)
        )
    def _break_snapshot_streams(self) -> None:
        duration = self._rng.randint(50, 600)
        self._streams_broken_until = self._sim.now + duration
        self._sim.trace(f"snapshot streams break for {duration}")

    def snapshot_stream_outcome(self) -> str:
        """How the stream of a snapshot being delivered now ends: "ok", "cut" (the
        connection dropped mid-stream: nothing arrives, the leader hears it failed) or
        "ack_lost" (it dropped after the last chunk: the follower installs the snapshot, the
        leader hears it failed)."""
        if self._sim.now >= self._streams_broken_until:
            return "ok"
        return "cut" if self._rng.random() < 0.5 else "ack_lost"

    def on_crashed(self, node: SimNode) -> None:
        """Peers notice the closed connections a little later."""
        for peer in self._sim.live_nodes():
            incarnation = peer.incarnation

            def notice(peer: SimNode = peer, incarnation: int = incarnation) -> None:
                if peer.raw is not None and peer.incarnation == incarnation:
                    peer.raw.report_peer_down(node.id)

            delay = self._rng.randint(1, 30)
            self._sim.schedule(delay, f"peer_down n{peer.id} sees n{node.id}", notice)

    def _transfer(self) -> None:
        leader = self._sim.leader()
        if leader is None or leader.raw is None:
            return
        target = self._rng.choice([i for i in self._ids() if i != leader.id])
        self._sim.trace(f"transfer n{leader.id} -> n{target}")
        try:
            leader.raw.transfer_leadership(target)
        except RaftError:
            pass

    def _blip(self) -> None:
        live = self._sim.live_nodes()
        if not live:
            return
        node = self._rng.choice(live)
        peer = self._rng.choice([i for i in self._ids() if i != node.id])
        self._sim.trace(f"blip n{node.id} reports n{peer} down")
        assert node.raw is not None
        node.raw.report_peer_down(peer)

    def _campaign(self) -> None:
        live = self._sim.live_nodes()
        if not live:
            return
        node = self._rng.choice(live)
        self._sim.trace(f"campaign n{node.id}")
        assert node.raw is not None
        try:
            node.raw.campaign()
        except RaftError:
            pass

    def _drift(self) -> None:
        node = self._rng.choice(self._sim.all_nodes())
        config = self._sim.config
        node.tick_period = self._rng.randint(config.tick_period_min, config.tick_period_max * 2)
        self._sim.trace(f"drift n{node.id} period {node.tick_period}")
