"""Snapshot-transfer benchmark: how fast a node with an empty data directory catches up, what
the streamed snapshot costs the leader, and how its rate compares with the raw loopback.

For each store size (`--keys`, values of `--value-bytes`): a snapshot file holding that many
keys is built offline (a StateMachine, frozen and encoded as a node does) and restored into
nodes 1 and 2 of a local three-node cluster (real `kvstore serve` processes on 127.0.0.1,
`kvstore snapshot restore`'s code); node 3 starts later with an empty data directory, so the
leader must stream it the snapshot (kvstore/server/snapshot_stream.py) and then the log after
it. A write load (`--writers` concurrent PUTs of `--value-bytes` to the leader) runs in three
phases of the same run:

- `before`: nodes 1 and 2 only, for `--load-seconds`;
- `during`: node 3 starts at the phase's start; the phase ends when node 3 has applied what
  the leader had committed when node 3 started (`catch_up_s`);
- `after`: all three caught up, for `--load-seconds`.

Reported per size: catch_up_s (node 3's start to caught up), the snapshot's bytes, the wire
transfer time and rate from node 3's log (`event=snapshot_stream_end ... seconds=`: BEGIN to
END, before verification), the leader's report time (BEGIN to ACK), the raw loopback rate
measured in the same run (one asyncio TCP stream of the same size in 64 KiB writes, on this
process), and the writes per second, p50 and p99 of each phase. On node 3, the receiving
node: `install_s`, from the stream's END to the state machine restored (its log's
`snapshot_stream_end` to `snapshot_restored`: the file checked, loaded and decoded, stored,
installed), `load_s` (the part on the worker thread, when the node logs it), its longest
loop stall (`late_tick`, the largest a tick came late: while the loop is held, no heartbeat
is answered), its peak RSS (`VmHWM` from /proc, read just before it stops) and its RSS then;
and `terms_moved`, how far the leader's term moved from node 3's start to the end of the
run (0: the transfer caused no election). The machine is shared: compare the phases and the
rates side by side, never against figures of another run.

    python bench/snapshot_transfer.py --keys 100000,1000000 --json out.json
    python bench/snapshot_transfer.py --keys 2000 --load-seconds 1     # what the test runs

`--profile-follower DIR` samples node 3 with py-spy (not a dependency: install it in the
venv to use this) from its start until it has caught up, and writes the samples to
DIR/follower-<keys>.txt (py-spy's raw format: one line per stack with its count).

Every loop is bounded by `--deadline-s`; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runinfo import RunInfo, ScratchDir, output_path
from bench.stats import median, percentile
from kvstore.kv.commands import Put
from kvstore.kv.state_machine import StateMachine
from kvstore.raft.types import ConfState, Snapshot, SnapshotMetadata
from kvstore.server.backup import restore_data_dir
from kvstore.server.localcluster import LocalCluster, free_port
from kvstore.storage.snapshot import encode_snapshot_file

IDS = (1, 2, 3)
EMPTY = 3
_POLL_S = 0.02
_LOOPBACK_WRITE_BYTES = 64 << 10
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


@dataclass
class LoadPhase:
    seconds: float
    writes: int
    failed: int
    writes_per_s: float
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class SizeResult:
    keys: int
    value_bytes: int
    snapshot_bytes: int
    build_s: float
    catch_up_s: float
    wire_transfer_s: float | None
    wire_mb_per_s: float | None
    leader_report_s: float | None
    loopback_mb_per_s: float
    wire_to_loopback: float | None
    snapshot_sends: int
    install_s: float | None
    load_s: float | None
    receiver_longest_stall_s: float | None
    receiver_peak_rss_mb: float | None
    receiver_rss_mb: float | None
    leader_peak_rss_mb: float | None
    terms_moved: int | None
    # The leader's writes while the snapshot travels and installs against the same load
    # with all three nodes caught up (`after`): writes/s and p99 ratios, during / after.
    writes_during_to_after: float | None
    p99_during_to_after: float | None
    before: LoadPhase
    during: LoadPhase
    after: LoadPhase


def build_snapshot(path: Path, keys: int, value_bytes: int) -> int:
    """A snapshot file of `keys` keys as a node would write it; returns its size."""
    machine = StateMachine()
    value = b"v" * value_bytes
    for i in range(keys):
        machine.apply_command(Put(key=f"key/{i:09d}", value=value, request=None, time_ms=0))
    machine.applied_index = keys
    metadata = SnapshotMetadata(index=keys, term=1, conf_state=ConfState(voters=IDS))
    content = encode_snapshot_file(Snapshot(metadata=metadata, data=machine.freeze().encode()))
    path.write_bytes(content)
    return len(content)


async def loopback_mb_per_s(total_bytes: int) -> float:
    """One TCP stream over 127.0.0.1 of `total_bytes` in 64 KiB writes, drained each time
    (as the snapshot stream writes its chunks)."""
    received = 0
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(256 << 10):
            received += len(data)
        done.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    chunk = b"x" * _LOOPBACK_WRITE_BYTES
    try:
        started = time.perf_counter()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = 0
        while sent < total_bytes:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
        writer.write_eof()
        await asyncio.wait_for(done.wait(), 60)
        elapsed = time.perf_counter() - started
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return received / elapsed / 1e6


class Load:
    """`writers` concurrent PUT loops against one URL; latencies of the successful ones."""

    def __init__(self, session: aiohttp.ClientSession, writers: int, value_bytes: int) -> None:
        self.session = session
        self.writers = writers
        self.value = b"w" * value_bytes
        self.latencies: list[float] = []
        self.failed = 0
        self._stop = asyncio.Event()
        self._sequence = 0

    async def run(self, url: str, until: asyncio.Future[Any] | None, seconds: float) -> LoadPhase:
        self.latencies, self.failed = [], 0
        self._stop.clear()
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(self._writer(url)) for _ in range(self.writers)]
        try:
            if until is not None:
                await until
            else:
                await asyncio.sleep(seconds)
        finally:
            self._stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.perf_counter() - started
        latencies = self.latencies
        return LoadPhase(
            seconds=round(elapsed, 3),
            writes=len(latencies),
            failed=self.failed,
            writes_per_s=round(len(latencies) / elapsed, 1),
            p50_ms=round(median(latencies) * 1000, 2) if latencies else None,
            p99_ms=round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        )

    async def _writer(self, url: str) -> None:
        while not self._stop.is_set():
            self._sequence += 1
            key = f"load/{self._sequence % 10_000}"
            started = time.perf_counter()
            try:
                async with self.session.put(f"{url}/v1/kv/{key}", data=self.value) as response:
                    await response.read()
                    ok = response.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                self.latencies.append(time.perf_counter() - started)
            else:
                self.failed += 1
                await asyncio.sleep(0.01)


def log_times(path: Path, event: str) -> list[tuple[float, str]]:
    """(unix time, line) of every line of a node's log with `event`."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if event in line and (match := _LOG_TIME.match(line)):
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((stamp, line))
    return found


