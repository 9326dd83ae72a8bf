"""A stand-in worker for metric tests: feeds :class:`PipelineMetrics` real events and serves them.

``python -m tests.support.metrics_fixture --port P`` (from the checkout root) first feeds
:func:`deterministic_batches` (a fixed stream whose totals tests compute independently), then
serves ``/metrics`` and keeps feeding small "live" rounds (service ``live``) so that rates,
quantiles and annotation queries have moving data. It stops on SIGTERM/SIGINT.

The real worker (``agentwatch worker --metrics-port P``) replaces it once it exists; the
dashboards only depend on the metric names, not on this module.
"""

from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from agentwatch.dashboards.metrics import PipelineMetrics, WorkerStateCollector, serve_metrics
from agentwatch.detectors.drift import DriftCheck, DriftEvidence, deciding_statistic
from agentwatch.detectors.vram import VramLeakEvidence
from agentwatch.streams.drift_sampler import DriftSampler
from agentwatch.events import Finding, GpuSample, LlmCall, PiiDetection, Severity, ToolCall

# Small enough that the fuzz tool names below overflow it, so the fold path is exercised.
FIXTURE_MAX_LABEL_SETS = 40
FUZZ_TOOLS = 50
T0 = 1_700_000_000.0
GIB = 1024 ** 3


@dataclass
class Batches:
    llm_calls: list[LlmCall] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    drift_checks: list[DriftCheck] = field(default_factory=list)
    gpu_samples: list[GpuSample] = field(default_factory=list)


def _drift_evidence() -> dict[str, Any]:
    return DriftEvidence(method="mmd", decided_by=(), deciding=("mmd",), alpha=0.01,
                         window_start_ts=0.0, window_seen=200, scores={}, window_size=200,
                         comparison_size=200, alpha_per_test=0.01, examples=()).to_mapping()


def drift_check(key: str, kind: str, ts: float, scores: dict[str, tuple[float, float]],
                p_values: dict[str, float] | None = None) -> DriftCheck:
    """A check as DriftDetector.last_checks holds it; every statistic in ``scores`` decides
    and rejects when its score exceeds its threshold."""
    full = {name: {"score": score, "threshold": threshold,
                   "p_value": (p_values or {}).get(name, 0.5), "drifted": score > threshold}
            for name, (score, threshold) in scores.items()}
    deciding = tuple(scores)
    statistic = deciding_statistic(full, deciding)
    evidence = DriftEvidence(
        method="mmd", decided_by=tuple(s for s in deciding if full[s]["drifted"]),
        deciding=deciding, alpha=0.01, window_start_ts=ts - 60.0, window_seen=200,
        scores=full, window_size=200, comparison_size=200, alpha_per_test=0.01 / len(deciding),
        examples=(), statistic=statistic)
    return DriftCheck(key, kind, ts, statistic, full[statistic]["score"],
                      full[statistic]["threshold"], bool(evidence.decided_by), evidence)


