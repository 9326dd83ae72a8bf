"""OTLP record decoding: otlp_proto and otlp_json, traces and logs, and what is not OTLP."""

from __future__ import annotations

import json
import random

import pytest
from streams_otlp_helpers import hex_span_id, hex_trace_id, logs_payload, spans_payload, to_otlp_json

from agentwatch.streams.otlp import UndecodableRecord, any_value, attributes, decode_logs, decode_traces


def _two_spans(tracer):
    with tracer.start_as_current_span("invoke_agent planner", attributes={"gen_ai.operation.name": "invoke_agent"}):
        with tracer.start_as_current_span("chat gpt-4o", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                "gen_ai.usage.input_tokens": 120, "gen_ai.request.temperature": 0.5,
                "gen_ai.response.finish_reasons": ("stop", "length")}):
            pass


def _span_by_name(request):
    return {s.name: s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans}


def test_otlp_proto_traces_decode_with_ids_and_attributes():
    payload, finished = spans_payload(_two_spans)
    request = decode_traces(payload)
    spans = _span_by_name(request)
    assert set(spans) == {"invoke_agent planner", "chat gpt-4o"}
    chat, agent = spans["chat gpt-4o"], spans["invoke_agent planner"]
    assert chat.trace_id.hex() == hex_trace_id(finished["chat gpt-4o"])
    assert chat.span_id.hex() == hex_span_id(finished["chat gpt-4o"])
    assert chat.parent_span_id.hex() == hex_span_id(finished["invoke_agent planner"])
    assert agent.parent_span_id == b""
    attrs = attributes(chat.attributes)
    assert attrs["gen_ai.usage.input_tokens"] == 120
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.response.finish_reasons"] == ["stop", "length"]
    resource = attributes(request.resource_spans[0].resource.attributes)
    assert resource["service.name"] == "shop"


@pytest.mark.parametrize("indent,lead", [(None, ""), (2, ""), (2, "\n"), (4, "  \n"), (None, " "), (1, "\r\n\t")])
def test_otlp_json_traces_with_hex_ids_decode_to_the_same_request(indent, lead):
    payload, finished = spans_payload(_two_spans)
    record = to_otlp_json(payload, indent=indent, lead=lead)
    doc = json.loads(record)
    chat_json = next(s for s in doc["resourceSpans"][0]["scopeSpans"][0]["spans"] if s["name"] == "chat gpt-4o")
    # The record really is OTLP/JSON: hex ids, not protobuf-JSON base64.
    assert chat_json["spanId"] == hex_span_id(finished["chat gpt-4o"])
    assert chat_json["traceId"] == hex_trace_id(finished["chat gpt-4o"])
    assert record[:1] != b"{" or lead == ""
    assert decode_traces(record) == decode_traces(payload)


