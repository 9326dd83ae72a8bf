"""VRAM leak detector and GPU record encoder cost per sample (``agentwatch bench`` section
``vram_detector``), on simulated leaking hosts; moved out of :mod:`agentwatch.collectors.gpu_sim`."""

from __future__ import annotations

import time
from typing import Any

from agentwatch.collectors.gpu_sim import PROFILES, SimulatedGpuSource, simulated_stream
from agentwatch.events import GpuSample


def bench_vram(*, hosts: int = 50, duration_s: float = 3600.0, interval_s: float = 5.0,
               seed: int = 0) -> dict[str, float]:
    """Measured figures for ``agentwatch bench``: detector and encoder cost per GPU sample.

    ``hosts`` simulated leaking servers (device + process rows, plus their LLM calls) over
    ``duration_s`` of event time are generated first, then timed through
    :class:`~agentwatch.detectors.vram.VramLeakDetector` and :func:`encode_round`.
    """
    from agentwatch.collectors.gpu_exporter import encode_round
    from agentwatch.detectors.vram import VramLeakDetector

    start = 1_700_000_040.0
    rounds: list[list[Any]] = []
    samples_per_round: list[list[GpuSample]] = []
    for h in range(hosts):
        source = SimulatedGpuSource(PROFILES[h % len(PROFILES)], start_ts=start,
                                    host=f"bench-{h}", seed=seed + h)
        for k, (_ts, samples, calls) in enumerate(simulated_stream(
                source, start_ts=start, duration_s=duration_s, interval_s=interval_s)):
            if h == 0:
                rounds.append([])
                samples_per_round.append([])
            rounds[k].extend(calls)
            rounds[k].extend(samples)
            samples_per_round[k].extend(samples)
    events = [e for r in rounds for e in r]
    n_samples = sum(len(r) for r in samples_per_round)
    detector = VramLeakDetector()
    t = time.perf_counter()
    findings = 0
    for event in events:
        findings += len(detector.update(event))
    detect_s = time.perf_counter() - t
    t = time.perf_counter()
    records = 0
    for samples in samples_per_round:
        records += len(encode_round(samples))
    encode_s = time.perf_counter() - t
    return {
        "vram_events": float(len(events)),
        "vram_gpu_samples": float(n_samples),
        "vram_detector_events_per_s": len(events) / detect_s,
        "vram_detector_us_per_event": detect_s / len(events) * 1e6,
        "vram_findings": float(findings),
        "vram_state_entries": float(detector.state_size()),
        "gpu_encode_samples_per_s": n_samples / encode_s,
        "gpu_encode_records": float(records),
    }
