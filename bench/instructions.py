"""Instructions the leader executes per acknowledged write: a cost that the machine's load
does not move, for comparing two versions of the code on a shared, noisy machine.

CPU time per write (bench/throughput.py) grows with the load of the machine: on the shared
2-core machine it varied by 20% between two runs of the same commit, and a regression of a
few percent drowned in it. An instruction count does not depend on who else runs. So this
benchmark starts a local three-node cluster (LocalCluster) in which node 1 runs under
valgrind's callgrind with its instrumentation switched on only once the cluster is up, and
the other two wait 60 s before an election of their own, so that node 1 becomes the leader.
Ticks are 100 ms (heartbeats every 0.5 s, node 1's election timeout 2 s): a node under
callgrind runs some 50 times slower and must still lead. Then, in each round:

- a load window: one writer PUTs 100-byte values to node 1, one at a time, `--rate` a
  second (4: well below what a node under callgrind serves, so every version is measured at
  the same rate, and the same background work of ticks and heartbeats falls on each write),
  for `--seconds`;
- an idle window of the same length: nothing is sent;

With `--burst K`, each of those writes is K writes sent at once, each on a connection of its
own (K=16 at 1 a second: a leader proposes the puts of one turn as one batch entry, so this
measures the per-write cost with batching).

The leader's instructions (callgrind's Ir, zeroed and dumped around each window) give
the instructions per write above idle: (Ir of the load window - idle Ir per second x its
length) / writes. The idle rate (ticks, heartbeats, pings, timers) is reported too.

`--tree DIR` (repeatable) measures the kvstore of another checkout (for example an older
commit made with `git worktree add`): the measurement runs with that checkout first on the
path, and the trees are measured alternately, round after round. The figures are medians
over the rounds, with each tree's ratio to the first one.

    python bench/instructions.py                                   # this checkout, 2 rounds
    python bench/instructions.py --tree /tmp/old --tree . --rounds 3 --json out.json
    python bench/instructions.py --tree /tmp/old --tree . --rate 1 --burst 16

Needs valgrind (Debian: apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runinfo import RunInfo, ScratchDir, output_path
from stats import median as nearest_rank_median

HERE = Path(__file__).resolve().parent
WRAPPER = """#!/bin/sh
# The "python" LocalCluster starts nodes with: node 1 under callgrind, the others slow to
# campaign, all with 100 ms ticks.
case " $* " in
  *" --id 1 "*) exec valgrind --tool=callgrind --instr-atstart=no \\
      --callgrind-out-file="{out}/callgrind.%p" {python} "$@" \\
      --tick-interval-ms 100 --heartbeat-ticks 5 --election-ticks 20 ;;
  *) exec {python} "$@" --tick-interval-ms 100 --heartbeat-ticks 5 --election-ticks 600 ;;
esac
"""


def _callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, timeout=300, check=False)


def _dumped_instructions(out: Path, pid: int) -> int:
    """The total Ir of the newest dump of process `pid`."""
    dumps = sorted(glob.glob(f"{out}/callgrind.{pid}*"), key=os.path.getmtime)
    text = Path(dumps[-1]).read_text()
    found = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
    if found is None:
        raise RuntimeError(f"no instruction total in {dumps[-1]}")
    return int(found.group(1))


async def _write_for(
    url: str, seconds: float, first_seq: int, rate: float, burst: int = 1
) -> tuple[int, int]:
    """PUT `burst` values at once (each on a connection of its own), a burst every 1/`rate`
    s (or as soon as the previous one is answered, when that is later), for `seconds`;
    (writes, last seq). A burst's writes reach the leader together, so it may propose them
    as one batch entry."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=60)

    async def put(session: aiohttp.ClientSession, seq: int, acked_below: int) -> None:
        headers = {
            "Kvstore-Request-Id": f"instructions:{seq}",
            "Kvstore-Acked-Below": str(acked_below),
        }
        async with session.put(
            f"{url}/v1/kv/key{seq % 1000:05d}", data=b"x" * 100, headers=headers
        ) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"PUT answered {response.status}: {body[:200]!r}")

    bursts, writes, seq = 0, 0, first_seq
    async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as session:
        started = time.perf_counter()
        stop_at = started + seconds
        while (now := time.perf_counter()) < stop_at:
            due = started + bursts / rate
            if due > now:
                await asyncio.sleep(min(due, stop_at) - now)
                continue
            # Every seq below the burst's first was answered: that is what acked_below says.
            first = seq + 1
            await asyncio.gather(*(put(session, first + i, first) for i in range(burst)))
            seq += burst
            writes += burst
            bursts += 1
    return writes, seq


