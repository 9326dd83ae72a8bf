"""Drift sampling, embedding and checkpoint figures on a worker's /metrics (read at scrape time)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agentwatch.dashboards.metrics import PipelineMetrics, WorkerStateCollector, exported_sample_names
from agentwatch.events import LlmCall
from agentwatch.streams.partition_checkpoint import PartitionCheckpointStore
from agentwatch.streams.drift_sampler import DriftSampler
from agentwatch.streams.embeddings import Embedder


def _call(i: int, prompt: str, service: str = "shop") -> LlmCall:
    return LlmCall(ts=float(i), trace_id=f"t{i}", span_id=f"s{i}", service=service, prompt=prompt)


def test_counters_come_from_the_live_objects_at_scrape_time(tmp_path):
    sampler = DriftSampler(window_s=60.0, sample_size=10, min_window_size=3, grace_s=0.0)
    embedder = Embedder(max_sentences_per_s=None, threads=1)
    checkpoint = PartitionCheckpointStore(tmp_path, "agentwatch")
    registry = CollectorRegistry()
    PipelineMetrics(registry)
    registry.register(WorkerStateCollector(sampler=sampler, embedder=embedder, checkpoint=checkpoint))

    def value(name, labels=None):
        return registry.get_sample_value(name, labels or {})

    assert value("agentwatch_drift_prompts_offered_total") == 0.0
    # Window 0-60 s: 4 prompts, one repeated and one empty; window 60-120 s: 1 prompt (too small).
    sampler.offer([_call(1, "where is my card"), _call(2, "where is my card"), _call(3, ""),
                   _call(4, "freeze my account"), _call(5, "what is my balance")])
    sampler.offer([_call(70, "book a flight")])
    windows = sampler.due_windows(200.0)
    embedder.encode(windows[0].texts)
    checkpoint.save("trace", 3, checkpoint.encode({"state": {}}))
    checkpoint.last_blocking_s = 0.004  # what the worker's checkpointer records per snapshot

    assert value("agentwatch_drift_prompts_offered_total") == 6.0
    assert value("agentwatch_drift_prompts_skipped_total", {"reason": "empty"}) == 1.0
    assert value("agentwatch_drift_prompts_skipped_total", {"reason": "duplicate"}) == 1.0
    assert value("agentwatch_drift_windows_closed_total") == float(sampler.counters.windows_closed)
    assert value("agentwatch_drift_windows_dropped_total", {"reason": "too_small"}) == \
        float(sampler.counters.small_windows_dropped)
    assert [len(w.texts) for w in windows] == [3]
    assert value("agentwatch_embeddings_total") == 3.0
    assert value("agentwatch_detector_checkpoint_saves_total") == 1.0
    assert value("agentwatch_detector_checkpoint_bytes") == float(checkpoint.path("trace", 3).stat().st_size)
    assert value("agentwatch_detector_checkpoint_blocking_seconds") == 0.004
    checkpoint.save("keyed", 0, checkpoint.encode({"state": {"x": 1}}))
    assert value("agentwatch_detector_checkpoint_saves_total") == 2.0


def test_families_are_exported_as_zeros_without_drift_or_checkpoints():
    registry = CollectorRegistry()
    registry.register(WorkerStateCollector())
    assert registry.get_sample_value("agentwatch_embeddings_total") == 0.0
    assert registry.get_sample_value("agentwatch_detector_checkpoint_bytes") == 0.0
    names = exported_sample_names()
    assert {"agentwatch_drift_windows_dropped_total", "agentwatch_detector_checkpoint_saves_total",
            "agentwatch_embedding_throttled_seconds_total"} <= names
