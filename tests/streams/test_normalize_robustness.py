"""The normaliser on missing, empty, odd-typed, oversized and hostile input: it never raises."""

from __future__ import annotations

import json

import pytest
from opentelemetry.trace import Status, StatusCode
from streams_otlp_helpers import hex_span_id, normalize, pricing, spans_payload, timed_span

from agentwatch.streams import normalize as normalize_module
from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.otlp import decode_traces

CHAT = {"gen_ai.operation.name": "chat"}


def _single_call(attrs, **kwargs):
    def build(tracer):
        timed_span(tracer, "chat", attrs, 1.0, 2.0)

    payload, _ = spans_payload(build)
    batch = normalize(payload, **kwargs)
    assert batch.failures == []
    assert len(batch.llm_calls) == 1, batch
    return batch.llm_calls[0]


def _deep(levels: int, leaf="x"):
    node = leaf
    for _ in range(levels):
        node = {"a": node}
    return node


def test_llm_span_with_nothing_but_its_operation():
    normalizer = Normalizer(pricing())
    payload, _ = spans_payload(lambda tracer: timed_span(tracer, "chat", CHAT, 1.0, 2.0))
    batch = normalizer.normalize_traces(decode_traces(payload))
    call = batch.llm_calls[0]
    assert (call.model, call.request_model, call.provider, call.operation) == ("", "", "", "chat")
    assert (call.input_tokens, call.output_tokens, call.cost_usd, call.priced) == (0, 0, 0.0, False)
    assert (call.prompt, call.response, call.tool_definitions, call.requested_tool_calls) == ("", "", "", "")
    assert normalizer.unpriced_models == {}  # no model is not an unpriced model


