"""Failover benchmark: how long writes stop when the leader of a three-node cluster fails.

Starts a local three-node kvstore cluster (real `kvstore serve` processes on 127.0.0.1, every
node fsyncing), runs a steady write load through the client library (`--writers` concurrent
writers, each with its own Client, writing unique keys back to back), and per trial injects
one fault into the current leader:

- `kill`    SIGKILL; the node is restarted after the failover;
- `term`    SIGTERM, a graceful stop: the leader hands leadership over first; restarted after;
- `pause`   SIGSTOP for `--pause-s` seconds, then SIGCONT; the resumed old leader must step
            down without disturbing the new one (checked: `disturbed` in the JSON);
- `isolate` its peer links are stalled through kvstore.chaos.proxy's ProxyMesh for
            `--pause-s` seconds, then healed (clients still reach it directly).

Per trial it records the timeline (milliseconds after the fault was injected): `noticed`
(a survivor no longer follows the old leader), `elected` (a survivor reports a new leader,
with its term and id; both from polling /v1/status every `--poll-ms`), `first_ack` (the end
of the outage as the client saw it); the client errors and the longest call.

Unavailability is what the client saw: from the last write acknowledged before the outage to
the first write acknowledged after it. Each writer is one client: its unavailability is the
longest gap between its consecutive acknowledged writes, from its last acknowledgement before
the fault until writes have flowed again for `--post-s` seconds after a new leader is known,
and a trial's figure is the worst writer's (headline: min/p50/p90/p99/max over trials). A
response already on its way when the leader dies may arrive just after the fault; the longest
gap does not let it hide the outage, nor does one writer being served while others hang.
`cluster_unavailability_ms` (table column "any p50") is the longest time no writer at all got
an acknowledgement.

After the trials of each fault, every acknowledged write is read back (linearizable reads):
none may be missing or hold another value (lost), and every key, written once by design,
must have version 1 (a higher version means a write was applied twice).

`--compare etcd` runs the same trials with the same load against three-node etcd on
loopback (etcd's JSON gateway, the same attempt timeout), once with etcd's defaults and once
tuned to kvstore's heartbeat and election settings, and prints them side by side with
ratios. Output: a table, `--json PATH` (every figure, with the run's commit, machine and
command line: bench/runinfo.py), and a PNG (`--png PATH`, default bench/results/failover.png):
every call's latency around one SIGKILL trial with the phases marked, and the distribution of
unavailability. Progress goes to stderr: a bar on a terminal, one line per trial otherwise.
The clusters' data and logs live in a temporary directory (or `--base-dir`) that is removed
when the run ends, however it ends, unless `--keep`.

    python bench/failover.py --trials 20 --faults kill,term,pause --compare etcd
    python bench/failover.py --trials 2 --faults kill,term --json out.json   # what the test runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The parts, beside this file: the systems under test, one trial and its figures, the output.
from etcdcluster import etcd_binary
from failover_report import draw_png, print_table, write_json
from failover_systems import FAULTS, EtcdSystem, KvstoreSystem, System, kvstore_timing_ms
from failover_trial import (
    LEADER_NEWS,
    Call,
    Load,
    check_writes,
    run_trial,
    summarize,
    wait_healthy,
)
from runinfo import Progress, RunInfo, ScratchDir, output_path

from kvstore.client.config import ClientConfig


async def _run_trials(
    system: System, fault: str, args: argparse.Namespace, progress: Progress
) -> tuple[Load, list[dict[str, Any]], list[list[Call]]]:
    load = Load(system, args.writers, run=f"fo-{fault}-{os.getpid()}-{time.time_ns()}")
    load.ab = bool(args.ab_option) and isinstance(system, KvstoreSystem)
    tasks = [asyncio.create_task(load.write(w), name=f"writer-{w}") for w in range(args.writers)]
    trials: list[dict[str, Any]] = []
    timelines: list[list[Call]] = []
    try:
        for _ in range(args.trials):
            trial, calls = await run_trial(system, load, fault, args)
            trials.append(trial)
            timelines.append(calls)
            progress.step(
                f"{system.label} {fault}", f"{trial['unavailability_ms']:.0f} ms unavailable"
            )
        await wait_healthy(system, load, args.healthy_timeout_s)
    finally:
        load.stopping = True
        await asyncio.gather(*tasks, return_exceptions=True)
    return load, trials, timelines


async def run_fault(
    system: System, fault: str, args: argparse.Namespace, progress: Progress
) -> dict[str, Any]:
    """Start `system`, run the load and `args.trials` trials of `fault`, check the writes;
    the system's processes are stopped whatever happens."""
    try:
        await system.start()
        load, trials, timelines = await _run_trials(system, fault, args, progress)
        check = await check_writes(system, load)
    finally:
        await system.stop()
    return {
        "system": system.label,
        "fault": fault,
        "summary": summarize(trials),
        "trials": trials,
        "writes": check,
        "timelines": timelines,
    }


