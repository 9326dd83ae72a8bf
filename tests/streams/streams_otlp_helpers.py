"""Builders shared by the tests/streams unit tests: OTLP payloads made by the real OTel SDK.

Spans come from :mod:`tests.otel_fixtures`; log records from the SDK's LoggerProvider and the
OTLP log encoder the official exporters use. OTLP/JSON is derived from those protobufs the way
the OTLP/JSON spec writes it (hex trace/span ids), never typed in by hand.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

# tests/ is not a package; make `tests.otel_fixtures` importable however pytest was started.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from google.protobuf import json_format  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs  # noqa: E402
from opentelemetry.sdk._logs import LoggerProvider  # noqa: E402
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags  # noqa: E402

from agentwatch.streams.normalize import NormalizedBatch, Normalizer  # noqa: E402
from agentwatch.streams.otlp import decode_logs, decode_traces  # noqa: E402
from agentwatch.streams.pricing import PricingTable  # noqa: E402
from tests.otel_fixtures import otlp_bytes, recorded_spans  # noqa: E402,F401

SECOND = 1_000_000_000  # ns


def spans_payload(build: Callable[[Any], None], service: str = "shop", **resource: str) -> tuple[bytes, dict[str, Any]]:
    """Run ``build(tracer)``; return the OTLP protobuf record and the finished spans by name."""
    with recorded_spans(service, **resource) as (tracer, exporter):
        build(tracer)
        payload = otlp_bytes(exporter)
        finished = {s.name: s for s in exporter.get_finished_spans()}
    return payload, finished


def hex_span_id(span: Any) -> str:
    return format(span.context.span_id, "016x")


def hex_trace_id(span: Any) -> str:
    return format(span.context.trace_id, "032x")


def timed_span(tracer: Any, name: str, attributes: Mapping[str, Any], start_s: float, end_s: float,
               parent: Any = None) -> Any:
    """A finished span with exact start/end (seconds), optionally the child of ``parent``."""
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    span = tracer.start_span(name, context=ctx, attributes=dict(attributes), start_time=int(start_s * SECOND))
    span.end(end_time=int(end_s * SECOND))
    return span


def pricing() -> PricingTable:
    return PricingTable.load()


def normalize(payload: bytes, normalizer: Normalizer | None = None, **kwargs: Any) -> NormalizedBatch:
    normalizer = normalizer or Normalizer(pricing(), **kwargs)
    return normalizer.normalize_traces(decode_traces(payload))


def to_otlp_json(payload: bytes, *, kind: str = "traces", indent: int | None = None, lead: str = "") -> bytes:
    """The OTLP/JSON form of an OTLP protobuf record: camelCase keys, ids as lowercase hex."""
    message = decode_traces(payload) if kind == "traces" else decode_logs(payload)
    doc = json_format.MessageToDict(message)
    _b64_ids_to_hex(doc)
    return (lead + json.dumps(doc, indent=indent)).encode()


def _b64_ids_to_hex(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _b64_ids_to_hex(value)
    elif isinstance(node, list):
        for item in node:
            _b64_ids_to_hex(item)


def logs_payload(records: Iterable[Mapping[str, Any]], service: str = "shop") -> bytes:
    """An ExportLogsServiceRequest made by the SDK.

    Each record: ``trace_id``/``span_id`` (ints) put it in a span's context, the other keys are
    ``Logger.emit`` keywords (``body``, ``attributes``, ``event_name``, ``timestamp``).
    """
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource.create({"service.name": service}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("agentwatch-tests")
    for record in records:
        record = dict(record)
        trace_id, span_id = record.pop("trace_id", 0), record.pop("span_id", 0)
        context = None
        if trace_id:
            parent = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False,
                                                  trace_flags=TraceFlags(TraceFlags.SAMPLED)))
            context = trace.set_span_in_context(parent)
        logger.emit(context=context, **record)
    provider.shutdown()
    return encode_logs(exporter.get_finished_logs()).SerializeToString()
