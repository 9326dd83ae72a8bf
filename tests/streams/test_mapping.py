"""The user-declared mapping (issue 16 part 4): spans in a team's own shape become rows.

Price used below (streams/pricing.json): gpt-4o-mini 0.15 USD per 1M input tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streams_otlp_helpers import normalize, pricing, spans_payload, timed_span

from agentwatch.streams.mapping import LATENCY_MS, MappingError, MappingRules
from agentwatch.streams.normalize import Normalizer

EXAMPLE = Path(__file__).resolve().parents[2] / "streams" / "mapping.example.yaml"
# The span shape generic advice produces, plus the prompt text.
AI_INFERENCE = {"prompt.length": 11, "prompt.text": "hello world", "user.id": "u-42",
                "inference.duration": 1.5, "tokens.consumed": 1000}


def _rules(text: str) -> MappingRules:
    return MappingRules.parse(text, "mapping.yaml")


def _payload(name, attrs, start_s=100.0, end_s=102.0):
    return spans_payload(lambda tracer: timed_span(tracer, name, attrs, start_s, end_s))[0]


def _mapped(rules, name, attrs, start_s=100.0, end_s=102.0):
    return normalize(_payload(name, attrs, start_s, end_s), Normalizer(pricing(), mapping=rules))


def test_the_example_maps_the_ai_inference_span_into_an_llm_call():
    batch = _mapped(MappingRules.load(EXAMPLE), "ai_inference", AI_INFERENCE)
    assert not batch.failures and not batch.tool_call_rows and not batch.agent_step_rows
    [row] = batch.llm_call_rows
    assert row["model"] == "gpt-4o-mini" and row["provider"] == "openai" and row["operation"] == "chat"
    assert row["input_tokens"] == 1000 and row["output_tokens"] == 0
    assert row["cost_usd"] == pytest.approx(1000 * 0.15 / 1e6) and row["priced"]
    assert row["user"] == "u-42"
    assert row["prompt"] == "hello world"
    assert row["latency_ms"] == pytest.approx(1500.0)  # declared 1.5 s, not the span's 2 s
    assert row["ts"] == 102.0 and row["invalid_fields"] == ""


def test_without_a_mapping_the_same_span_gives_nothing():
    batch = normalize(_payload("ai_inference", AI_INFERENCE))
    assert batch.spans == 1 and batch.events == 0


def test_the_rule_needs_its_attribute_present():
    attrs = {k: v for k, v in AI_INFERENCE.items() if k != "tokens.consumed"}
    assert _mapped(MappingRules.load(EXAMPLE), "ai_inference", attrs).events == 0


def test_the_example_maps_tool_spans_with_their_name_arguments_and_latency_in_ms():
    attrs = {"tool.name": "get_order", "tool.args": '{"order_id": "A-1"}', "tool.duration_ms": 250}
    [row] = _mapped(MappingRules.load(EXAMPLE), "tool.get_order", attrs).tool_call_rows
    assert (row["tool_name"], row["arguments"], row["latency_ms"]) == ("get_order", '{"order_id": "A-1"}', 250.0)


@pytest.mark.parametrize(("unit", "value", "ms"), [("s", 1.5, 1500.0), ("ms", 1500, 1500.0),
                                                   ("us", 1_500_000, 1500.0), ("ns", 2_500_000_000, 2500.0),
                                                   ("s", "0.25", 250.0)])
def test_latency_is_scaled_to_milliseconds(unit, value, ms):
    rules = _rules(f"""rules:
  - match: {{span_name: work}}
    kind: agent_step
    fields:
      latency: {{attr: took, unit: {unit}}}
