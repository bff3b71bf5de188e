"""Storage benchmark: DiskStorage.save() throughput against the raw fsync rate of the same disk.

For 1, 16 and 256 entries (100-byte payloads) per save() (one Ready: entries plus a hard
state with the commit index moving, as the server writes them), it measures appended
entries/s and fsyncs/s, and beside each a plain loop of os.write + os.fdatasync of the same
number of bytes on a file in the same directory (the raw fsync rate, the ceiling for a log
that syncs once per batch). Runs interleave WAL and raw so both see the same disk weather;
figures are medians over the repetitions, and ratio = WAL fsyncs/s / raw fsyncs/s.

Only the time spent inside save() counts for the WAL (building Entry objects is the Raft
core's work); the raw loop counts write + fdatasync.

    python bench/storage.py [--seconds 1.0] [--repetitions 5] [--dir PATH] [--json PATH]
    python bench/storage.py --quick          # a few tenths of a second, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import median

from kvstore.raft.types import Entry, HardState
from kvstore.storage.disk import DiskStorage

BATCH_SIZES = (1, 16, 256)
PAYLOAD_BYTES = 100


def measure_wal(directory: Path, batch: int, seconds: float) -> dict[str, float]:
    storage = DiskStorage(directory)
    payload = b"v" * PAYLOAD_BYTES
    index, saves, busy = 0, 0, 0.0
    try:
        bytes_before = storage.metrics.bytes_written
        fsync_before = storage.metrics.fsync_seconds_total
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            entries = [Entry(term=1, index=index + i + 1, data=payload) for i in range(batch)]
            hard_state = HardState(term=1, vote=1, commit=index)
            started = time.perf_counter()
            storage.save(hard_state, entries, None)
            busy += time.perf_counter() - started
            index += batch
            saves += 1
        write_bytes = (storage.metrics.bytes_written - bytes_before) / saves
        fsync_seconds = storage.metrics.fsync_seconds_total - fsync_before
    finally:
        storage.close()
    return {
        "entries_per_s": index / busy,
        "fsyncs_per_s": saves / busy,
        "bytes_per_write": write_bytes,
        # What the code costs without the disk: encoding, framing, write(), bookkeeping.
        "entries_per_s_excluding_fsync": index / max(busy - fsync_seconds, 1e-9),
    }


def measure_raw(directory: Path, size_bytes: int, seconds: float) -> dict[str, float]:
    path = directory / "raw.bin"
    record = b"r" * size_bytes
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    count = 0
    try:
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            os.write(fd, record)
            os.fdatasync(fd)
            count += 1
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return {"fsyncs_per_s": count / elapsed}


def run(base: Path, seconds: float, repetitions: int) -> dict[str, Any]:
    samples: dict[int, dict[str, list[float]]] = {
        batch: {"wal_entries": [], "wal_fsyncs": [], "raw_fsyncs": [], "wal_cpu_entries": []}
        for batch in BATCH_SIZES
    }
    write_bytes: dict[int, float] = {}
    for repetition in range(repetitions):
        for batch in BATCH_SIZES:
            directory = base / f"wal-{batch}-{repetition}"
            wal = measure_wal(directory, batch, seconds)
            shutil.rmtree(directory)
            write_bytes[batch] = wal["bytes_per_write"]
            raw = measure_raw(base, int(wal["bytes_per_write"]), seconds)
            samples[batch]["wal_entries"].append(wal["entries_per_s"])
            samples[batch]["wal_fsyncs"].append(wal["fsyncs_per_s"])
            samples[batch]["raw_fsyncs"].append(raw["fsyncs_per_s"])
            samples[batch]["wal_cpu_entries"].append(wal["entries_per_s_excluding_fsync"])
    results = []
    for batch in BATCH_SIZES:
        wal_fsyncs = median(samples[batch]["wal_fsyncs"])
        raw_fsyncs = median(samples[batch]["raw_fsyncs"])
        results.append(
            {
                "entries_per_batch": batch,
                "payload_bytes": PAYLOAD_BYTES,
                "bytes_per_write": round(write_bytes[batch]),
                "wal_entries_per_s": median(samples[batch]["wal_entries"]),
                "wal_fsyncs_per_s": wal_fsyncs,
                "raw_fsyncs_per_s": raw_fsyncs,
                "ratio_wal_to_raw": wal_fsyncs / raw_fsyncs,
                # One fsync per batch: the most any log can append on this disk.
                "ceiling_entries_per_s": batch * raw_fsyncs,
                "wal_entries_per_s_excluding_fsync": median(
                    samples[batch]["wal_cpu_entries"]
                ),
                "samples": samples[batch],
            }
        )
    return {
        "benchmark": "storage",
        "directory": str(base),
        "seconds_per_run": seconds,
        "repetitions": repetitions,
        "sync_call": "fdatasync",
        "results": results,
        "targets": {
            "ratio_1_entry_min": 0.8,
            "entries_per_s_256_min": 100_000,
            "ratio_1_entry_met": results[0]["ratio_wal_to_raw"] >= 0.8,
            "entries_per_s_256_met": results[-1]["wal_entries_per_s"] >= 100_000,
        },
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"storage bench: {report['repetitions']} x {report['seconds_per_run']}s per point, "
        f"medians, dir {report['directory']}"
    )
    print(
        f"{'batch':>6} {'bytes/write':>11} {'WAL entries/s':>14} {'WAL fsyncs/s':>13} "
        f"{'raw fsyncs/s':>13} {'WAL/raw':>8} {'ceiling/s':>10} {'no-fsync/s':>11}"
    )
    for row in report["results"]:
        print(
            f"{row['entries_per_batch']:>6} {row['bytes_per_write']:>11} "
            f"{row['wal_entries_per_s']:>14,.0f} {row['wal_fsyncs_per_s']:>13,.0f} "
            f"{row['raw_fsyncs_per_s']:>13,.0f} {row['ratio_wal_to_raw']:>8.2f} "
            f"{row['ceiling_entries_per_s']:>10,.0f} "
            f"{row['wal_entries_per_s_excluding_fsync']:>11,.0f}"
        )
    print(
        "ceiling = entries per batch x raw fsyncs/s (one fsync per batch); "
        "no-fsync = WAL entries/s counting only the time outside fsync"
    )
    targets = report["targets"]
    print(
        f"targets: WAL/raw at 1 entry >= 0.80: {'met' if targets['ratio_1_entry_met'] else 'MISSED'}; "
        f"256-entry batches >= 100,000 entries/s: "
        f"{'met' if targets['entries_per_s_256_met'] else 'MISSED'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of each run")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: cwd)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny runs, for tests")
    args = parser.parse_args(argv)
    seconds, repetitions = (0.1, 1) if args.quick else (args.seconds, args.repetitions)
    base = Path(tempfile.mkdtemp(prefix="kvstore-bench-storage-", dir=args.dir or Path.cwd()))
    try:
        report = run(base, seconds, repetitions)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
