"""SpanPipeline record handling: trace-id partitioning, dead letters, event-record codecs."""

from __future__ import annotations

import binascii
import json

import orjson
import pytest
from streams_otlp_helpers import hex_span_id, logs_payload, pricing, spans_payload, timed_span, to_otlp_json

from agentwatch.events import Finding, LlmCall, Severity, ToolCall
from agentwatch.streams import normalize as normalize_module
from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.otlp import UndecodableRecord
from agentwatch.streams.pipeline import (
    SpanPipeline,
    decode_event_rows,
    decode_events,
    encode_by_partition,
    merge_event_records,
    partition_for,
)

PARTITIONS = {"llm_calls": 4, "tool_calls": 3, "agent_steps": 5, "llm_messages": 2}
TRACES = 12


def _pipeline() -> SpanPipeline:
    return SpanPipeline(Normalizer(pricing()), PARTITIONS)


def _many_traces(tracer):
    for i in range(TRACES):  # each span without a parent opens its own trace
        root = timed_span(tracer, f"invoke_agent a{i}", {"gen_ai.operation.name": "invoke_agent"}, i, i + 5)
        chat = timed_span(tracer, f"chat {i}", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
                          i + 1, i + 2, parent=root)
        for j in range(2):
            timed_span(tracer, f"execute_tool {i}.{j}", {"gen_ai.operation.name": "execute_tool",
                                                         "gen_ai.tool.name": f"tool{j}"}, i + 2, i + 3, parent=chat)


def _oracle_partition(trace_id: str, partitions: int) -> int:
    # binascii.crc32 is the same CRC-32 as zlib's, computed by a different module
    return binascii.crc32(trace_id.encode("ascii")) % partitions


def test_partition_for_is_stable_crc32():
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    for partitions in (1, 2, 3, 7, 12, 64):
        assert partition_for(trace_id, partitions) == _oracle_partition(trace_id, partitions)
    # CRC-32 of "123456789" is the standard check value 0xCBF43926
    assert partition_for("123456789", 2**32) == 0xCBF43926


@pytest.mark.parametrize("as_json", [False, True])
def test_on_traces_partitions_every_event_of_a_trace_together(as_json):
    payload, spans = spans_payload(_many_traces)
    record = to_otlp_json(payload, indent=2, lead="\n") if as_json else payload
    outcome = _pipeline().on_traces(record)
    assert outcome.dead_letter_reason is None
    assert outcome.spans == TRACES * 4

    seen: dict[str, list[dict]] = {topic: [] for topic in PARTITIONS}
    partitions_used: dict[str, list[int]] = {topic: [] for topic in PARTITIONS}
    for topic, partition, value in outcome.outputs:
        rows = json.loads(value)
        assert isinstance(rows, list) and rows  # one JSON array per partition, never empty
        for row in rows:
            assert _oracle_partition(row["trace_id"], PARTITIONS[topic]) == partition
        seen[topic] += rows
        partitions_used[topic].append(partition)
    for topic, used in partitions_used.items():
        assert len(used) == len(set(used)), f"{topic}: two records for one partition"
    assert (len(seen["llm_calls"]), len(seen["tool_calls"]), len(seen["agent_steps"]), len(seen["llm_messages"])) == (
        TRACES, 2 * TRACES, TRACES, 0)
    # every event of a trace lands in the one partition its trace id picks, in every topic
    for topic in ("llm_calls", "tool_calls", "agent_steps"):
        by_trace: dict[str, set[int]] = {}
        for topic_name, partition, value in outcome.outputs:
            if topic_name == topic:
                for row in json.loads(value):
                    by_trace.setdefault(row["trace_id"], set()).add(partition)
        assert len(by_trace) == TRACES and all(len(p) == 1 for p in by_trace.values())
    expected_ids = {hex_span_id(s) for name, s in spans.items() if name.startswith("chat")}
    assert {row["span_id"] for row in seen["llm_calls"]} == expected_ids


def test_on_traces_output_is_the_same_for_the_same_record():
    payload, _ = spans_payload(_many_traces)
    first, second = _pipeline().on_traces(payload), _pipeline().on_traces(payload)
    assert sorted(first.outputs) == sorted(second.outputs)