def deterministic_batches() -> Batches:
    """A fixed, seeded-by-construction stream over every event type the metrics read."""
    b = Batches()
    models = [("gpt-4o", "shop", 0.0025), ("claude-sonnet-4", "support", 0.003),
              ("llama-3.1-8b", "shop", 0.0)]
    for i in range(30):
        model, project, price = models[i % 3]
        b.llm_calls.append(LlmCall(
            ts=T0 + i, trace_id=f"{i // 3:032x}", span_id=f"{i:016x}", service="checkout",
            project=project, model=model, input_tokens=100 + 7 * i, output_tokens=20 + i,
            cache_read_tokens=10 if i % 5 == 0 else 0,
            reasoning_tokens=5 if model == "gpt-4o" else 0,
            cost_usd=round(price * (100 + 7 * i) / 100, 6), priced=price > 0,
            status="error" if i % 10 == 9 else "ok", error="timeout" if i % 10 == 9 else "",
            # Two in three calls use a managed prompt, version 3 before version 4.
            prompt_name="checkout-assistant" if i % 3 else "",
            prompt_version=("3" if i < 15 else "4") if i % 3 else "",
            latency_ms=400.0 + 50.0 * i))
    for i in range(24):
        b.tool_calls.append(ToolCall(
            ts=T0 + i, trace_id=f"{i // 4:032x}", span_id=f"{100 + i:016x}", service="checkout",
            tool_name=("search", "get_order", "refund")[i % 3],
            status="error" if i % 8 == 7 else "ok"))
    for i in range(FUZZ_TOOLS):
        b.tool_calls.append(ToolCall(ts=T0 + 40, trace_id=f"{999:032x}", span_id=f"{500 + i:016x}",
                                     service="fuzz", tool_name=f"made_up_tool_{i:02d}"))
    b.findings += [
        Finding(detector="drift", key="project=shop/model=gpt-4o", kind="skew",
                severity=Severity.WARNING, ts=T0 + 50, value=0.18, threshold=0.12,
                evidence=_drift_evidence()),
        Finding(detector="drift", key="project=support/model=claude-sonnet-4",
                kind="drift", severity=Severity.INFO, ts=T0 + 50, value=0.04, threshold=0.12,
                evidence=_drift_evidence(), resolved=True),
        Finding(detector="agent_loop", key=f"{3:032x}", kind="repeated_tool_call",
                severity=Severity.WARNING, ts=T0 + 51, value=5, threshold=3),
        Finding(detector="hallucinated_tool", key=f"{4:032x}", kind="undeclared_tool",
                severity=Severity.CRITICAL, ts=T0 + 52, value=1, threshold=0,
                evidence={"tool": "delete_everything"}),
        Finding(detector="vram_leak", key="host=gpu-a/gpu=0/pid=4242", kind="leak",
                severity=Severity.CRITICAL, ts=T0 + 60, value=2.5e6, threshold=0,
                # The evidence shape of detectors.vram.VramLeakDetector (MiB, MiB/min).
                evidence=VramLeakEvidence(
                    host="gpu-a", gpu=0, gpu_uuid="", pid=4242, process_name="vllm",
                    simulated=False, leak_mib_per_min=150.0, kendall_tau=0.9, fit_r2=0.95,
                    recent_leak_mib_per_min=150.0, floor_mib=30 * 1024.0, peak_mib=30 * 1024.0,
                    threshold_mib=72 * 1024.0, total_mib=80 * 1024.0, eta_s=1800.0,
                    above_threshold=False, window_s=600.0, points=20, inferences=0,
                    inferences_from="", mib_per_inference=None).to_mapping()),
    ]
    # The checks behind those drift findings, and calm ones: shop's skew is decided by the OOD
    # share while its MMD stays under its threshold, and its drift check stays calm.
    b.drift_checks += [
        drift_check("project=shop/model=gpt-4o", "skew", T0 + 50,
                    {"mmd": (0.004, 0.008), "ood_share": (0.18, 0.12)},
                    p_values={"mmd": 0.2, "ood_share": 1e-4}),
        drift_check("project=shop/model=gpt-4o", "drift", T0 + 50, {"mmd": (0.003, 0.009)}),
        drift_check("project=support/model=claude-sonnet-4", "drift", T0 + 40,
                    {"mmd": (0.2, 0.12)}),
        drift_check("project=support/model=claude-sonnet-4", "drift", T0 + 50,
                    {"mmd": (0.04, 0.12)}),
    ]
    for step in range(5):
        ts = T0 + 10 * step
        b.gpu_samples.append(GpuSample(ts=ts, host="gpu-a", gpu=0,
                                       memory_used_bytes=(20 + step) * GIB,
                                       memory_total_bytes=80 * GIB))
        b.gpu_samples.append(GpuSample(ts=ts, host="gpu-a", gpu=0, pid=4242, process_name="vllm",
                                       memory_used_bytes=(18 + step) * GIB))
    return b


