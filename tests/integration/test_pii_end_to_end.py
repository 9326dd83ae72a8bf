"""PII on the real stack: spans whose prompt, response and tool arguments/results and a log record
carry an e-mail address, a card number, a resident registration number and an API key are
stored, sent and alerted on without any of those values; the detections are counted in
``pii_detections`` and on /metrics; a project in hash mode gets one token per value.

The raw values do reach the collector's own topics (otlp_spans, otlp_logs): that is what the
app sent, before the normaliser; every topic after it is checked.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from agentwatch.stack import Stack
from agentwatch.streams.snapshots import connect
from bench.faults import post_http, wait_for
from tests.support.dataflow_testing import Ids, LogSpec, SpanSpec, otlp_logs, otlp_traces

from stack_helpers import stack_settings, write_routes

pytestmark = pytest.mark.slow

EMAIL = "minsu.kim@example.co.kr"
CARD = "4111 1111 1111 1111"
RRN = "900101-1234568"
API_KEY = "sk-proj-Q7vY2mXk9LpR4tW8zN3bH6cJ"
RAW = {"EMAIL": EMAIL, "CREDIT_CARD": CARD, "KR_RRN": RRN, "SECRET": API_KEY}
SERVICE = "pii-shop"
# Raw values only ever appear in the topics the collector writes, upstream of the normaliser.
COLLECTOR_TOPICS = {"otlp_spans", "otlp_logs"}


def resource(project: str) -> tuple[tuple[str, str], ...]:
    return (("service.name", SERVICE), ("agentwatch.project", project))


def llm(ids: Ids, trace: bytes, parent: bytes, prompt: str, response: str, at: float, project: str) -> SpanSpec:
    return SpanSpec(trace, ids.span(), "chat gpt-4o", at, at + 0.5, {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 20, "gen_ai.usage.output_tokens": 8,
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": prompt}]}]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": response}]}]),
    }, parent_id=parent, resource=resource(project))


def incident_requests(now: float) -> tuple[bytes, bytes, bytes]:
    """(spans with every value in every field, a log record with all four, two hashed-project calls)."""
    ids = Ids(20261129)
    trace, root = ids.trace(), ids.span()
    everything = f"I am {EMAIL}, card {CARD}, RRN {RRN}, my key is {API_KEY}"
    arguments = json.dumps({"customer": EMAIL, "card": CARD})
    spans = [SpanSpec(trace, root, "invoke_agent support", now - 5, now, {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support"}, resource=resource("shop")),
        llm(ids, trace, root, everything, f"Noted {EMAIL}; using key {API_KEY}", now - 4.5, "shop")]
    # The same tool with the same arguments three times: an agent_loop finding, so an alert.
    spans += [SpanSpec(trace, ids.span(), "execute_tool lookup_customer", now - 3 + i * 0.5, now - 2.8 + i * 0.5, {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_customer",
        "gen_ai.tool.call.arguments": arguments, "gen_ai.tool.call.result": f"customer RRN {RRN}"},
        parent_id=root, resource=resource("shop")) for i in range(3)]
    logs = otlp_logs([LogSpec(trace, spans[1].span_id, now - 4, body=everything, service=SERVICE)])
    hashed_trace, hashed_root = ids.trace(), ids.span()
    hashed = [llm(ids, hashed_trace, hashed_root, f"contact {EMAIL} please", "ok", now - 2, "hashed"),
              llm(ids, hashed_trace, hashed_root, f"again: {EMAIL}", "ok", now - 1, "hashed")]
    return otlp_traces(spans), logs, otlp_traces(hashed)


@pytest.fixture(scope="module")
def pii_stack(tmp_path_factory, receivers):
    pagerduty, slack = receivers
    work = tmp_path_factory.mktemp("pii")
    routes = write_routes(work / "routes.yaml", pagerduty, slack, routing_key="pii-key")
    settings = stack_settings(work / "data").model_copy(update={
        "alert_routes": routes, "alerts_state_dir": work / "alerts", "gpu_exporter": "off",
        "pii_mode": "redact", "pii": json.dumps({"projects": {"hashed": {"EMAIL": "hash"}}}),
        "pii_hash_key": SecretStr("pii-end-to-end-test-key")})
    stack = Stack(settings, say=lambda _m: None).start()
    try:
        yield stack
    finally:
        stack.stop()


def post_logs(port: int, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/logs", data=body, method="POST",
                                     headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def query(data_dir: Path, sql: str) -> list[tuple]:
    con = connect(data_dir)
    try:
        return con.execute(sql).fetchall()
    except Exception:  # a view whose folder has no file yet
        return []
    finally:
        con.close()


def topic_records(bootstrap_servers: str) -> dict[str, list[bytes]]:
    """Every record (key, value and headers joined) of every topic, read to its end offsets."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=2000)
    try:
        partitions = [TopicPartition(t, p) for t in consumer.topics() for p in consumer.partitions_for_topic(t) or ()]
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        out: dict[str, list[bytes]] = {}
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end for tp, end in ends.items()) and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    out.setdefault(tp.topic, []).append(
                        (r.key or b"") + (r.value or b"") + b"".join(v or b"" for _, v in r.headers or ()))
        assert all(consumer.position(tp) >= end for tp, end in ends.items()), "topics not read to their ends"
        return out
    finally:
        consumer.close()


