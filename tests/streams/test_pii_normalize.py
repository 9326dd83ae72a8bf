"""Redaction where text leaves the normaliser: every free-text field of every row, counted per
field and type, cut only after redaction, JSON kept valid; hash and per-project modes; dead
letters masked in place; the map stage's pii_detections rows and usage events."""

from __future__ import annotations

import json

import orjson
import pytest

from agentwatch.bounds import ValueBounds
from agentwatch.broker import DEFAULT_TOPICS
from agentwatch.streams.dataflow import Dataflow, Record
from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.otlp import decode_logs, decode_traces
from agentwatch.streams.pii import PiiPolicy, Redactor
from agentwatch.streams.pipeline import SpanPipeline
from agentwatch.streams.pricing import PricingTable
from tests.support.dataflow_testing import Ids, LogSpec, SpanSpec, otlp_logs, otlp_traces

EMAIL = "minsu.kim@example.co.kr"
CARD = "4111 1111 1111 1111"
RRN = "900101-1234568"
API_KEY = "sk-proj-Q7vY2mXk9LpR4tW8zN3bH6cJ"
RAW = (EMAIL, CARD, RRN, API_KEY)


def normalizer(policy: PiiPolicy | None = None, **kwargs) -> Normalizer:
    return Normalizer(PricingTable.load(), redactor=Redactor(policy or PiiPolicy()), **kwargs)


def llm_span(ids: Ids, trace: bytes, prompt: str, response: str = "ok", project: str = "shop",
             **attributes) -> SpanSpec:
    return SpanSpec(trace, ids.span(), "chat gpt-4o", 100.0, 101.0, {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 5,
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": prompt}]}]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": response}]}]),
        **attributes}, resource=(("service.name", "shop"), ("agentwatch.project", project)))


def tool_span(ids: Ids, trace: bytes, arguments: str, result: str) -> SpanSpec:
    return SpanSpec(trace, ids.span(), "execute_tool lookup", 100.0, 100.5, {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup",
        "gen_ai.tool.call.arguments": arguments, "gen_ai.tool.call.result": result},
        resource=(("service.name", "shop"), ("agentwatch.project", "shop")))


def test_every_text_field_is_redacted_and_counted_by_field_and_type():
    ids = Ids(1)
    trace = ids.trace()
    request = otlp_traces([
        llm_span(ids, trace, f"my email is {EMAIL}, card {CARD}", response=f"Saved {EMAIL}. Key {API_KEY}"),
        tool_span(ids, trace, json.dumps({"rrn": RRN, "email": EMAIL}), f"found {RRN}"),
    ])
    batch = normalizer().normalize_traces(decode_traces(request))
    call, tool = batch.llm_call_rows[0], batch.tool_call_rows[0]
    assert call["prompt"] == "my email is <EMAIL>, card <CREDIT_CARD>"
    assert call["response"] == "Saved <EMAIL>. Key <SECRET>"
    assert json.loads(tool["arguments"]) == {"rrn": "<KR_RRN>", "email": "<EMAIL>"}  # still JSON
    assert tool["result"] == "found <KR_RRN>"
    counted = sorted((r["field"], r["entity_type"], r["count"], r["span_id"]) for r in batch.pii_rows)
    assert counted == sorted([
        ("llm_calls.prompt", "EMAIL", 1, call["span_id"]), ("llm_calls.prompt", "CREDIT_CARD", 1, call["span_id"]),
        ("llm_calls.response", "EMAIL", 1, call["span_id"]), ("llm_calls.response", "SECRET", 1, call["span_id"]),
        ("tool_calls.arguments", "KR_RRN", 1, tool["span_id"]), ("tool_calls.arguments", "EMAIL", 1, tool["span_id"]),
        ("tool_calls.result", "KR_RRN", 1, tool["span_id"])])
    assert {r["project"] for r in batch.pii_rows} == {"shop"} and {r["service"] for r in batch.pii_rows} == {"shop"}
    assert all(r["trace_id"] == trace.hex() for r in batch.pii_rows)
    assert not any(raw in orjson.dumps([call, tool, batch.pii_rows]).decode() for raw in RAW)


def test_an_error_message_and_a_log_record_body_are_redacted():
    ids = Ids(2)
    trace, span = ids.trace(), ids.span()
    failing = SpanSpec(trace, span, "execute_tool pay", 1.0, 2.0, {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "pay",
        "error.type": f"card {CARD} declined"})
    batch = normalizer().normalize_traces(decode_traces(otlp_traces([failing])))
    assert CARD not in batch.tool_call_rows[0]["error"]
    rows: list[dict] = []
    _, messages = normalizer().normalize_logs(
        decode_logs(otlp_logs([LogSpec(trace, span, 3.0, body=f"reach me at {EMAIL}")])), rows)
    assert messages[0].content == "reach me at <EMAIL>"
    assert [(r["field"], r["entity_type"], r["count"]) for r in rows] == [("llm_messages.content", "EMAIL", 1)]


@pytest.mark.parametrize("offset", [40, 55, 64, 70])
def test_an_entity_cut_by_the_text_limit_never_leaves_a_part_behind(offset):
    # Redacted before it is cut: a cut first would leave "minsu.kim@exam", which no recogniser knows.
    prompt = "x" * offset + " " + EMAIL + " tail " + "y" * 600
    row = normalizer(max_text_chars=64).normalize_traces(
        decode_traces(otlp_traces([llm_span(Ids(3), Ids(3).trace(), prompt)]))).llm_call_rows[0]
    assert len(row["prompt"]) <= 64
    assert "minsu" not in row["prompt"] and "example" not in row["prompt"]


