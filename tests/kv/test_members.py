"""The member context codec, the replicated member table and the self-healing rule
(kvstore/kv/members.py)."""

from __future__ import annotations

import msgpack
import pytest

from kvstore.errors import ProtocolError
from kvstore.kv import members
from kvstore.kv.members import MemberInfo, MemberTable
from kvstore.kv.state_machine import StateMachine
from kvstore.raft import confchange
from kvstore.raft.confchange import ConfChange, ConfChangeEntry, ConfChangeType
from kvstore.raft.types import ConfState, Entry, EntryType

INFO = MemberInfo("3", "10.0.0.3:7101", "http://10.0.0.3:7001", replaces=3, promote=True)


def conf_entry(change: ConfChange, conf: ConfState) -> bytes:
    return confchange.encode(ConfChangeEntry(change, conf))


def test_context_round_trips() -> None:
    assert members.decode_context(members.encode_context(INFO)) == INFO
    plain = MemberInfo("a", "h:1")
    assert members.decode_context(members.encode_context(plain)) == plain


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"name": "a"},  # no peer address
        {"name": "", "peer": "h:1"},
        {"name": "a", "peer": "h:1", "extra": 1},
        {"name": "a", "peer": "h:1", "replaces": -1},
        {"name": "a", "peer": "h:1", "replaces": 1 << 63},
        {"name": "a", "peer": "h:1", "promote": 1},
        {"name": 3, "peer": "h:1"},
        {"name": "a\n", "peer": "h:1"},
        {"name": "a" * 300, "peer": "h:1"},
    ],
)
def test_malformed_contexts_are_refused(obj: object) -> None:
    with pytest.raises(ValueError):
        members.decode_context(msgpack.packb(obj))


def test_garbage_and_oversized_contexts_are_refused() -> None:
    with pytest.raises(ValueError):
        members.decode_context(b"\xc1")
    with pytest.raises(ValueError):
        members.decode_context(b"\x90" * (confchange.CONTEXT_BYTES_MAX + 1))


def test_the_table_follows_committed_changes_and_survives_a_snapshot() -> None:
    machine = StateMachine()
    add = ConfChange(ConfChangeType.ADD_LEARNER, 4, members.encode_context(INFO))
    conf = ConfState(voters=(1, 2, 3), learners=(4,))
    machine.apply(Entry(term=1, index=1, type=EntryType.CONF_CHANGE, data=conf_entry(add, conf)))
    assert machine.members.infos() == {4: INFO}
    # A snapshot carries the table: a node restored from it (log compacted) still knows 4.
    restored = StateMachine()
    restored.restore(machine.snapshot(), 1)
    assert restored.members.infos() == {4: INFO}
    assert restored.digest() == machine.digest()
    remove = ConfChange(ConfChangeType.REMOVE, 4)
    after = ConfState(voters=(1, 2, 3), removed=(4,))
    restored.apply(
        Entry(term=1, index=2, type=EntryType.CONF_CHANGE, data=conf_entry(remove, after))
    )
    assert restored.members.infos() == {}


def test_a_malformed_members_section_is_refused() -> None:
    table = MemberTable()
    for obj in ([[0, b""]], [[4, b"junk"]], "x", [[4, members.encode_context(INFO)]] * 2):
        with pytest.raises(ProtocolError):
            table.load_obj(obj)


def test_address_book() -> None:
    bootstrap = {1: "a:1", 2: "b:1", 3: "c:1"}
    conf = ConfState(voters=(1, 2, 3), learners=(4,))
    infos = {4: MemberInfo("3", "c:2"), 5: MemberInfo("extra", "e:1")}
    conf = ConfState(voters=(1, 2, 3), learners=(4, 5))
    # Node 1 sees everyone but itself; member 4 took slot "3" over: node 1 reaches it at its
    # own --peers entry for that slot; member 5 (no slot) at its context's address.
    assert members.address_book(bootstrap, infos, conf, 1, "1") == {
        2: "b:1",
        3: "c:1",
        4: "c:1",
        5: "e:1",
    }
    # Node 4 holds slot "3": the bootstrap entry of its own name is itself, left out.
    assert members.address_book(bootstrap, infos, conf, 4, "3") == {1: "a:1", 2: "b:1", 5: "e:1"}
    # A newer member of the same name is not this node: the address of its context.
    newer = {6: MemberInfo("3", "f:1")}
    assert members.address_book(bootstrap, newer, ConfState(voters=(1, 2, 4, 6)), 4, "3") == {
        1: "a:1",
        2: "b:1",
        6: "f:1",
    }
    # Before a joining node has a configuration: every bootstrap peer.
    assert members.address_book(bootstrap, {}, ConfState(), 4, "3") == {1: "a:1", 2: "b:1"}
    # A removed member leaves the book.
    removed = ConfState(voters=(1, 2, 4), removed=(3, 5))
    assert members.address_book(bootstrap, infos, removed, 1, "1") == {2: "b:1", 4: "c:1"}


def test_heal_removes_the_replaced_voter_before_promoting() -> None:
    conf = ConfState(voters=(1, 2, 3), learners=(4,))
    infos = {4: MemberInfo("3", "c:1", replaces=3, promote=True)}
    assert members.heal_step(conf, infos, lambda learner: False) is None
    assert members.heal_step(conf, infos, lambda learner: True) == ConfChange(
        ConfChangeType.REMOVE, 3
    )
    conf = ConfState(voters=(1, 2), learners=(4,), removed=(3,))
    assert members.heal_step(conf, infos, lambda learner: True) == ConfChange(
        ConfChangeType.PROMOTE, 4
    )


def test_heal_needs_positive_evidence() -> None:
    # A learner added by `member add` (promote false) is left to the operator; a silent
    # voter with no one claiming its name is never removed.
    conf = ConfState(voters=(1, 2, 3), learners=(4,))
    assert members.heal_step(conf, {4: MemberInfo("x", "d:1")}, lambda _: True) is None
    joined = {4: MemberInfo("x", "d:1", promote=True)}
    assert members.heal_step(conf, joined, lambda _: True) == ConfChange(ConfChangeType.PROMOTE, 4)


def test_heal_removes_every_older_holder_of_the_name() -> None:
    # 4 joined for slot 3 and was lost before its promotion; 5 is the slot back again.
    conf = ConfState(voters=(1, 2, 3), learners=(4, 5))
    infos = {
        4: MemberInfo("3", "c:1", replaces=3, promote=True),
        5: MemberInfo("3", "c:1", replaces=4, promote=True),
    }
    caught_up = {5}.__contains__
    first = members.heal_step(conf, infos, caught_up)
    assert first == ConfChange(ConfChangeType.REMOVE, 3)
    conf = ConfState(voters=(1, 2), learners=(4, 5), removed=(3,))
    assert members.heal_step(conf, infos, caught_up) == ConfChange(ConfChangeType.REMOVE, 4)
    assert members.holder_of("3", conf, infos) == 5
