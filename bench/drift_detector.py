"""Cost of one drift check (``DriftDetector.update``), excluding embedding; moved out of
:mod:`agentwatch.detectors.drift` (benchmarks do not ship). ``bench.drift_sampler`` adds the
embedding throughput for ``agentwatch bench``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agentwatch.detectors.drift import DriftDetector, EmbeddedWindow


def bench_drift(*, window_rows: int = 500, reference_rows: int = 2000, dim: int = 384,
                repeats: int = 5, seed: int = 0, **detector_kwargs: Any) -> dict[str, Any]:
    """Milliseconds per drift check, excluding embedding (medians over ``repeats``).

    ``skew_check_ms``: one window against its reference (target: <= 50 ms for 500 x 384
    against 2,000 rows); ``skew_and_drift_check_ms``: against the reference and the previous
    window, which is what ``update`` does in steady state. The clock is read here, in the
    benchmark, never in the detector. Embeddings/s: :func:`bench.drift_sampler.bench_drift`.
    """
    rng = np.random.default_rng(seed)

    def unit(rows: int) -> np.ndarray:
        x = rng.normal(size=(rows, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    texts = tuple(f"prompt {i % 97} about topic {i % 13}" for i in range(window_rows))
    ref_texts = [f"prompt {i % 89} about topic {i % 11}" for i in range(reference_rows)]
    config = {"min_history_windows": 1, "history_windows": 1, **detector_kwargs}
    skew_only, both = DriftDetector(**config), DriftDetector(**config)
    reference = unit(reference_rows)
    started = time.perf_counter()
    skew_only.set_reference("bench", reference, ref_texts)
    set_reference_ms = (time.perf_counter() - started) * 1000
    both.set_reference("bench", reference, ref_texts)
    skew_ms, both_ms = [], []
    for i in range(repeats + 1):
        event = EmbeddedWindow("bench", 60.0 * (i + 1), texts, unit(window_rows))
        skew_only.restore({"keys": {}})  # no history: only the skew comparison runs
        started = time.perf_counter()
        skew_only.update(event)
        skew_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        both.update(event)
        both_ms.append((time.perf_counter() - started) * 1000)
    return {
        "window_rows": window_rows, "reference_rows": reference_rows, "dim": dim,
        "comparison_rows": min(reference_rows, skew_only.reference_sample_size),
        "permutations": skew_only.permutations,
        "set_reference_ms": round(set_reference_ms, 1),
        "skew_check_ms": round(float(np.median(skew_ms[1:])), 1),
        "skew_and_drift_check_ms": round(float(np.median(both_ms[2:] or both_ms[1:])), 1),
    }
