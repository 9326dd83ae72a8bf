"""Decoding of collector records: one OTLP export request (traces or logs) per Kafka record.

The contract is what otelcol-contrib's kafkaexporter (and rotel's kafka exporter) write:
``otlp_proto`` (binary protobuf) or ``otlp_json``. The JSON form follows the OTLP/JSON rules,
where trace and span ids are hex strings rather than protobuf-JSON base64, so ids are rewritten
before parsing into the same protobuf messages: one code path after decoding.
"""

from __future__ import annotations

import base64
from typing import Any, Iterable

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class UndecodableRecord(ValueError):
    """The record is neither OTLP protobuf nor OTLP JSON of the expected kind."""


_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


def decode_traces(payload: bytes) -> ExportTraceServiceRequest:
    return _decode(payload, ExportTraceServiceRequest, "resourceSpans")


def decode_logs(payload: bytes) -> ExportLogsServiceRequest:
    return _decode(payload, ExportLogsServiceRequest, "resourceLogs")


def _decode(payload: bytes, message_type: type, json_root: str) -> Any:
    if not payload:
        raise UndecodableRecord("empty record")
    if payload[:1] == b"{":
        return _decode_json(payload, message_type, json_root)
    try:
        message = message_type.FromString(payload)
        # Protobuf happily decodes many random byte strings into messages made only of unknown
        # fields; a non-empty record that carries no known field is garbage, not an empty batch.
        if not message.ListFields():
            raise UndecodableRecord("protobuf with no OTLP fields (not an export request?)")
        return message
    except (DecodeError, UndecodableRecord) as exc:
        # Pretty-printed JSON starts with whitespace, which is also a valid protobuf tag byte
        # ("\n" is field 1), so JSON is only tried once protobuf has failed.
        if payload.lstrip()[:1] == b"{":
            return _decode_json(payload, message_type, json_root)
        if isinstance(exc, UndecodableRecord):
            raise
        raise UndecodableRecord(f"not OTLP protobuf ({exc})") from exc


def _decode_json(payload: bytes, message_type: type, json_root: str) -> Any:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise UndecodableRecord(f"invalid JSON ({exc})") from exc
    if not isinstance(doc, dict) or json_root not in doc:
        raise UndecodableRecord(f"JSON without {json_root!r}: not an OTLP/JSON export request")
    _hex_ids_to_base64(doc)
    try:
        return json_format.ParseDict(doc, message_type(), ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise UndecodableRecord(f"invalid OTLP/JSON ({exc})") from exc


def _hex_ids_to_base64(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = _hex_to_b64(value)
            elif isinstance(value, (dict, list)):
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def _hex_to_b64(value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        return value  # already base64 (a protobuf-JSON producer): leave it


def any_value(value: Any) -> Any:
    """An OTLP ``AnyValue`` as a plain Python value (arrays -> list, kvlists -> dict)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes(kvs: Iterable[Any]) -> dict[str, Any]:
    """Key/values as a dict. The hot path of the normaliser: one pass, no recursion for scalars."""
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        # Most values are non-empty strings: one field read answers them (an unset string field
        # reads "", so "" and every other kind take the oneof test below).
        text = value.string_value
        if text:
            out[kv.key] = text
            continue
        kind = value.WhichOneof("value")
        if kind is None:
            out[kv.key] = None
        elif kind == "array_value" or kind == "kvlist_value":
            out[kv.key] = any_value(value)
        else:
            out[kv.key] = getattr(value, kind)
    return out
