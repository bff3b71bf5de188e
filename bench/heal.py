"""Self-healing benchmark: how long a three-node cluster takes to restore full redundancy after
one node's disk is lost, with a write load running.

For each store size (`--keys`, values of `--value-bytes`): a snapshot file holding that many
keys is built offline (as bench/snapshot_transfer.py builds it) and restored into all three
data directories of a local cluster (real `kvstore serve` processes on 127.0.0.1). A write load
(`--writers` concurrent PUTs to the leader) runs in three phases of the same run:

- `before`: three voters, for `--load-seconds`;
- `during`: a follower is SIGKILLed, its data directory deleted and the same command line
  started again (the phase starts there); the phase ends when the leader's configuration is
  three voters again, none of them the lost id, and no learner (`heal_s`): the empty node
  joined as a learner under a new id, caught up from a streamed snapshot and the log, the
  old id was removed and the new one promoted (docs/operations.md, "Replacing a lost disk");
- `after`: three voters again, for `--load-seconds`.

Reported per size: `heal_s` (the empty node's start to its promotion, the lost id removed),
`learner_s` (to the new id first listed as a learner), `installed_s` (to its snapshot
restored, from its log), the snapshot's bytes and transfer (`wire_s`, from its log), its peak
RSS, how far the leader's term moved, and the writes per second, p50 and p99 of each phase with
the ratios during / after. The machine is shared: compare the phases side by side, never
against figures of another run.

    python bench/heal.py --keys 100000,1000000 --json out.json
    python bench/heal.py --keys 2000 --load-seconds 1       # what the test runs

Every loop is bounded by `--deadline-s`; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.snapshot_transfer import (
    IDS,
    Load,
    LoadPhase,
    add_arguments,
    build_snapshot,
    log_field,
    log_times,
    memory_mb,
    print_phases,
    ratio,
    run_sizes,
    status_of,
    wait_for_leader,
)
from kvstore.server.backup import restore_data_dir
from kvstore.server.localcluster import LocalCluster, free_port

_POLL_S = 0.05


@dataclass
class HealResult:
    keys: int
    value_bytes: int
    snapshot_bytes: int
    lost_node: int
    new_member_id: int | None
    heal_s: float
    learner_s: float | None
    installed_s: float | None
    wire_s: float | None
    new_member_peak_rss_mb: float | None
    terms_moved: int | None
    writes_during_to_after: float | None
    p99_during_to_after: float | None
    before: LoadPhase
    during: LoadPhase
    after: LoadPhase


async def _members(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        timeout = aiohttp.ClientTimeout(total=1)
        async with session.get(f"{url}/v1/members", timeout=timeout) as response:
            return dict(await response.json()) if response.status == 200 else None
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None


class HealWatch:
    """Polls the leader's /v1/members until the configuration is healed; notes when the
    replacement was first listed as a learner."""

    def __init__(self, session: aiohttp.ClientSession, cluster: LocalCluster, lost: int) -> None:
        self.session = session
        self.cluster = cluster
        self.lost = lost
        self.learner_at: float | None = None
        self.healed: dict[str, Any] = {}

    async def run(self, deadline: float) -> float:
        while time.monotonic() < deadline:
            for node_id in self.cluster.running():
                document = await _members(self.session, self.cluster.client_url(node_id))
                if document is None or document.get("leader_id") != document.get("id"):
                    continue
                voters, learners = document.get("voters", []), document.get("learners", [])
                if learners and self.learner_at is None:
                    self.learner_at = time.perf_counter()
                if len(voters) == 3 and self.lost not in voters and not learners:
                    self.healed = document
                    return time.perf_counter()
            await asyncio.sleep(_POLL_S)
        raise TimeoutError(f"node {self.lost}'s replacement was not promoted in time")


async def run_size(args: argparse.Namespace, keys: int, base: Path) -> HealResult:
    deadline = time.monotonic() + args.deadline_s
    snapshot_file = base / f"store-{keys}.snap"
    snapshot_bytes = build_snapshot(snapshot_file, keys, args.value_bytes)
    print(f"{keys} keys: snapshot of {snapshot_bytes / 1e6:.1f} MB built")
    ports = [free_port() for _ in range(6)]
    cluster = LocalCluster(
        base / f"cluster-{keys}", 3, client_ports=ports[:3], peer_ports=ports[3:]
    )
    for node_id in IDS:
        restore_data_dir(str(snapshot_file), str(cluster.data_dir(node_id)), IDS)
    try:
        cluster.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            leader = await wait_for_leader(session, cluster, deadline)
            url = cluster.client_url(leader)
            load = Load(session, args.writers, args.value_bytes)
            before = await load.run(url, None, args.load_seconds)
            term_before = (await status_of(session, url) or {}).get("term")
            lost = max(node_id for node_id in IDS if node_id != leader)
            cluster.kill(lost)
            shutil.rmtree(cluster.data_dir(lost))
            cluster.start_node(lost)  # the same command line, an empty data directory
            started = time.perf_counter()
            watch = HealWatch(session, cluster, lost)
            healed = asyncio.ensure_future(watch.run(deadline))
            during = await load.run(url, healed, 0)
            heal_s = healed.result() - started
            after = await load.run(url, None, args.load_seconds)
            term_after = (await status_of(session, url) or {}).get("term")
            peak_rss, _ = memory_mb(cluster.pid(lost))
    finally:
        cluster.stop()
    new_ids = [int(m) for m in watch.healed.get("voters", []) if int(m) not in IDS]
    installed_s, wire_s = _install_times(cluster.log_path(lost), started_unix(started))
    learner_s = watch.learner_at - started if watch.learner_at is not None else None
    moved = term_after - term_before if isinstance(term_before, int) and isinstance(term_after, int) else None  # fmt: skip
    return HealResult(
        keys=keys,
        value_bytes=args.value_bytes,
        snapshot_bytes=snapshot_bytes,
        lost_node=lost,
        new_member_id=new_ids[0] if new_ids else None,
        heal_s=round(heal_s, 3),
        learner_s=round(learner_s, 3) if learner_s is not None else None,
        installed_s=installed_s,
        wire_s=wire_s,
        new_member_peak_rss_mb=peak_rss,
        terms_moved=moved,
        writes_during_to_after=ratio(during.writes_per_s, after.writes_per_s),
        p99_during_to_after=ratio(during.p99_ms, after.p99_ms),
        before=before,
        during=during,
        after=after,
    )


def started_unix(perf_counter_at: float) -> float:
    """The wall-clock time of a `time.perf_counter()` reading (the logs carry wall time)."""
    return time.time() - (time.perf_counter() - perf_counter_at)


def _install_times(log: Path, started: float) -> tuple[float | None, float | None]:
    """(start to snapshot restored, the stream's BEGIN to END) from the new member's log (the
    last run of the node: the lost incarnation's lines come before `started`)."""
    restored = [t for t, _ in log_times(log, "event=snapshot_restored") if t >= started - 1]
    ends = [line for t, line in log_times(log, "event=snapshot_stream_end") if t >= started - 1]
    installed_s = round(restored[0] - started, 3) if restored else None
    wire = log_field(ends[0], "seconds") if ends else None
    return installed_s, float(wire) if wire else None


def _print(result: HealResult) -> None:
    print(
        f"  {result.keys} keys ({result.snapshot_bytes / 1e6:.1f} MB): node {result.lost_node}'s "
        f"disk lost; full redundancy again in {result.heal_s:.2f} s (new member "
        f"{result.new_member_id}: learner at {result.learner_s} s, snapshot installed at "
        f"{result.installed_s} s, wire {result.wire_s} s; peak RSS "
        f"{result.new_member_peak_rss_mb} MB); leader's term moved {result.terms_moved}"
    )
    print_phases(result.before, result.during, result.after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, deadline_s=900.0)
    title = (
        "Time to restore full redundancy after a node's disk is lost (its empty restart to "
        "its replacement's promotion), leader writes before / during / after"
    )
    return run_sizes(parser.parse_args(argv), argv, "heal", title, run_size, _print)


if __name__ == "__main__":
    sys.exit(main())
