"""``agentwatch demo``: the embedded stack, simulated agent traffic for a bounded time, a summary."""

from __future__ import annotations

import time
import urllib.request
from typing import Callable, Iterable

from agentwatch.settings import Settings
from agentwatch.stack import Stack
from agentwatch.traffic import AgentTraffic, otlp_grpc_exporter_factory


def scrape_counter(ports: Iterable[int], name: str) -> float:
    """Sum of one counter over the workers' /metrics endpoints (all label sets)."""
    total = 0.0
    for port in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_spans(stack: Stack, expected: int, timeout_s: float) -> float:
    """Wait until the workers have normalised ``expected`` spans (or the count stops moving)."""
    ports = stack.worker_metrics_ports()
    deadline = time.monotonic() + timeout_s
    seen = -1.0
    while time.monotonic() < deadline:
        seen = scrape_counter(ports, "agentwatch_spans_total")
        if seen >= expected:
            break
        time.sleep(0.5)
    return seen


# A demo lasts a minute, production baselines span hours: the demo compresses detector time so a
# baseline forms in its first half. Explicit AGENTWATCH_DETECTORS settings win over these.
DEMO_DETECTOR_CONFIG = {
    "cost_anomaly": {"interval_s": 2.0, "min_history": 8},
    "slo": {"window_s": 20.0, "min_calls": 20, "error_rate_threshold": 0.1},
}


def run_demo(settings: Settings, *, duration_s: float = 60.0, rate: float = 20.0,
             incidents: Iterable[str] = (), seed: int = 7, say: Callable[[str], None] = print) -> dict:
    incidents = tuple(incidents)
    detectors = {name: {**DEMO_DETECTOR_CONFIG.get(name, {}), **settings.detectors.get(name, {})}
                 for name in set(DEMO_DETECTOR_CONFIG) | set(settings.detectors)}
    settings = settings.model_copy(update={"detectors": detectors, "drift_window_s": 10.0, "drift_sample_size": 60})
    say("demo: detector baselines compressed to seconds (cost interval 2 s, SLO window 20 s, drift "
        "window 10 s) so a one-minute run can show them")
    stack = Stack(settings, say=say)
    stack.start()
    gpu_thread = None
    try:
        traffic = AgentTraffic(otlp_grpc_exporter_factory(settings.otlp_grpc_port), seed=seed, incidents=incidents)
        if "vram_leak" in incidents:
            gpu_thread = _start_simulated_gpu(stack, duration_s, say)
        say(f"demo traffic: {rate:g} agent runs/s for {duration_s:g}s"
            + (f", incidents from half-way: {', '.join(incidents)}" if incidents else ""))
        started = polled = time.monotonic()
        runs = 0
        while (elapsed := time.monotonic() - started) < duration_s:
            while runs < int(elapsed * rate):
                traffic.run(time.time_ns(), progress=elapsed / duration_s)
                runs += 1
            if time.monotonic() - polled >= 0.25:  # supervise: restart a child that died
                stack.poll()
                polled = time.monotonic()
            time.sleep(0.02)
        traffic.shutdown()
        ingested = wait_for_spans(stack, traffic.stats.spans, timeout_s=30)
        if gpu_thread is not None:
            gpu_thread.join(timeout=10)
        # Let the detect/snapshot stage drain; workers flush their snapshot buffers on stop.
        time.sleep(settings.snapshot_flush_seconds + 1.5)
    finally:
        stack.stop()
    summary = summarize(settings, traffic.stats.spans, ingested, traffic.stats.incidents)
    say(format_summary(summary))
    return summary


def _start_simulated_gpu(stack: Stack, duration_s: float, say: Callable[[str], None]):
    import threading

    from agentwatch.collectors.gpu_sim import produce_simulated

    say("GPU source: SIMULATED (no NVML here): a leaking inference server on sim-gpu-node")
    # The simulated server's last 40 minutes are backfilled (leak trends need history), ending now.
    thread = threading.Thread(target=produce_simulated, args=(stack.bootstrap_servers,),
                              kwargs={"profile": "leak", "echo": say}, daemon=True)
    thread.start()
    return thread


def summarize(settings: Settings, spans_sent: int, spans_ingested: float, incidents: dict) -> dict:
    from agentwatch.streams.snapshots import connect

    con = connect(settings.data_dir)
    try:
        def rows(sql: str) -> list[tuple]:
            return con.execute(sql).fetchall()

        by_model = rows("""SELECT model, count(*) calls, sum(input_tokens) input_tokens,
                                  sum(output_tokens) output_tokens, round(sum(cost_usd), 4) cost_usd
                           FROM llm_calls GROUP BY model ORDER BY cost_usd DESC""")
        tables = {name: rows(f"SELECT count(*) FROM {name}")[0][0]
                  for name in ("llm_calls", "tool_calls", "agent_steps", "llm_messages", "gpu_samples",
                               "findings")}
        findings = rows("""SELECT detector, kind, severity, count(*) FROM findings
                           WHERE NOT resolved GROUP BY ALL ORDER BY 4 DESC""")
    finally:
        con.close()
    return {"spans_sent": spans_sent, "spans_ingested": int(spans_ingested), "rows": tables,
            "by_model": by_model, "findings": findings, "incidents_injected": incidents,
            "data_dir": str(settings.data_dir)}


def format_summary(summary: dict) -> str:
    lines = ["", "== agentwatch demo summary ==",
             f"spans sent {summary['spans_sent']}, ingested {summary['spans_ingested']}",
             f"LLM calls {summary['rows']['llm_calls']}, tool calls {summary['rows']['tool_calls']}, "
             f"agent steps {summary['rows']['agent_steps']}", "", "tokens and cost by model:"]
    lines.append(f"  {'model':<28} {'calls':>7} {'input tok':>11} {'output tok':>11} {'cost USD':>10}")
    for model, calls, tin, tout, cost in summary["by_model"]:
        lines.append(f"  {model:<28} {calls:>7} {tin:>11} {tout:>11} {cost:>10.4f}")
    lines += ["", "snapshot rows: " + ", ".join(f"{k} {v}" for k, v in summary["rows"].items())]
    if summary["incidents_injected"]:
        lines.append("incidents injected: " + ", ".join(f"{k} x{v}" for k, v in summary["incidents_injected"].items()))
    lines.append("findings so far:" if summary["findings"] else "findings so far: none")
    for detector, kind, severity, count in summary["findings"]:
        lines.append(f"  {detector:<18} {kind:<24} {severity:<9} {count}")
    lines += ["", f"snapshots kept in {summary['data_dir']}; try:",
              '  agentwatch query "SELECT model, sum(cost_usd) FROM llm_calls GROUP BY 1"']
    return "\n".join(lines)
