"""The real embedded stack: OTel SDK -> rotel -> Tansu -> Faust worker -> Parquet/DuckDB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from agentwatch.demo import scrape_counter
from agentwatch.streams.dataflow import DLQ_REASON_HEADER
from agentwatch.streams.snapshots import query_snapshots

from stack_helpers import stack_settings, wait_until

pytestmark = pytest.mark.slow


def _provider(stack, service: str, **resource) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service, **resource}))
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{stack.settings.otlp_grpc_port}", insecure=True)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=256, schedule_delay_millis=100))
    return provider


def _spans_ingested(stack) -> float:
    return scrape_counter(stack.worker_metrics_ports(), "agentwatch_spans_total")


def _rows(stack, sql: str) -> list[dict]:
    return query_snapshots(stack.settings.data_dir, sql).to_pylist()


def test_sdk_spans_arrive_in_duckdb_with_tokens_cost_and_model(running_stack):
    before = _spans_ingested(running_stack)
    provider = _provider(running_stack, "checkout", **{"agentwatch.project": "shop"})
    tracer = provider.get_tracer("test")
    for i in range(5):
        with tracer.start_as_current_span("invoke_agent cart", attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "cart", "user.id": f"u{i}"}):
            with tracer.start_as_current_span("chat gpt-4o-mini", attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                    "gen_ai.usage.input_tokens": 1000 * (i + 1), "gen_ai.usage.output_tokens": 100}):
                pass
            with tracer.start_as_current_span("execute_tool lookup", attributes={
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup"}):
                pass
    provider.shutdown()
    wait_until(lambda: _spans_ingested(running_stack) - before >= 15)
    rows = wait_until(lambda: _rows(running_stack, "SELECT * FROM llm_calls WHERE service = 'checkout' "
                                                   "ORDER BY input_tokens"))
    assert len(rows) == 5  # the agent span is not counted as a second model call
    # gpt-4o-mini: 0.15 $/M input, 0.60 $/M output -> 1000*i*0.15e-6 + 100*0.6e-6
    for i, row in enumerate(rows, start=1):
        assert row["model"] == "gpt-4o-mini-2024-07-18"
        assert row["request_model"] == "gpt-4o-mini"
        assert row["input_tokens"] == 1000 * i and row["output_tokens"] == 100
        assert row["cost_usd"] == pytest.approx(1000 * i * 0.15e-6 + 100 * 0.60e-6)
        assert row["service"] == "checkout" and row["project"] == "shop" and row["priced"]
    assert {r["user"] for r in rows} == {f"u{i}" for i in range(5)}
    tools = wait_until(lambda: _rows(running_stack, "SELECT tool_name, agent FROM tool_calls WHERE service = 'checkout'"))
    assert len(tools) == 5 and {t["tool_name"] for t in tools} == {"lookup"}
    steps = wait_until(lambda: _rows(running_stack, "SELECT operation FROM agent_steps WHERE service = 'checkout'"))
    assert [s["operation"] for s in steps] == ["invoke_agent"] * 5


def test_large_prompts_spans_in_equals_spans_out(running_stack):
    """32 KiB prompts: with rotel's defaults these batches would exceed the record limit and vanish."""
    before = _spans_ingested(running_stack)
    provider = _provider(running_stack, "rag-bot")
    tracer = provider.get_tracer("test")
    sent = 1500
    prompt = ("lorem ipsum dolor sit amet " * 1300)[:32 * 1024]
    for i in range(sent):
        with tracer.start_as_current_span("chat gpt-4o", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                "gen_ai.usage.input_tokens": 8000, "gen_ai.usage.output_tokens": i,
                "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": prompt}]}])}):
            pass
    provider.shutdown()
    wait_until(lambda: _spans_ingested(running_stack) - before >= sent, timeout_s=60)
    time.sleep(1.0)
    assert _spans_ingested(running_stack) - before == sent
    mine = "FROM llm_calls WHERE service = 'rag-bot'"
    rows = wait_until(lambda: _rows(running_stack, f"SELECT count(*) n {mine}")[0]["n"] == sent
                      and _rows(running_stack, f"SELECT count(DISTINCT output_tokens) d, max(length(prompt)) p {mine}"))
    assert rows[0]["d"] == sent
    assert rows[0]["p"] == running_stack.settings.max_text_chars  # stored prompts are truncated


