"""`python -m kvstore.verify HISTORY.jsonl`: check a recorded history after the fact.

Runs the linearizability and lost-write checkers on a history file (format: history.py) and
prints both reports; the exit status is 0 only if both pass. The search budget is counted
in steps (`--max-steps`), not seconds, because this package reads no clock.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kvstore.verify.history import HistoryError, read_history
from kvstore.verify.linearizability import check_linearizability
from kvstore.verify.lostwrites import check_lost_writes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvstore.verify", description="Check a recorded kvstore history."
    )
    parser.add_argument("history", type=Path, help="JSON lines, one operation each")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=50_000_000,
        help="linearizability search budget in steps (out of budget = failure)",
    )
    args = parser.parse_args(argv)
    try:
        history = read_history(args.history)
    except (OSError, HistoryError) as error:
        print(f"kvstore.verify: {error}", file=sys.stderr)
        return 2
    linearizability = check_linearizability(history, max_steps=args.max_steps)
    lost_writes = check_lost_writes(history)
    print(f"{len(history)} operation(s) in {args.history}")
    print(linearizability.describe())
    print(lost_writes.describe())
    return 0 if linearizability.ok and lost_writes.ok else 1


if __name__ == "__main__":
    sys.exit(main())