def log_field(line: str, name: str) -> str | None:
    match = re.search(rf"\b{name}=(\S+)", line)
    return match.group(1) if match else None


async def status_of(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(f"{url}/v1/status", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return dict(await r.json()) if r.status == 200 else None
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None


async def wait_for_leader(
    session: aiohttp.ClientSession, cluster: LocalCluster, deadline: float
) -> int:
    while time.monotonic() < deadline:
        for node_id in IDS:
            status = await status_of(session, cluster.client_url(node_id))
            if status and status.get("role") == "leader":
                return node_id
        await asyncio.sleep(_POLL_S)
    raise TimeoutError("no leader")


async def _caught_up(
    session: aiohttp.ClientSession, url: str, index: int, deadline: float
) -> float:
    while time.monotonic() < deadline:
        status = await status_of(session, url)
        if status and status.get("applied_index", 0) >= index:
            return time.perf_counter()
        await asyncio.sleep(_POLL_S)
    raise TimeoutError(f"node {EMPTY} did not catch up to {index}")


def memory_mb(pid: int | None) -> tuple[float | None, float | None]:
    """(peak RSS, RSS) of process `pid` in MB from /proc (None where unreadable)."""
    if pid is None:
        return None, None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    found = dict(re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", status, re.MULTILINE))
    peak, now = found.get("VmHWM"), found.get("VmRSS")
    return (
        round(int(peak) / 1024, 1) if peak else None,
        round(int(now) / 1024, 1) if now else None,
    )


class Profiler:
    """py-spy sampling one process until `stop` (only with --profile-follower)."""

    def __init__(self, pid: int | None, output: Path | None) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        if pid is None or output is None:
            return
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        output.parent.mkdir(parents=True, exist_ok=True)
        command = [py_spy, "record", "--pid", str(pid), "--rate", "100", "--threads"]
        self._process = subprocess.Popen(
            [*command, "--format", "raw", "--output", str(output), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def run_size(args: argparse.Namespace, keys: int, base: Path) -> SizeResult:
    deadline = time.monotonic() + args.deadline_s
    snapshot_file = base / f"store-{keys}.snap"
    started = time.perf_counter()
    snapshot_bytes = build_snapshot(snapshot_file, keys, args.value_bytes)
    build_s = time.perf_counter() - started
    print(f"{keys} keys: snapshot of {snapshot_bytes / 1e6:.1f} MB built in {build_s:.1f} s")
    ports = [free_port() for _ in range(6)]
    cluster = LocalCluster(
        base / f"cluster-{keys}", 3, client_ports=ports[:3], peer_ports=ports[3:]
    )
    for node_id in IDS:
        if node_id != EMPTY:
            restore_data_dir(str(snapshot_file), str(cluster.data_dir(node_id)), IDS)
    loopback = await loopback_mb_per_s(snapshot_bytes)
    try:
        cluster.base_dir.mkdir(parents=True, exist_ok=True)
        for node_id in IDS:
            if node_id != EMPTY:
                cluster.start_node(node_id)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            leader = await wait_for_leader(session, cluster, deadline)
            url = cluster.client_url(leader)
            load = Load(session, args.writers, args.value_bytes)
            before = await load.run(url, None, args.load_seconds)
            status = await status_of(session, url)
            target = int((status or {}).get("commit_index", keys))
            term_before = (status or {}).get("term")
            cluster.start_node(EMPTY)
            started = time.perf_counter()
            profile = args.profile_follower
            profiler = Profiler(
                cluster.pid(EMPTY), Path(profile) / f"follower-{keys}.txt" if profile else None
            )
            caught = asyncio.ensure_future(
                _caught_up(session, cluster.client_url(EMPTY), target, deadline)
            )
            try:
                during = await load.run(url, caught, 0)
            finally:
                profiler.stop()
            catch_up_s = caught.result() - started
            # An empty data directory for an existing cluster joins under a new member id
            # (docs/operations.md): the leader's log names it by that id.
            member_id = int(
                (await status_of(session, cluster.client_url(EMPTY)) or {}).get("id", EMPTY)
            )
            after = await load.run(url, None, args.load_seconds)
            status = await status_of(session, url)
            term_after = (status or {}).get("term")
            receiver_peak, receiver_now = memory_mb(cluster.pid(EMPTY))
            leader_peak, _ = memory_mb(cluster.pid(leader))
    finally:
        cluster.stop()
    wire_s, report_s, sends = _transfer_from_logs(cluster, leader, member_id)
    install_s, load_s, stall_s = _install_from_log(cluster.log_path(EMPTY))
    terms_moved = (
        term_after - term_before
        if isinstance(term_before, int) and isinstance(term_after, int)
        else None
    )
    wire_rate = snapshot_bytes / wire_s / 1e6 if wire_s else None
    return SizeResult(
        keys=keys,
        value_bytes=args.value_bytes,
        snapshot_bytes=snapshot_bytes,
        build_s=round(build_s, 2),
        catch_up_s=round(catch_up_s, 3),
        wire_transfer_s=wire_s,
        wire_mb_per_s=round(wire_rate, 1) if wire_rate else None,
        leader_report_s=report_s,
        loopback_mb_per_s=round(loopback, 1),
        wire_to_loopback=round(wire_rate / loopback, 3) if wire_rate else None,
        snapshot_sends=sends,
        install_s=install_s,
        load_s=load_s,
        receiver_longest_stall_s=stall_s,
        receiver_peak_rss_mb=receiver_peak,
        receiver_rss_mb=receiver_now,
        leader_peak_rss_mb=leader_peak,
        terms_moved=terms_moved,
        writes_during_to_after=ratio(during.writes_per_s, after.writes_per_s),
        p99_during_to_after=ratio(during.p99_ms, after.p99_ms),
        before=before,
        during=during,
        after=after,
    )


def _transfer_from_logs(
    cluster: LocalCluster, leader: int, member_id: int
) -> tuple[float | None, float | None, int]:
    """(wire seconds from node 3's log, BEGIN-to-ACK seconds and the number of snapshot
    sends to node 3 (member `member_id`) from the leader's log)."""
    ends = log_times(cluster.log_path(EMPTY), "event=snapshot_stream_end")
    wire_s = float(log_field(ends[0][1], "seconds") or 0) if ends else None
    leader_log = cluster.log_path(leader)
    begins = [t for t, line in log_times(leader_log, "event=snapshot_stream_begin")
              if log_field(line, "peer") == str(member_id)]  # fmt: skip
    dones = [t for t, line in log_times(leader_log, "event=snapshot_stream_done")
             if log_field(line, "peer") == str(member_id)]  # fmt: skip
    sends = len([line for _, line in log_times(leader_log, "event=snapshot_sending")
                 if log_field(line, "to") == str(member_id)])  # fmt: skip
    report_s = round(dones[0] - begins[0], 3) if begins and dones else None
    return wire_s, report_s, sends


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def _install_from_log(path: Path) -> tuple[float | None, float | None, float]:
    """(END to state restored, the worker thread's load and decode when logged, the longest
    late tick) from the receiving node's log."""
    ends = log_times(path, "event=snapshot_stream_end")
    restored = log_times(path, "event=snapshot_restored")
    install_s = round(restored[0][0] - ends[0][0], 3) if ends and restored else None
    received = log_times(path, "event=snapshot_stream_received")
    load = log_field(received[0][1], "load_seconds") if received else None
    stalls = [float(log_field(line, "seconds") or 0) for _, line in log_times(path, "late_tick")]
    return install_s, float(load) if load else None, max(stalls, default=0.0)


def print_phases(before: LoadPhase, during: LoadPhase, after: LoadPhase) -> None:
    """The leader's writes in the three phases, and during / after."""
    print("  leader writes      phase    seconds  writes/s   p50 ms   p99 ms  failed")
    for name, phase in (("before", before), ("during", during), ("after", after)):
        print(
            f"                     {name:<7} {phase.seconds:8.2f} {phase.writes_per_s:9.1f} "
            f"{phase.p50_ms!s:>8} {phase.p99_ms!s:>8} {phase.failed:7d}"
        )
    print(
        f"  during / after: writes/s x{ratio(during.writes_per_s, after.writes_per_s)}, "
        f"p99 x{ratio(during.p99_ms, after.p99_ms)}"
    )


def add_arguments(parser: argparse.ArgumentParser, deadline_s: float) -> None:
    """The options every store-size benchmark of this kind takes."""
    parser.add_argument("--keys", default="100000", help="store sizes, comma-separated")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--writers", type=int, default=16, help="concurrent writers")
    parser.add_argument("--load-seconds", type=float, default=5.0)
    parser.add_argument("--deadline-s", type=float, default=deadline_s, help="per store size")
    parser.add_argument("--json", help="write the results here (default bench/results/)")
    parser.add_argument("--base-dir", help="where the clusters' data and logs go")
    parser.add_argument("--keep", action="store_true", help="keep data and logs")


def _print(result: SizeResult) -> None:
    print(
        f"  {result.keys} keys ({result.snapshot_bytes / 1e6:.1f} MB): caught up in "
        f"{result.catch_up_s:.2f} s; wire {result.wire_transfer_s} s = "
        f"{result.wire_mb_per_s} MB/s vs loopback {result.loopback_mb_per_s} MB/s "
        f"(ratio {result.wire_to_loopback}); BEGIN to ACK {result.leader_report_s} s; "
        f"snapshot sends to node {EMPTY}: {result.snapshot_sends}"
    )
    print(
        f"  node {EMPTY}: install (END to restored) {result.install_s} s, of which load and "
        f"decode {result.load_s} s; longest loop stall {result.receiver_longest_stall_s} s; "
        f"peak RSS {result.receiver_peak_rss_mb} MB (now {result.receiver_rss_mb} MB; "
        f"leader's peak {result.leader_peak_rss_mb} MB); leader's term moved "
        f"{result.terms_moved}"
    )
    print_phases(result.before, result.during, result.after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, deadline_s=600.0)
    parser.add_argument(
        "--profile-follower", metavar="DIR", help="sample node 3 with py-spy into DIR"
    )
    title = (
        "Time for an empty node to catch up through a streamed snapshot, transfer rate vs "
        "loopback, leader writes before / during / after"
    )
    return run_sizes(parser.parse_args(argv), argv, "snapshot_transfer", title, run_size, _print)


def run_sizes(
    args: argparse.Namespace,
    argv: list[str] | None,
    benchmark: str,
    title: str,
    run_size: Callable[[argparse.Namespace, int, Path], Coroutine[Any, Any, Any]],
    show: Callable[[Any], None],
) -> int:
    """Run `run_size` for each store size of `--keys` in one scratch directory, print each
    result with `show`, and write the JSON document of `benchmark`."""
    run = RunInfo(argv)
    print(run.describe())
    print(title)
    results = []
    prefix = f"kvstore-{benchmark}-bench-"
    with ScratchDir(args.base_dir, keep=args.keep, prefix=prefix) as base:
        for keys in (int(part) for part in args.keys.split(",")):
            result = asyncio.run(run_size(args, keys, base))
            show(result)
            results.append(asdict(result))
    path = output_path(args.json, f"{benchmark}.json")
    document = {"benchmark": benchmark, "run": run.finish(), "results": results}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
