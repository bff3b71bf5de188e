"""What bench/failover.py prints and writes: the table, the PNG and the JSON document."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Any

from etcdcluster import etcd_binary
from failover_systems import kvstore_timing_ms
from failover_trial import PHASES, Call
from stats import percentile


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def print_table(results: list[dict[str, Any]]) -> None:
    print()
    print(
        "Unavailability (ms) per trial: the worst writer's wait from its last acknowledged write"
        " before the fault to its first after it;\n'any p50': median time no writer at all got"
        " an acknowledgement; errors: failed client calls; longest: longest single call (ms);"
        "\nlost / twice: acknowledged writes missing / keys applied twice at the final read-back"
    )
    header = (
        f"{'fault':<8}{'system':<16}{'trials':>6}{'min':>8}{'p50':>8}{'p90':>8}{'p99':>8}"
        f"{'max':>8}{'any p50':>9}  {'errors':>6}{'longest':>9}  {'lost':>4}{'twice':>6}"
        "  vs kvstore p50/p99"
    )
    print(header)
    print("-" * len(header))
    baseline: dict[str, dict[str, Any]] = {}
    for result in results:
        s, w, fault = result["summary"], result["writes"], result["fault"]
        if result["system"] == "kvstore":
            baseline[fault] = s
        ratio = ""
        base = baseline.get(fault)
        if base is not None and result["system"] != "kvstore" and base["p50_ms"] > 0:
            ratio = f"{s['p50_ms'] / base['p50_ms']:.1f}x / {s['p99_ms'] / base['p99_ms']:.1f}x"
        print(
            f"{fault:<8}{result['system']:<16}{s['trials']:>6}{_fmt(s['min_ms']):>8}"
            f"{_fmt(s['p50_ms']):>8}{_fmt(s['p90_ms']):>8}{_fmt(s['p99_ms']):>8}"
            f"{_fmt(s['max_ms']):>8}{_fmt(s['cluster_p50_ms']):>9}  {s['client_errors']:>6}{_fmt(s['longest_call_ms']):>9}"
            f"  {w['lost']:>4}{w['applied_twice']:>6}  {ratio}"
        )
    print_ab(results)
    print_phases(results)
    disturbed = [r for r in results if r["summary"]["disturbed"]]
    for result in disturbed:
        print(
            f"note: {result['system']} {result['fault']}: the returning old leader disturbed "
            f"the new one in {result['summary']['disturbed']} trial(s)"
        )


def print_ab(results: list[dict[str, Any]]) -> None:
    """--ab-option: each group's worst writer over the same trials (a: base, b: variant)."""
    shown = [r for r in results if r["summary"].get("ab")]
    if not shown:
        return
    print()
    print("A/B in the same trials (a: even writers, base config; b: odd writers, --ab-option):")
    for result in shown:
        a, b = result["summary"]["ab"]["a"], result["summary"]["ab"]["b"]
        print(
            f"  {result['fault']:<8} a p50/p90/p99 {_fmt(a['p50_ms'])}/{_fmt(a['p90_ms'])}/"
            f"{_fmt(a['p99_ms'])} ms   b {_fmt(b['p50_ms'])}/{_fmt(b['p90_ms'])}/"
            f"{_fmt(b['p99_ms'])} ms"
        )


def print_phases(results: list[dict[str, Any]]) -> None:
    """The timeline: each phase's median over the trials, ms after the fault (node logs for
    the cluster's steps, the client library's log for when writers learned the new leader)."""
    shown = [
        r for r in results if any(v is not None for v in r["summary"]["phases_p50_ms"].values())
    ]
    if not shown:
        return
    print()
    print("Timeline (median ms after the fault; '-' = did not happen or not logged):")
    names = [phase for phase in PHASES]
    for result in shown:
        phases = result["summary"]["phases_p50_ms"]
        print(f"  {result['fault']} {result['system']}:")
        for name in names:
            print(f"    {name:<26}{_fmt(phases.get(name)):>8}")


def _median_trial(result: dict[str, Any]) -> int:
    values = [t["unavailability_ms"] for t in result["trials"]]
    target = percentile(values, 0.5)
    return values.index(target)


