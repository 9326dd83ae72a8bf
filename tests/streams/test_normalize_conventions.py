"""Semantic-convention mapping: one test per convention, expected values worked out by hand.

Prices used below (streams/pricing.json, USD per 1M tokens):
gpt-4o-mini 0.15 in / 0.60 out / 0.075 cache read; gpt-4o 2.50 / 10.00; gpt-3.5-turbo 0.50 / 1.50;
claude-3-5-sonnet 3.00 / 15.00.
"""

from __future__ import annotations

import json

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.trace import Status, StatusCode
from streams_otlp_helpers import (
    hex_span_id,
    hex_trace_id,
    logs_payload,
    normalize,
    pricing,
    recorded_spans,
    spans_payload,
    timed_span,
)

from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.otlp import decode_logs, decode_traces


def _one(items):
    assert len(items) == 1, items
    return items[0]


# -- OTel GenAI, current conventions ------------------------------------------------------------

def test_otel_genai_current_conventions():
    input_messages = [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]},
    ]
    output_messages = [{"role": "assistant", "finish_reason": "tool_call", "parts": [
        {"type": "text", "content": "Let me check."},
        {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
    ]}]
    weather_schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    definitions = [{"type": "function", "name": "get_weather", "description": "Current weather",
                    "parameters": weather_schema}]

    def build(tracer):
        agent = timed_span(tracer, "invoke_agent support", {
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support",
            "gen_ai.conversation.id": "conv-9", "user.id": "u-1"}, 100.0, 110.0)
        timed_span(tracer, "chat gpt-4o-mini", {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
            "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300,
            "gen_ai.usage.cache_read.input_tokens": 200, "gen_ai.usage.reasoning.output_tokens": 50,
            "gen_ai.input.messages": json.dumps(input_messages),
            "gen_ai.output.messages": json.dumps(output_messages),
            "gen_ai.tool.definitions": json.dumps(definitions)}, 101.0, 103.5, parent=agent)
        timed_span(tracer, "execute_tool get_weather", {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_weather",
            "gen_ai.tool.call.id": "call_1", "gen_ai.tool.call.arguments": '{"city": "Paris"}',
            "gen_ai.tool.call.result": "18C, cloudy"}, 104.0, 104.25, parent=agent)

    payload, spans = spans_payload(build, **{"host.name": "web-3"})
    batch = normalize(payload)
    assert batch.spans == 3 and batch.failures == []
    trace_id = hex_trace_id(spans["invoke_agent support"])
    agent_id = hex_span_id(spans["invoke_agent support"])

    call = _one(batch.llm_calls)
    assert (call.trace_id, call.span_id, call.parent_span_id) == (
        trace_id, hex_span_id(spans["chat gpt-4o-mini"]), agent_id)
    assert (call.provider, call.model, call.request_model, call.operation) == (
        "openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini", "chat")
    assert (call.input_tokens, call.output_tokens, call.cache_read_tokens, call.reasoning_tokens) == (
        1200, 300, 200, 50)
    # (1000 uncached * 0.15 + 200 cached * 0.075 + 300 out * 0.60) / 1e6 = (150 + 15 + 180) / 1e6
    assert call.cost_usd == pytest.approx(345e-6, rel=1e-12) and call.priced is True
    assert (call.ts, call.latency_ms) == (103.5, pytest.approx(2500.0))
    assert (call.user, call.session, call.agent, call.service, call.host) == (
        "u-1", "conv-9", "support", "shop", "web-3")
    assert call.prompt == "Weather in Paris?"
    assert call.response == "Let me check."
    assert json.loads(call.requested_tool_calls) == [
        {"name": "get_weather", "arguments": '{"city":"Paris"}', "id": "call_1"}]
    assert json.loads(call.tool_definitions) == [{"name": "get_weather", "parameters": weather_schema}]
    assert (call.status, call.error) == ("ok", "")

    step = _one(batch.agent_steps)
    assert (step.span_id, step.parent_span_id, step.operation, step.name, step.agent) == (
        agent_id, "", "invoke_agent", "invoke_agent support", "support")
    assert (step.start_ts, step.ts, step.latency_ms) == (100.0, 110.0, pytest.approx(10_000.0))
    assert (step.user, step.session) == ("u-1", "conv-9")

    tool = _one(batch.tool_calls)
    assert (tool.tool_name, tool.call_id, tool.arguments, tool.result) == (
        "get_weather", "call_1", '{"city": "Paris"}', "18C, cloudy")
    assert (tool.parent_span_id, tool.latency_ms, tool.agent, tool.session) == (
        agent_id, pytest.approx(250.0), "support", "conv-9")


def test_execute_tool_span_without_tool_name_takes_it_from_the_span_name():
    def build(tracer):
        timed_span(tracer, "execute_tool search_docs", {"gen_ai.operation.name": "execute_tool"}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    tool = _one(normalize(payload).tool_calls)
    assert (tool.tool_name, tool.call_id, tool.arguments) == ("search_docs", "", "")


# -- OTel GenAI, legacy conventions -------------------------------------------------------------

def test_otel_genai_legacy_conventions():
    def build(tracer):
        timed_span(tracer, "openai.chat", {
            "gen_ai.system": "openai", "gen_ai.request.model": "gpt-3.5-turbo",
            "gen_ai.usage.prompt_tokens": 40, "gen_ai.usage.completion_tokens": 10,
            "gen_ai.prompt": "Translate to French: hello", "gen_ai.completion": "bonjour"}, 5.0, 5.4)

    payload, _ = spans_payload(build)
    call = _one(normalize(payload).llm_calls)
    assert (call.provider, call.model, call.request_model, call.operation) == (
        "openai", "gpt-3.5-turbo", "gpt-3.5-turbo", "chat")
    assert (call.input_tokens, call.output_tokens) == (40, 10)
    # (40 * 0.50 + 10 * 1.50) / 1e6
    assert call.cost_usd == pytest.approx(35e-6, rel=1e-12)
    assert (call.prompt, call.response) == ("Translate to French: hello", "bonjour")
    assert call.latency_ms == pytest.approx(400.0)


def test_current_attribute_wins_over_legacy_one_on_the_same_span():
    def build(tracer):
        timed_span(tracer, "chat", {
            "gen_ai.provider.name": "azure.ai.openai", "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 7, "gen_ai.usage.prompt_tokens": 99,
            "gen_ai.usage.output_tokens": 3, "gen_ai.usage.completion_tokens": 99}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    call = _one(normalize(payload).llm_calls)
    assert (call.provider, call.input_tokens, call.output_tokens) == ("azure.ai.openai", 7, 3)


# -- OpenLLMetry (traceloop) --------------------------------------------------------------------

def test_openllmetry_traceloop_conventions():
    association = {"traceloop.association.properties.user_id": "u-7",
                   "traceloop.association.properties.session_id": "s-7",
                   "traceloop.association.properties.project": "travel"}
    flights_schema = {"type": "object", "properties": {"to": {"type": "string"}}}

    def build(tracer):
        workflow = timed_span(tracer, "trip_planner.workflow", {
            "traceloop.span.kind": "workflow", "traceloop.entity.name": "trip_planner", **association}, 0.0, 9.0)
        agent = timed_span(tracer, "booking.agent", {
            "traceloop.span.kind": "agent", "traceloop.entity.name": "booking_agent"}, 0.5, 8.0, parent=workflow)
        task = timed_span(tracer, "plan.task", {
            "traceloop.span.kind": "task", "traceloop.entity.name": "plan"}, 1.0, 7.0, parent=agent)
        timed_span(tracer, "openai.chat", {
            "llm.request.type": "chat", "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
            "llm.usage.prompt_tokens": 500, "llm.usage.completion_tokens": 80, "llm.usage.total_tokens": 580,
            "gen_ai.prompt.0.role": "system", "gen_ai.prompt.0.content": "You plan trips.",
            "gen_ai.prompt.1.role": "user", "gen_ai.prompt.1.content": "3 days in Rome",
            "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.finish_reason": "tool_calls",
            "gen_ai.completion.0.tool_calls.0.id": "call_a",
            "gen_ai.completion.0.tool_calls.0.name": "search_flights",
            "gen_ai.completion.0.tool_calls.0.arguments": '{"to": "FCO"}',
            "gen_ai.completion.0.tool_calls.1.name": "search_hotels",
            "gen_ai.completion.0.tool_calls.1.arguments": '{"city": "Rome"}',
            "llm.request.functions.0.name": "search_flights",
            "llm.request.functions.0.description": "Find flights",
            "llm.request.functions.0.parameters": json.dumps(flights_schema),
            "llm.request.functions.1.name": "search_hotels",
            "llm.request.functions.1.parameters": '{"type": "object"}'}, 1.5, 3.0, parent=task)
        timed_span(tracer, "search_flights.tool", {
            "traceloop.span.kind": "tool", "traceloop.entity.name": "search_flights",
            "traceloop.entity.input": '{"to": "FCO"}', "traceloop.entity.output": '["AZ123"]'},
            3.5, 4.0, parent=task)

    payload, spans = spans_payload(build)
    batch = normalize(payload)
    assert batch.spans == 5 and batch.failures == []

    call = _one(batch.llm_calls)
    assert call.parent_span_id == hex_span_id(spans["plan.task"])
    assert (call.provider, call.model, call.request_model, call.operation) == (
        "openai", "gpt-4o-2024-08-06", "gpt-4o", "chat")
    assert (call.input_tokens, call.output_tokens) == (500, 80)
    # (500 * 2.50 + 80 * 10.00) / 1e6: the dated model prices as gpt-4o
    assert call.cost_usd == pytest.approx(2050e-6, rel=1e-12)
    assert (call.user, call.session, call.project) == ("u-7", "s-7", "travel")
    assert call.prompt == "3 days in Rome"
    assert call.response == ""  # the completion carried only tool calls
    assert json.loads(call.requested_tool_calls) == [
        {"name": "search_flights", "arguments": '{"to": "FCO"}', "id": "call_a"},
        {"name": "search_hotels", "arguments": '{"city": "Rome"}', "id": ""}]
    assert json.loads(call.tool_definitions) == [
        {"name": "search_flights", "parameters": flights_schema},
        {"name": "search_hotels", "parameters": {"type": "object"}}]

    steps = {s.name: s for s in batch.agent_steps}
    assert {n: (s.operation, s.agent) for n, s in steps.items()} == {
        "trip_planner.workflow": ("workflow", "trip_planner"),
        "booking.agent": ("agent", "booking_agent"),
        "plan.task": ("task", "plan")}
    assert all((s.user, s.session, s.project) == ("u-7", "s-7", "travel") for s in steps.values())

    tool = _one(batch.tool_calls)
    assert (tool.tool_name, tool.arguments, tool.result, tool.call_id) == (
        "search_flights", '{"to": "FCO"}', '["AZ123"]', "")
    assert (tool.user, tool.session, tool.project) == ("u-7", "s-7", "travel")


# -- OpenInference (Arize) ----------------------------------------------------------------------

def test_openinference_conventions():
    lookup_schema = {"type": "object", "properties": {"topic": {"type": "string"}}}

    def build(tracer):
        agent = timed_span(tracer, "RefundAgent", {
            "openinference.span.kind": "AGENT", "agent.name": "refund_bot",
            "session.id": "sess-oi", "user.id": "u-oi"}, 10.0, 20.0)
        chain = timed_span(tracer, "RetrieverChain", {
            "openinference.span.kind": "CHAIN", "input.value": "refund?"}, 10.5, 19.0, parent=agent)
        timed_span(tracer, "ChatAnthropic", {
            "openinference.span.kind": "LLM", "llm.provider": "anthropic",
            "llm.model_name": "claude-3-5-sonnet-20241022",
            "llm.token_count.prompt": 2000, "llm.token_count.completion": 100, "llm.token_count.total": 2100,
            # Indexes need not start at 0; 10 sorts after 9 numerically, not as text.
            "llm.input_messages.2.message.role": "system", "llm.input_messages.2.message.content": "Be exact.",
            "llm.input_messages.9.message.role": "user", "llm.input_messages.9.message.content": "old question",
            "llm.input_messages.10.message.role": "user",
            "llm.input_messages.10.message.content": "What is the refund policy?",
            "input.value": '{"messages": "raw request body"}',
            "llm.output_messages.0.message.role": "assistant",
            "llm.output_messages.0.message.tool_calls.0.tool_call.id": "toolu_1",
            "llm.output_messages.0.message.tool_calls.0.tool_call.function.name": "lookup_policy",
            "llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments": '{"topic": "refund"}',
            "llm.tools.0.tool.json_schema": json.dumps(
                {"type": "function", "function": {"name": "lookup_policy", "parameters": lookup_schema}}),
            "llm.tools.1.tool.json_schema": json.dumps(
                {"name": "escalate", "input_schema": {"type": "object"}}),
        }, 11.0, 13.0, parent=chain)
        timed_span(tracer, "lookup_policy", {
            "openinference.span.kind": "TOOL", "tool.name": "lookup_policy",
            "input.value": '{"topic": "refund"}', "output.value": "30 days"}, 13.5, 14.0, parent=chain)

    payload, spans = spans_payload(build, **{"openinference.project.name": "support-oi"})
    batch = normalize(payload)
    assert batch.spans == 4 and batch.failures == []

    call = _one(batch.llm_calls)
    assert call.span_id == hex_span_id(spans["ChatAnthropic"])
    assert (call.provider, call.model, call.request_model, call.operation) == (
        "anthropic", "claude-3-5-sonnet-20241022", "claude-3-5-sonnet-20241022", "chat")
    assert (call.input_tokens, call.output_tokens) == (2000, 100)
    # (2000 * 3.00 + 100 * 15.00) / 1e6
    assert call.cost_usd == pytest.approx(7500e-6, rel=1e-12)
    assert call.prompt == "What is the refund policy?"
    assert call.response == ""
    assert json.loads(call.requested_tool_calls) == [
        {"name": "lookup_policy", "arguments": '{"topic": "refund"}', "id": "toolu_1"}]
    assert json.loads(call.tool_definitions) == [
        {"name": "lookup_policy", "parameters": lookup_schema},
        {"name": "escalate", "parameters": {"type": "object"}}]
    assert (call.user, call.session, call.agent, call.project) == ("u-oi", "sess-oi", "refund_bot", "support-oi")

    steps = {s.name: s for s in batch.agent_steps}
    assert {n: s.operation for n, s in steps.items()} == {"RefundAgent": "agent", "RetrieverChain": "chain"}
    assert steps["RetrieverChain"].parent_span_id == hex_span_id(spans["RefundAgent"])
    assert all(s.agent == "refund_bot" for s in steps.values())

    tool = _one(batch.tool_calls)
    assert (tool.tool_name, tool.arguments, tool.result) == ("lookup_policy", '{"topic": "refund"}', "30 days")
    assert (tool.session, tool.project) == ("sess-oi", "support-oi")


def test_openinference_output_message_text_is_the_response():
    def build(tracer):
        timed_span(tracer, "llm", {
            "openinference.span.kind": "LLM", "llm.model_name": "gpt-4o",
            "llm.input_messages.0.message.role": "user", "llm.input_messages.0.message.content": "hi",
            "llm.output_messages.0.message.role": "assistant",
            "llm.output_messages.0.message.content": "hello!"}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    call = _one(normalize(payload).llm_calls)
    assert (call.prompt, call.response, call.requested_tool_calls) == ("hi", "hello!", "")


# -- prompt text in span events -----------------------------------------------------------------

@pytest.mark.parametrize("prompt_event,completion_event,expected", [
    (("gen_ai.content.prompt", {"gen_ai.prompt": "Tell me a joke"}),
     ("gen_ai.content.completion", {"gen_ai.completion": "No."}), ("Tell me a joke", "No.")),
    (("gen_ai.user.message", {"content": "Summarise this"}),
     ("gen_ai.choice", {"content": "Summary."}), ("Summarise this", "Summary.")),
])
def test_prompt_and_completion_in_span_events(prompt_event, completion_event, expected):
    def build(tracer):
        span = tracer.start_span("chat gpt-4o", attributes={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"})
        span.add_event("gen_ai.system.message", {"content": "not the prompt"})
        span.add_event(*prompt_event)
        span.add_event(*completion_event)
        span.end()

    payload, _ = spans_payload(build)
    call = _one(normalize(payload).llm_calls)
    assert (call.prompt, call.response) == expected


# -- log records --------------------------------------------------------------------------------

def test_log_records_become_llm_messages():
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    tool_calls = [{"id": "call_9", "type": "function", "function": {"name": "track_order", "arguments": "{}"}}]
    records = [
        {"trace_id": trace_id, "span_id": span_id, "event_name": "gen_ai.system.message",
         "body": {"content": "You are a shop assistant."}, "timestamp": 1_700_000_000_000_000_000},
        {"trace_id": trace_id, "span_id": span_id, "event_name": "gen_ai.user.message",
         "body": {"content": "Where is my order?"}, "timestamp": 1_700_000_000_500_000_000},
        # legacy: the event name as an attribute, the message nested in the choice body
        {"trace_id": trace_id, "span_id": span_id, "attributes": {"event.name": "gen_ai.choice"},
         "body": {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "On its way."}},
         "timestamp": 1_700_000_001_000_000_000},
        {"trace_id": trace_id, "span_id": span_id, "event_name": "gen_ai.choice",
         "body": {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
                                                                          "tool_calls": tool_calls}},
         "timestamp": 1_700_000_002_000_000_000},
        # not GenAI, and GenAI without a trace to join to: both skipped
        {"trace_id": trace_id, "span_id": span_id, "event_name": "app.audit", "body": "user clicked"},
        {"event_name": "gen_ai.user.message", "body": {"content": "orphan"}},
    ]
    seen, messages = Normalizer(pricing()).normalize_logs(decode_logs(logs_payload(records, service="shop")))
    assert seen == 6
    assert [(m.event_name, m.role, m.ts) for m in messages] == [
        ("gen_ai.system.message", "system", 1_700_000_000.0),
        ("gen_ai.user.message", "user", 1_700_000_000.5),
        ("gen_ai.choice", "assistant", 1_700_000_001.0),
        ("gen_ai.choice", "assistant", 1_700_000_002.0)]
    assert [m.content for m in messages[:3]] == ["You are a shop assistant.", "Where is my order?", "On its way."]
    assert json.loads(messages[3].content) == tool_calls
    assert {(m.trace_id, m.span_id, m.service) for m in messages} == {
        (f"{trace_id:032x}", f"{span_id:016x}", "shop")}


def test_log_record_with_parts_content_and_text_body():
    records = [
        {"trace_id": 1, "span_id": 2, "event_name": "gen_ai.user.message",
         "body": {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "image_url"},
                                               {"type": "text", "text": "second"}]}},
        {"trace_id": 1, "span_id": 2, "event_name": "gen_ai.assistant.message", "body": "plain text body"},
    ]
    _, messages = Normalizer(pricing()).normalize_logs(decode_logs(logs_payload(records)))
    assert [(m.role, m.content) for m in messages] == [("user", "first\nsecond"), ("assistant", "plain text body")]


def test_log_record_text_is_truncated():
    records = [{"trace_id": 1, "span_id": 2, "event_name": "gen_ai.user.message", "body": {"content": "x" * 500}}]
    _, messages = Normalizer(pricing(), max_text_chars=64).normalize_logs(decode_logs(logs_payload(records)))
    assert _one(messages).content == "x" * 64


# -- context propagation ------------------------------------------------------------------------

def test_user_session_project_set_only_on_the_root_reach_every_span_of_the_trace():
    def build(tracer):
        root = timed_span(tracer, "invoke_agent shopper", {
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "shopper", "user.id": "alice",
            "gen_ai.conversation.id": "c-1", "agentwatch.project": "shop-prod"}, 0.0, 5.0)
        chat = timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
                          1.0, 2.0, parent=root)
        timed_span(tracer, "execute_tool cart", {"gen_ai.operation.name": "execute_tool",
                                                 "gen_ai.tool.name": "cart"}, 2.0, 3.0, parent=chat)
        # A second trace in the same batch, with no context of its own: nothing may leak into it.
        timed_span(tracer, "chat other", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
                   1.0, 2.0)

    payload, spans = spans_payload(build)
    batch = normalize(payload)
    root_trace = hex_trace_id(spans["invoke_agent shopper"])
    events = batch.llm_calls + batch.tool_calls + batch.agent_steps
    assert len(events) == 4
    for event in events:
        expected = ("alice", "c-1", "shop-prod", "shopper") if event.trace_id == root_trace else ("", "", "", "")
        assert (event.user, event.session, event.project, event.agent) == expected, event


def test_context_on_a_non_genai_root_span_reaches_the_genai_spans():
    # The usual web app: the server span knows the user, the LLM span below it does not.
    def build(tracer):
        root = timed_span(tracer, "POST /chat", {"http.request.method": "POST", "enduser.id": "bob",
                                                 "session.id": "web-42"}, 0.0, 3.0)
        timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
                   1.0, 2.0, parent=root)

    payload, _ = spans_payload(build)
    batch = normalize(payload)
    call = _one(batch.llm_calls)
    assert (call.user, call.session) == ("bob", "web-42")
    assert batch.agent_steps == [] and batch.tool_calls == []


