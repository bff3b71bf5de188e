"""Parsers for reference histories of other linearizability checkers (Jepsen, Porcupine).

Two foreign formats become our history format (kvstore.verify.history), with each line's
number as its timestamp (both formats are in real-time order):

- Jepsen's etcd logs: `INFO  jepsen.util - PROCESS<TAB>:TYPE<TAB>:F<TAB>VALUE` (a few logs
  use spaces instead of tabs), a single compare-and-set register (recorded here under the
  key "register") that starts as nil.
  `:info` is an unknown outcome (return at infinity), as is an invocation that never
  completes. A `:fail` cas is a cas whose comparison failed (`ok: true, output: false`):
  that is what Jepsen's etcd client reports, and it is what Porcupine checks. Any other
  `:fail` did not take effect (`ok: false`).
- Porcupine's KV logs: `{:process P, :type :invoke|:ok, :f :get|:put|:append, :key "K",
  :value "V"}`; every key starts as the empty string, so check them with `initial=""`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvstore.verify.history import (
    HistoryError,
    Operation,
    OpKind,
    Output,
    Value,
    validate_history,
)

JEPSEN_KEY = "register"

# Fields are tab-separated in most logs and space-separated in a few (etcd_100 to 102).
_JEPSEN_LINE = re.compile(r"^INFO\s+jepsen\.util\s+-\s+(\d+)\s+:(\w+)\s+:(\w+)\s+(.*?)\s*$")
_JEPSEN_CLIENT = re.compile(r"^INFO\s+jepsen\.util\s+-\s+\d")
_JEPSEN_CAS = re.compile(r"^\[(-?\d+|nil) (-?\d+|nil)\]$")
_KV_LINE = re.compile(
    r'^\{:process (\d+), :type :(\w+), :f :(\w+), :key "([^"]*)", :value (nil|"[^"]*")\}$'
)
_JEPSEN_OPS = {"read": OpKind.GET, "write": OpKind.PUT, "cas": OpKind.CAS}
_KV_OPS = {"get": OpKind.GET, "put": OpKind.PUT, "append": OpKind.APPEND}


@dataclass(frozen=True, slots=True)
class _Pending:
    kind: OpKind
    invoke: int
    value: Value
    expected: Value


def _jepsen_value(text: str, where: str) -> Value:
    if text == "nil":
        return None
    try:
        return int(text)
    except ValueError:
        raise HistoryError(f"{where}: expected an integer or nil, got {text!r}") from None


def _jepsen_arguments(kind: OpKind, text: str, where: str) -> tuple[Value, Value]:
    """(value, expected) of an invocation."""
    if kind is OpKind.GET:
        return None, None
    if kind is OpKind.PUT:
        return _jepsen_value(text, where), None
    match = _JEPSEN_CAS.match(text)
    if match is None:
        raise HistoryError(f"{where}: expected [EXPECTED NEW] for a cas, got {text!r}")
    return _jepsen_value(match.group(2), where), _jepsen_value(match.group(1), where)


def _complete(
    pending: _Pending, process: int, status: str, text: str, at: int, where: str
) -> Operation:
    """The operation that `pending` becomes when its completion line says `status`."""
    kind = pending.kind
    return_: int | None = at
    ok = True
    output: Output = None
    if status == "info":
        return_, ok = None, False
    elif status == "fail" and kind is OpKind.CAS:
        output = False
    elif status == "fail":
        ok = False
    elif kind is OpKind.GET:
        output = _jepsen_value(text, where)
    elif kind is OpKind.CAS:
        output = True
    return Operation(
        process, kind, JEPSEN_KEY, pending.value, pending.expected,
        pending.invoke, return_, ok, output,
    )  # fmt: skip


def parse_jepsen_log(lines: Iterable[str], source: str = "<jepsen>") -> list[Operation]:
    """Operations of a Jepsen etcd log; lines other than client operations are skipped."""
    history: list[Operation] = []
    pending: dict[int, _Pending] = {}
    for number, line in enumerate(lines, start=1):
        match = _JEPSEN_LINE.match(line)
        where = f"{source}:{number}"
        if match is None:
            if _JEPSEN_CLIENT.match(line):
                raise HistoryError(f"{where}: unreadable client operation {line.strip()!r}")
            continue  # nemesis and other lines
        process, status, function, text = int(match[1]), match[2], match[3], match[4]
        kind = _JEPSEN_OPS.get(function)
        if kind is None:
            raise HistoryError(f"{where}: unknown operation :{function}")
        if status == "invoke":
            if process in pending:
                raise HistoryError(f"{where}: process {process} invokes twice")
            value, expected = _jepsen_arguments(kind, text, where)
            pending[process] = _Pending(kind, number, value, expected)
            continue
        if status not in ("ok", "fail", "info"):
            raise HistoryError(f"{where}: unknown type :{status}")
        started = pending.pop(process, None)
        if started is None or started.kind is not kind:
            raise HistoryError(f"{where}: :{status} :{function} without a matching invoke")
        history.append(_complete(started, process, status, text, number, where))
    for process, started in pending.items():
        history.append(_complete(started, process, "info", "", 0, source))
    validate_history(history)
    return history


def parse_porcupine_kv(lines: Iterable[str], source: str = "<kv>") -> list[Operation]:
    """Operations of a Porcupine KV log (all complete); check with `initial=""`."""
    history: list[Operation] = []
    pending: dict[int, tuple[OpKind, str, Value, int]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        match = _KV_LINE.match(line.strip())
        if match is None:
            raise HistoryError(f"{where}: not a KV log line: {line.strip()[:80]!r}")
        process, status, function, key = int(match[1]), match[2], match[3], match[4]
        value = None if match[5] == "nil" else match[5][1:-1]
        kind = _KV_OPS.get(function)
        if kind is None:
            raise HistoryError(f"{where}: unknown operation :{function}")
        if status == "invoke":
            if process in pending:
                raise HistoryError(f"{where}: process {process} invokes twice")
            pending[process] = (kind, key, None if kind is OpKind.GET else value, number)
            continue
        started = pending.pop(process, None)
        if status != "ok" or started is None or started[:2] != (kind, key):
            raise HistoryError(f"{where}: :{status} :{function} without a matching invoke")
        output = value if kind is OpKind.GET else None
        history.append(
            Operation(process, kind, key, started[2], None, started[3], number, True, output)
        )
    if pending:
        raise HistoryError(f"{source}: processes {sorted(pending)} never completed")
    validate_history(history)
    return history


@dataclass(frozen=True, slots=True)
class Fixture:
    """One reference history with its known verdict."""

    name: str  # the path relative to the fixture folder, as in expected.tsv
    history: list[Operation]
    initial: Value
    linearizable: bool


def load_fixtures(folder: Path) -> list[Fixture]:
    """Every history listed in `folder`/expected.tsv, parsed, with its expected verdict."""
    fixtures: list[Fixture] = []
    rows = (folder / "expected.tsv").read_text(encoding="utf-8").splitlines()
    for number, row in enumerate(rows[1:], start=2):
        if not row.strip():
            continue
        name, _, verdict = row.partition("\t")
        if verdict not in ("linearizable", "not-linearizable"):
            raise HistoryError(f"expected.tsv:{number}: unknown verdict {verdict!r}")
        path = folder / name
        with path.open(encoding="utf-8") as file:
            if name.endswith(".log"):
                history, initial = parse_jepsen_log(file, name), None
            else:
                history, initial = parse_porcupine_kv(file, name), ""
        fixtures.append(Fixture(name, history, initial, verdict == "linearizable"))
    return fixtures
