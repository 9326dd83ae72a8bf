"""Embedding of closed drift windows and the drift detectors' updates, in one thread."""

from __future__ import annotations

import logging
import threading
from typing import Any

from agentwatch.settings import Settings
from agentwatch.streams.dataflow import Dataflow

log = logging.getLogger(__name__)


def lower_thread_priority() -> None:
    """Run the calling thread (on Linux, threads have their own policy and nice value) at idle
    priority (see :func:`~agentwatch.streams.embedder_process.idle_priority`)."""
    from agentwatch.streams.embedder_process import idle_priority

    get_id = getattr(threading, "get_native_id", None)
    if get_id is not None:
        idle_priority(tid=get_id())


class DriftStage:
    """Embedding of closed drift windows and the drift detectors' updates, in one thread.

    The windows are sampled per keyed partition (the core's samplers). The model runs in a
    child process at the lowest CPU priority (:class:`EmbedderProcess`: in this process its
    Python-level steps would hold the GIL the event loop needs), loaded at :meth:`preload` or
    on the first due window, so workers start fast. The thread that waits for it and updates
    the drift detectors runs at the lowest priority too: closed windows wait for CPU the stream
    leaves idle (drift windows close every few minutes; ingest may not wait). Under sustained
    full load they wait, bounded: the samplers drop the oldest pending windows and count them
    (``agentwatch_drift_windows_dropped_total``).
    """

    def __init__(self, settings: Settings, dataflow: Dataflow, embedder: Any = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from agentwatch.reference import ReferenceStore

        self.dataflow = dataflow
        if embedder is None:
            from agentwatch.streams.embedder_process import EmbedderProcess

            embedder = EmbedderProcess(settings.embedding_model, max_sentences_per_s=settings.embed_max_sentences_per_s)
        self.embedder = embedder
        self.store = ReferenceStore(settings.data_dir)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed",
                                           initializer=lower_thread_priority)
        self._references_loaded_at: dict[int, float] = {}

    def preload(self) -> None:
        """Load the model now, in the drift thread (which lives as long as the worker: a child
        process restarted from it dies with the worker, not with a passing thread)."""
        self.executor.submit(lambda: self.embedder.dimension)

    def shutdown(self) -> None:
        """At a stop: the embedding child goes at once, whatever it was doing (loading the model
        at idle priority takes as long as the CPU stays busy, and the interpreter's exit would
        wait for it); drift windows not yet checked are a sample, not data."""
        shutdown = getattr(self.embedder, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.executor.shutdown(wait=False, cancel_futures=True)

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