def feed_deterministic(metrics: PipelineMetrics) -> None:
    b = deterministic_batches()
    metrics.observe_batch(topic="otlp_spans", spans=len(b.llm_calls) + len(b.tool_calls),
                          seconds=0.004)
    metrics.observe_batch(topic="llm_calls", spans=len(b.llm_calls), seconds=0.001)
    metrics.observe_llm_calls(b.llm_calls)
    metrics.observe_tool_calls(b.tool_calls)
    metrics.observe_findings(b.findings)
    metrics.observe_drift_checks(b.drift_checks)
    metrics.observe_gpu_samples(b.gpu_samples)
    metrics.observe_trace_steps(service="checkout", steps=[2, 3, 3, 5, 8, 21])
    metrics.observe_dead_letter(topic="otlp_spans", reason="undecodable_protobuf", n=2)
    metrics.observe_pii_detections([PiiDetection(ts=T0, trace_id="t1", span_id="s1", service="checkout",
                                                 entity_type="EMAIL", field="llm_calls.prompt", count=2)])
    for partition, lag in enumerate((0, 12, 3, 40)):
        metrics.set_consumer_lag("otlp_spans", partition, lag)
    metrics.observe_delivery(destination="slack", ok=True)
    metrics.observe_delivery(destination="pagerduty", ok=False)


def feed_live_round(metrics: PipelineMetrics, round_no: int) -> None:
    """A small round on service ``live`` so rates and quantiles keep moving."""
    ts = T0 + 1000 + round_no
    calls = [LlmCall(ts=ts, trace_id=f"{round_no:032x}", span_id=f"{k:016x}", service="live",
                     project="shop", model="gpt-4o", input_tokens=50, output_tokens=10,
                     cost_usd=0.001, priced=True, status="error" if k == 0 else "ok",
                     prompt_name="live-assistant", prompt_version=f"{1 + k % 2}",
                     latency_ms=300.0 + 100.0 * k + 10.0 * (round_no % 7))
             for k in range(3)]
    tools = [ToolCall(ts=ts, trace_id=f"{round_no:032x}", span_id=f"{10 + k:016x}",
                      service="live", tool_name="search", status="error" if k == 0 else "ok")
             for k in range(2)]
    metrics.observe_batch(topic="otlp_spans", spans=len(calls) + len(tools),
                          seconds=0.002 + 0.001 * (round_no % 5))
    metrics.observe_llm_calls(calls)
    metrics.observe_tool_calls(tools)
    metrics.observe_trace_steps(service="live", steps=[1 + round_no % 7])
    metrics.observe_findings([
        Finding(detector="agent_loop", key=f"{round_no:032x}", kind="repeated_tool_call",
                severity=Severity.WARNING, ts=ts, value=4, threshold=3),
        Finding(detector="hallucinated_tool", key=f"{round_no:032x}", kind="undeclared_tool",
                severity=Severity.CRITICAL, ts=ts, value=1, threshold=0),
    ])
    # A calm key: checked every round, under its threshold, so tests know exactly which keys
    # are drifting.
    metrics.observe_drift_checks([drift_check("project=live/model=gpt-4o", "drift", ts, {
        "mmd": (0.05 + 0.005 * (round_no % 10), 0.12)})])
    metrics.observe_dead_letter(topic="otlp_spans", reason="undecodable_protobuf")
    metrics.observe_pii_detections([PiiDetection(ts=ts, trace_id="t", span_id="s", service="live",
                                                 entity_type="PHONE", field="llm_calls.prompt")])
    metrics.observe_delivery(destination="slack", ok=True)
    metrics.observe_delivery(destination="slack", ok=round_no % 4 != 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--addr", default="127.0.0.1")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between live rounds")
    args = parser.parse_args(argv)

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry, max_label_sets=FIXTURE_MAX_LABEL_SETS)
    feed_deterministic(metrics)
    # The drift sampler's counters, from the fixture's own model calls (no embedder or
    # checkpoint in this process: those families read zero).
    sampler = DriftSampler(window_s=60.0)
    sampler.offer(deterministic_batches().llm_calls)
    registry.register(WorkerStateCollector(sampler=sampler))
    server = serve_metrics(registry, args.port, args.addr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving metrics on http://{args.addr}:{args.port}/metrics", flush=True)
    round_no = 0
    while not stop.wait(args.interval):
        feed_live_round(metrics, round_no)
        round_no += 1
    server.shutdown()


if __name__ == "__main__":
    main()