def test_off_keeps_texts_and_counts_nothing():
    ids = Ids(4)
    request = otlp_traces([llm_span(ids, ids.trace(), f"mail {EMAIL}")])
    batch = Normalizer(PricingTable.load(), redactor=Redactor(PiiPolicy(default_mode="off"))).normalize_traces(
        decode_traces(request))
    assert batch.llm_call_rows[0]["prompt"] == f"mail {EMAIL}" and batch.pii_rows == []


def test_hash_mode_gives_one_token_per_value_and_per_project_overrides_apply():
    policy = PiiPolicy(default_mode="redact", projects={"analytics": {"EMAIL": "hash"}}, hash_key=b"k" * 32)
    ids = Ids(5)
    spans = [llm_span(ids, ids.trace(), f"mail {EMAIL}", project="analytics"),
             llm_span(ids, ids.trace(), f"again {EMAIL}", project="analytics"),
             llm_span(ids, ids.trace(), "mail other.person@example.com", project="analytics"),
             llm_span(ids, ids.trace(), f"mail {EMAIL}", project="shop")]
    rows = normalizer(policy).normalize_traces(decode_traces(otlp_traces(spans))).llm_call_rows
    first, again, other, shop = (r["prompt"].split()[-1] for r in rows)
    assert first.startswith("<EMAIL:") and first == again and other != first
    assert shop == "<EMAIL>"
    rekeyed = normalizer(PiiPolicy(projects={"analytics": {"EMAIL": "hash"}}, hash_key=b"other-key" * 4))
    assert rekeyed.normalize_traces(decode_traces(otlp_traces(spans[:1]))).llm_call_rows[0]["prompt"] != rows[0]["prompt"]


def dataflow(policy: PiiPolicy | None = None, **normalizer_args) -> Dataflow:
    from agentwatch.detectors.registry import build_detectors

    redactor = Redactor(policy or PiiPolicy())
    mapper = SpanPipeline(Normalizer(PricingTable.load(), redactor=redactor, **normalizer_args), DEFAULT_TOPICS)
    return Dataflow(partitions=DEFAULT_TOPICS, build_detectors=build_detectors, mapper=mapper, redactor=redactor)


def test_the_map_stage_writes_pii_rows_with_the_record_and_forwards_them_by_service():
    ids = Ids(6)
    request = otlp_traces([llm_span(ids, ids.trace(), f"mail {EMAIL} card {CARD}")])
    out = dataflow().on_record(Record("otlp_spans", 0, 7, request))
    pii = [r for r in out.rows if r.table == "pii_detections"]
    assert len(pii) == 1 and pii[0].count == 2
    assert sorted(r["entity_type"] for r in orjson.loads(pii[0].payload)) == ["CREDIT_CARD", "EMAIL"]
    usage = [s for s in out.sends if s.topic == "usage" and s.key.startswith(b"pii_detections:")]
    assert usage and all(s.key.decode().startswith("pii_detections:service@otlp_spans:0:7:") for s in usage)
    for send in out.sends:
        assert not any(raw.encode() in send.value for raw in (EMAIL, CARD))


def test_a_dead_letter_keeps_its_length_and_decodes_but_holds_no_detected_value():
    ids = Ids(7)
    good = llm_span(ids, ids.trace(), f"mail {EMAIL}")
    unmappable = SpanSpec(ids.trace(), ids.span(), "chat", 1.0, 2.0, {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
        "gen_ai.input.messages": json.dumps([{"role": "user", "content": f"card {CARD}"}])})
    request = otlp_traces([good, unmappable])
    # A span ending outside the timestamp bounds cannot become a row: the record is dead-lettered whole.
    flow = dataflow(value_bounds=ValueBounds(timestamp_s=(50.0, 1e10)))
    out = flow.on_record(Record("otlp_spans", 0, 1, request))
    letters = [s for s in out.sends if s.topic == "dead_letter"]
    assert len(letters) == 1
    assert len(letters[0].value) == len(request)
    assert CARD.encode() not in letters[0].value and EMAIL.encode() not in letters[0].value
    decoded = decode_traces(letters[0].value)  # still a valid request, values masked
    assert sum(len(ss.spans) for rs in decoded.resource_spans for ss in rs.scope_spans) == 2


def test_a_text_redacted_from_the_memo_is_still_counted_per_occurrence_and_per_project_policy():
    # Agents re-send the user's prompt with every call: long texts are redacted once, from the memo
    # after that, and every occurrence is still counted under its own project's modes.
    policy = PiiPolicy(projects={"analytics": {"EMAIL": "hash"}}, hash_key=b"k" * 32)
    long_prompt = "please look up my order history " * 10 + EMAIL
    ids = Ids(8)
    spans = [llm_span(ids, ids.trace(), long_prompt, project=p) for p in ("shop", "shop", "analytics")]
    norm = normalizer(policy)
    batch = norm.normalize_traces(decode_traces(otlp_traces(spans)))
    prompts = [r["prompt"] for r in batch.llm_call_rows]
    assert prompts[0] == prompts[1] and prompts[0].endswith("<EMAIL>")
    assert prompts[2].split()[-1].startswith("<EMAIL:")
    assert [(r["project"], r["entity_type"]) for r in batch.pii_rows] == [
        ("shop", "EMAIL"), ("shop", "EMAIL"), ("analytics", "EMAIL")]
    assert len(norm.memos()["redactions"]) == 2