def measure(scratch: Path, seconds: float, rate: float, burst: int) -> dict[str, Any]:
    """One round in the kvstore found first on the path: the child side of `--tree`."""
    from kvstore.server.localcluster import LocalCluster

    out = scratch / "callgrind"
    out.mkdir(parents=True, exist_ok=True)
    wrapper = scratch / "python-wrapper"
    wrapper.write_text(WRAPPER.format(out=out, python=sys.executable))
    wrapper.chmod(0o755)
    with LocalCluster(scratch / "cluster", 3, python=str(wrapper)) as cluster:
        leader = cluster.wait_for_leader(timeout_s=120)
        if leader != 1:
            raise RuntimeError(f"node {leader} leads, not node 1 (the one under callgrind)")
        url, pid = cluster.client_url(1), cluster.pid(1)
        assert pid is not None
        _, seq = asyncio.run(_write_for(url, 2.0, 0, rate))  # warm up, not instrumented
        _callgrind_control("--instr=on", str(pid))
        _, seq = asyncio.run(_write_for(url, 3.0, seq, rate))  # warm up, instrumented
        windows: dict[str, tuple[int, float, int]] = {}
        for window in ("load", "idle"):
            _callgrind_control("--zero", str(pid))
            started = time.perf_counter()
            writes = 0
            if window == "load":
                writes, seq = asyncio.run(_write_for(url, seconds, seq, rate, burst))
            else:
                time.sleep(seconds)
            elapsed = time.perf_counter() - started
            _callgrind_control("--dump", str(pid))
            time.sleep(1.0)  # the dump is written asynchronously
            windows[window] = (writes, elapsed, _dumped_instructions(out, pid))
        if cluster.leader() != 1:
            raise RuntimeError("node 1 lost the leadership during the run")
    writes, load_s, load_ir = windows["load"]
    _, idle_s, idle_ir = windows["idle"]
    idle_per_s = idle_ir / idle_s
    return {
        "writes": writes,
        "writes_per_s": writes / load_s,
        "instructions_per_write": load_ir / writes,
        "instructions_per_write_above_idle": (load_ir - idle_per_s * load_s) / writes,
        "idle_instructions_per_s": idle_per_s,
    }


def _tree_commit(tree: Path) -> str | None:
    completed = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return completed.stdout.strip() or None


def _round_in(
    tree: Path, scratch: Path, seconds: float, rate: float, burst: int
) -> dict[str, Any]:
    """Run `measure` in a child process that imports the kvstore of `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    child = subprocess.run(
        [
            sys.executable,
            str(HERE / "instructions.py"),
            "--child",
            str(scratch),
            str(seconds),
            str(rate),
            str(burst),
        ],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"the round in {tree} failed:\n{child.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", type=Path, help="a checkout to measure")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per tree (default 2)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each window")
    parser.add_argument("--json", dest="json_path", help="write the results as JSON here")
    parser.add_argument(
        "--rate", type=float, default=4.0, help="writes started per second (default 4)"
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=1,
        help="writes sent at once each time (default 1: one at a time; more: a leader's batch)",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        scratch, seconds, rate, burst = args.child
        print(json.dumps(measure(Path(scratch), float(seconds), float(rate), int(burst))))
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    run = RunInfo(argv)
    print(f"instructions benchmark: {run.describe()}", flush=True)
    trees = [tree.resolve() for tree in (args.tree or [HERE.parent])]
    rounds: dict[str, list[dict[str, Any]]] = {str(tree): [] for tree in trees}
    with ScratchDir(None, keep=False, prefix="kvinstructions-") as base:
        for number in range(args.rounds):
            for index, tree in enumerate(trees):
                scratch = Path(base) / f"round{number}-tree{index}"
                result = _round_in(tree, scratch, args.seconds, args.rate, args.burst)
                rounds[str(tree)].append(result)
                print(
                    f"{tree.name:>12} round {number + 1}: {result['writes']} writes, "
                    f"{result['instructions_per_write_above_idle'] / 1e3:,.0f}k instructions "
                    f"per write above idle ({result['instructions_per_write'] / 1e3:,.0f}k in "
                    f"all), idle {result['idle_instructions_per_s'] / 1e6:.2f}M/s",
                    flush=True,
                )
    summary = []
    first: float | None = None
    for tree in trees:
        results = rounds[str(tree)]
        median = nearest_rank_median(r["instructions_per_write_above_idle"] for r in results)
        total = nearest_rank_median(r["instructions_per_write"] for r in results)
        idle = nearest_rank_median(r["idle_instructions_per_s"] for r in results)
        first = median if first is None else first
        summary.append(
            {
                "tree": str(tree),
                "commit": _tree_commit(tree),
                "instructions_per_write_above_idle_median": median,
                "instructions_per_write_median": total,
                "idle_instructions_per_s_median": idle,
                "ratio_to_first": median / first,
                "rounds": results,
            }
        )
        print(
            f"{tree.name:>12} ({(_tree_commit(tree) or '?')[:7]}): median "
            f"{median / 1e3:,.0f}k instructions per write above idle "
            f"(x{median / first:.3f} of the first), {total / 1e3:,.0f}k in all, "
            f"idle {idle / 1e6:.2f}M/s"
        )
    path = output_path(args.json_path, "instructions.json")
    path.write_text(json.dumps({"run": run.finish(), "results": summary}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
