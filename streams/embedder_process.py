"""The drift embedder in a child process at the lowest CPU priority (see :class:`EmbedderProcess`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from agentwatch.streams.embeddings import Embedder

log = logging.getLogger(__name__)

# The child's nice value (and SCHED_IDLE): it runs on CPU the stream leaves idle.
EMBED_NICE = 19

_CHILD_EMBEDDER: Embedder | None = None


def _child_init(model: str | None, batch_size: int, threads: int | None, nice: int) -> None:
    global _CHILD_EMBEDDER
    import signal

    from agentwatch.stack import _die_with_parent

    # Like the normaliser: the stop signal reaches the worker's whole process group, and the
    # child goes when the worker goes (the parent-death signal), not before it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(signal.SIGKILL)
    idle_priority(nice)
    _CHILD_EMBEDDER = Embedder(model, batch_size=batch_size, max_sentences_per_s=None, threads=threads)


def idle_priority(nice: int = EMBED_NICE, tid: int = 0) -> None:
    """Run the calling process (or thread ``tid``, on Linux) only on CPU nothing else wants:
    the SCHED_IDLE policy where there is one (below any nice value: a nice-19 task still takes
    a share from busy ones), and the lowest nice value. Refused (a sandbox): a warning, and it
    runs at normal priority."""
    import os

    try:
        if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.warning("priority not lowered: %s", exc)


def _child_encode(texts: list[str]) -> np.ndarray:
    assert _CHILD_EMBEDDER is not None
    return _CHILD_EMBEDDER.encode(texts)


def _child_dimension() -> int:
    assert _CHILD_EMBEDDER is not None
    return _CHILD_EMBEDDER.dimension


def _child_priority() -> tuple[int, bool]:
    """(nice value, whether the policy is SCHED_IDLE) of the child."""
    import os

    idle = hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE
    return os.getpriority(os.PRIO_PROCESS, 0), idle


class EmbedderProcess(Embedder):
    """An :class:`~agentwatch.streams.embeddings.Embedder` whose model runs in a child process
    at idle priority (SCHED_IDLE, nice 19), rate-limited in this one.

    torch releases the GIL inside its kernels only: a model's Python-level steps (tokenising,
    hundreds of module calls per batch) hold it. In a thread of the worker, embedding a drift
    window stalled the event loop for as long (measured: the loop's CPU fell to 0.05-0.25 of a
    core in the half-seconds the embedding thread ran, at any thread priority). In a process
    of its own it shares no GIL, and at idle priority it takes only CPU the stream does not
    use (nice 19 alone still took about a third of a core from a saturated stream: 10-20% of
    its throughput): under full load windows wait, bounded and counted by the samplers.

    Batching, the rate limit and the counters are the in-process embedder's; each batch is
    encoded in the child. Start it from a thread that lives as long as the worker (the child's
    parent-death signal follows the thread that started it). A child that dies (the OOM
    killer) is replaced on the next call; the batch it held is tried once more.
    """

    def __init__(self, model: str | Path | None = None, *, batch_size: int = 64,
                 max_sentences_per_s: float | None = 100.0, burst: float | None = None,
                 threads: int | None = 1, nice: int = EMBED_NICE) -> None:
        super().__init__(model, batch_size=batch_size, max_sentences_per_s=max_sentences_per_s, burst=burst,
                         threads=threads)
        self.initargs = (self.model, batch_size, threads, nice)
        self.restarts = 0
        self._lock = threading.Lock()
        self._dimension: int | None = None
        self._closed = False
        self._pool = self._spawn()

    def _spawn(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_child_init, initargs=self.initargs)
        pool.submit(int)  # the process starts now, from this thread (the model loads on first use)
        return pool

    def _call(self, fn: Any, *args: Any) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        with self._lock:
            pool = self._pool
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as exc:
            with self._lock:
                if self._closed:
                    raise
                if self._pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._spawn()
                    self.restarts += 1
                    log.warning("embedding process died (%s); restarted it (restart %d)", exc, self.restarts)
                pool = self._pool
            return pool.submit(fn, *args).result()

    def preload(self) -> None:
        """Load the model in the child now (returns once it is loaded)."""
        _ = self.dimension

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self._dimension = int(self._call(_child_dimension))
        return self._dimension

    def child_priority(self) -> tuple[int, bool]:
        """(nice value, whether it runs under SCHED_IDLE) of the child process."""
        nice, idle = self._call(_child_priority)
        return int(nice), bool(idle)

    def child_pid(self) -> int | None:
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    def _encode_batch(self, batch: list[str]) -> np.ndarray:
        return self._call(_child_encode, batch)

    def shutdown(self) -> None:
        """Stop the child now, mid-batch if it is in one: the caller waiting on it gets
        BrokenProcessPool, and no child is started again."""
        with self._lock:
            self._closed = True
            pool = self._pool
        children = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for child in children:
            child.kill()
            child.join(5.0)
