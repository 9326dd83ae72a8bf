"""``agentwatch demo``: the embedded stack, simulated agent traffic for a bounded time, a summary.

By default a clean baseline runs for the first half and a mix of incidents is injected in the
second (:data:`DEFAULT_INCIDENTS`); the summary ends with a table of each incident injected
against the finding it raised, how many seconds after the first injection the finding was in
the ``findings`` table, and, when alert routes are given, which destinations got its alert.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from agentwatch.settings import Settings
from agentwatch.stack import Stack
from agentwatch.traffic import SERVICES, AgentTraffic, otlp_grpc_exporter_factory


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


# The incidents a plain ``agentwatch demo`` injects half-way (``--incident none``: none).
DEFAULT_INCIDENTS = ("loop", "unknown_tool", "retry_storm", "cost_spike", "drift")


@dataclass(frozen=True)
class Expectation:
    """The finding an incident should raise: its detector, a part of its key naming the service
    or project the traffic injects it into (empty: any key, for findings keyed by trace or
    client), and how far before the injection its findings' event times may lie (the simulated
    GPU backfills its history)."""

    detector: str
    key_part: str = ""
    lookback_s: float = 0.0


# Where agentwatch.traffic.AgentTraffic.run puts each incident.
EXPECTED = {
    "loop": Expectation("agent_loop"),
    "unknown_tool": Expectation("hallucinated_tool"),
    "retry_storm": Expectation("retry_storm"),
    "cost_spike": Expectation("cost_anomaly", f"project={SERVICES[-1].project}"),
    "errors": Expectation("slo", f"service={SERVICES[1].name}"),
    "drift": Expectation("drift", f"service={SERVICES[0].name}"),
    "vram_leak": Expectation("vram_leak", lookback_s=3600.0),
}


@dataclass
class IncidentOutcome:
    """One injected incident and what came of it (unix seconds; ``None``: not yet / never)."""

    incident: str
    detector: str
    injections: int = 0
    injected_at: float | None = None
    found_at: float | None = None  # when the demo first saw the finding in the findings table
    kind: str = ""
    key: str = ""
    severity: str = ""
    delivered_to: tuple[str, ...] = ()
    delivered_at: float | None = None

    @property
    def seconds_to_finding(self) -> float | None:
        if self.found_at is None or self.injected_at is None:
            return None
        return self.found_at - self.injected_at

    @property
    def seconds_to_delivery(self) -> float | None:
        if self.delivered_at is None or self.injected_at is None:
            return None
        return self.delivered_at - self.injected_at


def look_for_findings(data_dir: Path, outcomes: Iterable[IncidentOutcome], now: float) -> list[IncidentOutcome]:
    """Fill in the first finding of each injected, not yet found incident from the snapshots;
    returns the outcomes found by this call."""
    import duckdb

    from agentwatch.streams.snapshots import connect

    pending = [o for o in outcomes if o.injected_at is not None and o.found_at is None]
    if not pending:
        return []
    found = []
    con = connect(data_dir)
    try:
        for outcome in pending:
            expected = EXPECTED[outcome.incident]
            try:
                row = con.execute(
                    "SELECT kind, key, severity FROM findings WHERE detector = ? AND NOT coalesce(resolved, false)"
                    " AND ts >= ? AND strpos(key, ?) > 0 ORDER BY ts LIMIT 1",
                    [expected.detector, outcome.injected_at - expected.lookback_s, expected.key_part]).fetchone()
            except duckdb.IOException:  # a file renamed into place as it was listed: next poll
                continue
            if row is not None:
                outcome.kind, outcome.key, outcome.severity = (str(v) for v in row)
                outcome.found_at = now
                found.append(outcome)
    finally:
        con.close()
    return found


def read_deliveries(state_dir: Path, outcomes: Iterable[IncidentOutcome]) -> None:
    """Fill in which destinations the notifier delivered each incident's first alert to (its
    outbox records a delivery as sent once the receiver accepted it)."""
    from agentwatch.alerts.outbox import NotifierStore

    store = NotifierStore(state_dir)
    try:
        sent = [row for row in store.rows("sent") if row.action == "trigger" and row.finished_at is not None]
    finally:
        store.close()
    for outcome in outcomes:
        if outcome.injected_at is None:
            continue
        expected = EXPECTED[outcome.incident]
        matching = [row for row in sent if any(
            a.alert.detector == expected.detector and expected.key_part in a.alert.key
            and a.alert.ts >= outcome.injected_at - expected.lookback_s for a in row.notification.alerts)]
        if matching:
            outcome.delivered_to = tuple(sorted({row.destination for row in matching}))
            outcome.delivered_at = min(row.finished_at for row in matching)


def run_demo(settings: Settings, *, duration_s: float = 60.0, rate: float = 20.0,
             incidents: Iterable[str] | None = None, seed: int = 7, settle_s: float = 45.0,
             say: Callable[[str], None] = print) -> dict:
    """Run the stack with demo traffic; ``incidents`` default to :data:`DEFAULT_INCIDENTS` (pass
    ``()`` for a clean run). After the traffic, waits up to ``settle_s`` for the findings of
    the injected incidents still missing one (drift needs its window to close)."""
    incidents = DEFAULT_INCIDENTS if incidents is None else tuple(incidents)
    unknown = sorted(set(incidents) - set(EXPECTED))
    if unknown:
        raise ValueError(f"unknown incidents: {unknown}")
    outcomes = {name: IncidentOutcome(name, EXPECTED[name].detector) for name in incidents}
    detectors = {name: {**DEMO_DETECTOR_CONFIG.get(name, {}), **settings.detectors.get(name, {})}
                 for name in set(DEMO_DETECTOR_CONFIG) | set(settings.detectors)}
    settings = settings.model_copy(update={"detectors": detectors, "drift_window_s": 10.0, "drift_sample_size": 60})
    say("demo: detector baselines compressed to seconds (cost interval 2 s, SLO window 20 s, drift "
        "window 10 s) so a one-minute run can show them")
    stack = Stack(settings, say=say)
    stack.start()
    gpu_thread = None
    try:
        traffic = AgentTraffic(otlp_grpc_exporter_factory(settings.otlp_grpc_port), seed=seed,
                               incidents=[i for i in incidents if i != "vram_leak"])
        if "vram_leak" in incidents:
            gpu_thread = _start_simulated_gpu(stack, duration_s, say)
            outcomes["vram_leak"].injected_at, outcomes["vram_leak"].injections = time.time(), 1
        say(f"demo traffic: {rate:g} agent runs/s for {duration_s:g}s"
            + (f", incidents from half-way: {', '.join(incidents)}" if incidents else ", no incidents"))
        watch = _IncidentWatch(settings.data_dir, outcomes, traffic, say)
        started = polled = time.monotonic()
        runs = 0
        while (elapsed := time.monotonic() - started) < duration_s:
            while runs < int(elapsed * rate):
                traffic.run(time.time_ns(), progress=elapsed / duration_s)
                runs += 1
            if time.monotonic() - polled >= 0.25:  # supervise: restart a child that died
                stack.poll()
                polled = time.monotonic()
            watch.maybe_poll()
            time.sleep(0.02)
        traffic.shutdown()
        ingested = wait_for_spans(stack, traffic.stats.spans, timeout_s=30)
        watch.poll()  # incidents first injected since the last poll
        settle_until = time.monotonic() + settle_s
        while watch.missing() and time.monotonic() < settle_until:
            stack.poll()
            watch.maybe_poll()
            time.sleep(0.1)
        if gpu_thread is not None:
            gpu_thread.join(timeout=10)
        # Let the detect/snapshot stage drain; workers flush their snapshot buffers on stop.
        time.sleep(settings.snapshot_flush_seconds + 1.5)
    finally:
        stack.stop()
    for name, count in traffic.stats.incidents.items():
        outcomes[name].injections = count
    if settings.alert_routes is not None and outcomes:
        read_deliveries(settings.alerts_state_dir, outcomes.values())
    summary = summarize(settings, traffic.stats.spans, ingested, traffic.stats.incidents)
    summary["incident_outcomes"] = [asdict(o) | {"seconds_to_finding": o.seconds_to_finding,
                                                 "seconds_to_delivery": o.seconds_to_delivery}
                                    for o in outcomes.values()]
    summary["alert_routes"] = str(settings.alert_routes) if settings.alert_routes else None
    say(format_summary(summary))
    return summary


class _IncidentWatch:
    """Notes each incident's first injection and, about once a second, looks for its finding,
    saying both as they happen."""

    def __init__(self, data_dir: Path, outcomes: dict[str, IncidentOutcome], traffic: AgentTraffic,
                 say: Callable[[str], None], every_s: float = 1.0) -> None:
        self.data_dir, self.outcomes, self.traffic, self.say = data_dir, outcomes, traffic, say
        self.every_s = every_s
        self.polled = float("-inf")

    def missing(self) -> list[IncidentOutcome]:
        return [o for o in self.outcomes.values() if o.injected_at is not None and o.found_at is None]

    def maybe_poll(self) -> None:
        if time.monotonic() - self.polled >= self.every_s:
            self.poll()

    def poll(self) -> None:
        self.polled = time.monotonic()
        stats = self.traffic.stats
        for name, first_ns in stats.first_injected_ns.items():
            outcome = self.outcomes[name]
            outcome.injections = stats.incidents.get(name, 0)
            if outcome.injected_at is None:
                outcome.injected_at = first_ns / 1e9
                self.say(f"  injected {name}: expect a {outcome.detector} finding")
        for outcome in look_for_findings(self.data_dir, self.outcomes.values(), time.time()):
            self.say(f"  found    {outcome.incident}: {outcome.detector}/{outcome.kind} on {outcome.key} "
                     f"{outcome.seconds_to_finding:.1f} s after the first injection")


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
              '  agentwatch query "SELECT model, sum(cost_usd) FROM llm_calls GROUP BY 1"',
              "  agentwatch findings --open"]
    outcomes = summary.get("incident_outcomes") or []
    if outcomes:
        lines += ["", *format_incident_table(outcomes, routes=summary.get("alert_routes"))]
    return "\n".join(lines)


def format_incident_table(outcomes: list[dict], *, routes: str | None) -> list[str]:
    """The closing table: each incident injected -> the finding it raised, seconds from its
    first injection until the finding was in the findings table, and its alert's delivery."""
    lines = ["== incidents injected -> findings raised ==",
             f"  {'incident':<13} {'injected':>8}  {'detector':<17} {'kind':<22} {'key':<38} {'after':>7}  alert"]
    for o in outcomes:
        if o["injected_at"] is None:
            lines.append(f"  {o['incident']:<13} {'-':>8}  {o['detector']:<17} not injected (run longer)")
            continue
        if o["found_at"] is None:
            lines.append(f"  {o['incident']:<13} {o['injections']:>8}  {o['detector']:<17} NO FINDING")
            continue
        if routes is None:
            alert = "- (no --alert-routes)"
        elif o["delivered_at"] is None:
            alert = "not delivered"
        else:
            alert = f"{', '.join(o['delivered_to'])} after {o['seconds_to_delivery']:.1f} s"
        key = o["key"] if len(o["key"]) <= 38 else o["key"][:35] + "..."
        lines.append(f"  {o['incident']:<13} {o['injections']:>8}  {o['detector']:<17} {o['kind']:<22} {key:<38} "
                     f"{o['seconds_to_finding']:>5.1f} s  {alert}")
    return lines
