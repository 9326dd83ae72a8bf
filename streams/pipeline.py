"""What a worker does with one Kafka record, without Faust: decode, normalise, route, encode.

The Faust agents in :mod:`agentwatch.streams.app` are thin loops over these methods, so the same
code runs in tests and in the benchmark's in-process measurements.
"""

from __future__ import annotations

import operator
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import msgspec
import orjson

from agentwatch.events import EVENT_BY_TABLE
from agentwatch.streams.normalize import NormalizedBatch, Normalizer
from agentwatch.streams.otlp import UndecodableRecord, decode_logs, decode_traces


@dataclass
class RecordOutcome:
    """What one input record produced: output records per (topic, partition), or a dead letter."""

    outputs: list[tuple[str, int, bytes]] = field(default_factory=list)
    dead_letter_reason: str | None = None
    spans: int = 0
    batch: NormalizedBatch | None = None


def partition_for(key: str, partitions: int) -> int:
    """Stable partitioning: every event of a trace (or finding of a condition) meets the same state."""
    return zlib.crc32(key.encode()) % partitions


def _trace_id(event: Any) -> str:
    return event.trace_id


_row_trace_id = operator.itemgetter("trace_id")


def encode_by_partition(topic: str, events: Sequence[Any], partitions: int,
                        key: Callable[[Any], str] = _trace_id) -> list[tuple[str, int, bytes]]:
    """One JSON-array record per partition: events travel in batches, never one per record.

    Partitioned by trace id unless ``key`` says otherwise (findings go by their dedup key).
    """
    if not events:
        return []
    groups: dict[int, list[Any]] = {}
    for event in events:
        groups.setdefault(partition_for(key(event), partitions), []).append(event)
    return [(topic, p, orjson.dumps(group)) for p, group in groups.items()]


def merge_event_records(outputs: Sequence[tuple[str, int, bytes]], max_bytes: int
                        ) -> list[tuple[str, int, bytes]]:
    """Join the JSON-array records bound for the same (topic, partition) into fewer records.

    Order within each partition is kept; a merged record stays under ``max_bytes`` (a record
    already larger goes alone, as it came).
    """
    groups: dict[tuple[str, int], list[bytes]] = {}
    for topic, partition, payload in outputs:
        groups.setdefault((topic, partition), []).append(payload)
    merged: list[tuple[str, int, bytes]] = []
    for (topic, partition), payloads in groups.items():
        if len(payloads) == 1:
            merged.append((topic, partition, payloads[0]))
            continue
        chunk: list[bytes] = []
        size = 2
        for payload in payloads:
            if chunk and size + len(payload) - 1 > max_bytes:
                merged.append((topic, partition, join_json_arrays(chunk)))
                chunk, size = [], 2
            chunk.append(payload)
            size += len(payload) - 1  # its brackets give way to one comma
        merged.append((topic, partition, join_json_arrays(chunk)))
    return merged


def join_json_arrays(payloads: Sequence[bytes]) -> bytes:
    """Concatenate JSON arrays (or single objects) into one JSON array without parsing them."""
    if len(payloads) == 1 and payloads[0][:1] == b"[":
        return payloads[0]
    parts = []
    for payload in payloads:
        payload = payload.strip()
        if payload.startswith(b"["):
            inner = payload[1:-1].strip()
            if inner:
                parts.append(inner)
        elif payload:
            parts.append(payload)
    return b"[" + b",".join(parts) + b"]"


def decode_event_rows(payload: bytes) -> list[dict[str, Any]]:
    """Rows of an event-topic record (a JSON array of objects, or one object)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise UndecodableRecord(f"invalid JSON ({exc})") from exc
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(row, dict) for row in doc):
        raise UndecodableRecord("expected a JSON array of event objects")
    return doc


_EVENT_DECODERS: dict[str, msgspec.json.Decoder] = {}


def decode_events(table: str, payload: bytes) -> list[Any]:
    """The typed events of an event-topic record (a JSON array of objects, or one object).

    JSON is parsed straight into the event dataclasses and checked against their field types in
    one C pass (msgspec): a quarter of the cost of parsing to dicts and calling the constructor,
    which never checked types. Unknown keys are ignored (a newer producer may add fields); a
    missing required field or a wrong type names the path, e.g. ``$[3].input_tokens``.
    """
    decoder = _EVENT_DECODERS.get(table)
    if decoder is None:
        cls = EVENT_BY_TABLE[table]
        decoder = _EVENT_DECODERS[table] = msgspec.json.Decoder(list[cls] | cls)  # type: ignore[valid-type]
    try:
        decoded = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise UndecodableRecord(f"rows do not match {EVENT_BY_TABLE[table].__name__}: {exc}") from exc
    except msgspec.DecodeError as exc:  # not JSON at all
        raise UndecodableRecord(f"invalid JSON ({exc})") from exc
    return decoded if isinstance(decoded, list) else [decoded]


class SpanPipeline:
    """otlp_spans / otlp_logs records -> event records partitioned by trace id."""

    def __init__(self, normalizer: Normalizer, partitions: Mapping[str, int]) -> None:
        self.normalizer = normalizer
        self.partitions = partitions

    def on_traces(self, payload: bytes) -> RecordOutcome:
        try:
            request = decode_traces(payload)
        except UndecodableRecord as exc:
            return RecordOutcome(dead_letter_reason=f"undecodable otlp_spans record: {exc}")
        batch = self.normalizer.normalize_traces(request)
        outcome = RecordOutcome(spans=batch.spans, batch=batch)
        for table, rows in (("llm_calls", batch.llm_call_rows), ("tool_calls", batch.tool_call_rows),
                            ("agent_steps", batch.agent_step_rows)):
            outcome.outputs += encode_by_partition(table, rows, self.partitions[table], _row_trace_id)
        if batch.failures:
            # The mapped spans went on; the record itself is kept whole for inspection.
            shown = "; ".join(f"span {sid}: {why}" for sid, why in batch.failures[:5])
            outcome.dead_letter_reason = f"{len(batch.failures)} of {batch.spans} spans unmappable: {shown}"
        return outcome

    def on_logs(self, payload: bytes) -> RecordOutcome:
        try:
            request = decode_logs(payload)
        except UndecodableRecord as exc:
            return RecordOutcome(dead_letter_reason=f"undecodable otlp_logs record: {exc}")
        _, messages = self.normalizer.normalize_logs(request)
        return RecordOutcome(outputs=encode_by_partition("llm_messages", messages, self.partitions["llm_messages"]))