def test_malformed_records_go_to_dead_letter_and_processing_continues(running_stack):
    bootstrap = running_stack.bootstrap_servers
    ports = running_stack.worker_metrics_ports()
    dead_before = scrape_counter(ports, "agentwatch_dead_letter_total")
    rejected_before = scrape_counter(ports, "agentwatch_values_rejected_total")
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    garbage = [b"\xff\xfe not protobuf at all", b'{"resourceSpans": "nope"}', b"{ broken json"]
    for payload in garbage:
        producer.send("otlp_spans", payload)
    mistyped = b'[{"ts": 1.0, "trace_id": "t", "span_id": "s", "input_tokens": "many"}]'
    for payload in (b"[1, 2, 3]", mistyped):
        producer.send("llm_calls", payload)
    # Nothing to decode: zero bytes and a tombstone (null value), on every kind of consumed topic.
    empties = ("otlp_spans", "otlp_logs", "llm_calls", "usage", "gpu_samples", "llm_messages")
    for topic in empties:
        producer.send(topic, b"", key=b"empty")
        producer.send(topic, None, key=b"tombstone")
    producer.flush()
    # A valid batch after the bad ones still arrives.
    provider = _provider(running_stack, "after-garbage")
    with provider.get_tracer("t").start_as_current_span("chat m", attributes={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 7}):
        pass
    provider.shutdown()
    wait_until(lambda: _rows(running_stack, "SELECT * FROM llm_calls WHERE service = 'after-garbage'"))

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=3000, auto_offset_reset="earliest")
    consumer.assign([TopicPartition("dead_letter", 0)])
    letters = list(consumer)
    consumer.close()
    blanks = [m for m in letters if m.key in (b"empty", b"tombstone")]
    # A number field holding text is nulled in its row (which lands) and the value dead-lettered.
    values = [m for m in letters if dict(m.headers)[DLQ_REASON_HEADER].startswith(b"implausible values")]
    letters = [m for m in letters if m not in blanks and m not in values]
    assert [json.loads(m.value)["rejections"][0]["value"] for m in values] == ["many"]
    assert _rows(running_stack, "SELECT input_tokens, invalid_fields FROM llm_calls WHERE trace_id = 't'") == [
        {"input_tokens": None, "invalid_fields": "input_tokens:not_a_number"}]
    blank_reasons = {(dict(m.headers)["agentwatch.dlq.topic"].decode(), m.key): dict(m.headers)[DLQ_REASON_HEADER]
                     for m in blanks}
    assert blank_reasons == {**{(t, b"empty"): b"empty record (0 bytes)" for t in empties},
                             **{(t, b"tombstone"): b"tombstone (record with a null value)" for t in empties}}
    assert sorted(m.value for m in letters) == sorted(garbage + [b"[1, 2, 3]"])  # nothing lost, bytes intact
    reasons = {m.value: dict(m.headers)[DLQ_REASON_HEADER].decode() for m in letters}
    assert reasons[garbage[0]].startswith("undecodable otlp_spans record")
    assert "llm_calls" in reasons[b"[1, 2, 3]"]
    assert all(dict(m.headers)["agentwatch.dlq.topic"] in (b"otlp_spans", b"llm_calls") for m in letters)
    assert all(c.proc.poll() is None for c in running_stack.children)  # the worker survived all of it
    assert scrape_counter(ports, "agentwatch_dead_letter_total") - dead_before == 5 + 2 * len(empties)
    assert scrape_counter(ports, "agentwatch_values_rejected_total") - rejected_before == 1


def test_openai_v2_instrumentation_log_records_arrive_via_otlp_logs(running_stack, tmp_path, monkeypatch):
    """The official openai-v2 instrumentation sends prompt content as log records, not span attributes."""
    import http.server
    import threading

    import openai
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    class FakeOpenAI(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # a recorded chat.completions response shape
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": "Your balance is $12."}}],
                               "usage": {"prompt_tokens": 21, "completion_tokens": 6, "total_tokens": 27}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    provider = _provider(running_stack, "openai-app")
    logger_provider = LoggerProvider(resource=Resource.create({"service.name": "openai-app"}))
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(
        OTLPLogExporter(endpoint=f"127.0.0.1:{running_stack.settings.otlp_grpc_port}", insecure=True)))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider, logger_provider=logger_provider)
    try:
        client = openai.OpenAI(api_key="test", base_url=f"http://127.0.0.1:{server.server_port}/v1")
        client.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "system", "content": "You are a bank assistant."},
            {"role": "user", "content": "what is the balance on my checking account"}])
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
        logger_provider.shutdown()
        server.shutdown()
    rows = wait_until(lambda: _rows(running_stack, "SELECT * FROM llm_calls WHERE service = 'openai-app' AND prompt <> ''"),
                      timeout_s=30)
    assert rows[0]["prompt"] == "what is the balance on my checking account"
    assert rows[0]["input_tokens"] == 21 and rows[0]["output_tokens"] == 6
    messages = _rows(running_stack, "SELECT role, content FROM llm_messages ORDER BY role")
    assert {"role": "system", "content": "You are a bank assistant."} in messages


