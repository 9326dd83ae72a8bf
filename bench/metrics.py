"""Cost of PipelineMetrics on the worker hot path.

``agentwatch bench`` calls :func:`bench_metrics`.
"""

from __future__ import annotations

import random
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from agentwatch.dashboards.metrics import PipelineMetrics
from agentwatch.events import Finding, LlmCall, Severity, ToolCall


def bench_metrics(batches: int = 200, batch_size: int = 500, label_sets: int = 50,
                  seed: int = 0) -> dict[str, Any]:
    """Feed ``batches`` batches of ``batch_size`` LLM calls (and as many tool calls) spread
    over ``label_sets`` service/model/project combinations; time the observe calls and one
    scrape. Returns measured figures (microseconds per event, events per second, scrape ms)."""
    rng = random.Random(seed)
    combos = [(f"svc-{i % 7}", f"model-{i % 11}", f"proj-{i}") for i in range(label_sets)]
    llm_batches = []
    tool_batches = []
    for b in range(batches):
        llm, tools = [], []
        for i in range(batch_size):
            service, model, project = rng.choice(combos)
            llm.append(LlmCall(ts=b + i / batch_size, trace_id=f"{b:016x}{i:016x}", span_id="s",
                               service=service, model=model, project=project,
                               input_tokens=rng.randint(10, 4000),
                               output_tokens=rng.randint(1, 800),
                               cost_usd=rng.random() / 100, priced=True,
                               status="error" if rng.random() < 0.02 else "ok"))
            tools.append(ToolCall(ts=b, trace_id="t", span_id="s", service=service,
                                  tool_name=f"tool-{i % 13}"))
        llm_batches.append(llm)
        tool_batches.append(tools)
    findings = [Finding(detector="drift_embedding", key=f"project=proj-{i}", kind="mmd",
                        severity=Severity.INFO, ts=float(i), value=0.1, threshold=0.2,
                        evidence={"method": "mmd"}) for i in range(label_sets)]

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    start = time.perf_counter()
    for llm, tools in zip(llm_batches, tool_batches):
        batch_start = time.perf_counter()
        metrics.observe_llm_calls(llm)
        metrics.observe_tool_calls(tools)
        metrics.observe_batch(topic="llm_calls", spans=len(llm),
                              seconds=time.perf_counter() - batch_start)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    metrics.observe_findings(findings)
    findings_s = time.perf_counter() - start
    start = time.perf_counter()
    exposition = generate_latest(registry)
    scrape_s = time.perf_counter() - start
    events = 2 * batches * batch_size
    return {
        "events": events,
        "batch_size": batch_size,
        "label_sets": label_sets,
        "observe_us_per_event": elapsed / events * 1e6,
        "observe_events_per_s": events / elapsed,
        "observe_ms_per_batch": elapsed / batches * 1e3,
        "observe_findings_us_per_finding": findings_s / len(findings) * 1e6,
        "scrape_ms": scrape_s * 1e3,
        "scrape_bytes": len(exposition),
    }


if __name__ == "__main__":
    for name, value in bench_metrics().items():
        print(f"{name}: {value:,.2f}" if isinstance(value, float) else f"{name}: {value}")