""")
    assert rules.apply("work", "", {"took": value})[LATENCY_MS] == pytest.approx(ms)
    [row] = _mapped(rules, "work", {"took": value}, 10.0, 20.0).agent_step_rows
    assert row["latency_ms"] == pytest.approx(ms)
    assert row["start_ts"] == pytest.approx(20.0 - ms / 1000)  # the declared duration before its end


def test_a_latency_that_is_not_a_number_leaves_the_span_times():
    rules = _rules("rules:\n  - match: {span_name: work}\n    kind: agent_step\n"
                   "    fields: {latency: {attr: took, unit: s}}\n")
    [row] = _mapped(rules, "work", {"took": "soon"}, 10.0, 12.0).agent_step_rows
    assert row["latency_ms"] == pytest.approx(2000.0)


def test_a_negative_declared_latency_is_nulled_and_flagged_like_any_implausible_one():
    rules = _rules("rules:\n  - match: {span_name: work}\n    kind: agent_step\n"
                   "    fields: {latency: {attr: took, unit: s}}\n")
    [row] = _mapped(rules, "work", {"took": -3}, 10.0, 12.0).agent_step_rows
    assert row["latency_ms"] is None and "latency_ms" in row["invalid_fields"]


def test_the_latency_attribute_as_sent_is_not_honoured():
    rules = _rules("rules:\n  - match: {span_name: work}\n    kind: agent_step\n")
    [row] = _mapped(rules, "work", {LATENCY_MS: 5.0}, 10.0, 12.0).agent_step_rows
    assert row["latency_ms"] == pytest.approx(2000.0)


def test_first_match_wins():
    rules = _rules("""rules:
  - name: needs tokens
    match: {span_name: "ai_*", has: [tokens]}
    kind: llm_call
  - name: any ai span
    match: {span_name_regex: "ai_(inference|call)"}
    kind: tool_call
  - name: never reached
    match: {span_name: ai_inference}
    kind: agent_step
""")
    assert rules.match("ai_inference", "", {"tokens": 3}).name == "needs tokens"
    assert rules.match("ai_inference", "", {}).name == "any ai span"
    assert rules.apply("ai_call", "", {})["gen_ai.operation.name"] == "execute_tool"
    assert rules.match("ai_callback", "", {}) is None  # the regex is matched over the whole name


def test_scope_and_constants():
    rules = _rules("""rules:
  - match: {scope: "acme.*"}
    kind: llm_call
    fields:
      model: {value: gpt-4o}
      project: {value: checkout}
      output_tokens: {attr: [out.tokens, tokens.out], default: 0}
