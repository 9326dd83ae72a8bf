"""Faults injected into the real embedded stack, counted (``agentwatch bench`` section ``faults``).

Every figure is a count, not an impression: OTLP requests are sent by hand so that the sender
knows exactly which span ids got a success status; afterwards the snapshots are read and every
acknowledged span id must be there (or on ``dead_letter`` with a reason). The tests in
tests/integration/test_faults.py run the same scenarios and assert the counts.
"""

from __future__ import annotations

import os
import random
from collections import Counter
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SPAN_TABLES = ("llm_calls", "tool_calls", "agent_steps")


def llm_request(n_spans: int, *, rng: random.Random, prompt_chars: int = 0, service: str = "faults",
                tool_every: int = 0) -> tuple[bytes, list[str]]:
    """An ExportTraceServiceRequest of ``n_spans`` model-call spans (one trace each, so no span
    is a nested duplicate of another), and their span ids in hex. With ``tool_every`` > 0, every
    that-many-th span is a tool call instead."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def attr(key: str, value: Any) -> KeyValue:
        if isinstance(value, str):
            return KeyValue(key=key, value=AnyValue(string_value=value))
        return KeyValue(key=key, value=AnyValue(int_value=value))

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(attr("service.name", service))
    scope = resource_spans.scope_spans.add()
    now = time.time_ns()
    ids = []
    prompt = ("x" * prompt_chars) if prompt_chars else ""
    for i in range(n_spans):
        span = scope.spans.add()
        span.trace_id = rng.randbytes(16)
        span.span_id = rng.randbytes(8)
        span.start_time_unix_nano = now - 1_000_000_000
        span.end_time_unix_nano = now
        if tool_every and i % tool_every == tool_every - 1:
            span.name = "execute_tool lookup"
            span.attributes.extend([attr("gen_ai.operation.name", "execute_tool"),
                                    attr("gen_ai.tool.name", "lookup")])
        else:
            span.name = "chat gpt-4o-mini"
            span.attributes.extend([
                attr("gen_ai.operation.name", "chat"), attr("gen_ai.provider.name", "openai"),
                attr("gen_ai.request.model", "gpt-4o-mini"), attr("gen_ai.usage.input_tokens", 100 + i),
                attr("gen_ai.usage.output_tokens", 10)])
            if prompt:
                span.attributes.append(attr("gen_ai.prompt.0.content", prompt))
        ids.append(span.span_id.hex())
    return request.SerializeToString(), ids


def loop_request(*, rng: random.Random, service: str = "faults-loop", project: str = "faults") -> tuple[bytes, list[str]]:
    """One agent trace that calls the same tool with the same arguments three times: an
    ``agent_loop`` finding, so an alert, per request. Returns the request and its span ids."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def attr(key: str, value: str) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value))

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend([attr("service.name", service), attr("agentwatch.project", project)])
    scope = resource_spans.scope_spans.add()
    now = time.time_ns()
    trace_id, root_id = rng.randbytes(16), rng.randbytes(8)
    question = rng.randbytes(6).hex()
    for i in range(3):
        span = scope.spans.add()
        span.trace_id, span.span_id, span.parent_span_id = trace_id, rng.randbytes(8), root_id
        span.name = "execute_tool search"
        span.start_time_unix_nano = now - 900_000_000 + i * 100_000_000
        span.end_time_unix_nano = span.start_time_unix_nano + 50_000_000
        span.attributes.extend([attr("gen_ai.operation.name", "execute_tool"), attr("gen_ai.tool.name", "search"),
                                attr("gen_ai.tool.call.arguments", f'{{"q": "{question}"}}')])
    root = scope.spans.add()
    root.trace_id, root.span_id, root.name = trace_id, root_id, "invoke_agent looper"
    root.start_time_unix_nano, root.end_time_unix_nano = now - 1_000_000_000, now
    root.attributes.extend([attr("gen_ai.operation.name", "invoke_agent"), attr("gen_ai.agent.name", "looper")])
    return request.SerializeToString(), [span.span_id.hex() for span in scope.spans]


