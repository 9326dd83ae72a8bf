"""Embedding of closed drift windows and the drift detectors' updates, in one thread."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from agentwatch.settings import Settings
from agentwatch.streams.dataflow import Dataflow

log = logging.getLogger(__name__)


# The embedding threads' nice value: they run on CPU the stream does not use.
EMBED_NICE = 19


def lower_thread_priority(nice: int = EMBED_NICE) -> None:
    """Give the calling thread (on Linux, threads have nice values of their own) the lowest CPU
    priority: drift windows close every few minutes and may wait, ingest may not. Under
    sustained full load they wait, bounded: the samplers drop the oldest pending windows and
    count them (``agentwatch_drift_windows_dropped_total``). Elsewhere a no-op."""
    get_id = getattr(threading, "get_native_id", None)
    if get_id is None or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, get_id(), nice)
    except OSError as exc:  # a sandbox that refuses it: embedding still works, at normal priority
        log.warning("embedding thread priority not lowered: %s", exc)


class DriftStage:
    """Embedding of closed drift windows and the drift detectors' updates, in one thread.

    The windows are sampled per keyed partition (the core's samplers); the model loads in this
    thread on the first due window or at :meth:`preload`, so workers start fast. The thread
    (and the preload's) runs at the lowest CPU priority, with one torch thread
    (``Embedder(threads=1)``): embedding costs the stream no CPU it needs. torch releases the
    GIL in its kernels, so the Python loop does not wait on it either.
    """

    def __init__(self, settings: Settings, dataflow: Dataflow) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from agentwatch.reference import ReferenceStore
        from agentwatch.streams.embeddings import Embedder

        self.dataflow = dataflow
        self.embedder = Embedder(settings.embedding_model, max_sentences_per_s=settings.embed_max_sentences_per_s)
        self.store = ReferenceStore(settings.data_dir)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed",
                                           initializer=lower_thread_priority)
        self._references_loaded_at: dict[int, float] = {}

    def preload(self) -> None:
        """Load torch and the model now, in a thread of its own (not the embedding thread, so a
        checkpoint right after a start does not wait for the whole load)."""
        def load() -> None:
            lower_thread_priority()
            _ = self.embedder.dimension

        threading.Thread(target=load, name="embed-preload", daemon=True).start()

    def check(self, due: list[tuple[Any, list[Any]]], now: float) -> list[Any]:
        """Embed the due windows and run each partition's drift detector (in the executor).

        Every check, raised or calm, goes to the drift gauges and counters here, in this one
        thread; the findings go back to the event loop to be written and sent."""
        from agentwatch.reference import load_bound_references
        from agentwatch.streams.drift_sampler import embed_windows

        findings: list[Any] = []
        for state, windows in due:
            detector = self.dataflow.drift_detector(state)
            if detector is None:
                continue
            if now - self._references_loaded_at.get(id(detector), float("-inf")) >= 30.0:
                self._references_loaded_at[id(detector)] = now
                try:
                    load_bound_references(self.store, detector, self.dataflow.owns_drift_key(state))
                except (OSError, ValueError) as exc:
                    log.warning("reference sets not loaded: %s", exc)
            embedded = embed_windows(windows, self.embedder)
            checks: list[Any] = []
            with self.dataflow.drift_lock:
                for window in embedded:
                    findings.extend(detector.update(window))
                    checks.extend(detector.last_checks)
            if self.dataflow.metrics is not None:
                self.dataflow.metrics.observe_drift_checks(checks)
        return findings
