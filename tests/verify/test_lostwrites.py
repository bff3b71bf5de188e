"""The lost-write checker on hand-made histories."""

from __future__ import annotations

from kvstore.verify.history import Operation, OpKind, Value
from kvstore.verify.lostwrites import check_lost_writes, final_reads_from_history


def put(process: int, key: str, value: str, invoke: int, ret: int | None) -> Operation:
    return Operation(process, OpKind.PUT, key, value, None, invoke, ret, ret is not None, None)


def get(process: int, key: str, invoke: int, ret: int, output: Value) -> Operation:
    return Operation(process, OpKind.GET, key, None, None, invoke, ret, True, output)


def test_the_last_acknowledged_write_is_visible() -> None:
    history = [put(1, "k", "v1", 0, 10), put(1, "k", "v2", 20, 30), get(2, "k", 40, 50, "v2")]
    result = check_lost_writes(history)
    assert result.ok, result.describe()
    assert result.acknowledged_writes == 2


def test_a_lost_write_is_caught() -> None:
    """v2 was acknowledged after v1 returned; the final read shows v1."""
    history = [put(1, "k", "v1", 0, 10), put(1, "k", "v2", 20, 30), get(2, "k", 40, 50, "v1")]
    result = check_lost_writes(history)
    assert not result.ok
    [lost] = result.lost
    assert lost.write.value == "v2" and lost.final == "v1"
    assert "finished before this write began" in lost.reason
    assert "lost p1 put(k, 'v2')" in result.describe()


def test_a_write_back_to_nothing_is_lost() -> None:
    result = check_lost_writes([put(1, "k", "v1", 0, 10)], {"k": None})
    assert [lost.write.value for lost in result.lost] == ["v1"]
    assert "initial value" in result.lost[0].reason


def test_concurrent_writes_may_end_either_way() -> None:
    for final in ("v1", "v2"):
        history = [put(1, "k", "v1", 0, 30), put(2, "k", "v2", 10, 40), get(3, "k", 50, 60, final)]
        assert check_lost_writes(history).ok


def test_an_unknown_write_may_overwrite_an_acknowledged_one() -> None:
    for final in ("v1", "v2"):
        history = [
            put(1, "k", "v1", 0, 10),
            put(2, "k", "v2", 20, None),
            get(3, "k", 50, 60, final),
        ]
        assert check_lost_writes(history).ok, final


def test_a_value_nobody_wrote_is_a_phantom() -> None:
    history = [put(1, "k", "v1", 0, 10), get(2, "k", 20, 30, "v9")]
    result = check_lost_writes(history)
    assert result.phantoms == (("k", "v9"),)
    assert not result.ok


def test_a_failed_write_that_shows_up_is_a_phantom() -> None:
    failed = Operation(1, OpKind.PUT, "k", "v1", None, 0, 10, False, None)
    result = check_lost_writes([failed, get(2, "k", 20, 30, "v1")])
    assert result.phantoms == (("k", "v1"),)


def test_a_key_without_a_final_read_fails() -> None:
    history = [put(1, "k", "v1", 0, 10), get(2, "k", 5, 8, None)]  # read began before ack
    assert final_reads_from_history(history) == {}
    result = check_lost_writes(history)
    assert result.unverified == ("k",) and not result.ok


def test_cas_and_delete() -> None:
    cas = Operation(1, OpKind.CAS, "k", "v2", "v1", 20, 30, True, True)
    failed_cas = Operation(1, OpKind.CAS, "k", "v3", "v9", 40, 50, True, False)
    history = [put(1, "k", "v1", 0, 10), cas, failed_cas]
    assert check_lost_writes(history, {"k": "v2"}).ok
    assert not check_lost_writes(history, {"k": "v1"}).ok
    delete = Operation(1, OpKind.DELETE, "k", None, None, 60, 70, True, True)
    assert check_lost_writes([*history, delete], {"k": None}).ok
    assert not check_lost_writes([*history, delete], {"k": "v2"}).ok


def test_acknowledged_appends_must_all_be_in_the_final_value() -> None:
    def append(process: int, value: str, invoke: int) -> Operation:
        return Operation(process, OpKind.APPEND, "k", value, None, invoke, invoke + 5, True, None)

    history = [append(1, "a", 0), append(2, "b", 10)]
    assert check_lost_writes(history, {"k": "ab"}).ok
    assert [lost.write.value for lost in check_lost_writes(history, {"k": "b"}).lost] == ["a"]


def test_appends_to_a_json_list_must_be_there_exactly_once() -> None:
    def append(process: int, value: str, invoke: int) -> Operation:
        return Operation(process, OpKind.APPEND, "k", value, None, invoke, invoke + 5, True, None)

    history = [append(1, "0.1.2", 0), append(2, "10.1.2", 10)]
    assert check_lost_writes(history, {"k": '["0.1.2", "10.1.2"]'}).ok
    missing = check_lost_writes(history, {"k": '["10.1.2"]'})  # "0.1.2" only as a substring
    assert [lost.write.value for lost in missing.lost] == ["0.1.2"]
    twice = check_lost_writes(history, {"k": '["0.1.2", "10.1.2", "0.1.2"]'})
    assert twice.duplicated == (("k", "0.1.2"),) and not twice.ok
    assert "appears more than once" in twice.describe()
