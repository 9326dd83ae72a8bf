"""Helpers that produce OTLP payloads with the real OpenTelemetry SDK (no hand-built protos)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@contextmanager
def recorded_spans(service: str = "shop", **resource: str) -> Iterator[tuple[object, InMemorySpanExporter]]:
    """A tracer whose finished spans land in an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service, **resource}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider.get_tracer("agentwatch-tests"), exporter
    finally:
        provider.shutdown()


def otlp_bytes(exporter: InMemorySpanExporter) -> bytes:
    """The finished spans as one ExportTraceServiceRequest, as the collector writes it."""
    return encode_spans(exporter.get_finished_spans()).SerializeToString()
