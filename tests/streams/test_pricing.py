"""Token pricing: look-up rules and costs, each expected number worked out by hand below.

Bundled prices used (USD per 1M tokens): gpt-4o 2.50 / 10.00 / cache 1.25; gpt-4o-mini 0.15 / 0.60 / 0.075;
gpt-4.1-mini 0.40 / 1.60; gpt-4.1-nano 0.10 / 0.40; gpt-4-turbo 10.00 / 30.00 (no cache price);
o3 2.00 / 8.00; o3-mini 1.10 / 4.40; claude-3-5-sonnet 3.00 / 15.00; gemini-2.5-pro 1.25 / 10.00.
"""

from __future__ import annotations

import json

import pytest
from streams_otlp_helpers import normalize, spans_payload, timed_span

from agentwatch.streams.normalize import Normalizer
from agentwatch.streams.otlp import decode_traces
from agentwatch.streams.pricing import ModelPrice, PricingTable


@pytest.fixture(scope="module")
def table() -> PricingTable:
    return PricingTable.load()


def test_exact_model(table):
    # 1000 * 2.50 + 500 * 10.00 = 2500 + 5000 = 7500 per 1M
    cost, priced = table.cost_usd("gpt-4o", 1000, 500)
    assert priced and cost == pytest.approx(0.0075, rel=1e-12)


@pytest.mark.parametrize("model,expected_in,expected_out", [
    ("gpt-4o-mini-2024-07-18", 0.15, 0.60),  # not gpt-4o (2.50 / 10.00)
    ("gpt-4o-2024-08-06", 2.50, 10.00),
    ("gpt-4.1-mini-2025-04-14", 0.40, 1.60),  # not gpt-4.1
    ("o3-mini-2025-01-31", 1.10, 4.40),  # not o3
    ("o3-2025-04-16", 2.00, 8.00),
    ("claude-3-5-sonnet-20241022", 3.00, 15.00),
])
def test_dated_model_prices_by_longest_prefix(table, model, expected_in, expected_out):
    cost, priced = table.cost_usd(model, 1_000_000, 1_000_000)
    assert priced and cost == pytest.approx(expected_in + expected_out, rel=1e-12)


@pytest.mark.parametrize("model,expected_in", [
    ("openai/gpt-4o-mini", 0.15),
    ("models/gemini-2.5-pro", 1.25),
    ("anthropic/claude-3-5-sonnet-20241022", 3.00),
    ("azure/openai/gpt-4.1-nano", 0.10),
    ("GPT-4o-Mini", 0.15),
    ("OpenAI/GPT-4O", 2.50),
])
def test_provider_prefixed_and_mixed_case_names(table, model, expected_in):
    cost, priced = table.cost_usd(model, 2_000_000, 0)
    assert priced and cost == pytest.approx(2 * expected_in, rel=1e-12)


def test_cache_read_priced_at_cache_rate_and_subtracted_from_input(table):
    # gpt-4o: 6000 uncached * 2.50 + 4000 cached * 1.25 + 100 out * 10.00 = 15000 + 5000 + 1000 = 21000 per 1M
    cost, _ = table.cost_usd("gpt-4o", 10_000, 100, cache_read_tokens=4000)
    assert cost == pytest.approx(0.021, rel=1e-12)
    # gpt-4o-mini: 800 * 0.15 + 200 * 0.075 = 120 + 15 = 135 per 1M
    cost, _ = table.cost_usd("gpt-4o-mini", 1000, 0, cache_read_tokens=200)
    assert cost == pytest.approx(135e-6, rel=1e-12)


def test_cache_rate_defaults_to_the_input_rate(table):
    assert table.price("gpt-4-turbo") == ModelPrice(10.0, 30.0, 10.0)
    # 1000 * 10.00, whether or not 600 of them were cache reads
    assert table.cost_usd("gpt-4-turbo", 1000, 0, 600)[0] == pytest.approx(0.01, rel=1e-12)
    assert table.cost_usd("gpt-4-turbo", 1000, 0)[0] == pytest.approx(0.01, rel=1e-12)


