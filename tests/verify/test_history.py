"""The history format: JSON lines round trip, and malformed records fail with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvstore.verify.history import (
    HistoryError,
    Operation,
    OpKind,
    parse_history,
    read_history,
    validate_history,
    write_history,
)

LINE = {
    "process": 3, "op": "put", "key": "k1", "value": "v17", "expected": None,
    "invoke": 1200, "return": 1350, "ok": True, "output": None,
}  # fmt: skip


def line(**changes: object) -> str:
    return json.dumps({**LINE, **changes})


def test_the_design_example_parses() -> None:
    [operation] = parse_history([line()])
    assert operation == Operation(3, OpKind.PUT, "k1", "v17", None, 1200, 1350, True, None)
    assert not operation.unknown and operation.is_write
    assert operation.describe() == "p3 put(k1, 'v17') [1200, 1350]"


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    history = [
        Operation(1, OpKind.CAS, "k", "v2", "v1", 10, 20, True, False),
        Operation(2, OpKind.GET, "k", None, None, 15, 25, True, "v1"),
        Operation(3, OpKind.DELETE, "k", None, None, 30, None, False, None),
    ]
    path = tmp_path / "history.jsonl"
    write_history(path, history)
    assert read_history(path) == history
    assert history[2].unknown
    assert "unknown" in history[2].describe()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({k: v for k, v in LINE.items() if k != "ok"}), "missing field(s) ok"),
        (line(extra=1), "unknown field(s) extra"),
        (line(op="incr"), "op 'incr' is not one of"),
        (line(process="3"), "process must be an integer"),
        (line(invoke=True), "invoke must be an integer"),
        (line(value=1.5), "value must be a string, an integer or null"),
        (line(**{"return": 1000}), "return 1000 is before invoke 1200"),
        (line(value=None), "put needs a value"),
        (line(op="get"), "get takes no value"),
        (line(expected="v1"), "only cas takes an expected value"),
        (line(op="cas", expected="v1", output=None), "an ok cas outputs true or false"),
        (line(op="get", value=None, output=True), "get outputs a value or null"),
        (line(ok=False, output="x"), "a failed or unknown operation has output null"),
        (line(op="append", value=3), "append needs a string value"),
    ],
)
def test_malformed_records_are_rejected_with_the_line_number(text: str, message: str) -> None:
    with pytest.raises(HistoryError) as error:
        parse_history(["", text], source="h.jsonl")
    assert "h.jsonl:2" in str(error.value)
    assert message in str(error.value)


def test_an_unknown_outcome_may_say_ok_either_way() -> None:
    for ok in (True, False):
        [operation] = parse_history([line(ok=ok, **{"return": None})])
        assert operation.unknown
    with pytest.raises(HistoryError, match="a failed or unknown operation has output null"):
        parse_history([line(op="cas", expected="v1", ok=True, output=True, **{"return": None})])


def test_a_process_has_one_operation_in_flight() -> None:
    first = Operation(1, OpKind.PUT, "k", "a", None, 0, 100, True, None)
    overlapping = Operation(1, OpKind.PUT, "k", "b", None, 50, 150, True, None)
    with pytest.raises(HistoryError, match="invokes at 50 while operation #0 is in flight"):
        validate_history([first, overlapping])


def test_a_process_is_not_reused_after_an_unknown_outcome() -> None:
    unknown = Operation(1, OpKind.PUT, "k", "a", None, 0, None, False, None)
    later = Operation(1, OpKind.GET, "k", None, None, 50, 60, True, "a")
    with pytest.raises(HistoryError, match="reused after the unknown outcome"):
        validate_history([unknown, later])
    validate_history([unknown, Operation(2, OpKind.GET, "k", None, None, 50, 60, True, "a")])
