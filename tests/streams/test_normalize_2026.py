"""The 2026 GenAI names and tool arguments as frameworks record them (issue 16, parts 1 and 3).

Prices used below (streams/pricing.json, USD per 1M tokens): claude-3-5-sonnet 3.00 in / 15.00
out / 0.30 cache read / 3.75 cache write; gpt-4o 2.50 / 10.00 / 1.25, no cache-write price.
"""

from __future__ import annotations

import json

import pytest
from streams_otlp_helpers import SECOND, logs_payload, normalize, pricing, spans_payload, timed_span

from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.otlp import decode_logs, decode_traces
from agentwatch.streams.pipeline import SpanPipeline


def _one(items):
    assert len(items) == 1, items
    return items[0]


def _llm(attrs, name="chat m", events=()):
    def build(tracer):
        span = tracer.start_span(name, attributes=dict(attrs), start_time=100 * SECOND)
        for event_name, event_attrs, at in events:
            span.add_event(event_name, attributes=event_attrs, timestamp=int(at * SECOND))
        span.end(end_time=102 * SECOND)
    return normalize(spans_payload(build)[0])


def _call(attrs, **kw):
    return _one(_llm({"gen_ai.operation.name": "chat", "gen_ai.request.model": "claude-3-5-sonnet", **attrs},
                     **kw).llm_calls)


# -- current names ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["gen_ai.usage.cache_write.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
                                 "gen_ai.usage.cache_creation_input_tokens"])
def test_cache_write_tokens_are_priced_at_the_cache_write_rate(key):
    call = _call({"gen_ai.usage.input_tokens": 10_000, "gen_ai.usage.output_tokens": 1_000,
                  "gen_ai.usage.cache_read.input_tokens": 2_000, key: 4_000})
    assert call.cache_write_tokens == 4_000 and call.cache_read_tokens == 2_000
    # 4000 uncached * 3.00 + 2000 read * 0.30 + 4000 written * 3.75 + 1000 out * 15.00
    # = 12000 + 600 + 15000 + 15000 = 42600 per 1M
    assert call.cost_usd == pytest.approx(0.0426, rel=1e-12)


def test_cache_writes_without_a_write_price_are_input_tokens():
    table = pricing()
    assert table.cost_usd("gpt-4o", 1000, 0, 0, 600) == table.cost_usd("gpt-4o", 1000, 0)
    # Writes beyond the uncached input are not priced apart: 1000 in, 900 read, 500 written -> 100
    # written at 3.75, 900 read at 0.30: 375 + 270 = 645 per 1M.
    assert table.cost_usd("claude-3-5-sonnet", 1000, 0, 900, 500)[0] == pytest.approx(645e-6, rel=1e-12)


def test_implausible_cache_write_count_is_nulled_and_unprices_the_call():
    batch = _llm({"gen_ai.operation.name": "chat", "gen_ai.request.model": "claude-3-5-sonnet",
                  "gen_ai.usage.input_tokens": 10, "gen_ai.usage.cache_write.input_tokens": -5})
    row = _one(batch.llm_call_rows)
    assert row["cache_write_tokens"] is None and row["cost_usd"] is None
    assert row["invalid_fields"] == "cache_write_tokens:below_min,cost_usd:from_invalid_tokens"
    assert [(r.field, r.reason) for r in batch.rejections] == [("cache_write_tokens", "below_min")]


def test_usage_by_modality_fills_absent_totals_and_is_kept_per_modality():
    call = _call({"gen_ai.usage.text.input_tokens": 300, "gen_ai.usage.image.input_tokens": 1200,
                  "gen_ai.usage.audio.output_tokens": 40})
    assert (call.input_tokens, call.output_tokens) == (1500, 40)
    assert json.loads(call.modality_tokens) == {"text_input": 300, "image_input": 1200, "audio_output": 40}
    with_totals = _call({"gen_ai.usage.input_tokens": 2000, "gen_ai.usage.image.input_tokens": 1200})
    assert with_totals.input_tokens == 2000 and json.loads(with_totals.modality_tokens) == {"image_input": 1200}
    assert _call({"gen_ai.usage.input_tokens": 5}).modality_tokens == ""


def test_time_to_first_chunk_is_seconds_and_becomes_ms():
    assert _call({"gen_ai.response.time_to_first_chunk": 0.25}).time_to_first_token_ms == 250.0
    assert _call({"ai.response.msToFirstChunk": 180}).time_to_first_token_ms == 180.0  # Vercel: ms
    assert _call({}).time_to_first_token_ms is None
    batch = _llm({"gen_ai.request.model": "m", "gen_ai.response.time_to_first_chunk": -1.0})
    row = _one(batch.llm_call_rows)
    assert row["time_to_first_token_ms"] is None and row["invalid_fields"] == "time_to_first_token_ms:below_min"