def test_reasoning_tokens_are_not_priced_twice():
    # o3-mini: 1000 output tokens of which 800 are reasoning -> 1000 * 4.40 = 4400 per 1M; 50 in * 1.10 = 55
    def build(tracer):
        timed_span(tracer, "chat o3-mini", {
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "o3-mini",
            "gen_ai.usage.input_tokens": 50, "gen_ai.usage.output_tokens": 1000,
            "gen_ai.usage.reasoning.output_tokens": 800}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    call = normalize(payload).llm_calls[0]
    assert (call.output_tokens, call.reasoning_tokens) == (1000, 800)
    assert call.cost_usd == pytest.approx(4455e-6, rel=1e-12)


def test_unknown_model_costs_nothing_and_is_counted():
    normalizer = Normalizer(PricingTable.load())
    assert normalizer.pricing.cost_usd("acme-llm-7b", 1000, 1000) == (0.0, False)
    assert normalizer.pricing.cost_usd("", 1000, 1000) == (0.0, False)

    def build(tracer):
        for _ in range(2):
            timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "acme-llm-7b",
                                        "gen_ai.usage.input_tokens": 10}, 1.0, 2.0)
        timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}, 1.0, 2.0)

    payload, _ = spans_payload(build)
    batch = normalizer.normalize_traces(decode_traces(payload))
    unknown = [c for c in batch.llm_calls if c.model == "acme-llm-7b"]
    assert [(c.cost_usd, c.priced) for c in unknown] == [(0.0, False), (0.0, False)]
    assert normalizer.unpriced_models == {"acme-llm-7b": 2}


def test_custom_pricing_file_by_path(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"_comment": "negotiated", "models": {
        "House-Model": {"input": 1.0, "output": 2.0},
        "house-model-xl": {"input": 4.0, "output": 8.0, "cache_read": 0.5}}}))
    table = PricingTable.load(path)
    # 100 * 1.0 + 50 * 2.0 = 200 per 1M; the dated name prices by prefix, names are case-insensitive
    assert table.cost_usd("house-model-2025", 100, 50) == (pytest.approx(200e-6, rel=1e-12), True)
    # xl: 60 uncached * 4.0 + 40 cached * 0.5 = 240 + 20 = 260 per 1M
    assert table.cost_usd("house-model-xl", 100, 0, 40) == (pytest.approx(260e-6, rel=1e-12), True)
    assert table.cost_usd("gpt-4o", 100, 50) == (0.0, False)  # the bundled table is replaced, not merged
    # a bare mapping without the "models" wrapper is accepted too, from a str path
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"m1": {"input": 3, "output": "6"}}))
    assert PricingTable.load(str(bare)).price("m1") == ModelPrice(3.0, 6.0, 3.0)


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"models": {"m": {"input": 1.0}}}),
    json.dumps({"models": {"m": {"output": 1.0}}}),
    json.dumps({"models": {"m": {"input": "cheap", "output": 1.0}}}),
    json.dumps({"models": {"m": {"input": None, "output": 1.0}}}),
    json.dumps({"models": {"m": 2.5}}),
    json.dumps({"models": {"m": [1, 2]}}),
    json.dumps({"models": ["gpt-4o"]}),
    json.dumps([{"input": 1, "output": 2}]),
    json.dumps({"models": {"m": {"input": -1.0, "output": 1.0}}}),
    '{"models": {"m": {"input": NaN, "output": 1.0}}}',
    json.dumps({"models": {"m": {"input": 1.0, "output": 1.0, "cache_read": "x"}}}),
])
def test_invalid_pricing_file_is_a_value_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        PricingTable.load(path)


def test_missing_pricing_file_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        PricingTable.load(tmp_path / "absent.json")


def test_the_price_memo_keeps_no_huge_model_names():
    from agentwatch.streams.pricing import MAX_MEMO_NAME_CHARS, PricingTable

    table = PricingTable.load()
    for i in range(20):
        assert table.price(f"{i}" + "m" * 1_000_000) is None  # hostile names: looked up, not remembered
    assert table.price("gpt-4o-mini") is not None
    assert all(len(name) <= MAX_MEMO_NAME_CHARS for name in table._memo)
    assert len(table._memo) == 1