def test_port_in_use_gives_a_clear_error_naming_port_and_flag(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "agentwatch", "up", "--otlp-grpc-port", str(port),
                                 "--broker-port", "0", "--data-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"port {port} is already in use" in result.stderr and "--otlp-grpc-port" in result.stderr


def test_a_killed_worker_is_restarted_and_the_stop_leaves_no_orphans(tmp_path):
    from agentwatch.stack import Stack

    import psutil

    stack = Stack(stack_settings(tmp_path / "data"), say=lambda _m: None).start()
    worker = next(c for c in stack.children if c.name == "worker-0")
    assert psutil.Process(worker.proc.pid).children(), "expected the worker's normaliser process"
    first_pid = worker.proc.pid
    os.kill(first_pid, 9)
    wait_until(lambda: stack.poll() or (worker.restarts == 1 and worker.restart_at is None), timeout_s=30, every_s=0.1)
    assert worker.proc.pid != first_pid and worker.proc.poll() is None
    # The restarted worker starts its own normaliser process.
    wait_until(lambda: psutil.Process(worker.proc.pid).children(), timeout_s=30)
    # Every process of the stack, grandchildren included (the worker's normaliser process).
    pids = [p.pid for c in stack.children for p in [psutil.Process(c.proc.pid)] + psutil.Process(c.proc.pid).children(recursive=True)]
    pids.append(stack.broker.proc.pid)
    stack.stop()
    time.sleep(0.5)  # a parent-death signal is delivered asynchronously
    for pid in pids:
        assert not _alive(pid), f"process {pid} survived the stop"


def test_up_stops_cleanly_on_sigterm(tmp_path):
    s = stack_settings(tmp_path / "data")
    proc = subprocess.Popen([sys.executable, "-m", "agentwatch", "up", "--broker-port", str(s.broker_port),
                             "--otlp-grpc-port", str(s.otlp_grpc_port), "--otlp-http-port", str(s.otlp_http_port),
                             "--metrics-port", str(s.metrics_port), "--data-dir", str(s.data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.monotonic()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ready in"):
            break
    ready_s = time.monotonic() - started
    import psutil

    children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(children) >= 4, "expected broker, collector, worker and the worker's normaliser process"
    proc.terminate()
    proc.wait(30)
    assert proc.returncode == 0, "".join(lines)
    time.sleep(0.5)
    assert [pid for pid in children if _alive(pid)] == []
    assert ready_s < 30  # the benchmark reports the real figure; this only guards a hang


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_killed_before_its_snapshot_flush_loses_no_rows(tmp_path):
    """Event records are committed only after their rows are in Parquet: a SIGKILL redelivers them."""
    from agentwatch.stack import Stack

    settings = stack_settings(tmp_path / "data").model_copy(update={"snapshot_flush_seconds": 600.0})
    stack = Stack(settings, say=lambda _m: None).start()
    try:
        provider = _provider(stack, "kill-test")
        tracer = provider.get_tracer("t")
        for i in range(40):
            with tracer.start_as_current_span("chat m", attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                    "gen_ai.usage.input_tokens": 1000 + i}):
                pass
        provider.shutdown()
        wait_until(lambda: _spans_ingested(stack) >= 40)
        time.sleep(2.0)  # the detect/snapshot stage has buffered them; commits would have happened by now
        assert _rows(stack, "SELECT count(*) n FROM llm_calls")[0]["n"] == 0  # still only in memory
        worker = next(c for c in stack.children if c.name == "worker-0")
        os.kill(worker.proc.pid, 9)
        worker.proc.wait()
        stack.children.remove(worker)

        stack.settings = settings.model_copy(update={"snapshot_flush_seconds": 0.5})
        stack._start_workers(deadline=time.monotonic() + 60)
        rows = wait_until(lambda: (r := _rows(stack, "SELECT input_tokens FROM llm_calls")) and len(r) >= 40 and r,
                          timeout_s=60)
        assert sorted(r["input_tokens"] for r in rows) == [1000 + i for i in range(40)]
    finally:
        stack.stop()