def post_http(port: int, body: bytes, timeout_s: float = 10.0) -> int:
    """POST an OTLP/HTTP protobuf body; the HTTP status, or 0 when no answer came."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/traces", data=body, method="POST",
                                     headers={"Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass
class AckedTraffic:
    """Requests sent at a steady rate from a thread; remembers which span ids were acknowledged."""

    http_port: int
    spans_per_request: int = 20
    requests_per_s: float = 20.0
    seed: int = 5
    loop_every: int = 0  # every that-many-th request is an agent loop (an alert); 0 = none
    acknowledged: list[str] = field(default_factory=list)
    refused: int = 0  # requests answered with an error or not at all (the sender knows)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def send_one(self, rng: random.Random) -> bool:
        self.sent += 1
        if self.loop_every and self.sent % self.loop_every == 0:
            body, ids = loop_request(rng=rng)
        else:
            body, ids = llm_request(self.spans_per_request, rng=rng, tool_every=5)
        if post_http(self.http_port, body) == 200:
            self.acknowledged.extend(ids)
            return True
        self.refused += 1
        return False

    def start(self) -> "AckedTraffic":
        def run() -> None:
            rng = random.Random(self.seed)
            interval = 1.0 / self.requests_per_s
            next_at = time.monotonic()
            while not self._stop.is_set():
                self.send_one(rng)
                next_at += interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))

        self._thread = threading.Thread(target=run, name="acked-traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


def stored_span_ids(data_dir: Path) -> tuple[set[str], int]:
    """Distinct span ids in the span tables, and the rows stored (rows - ids = the copies that
    redelivered records wrote again; the analyst views show each span once)."""
    from agentwatch.streams.snapshots import query_snapshots

    ids: set[str] = set()
    rows = 0
    for table in SPAN_TABLES:
        try:
            found = query_snapshots(data_dir, f"SELECT span_id FROM {table}_raw").column("span_id").to_pylist()
        except Exception:  # no file written for this table yet
            continue
        rows += len(found)
        ids.update(found)
    return ids, rows


def wait_for(predicate: Callable[[], Any], timeout_s: float, every_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


def produced_alert_keys(bootstrap_servers: str, topic: str = "alerts", timeout_s: float = 10.0) -> set[str]:
    """Dedup keys of the firing alerts on the ``alerts`` topic (read whole, outside any group)."""
    import orjson
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=1000)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        keys: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            if not batch:
                break
            for records in batch.values():
                for record in records:
                    alert = orjson.loads(record.value)
                    if alert.get("status") == "firing":
                        keys.add(alert["dedup_key"])
        return keys
    finally:
        consumer.close()


@dataclass
class FaultResult:
    fault: str
    acknowledged: int
    stored: int
    lost: int
    repeated_rows: int
    refused_requests: int
    recover_s: float | None
    alerts_produced: int | None = None
    alerts_delivered: int | None = None
    max_pagerduty_incidents_per_key: int | None = None
    pagerduty_trigger_requests: int | None = None
    max_pagerduty_triggers_per_key: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def child(stack: Any, name: str) -> Any:
    return next(c for c in stack.children if c.name == name)


def kill_child(stack: Any, name: str) -> float:
    """SIGKILL a child, as the OOM killer does; returns when it happened (monotonic)."""
    os.kill(child(stack, name).proc.pid, 9)
    return time.monotonic()


def kill_normalizer(stack: Any, worker: str = "worker-0") -> float:
    import psutil

    normalizers = psutil.Process(child(stack, worker).proc.pid).children()
    if not normalizers:
        raise RuntimeError(f"{worker} has no normaliser process")
    normalizers[0].kill()
    return time.monotonic()


def supervise_for(stack: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stack.poll()
        time.sleep(0.1)


def run_fault(stack: Any, fault: str, inject: Callable[[Any], float], *, pagerduty: Any = None,
              traffic_s: float = 6.0, settle_s: float = 60.0) -> FaultResult:
    """Steady acknowledged traffic (with agent loops, so alerts, when ``pagerduty`` receives
    them); ``inject`` the fault half-way; keep supervising; count.

    Recovery is the time from the fault until a span sent after it is stored.
    """
    seed = zlib.crc32(fault.encode())
    produced_before = produced_alert_keys(stack.bootstrap_servers) if pagerduty is not None else set()
    traffic = AckedTraffic(stack.settings.otlp_http_port, seed=seed, loop_every=10 if pagerduty else 0).start()
    supervise_for(stack, traffic_s / 2)
    injected_at = inject(stack)
    supervise_for(stack, traffic_s / 2)
    marker_body, marker_ids = llm_request(1, rng=random.Random(seed + 1))
    while post_http(stack.settings.otlp_http_port, marker_body) != 200 and time.monotonic() - injected_at < settle_s:
        supervise_for(stack, 0.2)
    traffic.stop()
    expected = set(traffic.acknowledged) | set(marker_ids)
    recovered_at = None
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        stack.poll()
        ids, rows = stored_span_ids(stack.settings.data_dir)
        if recovered_at is None and set(marker_ids) <= ids:
            recovered_at = time.monotonic()
        if expected <= ids:
            break
        time.sleep(0.25)
    ids, rows = stored_span_ids(stack.settings.data_dir)
    result = FaultResult(fault=fault, acknowledged=len(expected), stored=len(expected & ids),
                         lost=len(expected - ids), repeated_rows=rows - len(ids),
                         refused_requests=traffic.refused,
                         recover_s=None if recovered_at is None else round(recovered_at - injected_at, 2))
    if pagerduty is not None:
        def delivered() -> set[str]:
            return {e["dedup_key"] for e in pagerduty.events("trigger")}

        produced = produced_alert_keys(stack.bootstrap_servers) - produced_before
        while time.monotonic() < deadline and not produced <= delivered():
            supervise_for(stack, 0.25)
        triggered = [e["dedup_key"] for e in pagerduty.events("trigger") if e["dedup_key"] in produced]
        result.alerts_produced = len(produced)
        result.alerts_delivered = len(produced & delivered())
        result.pagerduty_trigger_requests = len(triggered)
        result.max_pagerduty_triggers_per_key = max(Counter(triggered).values(), default=0)
        result.max_pagerduty_incidents_per_key = max(
            (len(pagerduty.incidents.get(key, [])) for key in produced), default=0)
    return result


def bench_faults(rounds: int = 2) -> dict[str, Any]:
    """Each fault ``rounds`` times on one alerting stack (local Slack and PagerDuty receivers),
    then a burst followed at once by a clean stop. Counts per run; recovery in seconds."""
    import tempfile

    from agentwatch.broker import free_port
    from agentwatch.settings import Settings
    from agentwatch.stack import Stack
    from tests.support.receivers import PagerDutyReceiver, SlackReceiver

    work = Path(tempfile.mkdtemp(prefix="agentwatch-fault-bench-"))
    pagerduty, slack = PagerDutyReceiver().up(), SlackReceiver().up()
    routes = work / "routes.yaml"
    routes.write_text(
        "destinations:\n"
        f"  pd:\n    type: pagerduty\n    routing_key: bench-key\n    base_url: {pagerduty.url}\n"
        f"    ca_bundle: {pagerduty.ca_path}\n"
        f"  slack:\n    type: slack\n    webhook_url: {slack.url}/hook\n"
        "routes:\n  - name: loops\n    match: {detector: agent_loop}\n    destinations: [pd, slack]\n"
        "    group_wait_s: 0\n")

    def settings(data: str, **extra: Any) -> Settings:
        return Settings(broker_port=free_port(), otlp_grpc_port=free_port(), otlp_http_port=free_port(),
                        metrics_port=free_port(4), data_dir=work / data, gpu_exporter="off",
                        snapshot_flush_seconds=2.0, **extra)

    faults = {"worker_sigkill": lambda stack: kill_child(stack, "worker-0"),
              "normaliser_sigkill": kill_normalizer,
              "notifier_sigkill": lambda stack: kill_child(stack, "notifier"),
              "collector_sigkill": lambda stack: kill_child(stack, "collector")}
    runs: list[dict[str, Any]] = []
    try:
        stack = Stack(settings("alerting", alert_routes=routes, alerts_state_dir=work / "alerts"),
                      say=lambda _m: None).start()
        try:
            supervise_for(stack, 10.0)  # past the start-up work (model preload, group joins)
            for round_ in range(rounds):
                for name, inject in faults.items():
                    result = run_fault(stack, f"{name}-{round_}", inject, pagerduty=pagerduty)
                    runs.append({**result.as_dict(), "fault": name})
        finally:
            stack.stop()
        for round_ in range(rounds):
            runs.append(burst_then_stop(settings(f"burst-{round_}")))
    finally:
        pagerduty.down()
        slack.down()
    summary: dict[str, Any] = {}
    for run in runs:
        entry = summary.setdefault(run["fault"], {"runs": 0, "acknowledged": 0, "lost": 0})
        entry["runs"] += 1
        entry["acknowledged"] += run["acknowledged"]
        entry["lost"] += run["lost"]
        for key in ("recover_s", "stop_s"):
            if run.get(key) is not None:
                entry.setdefault(f"{key}_range", [run[key], run[key]])
                entry[f"{key}_range"] = [min(entry[f"{key}_range"][0], run[key]), max(entry[f"{key}_range"][1], run[key])]
        if run.get("alerts_produced") is not None:
            entry["alerts_produced"] = entry.get("alerts_produced", 0) + run["alerts_produced"]
            entry["alerts_delivered"] = entry.get("alerts_delivered", 0) + run["alerts_delivered"]
            for key in ("max_pagerduty_incidents_per_key", "max_pagerduty_triggers_per_key"):
                entry[key] = max(entry.get(key, 0), run[key])
    return {"summary": summary, "runs": runs}


def burst_then_stop(settings: Any, requests: int = 30, spans_per_request: int = 100) -> dict[str, Any]:
    """A running stack takes a burst; the stop comes 0.3 s after the last success."""
    from agentwatch.stack import Stack

    stack = Stack(settings, say=lambda _m: None).start()
    traffic = AckedTraffic(settings.otlp_http_port, spans_per_request=spans_per_request)
    rng = random.Random(17)
    try:
        traffic.send_one(rng)
        wait_for(lambda: len(stored_span_ids(settings.data_dir)[0]) >= spans_per_request, 60)
        for _ in range(requests):
            traffic.send_one(rng)
        time.sleep(0.3)
    finally:
        started = time.monotonic()
        stack.stop()
        stop_s = round(time.monotonic() - started, 2)
    ids, rows = stored_span_ids(settings.data_dir)
    acknowledged = set(traffic.acknowledged)
    return {"fault": "burst_then_stop", "acknowledged": len(acknowledged), "stored": len(acknowledged & ids),
            "lost": len(acknowledged - ids), "repeated_rows": rows - len(ids), "refused_requests": traffic.refused,
            "stop_s": stop_s, "forced_stops": stack.forced_stops}