# --- running the comparison -----------------------------------------------------------------


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The client's defaults unless told otherwise: what an untuned application sees."""
    config = ClientConfig(binary_stream=not args.http_only)
    if args.attempt_timeout_ms is not None:
        config = replace(config, attempt_timeout_s=args.attempt_timeout_ms / 1000)
    return replace(config, **dict(args.client_option))


def _client_option(text: str) -> tuple[str, object]:
    """NAME=VALUE of a ClientConfig field, the value parsed as that field's type."""
    name, _, raw = text.partition("=")
    defaults = {f.name: f.default for f in fields(ClientConfig)}
    if name not in defaults or not raw:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE of a ClientConfig field: {text!r}")
    default = defaults[name]
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{name} is true or false, got {raw!r}")
        return name, raw.lower() == "true"
    try:
        return name, type(default)(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{name}: {exc}") from exc


def make_systems(fault: str, base: Path, args: argparse.Namespace) -> list[System]:
    config: ClientConfig = args.client_config
    variant = dict(args.ab_option)
    systems: list[System] = [
        KvstoreSystem(
            base / f"kvstore-{fault}", config, proxies=fault == "isolate", variant_options=variant
        )
    ]
    if args.tls:
        systems.append(
            KvstoreSystem(
                base / f"kvstore-tls-{fault}",
                config,
                proxies=fault == "isolate",
                tls=True,
                variant_options=variant,
            )
        )
    if args.compare == "etcd" and fault != "isolate":
        heartbeat_ms, election_ms = kvstore_timing_ms()
        # etcd refuses an election timeout under 5 heartbeats: tuned is the closest it allows.
        tuned = (heartbeat_ms, max(election_ms, 5 * heartbeat_ms))
        for beat, election in ((100, 1000), tuned):
            directory = base / f"etcd-{beat}-{election}-{fault}"
            systems.append(EtcdSystem(directory, config, heartbeat_ms=beat, election_ms=election))
    return systems


async def run_all(args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    plans = [(fault, make_systems(fault, base, args)) for fault in args.faults]
    progress = Progress(sum(len(systems) for _, systems in plans) * args.trials)
    results = []
    for fault, systems in plans:
        # Same fault, systems one after the other: the closest to side by side two cores allow.
        for system in systems:
            results.append(await run_fault(system, fault, args, progress))
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20, help="trials per fault and system")
    parser.add_argument("--faults", default="kill,term,pause", help=f"from {','.join(FAULTS)}")
    parser.add_argument("--compare", choices=["etcd"], help="also run three-node etcd")
    parser.add_argument("--tls", action="store_true",
                        help="also run kvstore with TLS on both ports (system kvstore-tls)")  # fmt: skip
    parser.add_argument("--writers", type=int, default=8, help="concurrent writers")
    parser.add_argument("--attempt-timeout-ms", type=float, default=None,
                        help="per-attempt timeout of both clients (default: the kvstore "
                             "client's default, ClientConfig.attempt_timeout_s)")  # fmt: skip
    parser.add_argument("--http-only", action="store_true",
                        help="kvstore writers over HTTP only (ClientConfig.binary_stream=False; "
                             "default: the client's binary stream)")  # fmt: skip
    parser.add_argument("--client-option", action="append", default=[], type=_client_option,
                        metavar="NAME=VALUE",
                        help="a ClientConfig field for the kvstore writers, e.g. "
                             "standby_streams=false (repeatable; default: the defaults)")  # fmt: skip
    parser.add_argument("--ab-option", action="append", default=[], type=_client_option,
                        metavar="NAME=VALUE",
                        help="side by side in the same trials: the odd writers' clients "
                             "change this ClientConfig field (b), the even ones do not (a); "
                             "kvstore only (repeatable)")  # fmt: skip
    parser.add_argument("--pause-s", type=float, default=2.0, help="SIGSTOP/isolation length")
    parser.add_argument("--settle-s", type=float, default=0.5, help="load before each fault")
    parser.add_argument("--post-s", type=float, default=0.5,
                        help="load measured after a new leader is known")  # fmt: skip
    parser.add_argument("--poll-ms", type=float, default=5.0, help="status polling interval")
    parser.add_argument("--trial-timeout-s", type=float, default=20.0)
    parser.add_argument("--healthy-timeout-s", type=float, default=60.0)
    parser.add_argument("--json", dest="json_path", help="write every figure as JSON here")
    parser.add_argument("--png", default=None,
                        help="figure path (default bench/results/failover.png; '' for none)")  # fmt: skip
    parser.add_argument("--base-dir", help="directory for data and logs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the clusters' data and logs (removed at the end otherwise)")  # fmt: skip
    parser.add_argument("--plot-from", help="only redraw the PNG from a JSON this wrote")
    args = parser.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
    if args.compare == "etcd" and etcd_binary() is None:
        parser.error("--compare etcd needs an etcd binary on PATH (apt-get install etcd-server)")
    return args


def _plot_from(path: str, png: Path) -> int:
    """Redraw the PNG from a saved JSON; a missing or malformed file is one line, exit 2."""
    try:
        document = json.loads(Path(path).read_text())
        if not isinstance(document, dict):
            raise TypeError("its top level is not an object")
        saved = document["results"]
        if not isinstance(saved, list) or not all(isinstance(r, dict) for r in saved):
            raise TypeError("'results' is not a list of objects")
        for result in saved:
            # What draw_png reads, checked before it loads matplotlib.
            missing = [n for n in ("system", "fault", "trials", "calls_of_median_trial")
                       if n not in result]  # fmt: skip
            if missing:
                raise KeyError(missing[0])
        drawn = draw_png(saved, png)
    except OSError as exc:
        print(f"failover.py: --plot-from {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        # json.JSONDecodeError is a ValueError; the rest is a JSON of another shape.
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        print(
            f"failover.py: --plot-from {path}: not a JSON written by failover.py --json ({what})",
            file=sys.stderr,
        )
        return 2
    if not drawn:
        return 1
    print(f"figure: {png.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    png = output_path(args.png, "failover.png") if args.png != "" else None
    if args.plot_from:
        return _plot_from(args.plot_from, png or output_path(None, "failover.png"))
    run = RunInfo(argv)
    args.run = run
    args.client_config = client_config(args)
    scratch = ScratchDir(args.base_dir, keep=args.keep, prefix="kvfailover-")
    attempt = (
        f"attempt timeout {args.attempt_timeout_ms:.0f} ms"
        if args.attempt_timeout_ms is not None
        else "the client's default ClientConfig"
    )
    if args.client_option:
        attempt += " with " + ", ".join(f"{name}={value}" for name, value in args.client_option)
    print(
        f"failover benchmark: {run.describe()}; {args.writers} writers, {attempt}; "
        f"data and logs under {scratch.path}",
        flush=True,
    )
    LEADER_NEWS.install()
    try:
        with scratch as base:
            try:
                import uvloop

                results = uvloop.run(run_all(args, base))
            except ImportError:
                results = asyncio.run(run_all(args, base))
    except KeyboardInterrupt:
        print("interrupted: the clusters were stopped", file=sys.stderr)
        return 130
    finally:
        LEADER_NEWS.remove()
    print_table(results)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json_path:
        json_path = output_path(args.json_path, "failover.json")
        write_json(results, args, json_path)
        print(f"json: {json_path.resolve()}")
    if png is not None and draw_png(results, png):
        print(f"figure: {png.resolve()}")
    broken = [r for r in results if r["writes"]["lost"] or r["writes"]["applied_twice"]]
    for result in broken:
        why = (
            " (etcd's gateway has no request ids: a put retried after an attempt timeout can"
            " apply twice)"
            if result["system"] != "kvstore"
            else ""
        )
        print(f"writes lost or applied twice: {result['system']} {result['fault']}: "
              f"{result['writes']}{why}")  # fmt: skip
    return 1 if any(r["system"] == "kvstore" for r in broken) else 0


if __name__ == "__main__":
    sys.exit(main())