def test_non_genai_spans_make_no_events():
    def build(tracer):
        timed_span(tracer, "GET /health", {"http.request.method": "GET"}, 1.0, 2.0)
        timed_span(tracer, "SELECT", {}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    batch = normalize(payload)
    assert batch.spans == 2
    assert (batch.llm_calls, batch.tool_calls, batch.agent_steps, batch.failures) == ([], [], [], [])


def test_empty_values_fall_through_to_the_next_convention():
    call = _single_call({
        "gen_ai.operation.name": "", "openinference.span.kind": "", "traceloop.span.kind": "",
        "gen_ai.provider.name": "", "gen_ai.system": "openai",
        "gen_ai.request.model": "", "llm.model_name": "gpt-4o",
        "gen_ai.usage.input_tokens": "", "llm.usage.prompt_tokens": 1000,
        "gen_ai.usage.output_tokens": "", "llm.token_count.completion": 100,
        "gen_ai.input.messages": "", "gen_ai.output.messages": "", "gen_ai.tool.definitions": "",
        "gen_ai.prompt": "the prompt", "user.id": "", "enduser.id": "eve"})
    assert (call.provider, call.model, call.operation) == ("openai", "gpt-4o", "chat")
    assert (call.input_tokens, call.output_tokens) == (1000, 100)
    assert call.cost_usd == pytest.approx((1000 * 2.50 + 100 * 10.00) / 1e6, rel=1e-12)
    assert (call.prompt, call.user, call.tool_definitions) == ("the prompt", "eve", "")


def test_all_genai_attributes_empty_is_not_a_genai_span():
    def build(tracer):
        timed_span(tracer, "x", {"gen_ai.operation.name": "", "gen_ai.request.model": "", "gen_ai.tool.name": "",
                                 "openinference.span.kind": ""}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    batch = normalize(payload)
    assert (batch.spans, batch.llm_calls, batch.tool_calls, batch.agent_steps) == (1, [], [], [])


@pytest.mark.parametrize("value,expected", [
    ("120", 120), (" 120 ", 120), ("1e3", 1000), (120.9, 120), (7, 7), (-5, 0), ("-5", 0), (True, 0), (False, 0),
    (10**13, 0), (float("nan"), 0), (float("inf"), 0), (float("-inf"), 0), ("abc", 0), ("", 0), ("nan", 0),
    ("1e400", 0), ([1, 2], 0), (10**12, 0), (10**7, 10**7),  # 10M: the default bound per call
])
def test_odd_token_values_never_raise(value, expected):
    call = _single_call({**CHAT, "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": value,
                         "gen_ai.usage.output_tokens": value})
    assert (call.input_tokens, call.output_tokens) == (expected, expected)
    assert call.cost_usd == pytest.approx(expected * (2.50 + 10.00) / 1e6, rel=1e-12)


def test_cache_read_larger_than_input_is_capped_in_the_price():
    call = _single_call({**CHAT, "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 100,
                         "gen_ai.usage.cache_read.input_tokens": "5000"})
    assert call.cache_read_tokens == 5000  # reported as sent
    assert call.cost_usd == pytest.approx(100 * 1.25 / 1e6, rel=1e-12)  # all 100 at the cache rate, no more


def test_model_as_int_and_bool():
    normalizer = Normalizer(pricing())

    def build(tracer):
        timed_span(tracer, "a", {**CHAT, "gen_ai.request.model": 4, "gen_ai.provider.name": 7}, 1.0, 2.0)
        timed_span(tracer, "b", {**CHAT, "gen_ai.response.model": True}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    batch = normalizer.normalize_traces(decode_traces(payload))
    assert batch.failures == []
    calls = {c.model: c for c in batch.llm_calls}
    assert set(calls) == {"4", "True"}
    assert calls["4"].provider == "7" and not calls["4"].priced
    assert normalizer.unpriced_models == {"4": 1, "True": 1}


@pytest.mark.parametrize("messages,expected_prompt", [
    ('[{"role": "user", "parts": [', "legacy prompt"),  # malformed JSON: the next source is used
    ('{"role": "user", "content": "a dict, not a list"}', "legacy prompt"),
    ("42", "legacy prompt"),
    ("null", "legacy prompt"),
    ("[]", "legacy prompt"),
    ('["plain", 3, null]', ""),
    ('["just a string"]', "just a string"),
    ('[{"role": "user", "content": {"nested": 1}}]', '{"nested":1}'),
    ('[{"role": "user", "parts": "not a list"}]', "not a list"),
    ('[{"role": "user", "parts": [7, null, {"type": "image"}, {"type": "text", "content": "ok"}]}]', "ok"),
    ('[{"role": 5, "content": "no role"}]', "no role"),
])
def test_odd_input_messages_never_raise(messages, expected_prompt):
    call = _single_call({**CHAT, "gen_ai.input.messages": messages, "gen_ai.prompt": "legacy prompt"})
    assert call.prompt == expected_prompt


@pytest.mark.parametrize("output,expected_calls", [
    ('[{"role": "assistant", "parts": 5}]', ""),
    ('[{"role": "assistant", "tool_calls": 5}]', ""),
    ('[{"role": "assistant", "tool_calls": "abc"}]', ""),
    ('[{"role": "assistant", "tool_calls": [5, {"function": "x"}, {"function": {"name": 9}}]}]',
     [{"name": "9", "arguments": "", "id": ""}]),
    ('[{"role": "assistant", "parts": [{"type": "tool_call"}, {"type": "tool_call", "name": "t", "id": 3}]}]',
     [{"name": "t", "arguments": "", "id": "3"}]),
    ('"a string"', ""),
])
def test_odd_output_messages_never_raise(output, expected_calls):
    call = _single_call({**CHAT, "gen_ai.output.messages": output})
    assert (json.loads(call.requested_tool_calls) if call.requested_tool_calls else "") == expected_calls


def test_odd_tool_definitions_keep_what_is_usable():
    call = _single_call({**CHAT, "gen_ai.tool.definitions": json.dumps(
        [{"function": "x"}, 5, None, {"name": 3, "parameters": []}, {"name": "ok", "parameters": {"type": "object"}}])})
    assert json.loads(call.tool_definitions) == [{"name": "3", "parameters": {}}, {"name": "ok",
                                                                                "parameters": {"type": "object"}}]
    call = _single_call({**CHAT, "llm.request.functions.0.name": "f",
                         "llm.request.functions.0.parameters": "{not json", "llm.request.functions.x.name": "g",
                         "llm.tools.0.tool.json_schema": "[1, 2]"})
    assert json.loads(call.tool_definitions) == [{"name": "f", "parameters": {}}]


def test_oversized_texts_are_cut_to_exactly_max_text_chars():
    limit = 300

    def build(tracer):
        span = tracer.start_span("chat", attributes={
            **CHAT, "gen_ai.request.model": "gpt-4o",
            "gen_ai.input.messages": json.dumps([{"role": "user", "content": "p" * 5000}]),
            "gen_ai.output.messages": json.dumps([{"role": "assistant", "content": "r" * 5000}])})
        span.set_status(Status(StatusCode.ERROR, "e" * 5000))
        span.end()
        timed_span(tracer, "execute_tool t", {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t",
                                              "gen_ai.tool.call.arguments": "a" * 5000,
                                              "gen_ai.tool.call.result": "z" * 5000}, 1.0, 2.0)
        timed_span(tracer, "short", {**CHAT, "gen_ai.prompt": "p" * limit}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    batch = normalize(payload, max_text_chars=limit)
    assert batch.failures == [] and len(batch.llm_calls) == 2
    long_call = next(c for c in batch.llm_calls if c.response)
    assert (long_call.prompt, long_call.response, long_call.error) == ("p" * limit, "r" * limit, "e" * limit)
    tool = batch.tool_calls[0]
    assert (tool.arguments, tool.result) == ("a" * limit, "z" * limit)
    short = next(c for c in batch.llm_calls if not c.response)
    assert short.prompt == "p" * limit  # exactly at the limit: untouched


def test_max_text_chars_zero_keeps_no_text_and_negative_is_rejected():
    call = _single_call({**CHAT, "gen_ai.prompt": "secret"}, max_text_chars=0)
    assert call.prompt == ""
    with pytest.raises(ValueError):
        Normalizer(pricing(), max_text_chars=-1)
    with pytest.raises(ValueError):
        Normalizer(pricing(), parent_memory=-1)


def test_hostile_nesting_never_raises():
    too_deep_to_parse = "[" * 5000 + "]" * 5000
    deep_content = json.dumps([{"role": "user", "content": _deep(400)}])  # parses; too deep to re-serialise
    deep_args = json.dumps([{"role": "assistant", "parts": [
        {"type": "tool_call", "name": "t", "arguments": _deep(400)}]}])
    call = _single_call({**CHAT, "gen_ai.input.messages": deep_content, "gen_ai.output.messages": deep_args,
                         "gen_ai.tool.definitions": too_deep_to_parse})
    assert call.prompt == ""  # nothing readable in it, but the call is kept
    assert [c["name"] for c in json.loads(call.requested_tool_calls)] == ["t"]
    assert call.tool_definitions == ""
    call = _single_call({**CHAT, "gen_ai.input.messages": too_deep_to_parse, "gen_ai.prompt": "fallback"})
    assert call.prompt == "fallback"


def test_hostile_attribute_keys_never_raise():
    call = _single_call({**CHAT, "gen_ai.prompt.\u00b2.content": "superscript index", "gen_ai.prompt.1.role": "user",
                         "gen_ai.prompt.1.content": "real", "gen_ai.prompt..content": "empty index",
                         "llm.input_messages.99999999999999999999.message.content": "huge index",
                         "gen_ai.completion.0.tool_calls.\u0663.name": "arabic-indic digit"})
    assert call.prompt == "real"


def test_cyclic_parent_ids_never_raise():
    def build(tracer):
        timed_span(tracer, "a", {**CHAT, "gen_ai.request.model": "gpt-4o"}, 1.0, 2.0)
        timed_span(tracer, "b", {**CHAT, "gen_ai.system": "openai"}, 1.0, 2.0)
        timed_span(tracer, "c", {**CHAT, "gen_ai.usage.input_tokens": 3}, 1.0, 2.0)

    payload, spans = spans_payload(build)
    request = decode_traces(payload)
    by_name = {s.name: s for s in request.resource_spans[0].scope_spans[0].spans}
    trace_id = by_name["a"].trace_id
    for span in by_name.values():  # deliberately malformed: one trace, a <-> b cycle, c under a
        span.trace_id = trace_id
    by_name["a"].parent_span_id = by_name["b"].span_id
    by_name["b"].parent_span_id = by_name["a"].span_id
    by_name["c"].parent_span_id = by_name["a"].span_id
    batch = Normalizer(pricing()).normalize_traces(request)
    assert batch.failures == []
    assert [c.span_id for c in batch.llm_calls] == [hex_span_id(spans["c"])]
    call = batch.llm_calls[0]
    assert (call.request_model, call.provider, call.input_tokens) == ("gpt-4o", "openai", 3)


def test_a_span_that_fails_to_map_is_reported_and_the_rest_of_the_batch_maps(monkeypatch):
    real_status = normalize_module._status

    def failing_status(span, attrs):
        if span.name == "boom":
            raise RuntimeError("mapping exploded")
        return real_status(span, attrs)

    monkeypatch.setattr(normalize_module, "_status", failing_status)

    def build(tracer):
        timed_span(tracer, "ok chat", {**CHAT, "gen_ai.request.model": "gpt-4o"}, 1.0, 2.0)
        timed_span(tracer, "boom", {**CHAT, "gen_ai.request.model": "gpt-4o"}, 1.0, 2.0)
        timed_span(tracer, "execute_tool t", {"gen_ai.operation.name": "execute_tool"}, 1.0, 2.0)

    payload, spans = spans_payload(build)
    batch = normalize(payload)
    assert batch.failures == [(hex_span_id(spans["boom"]), "RuntimeError: mapping exploded")]
    assert [c.span_id for c in batch.llm_calls] == [hex_span_id(spans["ok chat"])]
    assert [t.tool_name for t in batch.tool_calls] == ["t"]
    assert batch.spans == 3


def test_a_span_that_fails_to_classify_is_reported_and_the_rest_of_the_batch_maps(monkeypatch):
    real_role = normalize_module._span_role

    def failing_role(attrs):
        if attrs.get("poison"):
            raise KeyError("poison")
        return real_role(attrs)

    monkeypatch.setattr(normalize_module, "_span_role", failing_role)

    def build(tracer):
        timed_span(tracer, "poisoned", {**CHAT, "poison": True}, 1.0, 2.0)
        timed_span(tracer, "fine", {**CHAT}, 1.0, 2.0)

    payload, spans = spans_payload(build)
    batch = normalize(payload)
    assert batch.failures == [(hex_span_id(spans["poisoned"]), "KeyError: 'poison'")]
    assert [c.span_id for c in batch.llm_calls] == [hex_span_id(spans["fine"])]


def test_one_attribute_layout_still_falls_through_per_span():
    # Both spans have the same keys (so share a cached look-up plan); in the second the
    # preferred alias is empty and the next convention's value must be read.
    def build(tracer):
        timed_span(tracer, "chat", {**CHAT, "gen_ai.request.model": "gpt-4o",
                                    "llm.model_name": "ignored"}, 1.0, 2.0)
        timed_span(tracer, "chat", {**CHAT, "gen_ai.request.model": "",
                                    "llm.model_name": "claude-sonnet-4"}, 3.0, 4.0)

    payload, _ = spans_payload(build)
    calls = sorted(normalize(payload).llm_calls, key=lambda c: c.ts)
    assert [c.request_model for c in calls] == ["gpt-4o", "claude-sonnet-4"]


def test_repeated_input_messages_and_unusable_ones_give_each_span_its_own_prompt():
    ask = json.dumps([{"role": "user", "parts": [{"type": "text", "content": "where is my card"}]}])

    def build(tracer):
        timed_span(tracer, "chat", {**CHAT, "gen_ai.input.messages": ask}, 1.0, 2.0)
        timed_span(tracer, "chat", {**CHAT, "gen_ai.input.messages": ask}, 3.0, 4.0)
        # An empty message list says nothing: the legacy prompt attribute decides.
        timed_span(tracer, "chat", {**CHAT, "gen_ai.input.messages": "[]",
                                    "gen_ai.prompt": "legacy prompt"}, 5.0, 6.0)
        timed_span(tracer, "chat", {**CHAT, "gen_ai.input.messages": "[]"}, 7.0, 8.0)

    payload, _ = spans_payload(build)
    calls = sorted(normalize(payload).llm_calls, key=lambda c: c.ts)
    assert [c.prompt for c in calls] == ["where is my card", "where is my card", "legacy prompt", ""]