def test_project_falls_back_to_resource_service_namespace():
    def build(tracer):
        timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}, 1.0, 2.0)

    payload, _ = spans_payload(build, **{"service.namespace": "payments"})
    assert _one(normalize(payload).llm_calls).project == "payments"


# -- nested LLM spans ---------------------------------------------------------------------------

def _agent_and_child_llm(tracer):
    # Agent-level span: model, provider and the same token counts as its child.
    parent = timed_span(tracer, "agent run", {
        "gen_ai.request.model": "gpt-4o", "gen_ai.provider.name": "openai",
        "gen_ai.usage.input_tokens": 300, "gen_ai.usage.output_tokens": 40}, 0.0, 4.0)
    timed_span(tracer, "chat gpt-4o", {
        "gen_ai.operation.name": "chat", "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 300, "gen_ai.usage.output_tokens": 40}, 1.0, 3.0, parent=parent)


def test_nested_llm_spans_count_one_call_in_the_child():
    payload, spans = spans_payload(_agent_and_child_llm)
    batch = normalize(payload)
    call = _one(batch.llm_calls)
    assert call.span_id == hex_span_id(spans["chat gpt-4o"])
    assert call.parent_span_id == hex_span_id(spans["agent run"])
    # filled from the parent, never summed with it
    assert (call.request_model, call.provider, call.model) == ("gpt-4o", "openai", "gpt-4o-2024-08-06")
    assert (call.input_tokens, call.output_tokens) == (300, 40)
    assert call.cost_usd == pytest.approx((300 * 2.50 + 40 * 10.00) / 1e6, rel=1e-12)
    step = _one(batch.agent_steps)
    assert (step.span_id, step.name) == (hex_span_id(spans["agent run"]), "agent run")


def test_parent_llm_span_arriving_in_a_later_batch_is_still_demoted():
    with recorded_spans() as (tracer, exporter):
        _agent_and_child_llm(tracer)
        finished = {s.name: s for s in exporter.get_finished_spans()}
    normalizer = Normalizer(pricing())
    first = normalizer.normalize_traces(decode_traces(encode_spans([finished["chat gpt-4o"]]).SerializeToString()))
    call = _one(first.llm_calls)
    assert call.span_id == hex_span_id(finished["chat gpt-4o"])
    assert (call.model, call.request_model) == ("gpt-4o-2024-08-06", "")  # the parent is not known yet

    later = normalizer.normalize_traces(decode_traces(encode_spans([finished["agent run"]]).SerializeToString()))
    assert later.llm_calls == []
    assert _one(later.agent_steps).span_id == hex_span_id(finished["agent run"])


def test_three_levels_of_llm_spans_give_one_call_and_two_steps():
    def build(tracer):
        top = timed_span(tracer, "workflow", {"gen_ai.request.model": "gpt-4o", "gen_ai.system": "openai"}, 0, 9)
        mid = timed_span(tracer, "agent", {"gen_ai.request.model": "gpt-4o",
                                           "gen_ai.usage.input_tokens": 10}, 1, 8, parent=top)
        timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.usage.output_tokens": 5}, 2, 3,
                   parent=mid)

    payload, spans = spans_payload(build)
    batch = normalize(payload)
    call = _one(batch.llm_calls)
    assert call.span_id == hex_span_id(spans["chat"])
    assert (call.request_model, call.provider, call.input_tokens, call.output_tokens) == ("gpt-4o", "openai", 10, 5)
    assert sorted(s.name for s in batch.agent_steps) == ["agent", "workflow"]


# -- errors -------------------------------------------------------------------------------------

def test_error_from_status_message():
    def build(tracer):
        span = tracer.start_span("chat", attributes={"gen_ai.operation.name": "chat",
                                                     "gen_ai.request.model": "gpt-4o"})
        span.set_status(Status(StatusCode.ERROR, "429 rate limited"))
        span.end()

    payload, _ = spans_payload(build)
    call = _one(normalize(payload).llm_calls)
    assert (call.status, call.error) == ("error", "429 rate limited")


def test_error_from_error_type_attribute_without_status():
    def build(tracer):
        tracer.start_span("chat", attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                                              "error.type": "timeout"}).end()

    payload, _ = spans_payload(build)
    call = _one(normalize(payload).llm_calls)
    assert (call.status, call.error) == ("error", "timeout")


