"""Detector checkpoint size and save/restore time at the per-trace caps (``agentwatch bench``
section ``detector_checkpoint``); moved out of :mod:`agentwatch.streams.checkpoint`."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import orjson

from agentwatch.streams.checkpoint import _DUMPS_OPTIONS, DetectorCheckpoint


def bench_checkpoint(n_traces: int = 60_000, *, max_traces: int = 50_000, repeat: int = 3,
                     directory: Path | None = None) -> dict[str, Any]:
    """Size and save/restore time of a checkpoint with the per-trace maps at their cap.

    Fills every registered detector (default config, loop and tool caps at ``max_traces``) with
    ``n_traces`` distinct 3-event traces, the way ``bench_trace_state`` does, then saves
    ``repeat`` times in-process and ``repeat`` times in the background (forked child), as the
    worker's timer does. ``encode_ms`` (snapshot + encoding) is what an in-process save blocks
    the event loop for (the shutdown save); ``background_blocking_ms`` is what a timer save
    blocks it for (the fork), ``background_child_private_mb`` the memory its child copies.
    """
    from agentwatch.detectors.registry import build_detectors
    from agentwatch.detectors.runner import DetectorRunner
    from bench.detector_state import WORKER_GC_THRESHOLD, _trace_chunk
    from tests.support.synthetic import tool_definitions_json

    config = {"agent_loop": {"max_traces": max_traces}, "hallucinated_tool": {"max_traces": max_traces}}
    previous = gc.get_threshold()
    gc.set_threshold(*WORKER_GC_THRESHOLD)
    owned = directory is None
    where = Path(tempfile.mkdtemp(prefix="agentwatch-ckpt-")) if owned else Path(directory)
    try:
        runner = DetectorRunner(build_detectors(config))
        defs = tool_definitions_json(("search", "lookup_order", "fetch_url"))
        for first in range(0, n_traces, 10_000):
            runner.process(_trace_chunk(first, min(10_000, n_traces - first), 2_000.0, defs))
        checkpoint = DetectorCheckpoint(where / "detectors-bench-w0.json", runner)
        encode_ms, total_ms = [], []
        for _ in range(repeat):
            if not checkpoint.maybe_save(force=True):
                raise RuntimeError("checkpoint save failed")
            encode_ms.append(checkpoint.last_encode_s * 1000)
            total_ms.append(checkpoint.last_save_s * 1000)
        blocking_ms, child_mb, background_ms = [], [], []
        for _ in range(repeat if checkpoint.fork_saves else 0):
            if not asyncio.run(checkpoint.maybe_save_async(force=True)) or not checkpoint.forked_saves:
                raise RuntimeError("background checkpoint save failed")
            blocking_ms.append(checkpoint.last_blocking_s * 1000)
            child_mb.append(checkpoint.last_child_private_bytes / 2**20)
            background_ms.append(checkpoint.last_save_s * 1000)
        restored = DetectorCheckpoint(checkpoint.path, DetectorRunner(build_detectors(config)))
        if not restored.restore():
            raise RuntimeError("checkpoint restore failed")
        return {"n_traces": n_traces, "max_traces": max_traces, "state_sizes": runner.state_sizes(),
                "bytes": checkpoint.last_save_bytes,
                "bytes_by_detector": {name: len(orjson.dumps(snap, option=_DUMPS_OPTIONS))
                                      for name, snap in runner.snapshot().items()},
                "encode_ms_median": round(statistics.median(encode_ms), 1),
                "encode_ms_max": round(max(encode_ms), 1),
                "save_ms_median": round(statistics.median(total_ms), 1),
                "save_ms_max": round(max(total_ms), 1),
                "background_blocking_ms_median": round(statistics.median(blocking_ms), 2) if blocking_ms else None,
                "background_blocking_ms_max": round(max(blocking_ms), 2) if blocking_ms else None,
                "background_save_ms_median": round(statistics.median(background_ms), 1) if background_ms else None,
                "background_child_private_mb_max": round(max(child_mb), 1) if child_mb else None,
                "rss_mb": round(_rss_bytes() / 2**20, 1),
                "restore_ms": round(restored.last_restore_s * 1000, 1)}
    finally:
        gc.set_threshold(*previous)
        if owned:
            shutil.rmtree(where, ignore_errors=True)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
