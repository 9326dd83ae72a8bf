"""Implausible numbers: nulled and flagged in their own row, counted, dead-lettered; never cost,
never a failed Parquet cast or checkpoint, never a neighbour's loss.

The same range of values goes through every door a number comes in by: tiny, typical, at the
bound, just past it, beyond int64, negative, NaN, infinite, 1e12, and text where a number
belongs. The normaliser is fed real OTLP protobuf requests made by the OTel SDK; the event
decoders JSON as other producers write it (Python's json writes NaN and Infinity); the snapshot
sink a buffer of 2,000 good rows and one hostile one.
"""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from streams_otlp_helpers import pricing, spans_payload, timed_span

from agentwatch.bounds import DEFAULT_BOUNDS, ValueBounds
from agentwatch.dashboards.metrics import PipelineMetrics
from agentwatch.detectors.registry import build_detectors
from agentwatch.events import GpuSample, LlmCall
from agentwatch.settings import Settings
from agentwatch.streams.dataflow import Dataflow, Record
from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.otlp import UndecodableRecord
from agentwatch.streams.partition_checkpoint import PartitionCheckpointStore
from agentwatch.streams.pipeline import (
    VALUE_REJECTED_REASON,
    SpanPipeline,
    decode_events,
    decode_events_checked,
    partition_for,
    value_rejection_dead_letters,
)
from agentwatch.streams.snapshots import SnapshotSink, query_snapshots

MAX_TOKENS = DEFAULT_BOUNDS.tokens[1]
GPT4O_IN, GPT4O_OUT = 2.50, 10.00  # USD per 1M tokens in the bundled pricing table
PARTITIONS = {"llm_calls": 2, "tool_calls": 2, "agent_steps": 2, "llm_messages": 2}
T0 = 1_700_000_000.0

# (value as the attribute carries it, the count it stands for or None, the reason when rejected)
TOKEN_CASES = [
    (0, 0, None),
    (1, 1, None),
    (1_234, 1_234, None),
    ("1234", 1_234, None),  # SDKs that report counts as text
    (1234.0, 1_234, None),
    (MAX_TOKENS, MAX_TOKENS, None),
    (MAX_TOKENS + 1, None, "above_max"),
    (2**63 - 1, None, "above_max"),  # the largest an OTLP int attribute can hold
    ("9223372036854775808", None, "above_max"),  # 2**63, as text
    (2.0**63, None, "above_max"),
    (10**12, None, "above_max"),
    (1e12, None, "above_max"),
    (-1, None, "below_min"),
    ("-1", None, "below_min"),
    (float("nan"), None, "nan"),
    ("nan", None, "nan"),
    (float("inf"), None, "infinite"),
    (float("-inf"), None, "infinite"),
    ("1e400", None, "infinite"),
    ("abc", None, "not_a_number"),
    (True, None, "not_a_number"),
    ([1, 2], None, "not_a_number"),
]


def _normalize_one(attrs, start_s=1.0, end_s=2.0, name="chat", normalizer=None):
    payload, _ = spans_payload(lambda tracer: timed_span(tracer, name, attrs, start_s, end_s))
    pipeline = SpanPipeline(normalizer or Normalizer(pricing()), PARTITIONS)
    return pipeline, pipeline.on_traces(payload)


