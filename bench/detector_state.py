"""Benchmarks of the issue-3 detectors: throughput and bounded per-trace memory.

``bench_trace_state`` feeds a million distinct traces through a :class:`DetectorRunner` and
samples the process RSS as it goes: past the point where the per-trace maps reach their cap the
RSS must stay flat. ``bench_detectors`` measures events/s on realistic synthetic agent traffic,
for all detectors together and for each alone. Both return plain dicts of measured figures for
``agentwatch bench``. Timings cover ``runner.process`` only, not event generation.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import sys
import time
from typing import Any, Callable, Sequence

import psutil

from agentwatch.detectors.cost import BudgetDetector, CostAnomalyDetector, RetryStormDetector
from agentwatch.detectors.loops import LoopDetector
from agentwatch.detectors.runner import DetectorRunner
from agentwatch.detectors.slo import SloDetector
from agentwatch.detectors.tools import HallucinatedToolDetector
from agentwatch.events import LlmCall, ToolCall
from tests.support.synthetic import START_TS, agent_traffic, tool_definitions_json

_MB = 1024 * 1024


def issue3_detectors(*, max_traces: int = 50_000,
                     budgets: dict[str, dict[str, float]] | None = None) -> list[Any]:
    """Fresh instances of the six issue-3 detectors (per-trace caps set to ``max_traces``)."""
    return [CostAnomalyDetector(), BudgetDetector(budgets=budgets or {}), RetryStormDetector(),
            LoopDetector(max_traces=max_traces), HallucinatedToolDetector(max_traces=max_traces),
            SloDetector()]


# What a stream worker should set at start-up (after imports, with gc.freeze()): CPython's default
# gen0 threshold of 700 runs a collection every few hundred events over long-lived detector state
# and costs ~30% of the detector throughput measured here.
WORKER_GC_THRESHOLD = (10_000, 20, 100)


@contextlib.contextmanager
def _gc_threshold(threshold: tuple[int, int, int] | None):
    previous = gc.get_threshold()
    if threshold is not None:
        gc.set_threshold(*threshold)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _trace_chunk(first: int, count: int, traces_per_s: float, defs: str) -> list[Any]:
    """``count`` distinct small traces: model call requesting a tool, the tool, final answer."""
    services = ("checkout-agent", "helpdesk", "research", "concierge")
    events: list[Any] = []
    for n in range(first, first + count):
        ts = START_TS + n / traces_per_s
        trace_id = f"{n:032x}"
        service = services[n % 4]
        args = f'{{"query": "q{n}", "top_k": {n % 10 + 1}}}'
        common = dict(trace_id=trace_id, service=service, project="shop", user=f"u{n % 500}",
                      session=f"s{n % 5000}")
        events.append(LlmCall(ts=ts, span_id="1", model="gpt-4o", input_tokens=900,
                              output_tokens=40, cost_usd=0.0026, priced=True, latency_ms=800.0,
                              prompt=f"user {n}: where is my order?", tool_definitions=defs,
                              requested_tool_calls=json.dumps(
                                  [{"name": "search", "arguments": args, "id": "c1"}]),
                              **common))
        events.append(ToolCall(ts=ts + 1.0, span_id="2", tool_name="search", arguments=args,
                               latency_ms=200.0, **common))
        events.append(LlmCall(ts=ts + 2.0, span_id="3", model="gpt-4o", input_tokens=1400,
                              output_tokens=120, cost_usd=0.0047, priced=True, latency_ms=900.0,
                              prompt=f"user {n}: where is my order? tool: found it",
                              tool_definitions=defs, **common))
    events.sort(key=lambda e: e.ts)
    return events


def bench_trace_state(n_traces: int = 1_000_000, *, max_traces: int = 50_000,
                      chunk_traces: int = 10_000, traces_per_s: float = 2_000.0,
                      make_detectors: Callable[[], Sequence[Any]] | None = None,
                      gc_threshold: tuple[int, int, int] | None = WORKER_GC_THRESHOLD,
                      ) -> dict[str, Any]:
    """Feed ``n_traces`` distinct traces (3 events each) and watch memory stay flat past the cap.

    Parameters
    ----------
    n_traces : int
        Distinct traces to feed.
    max_traces : int
        Per-trace cap of the loop and tool detectors.
    chunk_traces : int
        Traces generated (untimed) and processed (timed) per step; RSS is sampled per step.
    traces_per_s : float
        Event-time arrival rate (at 2,000/s the 900 s trace TTL would hold 1.8M traces, so
        the count cap, not the TTL, is what bounds the state here).
    make_detectors : callable, optional
        Builds the detectors to run (default: the six issue-3 detectors).
    gc_threshold : tuple of int, optional
        ``gc.set_threshold`` during the run (None: leave the interpreter's setting).

    Returns
    -------
    dict
        ``events_per_s`` (processing only), ``rss_at_cap_mb`` (when the per-trace maps first
        hit the cap), ``rss_end_mb``, ``rss_growth_after_cap_mb``, ``peak_rss_mb``, the RSS
        samples, final state sizes and the number of findings (0 expected: healthy traces).
    """
    detectors = list(make_detectors() if make_detectors else issue3_detectors(
        max_traces=max_traces))
    runner = DetectorRunner(detectors)
    per_trace = [d for d in detectors if isinstance(d, (LoopDetector, HallucinatedToolDetector))]
    defs = tool_definitions_json(("search", "lookup_order", "fetch_url"))
    rss_start = _rss()
    samples: list[tuple[int, float]] = []
    rss_at_cap = None
    traces_at_cap = None
    findings = 0
    events = 0
    busy_s = 0.0
    done = 0
    with _gc_threshold(gc_threshold):
        while done < n_traces:
            count = min(chunk_traces, n_traces - done)
            chunk = _trace_chunk(done, count, traces_per_s, defs)
            started = time.perf_counter()
            findings += len(runner.process(chunk))
            busy_s += time.perf_counter() - started
            events += len(chunk)
            done += count
            del chunk
            rss = _rss()
            samples.append((done, round(rss / _MB, 1)))
            if rss_at_cap is None and per_trace and all(
                    d.state_size() >= min(max_traces, d.max_traces) for d in per_trace):
                rss_at_cap, traces_at_cap = rss, done
    rss_end = _rss()
    picked = samples[::max(1, len(samples) // 25)]
    if picked[-1] != samples[-1]:
        picked.append(samples[-1])
    return {
        "n_traces": n_traces,
        "events": events,
        "gc_threshold": list(gc_threshold or gc.get_threshold()),
        "max_traces": max_traces,
        "process_s": round(busy_s, 3),
        "events_per_s": round(events / busy_s) if busy_s else None,
        "traces_per_s": round(n_traces / busy_s) if busy_s else None,
        "rss_start_mb": round(rss_start / _MB, 1),
        "traces_at_cap": traces_at_cap,
        "rss_at_cap_mb": None if rss_at_cap is None else round(rss_at_cap / _MB, 1),
        "rss_end_mb": round(rss_end / _MB, 1),
        "rss_growth_after_cap_mb": None if rss_at_cap is None else round(
            (rss_end - rss_at_cap) / _MB, 1),
        # The TTL-bounded maps (retry storms: prompts of the last 10 s) fill a little after the
        # count caps; over the second half every map is at steady state and RSS must not move.
        "rss_growth_second_half_mb": round(
            (rss_end - _sample_at(samples, n_traces // 2) * _MB) / _MB, 1),
        "peak_rss_mb": round(_peak_rss() / _MB, 1),
        "rss_samples_mb": picked,
        "state_sizes": runner.state_sizes(),
        "findings": findings,
    }


def _sample_at(samples: list[tuple[int, float]], traces: int) -> float:
    """RSS (MiB) of the first sample taken at or after ``traces`` traces."""
    return next(mb for done, mb in samples if done >= traces)


def bench_detectors(n_traces: int = 30_000, *, seed: int = 0, repeat: int = 3,
                    gc_threshold: tuple[int, int, int] | None = WORKER_GC_THRESHOLD,
                    ) -> dict[str, Any]:
    """Events/s of the runner over the six issue-3 detectors on realistic synthetic traffic
    (~6.6 events per trace: model calls with prompts, tool definitions and requested calls,
    tool calls, agent steps), best of ``repeat`` runs; and each detector alone."""
    events = agent_traffic(seed, n_traces, traces_per_s=10.0)
    spend: dict[str, float] = {}
    for e in events:
        if isinstance(e, LlmCall):
            spend[e.project] = spend.get(e.project, 0.0) + e.cost_usd
    budgets = {p: {"daily_usd": s * 100, "monthly_usd": s * 3000} for p, s in spend.items()}

    cpu_s: list[float] = []

    def best(make: Callable[[], Sequence[Any]]) -> tuple[float, int]:
        times, found = [], 0
        for _ in range(repeat):
            runner = DetectorRunner(make())
            with _gc_threshold(gc_threshold):
                started, cpu_started = time.perf_counter(), time.process_time()
                found = len(runner.process(events))
                times.append(time.perf_counter() - started)
                cpu_s.append(time.process_time() - cpu_started)
        return min(times), found

    all_s, findings = best(lambda: issue3_detectors(budgets=budgets))
    # On a shared machine wall time includes waiting for a core; CPU time does not.
    all_cpu_s = min(cpu_s)
    per_detector = {}
    for index, det in enumerate(issue3_detectors(budgets=budgets)):
        seconds, _ = best(lambda i=index: [issue3_detectors(budgets=budgets)[i]])
        per_detector[type(det).name] = round(len(events) / seconds)
    return {"events": len(events), "traces": n_traces,
            "gc_threshold": list(gc_threshold or gc.get_threshold()),
            "all_detectors_events_per_s":
            round(len(events) / all_s), "all_detectors_s": round(all_s, 3),
            "all_detectors_events_per_cpu_s": round(len(events) / all_cpu_s),
            "per_detector_events_per_s": per_detector, "findings": findings}


if __name__ == "__main__":  # python -m bench.detector_state [n_traces]
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    print(json.dumps(bench_detectors(), indent=1))
    print(json.dumps(bench_trace_state(n), indent=1))