def test_finish_reason_is_the_first_reason():
    assert _call({"gen_ai.response.finish_reasons": ["content_filter", "stop"]}).finish_reason == "content_filter"
    assert _call({"gen_ai.response.finish_reasons": '["SAFETY"]'}).finish_reason == "SAFETY"
    assert _call({"ai.response.finishReason": "stop"}).finish_reason == "stop"
    assert _call({}).finish_reason == ""


@pytest.mark.parametrize("attrs", [
    {"gen_ai.prompt.name": "refund-policy", "gen_ai.prompt.version": "3"},
    {"langfuse.observation.prompt.name": "refund-policy", "langfuse.observation.prompt.version": 3},
    {"langfuse.prompt.name": "refund-policy", "langfuse.prompt.version": "3"},
    {"traceloop.prompt.key": "refund-policy", "traceloop.prompt.version": 3},
])
def test_prompt_name_and_version(attrs):
    call = _call(attrs)
    assert (call.prompt_name, call.prompt_version) == ("refund-policy", "3")


@pytest.mark.parametrize("operation", ["plan", "retrieval", "invoke_workflow", "gen_ai.invocation.internal"])
def test_step_operations_are_agent_steps_even_with_a_model(operation):
    batch = _llm({"gen_ai.operation.name": operation, "gen_ai.request.model": "text-embedding-3-small"})
    assert not batch.llm_calls
    assert _one(batch.agent_steps).operation == operation


def test_operation_details_span_event_gives_prompt_response_and_tools():
    details = {
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": "Refund A-1"}]}]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [
            {"type": "tool_call", "id": "c1", "name": "refund", "arguments": {"order": "A-1"}}]}]),
        "gen_ai.tool.definitions": json.dumps([{"type": "function", "name": "refund",
                                                "parameters": {"type": "object"}}]),
    }
    call = _call({}, events=[("gen_ai.client.inference.operation.details", details, 101.5)])
    assert call.prompt == "Refund A-1"
    assert json.loads(call.tool_definitions) == [{"name": "refund", "parameters": {"type": "object"}}]
    assert json.loads(call.requested_tool_calls) == [{"name": "refund", "arguments": '{"order":"A-1"}', "id": "c1"}]


def test_evaluation_span_event_becomes_an_evaluation_row_with_the_spans_prompt():
    batch = _llm({"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.prompt.name": "faq",
                  "gen_ai.prompt.version": "7"},
                 events=[("gen_ai.evaluation.result", {"gen_ai.evaluation.name": "relevance",
                                                       "gen_ai.evaluation.score.value": 0.25,
                                                       "gen_ai.evaluation.score.label": "irrelevant",
                                                       "gen_ai.evaluation.explanation": "Off topic."}, 103.0)])
    call, row = _one(batch.llm_call_rows), _one(batch.evaluation_rows)
    assert row == {"ts": 103.0, "trace_id": call["trace_id"], "span_id": call["span_id"], "service": "shop",
                   "project": "", "name": "relevance", "score": 0.25, "label": "irrelevant",
                   "explanation": "Off topic.", "prompt_name": "faq", "prompt_version": "7"}


def test_evaluation_log_record_explanation_is_redacted_and_routed():
    from agentwatch.broker import DEFAULT_TOPICS
    from agentwatch.streams.pii import PiiPolicy, Redactor

    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    records = [{"trace_id": trace_id, "span_id": span_id, "event_name": "gen_ai.evaluation.result",
                "attributes": {"gen_ai.evaluation.name": "faithfulness", "gen_ai.evaluation.score.value": "0.5",
                               "gen_ai.evaluation.explanation": "Told jane.doe@example.com the wrong date.",
                               "gen_ai.prompt.name": "faq"},
                "timestamp": 1_700_000_000_000_000_000},
               {"event_name": "gen_ai.evaluation.result", "attributes": {"gen_ai.evaluation.score.label": "bad"},
                "timestamp": 1_700_000_001_000_000_000}]
    normalizer = Normalizer(pricing(), redactor=Redactor(PiiPolicy()))
    outcome = SpanPipeline(normalizer, DEFAULT_TOPICS).on_logs(logs_payload(records))
    first, second = outcome.evaluation_rows
    assert (first["name"], first["score"], first["prompt_name"], first["span_id"]) == (
        "faithfulness", 0.5, "faq", f"{span_id:016x}")
    assert "jane.doe@example.com" not in first["explanation"] and "EMAIL" in first["explanation"]
    assert [(r["entity_type"], r["field"]) for r in outcome.pii_rows] == [("EMAIL", "evaluations.explanation")]
    assert (second["trace_id"], second["label"], second["score"]) == ("", "bad", None)
    assert outcome.outputs == []  # evaluations are not messages


