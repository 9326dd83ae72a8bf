"""What a worker does with one Kafka record, without Faust: decode, normalise, route, encode.

The Faust agents in :mod:`agentwatch.streams.app` are thin loops over these methods, so the same
code runs in tests and in the benchmark's in-process measurements.
"""

from __future__ import annotations

import json
import math
import operator
import zlib
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import msgspec
import orjson

from agentwatch.bounds import (DEFAULT_BOUNDS, FROM_INVALID_TOKENS, INT64_MAX, INT64_MIN,
                               PRICED_TOKEN_FIELDS, TableLimits, ValueBounds, ValueRejection, check_number,
                               format_flags, keepable, parse_flags)
from agentwatch.events import EVENT_BY_TABLE, ToolDeclaration
from agentwatch.streams.normalize import NormalizedBatch, Normalizer
from agentwatch.streams.otlp import UndecodableRecord, decode_logs, decode_traces


@dataclass
class RecordOutcome:
    """What one input record produced: output records per (topic, partition), or a dead letter.

    ``rejections`` are the implausible values nulled in the output rows (the rows still went
    out): the caller counts them and dead-letters them with :func:`value_rejection_dead_letters`.
    """

    outputs: list[tuple[str, int, bytes]] = field(default_factory=list)
    dead_letter_reason: str | None = None
    spans: int = 0
    batch: NormalizedBatch | None = None
    rejections: list[ValueRejection] = field(default_factory=list)
    # PiiDetection rows: what the redactor found (and replaced) in this record's texts.
    pii_rows: list[dict[str, Any]] = field(default_factory=list)
    # SpanCoverage rows: services with spans the normaliser did not recognise.
    coverage_rows: list[dict[str, Any]] = field(default_factory=list)
    # Evaluation rows: the gen_ai.evaluation.result events among this record's spans or logs.
    evaluation_rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record for the dead-letter topic: key, JSON value, and the reason for its header."""

    key: bytes
    value: bytes
    reason: str


# The short code (before the colon) the worker labels its dead-letter counter with.
VALUE_REJECTED_REASON = "implausible values"


def value_rejection_dead_letters(rejections: Sequence[ValueRejection], *, source_topic: str,
                                 max_bytes: int = 1_000_000) -> list[DeadLetter]:
    """Dead-letter records for the values one input record had rejected (none when none).

    Each record's value is JSON::

        {"kind": "value_rejections", "source_topic": "otlp_spans",
         "rejections": [{"table": "llm_calls", "field": "input_tokens", "reason": "above_max",
                         "value": "9223372036854775808", "value_type": "int",
                         "trace_id": "...", "span_id": "...", "row": "<the dropped row, JSON>"}]}

    ``value`` is the original value as received; a number JSON cannot hold exactly (beyond
    int64, NaN, infinite) is written as text, ``value_type`` saying what it was. ``row`` is
    present only where the whole row was dropped (an implausible ``ts``, GPU index or pid).
    Values are batched into records of at most about ``max_bytes``, keyed by the first trace id.
    """
    out: list[DeadLetter] = []
    items: list[bytes] = []
    reasons: Counter[str] = Counter()
    size = 0
    first_trace = ""

    def flush() -> None:
        head = orjson.dumps({"kind": "value_rejections", "source_topic": source_topic})[:-1]
        value = head + b',"rejections":[' + b",".join(items) + b"]}"
        shown = ", ".join(f"{n}x {what}" for what, n in reasons.most_common(5))
        more = "" if len(reasons) <= 5 else f", {len(reasons) - 5} more kinds"
        out.append(DeadLetter(first_trace.encode("utf-8", "replace"), value,
                              f"{VALUE_REJECTED_REASON}: {len(items)} from {source_topic} ({shown}{more})"))

    for rejection in rejections:
        item = dumps_lenient(_rejection_doc(rejection))
        if items and size + len(item) > max_bytes:
            flush()
            items, reasons, size = [], Counter(), 0
        if not items:
            first_trace = rejection.trace_id
        items.append(item)
        reasons[f"{rejection.table}.{rejection.field} {rejection.reason}"] += 1
        size += len(item) + 1
    if items:
        flush()
    return out


def _rejection_doc(rejection: ValueRejection) -> dict[str, Any]:
    value = rejection.value
    doc = {"table": rejection.table, "field": rejection.field, "reason": rejection.reason,
           "value": _json_scalar(value), "value_type": type(value).__name__,
           "trace_id": rejection.trace_id, "span_id": rejection.span_id}
    if rejection.row:
        doc["row"] = rejection.row
    return doc


def _json_scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # "nan", "inf", "-inf"
    return repr(value)


def partition_for(key: str, partitions: int) -> int:
    """Stable partitioning: every event of a trace (or finding of a condition) meets the same state."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions  # a lone surrogate is data too


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


