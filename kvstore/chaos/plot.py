"""The picture of one chaos drill: every operation's latency over time, faults shaded.

Kept apart from the drill so that matplotlib (the `bench` extra) is imported only when a run
folder is kept. Without matplotlib the plot is skipped with a log line, never an error: the
history and the timeline in the same folder hold everything the picture shows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvstore.chaos.drill import DrillReport

logger = logging.getLogger("kvstore.chaos")


def plot_run(
    path: Path, operations: list[dict[str, Any]], report: DrillReport, origin_s: float
) -> bool:
    """Draw the drill into `path` (PNG); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("event=plot_skipped reason=matplotlib_not_installed")
        return False

    figure, axes = plt.subplots(figsize=(12, 5))
    series: dict[str, tuple[list[float], list[float]]] = {
        "ok": ([], []),
        "failed": ([], []),
        "unknown outcome": ([], []),
    }
    ceiling_ms = 1.0
    for op in operations:
        start_s = op["invoke"] / 1e9 - origin_s
        if op["return"] is None:
            continue
        latency_ms = max((op["return"] - op["invoke"]) / 1e6, 0.01)
        ceiling_ms = max(ceiling_ms, latency_ms)
        kind = "ok" if op["ok"] else "failed"
        series[kind][0].append(start_s)
        series[kind][1].append(latency_ms)
    for op in operations:
        if op["return"] is None:
            series["unknown outcome"][0].append(op["invoke"] / 1e9 - origin_s)
            series["unknown outcome"][1].append(ceiling_ms * 1.5)
    styles = {
        "ok": ("tab:blue", "."),
        "failed": ("tab:orange", "x"),
        "unknown outcome": ("tab:red", "v"),
    }
    for name, (xs, ys) in series.items():
        if xs:
            color, marker = styles[name]
            axes.scatter(xs, ys, s=6, c=color, marker=marker, label=f"{name} ({len(xs)})")
    for event in report.timeline:
        end = event.healed_at_s if event.healed_at_s is not None else event.injected_at_s + 1
        axes.axvspan(event.injected_at_s, end, color="tab:gray", alpha=0.25)
        axes.text(
            event.injected_at_s, ceiling_ms * 3, event.name, rotation=90, fontsize=7, va="bottom"
        )
        if event.recovered_at_s is not None:
            axes.axvline(event.recovered_at_s, color="tab:green", linewidth=0.8)
    failed_checks = [check.name for check in report.checks if not check.ok]
    verdict = "PASS" if report.ok else f"FAIL: {', '.join(failed_checks)}"
    config = report.config
    axes.set_title(
        f"kvstore chaos: {config.workload}, faults {config.faults}, seed {config.seed} - {verdict}"
    )
    axes.set_yscale("log")
    axes.set_xlabel(
        "seconds since the drill started (gray: fault active; green: first write after heal)"
    )
    axes.set_ylabel("operation latency (ms; unknown outcomes on top)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