def test_no_detected_value_is_stored_sent_or_alerted_and_every_detection_is_counted(pii_stack, receivers):
    pagerduty, slack = receivers
    data_dir = pii_stack.settings.data_dir
    spans, logs, hashed = incident_requests(time.time())
    assert post_http(pii_stack.settings.otlp_http_port, spans) == 200
    assert post_logs(pii_stack.settings.otlp_http_port, logs) == 200
    assert post_http(pii_stack.settings.otlp_http_port, hashed) == 200

    def stored() -> bool:
        counts = query(data_dir, "SELECT (SELECT count(*) FROM llm_calls), (SELECT count(*) FROM tool_calls), "
                                 "(SELECT count(*) FROM llm_messages), (SELECT count(*) FROM pii_detections)")
        return bool(counts) and counts[0][:3] == (3, 3, 1) and counts[0][3] > 0

    assert wait_for(stored, 90), query(data_dir, "SELECT count(*) FROM llm_calls")
    alerted = wait_for(lambda: [r.body for r in slack.snapshot() if isinstance(r.body, dict)], 60)
    assert alerted, "the loop's alert never reached the Slack receiver"
    assert wait_for(lambda: pagerduty.events("trigger"), 30), "the loop's alert never reached PagerDuty"

    # Counted: every planted value, by type and field (the prompt and log body hold all four).
    expected = {("EMAIL", "llm_calls.prompt"): 1, ("CREDIT_CARD", "llm_calls.prompt"): 1,
                ("KR_RRN", "llm_calls.prompt"): 1, ("SECRET", "llm_calls.prompt"): 1,
                ("EMAIL", "llm_calls.response"): 1, ("SECRET", "llm_calls.response"): 1,
                ("EMAIL", "tool_calls.arguments"): 3, ("CREDIT_CARD", "tool_calls.arguments"): 3,
                ("KR_RRN", "tool_calls.result"): 3,
                ("EMAIL", "llm_messages.content"): 1, ("CREDIT_CARD", "llm_messages.content"): 1,
                ("KR_RRN", "llm_messages.content"): 1, ("SECRET", "llm_messages.content"): 1}
    def counted() -> dict:
        return dict(((e, f), n) for e, f, n in query(
            data_dir, "SELECT entity_type, field, sum(count)::INT FROM pii_detections "
                      "WHERE project = 'shop' OR field LIKE 'llm_messages%' GROUP BY ALL"))

    # The map stage writes these rows, the trace stage the event rows: each table flushes on its own.
    wait_for(lambda: counted() == expected, 30)
    assert counted() == expected
    assert query(data_dir, "SELECT DISTINCT service FROM pii_detections") == [(SERVICE,)]

    # Hash mode for one project: one token for one value, and not the value.
    prompts = [p for (p,) in query(data_dir, "SELECT prompt FROM llm_calls WHERE project = 'hashed' ORDER BY ts")]
    tokens = [p.split()[-1] if p.startswith("again") else p.split()[1] for p in prompts]
    assert len(tokens) == 2 and tokens[0] == tokens[1] and tokens[0].startswith("<EMAIL:")

    # /metrics of the worker that mapped them.
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{pii_stack.settings.metrics_port}/metrics",
                                     timeout=10).read().decode()
    line = (f'agentwatch_pii_detections_total{{entity_type="CREDIT_CARD",field="tool_calls.arguments",'
            f'service="{SERVICE}"}} 3.0')
    assert line in metrics, [m for m in metrics.splitlines() if m.startswith("agentwatch_pii")]

    # Nowhere after the collector: every Parquet column read back, every other file's bytes,
    # every record of every topic, everything the receivers got.
    raw = [v.encode() for v in RAW.values()]
    for path in data_dir.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for i, column_field in enumerate(table.schema):
                if pa.types.is_string(column_field.type):
                    for value in table.column(i).to_pylist():
                        assert not any(v in (value or "") for v in RAW.values()), (path, column_field.name)
        else:
            content = path.read_bytes()
            assert not any(v in content for v in raw), path
    records = topic_records(pii_stack.bootstrap_servers)
    assert records.get("llm_calls") and records.get("usage") and records.get("alerts")
    assert any(EMAIL.encode() in r for r in records["otlp_spans"])  # the check would see one
    for topic, values in records.items():
        if topic in COLLECTOR_TOPICS:
            continue
        for value in values:
            assert not any(v in value for v in raw), topic
    received = json.dumps([r.body for r in slack.snapshot()] + pagerduty.events("trigger"), default=str)
    assert "lookup_customer" in received or "agent_loop" in received
    assert not any(v in received for v in RAW.values())
