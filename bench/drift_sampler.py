"""Drift figures for ``agentwatch bench`` (section ``drift``): the detector's check cost plus
embedding throughput; moved out of :mod:`agentwatch.streams.drift_sampler`."""

from __future__ import annotations

from typing import Any


def bench_drift(*, embed: bool = True, embed_sentences: int = 256, **kwargs: Any
                ) -> dict[str, Any]:
    """``agentwatch bench`` figures for drift: the check cost (:func:`bench.drift_detector.bench_drift`,
    excluding embedding) plus embeddings per second with the bundled model at 1 and 2 torch
    threads. ``kwargs`` go to the check benchmark (window_rows, reference_rows, detector
    settings such as reference_sample_size)."""
    from bench.drift_detector import bench_drift as bench_check

    figures = bench_check(**kwargs)
    if embed:
        from agentwatch.streams.embeddings import Embedder, measure_embeddings_per_s

        verbs = ("freeze", "pay", "cancel", "renew", "check", "book", "change", "report")
        things = ("card", "account", "flight", "bill", "pin", "order", "subscription", "car")
        sentences = [f"how do i {v} my {t} for the {n}th time today"
                     for n, (v, t) in enumerate((v, t) for v in verbs for t in things)]
        sentences = (sentences * (embed_sentences // len(sentences) + 1))[:embed_sentences]
        for threads in (1, 2):
            embedder = Embedder(max_sentences_per_s=None, threads=threads)
            figures[f"embeddings_per_s_{threads}_threads"] = round(
                measure_embeddings_per_s(embedder, sentences), 1)
    return figures