def _chat(**attrs):
    return {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", **attrs}


# -- the normaliser (OTLP spans -> rows) ------------------------------------------------------

@pytest.mark.parametrize("value,count,reason", TOKEN_CASES)
def test_normaliser_token_counts_across_the_range(value, count, reason):
    _, outcome = _normalize_one(_chat(**{"gen_ai.usage.input_tokens": value,
                                         "gen_ai.usage.output_tokens": 100}))
    (row,) = outcome.batch.llm_call_rows
    (call,) = outcome.batch.llm_calls
    assert outcome.dead_letter_reason is None  # the span became its row either way
    assert row["output_tokens"] == 100 and row["latency_ms"] == 1000.0
    if reason is None:
        assert row["input_tokens"] == count and row["invalid_fields"] == ""
        assert row["cost_usd"] == pytest.approx((count * GPT4O_IN + 100 * GPT4O_OUT) / 1e6, rel=1e-12)
        assert outcome.rejections == []
        return
    # Nulled in the row, flagged, and the cost is not priced from it.
    assert row["input_tokens"] is None and row["cost_usd"] is None
    assert row["invalid_fields"] == f"input_tokens:{reason},cost_usd:from_invalid_tokens"
    assert row["priced"] is True  # the model is known; the count is what is missing
    (rejection,) = outcome.rejections
    assert (rejection.table, rejection.field, rejection.reason) == ("llm_calls", "input_tokens", reason)
    assert rejection.trace_id == row["trace_id"] and rejection.span_id == row["span_id"]
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(rejection.value)
    elif isinstance(value, list):
        assert rejection.value == "[1, 2]"
    else:
        assert rejection.value == value
    # The event the detectors and metrics see holds 0: nothing implausible adds up anywhere.
    assert (call.input_tokens, call.cost_usd, call.invalid_fields) == (0, 0.0, row["invalid_fields"])


@pytest.mark.parametrize("field,attribute", [
    ("output_tokens", "gen_ai.usage.output_tokens"),
    ("cache_read_tokens", "gen_ai.usage.cache_read.input_tokens"),
])
def test_every_priced_token_count_keeps_the_cost_out(field, attribute):
    _, outcome = _normalize_one(_chat(**{"gen_ai.usage.input_tokens": 100, attribute: 10**12}))
    (row,) = outcome.batch.llm_call_rows
    assert row[field] is None and row["input_tokens"] == 100 and row["cost_usd"] is None
    assert row["invalid_fields"] == f"{field}:above_max,cost_usd:from_invalid_tokens"


def test_an_implausible_reasoning_count_is_nulled_but_the_cost_stands():
    # Reasoning tokens are billed inside output_tokens: the price does not read them.
    _, outcome = _normalize_one(_chat(**{"gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 10,
                                         "gen_ai.usage.reasoning.output_tokens": -5}))
    (row,) = outcome.batch.llm_call_rows
    assert row["reasoning_tokens"] is None and row["invalid_fields"] == "reasoning_tokens:below_min"
    assert row["cost_usd"] == pytest.approx((100 * GPT4O_IN + 10 * GPT4O_OUT) / 1e6, rel=1e-12)


def test_a_cost_beyond_its_bound_is_nulled_with_plausible_counts():
    # 10M input and 10M output tokens of gpt-4o: 25 + 100 = $125, over a bound set at $100.
    normalizer = Normalizer(pricing(), value_bounds=ValueBounds(cost_usd=(0.0, 100.0)))
    _, outcome = _normalize_one(_chat(**{"gen_ai.usage.input_tokens": MAX_TOKENS,
                                         "gen_ai.usage.output_tokens": MAX_TOKENS}), normalizer=normalizer)
    (row,) = outcome.batch.llm_call_rows
    assert (row["input_tokens"], row["cost_usd"], row["invalid_fields"]) == (MAX_TOKENS, None, "cost_usd:above_max")
    (rejection,) = outcome.rejections
    assert rejection.value == pytest.approx(125.0)


@pytest.mark.parametrize("start_s,end_s,latency,reason", [
    (1.0, 1.0, 0.0, None),
    (1.0, 1.25, 250.0, None),
    (1.0, 1.0 + 86_400, 86_400_000.0, None),  # exactly one day: the default bound
    (1.0, 2.0 + 86_400, None, "above_max"),
    (5.0, 2.0, None, "below_min"),  # ends before it starts
    (0.0, T0, None, "above_max"),  # no start time: "latency" since 1970
])
def test_span_latency_across_the_range(start_s, end_s, latency, reason):
    payload, _ = spans_payload(lambda tracer: (
        timed_span(tracer, "chat", _chat(), start_s, end_s),
        timed_span(tracer, "execute_tool x", {"gen_ai.operation.name": "execute_tool",
                                              "gen_ai.tool.name": "x"}, start_s, end_s),
        timed_span(tracer, "invoke_agent a", {"gen_ai.operation.name": "invoke_agent"}, start_s, end_s)))
    outcome = SpanPipeline(Normalizer(pricing()), PARTITIONS).on_traces(payload)
    batch = outcome.batch
    rows = batch.llm_call_rows + batch.tool_call_rows + batch.agent_step_rows
    assert len(rows) == 3 and batch.failures == []
    for row in rows:
        assert row["latency_ms"] == (pytest.approx(latency) if latency is not None else None)
        assert row["invalid_fields"] == ("" if reason is None else f"latency_ms:{reason}")
    assert sorted(r.table for r in outcome.rejections) == ([] if reason is None else
                                                           ["agent_steps", "llm_calls", "tool_calls"])
    assert {r.reason for r in outcome.rejections} <= {reason}


def test_spans_outside_narrowed_timestamp_bounds_are_unmappable_not_rows():
    normalizer = Normalizer(pricing(), value_bounds=ValueBounds(timestamp_s=(1.5e9, 2e9)))
    payload, _ = spans_payload(lambda tracer: (timed_span(tracer, "chat", _chat(), T0, T0 + 1),
                                               timed_span(tracer, "chat", _chat(), 5.0, 2.0)))
    outcome = SpanPipeline(normalizer, PARTITIONS).on_traces(payload)
    assert [row["ts"] for row in outcome.batch.llm_call_rows] == [T0 + 1]
    assert "timestamp bounds" in outcome.dead_letter_reason
    # The unmappable span's negative latency was no row's value: not reported as one.
    assert outcome.rejections == []


def test_the_outcome_carries_rejections_the_caller_can_count_and_dead_letter():
    _, outcome = _normalize_one(_chat(**{"gen_ai.usage.input_tokens": "9223372036854775808",
                                         "gen_ai.usage.output_tokens": float("nan")}))
    # They cross the process boundary from the normaliser child intact.
    rejections = pickle.loads(pickle.dumps(outcome.rejections))
    assert [(r.field, r.reason) for r in rejections] == [("input_tokens", "above_max"), ("output_tokens", "nan")]

    registry = CollectorRegistry()
    PipelineMetrics(registry).observe_rejected_values(rejections)
    for field, reason in (("input_tokens", "above_max"), ("output_tokens", "nan")):
        assert registry.get_sample_value("agentwatch_values_rejected_total",
                                         {"table": "llm_calls", "field": field, "reason": reason}) == 1.0

    (letter,) = value_rejection_dead_letters(rejections, source_topic="otlp_spans")
    assert letter.reason.split(":")[0] == VALUE_REJECTED_REASON
    assert "llm_calls.input_tokens above_max" in letter.reason
    doc = json.loads(letter.value)  # strict JSON: no NaN, no integer beyond 64 bits
    assert doc["source_topic"] == "otlp_spans"
    assert [(d["field"], d["reason"], d["value"], d["value_type"]) for d in doc["rejections"]] == [
        ("input_tokens", "above_max", "9223372036854775808", "str"), ("output_tokens", "nan", "nan", "float")]
    assert letter.key == rejections[0].trace_id.encode()
    assert value_rejection_dead_letters([], source_topic="otlp_spans") == []


def test_dead_letters_are_split_by_size():
    _, outcome = _normalize_one(_chat(**{"gen_ai.usage.input_tokens": -1}))
    many = outcome.rejections * 50
    letters = value_rejection_dead_letters(many, source_topic="otlp_spans", max_bytes=2_000)
    assert len(letters) > 1 and all(len(letter.value) < 2_400 for letter in letters)
    assert sum(len(json.loads(letter.value)["rejections"]) for letter in letters) == 50


def test_normalised_rows_decode_without_being_rejected_twice():
    # The worker decodes what the normaliser wrote: a value nulled there reads 0, flagged, and
    # is not counted (or dead-lettered) a second time.
    _, outcome = _normalize_one(_chat(**{"gen_ai.usage.input_tokens": 10**12, "gen_ai.usage.output_tokens": 7}))
    (_, _, record), = [o for o in outcome.outputs if o[0] == "llm_calls"]
    decoded = decode_events_checked("llm_calls", record)
    assert decoded.rejections == [] and decoded.payload is record
    (call,) = decoded.events
    assert (call.input_tokens, call.output_tokens, call.cost_usd) == (0, 7, 0.0)
    assert call.invalid_fields == "input_tokens:above_max,cost_usd:from_invalid_tokens"


# -- the event decoders (records from any producer) -------------------------------------------

def _row(span_id: str, **fields) -> dict:
    return {"ts": T0, "trace_id": "t1", "span_id": span_id, "model": "gpt-4o", "input_tokens": 10,
            "output_tokens": 5, "cost_usd": 0.01, "priced": True, "latency_ms": 800.0, **fields}


DECODE_CASES = [  # (JSON text of the value, the count it stands for or None, reason)
    ("0", 0, None), ("1", 1, None), ("1234", 1_234, None), (str(MAX_TOKENS), MAX_TOKENS, None),
    ("1234.0", 1_234, None), (str(MAX_TOKENS + 1), None, "above_max"), (str(2**63), None, "above_max"),
    (str(2**64), None, "above_max"), ("1e12", None, "above_max"), ("1000000000000", None, "above_max"),
    ("-1", None, "below_min"), ("NaN", None, "nan"), ("Infinity", None, "infinite"),
    ("-Infinity", None, "infinite"), ("1e400", None, "infinite"), ('"12"', None, "not_a_number"),
    ('"abc"', None, "not_a_number"), ("true", None, "not_a_number"), ("null", None, "not_a_number"),
    ("[1]", None, "not_a_number"), ('{"n": 1}', None, "not_a_number"),
]


@pytest.mark.parametrize("text,count,reason", DECODE_CASES)
def test_decode_events_across_the_range(text, count, reason):
    neighbour = orjson.dumps(_row("ok")).decode()
    hostile = orjson.dumps(_row("bad")).decode().replace('"input_tokens":10', f'"input_tokens":{text}')
    payload = f"[{neighbour},{hostile}]".encode()
    decoded = decode_events_checked("llm_calls", payload)
    ok, bad = decoded.events
    assert ok == LlmCall(**_row("ok"))  # the neighbour is untouched
    if reason is None:
        assert (bad.input_tokens, bad.cost_usd, bad.invalid_fields) == (count, 0.01, "")
        assert decoded.rejections == []
        return
    assert (bad.input_tokens, bad.cost_usd) == (0, 0.0)
    assert bad.invalid_fields == f"input_tokens:{reason},cost_usd:from_invalid_tokens"
    assert bad.output_tokens == 5 and bad.latency_ms == 800.0
    (rejection,) = decoded.rejections
    assert (rejection.field, rejection.reason, rejection.span_id) == ("input_tokens", reason, "bad")
    # What is stored: the same rows with the value null and the field flagged; it decodes
    # again to the same events with nothing left to reject.
    stored = json.loads(decoded.payload)
    assert stored[0] == _row("ok") and stored[1]["input_tokens"] is None and stored[1]["cost_usd"] is None
    again = decode_events_checked("llm_calls", decoded.payload)
    assert again.events == decoded.events and again.rejections == []
    assert decode_events("llm_calls", payload) == decoded.events


@pytest.mark.parametrize("field,text,reason", [
    ("latency_ms", "-0.5", "below_min"), ("latency_ms", "86400000.5", "above_max"),
    ("latency_ms", "NaN", "nan"), ("cost_usd", "5000.01", "above_max"), ("cost_usd", "-0.01", "below_min"),
    ("cost_usd", "60000000", "above_max"),
])
def test_decode_events_bounds_latency_and_cost(field, text, reason):
    hostile = orjson.dumps(_row("bad")).decode().replace(f'"{field}":', f'"{field}":{text},"_was":')
    (event,) = decode_events_checked("llm_calls", hostile.encode()).events
    assert getattr(event, field) == 0.0 and event.invalid_fields == f"{field}:{reason}"
    assert event.input_tokens == 10  # a cost out of bounds does not make the counts wrong


def test_a_cost_rejected_on_its_own_keeps_its_reason_when_the_counts_are_rejected_too():
    hostile = orjson.dumps(_row("bad")).decode()
    hostile = hostile.replace('"cost_usd":', '"cost_usd":60000000,"_was":').replace('"input_tokens":', '"input_tokens":-3,"_was2":')
    decoded = decode_events_checked("llm_calls", hostile.encode())
    assert sorted((r.field, r.reason) for r in decoded.rejections) == [("cost_usd", "above_max"), ("input_tokens", "below_min")]
    (event,) = decoded.events
    # The flag says what was counted and dead-lettered, not the relabel for a cost priced from bad counts.
    assert sorted(event.invalid_fields.split(",")) == ["cost_usd:above_max", "input_tokens:below_min"]


@pytest.mark.parametrize("ts", ["-1", "1e300", "1.7e12", '"soon"', "NaN"])
def test_a_row_with_an_implausible_ts_is_dropped_alone(ts):
    neighbour = orjson.dumps(_row("ok")).decode()
    hostile = orjson.dumps(_row("bad")).decode().replace(f'"ts":{T0}', f'"ts":{ts}')
    decoded = decode_events_checked("llm_calls", f"[{neighbour},{hostile}]".encode())
    assert [e.span_id for e in decoded.events] == ["ok"]
    (rejection,) = decoded.rejections
    assert (rejection.field, rejection.span_id) == ("ts", "bad") and rejection.row
    assert [row["span_id"] for row in json.loads(decoded.payload)] == ["ok"]
    (letter,) = value_rejection_dead_letters(decoded.rejections, source_topic="llm_calls")
    assert json.loads(json.loads(letter.value)["rejections"][0]["row"])["span_id"] == "bad"


def test_gpu_samples_are_bounded_too():
    good = GpuSample(ts=T0, host="h", gpu=0, memory_used_bytes=80 * 2**30, memory_total_bytes=141 * 2**30,
                     utilization_pct=97.0, temperature_c=71.0, power_w=690.0)
    rows = [orjson.loads(orjson.dumps(good))] * 2 + [
        {**orjson.loads(orjson.dumps(good)), "memory_used_bytes": 2**63, "utilization_pct": 250.0},
        {**orjson.loads(orjson.dumps(good)), "pid": -3}]  # an identifier: no neutral value, dropped
    decoded = decode_events_checked("gpu_samples", json.dumps(rows).encode())
    assert decoded.events[:2] == [good, good]
    # an implausible device reading is no reading (None); a memory figure reads 0, flagged
    assert decoded.events[2].memory_used_bytes == 0 and decoded.events[2].utilization_pct is None
    assert decoded.events[2].invalid_fields == "memory_used_bytes:above_max,utilization_pct:above_max"
    assert len(decoded.events) == 3
    assert sorted((r.field, r.reason) for r in decoded.rejections) == [
        ("memory_used_bytes", "above_max"), ("pid", "below_min"), ("utilization_pct", "above_max")]


def test_records_that_do_not_have_the_events_shape_are_still_refused_whole():
    with pytest.raises(UndecodableRecord, match="missing required field `ts`"):
        decode_events_checked("llm_calls", b'[{"trace_id": "t", "span_id": "s", "input_tokens": -1}]')
    with pytest.raises(UndecodableRecord, match=r"^invalid JSON \("):
        decode_events_checked("llm_calls", b'[{"ts": NaN')


def test_decoders_follow_configured_bounds():
    payload = orjson.dumps([_row("a", input_tokens=20_000_000)])
    assert decode_events_checked("llm_calls", payload).rejections  # over the default 10M
    wide = ValueBounds(tokens=(0, 50_000_000))
    decoded = decode_events_checked("llm_calls", payload, wide)
    assert decoded.rejections == [] and decoded.events[0].input_tokens == 20_000_000


# -- configuration ----------------------------------------------------------------------------

def test_bounds_are_one_settings_field_read_from_json(monkeypatch):
    assert Settings().value_bounds == DEFAULT_BOUNDS
    monkeypatch.setenv("AGENTWATCH_VALUE_BOUNDS", '{"tokens": [0, 50000000], "cost_usd": [0, 100]}')
    bounds = Settings().value_bounds
    assert (bounds.tokens, bounds.cost_usd, bounds.latency_ms) == ((0, 50_000_000), (0.0, 100.0),
                                                                  DEFAULT_BOUNDS.latency_ms)


def test_bounds_in_use_still_travel_to_the_normaliser_process():
    bounds = ValueBounds(tokens=(0, 5))
    Normalizer(pricing(), value_bounds=bounds)  # builds (and caches) its checks
    assert pickle.loads(pickle.dumps(bounds)) == bounds


@pytest.mark.parametrize("override,message", [
    ('{"tokens": [10, 1]}', "min 10 is above max 1"),
    ('{"token": [0, 1]}', "Extra inputs are not permitted"),
    ('{"tokens": [0, 9223372036854775808]}', "within int64"),
    ('{"latency_ms": [0, 1e999]}', "finite"),
    ('{"timestamp_s": [0, 1e13]}', "timestamp_s"),
    ('{"tokens": "many"}', "tokens"),
])
def test_bad_bounds_stop_the_process_at_start_with_the_reason(monkeypatch, override, message):
    monkeypatch.setenv("AGENTWATCH_VALUE_BOUNDS", override)
    with pytest.raises(ValidationError, match="value_bounds") as caught:
        Settings()
    assert message in str(caught.value)


# -- the snapshot sink ------------------------------------------------------------------------

def _rows(n: int) -> list[dict]:
    return [orjson.loads(orjson.dumps(LlmCall(ts=T0 + i, trace_id=f"t{i}", span_id=f"s{i}", model="gpt-4o",
                                              input_tokens=i, cost_usd=i * 1e-6, priced=True)))
            for i in range(n)]


def _rejected_rows(root) -> list:
    files = sorted((root / "_rejected").glob("*.json"))
    rows = [row for f in files if not f.name.endswith(".reasons.json") for row in json.loads(f.read_text())]
    reasons = [r for f in files if f.name.endswith(".reasons.json") for r in json.loads(f.read_text())]
    assert len(reasons) == len(rows)
    return rows


def _count(root) -> int:
    return query_snapshots(root, "SELECT count(*) AS n FROM llm_calls").column("n")[0].as_py()


@pytest.mark.parametrize("field,value", [
    ("input_tokens", 2**63),  # what broke the cast: a count beyond BIGINT
    ("input_tokens", 2**64),
    ("input_tokens", "abc"),  # text that is no number at all
    ("input_tokens", "1e3"),  # a number DuckDB's BIGINT cast refuses: found by trial writes
    ("latency_ms", " 12 "),  # ditto for DOUBLE
    ("latency_ms", [1, 2]),
    ("ts", 1e300),
])
def test_one_hostile_row_among_2000_is_quarantined_alone(tmp_path, field, value):
    rows = _rows(2000)
    hostile = {**rows[777], "span_id": "hostile", field: value}
    sink = SnapshotSink(tmp_path, writer_id="w1", flush_rows=10**6)
    # As the worker buffers them: one record (a JSON array) per Kafka message.
    for start in range(0, 2000, 250):
        chunk = rows[start:start + 250] + ([hostile] if start == 750 else [])
        sink.add_payload("llm_calls", json.dumps(chunk).encode(), len(chunk))
    assert sink.flush(force=True) >= 1
    assert _count(tmp_path) == 2000
    assert sink.rows_written == {"llm_calls": 2000} and sink.rows_rejected == 1
    (kept,) = _rejected_rows(tmp_path)
    assert kept["span_id"] == "hostile"
    stored = query_snapshots(tmp_path, "SELECT span_id, input_tokens FROM llm_calls ORDER BY ts")
    assert stored.column("span_id").to_pylist() == [r["span_id"] for r in rows]  # order kept
    assert stored.column("input_tokens").to_pylist() == list(range(2000))


def test_several_hostile_rows_are_each_isolated(tmp_path):
    rows = _rows(500)
    for i, value in ((3, "1e1"), (250, "1e2"), (499, "1e3")):  # only trial writes find these
        rows[i] = {**rows[i], "output_tokens": value}
    sink = SnapshotSink(tmp_path, writer_id="w1")
    sink.add_rows("llm_calls", rows)
    sink.flush(force=True)
    assert _count(tmp_path) == 497
    assert sorted(r["output_tokens"] for r in _rejected_rows(tmp_path)) == ["1e1", "1e2", "1e3"]


def test_a_buffer_of_nothing_but_bad_rows_is_bounded_in_trial_writes(tmp_path):
    sink = SnapshotSink(tmp_path, writer_id="w1")
    sink.max_trial_writes = 8
    sink.add_rows("llm_calls", [{**row, "output_tokens": "1e3"} for row in _rows(300)])
    assert sink.flush(force=True) == 0
    assert len(_rejected_rows(tmp_path)) == 300 and sink.rows_rejected == 300


def test_the_decoders_payload_lands_whole_with_nulls_and_flags(tmp_path):
    rows = _rows(2000) + [{**_rows(1)[0], "span_id": "hostile", "input_tokens": 2**63}]
    decoded = decode_events_checked("llm_calls", json.dumps(rows).encode())
    sink = SnapshotSink(tmp_path, writer_id="w1")
    sink.add_payload("llm_calls", decoded.payload, len(decoded.events))
    sink.flush(force=True)
    assert _count(tmp_path) == 2001 and not (tmp_path / "_rejected").exists()
    flagged = query_snapshots(tmp_path, "SELECT input_tokens, cost_usd, invalid_fields FROM llm_calls "
                                        "WHERE invalid_fields <> ''").to_pylist()
    assert flagged == [{"input_tokens": None, "cost_usd": None,
                        "invalid_fields": "input_tokens:above_max,cost_usd:from_invalid_tokens"}]
    # SQL aggregates skip the null: the sum is what the plausible rows say.
    total = query_snapshots(tmp_path, "SELECT sum(input_tokens) AS n FROM llm_calls").column("n")[0].as_py()
    assert total == sum(range(2000))


def test_files_from_before_the_flags_column_still_read(tmp_path):
    import duckdb

    sink = SnapshotSink(tmp_path, writer_id="w1")
    sink.add_rows("llm_calls", _rows(3))
    sink.flush(force=True)
    # Rewrite the file as an older worker wrote it: without invalid_fields.
    (old,) = (tmp_path / "llm_calls").glob("hour=*/*.parquet")
    con = duckdb.connect()
    con.execute(f"COPY (SELECT * EXCLUDE (invalid_fields) FROM read_parquet('{old}')) TO '{old}.tmp' (FORMAT parquet)")
    old.unlink()
    (old.parent / f"{old.name}.tmp").rename(old)
    sink.add_rows("llm_calls", [{**_rows(4)[3], "input_tokens": None, "invalid_fields": "input_tokens:nan"}])
    sink.flush(force=True)
    got = query_snapshots(tmp_path, "SELECT invalid_fields FROM llm_calls ORDER BY ts").column(0).to_pylist()
    assert got == [None, None, None, "input_tokens:nan"]


def test_free_form_rows_with_an_unusable_ts_are_quarantined_alone(tmp_path):
    sink = SnapshotSink(tmp_path, writer_id="w1")
    alerts = [{"id": f"a{i}", "ts": T0 + i, "title": "x"} for i in range(5)]
    sink.add_rows("alerts", alerts + [{"id": "bad", "ts": "soon", "title": "y"}])
    sink.flush(force=True)
    n = query_snapshots(tmp_path, "SELECT count(*) AS n FROM alerts").column("n")[0].as_py()
    assert n == 5
    assert [r["id"] for r in _rejected_rows(tmp_path)] == ["bad"]


# -- detector state and checkpoints -----------------------------------------------------------

def _stateful_dataflow(tmp_path) -> Dataflow:
    return Dataflow(partitions={**PARTITIONS, "usage": 2}, build_detectors=build_detectors,
                    checkpoints=PartitionCheckpointStore(tmp_path, "agentwatch"))


def _huge(first: int) -> list[LlmCall]:
    # Beyond int64, by any path that does not check (an event built in code): the state then holds
    # integers beyond 64 bits, which the checkpoint's JSON encoder cannot write as they are.
    return [LlmCall(ts=T0 + 10 + i, trace_id="t1", span_id=f"h{i}", project="shop", model="gpt-4o",
                    input_tokens=2**64 + i, output_tokens=2**70, cost_usd=1.0, priced=True)
            for i in range(first, first + 3)]


def _states_of(dataflow: Dataflow) -> tuple[Any, Any]:
    return dataflow.trace_state(partition_for("t1", 2)), dataflow.keyed_state(partition_for("shop", 2))


def _feed_both(trace: Any, keyed: Any, events: list[LlmCall]) -> list[Any]:
    return trace.runner.process(events) + [f for r in keyed.runners.values() for f in r.process(events)]


def test_partition_checkpoints_survive_values_at_the_bound_and_beyond_int64(tmp_path):
    first = _stateful_dataflow(tmp_path)
    trace, keyed = _states_of(first)
    # At the bound, through the decoder the worker uses: accepted as real.
    at_bound = orjson.dumps([_row(f"b{i}", ts=T0 + i, input_tokens=MAX_TOKENS, output_tokens=MAX_TOKENS,
                                  project="shop") for i in range(3)])
    _feed_both(trace, keyed, decode_events("llm_calls", at_bound))
    _feed_both(trace, keyed, _huge(0))
    store = first.checkpoints
    docs = first.snapshot_states([trace, keyed])
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps([doc for _, doc in docs])
    for _ in range(2):  # not a one-off: every later save works too
        for state, doc in first.snapshot_states([trace, keyed]):
            store.save(state.stage, state.partition, store.encode(doc))
    assert store.saves == 4 and store.failures == 0 and store.wide_int_encodes >= 2
    assert sorted(store.stored()) == [("keyed", keyed.partition), ("trace", trace.partition)]

    restored = _stateful_dataflow(tmp_path)
    r_trace, r_keyed = _states_of(restored)
    assert restored.checkpoints.failures == 0 and not list(store.directory.glob("*.corrupt-*"))
    for before, after in ((trace, r_trace), (keyed, r_keyed)):
        assert orjson.loads(store.encode(after.state_snapshot())) == orjson.loads(store.encode(before.state_snapshot()))
    # And the restored detectors go on working.
    _feed_both(r_trace, r_keyed, decode_events("llm_calls", orjson.dumps([_row("after", ts=T0 + 20, project="shop")])))


def test_a_restored_partition_holding_them_goes_on_through_the_stage(tmp_path):
    first = _stateful_dataflow(tmp_path)
    _, keyed = _states_of(first)
    _feed_both(*_states_of(first), _huge(0))
    ((state, doc),) = first.snapshot_states([keyed])
    first.checkpoints.save(state.stage, state.partition, first.checkpoints.encode(doc))

    restored = _stateful_dataflow(tmp_path)
    usage = Record("usage", keyed.partition, 0, orjson.dumps([_row("next", ts=T0 + 30, project="shop")]),
                   key=b"llm_calls:project@llm_calls:0:9:0")
    out = restored.on_record(usage)
    assert out.dead_letters == 0 and restored.keyed_state(keyed.partition).restored_offsets == {}
    assert restored.keyed_state(keyed.partition).applied == {"project@llm_calls:0": (9, 0)}