def test_operation_details_log_record_gives_messages_and_tool_definitions():
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    records = [{"trace_id": trace_id, "span_id": span_id, "event_name": "gen_ai.client.inference.operation.details",
                "attributes": {
                    "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text",
                                                                                      "content": "Hi"}]}]),
                    "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text",
                                                                                           "content": "Hello"}]}]),
                    "gen_ai.tool.definitions": json.dumps([{"name": "search", "parameters": {"type": "object"}}])},
                "timestamp": 1_700_000_000_000_000_000}]
    _, messages = Normalizer(pricing()).normalize_logs(decode_logs(logs_payload(records)))
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Hi"), ("assistant", "Hello"),
        ("tool_definitions", '[{"name":"search","parameters":{"type":"object"}}]')]


# -- tool calls as frameworks record them --------------------------------------------------------

def _tool(attrs, name="tool span"):
    def build(tracer):
        timed_span(tracer, name, attrs, 100.0, 101.0)
    return _one(normalize(spans_payload(build)[0]).tool_calls)


@pytest.mark.parametrize("attrs,arguments,fmt", [
    # current semconv JSON: kept as sent
    ({"gen_ai.tool.name": "t", "gen_ai.tool.call.arguments": '{"order_id": "A-1042"}'}, '{"order_id": "A-1042"}', ""),
    # OpenLLMetry @tool: keyword arguments
    ({"traceloop.span.kind": "tool", "traceloop.entity.name": "t",
      "traceloop.entity.input": json.dumps({"args": [], "kwargs": {"order_id": "A-1042"}})},
     '{"order_id":"A-1042"}', "json"),
    # OpenLLMetry @tool: positional arguments have no names
    ({"traceloop.span.kind": "tool", "traceloop.entity.name": "t",
      "traceloop.entity.input": json.dumps({"args": ["A-1042"], "kwargs": {}})},
     json.dumps({"args": ["A-1042"], "kwargs": {}}), "unknown"),
    # OpenLLMetry LangChain: the Python repr in input_str
    ({"traceloop.span.kind": "tool", "traceloop.entity.name": "t",
      "traceloop.entity.input": json.dumps({"input_str": "{'order_id': 'A-1042'}", "tags": [], "metadata": {},
                                            "inputs": None})},
     '{"order_id":"A-1042"}', "json"),
    # OpenLLMetry LangChain: the structured inputs win
    ({"traceloop.span.kind": "tool", "traceloop.entity.name": "t",
      "traceloop.entity.input": json.dumps({"input_str": "ignored", "inputs": {"order_id": "A-1042"}})},
     '{"order_id":"A-1042"}', "json"),
    # OpenInference LangChain: a bare string
    ({"openinference.span.kind": "TOOL", "tool.name": "t", "input.value": "A-1042"}, "A-1042", "unknown"),
    # OpenInference LangChain: the repr of a dict input
    ({"openinference.span.kind": "TOOL", "tool.name": "t", "input.value": "{'order_id': 'A-1042'}"},
     '{"order_id":"A-1042"}', "json"),
    # OpenInference: JSON arguments; tool.parameters is the schema, not the call
    ({"openinference.span.kind": "TOOL", "tool.name": "t", "input.value": '{"order_id": "A-1042"}',
      "tool.parameters": '{"type": "object"}'}, '{"order_id": "A-1042"}', "json"),
    # CrewAI: only the schema
    ({"tool.name": "t", "tool.parameters": '{"order_id": {"type": "str"}}'}, "", ""),
    # OpenLIT: a Python repr
    ({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t",
      "gen_ai.tool.call.arguments": "{'order_id': 'A-1042', 'express': True}"},
     '{"order_id":"A-1042","express":true}', "json"),
    # a repr that is not a literal: never evaluated
    ({"gen_ai.tool.name": "t", "gen_ai.tool.call.arguments": "{'a': __import__('os')}"},
     "{'a': __import__('os')}", "unknown"),
    # Vercel AI SDK
    ({"ai.toolCall.name": "t", "ai.toolCall.id": "c1", "ai.toolCall.args": '{"order_id": "A-1042"}'},
     '{"order_id": "A-1042"}', ""),
])
def test_tool_arguments_unwrapped(attrs, arguments, fmt):
    call = _tool(attrs)
    assert (call.tool_name, call.arguments, call.arguments_format) == ("t", arguments, fmt)


def test_tool_arguments_cut_to_the_text_limit_are_unknown():
    def build(tracer):
        timed_span(tracer, "t", {"gen_ai.tool.name": "t", "gen_ai.tool.call.arguments": json.dumps({"q": "x" * 50})},
                   100.0, 101.0)
    call = _one(normalize(spans_payload(build)[0], max_text_chars=20).tool_calls)
    assert len(call.arguments) == 20 and call.arguments_format == "unknown"


