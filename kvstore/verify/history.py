"""The history format that workloads record and checkers read, defined here.

One `Operation` per logical client operation, written as one JSON object per line:

    {"process": 3, "op": "put", "key": "k1", "value": "v17", "expected": null,
     "invoke": 1200, "return": 1350, "ok": true, "output": null}

Rules that hold for a valid history (`validate_history` checks them):

- `invoke` is taken before the first attempt and `return` after the final answer
  (monotonic ns); `return >= invoke`.
- `return: null` means the outcome is unknown (timed out, connection lost after sending):
  the operation may have taken effect at any time after `invoke`, whatever `ok` says (the
  recorders write either). It has `output: null`, and it is the last operation of its
  process (the client continues as a new process).
- `ok: false` with a `return` time is a definite failure that did not take effect; checkers
  drop it.
- Outputs: a get outputs the value read (null when the key is absent); a cas outputs true when
  it swapped and false when the comparison failed; a delete outputs true (the key existed),
  false (it was absent) or null (not recorded); put and append output null.
- One operation in flight per process.

Values are strings or integers (the Jepsen fixtures use integers); write values are unique,
so a read names the write it saw. This module does file I/O through pathlib only and imports
no clock: the recorder supplies the timestamps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kvstore.errors import BadRequestError

Value = str | int | None
Output = str | int | bool | None

_FIELDS = ("process", "op", "key", "value", "expected", "invoke", "return", "ok", "output")


class HistoryError(BadRequestError):
    """A history record is malformed or breaks a rule of the history format."""

    code = "bad_history"


class OpKind(StrEnum):
    """What an operation does to its key."""

    GET = "get"
    PUT = "put"
    CAS = "cas"  # compare-and-set: if the key holds `expected`, set it to `value`
    DELETE = "delete"
    APPEND = "append"  # Porcupine's KV logs: concatenate `value` to the key's string


_WRITES = frozenset({OpKind.PUT, OpKind.CAS, OpKind.DELETE, OpKind.APPEND})
_KIND_NAMES = frozenset(kind.value for kind in OpKind)


@dataclass(frozen=True, slots=True)
class Operation:
    """One logical client operation. `return_` is the JSON field "return" (None = unknown)."""

    process: int
    op: OpKind
    key: str
    value: Value
    expected: Value
    invoke: int
    return_: int | None
    ok: bool
    output: Output

    @property
    def unknown(self) -> bool:
        """True when the outcome is unknown: it may or may not have taken effect."""
        return self.return_ is None

    @property
    def is_write(self) -> bool:
        return self.op in _WRITES

    def to_json(self) -> dict[str, object]:
        return {
            "process": self.process,
            "op": self.op.value,
            "key": self.key,
            "value": self.value,
            "expected": self.expected,
            "invoke": self.invoke,
            "return": self.return_,
            "ok": self.ok,
            "output": self.output,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, object], where: str = "record") -> Operation:
        """Build and validate an operation from a decoded JSON object."""
        missing = [name for name in _FIELDS if name not in record]
        if missing:
            raise HistoryError(f"{where}: missing field(s) {', '.join(missing)}")
        extra = sorted(set(record) - set(_FIELDS))
        if extra:
            raise HistoryError(f"{where}: unknown field(s) {', '.join(extra)}")
        op_name = record["op"]
        if not isinstance(op_name, str) or op_name not in _KIND_NAMES:
            kinds = ", ".join(sorted(_KIND_NAMES))
            raise HistoryError(f"{where}: op {op_name!r} is not one of {kinds}")
        kind = OpKind(op_name)
        operation = cls(
            process=_integer(record["process"], "process", where),
            op=kind,
            key=_string(record["key"], "key", where),
            value=_value(record["value"], "value", where),
            expected=_value(record["expected"], "expected", where),
            invoke=_integer(record["invoke"], "invoke", where),
            return_=_optional_integer(record["return"], "return", where),
            ok=_boolean(record["ok"], "ok", where),
            output=_output(record["output"], where),
        )
        operation.validate(where)
        return operation

    def validate(self, where: str = "operation") -> None:
        """Raise HistoryError if the fields contradict each other or the format's rules."""
        if self.process < 0:
            raise HistoryError(f"{where}: process must be >= 0, got {self.process}")
        if self.return_ is not None and self.return_ < self.invoke:
            raise HistoryError(f"{where}: return {self.return_} is before invoke {self.invoke}")
        self._validate_arguments(where)
        self._validate_output(where)

    def _validate_arguments(self, where: str) -> None:
        kind = self.op
        if kind in (OpKind.PUT, OpKind.CAS, OpKind.APPEND) and self.value is None:
            raise HistoryError(f"{where}: {kind.value} needs a value")
        if kind in (OpKind.GET, OpKind.DELETE) and self.value is not None:
            raise HistoryError(f"{where}: {kind.value} takes no value, got {self.value!r}")
        if kind is OpKind.APPEND and not isinstance(self.value, str):
            raise HistoryError(f"{where}: append needs a string value, got {self.value!r}")
        if kind is not OpKind.CAS and self.expected is not None:
            raise HistoryError(f"{where}: only cas takes an expected value")

    def _validate_output(self, where: str) -> None:
        output = self.output
        if not self.ok or self.return_ is None:
            if output is not None:
                raise HistoryError(f"{where}: a failed or unknown operation has output null")
            return
        kind = self.op
        if kind is OpKind.GET and isinstance(output, bool):
            raise HistoryError(f"{where}: get outputs a value or null, got {output!r}")
        if kind is OpKind.CAS and not isinstance(output, bool):
            raise HistoryError(f"{where}: an ok cas outputs true or false, got {output!r}")
        if kind is OpKind.DELETE and output is not None and not isinstance(output, bool):
            raise HistoryError(f"{where}: delete outputs true, false or null, got {output!r}")
        if kind in (OpKind.PUT, OpKind.APPEND) and output is not None:
            raise HistoryError(f"{where}: {kind.value} outputs null, got {output!r}")

    def describe(self) -> str:
        """A short human-readable form, e.g. `p3 cas(k1, v1->v2)=false [1200, 1350]`."""
        kind = self.op
        if kind is OpKind.GET:
            call = f"get({self.key})"
        elif kind is OpKind.DELETE:
            call = f"delete({self.key})"
        elif kind is OpKind.CAS:
            call = f"cas({self.key}, {self.expected!r}->{self.value!r})"
        else:
            call = f"{kind.value}({self.key}, {self.value!r})"
        if self.return_ is None:
            outcome = " unknown"
        elif not self.ok:
            outcome = " failed"
        elif kind in (OpKind.GET, OpKind.CAS) or self.output is not None:
            outcome = f"={self.output!r}"
        else:
            outcome = ""
        end = "inf" if self.return_ is None else str(self.return_)
        return f"p{self.process} {call}{outcome} [{self.invoke}, {end}]"


