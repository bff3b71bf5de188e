"""Snapshot-stall benchmark: how long a node's event loop stalls while it takes a snapshot of
a large store, with the snapshot encoded in a forked child (the server's default) and on a
thread (the way before), side by side in one run.

For each store size (`--keys`, values of `--value-bytes`) a snapshot file is built once
(snapshot_transfer.py's: a StateMachine filled and encoded as a node does) and, for every
round, restored into a fresh data directory as a one-voter cluster. A one-node Replica is opened over it as `kvstore serve` opens one (DiskStorage,
deferred snapshots, the same garbage-collector setting: `gc.freeze()` after loading), elected,
and given one write so that a snapshot is due; then the server's own SnapshotTender is driven
(`tend()` every millisecond, as the driver does after each turn) until the snapshot is stored,
while a probe on the same uvloop event loop sleeps 1 ms at a time and records how late each
wake-up is. The modes alternate round by round (`--rounds` each), so both see the same
machine.

Reported per size and mode (medians over rounds, and the worst round):
- `stall_max_ms`: the longest the loop did not run the probe, from the snapshot's start to
  the file stored: what a heartbeat or a write's answer waits for at worst;
- `stall_p99_ms`: the 99th percentile of the probe's lateness over the same window;
- `begin_ms`: the `tend()` call that starts the snapshot (the freeze of the state on the
  thread path; the fork on the forked path);
- `snapshot_s`: from that call to the file stored;
- `probe_wakeups_per_s`: how often the loop got to run the probe (1,000 at best): the
  loop's share of the process while the snapshot was made.
The probe's lateness before the snapshot (`idle_stall_max_ms`) is the machine's noise (uvloop's
timers have a resolution of 1 ms: a lateness under about 1 ms is no stall).

    python bench/snapshot_stall.py --keys 1000000 --rounds 3 --json out.json
    python bench/snapshot_stall.py --keys 2000 --rounds 1          # what the test runs

Every loop is bounded by `--deadline-s`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runinfo import RunInfo
from bench.snapshot_transfer import build_snapshot
from bench.stats import median, percentile
from kvstore.kv.commands import Put, RequestId
from kvstore.raft.config import RaftConfig
from kvstore.replica import Replica
from kvstore.server.backup import restore_data_dir
from kvstore.server.metrics import NodeMetrics
from kvstore.server.snapshots import SnapshotTender
from kvstore.server.storage_thread import StorageThread
from kvstore.storage.disk import DiskStorage

MODES = ("thread", "fork")
_PROBE_S = 0.001
_IDLE_S = 0.5


def _step(replica: Replica, until: Callable[[], bool], deadline: float) -> None:
    """Process Readies until `until()` (a one-node cluster needs no messages)."""
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("the one-node replica did not get there in time")
        replica.process_ready(lambda messages: None)


def open_leader(data_dir: Path, deadline: float) -> Replica:
    """The one-node replica over `data_dir`, elected, one write applied: a snapshot is due."""
    replica = Replica(
        RaftConfig(id=1, peers=(1,)),
        DiskStorage(str(data_dir)),
        random.Random(),
        snapshot_entries=1,
        snapshot_log_ratio=0.0,
        defer_snapshots=True,
    )
    replica.node.campaign()
    _step(replica, lambda: replica.node.status().role.value == "leader", deadline)
    applied = replica.applied_index
    replica.propose(Put(key="bench/one", value=b"1", request=RequestId("bench", 1), time_ms=1))
    _step(replica, lambda: replica.applied_index > applied + 1, deadline)
    return replica


async def _probe(lateness: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(_PROBE_S)
        lateness.append(max(0.0, time.perf_counter() - started - _PROBE_S))


async def one_round(replica: Replica, fork: bool, deadline: float) -> dict[str, Any]:
    """Take one snapshot through SnapshotTender while the probe runs; its figures."""
    metrics = NodeMetrics(1)
    storage = StorageThread(
        replica,
        metrics,
        node_id=1,
        peer_ids=[],
        send=lambda message: None,
        is_leader=lambda: True,
        inline_entries_max=0,
        heartbeat_interval_s=0.05,
        election_timeout_s=0.2,
    )
    tender = SnapshotTender(replica, storage, metrics, fork=fork)
    idle: list[float] = []
    lateness: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(idle, stop), name="probe-idle")
    await asyncio.sleep(_IDLE_S)
    stop.set()
    await probe
    stop.clear()
    probe = asyncio.create_task(_probe(lateness, stop), name="probe")
    await asyncio.sleep(_PROBE_S / 2)  # the probe is asleep: the start's stall counts too
    before = replica.snapshot_index
    started = time.perf_counter()
    try:
        await tender.tend()
        begin_s = time.perf_counter() - started
        while replica.snapshot_index == before:
            if time.monotonic() > deadline:
                raise TimeoutError("the snapshot was not stored in time")
            await asyncio.sleep(_PROBE_S)
            await tender.tend()
        snapshot_s = time.perf_counter() - started
    finally:
        stop.set()
        await probe
        tender.close()
        storage.close()
    return {
        "idle_stall_max_ms": 1000 * max(idle, default=0.0),
        "stall_max_ms": 1000 * max(lateness, default=0.0),
        "stall_p99_ms": 1000 * percentile(lateness, 0.99),
        "begin_ms": 1000 * begin_s,
        "snapshot_s": snapshot_s,
        "probe_wakeups_per_s": len(lateness) / snapshot_s,
    }


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop, as `kvstore serve` runs on, when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_size(
    base: Path, keys: int, value_bytes: int, rounds: int, deadline_s: float
) -> dict[str, Any]:
    source = base / f"source-{keys}.snap"
    built = time.monotonic()
    size = build_snapshot(source, keys, value_bytes)
    print(
        f"{keys:,} keys: snapshot of {size / 1e6:.1f} MB built in {time.monotonic() - built:.1f} s"
    )
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for round_number in range(rounds):
        for mode in MODES:
            data_dir = base / f"data-{keys}-{mode}-{round_number}"
            restore_data_dir(str(source), str(data_dir), voters=(1,))
            deadline = time.monotonic() + deadline_s
            replica = open_leader(data_dir, deadline)
            gc.freeze()  # as the node does after loading its snapshot (server/node.py)
            try:
                with asyncio.Runner(loop_factory=_new_loop) as runner:
                    figures = runner.run(one_round(replica, mode == "fork", deadline))
            finally:
                replica.storage.close()
                del replica
                gc.unfreeze()
                gc.collect()
                shutil.rmtree(data_dir, ignore_errors=True)
            results[mode].append(figures)
            print(
                f"  round {round_number + 1} {mode:6}: stall max {figures['stall_max_ms']:7.1f} ms,"
                f" p99 {figures['stall_p99_ms']:6.1f} ms, begin {figures['begin_ms']:6.1f} ms,"
                f" snapshot {figures['snapshot_s']:5.2f} s,"
                f" probe {figures['probe_wakeups_per_s']:5.0f}/s"
                f" (idle stall max {figures['idle_stall_max_ms']:.1f} ms)"
            )
    source.unlink()
    summary = {
        mode: {name: median(round_[name] for round_ in rounds_) for name in rounds_[0]}
        | {"worst_stall_max_ms": max(round_["stall_max_ms"] for round_ in rounds_)}
        for mode, rounds_ in results.items()
    }
    for mode in MODES:
        figures = summary[mode]
        print(
            f"  median {mode:6}: stall max {figures['stall_max_ms']:7.1f} ms (worst"
            f" {figures['worst_stall_max_ms']:.1f}), p99 {figures['stall_p99_ms']:.1f} ms,"
            f" begin {figures['begin_ms']:.1f} ms, snapshot {figures['snapshot_s']:.2f} s"
        )
    thread, fork = summary["thread"], summary["fork"]
    if fork["stall_max_ms"] > 0:
        print(
            f"  thread / fork longest stall: {thread['stall_max_ms'] / fork['stall_max_ms']:.1f}x"
        )
    return {"keys": keys, "value_bytes": value_bytes, "snapshot_bytes": size,
            "rounds": results, "median": summary}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--keys", default="1000000", help="comma-separated store sizes")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="snapshots per mode and size")
    parser.add_argument("--deadline-s", type=float, default=300.0, help="bound of one round")
    parser.add_argument("--json", dest="json_path", help="write the results as JSON here")
    parser.add_argument("--base-dir", help="directory for the data (default: a temporary one)")
    args = parser.parse_args(argv)
    run_info = RunInfo(argv)
    print(run_info.describe())
    gc.set_threshold(50_000, 20, 100)  # the node's (server/node.py tune_gc)
    base = Path(tempfile.mkdtemp(prefix="kvstore-bench-snapstall-", dir=args.base_dir))
    try:
        sizes = [
            run_size(base, int(keys), args.value_bytes, args.rounds, args.deadline_s)
            for keys in args.keys.split(",")
        ]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    run = run_info.finish()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in run['load_average_at_end'])}")
    if args.json_path:
        document = {"benchmark": "snapshot_stall", "run": run, "sizes": sizes}
        Path(args.json_path).write_text(json.dumps(document, indent=2) + "\n")
        print(f"json: {Path(args.json_path).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