def test_hostile_python_repr_is_bounded():
    deep = "{'a': " * 200 + "1" + "}" * 200
    assert _tool({"gen_ai.tool.name": "t", "gen_ai.tool.call.arguments": deep}).arguments_format in ("json", "unknown")
    huge = "{'a': '" + "x" * 70_000 + "'}"
    assert _tool({"gen_ai.tool.name": "t", "gen_ai.tool.call.arguments": huge}).arguments_format == "unknown"


def test_legacy_function_call_and_empty_parts_give_requested_calls():
    call = _call({"gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": []}]),
                  "gen_ai.completion.0.role": "assistant",
                  "gen_ai.completion.0.function_call.name": "lookup_order",
                  "gen_ai.completion.0.function_call.arguments": '{"id": 1}'})
    assert json.loads(call.requested_tool_calls) == [{"name": "lookup_order", "arguments": '{"id": 1}', "id": ""}]


def test_vercel_ai_sdk_declared_and_requested_tools():
    tool = {"type": "function", "name": "weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    call = _call({"ai.prompt.tools": [json.dumps(tool)], "ai.response.text": "",
                  "ai.response.toolCalls": json.dumps([{"toolCallType": "function", "toolCallId": "c1",
                                                        "toolName": "weather", "args": '{"city":"Rome"}'}])})
    assert json.loads(call.tool_definitions) == [{"name": "weather", "parameters": tool["parameters"]}]
    assert json.loads(call.requested_tool_calls) == [{"name": "weather", "arguments": '{"city":"Rome"}', "id": "c1"}]


# -- framework shapes seen in the captured fixtures (tests/fixtures/frameworks) ------------------

def _messages(*messages):
    return json.dumps(list(messages))


@pytest.mark.parametrize("messages,prompt", [
    # pydantic-ai after a tool round: the last user message holds only the tool's response
    (_messages({"role": "user", "parts": [{"type": "text", "content": "Where is my order A-1042?"}]},
               {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "get_order_status",
                                                "arguments": {"order_id": "A-1042"}}]},
               {"role": "user", "parts": [{"type": "tool_call_response", "id": "c1", "name": "get_order_status",
                                           "result": "shipped"}]}), "Where is my order A-1042?"),
    # Anthropic-style content blocks: a tool_result in a user message
    (_messages({"role": "user", "content": "First question"},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]}),
     "First question"),
    # the last user message with text wins over an earlier one
    (_messages({"role": "user", "content": "old"}, {"role": "assistant", "content": "a"},
               {"role": "user", "parts": [{"type": "text", "content": "new"}]}), "new"),
    # no user text at all: nothing, not a tool result
    (_messages({"role": "user", "parts": [{"type": "tool_call_response", "id": "c1", "result": "shipped"}]}), ""),
])
def test_prompt_is_the_last_user_message_with_text(messages, prompt):
    assert _call({"gen_ai.input.messages": messages}).prompt == prompt


_OI_TOOL_OUTPUT = json.dumps({"type": "tool", "data": {
    "content": "shipped", "additional_kwargs": {}, "response_metadata": {}, "type": "tool",
    "name": "get_order_status", "id": None, "tool_call_id": "call_A1042", "artifact": None, "status": "success"}})
_OI_TOOL = {"openinference.span.kind": "TOOL", "tool.name": "get_order_status", "input.value": "A-1042",
            "output.value": _OI_TOOL_OUTPUT, "output.mime_type": "application/json"}


def _oi_llm(name="get_order_status", arguments='{"order_id": "A-1042"}', call_id="call_A1042"):
    prefix = "llm.output_messages.0.message."
    return {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-mini-2024-07-18",
            prefix + "role": "assistant", prefix + "tool_calls.0.tool_call.id": call_id,
            prefix + "tool_calls.0.tool_call.function.name": name,
            prefix + "tool_calls.0.tool_call.function.arguments": arguments}


def _agent_run(llm_attrs, tool_attrs, tool_first=False, normalizer=None):
    """An agent span with an LLM child (asking for the call) and a tool child, in one request."""
    def build(tracer):
        root = tracer.start_span("support_agent", attributes={"openinference.span.kind": "AGENT"},
                                 start_time=100 * SECOND)
        children = [(timed_span, "ChatOpenAI", llm_attrs, 101.0, 102.0),
                    (timed_span, "get_order_status", tool_attrs, 102.5, 103.0)]
        for make, name, attrs, start, end in (reversed(children) if tool_first else children):
            if attrs is not None:
                make(tracer, name, attrs, start, end, parent=root)
        root.end(end_time=104 * SECOND)
    return normalize(spans_payload(build)[0], normalizer)