""")
    assert rules.match("x", "other", {}) is None
    mapped = rules.apply("x", "acme.llm", {"tokens.out": 7})
    assert mapped["gen_ai.request.model"] == "gpt-4o" and mapped["agentwatch.project"] == "checkout"
    assert mapped["gen_ai.usage.output_tokens"] == 7 and mapped["tokens.out"] == 7  # the original stays
    assert rules.apply("x", "acme.llm", {})["gen_ai.usage.output_tokens"] == 0


def test_a_span_no_rule_matches_is_returned_unchanged():
    rules = MappingRules.load(EXAMPLE)
    attrs = {"http.method": "GET"}
    assert rules.apply("GET /orders", "flask", attrs) is attrs
    assert attrs == {"http.method": "GET"}


def test_the_decision_memo_is_bounded():
    rules = MappingRules.load(EXAMPLE)
    for i in range(10_000):
        rules.apply(f"span-{i}", "scope", {})
    assert 0 < rules.memo_size() <= 4096


def test_native_spans_still_read_when_a_mapping_is_given():
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 10}
    [row] = _mapped(MappingRules.load(EXAMPLE), "chat gpt-4o", attrs).llm_call_rows
    assert row["model"] == "gpt-4o" and row["latency_ms"] == pytest.approx(2000.0)


@pytest.mark.parametrize(("text", "line", "message"), [
    ("rules:\n  - match: {span_name: a}\n    kind: llm_call\n    fields:\n      model: m\n\n      tokns_in: t\n",
     7, "unknown field 'tokns_in' (known: model, provider, input_tokens"),
    ("rules:\n  - match: {span_name: a}\n    kind: agent_step\n    fields:\n      latency: {attr: d, unit: sec}\n",
     5, "unknown unit 'sec' (known: s, ms, us, ns)"),
    ("rules:\n  - match: {span_name: a}\n    kind: agent_step\n    fields:\n      latency: d\n",
     5, "latency needs a unit"),
    ("rules:\n  - match: {span_name: a}\n    kind: llm_call\n  - match:\n      span_name_regex: 'ai_(x'\n"
     "    kind: llm_call\n", 5, "bad regex 'ai_(x'"),
    ("rules:\n  - match: {span_name: a}\n    kind: llm_call\n  - name: no kind\n    match: {span_name: b}\n",
     4, "rule 2 has no kind"),
    ("rules:\n  - match: {span_name: a}\n    kind: llm_cal\n", 3, "unknown kind 'llm_cal'"),
    ("rules:\n  - kind: llm_call\n", 2, "rule 1 has no match"),
    ("rules:\n  - match: {span_name: a}\n    kind: tool_call\n    fields: {model: m}\n", 4,
     "field 'model' does not apply to kind tool_call"),
    ("rules:\n  - match: {span_nme: a}\n    kind: llm_call\n", 2, "unknown match condition 'span_nme'"),
    ("rules:\n  - match: {span_name: a}\n    kind: llm_call\n    fields: {model: {attr: m, value: x}}\n", 4,
     "give attr (attribute names) or value"),
    ("rules:\n  - match: {span_name: a}\n    kind: llm_call\n    fields:\n      model: {attr: m, unit: s}\n", 5,
     "unit applies to latency only"),
    ("rules: [\n", 2, "not valid YAML"),
    ("rulez: []\n", 1, "unknown top-level key 'rulez'"),
])
def test_an_invalid_file_is_refused_with_its_line(text, line, message):
    with pytest.raises(MappingError) as err:
        _rules(text)
    assert str(err.value).startswith(f"mapping.yaml line {line}: ")
    assert message in str(err.value)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "mapping.yaml"
    path.write_text("rules:\n  - match: {span_name: a}\n    kind: nope\n")
    with pytest.raises(MappingError, match=rf"^{path} line 3: unknown kind 'nope'"):
        MappingRules.load(path)
    with pytest.raises(MappingError, match="cannot read"):
        MappingRules.load(tmp_path / "missing.yaml")


def test_the_worker_and_the_normaliser_process_are_given_the_mapping(tmp_path):
    import asyncio

    from agentwatch.broker import DEFAULT_TOPICS
    from agentwatch.settings import Settings
    from agentwatch.streams.normalizer_process import NormalizerProcess
    from agentwatch.streams.worker import build_dataflow

    settings = Settings(data_dir=tmp_path, detector_checkpoint_s=0, mapping_path=EXAMPLE)
    mapping = build_dataflow(settings).mapper.normalizer.mapping
    assert [r.name for r in mapping.rules] == ["ai_inference", "tools"]
    process = NormalizerProcess(settings, dict(DEFAULT_TOPICS))
    try:
        outcome = asyncio.run(process(_payload("ai_inference", AI_INFERENCE)))
    finally:
        process.shutdown()
    assert outcome.dead_letter_reason is None
    assert [topic for topic, _, _ in outcome.outputs].count("llm_calls") == 1


def test_start_refuses_an_invalid_mapping(tmp_path, monkeypatch):
    import click

    from agentwatch.cli import _pipeline_settings

    path = tmp_path / "m.yaml"
    path.write_text("rules:\n  - match: {span_name: a}\n    kind: llm_call\n    fields: {tokns_in: t}\n")
    monkeypatch.setenv("AGENTWATCH_MAPPING_PATH", str(path))
    with pytest.raises(click.ClickException, match="m.yaml line 4: unknown field 'tokns_in'"):
        _pipeline_settings()
    monkeypatch.setenv("AGENTWATCH_MAPPING_PATH", str(EXAMPLE))
    assert _pipeline_settings().mapping_path == EXAMPLE


def test_a_constant_latency_and_agent():
    rules = _rules("rules:\n  - match: {has: [job.id]}\n    kind: agent_step\n"
                   "    fields: {latency: {value: 2, unit: s}, agent: {value: batcher}}\n")
    [row] = _mapped(rules, "run", {"job.id": "j1"}, 10.0, 11.0).agent_step_rows
    assert row["latency_ms"] == pytest.approx(2000.0) and row["agent"] == "batcher"
