"""`kvstore chaos`: run a chaos drill (or a named matrix of drills) against a local cluster
that the command starts itself, print the report, exit non-zero when any checker failed.

While a drill runs, progress goes to stderr (`--quiet` turns it off): a line per phase and
per fault injected, healed and recovered from, and the state of the run (time, operations so
far by outcome, the faults in force): redrawn in place every second on a terminal, one line
every five seconds otherwise (a file, a pipe, CI). The report goes to stdout and explains
each outcome it counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from kvstore.chaos.drill import DrillConfig, DrillProgress, DrillReport, run_drill
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
        help="run a named set of drills instead (smoke: 20 short runs; full: the long matrix)",
    )  # fmt: skip
    parser.add_argument(
        "--unsafe-local-reads", action="store_true",
        help="UNSAFE: nodes answer reads without ReadIndex (to see the checkers fail)",
    )  # fmt: skip
    parser.add_argument(
        "--secure", action="store_true",
        help="TLS on both ports and client authentication (--auth, a root token) on the nodes",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress on stderr, only the report"
    )
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
            observer = None if args.quiet else ConsoleProgress(sys.stderr)
            try:
                report = asyncio.run(run_drill(config, observer))
            finally:
                if observer is not None:
                    observer.close()
        except ValueError as exc:
            print(f"kvstore chaos: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # The drill stopped its nodes on the way out and logged its run folder, kept.
            print("kvstore chaos: interrupted; the nodes were stopped, the run folder kept",
                  file=sys.stderr)  # fmt: skip
            return 130
        reports.append(report)
        print(report.render(), flush=True)
        print(flush=True)
    if len(reports) > 1:
        print(_summary(reports))
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_json() for r in reports], indent=2))
    return 0 if all(report.ok for report in reports) else 1


class ConsoleProgress:
    """Prints a running drill's progress: on a terminal, a status line redrawn in place
    every second under the event lines; elsewhere, one status line every five seconds."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        isatty = getattr(stream, "isatty", None)
        self.interactive = bool(isatty is not None and isatty())
        self.interval_s = 1.0 if self.interactive else 5.0
        self._status_shown = False

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False

    def event(self, elapsed_s: float, message: str) -> None:
        self._clear_status()
        self.stream.write(f"{elapsed_s:6.1f}s  {message}\n")
        self.stream.flush()

    def progress(self, snapshot: DrillProgress) -> None:
        faults = ", ".join(snapshot.faults) or "none"
        line = (
            f"{snapshot.elapsed_s:6.1f}s  of {snapshot.duration_s:.0f} s: "
            f"operations ok {snapshot.ok}, failed {snapshot.failed}, unknown "
            f"{snapshot.unknown}; fault in force: {faults}"
        )
        if self.interactive:
            self._clear_status()
            self.stream.write(line)
            self._status_shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._clear_status()
        self.stream.flush()


def _configs(args: argparse.Namespace) -> list[DrillConfig]:
    common: dict[str, Any] = {
        "processes": args.processes,
        "keep": args.keep,
        "unsafe_local_reads": args.unsafe_local_reads,
        "secure": args.secure,
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
