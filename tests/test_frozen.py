"""kvstore/frozen.py: the cheaper __init__ keeps every behaviour of a frozen dataclass."""

from __future__ import annotations

import dataclasses

import pytest

from kvstore.frozen import quick_init
from kvstore.kv.commands import KeyValue, Put, RequestId, WriteResult
from kvstore.raft.types import Entry, Message, MessageType


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class _Point:
    x: int
    y: int = 7
    label: str = "p"

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("x must be >= 0")


def test_fields_defaults_equality_hash_and_repr_are_a_dataclass_s() -> None:
    point = _Point(1)
    assert (point.x, point.y, point.label) == (1, 7, "p")
    assert _Point(1, y=2, label="q") == _Point(x=1, y=2, label="q")
    assert hash(_Point(1)) == hash(_Point(1)) and _Point(1) != _Point(2)
    assert repr(_Point(3, 4, "r")) == "_Point(x=3, y=4, label='r')"
    assert dataclasses.replace(point, y=9) == _Point(1, 9)
    match point:
        case _Point(x, y):
            assert (x, y) == (1, 7)


def test_the_instance_stays_frozen_and_post_init_still_checks() -> None:
    point = _Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.x = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="x must be"):
        _Point(-1)
    with pytest.raises(TypeError):
        _Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Point(1, 2, "l", 4)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Point(1, z=3)  # type: ignore[call-arg]


def test_what_it_does_not_support_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(TypeError):

        @quick_init
        @dataclasses.dataclass(slots=True)
        class NotFrozen:
            x: int

    with pytest.raises(TypeError):

        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True)
        class WithFactory:
            x: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError):

        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
        class KeywordOnly:
            x: int

    with pytest.raises(TypeError):

        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True)
        class NotInInit:
            x: int
            y: int = dataclasses.field(default=0, init=False)

    with pytest.raises(TypeError):

        @quick_init
        @dataclasses.dataclass(frozen=True, slots=True)
        class WithInitVar:
            x: int
            scale: dataclasses.InitVar[int]

            def __post_init__(self, scale: int) -> None:
                pass


def test_the_hot_values_keep_their_checks_and_defaults() -> None:
    with pytest.raises(ValueError):
        RequestId("bad id", 1)
    with pytest.raises(ValueError):
        Put(key="", value=b"v", request=None, time_ms=0)
    put = Put("k", b"v", RequestId("c", 1), 5)
    assert (put.if_revision, put.create_only, put.acked_below, put.lease) == (None, False, 0, 0)
    message = Message(MessageType.APPEND, 2, 1, 3, entries=(Entry(3, 4),))
    assert message.index == 0 and message.entries[0].data == b"" and message.snapshot is None
    result = WriteResult(True, 5, KeyValue("k", b"", 5, 5, 1), None, None)
    assert result.txn is None and result.deleted == 0 and result.current_revision == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.term = 4  # type: ignore[misc]