def test_error_from_exception_event_on_a_tool_span():
    def build(tracer):
        span = tracer.start_span("execute_tool fetch", attributes={"gen_ai.operation.name": "execute_tool",
                                                                  "gen_ai.tool.name": "fetch"})
        span.record_exception(ConnectionError("upstream reset"))
        span.set_status(Status(StatusCode.ERROR))
        span.end()

    payload, _ = spans_payload(build)
    tool = _one(normalize(payload).tool_calls)
    assert (tool.status, tool.error) == ("error", "upstream reset")


def test_error_on_agent_step_and_ok_elsewhere():
    def build(tracer):
        with pytest.raises(RuntimeError):
            with tracer.start_as_current_span("invoke_agent a", attributes={"gen_ai.operation.name": "invoke_agent"}):
                with tracer.start_as_current_span("chat", attributes={"gen_ai.operation.name": "chat",
                                                                      "gen_ai.request.model": "gpt-4o"}):
                    pass
                raise RuntimeError("max iterations reached")

    payload, _ = spans_payload(build)
    batch = normalize(payload)
    step = _one(batch.agent_steps)
    # the SDK records the exception and sets the status description "<type>: <message>"
    assert (step.status, step.error) == ("error", "RuntimeError: max iterations reached")
    assert (_one(batch.llm_calls).status, batch.llm_calls[0].error) == ("ok", "")
