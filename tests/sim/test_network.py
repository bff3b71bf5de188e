"""The simulated network on its own: partitions of every kind, loss, duplication, ordering."""

from __future__ import annotations

import random

import pytest

from kvstore.raft.types import Message, MessageType
from kvstore.sim.network import Network, NetworkConfig

RELIABLE = NetworkConfig(delay_min=1, delay_max=1, drop_probability=0.0, duplicate_probability=0.0)


def message(source: int, destination: int, index: int = 0) -> Message:
    return Message(type=MessageType.APPEND, to=destination, from_=source, term=1, index=index)


def always_up(_node: int) -> bool:
    return True


def reachable(network: Network) -> set[tuple[int, int]]:
    return {
        (a, b)
        for a in network.node_ids
        for b in network.node_ids
        if a != b and network.can_send(a, b)
    }


def test_a_reliable_network_delivers_everything_once_after_the_delay() -> None:
    network = Network([1, 2, 3], RELIABLE, random.Random(1))
    network.send(message(1, 2), now=0)
    network.send(message(2, 3), now=0)
    assert network.deliver_due(0, always_up) == []
    assert network.deliver_due(1, always_up) == [message(1, 2), message(2, 3)]
    assert network.in_flight() == 0
    assert network.stats().delivered == 2


def test_symmetric_partition_cuts_both_directions_between_groups_only() -> None:
    network = Network([1, 2, 3, 4, 5], RELIABLE, random.Random(1))
    network.partition([[1, 2], [3, 4, 5]])
    assert reachable(network) == {(1, 2), (2, 1), (3, 4), (4, 3), (3, 5), (5, 3), (4, 5), (5, 4)}
    network.heal()
    assert len(reachable(network)) == 20


def test_nodes_left_out_of_a_partition_form_their_own_group() -> None:
    network = Network([1, 2, 3], RELIABLE, random.Random(1))
    network.partition([[1, 2]])
    assert reachable(network) == {(1, 2), (2, 1)}


def test_one_way_partition_cuts_only_one_direction() -> None:
    network = Network([1, 2, 3], RELIABLE, random.Random(1))
    network.partition_one_way([1], [2, 3])
    assert not network.can_send(1, 2) and not network.can_send(1, 3)
    assert network.can_send(2, 1) and network.can_send(3, 1) and network.can_send(2, 3)
    network.send(message(1, 2), now=0)
    network.send(message(2, 1), now=0)
    assert network.deliver_due(5, always_up) == [message(2, 1)]
    assert network.stats().blocked == 1


def test_bridge_partition_connects_both_halves_only_through_the_bridge() -> None:
    network = Network([1, 2, 3, 4, 5], RELIABLE, random.Random(1))
    network.partition_bridge([1, 2], 3, [4, 5])
    links = reachable(network)
    for a in (1, 2, 4, 5):
        assert (a, 3) in links and (3, a) in links
    for a in (1, 2):
        for b in (4, 5):
            assert (a, b) not in links and (b, a) not in links
    assert (1, 2) in links and (4, 5) in links


def test_isolate_cuts_a_node_off_both_ways() -> None:
    network = Network([1, 2, 3], RELIABLE, random.Random(1))
    network.isolate(2)
    assert reachable(network) == {(1, 3), (3, 1)}


def test_a_partition_cuts_messages_already_in_flight() -> None:
    network = Network([1, 2], RELIABLE, random.Random(1))
    dropped: list[Message] = []
    network.on_drop = dropped.append
    network.send(message(1, 2), now=0)
    network.partition([[1], [2]])
    assert network.deliver_due(10, always_up) == []
    assert dropped == [message(1, 2)]


def test_messages_to_a_down_node_are_lost() -> None:
    network = Network([1, 2], RELIABLE, random.Random(1))
    network.send(message(1, 2), now=0)
    assert network.deliver_due(10, lambda node: node != 2) == []
    assert network.stats().dropped == 1


def test_drop_probability_one_loses_everything() -> None:
    config = NetworkConfig(drop_probability=1.0, duplicate_probability=0.0)
    network = Network([1, 2], config, random.Random(1))
    for i in range(20):
        network.send(message(1, 2, i), now=0)
    assert network.deliver_due(1000, always_up) == []
    assert network.stats().dropped == 20


def test_duplicate_probability_one_delivers_everything_twice() -> None:
    config = NetworkConfig(drop_probability=0.0, duplicate_probability=1.0)
    network = Network([1, 2], config, random.Random(1))
    for i in range(10):
        network.send(message(1, 2, i), now=0)
    delivered = network.deliver_due(1000, always_up)
    assert sorted(m.index for m in delivered) == sorted(list(range(10)) * 2)
    assert network.stats().duplicated == 10


def test_random_delays_reorder_messages_on_one_link() -> None:
    config = NetworkConfig(
        delay_min=1, delay_max=50, drop_probability=0.0, duplicate_probability=0.0
    )
    network = Network([1, 2], config, random.Random(7))
    for i in range(50):
        network.send(message(1, 2, i), now=0)
    order = [m.index for m in network.deliver_due(1000, always_up)]
    assert sorted(order) == list(range(50))
    assert order != list(range(50))


def test_moderate_loss_and_duplication_rates_are_close_to_configured() -> None:
    config = NetworkConfig(drop_probability=0.1, duplicate_probability=0.1)
    network = Network([1, 2], config, random.Random(3))
    for i in range(5000):
        network.send(message(1, 2, i), now=0)
    stats = network.stats()
    assert 400 < stats.dropped < 600
    assert 350 < stats.duplicated < 550


def test_same_seed_same_schedule() -> None:
    config = NetworkConfig(
        delay_min=1, delay_max=30, drop_probability=0.2, duplicate_probability=0.2
    )

    def run(seed: int) -> list[tuple[int, int]]:
        network = Network([1, 2, 3], config, random.Random(seed))
        out: list[tuple[int, int]] = []
        for i in range(100):
            network.send(message(1 + i % 3, 1 + (i + 1) % 3, i), now=i)
        for now in range(200):
            out.extend((now, m.index) for m in network.deliver_due(now, always_up))
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="delay_min"):
        NetworkConfig(delay_min=5, delay_max=1)
    with pytest.raises(ValueError, match="drop_probability"):
        NetworkConfig(drop_probability=1.5)
