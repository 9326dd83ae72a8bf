"""DriftStage: every drift check, raised or calm, reaches the drift gauges and counters."""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry

from agentwatch.dashboards.metrics import PipelineMetrics
from agentwatch.detectors.drift import DriftDetector
from agentwatch.settings import Settings
from agentwatch.streams.drift_sampler import SampledWindow
from agentwatch.streams.drift_stage import DriftStage

KEY = "service=shop"
DIM = 16


class _ShiftingEmbedder:
    """Seeded normal vectors; prompts starting with "moved" are shifted by 4 sd on one axis."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def encode(self, texts):
        vectors = self.rng.normal(size=(len(texts), DIM))
        vectors[:, 0] += [4.0 if t.startswith("moved") else 0.0 for t in texts]
        return vectors


class _OnePartition:
    """The part of Dataflow a DriftStage uses: one keyed partition's drift detector."""

    def __init__(self, detector, metrics) -> None:
        self.detector, self.metrics = detector, metrics
        self.drift_lock = threading.Lock()

    def drift_detector(self, state):
        return self.detector

    def owns_drift_key(self, state):
        return lambda key: True


def _window(i: int, label: str) -> SampledWindow:
    return SampledWindow(KEY, 60.0 * i, 60.0 * (i + 1),
                         tuple(f"{label} prompt {j}" for j in range(80)), 80)


def test_calm_and_raised_checks_set_the_gauges_and_count(tmp_path):
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    stage = DriftStage(Settings(data_dir=tmp_path), _OnePartition(
        DriftDetector(permutations=100, history_windows=1), metrics), embedder=_ShiftingEmbedder())
    v = registry.get_sample_value
    labels = {"key": KEY, "check": "drift", "statistic": "mmd"}

    # The first window only becomes history: nothing is checked yet.
    assert stage.check([("p0", [_window(0, "calm")])], now=0.0) == []
    assert v("agentwatch_drift_checks_total", {"key": KEY, "check": "drift"}) is None

    # A calm check raises nothing and still leaves its score under its threshold.
    assert stage.check([("p0", [_window(1, "calm")])], now=1.0) == []
    assert v("agentwatch_drift_checks_total", {"key": KEY, "check": "drift"}) == 1
    calm_score, calm_threshold = (v("agentwatch_drift_score", labels),
                                  v("agentwatch_drift_threshold", labels))
    assert calm_score < calm_threshold

    (finding,) = stage.check([("p0", [_window(2, "moved")])], now=2.0)
    assert finding.kind == "drift" and not finding.resolved
    assert v("agentwatch_drift_checks_total", {"key": KEY, "check": "drift"}) == 2
    assert v("agentwatch_drift_score", labels) == finding.value
    assert v("agentwatch_drift_threshold", labels) == finding.threshold > 0
    assert finding.value > finding.threshold
    # No reference bound: no skew series.
    assert v("agentwatch_drift_checks_total", {"key": KEY, "check": "skew"}) is None


def test_the_drift_thread_runs_at_the_lowest_priority_and_the_stream_does_not(tmp_path):
    import os

    stage = DriftStage(Settings(data_dir=tmp_path), _OnePartition(DriftDetector(), None), embedder=_ShiftingEmbedder())
    try:
        drift_thread = stage.executor.submit(lambda: (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                                                      os.sched_getscheduler(threading.get_native_id()))).result()
    finally:
        stage.executor.shutdown()
    assert drift_thread == (19, os.SCHED_IDLE)
    # Per thread: the thread that runs the stream keeps its priority.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19