@dataclass
class DecodedEvents:
    """An event-topic record, decoded and checked against the value bounds.

    ``events`` are typed (a nulled value reads 0, its field named in ``invalid_fields``);
    ``rejections`` the values nulled (or rows dropped) here, to count and dead-letter;
    ``payload`` what to store for the record: the input itself when nothing was rejected, else
    the rows re-encoded with the rejected values null and flagged (and dropped rows left out).
    """

    events: list[Any]
    rejections: list[ValueRejection]
    payload: bytes


def decode_events(table: str, payload: bytes, bounds: ValueBounds | None = None) -> list[Any]:
    """The typed events of an event-topic record (a JSON array of objects, or one object).

    JSON is parsed straight into the event dataclasses and checked against their field types in
    one C pass (msgspec): a quarter of the cost of parsing to dicts and calling the constructor,
    which never checked types. Unknown keys are ignored (a newer producer may add fields); a
    missing required field or a wrong type of a text field names the path, e.g. ``$[3].model``.

    Numbers are checked against ``bounds`` (see :func:`decode_events_checked`, which also
    returns what was rejected, for counting and dead-lettering).
    """
    return decode_events_checked(table, payload, bounds).events


def decode_events_checked(table: str, payload: bytes, bounds: ValueBounds | None = None) -> DecodedEvents:
    """:func:`decode_events` with the rejections and the record to store.

    A record from another producer may carry any number: a bounded field outside its bounds,
    NaN/Infinity (non-standard JSON, as Python's ``json`` writes it) or a non-number is nulled
    and flagged in its row alone; a row whose ``ts`` (or GPU index, pid) is implausible is
    dropped alone. Only a record that is not JSON, or whose rows do not have the event's shape
    (a missing required field, a text field that is not text), is refused whole
    (:class:`UndecodableRecord`). Records whose numbers are all plausible take the one-pass path.
    """
    limits = (bounds or DEFAULT_BOUNDS).limits(table)
    decoder = _EVENT_DECODERS.get(table)
    if decoder is None:
        cls = EVENT_BY_TABLE[table]
        decoder = _EVENT_DECODERS[table] = msgspec.json.Decoder(list[cls] | cls)  # type: ignore[valid-type]
    try:
        decoded = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        if not limits:
            raise UndecodableRecord(f"rows do not match {EVENT_BY_TABLE[table].__name__}: {exc}") from exc
        return _decode_checking_rows(table, payload, limits)
    except msgspec.DecodeError as exc:  # not JSON at all, or JSON with NaN/Infinity
        if not limits:
            raise UndecodableRecord(f"invalid JSON ({exc})") from exc
        return _decode_checking_rows(table, payload, limits, exc)
    events = decoded if isinstance(decoded, list) else [decoded]
    if limits and not all(map(limits.within, events)):
        return _decode_checking_rows(table, payload, limits)
    return DecodedEvents(events, [], payload)


_FIELD_NAMES: dict[str, tuple[str, ...]] = {}


def _decode_checking_rows(table: str, payload: bytes, limits: TableLimits,
                          decode_error: Exception | None = None) -> DecodedEvents:
    """The per-row path: parse to dicts, null or drop what is implausible, then type-check."""
    cls = EVENT_BY_TABLE[table]
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        try:  # NaN, Infinity, 1e400: not JSON, but what Python's json writes; salvage the rows
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            raise UndecodableRecord(f"invalid JSON ({decode_error or exc})") from exc
    rows = doc if isinstance(doc, list) else [doc]
    rejections: list[ValueRejection] = []
    kept: list[Any] = []
    typed: list[Any] = []
    changed = False
    for row in rows:
        if not isinstance(row, dict):
            kept.append(row)
            typed.append(row)  # msgspec names it below
            continue
        checked = _check_row(table, row, limits, rejections)
        if checked is None:
            changed = True
            continue
        stored, typed_row, row_changed = checked
        changed |= row_changed
        kept.append(stored)
        typed.append(typed_row)
    try:
        events = msgspec.convert(typed, list[cls])  # type: ignore[valid-type]
    except msgspec.ValidationError as exc:
        raise UndecodableRecord(f"rows do not match {cls.__name__}: {exc}") from exc
    if changed:
        names = _FIELD_NAMES.get(table)
        if names is None:
            names = _FIELD_NAMES[table] = tuple(f.name for f in fields(cls))
        # Known fields only: every number among them is bounded now.
        payload = dumps_lenient([{k: row[k] for k in names if k in row} for row in kept])
    return DecodedEvents(events, rejections, payload)


