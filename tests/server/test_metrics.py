"""kvstore/server/metrics.py: the storage's own counters reach /metrics when scraped."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvstore.raft.types import ConfState, Entry, HardState
from kvstore.server.metrics import NodeMetrics
from kvstore.storage.disk import DiskStorage
from kvstore.storage.memory import MemoryStorage


def _samples(metrics: NodeMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_disk_storage_counters_are_read_at_each_scrape(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path, initial_conf_state=ConfState(voters=(1,)))
    try:
        metrics = NodeMetrics(1)
        metrics.watch_storage(storage)
        before = _samples(metrics)
        assert before["kvstore_storage_fsyncs_total"] == storage.metrics.fsync_count
        storage.save(HardState(term=1, vote=1, commit=0), [Entry(1, 1, data=b"x" * 100)], None)
        after = _samples(metrics)
        assert after["kvstore_storage_fsyncs_total"] == storage.metrics.fsync_count
        assert after["kvstore_storage_fsyncs_total"] > before["kvstore_storage_fsyncs_total"]
        assert after["kvstore_storage_written_bytes_total"] == storage.metrics.bytes_written
        assert after["kvstore_storage_written_bytes_total"] > 100
        assert after["kvstore_storage_fsync_seconds_total"] == storage.metrics.fsync_seconds_total
        assert (
            after["kvstore_storage_last_fsync_seconds"] == storage.metrics.last_fsync_seconds
        )
        assert after["kvstore_proposals_total"] == 0  # the node's own metrics are still there
    finally:
        storage.close()


def test_storage_without_counters_exports_nothing() -> None:
    metrics = NodeMetrics(1)
    metrics.watch_storage(MemoryStorage())
    samples = _samples(metrics)
    assert not any(name.startswith("kvstore_storage_") for name in samples)
    assert "kvstore_proposals_total" in samples
