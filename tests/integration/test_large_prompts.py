"""Large prompts on the real stack: every export the collector acknowledges is stored, every other
one gets an error (DESIGN.md, "Never acknowledge what cannot be stored").

Each case sends one export through the real OTel SDK exporter (gRPC or HTTP/protobuf, optionally
gzip) or as OTLP/JSON, under its own service name. Then, by counting: the span ids stored in
``llm_calls`` are exactly those of the exports that got success, nothing was dead-lettered, and
the collector logged no failed export. Whether an export must be accepted follows from its encoded
size and the collector's limits, so neither a lost span nor a needless rejection passes.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentwatch.collectors.rotel import HTTP_MAX_BODY_BYTES, MIB, CollectorLogWatch, RotelConfig
from agentwatch.stack import Stack
from agentwatch.streams.snapshots import query_snapshots

from stack_helpers import stack_settings, wait_until

pytestmark = pytest.mark.slow

KB = 1000
_PROMPTS: dict[int, str] = {}


def _prompt(size: int) -> str:
    if size not in _PROMPTS:
        _PROMPTS[size] = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
    return _PROMPTS[size]


def make_spans(service: str, n: int, prompt_bytes: int) -> list[ReadableSpan]:
    """``n`` finished LLM spans whose ``gen_ai.input.messages`` carries a ``prompt_bytes`` prompt."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("large-prompts")
    messages = json.dumps([{"role": "user", "parts": [{"type": "text", "content": _prompt(prompt_bytes)}]}])
    for i in range(n):
        with tracer.start_as_current_span("chat gpt-4o", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                "gen_ai.usage.input_tokens": 1000 + i, "gen_ai.usage.output_tokens": 10,
                "gen_ai.input.messages": messages}):
            pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def span_ids(spans: list[ReadableSpan]) -> set[str]:
    return {format(s.context.span_id, "016x") for s in spans}


@dataclass
class Case:
    service: str
    transport: str  # grpc | http | http-gzip | http-json
    spans: int
    prompt_bytes: int


CASES = [Case(f"{transport}-{n}x{kb}k", transport, n, kb * KB)
         for transport in ("grpc", "http") for n in (1, 512) for kb in (64, 256, 1000)]
CASES += [
    Case("grpc-512x32k", "grpc", 512, 32 * KB),      # an SDK batch of the old 32 KiB promise: 16.8 MB
    Case("grpc-30x1000k", "grpc", 30, 1000 * KB),    # 30 MB: just under the 31 MiB gRPC limit
    Case("http-19x1000k", "http", 19, 1000 * KB),    # 19 MB: just under rotel's 20 MiB HTTP limit
    Case("http-22x1000k", "http", 22, 1000 * KB),    # 22 MB: just over it
    Case("http-gzip-1x1000k", "http-gzip", 1, 1000 * KB),
    Case("http-gzip-25x1000k", "http-gzip", 25, 1000 * KB),  # small on the wire, 25 MB decompressed
    Case("http-json-1x256k", "http-json", 1, 256 * KB),
    Case("http-json-16x1000k", "http-json", 16, 1000 * KB),
]


def otlp_json(spans: list[ReadableSpan]) -> bytes:
    """OTLP/JSON (hex ids, 64-bit integers as strings) of the spans, as an SDK would send it."""
    def value(v):
        if v.HasField("int_value"):
            return {"intValue": str(v.int_value)}
        return {"stringValue": v.string_value}

    def attrs(kvs):
        return [{"key": kv.key, "value": value(kv.value)} for kv in kvs]

    request = encode_spans(spans)
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": attrs(rs.resource.attributes)},
        "scopeSpans": [{"scope": {"name": ss.scope.name}, "spans": [{
            "traceId": s.trace_id.hex(), "spanId": s.span_id.hex(), "name": s.name, "kind": s.kind,
            "startTimeUnixNano": str(s.start_time_unix_nano), "endTimeUnixNano": str(s.end_time_unix_nano),
            "attributes": attrs(s.attributes)} for s in ss.spans]} for ss in rs.scope_spans]}
        for rs in request.resource_spans]}).encode()


