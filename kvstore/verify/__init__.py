"""History format and checkers: linearizability, lost writes, exactly-once, cluster invariants.

Pure code (no clock, no I/O besides reading and writing history files), shared by the
simulator, the chaos drills and the tests. Entry points:

- `history`: `Operation`, `OpKind`, `read_history`, `write_history`, `validate_history`.
- `linearizability.check_linearizability(history, initial=None, deadline=...)`.
- `lostwrites.check_lost_writes(history, final_reads=None)`.
- `exactly_once.check_exactly_once(applied, counter=check_counter(...))`.
- `invariants.check_cluster_invariants(committed=..., applied=..., hard_states=...)`.

Every result has `.ok` and `.describe()`; a linearizability check that ran out of time is
not ok.
"""

from kvstore.verify.exactly_once import check_counter, check_exactly_once
from kvstore.verify.history import (
    HistoryError,
    Operation,
    OpKind,
    read_history,
    validate_history,
    write_history,
)
from kvstore.verify.invariants import check_cluster_invariants
from kvstore.verify.linearizability import Verdict, check_linearizability, deadline_after
from kvstore.verify.lostwrites import check_lost_writes

__all__ = [
    "HistoryError",
    "OpKind",
    "Operation",
    "Verdict",
    "check_cluster_invariants",
    "check_counter",
    "check_exactly_once",
    "check_linearizability",
    "check_lost_writes",
    "deadline_after",
    "read_history",
    "validate_history",
    "write_history",
]