@pytest.mark.parametrize("payload", [b"", b"\x00\x01garbage\xff", b'{"resourceLogs": []}', b"{oops"])
def test_undecodable_traces_record_is_dead_lettered(payload):
    outcome = _pipeline().on_traces(payload)
    assert outcome.dead_letter_reason.startswith("undecodable otlp_spans record: ")
    assert (outcome.outputs, outcome.spans, outcome.batch) == ([], 0, None)


def test_undecodable_logs_record_is_dead_lettered():
    outcome = _pipeline().on_logs(b'{"resourceSpans": []}')
    assert outcome.dead_letter_reason == (
        "undecodable otlp_logs record: JSON without 'resourceLogs': not an OTLP/JSON export request")
    assert outcome.outputs == []


def test_partial_failure_gives_outputs_and_a_dead_letter_reason(monkeypatch):
    real_status = normalize_module._status

    def failing_status(span, attrs):
        if span.name == "execute_tool 3.1":
            raise RuntimeError("boom")
        return real_status(span, attrs)

    monkeypatch.setattr(normalize_module, "_status", failing_status)
    payload, spans = spans_payload(_many_traces)
    outcome = _pipeline().on_traces(payload)
    failed_id = hex_span_id(spans["execute_tool 3.1"])
    assert outcome.dead_letter_reason == f"1 of {TRACES * 4} spans unmappable: span {failed_id}: RuntimeError: boom"
    counts = {topic: 0 for topic in PARTITIONS}
    for topic, _, value in outcome.outputs:
        counts[topic] += len(json.loads(value))
    assert counts == {"llm_calls": TRACES, "tool_calls": 2 * TRACES - 1, "agent_steps": TRACES, "llm_messages": 0}


def test_dead_letter_reason_lists_at_most_five_failures(monkeypatch):
    def always_failing(span, attrs):
        raise ValueError("nope")

    monkeypatch.setattr(normalize_module, "_status", always_failing)
    payload, _ = spans_payload(_many_traces)
    outcome = _pipeline().on_traces(payload)
    assert outcome.outputs == []
    assert outcome.dead_letter_reason.startswith(f"{TRACES * 4} of {TRACES * 4} spans unmappable: span ")
    assert outcome.dead_letter_reason.count("ValueError: nope") == 5


def test_on_logs_partitions_messages_by_trace_id():
    records = [{"trace_id": t, "span_id": 7, "event_name": "gen_ai.user.message", "body": {"content": f"q{t}"}}
               for t in range(1, 9)]
    outcome = _pipeline().on_logs(logs_payload(records))
    assert outcome.dead_letter_reason is None
    contents = []
    for topic, partition, value in outcome.outputs:
        assert topic == "llm_messages"
        for row in json.loads(value):
            assert _oracle_partition(row["trace_id"], 2) == partition
            contents.append(row["content"])
    assert sorted(contents) == sorted(f"q{t}" for t in range(1, 9))


def test_event_records_round_trip():
    events = [LlmCall(ts=1.5, trace_id=f"t{i}", span_id=f"s{i}", model="gpt-4o", cost_usd=0.25, priced=True)
              for i in range(6)]
    outputs = encode_by_partition("llm_calls", events, 3)
    decoded = [e for _, _, value in outputs for e in decode_events("llm_calls", value)]
    assert sorted(decoded, key=lambda e: e.trace_id) == events
    assert encode_by_partition("llm_calls", [], 3) == []

    finding = Finding(detector="loops", key="trace=t1", kind="tool_loop", severity=Severity.CRITICAL, ts=2.0,
                      value=5.0, threshold=3.0, evidence={"tool": "search"})
    (back,) = decode_events("findings", orjson.dumps(finding))
    assert back == finding and back.severity is Severity.CRITICAL