def draw_png(results: list[dict[str, Any]], path: Path) -> bool:
    """Left: every call's latency around the median kvstore trial of the first fault, phases
    marked; right: the distribution of unavailability per system and fault."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install -e '.[bench]')", file=sys.stderr)
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    shown = next((r for r in results if r["system"] == "kvstore" and r["trials"]), None)
    if shown is not None:
        _plot_timeline(left, shown, _median_trial(shown))
    labels, data = [], []
    for result in results:
        labels.append(f"{result['system']}\n{result['fault']}")
        data.append([t["unavailability_ms"] for t in result["trials"]])
    right.boxplot(data, whis=(0, 100), showfliers=False)
    for position, values in enumerate(data, start=1):
        jitter = random.Random(position)
        right.scatter(
            [position + jitter.uniform(-0.15, 0.15) for _ in values], values, s=10, alpha=0.6
        )
    right.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    right.set_yscale("log")
    right.set_ylabel("unavailability (ms, log scale)")
    right.set_title("Unavailability per trial (box: min/quartiles/max)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _median_calls(result: dict[str, Any]) -> list[Call]:
    """The calls of the median trial: from this run, or from a saved JSON (--plot-from)."""
    if "timelines" in result:
        calls: list[Call] = result["timelines"][_median_trial(result)]
        return calls
    return [Call(**call) for call in result["calls_of_median_trial"]]


def _plot_timeline(axes: Any, result: dict[str, Any], index: int) -> None:
    trial = result["trials"][index]
    calls = _median_calls(result)
    worst = trial.get("worst_writer")
    groups = [
        ("acknowledged write", "tab:blue", [c for c in calls if c.ok and c.writer != worst]),
        (f"writer {worst} (waited longest)", "tab:orange", [
            c for c in calls if c.ok and c.writer == worst
        ]),
        ("failed call", "tab:red", [c for c in calls if not c.ok]),
    ]  # fmt: skip
    for label, color, group in groups:
        if group:
            points = [(c.ret * 1000, (c.ret - c.invoke) * 1000) for c in group]
            axes.scatter(*zip(*points), s=8, label=label, color=color)
    timeline = trial["timeline_ms"]
    marks = [
        ("fault_injected", "fault injected", "black"),
        ("leader_loss_noticed", "leader loss noticed", "tab:brown"),
        ("new_leader_elected", f"new leader {trial['new_leader']} (term {trial['new_term']})",
         "tab:green"),
        ("first_write_acked", "first write acknowledged", "tab:purple"),
    ]  # fmt: skip
    for name, label, color in marks:
        if timeline.get(name) is not None:
            axes.axvline(timeline[name], color=color, linestyle="--", linewidth=1, label=label)
    axes.axvspan(trial["last_ack_before_ms"], timeline["first_write_acked"], color="tab:red",
                 alpha=0.1, label=f"no writer acknowledged "
                 f"({trial['cluster_unavailability_ms']:.0f} ms)")  # fmt: skip
    unavailable = trial["unavailability_ms"]
    axes.set_xlim(-max(150.0, unavailable), max(timeline["first_write_acked"], unavailable) + 300)
    axes.set_yscale("log")
    axes.set_xlabel("time the call returned, relative to the fault (ms)")
    axes.set_ylabel("call latency (ms, log scale)")
    axes.set_title(
        f"{result['system']} {result['fault']}: median trial ({index + 1}), every client call;"
        f"\nworst writer unavailable {unavailable:.0f} ms",
        fontsize=10,
    )
    axes.legend(fontsize=7, loc="upper right")


def write_json(results: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Every figure, the settings and the run's description (bench/runinfo.py) as JSON."""
    heartbeat_ms, election_ms = kvstore_timing_ms()
    document = {
        "benchmark": "failover",
        "run": args.run.finish(),
        "etcd": etcd_binary(),
        "settings": {
            "trials": args.trials,
            "faults": args.faults,
            "compare": args.compare,
            "writers": args.writers,
            "attempt_timeout_ms": args.attempt_timeout_ms,
            # The ClientConfig every kvstore writer used (the defaults unless
            # --attempt-timeout-ms or --http-only); etcd uses its attempt timeout and deadline.
            "client_config": {
                name: str(value) if isinstance(value, StrEnum) else value
                for name, value in asdict(args.client_config).items()
            },
            # --ab-option: what the odd writers' ClientConfig changed (summary "ab": b).
            "ab_option": dict(args.ab_option),
            "pause_s": args.pause_s,
            "settle_s": args.settle_s,
            "post_s": args.post_s,
            "poll_ms": args.poll_ms,
            "kvstore_heartbeat_ms": heartbeat_ms,
            "kvstore_election_ms": election_ms,
        },
        "results": [
            {
                **{k: v for k, v in r.items() if k != "timelines"},
                "calls_of_median_trial": [
                    asdict(c) for c in r["timelines"][_median_trial(r)]
                ] if r["trials"] else [],
            }
            for r in results
        ],
    }  # fmt: skip
    path.write_text(json.dumps(document, indent=1))
