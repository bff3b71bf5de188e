"""`python -m kvstore.sim`: run simulation seeds and report.

    python -m kvstore.sim --seeds 1000      # seeds 1..1000, one summary line, exit 1 on failure
    python -m kvstore.sim --seed 42         # one seed: its result and trace hash (replay)

Throughput is measured in process CPU time (`os.times()`), not wall time: this package reads
no clock, and CPU time is also the fairer figure on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from kvstore.sim.runner import SimResult, describe_failure, run_seed, run_seeds


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvstore.sim", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--seed", type=int, help="run one seed and print its trace hash")
    group.add_argument("--seeds", type=int, help="run this many seeds (from --first)")
    parser.add_argument("--first", type=int, default=1, help="first seed of --seeds")
    parser.add_argument("--nodes", type=int, choices=(3, 5), help="force the cluster size")
    parser.add_argument("--no-liveness", action="store_true", help="skip the liveness phase")
    parser.add_argument(
        "--no-membership", action="store_true", help="no membership changes nor lost disks"
    )
    parser.add_argument("--trace", action="store_true", help="with --seed: print every event")
    parser.add_argument(
        "--coordination",
        action="store_true",
        help="add transactions, watchers and leases and their invariants (issue 14)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per seed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The replica logs the faults the simulation injects (a full disk skipping a compaction)
    # as warnings, which matter in a server's log but would bury this report.
    logging.getLogger("kvstore").setLevel(logging.ERROR)
    overrides: dict[str, object] = {}
    if args.nodes is not None:
        overrides["nodes"] = args.nodes
    if args.no_liveness:
        overrides["liveness"] = False
    if args.no_membership:
        overrides["membership"] = False
    if args.coordination:
        overrides["coordination"] = True
    started = _cpu_seconds()
    if args.seed is not None:
        result = run_seed(args.seed, overrides, trace_to=print if args.trace else None)
        print(
            f"seed {result.seed}: {'ok' if result.ok else 'FAILED'}, {result.ticks} ticks, "
            f"t={result.time}, {result.committed} entries committed, {result.events} events"
        )
        print("  " + ", ".join(f"{name} {count}" for name, count in result.counters))
        print(f"trace hash {result.trace_hash}")
        if not result.ok:
            print(describe_failure(result))
        return 0 if result.ok else 1

    def report(result: SimResult) -> None:
        if not result.ok:
            print(describe_failure(result), flush=True)
        elif args.verbose:
            print(f"seed {result.seed}: ok, {result.ticks} ticks, {result.trace_hash[:16]}")

    summary = run_seeds(
        range(args.first, args.first + args.seeds), on_result=report, overrides=overrides
    )
    print(summary.line(_cpu_seconds() - started))
    if args.verbose:
        print(
            "  " + ", ".join(f"{name} {count}" for name, count in sorted(summary.counters.items()))
        )
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