@pytest.mark.parametrize("tool_first", [False, True])
def test_openinference_langchain_tool_takes_the_requested_arguments_of_its_call(tool_first):
    batch = _agent_run(_oi_llm(), _OI_TOOL, tool_first=tool_first)
    tool = _one(batch.tool_calls)
    assert (tool.tool_name, tool.call_id, tool.arguments, tool.arguments_format, tool.result) == (
        "get_order_status", "call_A1042", '{"order_id":"A-1042"}', "json", "shipped")


@pytest.mark.parametrize("llm_attrs", [
    None,  # the request is in another batch (or never came)
    _oi_llm(call_id="call_other"),  # another call
    _oi_llm(name="cancel_order"),  # same id, another tool: not this call
    _oi_llm(arguments="A-1042"),  # the request's arguments are not an object either
])
def test_openinference_langchain_tool_without_its_request_stays_unknown(llm_attrs):
    tool = _one(_agent_run(llm_attrs, _OI_TOOL).tool_calls)
    assert (tool.call_id, tool.arguments, tool.arguments_format, tool.result) == (
        "call_A1042", "A-1042", "unknown", "shipped")


def test_requested_arguments_taken_by_a_tool_are_redacted_and_counted_once():
    from agentwatch.streams.pii import PiiPolicy, Redactor

    normalizer = Normalizer(pricing(), redactor=Redactor(PiiPolicy()))
    tool_attrs = {**_OI_TOOL, "input.value": "jane.doe@example.com"}
    batch = _agent_run(_oi_llm(arguments='{"email": "jane.doe@example.com"}'), tool_attrs, normalizer=normalizer)
    tool = _one(batch.tool_call_rows)
    assert tool["arguments_format"] == "json" and "jane.doe@example.com" not in tool["arguments"]
    assert "EMAIL" in json.loads(tool["arguments"])["email"]
    assert sorted((r["field"], r["count"]) for r in batch.pii_rows if r["span_id"] == tool["span_id"]) == [
        ("tool_calls.arguments", 1)]


_LANGCHAIN_ENVELOPE = json.dumps({"input_str": "{'order_id': 'A-1042'}", "tags": [], "metadata": {},
                                  "inputs": {"order_id": "A-1042"},
                                  "kwargs": {"color": "green", "name": None, "tool_call_id": "call_A1042"}})


