"""What /metrics shows an operator besides kvstore's own series: process, runtime, garbage
collector, build, and the node gauges read at scrape time; no `*_created` noise."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvstore import __version__
from kvstore.server.metrics import NodeMetrics


def _samples(metrics: NodeMetrics) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_runtime_and_build_series_without_created_timestamps() -> None:
    metrics = NodeMetrics(1)
    metrics.proposals.inc()
    text = metrics.render().decode()
    assert "_created" not in text
    samples = _samples(metrics)
    assert samples["process_resident_memory_bytes{}"] > 0
    assert samples["process_open_fds{}"] > 0
    assert "python_gc_collections_total{generation=0}" in samples
    assert samples[f"kvstore_build_info{{python={_python()},version={__version__}}}"] == 1


def test_node_gauges_are_read_at_scrape_time() -> None:
    metrics = NodeMetrics(2)
    state = {"commit": 7.0, "applied": 5.0, "full": 0.0}
    metrics.bind_node(
        commit_index=lambda: state["commit"],
        applied_index=lambda: state["applied"],
        disk_full=lambda: state["full"],
    )
    assert _samples(metrics)["kvstore_commit_index{}"] == 7
    state.update(commit=9.0, applied=9.0, full=1.0)
    samples = _samples(metrics)
    assert samples["kvstore_commit_index{}"] == 9 and samples["kvstore_applied_index{}"] == 9
    assert samples["kvstore_disk_full{}"] == 1


def _python() -> str:
    import platform

    return platform.python_version()