def _check_row(table: str, row: dict[str, Any], limits: TableLimits, rejections: list[ValueRejection]
               ) -> tuple[dict[str, Any], dict[str, Any], bool] | None:
    """(row to store, row to type, whether the stored row changed); None when it is dropped."""
    trace_id, span_id = _id_text(row.get("trace_id")), _id_text(row.get("span_id"))
    typed = dict(row)
    for limit in limits.row:
        if limit.name not in row:
            continue  # a missing ts is a shape error msgspec names; gpu/pid default to 0
        value = row[limit.name]
        number, reason = check_number(value, limit.low, limit.high, limit.integral)
        if reason is not None:
            # Nothing to null an identifier to: the row goes to the dead letters whole.
            rejections.append(ValueRejection(table, limit.name, reason, keepable(value), trace_id, span_id,
                                             row=dumps_lenient(row).decode()))
            return None
        typed[limit.name] = number
    earlier = parse_flags(row.get("invalid_fields"))
    new: dict[str, str] = {}
    for limit in limits.nullable:
        name = limit.name
        if name not in row:
            continue
        value = row[name]
        if value is None and (name in earlier or limit.optional):
            typed[name] = limit.placeholder  # nulled and counted where the row was made, or not reported
            continue
        number, reason = check_number(value, limit.low, limit.high, limit.integral)
        if reason is None:
            typed[name] = number
            continue
        new[name] = reason
        typed[name] = limit.placeholder
        rejections.append(ValueRejection(table, name, reason, keepable(value), trace_id, span_id))
    if table == "llm_calls" and row.get("cost_usd") is not None and "cost_usd" not in new and (
            not new.keys().isdisjoint(PRICED_TOKEN_FIELDS) or not earlier.keys().isdisjoint(PRICED_TOKEN_FIELDS)):
        # Priced from a count that is not one. A cost already rejected on its own keeps that
        # reason: it was counted and dead-lettered as such.
        new["cost_usd"] = FROM_INVALID_TOKENS
        typed["cost_usd"] = 0.0
    if not new:
        return row, typed, False
    stored = dict(row)
    for name in new:
        stored[name] = None
    stored["invalid_fields"] = typed["invalid_fields"] = format_flags({**earlier, **new})
    return stored, typed, True


def _id_text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def dumps_lenient(value: Any) -> bytes:
    """JSON for whatever a record held: orjson, or Python's json where orjson refuses (integers
    beyond 64 bits, NaN, a lone surrogate a lenient parse let in)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError included
        return json.dumps(value, default=repr).encode()


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
        outcome = RecordOutcome(spans=batch.spans, batch=batch, rejections=batch.rejections,
                                pii_rows=batch.pii_rows, evaluation_rows=batch.evaluation_rows,
                                coverage_rows=batch.coverage_rows)
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
        pii_rows: list[dict[str, Any]] = []
        evaluation_rows: list[dict[str, Any]] = []
        _, messages = self.normalizer.normalize_logs(request, pii_rows, evaluation_rows)
        outputs = encode_by_partition("llm_messages", messages, self.partitions["llm_messages"])
        # Tools declared only on a log record reach the trace stage, which judges the trace's calls.
        declarations = [ToolDeclaration(ts=m.ts, trace_id=m.trace_id, span_id=m.span_id, service=m.service,
                                        tool_definitions=m.content)
                        for m in messages if m.role == "tool_definitions" and m.content not in ("", "[]")]
        if declarations and "tool_declarations" in self.partitions:
            outputs += encode_by_partition("tool_declarations", declarations, self.partitions["tool_declarations"])
        return RecordOutcome(outputs=outputs, pii_rows=pii_rows, evaluation_rows=evaluation_rows)