@pytest.mark.parametrize("attrs,arguments,fmt,call_id", [
    # OpenLLMetry LangChain writes its envelope to the current attribute too
    ({"gen_ai.tool.call.arguments": _LANGCHAIN_ENVELOPE, "traceloop.entity.input": _LANGCHAIN_ENVELOPE},
     '{"order_id":"A-1042"}', "json", "call_A1042"),
    ({"traceloop.span.kind": "tool", "traceloop.entity.input": _LANGCHAIN_ENVELOPE},
     '{"order_id":"A-1042"}', "json", "call_A1042"),
    # no structured inputs: the Python repr in input_str
    ({"gen_ai.tool.call.arguments": json.dumps({"input_str": "{'order_id': 'A-1042'}", "inputs": {},
                                                "kwargs": {"tool_call_id": "c9"}})},
     '{"order_id":"A-1042"}', "json", "c9"),
    # a bare input string: unknown, but the call id is read
    ({"gen_ai.tool.call.arguments": json.dumps({"input_str": "A-1042", "tags": [], "kwargs": {"tool_call_id": "c9"}})},
     json.dumps({"input_str": "A-1042", "tags": [], "kwargs": {"tool_call_id": "c9"}}), "unknown", "c9"),
    # a tool whose own arguments are named input_str: not the envelope, kept as sent
    ({"gen_ai.tool.call.arguments": '{"input_str": "abc"}'}, '{"input_str": "abc"}', "", ""),
    ({"gen_ai.tool.call.arguments": '{"input_str": "abc", "tags": ["x"], "limit": 3}'},
     '{"input_str": "abc", "tags": ["x"], "limit": 3}', "", ""),
    ({"gen_ai.tool.call.arguments": '{"input_str": 5, "tags": []}'}, '{"input_str": 5, "tags": []}', "", ""),
    # broken JSON that mentions the key stays the caller's to judge
    ({"gen_ai.tool.call.arguments": '{"input_str": "abc", "tags": '}, '{"input_str": "abc", "tags": ', "", ""),
])
def test_openllmetry_langchain_envelope_is_unwrapped_strictly(attrs, arguments, fmt, call_id):
    tool = _tool({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t", **attrs})
    assert (tool.arguments, tool.arguments_format, tool.call_id) == (arguments, fmt, call_id)


_TOOL_MESSAGE = {"lc": 1, "type": "constructor", "id": ["langchain", "schema", "messages", "ToolMessage"],
                 "kwargs": {"content": "shipped", "type": "tool", "name": "get_order_status",
                            "tool_call_id": "call_A1042", "status": "success"}}


@pytest.mark.parametrize("attrs,result,call_id", [
    # OpenLLMetry @tool: json.dumps of the returned value
    ({"traceloop.entity.output": '"shipped"'}, "shipped", ""),
    ({"traceloop.entity.output": '"say \\"hi\\""'}, 'say "hi"', ""),
    ({"traceloop.entity.output": '{"status": "shipped"}'}, '{"status": "shipped"}', ""),
    ({"traceloop.entity.output": '"unterminated'}, '"unterminated', ""),
    # OpenLLMetry LangChain: the ToolMessage in its envelope, on both attributes
    ({"gen_ai.tool.call.result": json.dumps({"output": _TOOL_MESSAGE, "kwargs": {"tags": []}})}, "shipped",
     "call_A1042"),
    # ... or the tool's own value when it was run without a tool call
    ({"traceloop.entity.output": json.dumps({"output": "shipped", "kwargs": {}})}, "shipped", ""),
    ({"traceloop.entity.output": json.dumps({"output": {"status": "shipped"}, "kwargs": {}})},
     '{"status":"shipped"}', ""),
    # OpenInference LangChain: message_to_dict of the ToolMessage
    ({"output.value": _OI_TOOL_OUTPUT}, "shipped", "call_A1042"),
    # look-alikes that are not those envelopes: kept as sent
    ({"gen_ai.tool.call.result": '{"type": "order", "data": {"content": "x"}}'},
     '{"type": "order", "data": {"content": "x"}}', ""),
    ({"gen_ai.tool.call.result": '{"output": "x", "kwargs": {}, "more": 1}'}, '{"output": "x", "kwargs": {}, "more": 1}',
     ""),
    ({"gen_ai.tool.call.result": "shipped"}, "shipped", ""),
])
def test_tool_results_are_unwrapped(attrs, result, call_id):
    tool = _tool({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t", **attrs})
    assert (tool.result, tool.call_id) == (result, call_id)


def test_a_tool_call_id_attribute_wins_over_the_envelopes():
    tool = _tool({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t", "gen_ai.tool.call.id": "own",
                  "gen_ai.tool.call.arguments": _LANGCHAIN_ENVELOPE, "output.value": _OI_TOOL_OUTPUT})
    assert tool.call_id == "own"


@pytest.mark.parametrize("attrs,request_model,model", [
    # OpenInference: llm.model_name is what the response named; the request is in the parameters
    ({"llm.model_name": "gpt-4o-mini-2024-07-18", "llm.invocation_parameters": '{"model": "gpt-4o-mini"}'},
     "gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    ({"llm.model_name": "gpt-4o-mini-2024-07-18",
      "llm.invocation_parameters": '{"model_name": "gpt-4o-mini", "temperature": 0}'},
     "gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    ({"llm.model_name": "gpt-4o-mini-2024-07-18"}, "gpt-4o-mini-2024-07-18", "gpt-4o-mini-2024-07-18"),
    ({"llm.model_name": "gpt-4o", "llm.invocation_parameters": "not json"}, "gpt-4o", "gpt-4o"),
    ({"llm.model_name": "gpt-4o", "llm.invocation_parameters": '{"model": 3}'}, "gpt-4o", "gpt-4o"),
    # the semconv request model, where sent, wins
    ({"gen_ai.request.model": "gpt-4o", "llm.model_name": "gpt-4o-2024-08-06",
      "llm.invocation_parameters": '{"model": "other"}'}, "gpt-4o", "gpt-4o"),
])
def test_openinference_request_model_comes_from_the_invocation_parameters(attrs, request_model, model):
    call = _one(_llm({"openinference.span.kind": "LLM", **attrs}).llm_calls)
    assert (call.request_model, call.model) == (request_model, model)


def test_openinference_agent_span_is_named_by_its_span_name():
    def build(tracer):
        timed_span(tracer, "support_agent", {"openinference.span.kind": "AGENT"}, 100.0, 101.0)
        timed_span(tracer, "named", {"openinference.span.kind": "AGENT", "agent.name": "triage"}, 100.0, 101.0)
        timed_span(tracer, "RunnableSequence", {"openinference.span.kind": "CHAIN"}, 100.0, 101.0)
    steps = {s.name: s for s in normalize(spans_payload(build)[0]).agent_steps}
    assert (steps["support_agent"].agent, steps["named"].agent, steps["RunnableSequence"].agent) == (
        "support_agent", "triage", "")


# -- Vercel AI SDK, Google ADK, MLflow (captured in tests/fixtures/frameworks) -------------------

def test_openinference_finish_reason():  # openinference-instrumentation-openai (seen under CrewAI)
    assert _one(_llm({"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-mini",
                      "llm.finish_reason": "tool_calls"}).llm_calls).finish_reason == "tool_calls"


def test_vercel_ai_sdk_prompt_messages_and_input_schema():
    schema = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
    call = _one(_llm({"gen_ai.request.model": "gpt-4o-mini", "ai.prompt.messages": _messages(
        {"role": "system", "content": "You are a shop assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Where is my order A-1042?"}]},
        {"role": "tool", "content": [{"type": "tool-result", "toolCallId": "c1", "toolName": "get_order_status",
                                      "output": {"type": "text", "value": "shipped"}}]}),
        # AI SDK 5 and later name the schema inputSchema
        "ai.prompt.tools": [json.dumps({"type": "function", "name": "get_order_status", "inputSchema": schema})]},
        name="ai.generateText.doGenerate").llm_calls)
    assert call.prompt == "Where is my order A-1042?"
    assert json.loads(call.tool_definitions) == [{"name": "get_order_status", "parameters": schema}]


@pytest.mark.parametrize("attrs,provider", [
    ({"gen_ai.system": "openai.chat", "ai.model.provider": "openai.chat"}, "openai"),  # Vercel: provider.api
    ({"gen_ai.system": "anthropic.messages", "ai.model.provider": "anthropic.messages"}, "anthropic"),
    ({"gen_ai.system": "openai.chat"}, "openai.chat"),  # not the Vercel AI SDK: as sent
    ({"gen_ai.system": "vertex.ai", "ai.model.provider": "google.vertex"}, "vertex.ai"),
])
def test_vercel_ai_sdk_provider_id_is_the_provider(attrs, provider):
    assert _one(_llm({"gen_ai.request.model": "gpt-4o-mini", **attrs}).llm_calls).provider == provider


@pytest.mark.parametrize("attrs,request_model,priced", [
    # Google ADK on LiteLLM records LiteLLM's routing name; the provider is asked for the bare one
    ({"gen_ai.provider.name": "openai", "gen_ai.request.model": "openai/gpt-4o-mini"}, "gpt-4o-mini", True),
    # a prefix naming someone else (a router's namespace) stays
    ({"gen_ai.provider.name": "openrouter", "gen_ai.request.model": "openai/gpt-4o-mini"}, "openai/gpt-4o-mini",
     True),
    ({"gen_ai.request.model": "openai/gpt-4o-mini"}, "openai/gpt-4o-mini", True),
    ({"gen_ai.provider.name": "openai", "gen_ai.request.model": "openai/"}, "openai/", False),
])
def test_a_model_prefixed_with_its_own_provider_is_read_bare(attrs, request_model, priced):
    call = _one(_llm({"gen_ai.operation.name": "generate_content", **attrs}).llm_calls)
    assert (call.request_model, call.model, call.priced) == (request_model, request_model, priced)


@pytest.mark.parametrize("result,expected", [
    ('{"result": "shipped"}', "shipped"),  # Google ADK wraps a function tool's non-dict return value
    ('{"result": {"status": "shipped"}}', '{"status":"shipped"}'),
    ('{"result": 3}', "3"),
    ('{"result": "x", "more": 1}', '{"result": "x", "more": 1}'),  # not the wrapper: as sent
])
def test_google_adk_result_wrapper_is_unwrapped(result, expected):
    tool = _tool({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t", "gen_ai.tool.call.result": result})
    assert tool.result == expected


_MLFLOW_TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_order_status", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}])


_MLFLOW_TOOL_CALL_CHOICE = {"index": 0, "finish_reason": "tool_calls", "message": {
    "role": "assistant", "content": None, "tool_calls": [{"id": "call_A1042", "type": "function", "function": {
        "name": "get_order_status", "arguments": '{"order_id": "A-1042"}'}}]}}


def _mlflow_llm(**extra):
    return {"mlflow.spanType": '"CHAT_MODEL"', "mlflow.traceRequestId": '"tr-1"', "model": '"gpt-4o-mini"',
            "mlflow.spanInputs": json.dumps({"model": "gpt-4o-mini", "messages": [
                {"role": "system", "content": "You are a shop assistant."},
                {"role": "user", "content": "Where is my order A-1042? Mail me at jane.doe@example.com"}]}),
            "mlflow.llm.model": '"gpt-4o-mini-2024-07-18"',
            "mlflow.chat.tokenUsage": json.dumps({"input_tokens": 64, "output_tokens": 18, "total_tokens": 82}),
            "mlflow.chat.tools": _MLFLOW_TOOLS,
            "mlflow.spanOutputs": json.dumps({"id": "chatcmpl-2", "choices": [_MLFLOW_TOOL_CALL_CHOICE]}),
            **extra}


def test_mlflow_model_span_maps_model_tokens_prompt_tools_and_requested_calls():
    call = _one(_llm(_mlflow_llm(), name="Completions").llm_calls)
    assert (call.request_model, call.model) == ("gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    assert (call.input_tokens, call.output_tokens) == (64, 18)
    # gpt-4o-mini: 0.15 in / 0.60 out per 1M -> 64 * 0.15 + 18 * 0.60 = 20.4 per 1M
    assert call.priced and call.cost_usd == pytest.approx(20.4e-6, rel=1e-12)
    assert call.prompt == "Where is my order A-1042? Mail me at jane.doe@example.com"
    assert json.loads(call.tool_definitions) == [{"name": "get_order_status", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}}}}]
    assert json.loads(call.requested_tool_calls) == [
        {"name": "get_order_status", "arguments": '{"order_id": "A-1042"}', "id": "call_A1042"}]
    assert (call.finish_reason, call.provider) == ("tool_calls", "")
    assert _one(_llm(_mlflow_llm(**{"mlflow.llm.provider": '"openai"'}), name="Completions").llm_calls).provider == (
        "openai")
    # request model from the inputs when the "model" attribute is absent; the answer's text
    bare = _llm_without("model", mlflow_outputs=json.dumps({"choices": [{"message": {
        "role": "assistant", "content": "Your order A-1042 has shipped."}}]}))
    assert (bare.request_model, bare.response) == ("gpt-4o-mini", "Your order A-1042 has shipped.")


def _llm_without(key, mlflow_outputs):
    attrs = _mlflow_llm(**{"mlflow.spanOutputs": mlflow_outputs})
    del attrs[key]
    return _one(_llm(attrs, name="Completions").llm_calls)


def test_mlflow_prompt_is_redacted():
    from agentwatch.streams.pii import PiiPolicy, Redactor

    def build(tracer):
        timed_span(tracer, "Completions", _mlflow_llm(), 100.0, 102.0)
    batch = Normalizer(pricing(), redactor=Redactor(PiiPolicy())).normalize_traces(
        decode_traces(spans_payload(build)[0]))
    row = _one(batch.llm_call_rows)
    assert "jane.doe@example.com" not in row["prompt"] and row["prompt"].startswith("Where is my order A-1042?")
    assert [(r["field"], r["entity_type"]) for r in batch.pii_rows] == [("llm_calls.prompt", "EMAIL")]


@pytest.mark.parametrize("span_type,role", [
    ('"CHAT_MODEL"', "llm"), ('"LLM"', "llm"), ('"TOOL"', "tool"), ('"AGENT"', "agent"), ('"CHAIN"', "agent"),
    ('"RETRIEVER"', "agent"), ('"UNKNOWN"', None), ('"PARSER"', None),
])
def test_mlflow_span_types(span_type, role):
    def build(tracer):
        timed_span(tracer, "f", {"mlflow.spanType": span_type}, 100.0, 101.0)
    batch = normalize(spans_payload(build)[0])
    found = [r for r, rows in (("llm", batch.llm_call_rows), ("tool", batch.tool_call_rows),
                               ("agent", batch.agent_step_rows)) if rows]
    assert found == ([role] if role else [])


def test_mlflow_tool_span_arguments_and_result():
    tool = _tool({"mlflow.spanType": '"TOOL"', "mlflow.spanFunctionName": '"run_tool"',
                  "mlflow.spanInputs": '{"order_id": "A-1042"}', "mlflow.spanOutputs": '"shipped"'},
                 name="get_order_status")
    assert (tool.tool_name, tool.arguments, tool.arguments_format, tool.result) == (
        "get_order_status", '{"order_id": "A-1042"}', "", "shipped")


@pytest.mark.parametrize("attribute", ["gen_ai.usage.cost", "gen_ai.cost.total_cost", "operation.cost"])
def test_a_cost_the_instrumentation_reported_is_used(attribute):
    call = _call({"gen_ai.request.model": "my-private-model", "gen_ai.usage.input_tokens": 10,
                  "gen_ai.usage.output_tokens": 5, attribute: 0.0123})
    assert (call.cost_usd, call.priced) == (0.0123, True)


def test_a_reported_cost_of_zero_leaves_the_price_table_to_decide():
    ours = _call({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1_000_000})
    reported_zero = _call({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1_000_000,
                           "gen_ai.usage.cost": 0.0})
    assert reported_zero.cost_usd == ours.cost_usd > 0 and reported_zero.priced


def test_an_implausible_reported_cost_is_nulled_and_flagged():
    batch_call = _call({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.cost": 1e12})
    assert batch_call.cost_usd == 0.0 and "cost_usd" in batch_call.invalid_fields