def post(port: int, body: bytes, content_type: str, encoding: str | None = None) -> int | str:
    headers = {"Content-Type": content_type, **({"Content-Encoding": encoding} if encoding else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/traces", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:  # the receiver may close the connection while an oversized body is sent
        return f"{type(exc).__name__}: {exc}"


def export(stack: Stack, case: Case, spans: list[ReadableSpan], timeout_s: float = 3) -> tuple[bool, object]:
    """``timeout_s``: the SDK retries OUT_OF_RANGE within it; 3 s keeps a refused case short."""
    s = stack.settings
    if case.transport == "grpc":
        exporter = GrpcExporter(endpoint=f"127.0.0.1:{s.otlp_grpc_port}", insecure=True, timeout=timeout_s)
    elif case.transport == "http-json":
        status = post(s.otlp_http_port, otlp_json(spans), "application/json")
        return status == 200, status
    else:
        # max_request_size=0: the SDK's own 64 MiB check would otherwise stop the largest
        # exports before they reach the collector, which is what is under test.
        exporter = HttpExporter(endpoint=f"http://127.0.0.1:{s.otlp_http_port}/v1/traces", timeout=timeout_s,
                                max_request_size=0,
                                compression=Compression.Gzip if case.transport == "http-gzip" else None)
    try:
        result = exporter.export(spans)
    finally:
        exporter.shutdown()
    return result is SpanExportResult.SUCCESS, result


def must_accept(case: Case, spans: list[ReadableSpan]) -> bool:
    """Whether the collector's limits admit this export: gRPC on the message, HTTP on the body
    after decompression (so the gzip cases are judged by their decompressed size)."""
    if case.transport == "http-json":
        return len(otlp_json(spans)) <= HTTP_MAX_BODY_BYTES
    # The spans of a case encode to the same length (fixed-size ids and times, token counts of one
    # varint length), so two give the whole size to within the envelope's length prefixes (a few
    # bytes); encoding 512 MB to measure it would take ~7 s.
    one, two = (encode_spans(spans[:k]).ByteSize() for k in (1, 2))
    size = one + (len(spans) - 1) * (two - one) if len(spans) > 1 else one
    limit = RotelConfig(brokers="-").grpc_max_recv_mib * MIB if case.transport == "grpc" else HTTP_MAX_BODY_BYTES
    assert abs(size - limit) > 1024, f"{case} is too close to the limit to judge from an estimate"
    return size <= limit


def assert_stored_exactly(stack: Stack, acked: dict[str, set[str]], services: set[str]) -> None:
    """The span ids stored for ``services`` are exactly the acknowledged ones."""
    expected = sum(map(len, acked.values()))

    def stored() -> dict[str, set[str]]:
        return {k: v for k, v in stored_ids(stack).items() if k in services}

    wait_until(lambda: sum(map(len, stored().values())) >= expected, timeout_s=60)
    time.sleep(1.0)  # anything more (a rejected export stored after all) would arrive by now
    assert stored() == acked


def dead_letters(stack: Stack) -> int:
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap_servers, consumer_timeout_ms=2000,
                             auto_offset_reset="earliest")
    consumer.assign([TopicPartition("dead_letter", 0)])
    count = sum(1 for _ in consumer)
    consumer.close()
    return count


def stored_ids(stack: Stack) -> dict[str, set[str]]:
    rows = query_snapshots(stack.settings.data_dir, "SELECT DISTINCT service, span_id FROM llm_calls").to_pylist()
    by_service: dict[str, set[str]] = {}
    for row in rows:
        by_service.setdefault(row["service"], set()).add(row["span_id"])
    return by_service


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(stack_settings(tmp_path_factory.mktemp("large-prompts") / "data"), say=lambda _m: None)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def test_acknowledged_spans_are_stored_and_the_rest_get_an_error(stack):
    watch = CollectorLogWatch(stack.run_dir / "collector.log")
    acked: dict[str, set[str]] = {}
    outcomes = {}
    for case in CASES:
        spans = make_spans(case.service, case.spans, case.prompt_bytes)
        ok, result = export(stack, case, spans)
        outcomes[case.service] = (ok, result)
        assert ok == must_accept(case, spans), (case, result)
        if ok:
            acked[case.service] = span_ids(spans)
        del spans
    # The matrix exercises both answers on both transports.
    assert {c.transport for c in CASES if outcomes[c.service][0]} >= {"grpc", "http", "http-gzip", "http-json"}
    assert {c.transport for c in CASES if not outcomes[c.service][0]} >= {"grpc", "http", "http-gzip"}
    assert all(not outcomes[f"{t}-512x{kb}k"][0] for t in ("grpc", "http") for kb in (64, 256, 1000))

    assert_stored_exactly(stack, acked, {c.service for c in CASES})
    assert dead_letters(stack) == 0
    assert watch.new_failures() == []


def test_concurrent_exports_of_64k_prompts_are_all_stored(stack):
    """Many SDK exports of 64 KiB prompts at once: a collector that merged concurrent requests
    into span-counted batches would build records over the limit; each request must be its own
    record."""
    watch = CollectorLogWatch(stack.run_dir / "collector.log")
    watch.new_failures()
    cases = [Case(f"burst-{t}-{i}", t, 256, 64 * 1024) for i in range(10) for t in ("grpc", "http")]
    batches = {case.service: make_spans(case.service, case.spans, case.prompt_bytes) for case in cases}
    # Eight 16.8 MB exports at once on two cores: the 3-s deadline of the refusal cases would
    # time a sender out while the collector still reads its request (seen once in CI).
    with ThreadPoolExecutor(8) as pool:
        results = dict(zip(batches, pool.map(lambda case: export(stack, case, batches[case.service], 30), cases)))
    assert all(ok for ok, _ in results.values()), results  # 16.8 MB each: within both limits
    assert_stored_exactly(stack, {name: span_ids(spans) for name, spans in batches.items()}, set(batches))
    assert watch.new_failures() == []


def test_gzip_grpc_over_the_record_limit_is_refused_or_visible(stack):
    """rotel checks the gRPC limit on the compressed message (tonic 0.12), so a gzip request that
    decompresses beyond the record limit can be acknowledged and then lost: the one known gap.
    Until rotel closes it, such a loss must at least show in the collector log watch."""
    watch = CollectorLogWatch(stack.run_dir / "collector.log")
    watch.new_failures()
    spans = make_spans("grpc-gzip-40x1000k", 40, 1000 * KB)  # 40 MB decompressed, ~0.1 MB on the wire
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.settings.otlp_grpc_port}", compression=grpc.Compression.Gzip)
    try:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(encode_spans(spans), timeout=30)
        status = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        status = exc.code()
    finally:
        channel.close()
    if status is grpc.StatusCode.OK:
        failures = wait_until(watch.new_failures, timeout_s=10)
        assert "MessageSizeTooLarge" in failures[0]
        assert "grpc-gzip-40x1000k" not in stored_ids(stack)
    else:
        assert status in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED)
