"""`kvstore chaos`: run a chaos drill (or a named matrix of drills) against a local cluster
that the command starts itself, print the report, exit non-zero when any checker failed."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from kvstore.chaos.drill import DrillConfig, DrillReport, run_drill
from kvstore.chaos.matrix import MATRICES
from kvstore.chaos.nemesis import ALL_FAULTS, FAMILIES
from kvstore.chaos.workload import WORKLOADS


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chaos",
        help="run a chaos drill: real nodes, faults, a workload, and the checkers' verdict",
        description=(
            "Start a three-node cluster on 127.0.0.1 behind fault-injecting proxies, run a "
            "workload while injecting faults, heal, read the final state and check the "
            "history (linearizability, lost writes, exactly-once, cluster invariants). "
            "Exit status 0 when every checker passed, 1 otherwise. Faults: "
            + ", ".join(f"{family} ({', '.join(names)})" for family, names in FAMILIES.items())
        ),
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument(
        "--faults", default="kill,pause,partition",
        help="comma-separated fault families or names (default kill,pause,partition)",
    )  # fmt: skip
    parser.add_argument("--workload", choices=WORKLOADS, default="register")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--processes", type=int, default=6, help="concurrent client processes")
    parser.add_argument("--dir", type=Path, default=None, help="run folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder even on success")
    parser.add_argument("--json", type=Path, default=None, help="write the report(s) as JSON")
    parser.add_argument(
        "--matrix", choices=sorted(MATRICES), default=None,
        help="run a named set of drills instead (smoke: 16 short runs; full: the long matrix)",
    )  # fmt: skip
    parser.add_argument(
        "--unsafe-local-reads", action="store_true",
        help="UNSAFE: nodes answer reads without ReadIndex (to see the checkers fail)",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        configs = _configs(args)
    except ValueError as exc:
        print(f"kvstore chaos: {exc}", file=sys.stderr)
        return 2
    reports: list[DrillReport] = []
    for index, config in enumerate(configs, 1):
        if len(configs) > 1:
            print(f"[{index}/{len(configs)}] {config.workload} {config.faults} seed {config.seed}",
                  file=sys.stderr, flush=True)  # fmt: skip
        try:
            report = asyncio.run(run_drill(config))
        except ValueError as exc:
            print(f"kvstore chaos: {exc}", file=sys.stderr)
            return 2
        reports.append(report)
        print(report.render(), flush=True)
        print(flush=True)
    if len(reports) > 1:
        print(_summary(reports))
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_json() for r in reports], indent=2))
    return 0 if all(report.ok for report in reports) else 1


def _configs(args: argparse.Namespace) -> list[DrillConfig]:
    common: dict[str, Any] = {
        "processes": args.processes,
        "keep": args.keep,
        "unsafe_local_reads": args.unsafe_local_reads,
    }
    if args.matrix is None:
        return [
            DrillConfig(
                duration_s=args.duration,
                faults=args.faults,
                workload=args.workload,
                seed=args.seed,
                base_dir=args.dir,
                **common,
            )
        ]
    configs = []
    for run in MATRICES[args.matrix]:
        base_dir = None if args.dir is None else args.dir / run.name
        configs.append(
            DrillConfig(
                duration_s=run.duration_s,
                faults=run.faults,
                workload=run.workload,
                seed=run.seed,
                base_dir=base_dir,
                **common,
            )
        )
    return configs


def _summary(reports: list[DrillReport]) -> str:
    names = ["linearizability", "lost writes", "exactly once", "invariants", "activity"]
    lines = ["summary: workload / faults / ops ok / unknown / faults / " + " / ".join(names)]
    for report in reports:
        marks = []
        for name in names:
            check = report.check(name)
            marks.append("-" if check is None else ("ok" if check.ok else "FAIL"))
        lines.append(
            f"  {report.config.workload:<9} {report.config.faults:<22} "
            f"{report.counts.get('ok', 0):>6} {report.counts.get('unknown', 0):>5} "
            f"{len(report.timeline):>3}  " + "  ".join(marks)
        )
    failed = sum(not report.ok for report in reports)
    lines.append(f"{len(reports) - failed} of {len(reports)} drills passed")
    return "\n".join(lines)


__all__ = ["ALL_FAULTS", "main", "register"]
