"""The lost-write checker: every acknowledged write survives, or a later write replaced it.

A cheaper and more direct question than linearizability, asked of the same history: after
the faults heal, a final read of each key must show the value of an acknowledged write to
it, unless another write (acknowledged or of unknown outcome) that may have come after it
replaced that value. Values are unique (kvstore/verify/history.py), so a final value names its writer.

For each acknowledged write W of key k, with final value F:

- F is W's value (absent for a delete; for an append, F contains the appended piece): kept.
  For appends, F is either a concatenation (Porcupine's model: the piece must occur in it)
  or a JSON list (the chaos append workload: the element must be in it, exactly once).
- F was written by a write W2 that may follow W, i.e. W2 did not return before W was
  invoked (W2 may be of unknown outcome): W was overwritten, which is allowed.
- Otherwise W is lost: F is the initial value, or its writer finished before W began.

A final value that no write could have produced (or only a failed one) is reported as a
phantom. A key with acknowledged writes and no final read cannot be judged and fails the
check (a drill must read every key it wrote at the end).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvstore.verify.history import Operation, OpKind, Value, validate_history

_SHOWN = 20  # violations listed by describe(); the counts are always complete


@dataclass(frozen=True, slots=True)
class LostWrite:
    """An acknowledged write whose effect the final read does not show."""

    key: str
    write: Operation
    final: Value
    reason: str


@dataclass(frozen=True, slots=True)
class LostWritesResult:
    acknowledged_writes: int
    lost: tuple[LostWrite, ...]
    phantoms: tuple[tuple[str, Value], ...]  # (key, final value that no write produced)
    unverified: tuple[str, ...]  # keys with acknowledged writes and no final read
    duplicated: tuple[tuple[str, str], ...] = ()  # (key, appended element found twice or more)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.phantoms or self.unverified or self.duplicated)

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        lines = [
            f"lost writes: {verdict} ({self.acknowledged_writes} acknowledged write(s) checked, "
            f"{len(self.lost)} lost, {len(self.phantoms)} phantom value(s), "
            f"{len(self.unverified)} key(s) without a final read, "
            f"{len(self.duplicated)} element(s) appended more than once)"
        ]
        for lost in self.lost[:_SHOWN]:
            lines.append(f"  lost {lost.write.describe()}: final {lost.final!r}; {lost.reason}")
        for key, element in self.duplicated[:_SHOWN]:
            lines.append(f"  key {key!r}: element {element!r} appears more than once")
        for key, value in self.phantoms[:_SHOWN]:
            lines.append(f"  key {key!r}: final value {value!r} was never (successfully) written")
        if self.unverified:
            lines.append(f"  no final read of: {', '.join(map(repr, self.unverified[:_SHOWN]))}")
        return "\n".join(lines)


def final_reads_from_history(history: Sequence[Operation]) -> dict[str, Value]:
    """Per key, the value of its last completed get that began after every acknowledged
    write of the key had returned; keys without such a read are left out."""
    last_ack: dict[str, int] = {}
    for op in history:
        if _acknowledged(op) and op.return_ is not None:
            last_ack[op.key] = max(last_ack.get(op.key, op.return_), op.return_)
    finals: dict[str, tuple[int, Value]] = {}
    for op in history:
        if op.op is not OpKind.GET or not op.ok or op.return_ is None:
            continue
        if op.invoke < last_ack.get(op.key, op.invoke):
            continue
        if op.key not in finals or finals[op.key][0] <= op.invoke:
            assert not isinstance(op.output, bool)
            finals[op.key] = (op.invoke, op.output)
    return {key: value for key, (_, value) in finals.items()}


def check_lost_writes(
    history: Sequence[Operation],
    final_reads: Mapping[str, Value] | None = None,
    *,
    initial: Value = None,
) -> LostWritesResult:
    """Check every acknowledged write against the final reads (by default taken from the
    history with `final_reads_from_history`). Keys start as `initial` (None = absent).
    Raises HistoryError if the history breaks a rule of the format (`validate_history`)."""
    validate_history(history)
    finals = dict(final_reads_from_history(history) if final_reads is None else final_reads)
    writes: dict[str, list[Operation]] = {}
    for op in history:
        if op.is_write:
            writes.setdefault(op.key, []).append(op)
    lost: list[LostWrite] = []
    phantoms: list[tuple[str, Value]] = []
    unverified: list[str] = []
    duplicated: list[tuple[str, str]] = []
    acknowledged = 0
    for key in sorted(writes):
        acked = [op for op in writes[key] if _acknowledged(op)]
        acknowledged += len(acked)
        if key not in finals:
            if acked:
                unverified.append(key)
            continue
        final = finals[key]
        duplicated.extend((key, piece) for piece in _duplicated_elements(final, writes[key]))
        writers = [op for op in writes[key] if _may_have_written(op) and _produces(op, final)]
        if not writers and final != initial and not _is_appended(final, writes[key]):
            phantoms.append((key, final))
        for write in acked:
            reason = _why_lost(write, final, writers, writes[key], initial)
            if reason is not None:
                lost.append(LostWrite(key, write, final, reason))
    for key in sorted(set(finals) - set(writes)):
        if finals[key] != initial:
            phantoms.append((key, finals[key]))
    return LostWritesResult(
        acknowledged, tuple(lost), tuple(phantoms), tuple(unverified), tuple(duplicated)
    )


def _acknowledged(op: Operation) -> bool:
    """A write the client was told took effect."""
    if not op.is_write or not op.ok or op.return_ is None:
        return False
    return op.op is not OpKind.CAS or op.output is True


def _may_have_written(op: Operation) -> bool:
    """Acknowledged, or of unknown outcome (a cas whose comparison failed wrote nothing)."""
    return _acknowledged(op) or (op.is_write and op.return_ is None)


def _effect(op: Operation) -> Value:
    return None if op.op is OpKind.DELETE else op.value


def _produces(op: Operation, final: Value) -> bool:
    """True if `op` may be the last write before a read of `final`."""
    if op.op is OpKind.APPEND:
        return isinstance(final, str) and isinstance(op.value, str) and final.endswith(op.value)
    return _effect(op) == final


def _elements(final: Value) -> list[str] | None:
    """The elements of a final value that is a JSON list, else None."""
    if not isinstance(final, str) or not final.startswith("["):
        return None
    try:
        decoded = json.loads(final)
    except ValueError:
        return None
    if not isinstance(decoded, list):
        return None
    return [item if isinstance(item, str) else json.dumps(item) for item in decoded]


def _contains(final: Value, piece: Value) -> bool:
    """True if an appended `piece` shows in `final` (a JSON list, or a concatenation)."""
    elements = _elements(final)
    if elements is not None:
        return str(piece) in elements
    return isinstance(final, str) and isinstance(piece, str) and piece in final


def _duplicated_elements(final: Value, writes: list[Operation]) -> list[str]:
    elements = _elements(final)
    if elements is None:
        return []
    appended = {str(op.value) for op in writes if op.op is OpKind.APPEND}
    counts = Counter(elements)
    return sorted(e for e, count in counts.items() if count > 1 and e in appended)


def _is_appended(final: Value, writes: list[Operation]) -> bool:
    return isinstance(final, str) and any(op.op is OpKind.APPEND for op in writes)


def _why_lost(
    write: Operation,
    final: Value,
    writers: list[Operation],
    writes: list[Operation],
    initial: Value,
) -> str | None:
    """None if `final` is consistent with `write` having survived or been overwritten."""
    if write.op is OpKind.APPEND:
        if _contains(final, write.value):
            return None
        # Appends add to a value; only a put, cas or delete that may follow replaces it.
        replacing = [w for w in writes if w.op is not OpKind.APPEND and _may_have_written(w)]
        if any(not _before(w, write) for w in replacing):
            return None
        return "its piece is missing from the final value"
    if final == _effect(write):
        return None
    later = [w for w in writers if w is not write and not _before(w, write)]
    if later:
        return None
    if writers:
        return f"its writer {writers[0].describe()} finished before this write began"
    if final == initial:
        return "the key is back at its initial value"
    return "no write that may follow it produced the final value"


def _before(first: Operation, second: Operation) -> bool:
    """True if `first` returned before `second` was invoked (real-time order)."""
    return first.return_ is not None and first.return_ < second.invoke