def test_otlp_json_accepts_integer_enums_and_string_int64_as_the_spec_writes_them():
    payload, _ = spans_payload(_two_spans)
    doc = json.loads(to_otlp_json(payload))
    for span in doc["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        span["kind"] = 1  # OTLP/JSON: enums as integers
        for kv in span["attributes"]:
            if "intValue" in kv["value"]:
                kv["value"]["intValue"] = str(kv["value"]["intValue"])
    request = decode_traces(json.dumps(doc).encode())
    chat = _span_by_name(request)["chat gpt-4o"]
    assert chat.kind == 1
    assert attributes(chat.attributes)["gen_ai.usage.input_tokens"] == 120


def _two_log_records():
    return [
        {"trace_id": 0xABC, "span_id": 0x12, "event_name": "gen_ai.user.message",
         "body": {"content": "where is my order?"}, "timestamp": 1_700_000_000 * 10**9},
        {"trace_id": 0xABC, "span_id": 0x12, "attributes": {"event.name": "gen_ai.choice"},
         "body": {"index": 0, "message": {"role": "assistant", "content": "on its way"}}},
    ]


def test_otlp_proto_logs_decode_with_event_name_and_kvlist_body():
    request = decode_logs(logs_payload(_two_log_records()))
    records = list(request.resource_logs[0].scope_logs[0].log_records)
    assert len(records) == 2
    assert records[0].event_name == "gen_ai.user.message"
    assert records[0].trace_id.hex() == f"{0xABC:032x}"
    assert records[0].span_id.hex() == f"{0x12:016x}"
    assert records[0].time_unix_nano == 1_700_000_000 * 10**9
    assert any_value(records[0].body) == {"content": "where is my order?"}
    assert any_value(records[1].body) == {"index": 0, "message": {"role": "assistant", "content": "on its way"}}
    assert attributes(records[1].attributes) == {"event.name": "gen_ai.choice"}


@pytest.mark.parametrize("indent,lead", [(None, ""), (2, "\n")])
def test_otlp_json_logs_decode_to_the_same_request(indent, lead):
    payload = logs_payload(_two_log_records())
    record = to_otlp_json(payload, kind="logs", indent=indent, lead=lead)
    assert json.loads(record)["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["traceId"] == f"{0xABC:032x}"
    assert decode_logs(record) == decode_logs(payload)


def test_a_traces_record_is_not_a_logs_record_in_json():
    payload, _ = spans_payload(_two_spans)
    with pytest.raises(UndecodableRecord, match="resourceLogs"):
        decode_logs(to_otlp_json(payload))


@pytest.mark.parametrize("payload,message", [
    (b"", "empty record"),
    (b"{}", "without 'resourceSpans'"),
    (b'{"resourceLogs": []}', "without 'resourceSpans'"),
    (b"[1, 2, 3]", "not OTLP protobuf"),
    (b'{"resourceSpans": [', "invalid JSON"),
    (b"\n  [1, 2]", "not OTLP"),
    (b'{"resourceSpans": "not a list"}', "invalid OTLP/JSON"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz", "startTimeUnixNano": "soon"}]}]}]}',
     "invalid OTLP/JSON"),
    (b"hello, this is not telemetry", "not OTLP"),
])
def test_non_otlp_records_are_undecodable_with_a_clear_message(payload, message):
    with pytest.raises(UndecodableRecord, match=message):
        decode_traces(payload)


def test_pretty_json_without_resource_spans_is_undecodable():
    with pytest.raises(UndecodableRecord, match="without 'resourceSpans'"):
        decode_traces(b'\n  {"resource": {}, "spans": []}\n')


@pytest.mark.parametrize("seed", range(25))
def test_random_garbage_bytes_are_undecodable(seed):
    garbage = random.Random(seed).randbytes(64)
    with pytest.raises(UndecodableRecord):
        decode_traces(garbage)
    with pytest.raises(UndecodableRecord):
        decode_logs(garbage)


def test_every_truncation_of_a_protobuf_record_is_undecodable():
    payload, _ = spans_payload(_two_spans)
    assert len(payload) > 100
    # Not one cut of a real record may pass for a smaller, valid batch.
    for cut in range(1, len(payload)):
        with pytest.raises(UndecodableRecord):
            decode_traces(payload[:cut])


def test_undecodable_is_a_value_error_so_callers_can_catch_either():
    assert issubclass(UndecodableRecord, ValueError)


def test_attributes_reads_every_value_kind_as_any_value_does():
    """The string fast path must not change what the other kinds, or an empty string, read as."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    values = {
        "text": AnyValue(string_value="gpt-4o"), "empty_text": AnyValue(string_value=""),
        "count": AnyValue(int_value=0), "tokens": AnyValue(int_value=120),
        "flag": AnyValue(bool_value=False), "ratio": AnyValue(double_value=0.5),
        "raw": AnyValue(bytes_value=b"\x00\x01"), "unset": AnyValue(),
        "list": AnyValue(array_value={"values": [AnyValue(string_value="stop"), AnyValue(int_value=2)]}),
        "map": AnyValue(kvlist_value={"values": [KeyValue(key="role", value=AnyValue(string_value="user"))]}),
    }
    kvs = [KeyValue(key=key, value=value) for key, value in values.items()]

    read = attributes(kvs)

    assert read == {key: any_value(value) for key, value in values.items()}
    assert read["empty_text"] == "" and read["unset"] is None and read["count"] == 0 and read["flag"] is False
    assert read["list"] == ["stop", 2] and read["map"] == {"role": "user"}