def _integer(value: object, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HistoryError(f"{where}: {name} must be an integer, got {value!r}")
    return value


def _optional_integer(value: object, name: str, where: str) -> int | None:
    return None if value is None else _integer(value, name, where)


def _string(value: object, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise HistoryError(f"{where}: {name} must be a string, got {value!r}")
    return value


def _boolean(value: object, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise HistoryError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _value(value: object, name: str, where: str) -> Value:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise HistoryError(f"{where}: {name} must be a string, an integer or null, got {value!r}")


def _output(value: object, where: str) -> Output:
    if isinstance(value, bool):
        return value
    return _value(value, "output", where)


def validate_history(history: Sequence[Operation]) -> None:
    """Check each operation, and that each process has one operation in flight at a time.

    After an unknown outcome a process must not be reused (the client continues as a new
    process), because the unknown operation is still in flight until the end of time.
    """
    last: dict[int, tuple[int, Operation]] = {}
    order = sorted(range(len(history)), key=lambda i: history[i].invoke)
    for index in order:
        operation = history[index]
        operation.validate(f"operation #{index}")
        previous = last.get(operation.process)
        if previous is not None:
            previous_index, previous_op = previous
            if previous_op.return_ is None:
                raise HistoryError(
                    f"operation #{index}: process {operation.process} is reused after the "
                    f"unknown outcome of operation #{previous_index}"
                )
            if operation.invoke < previous_op.return_:
                raise HistoryError(
                    f"operation #{index}: process {operation.process} invokes at "
                    f"{operation.invoke} while operation #{previous_index} is in flight "
                    f"(returns at {previous_op.return_})"
                )
        last[operation.process] = (index, operation)


def parse_history(lines: Iterable[str], source: str = "<history>") -> list[Operation]:
    """Parse JSON lines (blank lines skipped) into validated operations."""
    history: list[Operation] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise HistoryError(f"{where}: not JSON: {error.msg}") from None
        if not isinstance(record, dict):
            raise HistoryError(f"{where}: expected a JSON object, got {type(record).__name__}")
        history.append(Operation.from_json(record, where))
    validate_history(history)
    return history


def read_history(path: Path) -> list[Operation]:
    """Read and validate a JSONL history file."""
    with path.open(encoding="utf-8") as file:
        return parse_history(file, str(path))


def format_history(history: Iterable[Operation]) -> Iterator[str]:
    """One JSON line per operation, in the order given, each ending in a newline."""
    for operation in history:
        yield json.dumps(operation.to_json(), separators=(", ", ": ")) + "\n"


def write_history(path: Path, history: Iterable[Operation]) -> None:
    """Write a JSONL history file (the caller decides about fsync: this is test evidence)."""
    with path.open("w", encoding="utf-8") as file:
        file.writelines(format_history(history))