def test_merged_records_keep_every_row_in_partition_order_and_stay_under_the_size_limit():
    # Three input records' outputs, as the worker groups them: per (topic, partition) the rows
    # must come out in input order, the merged records must be valid JSON arrays, and no merged
    # record may pass the limit (one already over it travels alone).
    outputs = []
    for record in range(3):
        for partition in range(2):
            rows = [{"trace_id": f"r{record}p{partition}n{i}", "pad": "x" * 40} for i in range(4)]
            outputs.append(("llm_calls", partition, orjson.dumps(rows)))
    outputs.append(("tool_calls", 0, orjson.dumps([{"trace_id": "alone"}])))
    big = orjson.dumps([{"trace_id": "big", "pad": "y" * 2000}])
    outputs.append(("llm_calls", 1, big))
    limit = 1000
    merged = merge_event_records(outputs, limit)

    def ids(records, topic, partition):
        return [row["trace_id"] for t, p, value in records if (t, p) == (topic, partition)
                for row in orjson.loads(value)]

    for topic, partition in (("llm_calls", 0), ("llm_calls", 1), ("tool_calls", 0)):
        assert ids(merged, topic, partition) == ids(outputs, topic, partition)
    assert len(merged) < len(outputs)
    assert all(len(value) <= limit for _, _, value in merged if value != big)
    assert ("llm_calls", 1, big) in merged


def test_rows_from_a_newer_producer_ignore_unknown_keys():
    payload = b'{"ts": 1.0, "trace_id": "t", "span_id": "s", "tool_name": "x", "added_later": 1}'
    assert decode_events("tool_calls", payload) == [ToolCall(ts=1.0, trace_id="t", span_id="s", tool_name="x")]


def test_event_records_decode_to_the_same_events_as_the_normaliser_rows():
    # The worker decodes what the normaliser encoded: every field must come back equal, typed.
    # Demo agent traffic fills every field kind (tokens, cost, prompts, tool definitions).
    from bench.runner import make_records

    (payload,) = make_records(1, spans_per_record=300)
    outcome = _pipeline().on_traces(payload)
    assert {table for table, _, _ in outcome.outputs} == {"llm_calls", "tool_calls", "agent_steps"}
    for table, _, value in outcome.outputs:
        rows = orjson.loads(value)
        events = decode_events(table, value)
        assert [type(e).__name__ for e in events] == [type(events[0]).__name__] * len(rows)
        assert [orjson.loads(orjson.dumps(e)) for e in events] == rows


@pytest.mark.parametrize("payload,message", [
    (b"not json", "invalid JSON"),
    (b"", "invalid JSON"),
    (b"42", "expected a JSON array of event objects"),
    (b'"text"', "expected a JSON array of event objects"),
    (b'[{"ts": 1}, 2]', "expected a JSON array of event objects"),
    (b"[[]]", "expected a JSON array of event objects"),
])
def test_decode_event_rows_errors(payload, message):
    with pytest.raises(UndecodableRecord, match=message):
        decode_event_rows(payload)


def test_decode_event_rows_accepts_an_empty_array():
    assert decode_event_rows(b"[]") == []


@pytest.mark.parametrize("table,payload,where", [
    ("llm_calls", b'[{"trace_id": "t", "span_id": "s"}]', "missing required field `ts`"),
    ("tool_calls", b'[{"ts": 1.0, "trace_id": "t", "span_id": "s"}, {"ts": 2.0}]', "at `$[1]`"),
    # A type the detectors would trip over later is refused here, with the field's path (a
    # number field that holds no number is nulled in its row instead: test_value_bounds.py).
    ("llm_calls", b'[{"ts": 1.0, "trace_id": "t", "span_id": "s", "model": 12}]',
     "at `$[0].model`"),
    ("findings", b'[{"detector": "d", "key": "k", "kind": "x", "severity": "apocalyptic", "ts": 1.0,'
                 b' "value": 1.0, "threshold": 0.5}]', "severity"),
    ("llm_calls", b'[{"ts": 1.0, "trace_id": "t", "span_id": "s"}, 2]', "at `$[1]`"),
])
def test_decode_events_errors_name_the_record_type_and_the_place(table, payload, where):
    with pytest.raises(UndecodableRecord, match="rows do not match") as caught:
        decode_events(table, payload)
    assert where in str(caught.value)


@pytest.mark.parametrize("payload", [b"not json", b"", b'[{"ts": 1.0'])
def test_decode_events_tells_malformed_json_from_rows_that_do_not_fit(payload):
    with pytest.raises(UndecodableRecord, match=r"^invalid JSON \("):
        decode_events("llm_calls", payload)
