"""A pinned simulator scenario: a follower's read after it restarted in the same term.

The simulated cluster runs the production Replica, codec and context path (the core makes
the ReadIndex contexts, as for the server's reads). Follower F asks for a read; the leader's
heartbeat round for it is slow; F crashes and restarts in the same term; a write W commits
and is applied on the leader (acknowledged); F's new read begins. When the slow round
completes, the answer to F's old request (an index from before W) must not serve the new
read. With contexts numbered from 1 per process and any answer of the term taken, it did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvstore.raft.types import Message, MessageType, ReadState, Role
from kvstore.sim.cluster import Simulation
from kvstore.sim.network import NetworkConfig
from kvstore.sim.node import CrashStage, SimNode


def _quiet_simulation() -> Simulation:
    """Three nodes, a reliable network, no nemesis and no random clients."""
    reliable = NetworkConfig(
        delay_min=1, delay_max=1, drop_probability=0.0, duplicate_probability=0.0
    )
    simulation = Simulation(7, nodes=3, liveness=False, network=reliable, fault_time=1_000_000)
    simulation.nemesis.stop()
    simulation.workload.enabled = False
    return simulation


def _run_until(simulation: Simulation, condition: Callable[[], bool]) -> None:
    assert simulation.run_until(condition, 2_000), "the condition never held"
    assert not simulation.checker.violations, simulation.checker.violations


def _applied(node: SimNode) -> int:
    return node.machine.applied_index if node.machine is not None else 0


def test_answer_to_a_read_of_an_earlier_incarnation_does_not_serve_a_new_read() -> None:
    simulation = _quiet_simulation()
    nodes = simulation.nodes
    _run_until(simulation, lambda: simulation.leader() is not None)
    leader = simulation.leader()
    assert leader is not None and leader.raw is not None
    follower = nodes[1] if leader.id != 1 else nodes[2]
    simulation.propose(leader.id, simulation.encode_put(1, 1, "k", "a"))
    _run_until(
        simulation,
        lambda: all(_applied(n) == _applied(leader) > 1 for n in nodes.values())
        and follower.leader_id == leader.id,
    )

    # The leader's heartbeats that carry a ReadIndex key are held back: a slow round.
    held: list[Message] = []
    send = simulation.network.send

    def hold_read_rounds(message: Message, now: int) -> None:
        if message.type is MessageType.HEARTBEAT and message.context:
            held.append(message)
        else:
            send(message, now)

    simulation.network.send = hold_read_rounds  # type: ignore[method-assign]
    seen: list[ReadState] = []
    on_read_states = simulation.on_read_states

    def record(node: SimNode, read_states: Sequence[ReadState]) -> None:
        if node is follower:
            seen.extend(read_states)
        on_read_states(node, read_states)

    simulation.on_read_states = record  # type: ignore[method-assign]

    old = simulation.read_index(follower.id)
    assert old is not None
    _run_until(simulation, lambda: bool(held))
    term = follower.term

    simulation.crash_node(follower, CrashStage.NOW)
    _run_until(simulation, lambda: not follower.up)
    simulation.start_node(follower)
    simulation.propose(leader.id, simulation.encode_put(1, 2, "k", "W"))
    w_index = leader.raw.raft_log.last_index()
    _run_until(
        simulation,
        lambda: _applied(leader) >= w_index and follower.leader_id == leader.id,
    )
    assert leader.role is Role.LEADER and follower.term == term

    new = simulation.read_index(follower.id)
    assert new is not None
    rounds = len(held)
    _run_until(simulation, lambda: len(held) > rounds)  # the new read reached the leader
    simulation.network.send = send  # type: ignore[method-assign]
    for message in held:
        send(message, simulation.now)
    _run_until(simulation, lambda: any(rs.context == new for rs in seen))
    # What the driver serves the new read at: the first answer carrying its context.
    first = next(rs for rs in seen if rs.context == new)
    assert first.index >= w_index, f"read served at {first.index}, before W at {w_index}"
    assert old not in {rs.context for rs in seen}
