"""What the normaliser keeps across batches is bounded in bytes as well as entries.

Payloads run from tiny and typical through huge (5 MB prompts) to hostile (hundreds of distinct
multi-megabyte prompts, random attribute names, malformed long ids). Requests are real OTLP
protobuf: the SDK makes a template span, the large texts are put into its attribute through the
protobuf API (the SDK would take seconds to copy 600 MB of prompts through its own span model).
"""

from __future__ import annotations

import gc
import json
import random
import sys
import tracemalloc
from typing import Any

import orjson
import pytest
from streams_otlp_helpers import pricing, spans_payload, timed_span

from agentwatch.detectors.bounded import ENTRY_OVERHEAD_BYTES, BoundedMemo, approx_size
from agentwatch.streams.normalize import NormalizedBatch, Normalizer
from agentwatch.streams.otlp import decode_traces

MB = 1 << 20
CLIP = 8192  # Normalizer's default max_text_chars
_FILLER = "lorem ipsum dolor sit amet " * (5 * MB // 27 + 1)  # ASCII, nothing JSON must escape


def _memo_state_holds(memo: BoundedMemo[Any, Any]) -> None:
    """Both caps hold, and the running byte count is what the entries held now add up to."""
    assert len(memo) <= memo.max_entries
    assert memo.bytes <= memo.max_bytes
    sizes = [memo._size(k, v) + ENTRY_OVERHEAD_BYTES for k, v in memo.entries.items()]
    assert memo.bytes == sum(sizes)
    assert all(size <= memo.max_entry_bytes for size in sizes)


def _all_memos_hold(normalizer: Normalizer) -> None:
    for memo in normalizer.memos().values():
        _memo_state_holds(memo)


def _messages(user_text: str) -> str:
    return f'[{{"role":"system","content":"be brief"}},{{"role":"user","content":"{user_text}"}}]'


class _ChatRequests:
    """One SDK-made chat span whose input messages (and tool definitions) each request replaces."""

    def __init__(self, **extra: Any) -> None:
        attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                 "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3,
                 "gen_ai.input.messages": "-", "gen_ai.tool.definitions": "-", **extra}
        payload, _ = spans_payload(lambda tracer: timed_span(tracer, "chat", attrs, 1.0, 2.0))
        self.request = decode_traces(payload)
        span = self.request.resource_spans[0].scope_spans[0].spans[0]
        self.span = span
        self._values = {a.key: a.value for a in span.attributes}

    def payload(self, messages: str, tools: str = "[]") -> bytes:
        self._values["gen_ai.input.messages"].string_value = messages
        self._values["gen_ai.tool.definitions"].string_value = tools
        return self.request.SerializeToString()


def _run(normalizer: Normalizer, payload: bytes) -> NormalizedBatch:
    batch = normalizer.normalize_traces(decode_traces(payload))
    assert batch.failures == []
    return batch


# -- BoundedMemo ------------------------------------------------------------------------------

def _entry(key: str, value: str) -> int:
    return approx_size(key) + approx_size(value) + ENTRY_OVERHEAD_BYTES


def test_memo_evicts_the_least_recently_used_entry_past_its_entry_cap():
    memo: BoundedMemo[str, str] = BoundedMemo(max_entries=3, max_bytes=10_000)
    for key in "abc":
        assert memo.put(key, key.upper())
    assert memo.get("a") == "A"  # a is now the most recently used
    memo.put("d", "D")
    assert list(memo.entries) == ["c", "a", "d"]
    assert "b" not in memo and memo.get("b") is None
    _memo_state_holds(memo)


def test_memo_evicts_by_bytes_and_does_not_keep_an_entry_over_its_ceiling():
    small = _entry("k0", "x" * 100)
    memo: BoundedMemo[str, str] = BoundedMemo(max_entries=100, max_bytes=4 * small, max_entry_bytes=2 * small)
    for i in range(4):
        assert memo.put(f"k{i}", "x" * 100)
    assert memo.bytes == 4 * small
    assert memo.put("k4", "x" * 100)  # a fifth goes over the bytes, not the entries
    assert list(memo.entries) == ["k1", "k2", "k3", "k4"]
    assert not memo.put("big", "x" * (2 * small))  # over the per-entry ceiling: not memoised
    assert "big" not in memo and len(memo) == 4 and memo.bytes == 4 * small
    big = "y" * (small + 100)  # under the ceiling, two small entries' worth: both oldest go
    assert memo.put("k5", big)
    assert list(memo.entries) == ["k3", "k4", "k5"]
    _memo_state_holds(memo)


def test_memo_default_ceiling_is_an_eighth_of_its_budget():
    memo: BoundedMemo[str, str] = BoundedMemo(max_entries=10, max_bytes=8000)
    assert memo.max_entry_bytes == 1000
    assert not memo.put("k", "x" * 1000)
    assert memo.put("k", "x" * 500)


def test_memo_replacing_a_key_keeps_its_accounting():
    memo: BoundedMemo[str, str] = BoundedMemo(max_entries=10, max_bytes=100_000)
    memo.put("k", "x" * 10)
    memo.put("k", "x" * 5000)
    assert memo.bytes == _entry("k", "x" * 5000)
    assert not memo.put("k", "x" * 20_000)  # too large now: the stale value goes too
    assert "k" not in memo and memo.bytes == 0
    _memo_state_holds(memo)


def test_memo_with_a_zero_cap_holds_nothing():
    for memo in (BoundedMemo(0, 10_000), BoundedMemo(10, 0)):
        assert not memo.put("k", "v")
        assert len(memo) == 0 and memo.bytes == 0


@pytest.mark.parametrize("kwargs", [dict(max_entries=-1, max_bytes=1), dict(max_entries=1, max_bytes=-1),
                                    dict(max_entries=1, max_bytes=10, max_entry_bytes=11)])
def test_memo_rejects_impossible_caps(kwargs):
    with pytest.raises(ValueError):
        BoundedMemo(**kwargs)


def test_approx_size_depends_on_the_value_only():
    # sys.getsizeof of a non-ASCII str grows once its UTF-8 form is cached (orjson caches it),
    # so an entry sized that way would leave the memo with a different size than it came in.
    text = '["' + "\u00e9" * 100 + '"]'
    before, size = sys.getsizeof(text), approx_size(text)
    orjson.loads(text)
    assert sys.getsizeof(text) > before
    assert approx_size(text) == size >= sys.getsizeof(text)  # 4 a character covers Latin-1 text
    assert approx_size("x" * 1000) == sys.getsizeof("x" * 1000)  # exact for ASCII


# -- the normaliser across the range of payload sizes --------------------------------------

def test_tiny_and_typical_traffic_meets_the_entry_caps_long_before_the_bytes():
    def build(tracer):
        for i in range(4200):  # past the prompt memo's 4096 entries, each prompt distinct
            parent = timed_span(tracer, "agent", {"gen_ai.operation.name": "invoke_agent"}, 1.0, 3.0)
            timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                                        "gen_ai.input.messages": _messages(f"question {i}")}, 1.0, 2.0, parent=parent)

    payload, _ = spans_payload(build)
    normalizer = Normalizer(pricing(), parent_memory=1000)
    batch = _run(normalizer, payload)
    assert [row["prompt"] for row in batch.llm_call_rows[:2]] == ["question 0", "question 1"]
    memos = normalizer.memos()
    assert len(memos["prompts"]) == memos["prompts"].max_entries == 4096
    assert memos["prompts"].bytes < memos["prompts"].max_bytes // 16
    assert len(memos["llm_parents"]) == 1000
    assert memos["llm_parents"].bytes < memos["llm_parents"].max_bytes // 64
    _all_memos_hold(normalizer)


def test_huge_prompts_are_not_memoised():
    requests = _ChatRequests()
    normalizer = Normalizer(pricing())
    memo = normalizer.memos()["prompts"]
    for i in range(3):
        user_text = f"{i} {_FILLER[:5 * MB]}"
        batch = _run(normalizer, requests.payload(_messages(user_text)))
        assert batch.llm_call_rows[0]["prompt"] == user_text[:CLIP]
    assert len(memo) == 0 and memo.bytes == 0  # a 5 MB text is over the 4 MiB ceiling
    _all_memos_hold(normalizer)


def test_hostile_distinct_multi_megabyte_prompts_stay_within_every_budget():
    requests = _ChatRequests()
    normalizer = Normalizer(pricing())
    memos = normalizer.memos()
    _run(normalizer, requests.payload(_messages("warm up")))
    gc.collect()
    tracemalloc.start()
    try:
        retained_before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            user_text = f"{i:03d} {_FILLER[:(i % 5 + 1) * MB]}"  # 1 to 5 MB, every one distinct
            tools = json.dumps([{"type": "function", "function": {
                "name": f"tool_{i}", "description": _FILLER[:(i % 4) * 256 * 1024],
                "parameters": {"type": "object"}}}])
            batch = _run(normalizer, requests.payload(_messages(user_text), tools))
            row = batch.llm_call_rows[0]
            assert row["prompt"] == user_text[:CLIP]
            assert json.loads(row["tool_definitions"])[0]["name"] == f"tool_{i}"
            _all_memos_hold(normalizer)
            del batch, row, user_text, tools
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - retained_before
    finally:
        tracemalloc.stop()
    # 1 MB prompts were memoised (up to the 32 MiB budget) and then evicted by bytes.
    assert memos["prompts"].bytes > memos["prompts"].max_bytes // 2
    assert 0 < len(memos["prompts"]) < 40
    # What the normaliser still holds is what its memos account for, not the 600 MB it read.
    accounted = sum(memo.bytes for memo in memos.values())
    assert retained <= accounted + 2 * MB, (retained, accounted)


def test_hostile_attribute_names_stay_within_the_layout_budget():
    rng = random.Random(7)

    def build(tracer):
        for _ in range(300):
            attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
            attrs.update({"x." + "".join(rng.choices("abcdefgh", k=200)): 1 for _ in range(20)})
            timed_span(tracer, "chat", attrs, 1.0, 2.0)

    payload, _ = spans_payload(build)
    normalizer = Normalizer(pricing(), layout_memo_bytes=3 * MB)
    batch = _run(normalizer, payload)
    assert {row["model"] for row in batch.llm_call_rows} == {"gpt-4o"}
    layouts = normalizer.memos()["llm_layouts"]
    assert layouts.max_bytes == MB
    assert layouts.bytes > MB // 2 and len(layouts) < 300  # evicted by bytes, entry cap far off
    _all_memos_hold(normalizer)


def test_malformed_long_parent_ids_are_not_remembered_and_stay_within_budget():
    requests = _ChatRequests()
    normalizer = Normalizer(pricing(), parent_memory_bytes=256 * 1024)
    parents = normalizer.memos()["llm_parents"]
    requests.span.parent_span_id = b"\x01" * 4096  # an 8192-character key: over the ceiling
    _run(normalizer, requests.payload(_messages("hi")))
    assert len(parents) == 0
    for i in range(500):  # 2000-character keys: each kept, the budget evicts
        requests.span.parent_span_id = i.to_bytes(1000, "big")
        _run(normalizer, requests.payload(_messages("hi")))
        _memo_state_holds(parents)
    assert 0 < len(parents) < 500 and parents.bytes > parents.max_bytes // 2


def test_unpriced_model_names_are_counted_cut_short():
    requests = _ChatRequests(**{"gen_ai.request.model": "m" * MB})
    normalizer = Normalizer(pricing())
    _run(normalizer, requests.payload(_messages("hi")))
    assert normalizer.unpriced_models == {"m" * 256: 1}


@pytest.mark.parametrize("name", ["parent_memory_bytes", "prompt_memo_bytes", "tool_definitions_memo_bytes",
                                  "layout_memo_bytes"])
def test_negative_budgets_are_rejected(name):
    with pytest.raises(ValueError, match=name):
        Normalizer(pricing(), **{name: -1})


# -- memo hits change nothing ------------------------------------------------------------------

def _typical(tracer):
    tools = json.dumps([{"type": "function", "function": {"name": "get_weather",
                                                          "parameters": {"type": "object"}}}])
    agent = timed_span(tracer, "invoke_agent", {"gen_ai.operation.name": "invoke_agent",
                                                "gen_ai.agent.name": "planner"}, 1.0, 9.0)
    for step in range(3):
        messages = [{"role": "user", "content": "weather in Oslo?"}]
        messages += [{"role": "assistant", "content": f"step {s}"} for s in range(step)]
        timed_span(tracer, "chat", {
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.provider.name": "openai",
            "gen_ai.usage.input_tokens": 40 + step, "gen_ai.usage.output_tokens": 7,
            "gen_ai.input.messages": json.dumps(messages), "gen_ai.tool.definitions": tools,
            "gen_ai.output.messages": json.dumps([{"role": "assistant", "content": "sunny"}]),
        }, 1.0 + step, 2.0 + step, parent=agent)
        timed_span(tracer, "execute_tool get_weather", {"gen_ai.operation.name": "execute_tool",
                                                        "gen_ai.tool.name": "get_weather"},
                   2.0 + step, 2.5 + step, parent=agent)
    # OpenLLMetry's indexed attributes: no input-messages JSON, the other conventions decide.
    timed_span(tracer, "openai.chat", {"llm.request.type": "chat", "gen_ai.request.model": "gpt-4o-mini",
                                       "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": "hello"},
               3.0, 4.0, parent=agent)


def _tiny(tracer):
    timed_span(tracer, "chat", {"gen_ai.operation.name": "chat"}, 1.0, 2.0)


def _huge(tracer):
    tools = json.dumps([{"name": "t", "description": _FILLER[:MB]}])
    for i in range(2):  # the same 5 MB conversation twice, and a 2 MB one that is memoised
        timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                                    "gen_ai.input.messages": _messages(_FILLER[:5 * MB]),
                                    "gen_ai.tool.definitions": tools}, 1.0 + i, 2.0 + i)
    timed_span(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.input.messages": _messages(_FILLER[:2 * MB])},
               3.0, 4.0)


@pytest.mark.parametrize("build", [_tiny, _typical, _huge], ids=["tiny", "typical", "huge"])
def test_rows_are_the_same_with_and_without_memo_hits(build):
    payload, _ = spans_payload(build)
    memoising = Normalizer(pricing())
    first = _run(memoising, payload)
    held = {name: len(memo) for name, memo in memoising.memos().items()}
    again = _run(memoising, payload)  # every memoised text and layout is a hit now
    assert {name: len(memo) for name, memo in memoising.memos().items()} == held
    not_memoising = Normalizer(pricing(), prompt_memo_bytes=0, tool_definitions_memo_bytes=0, layout_memo_bytes=0)
    cold = _run(not_memoising, payload)
    assert all(len(memo) == 0 for name, memo in not_memoising.memos().items() if name != "llm_parents")
    for rows in ("llm_call_rows", "tool_call_rows", "agent_step_rows"):
        assert getattr(first, rows) == getattr(again, rows) == getattr(cold, rows)
    assert first.llm_call_rows  # every payload has a model call to compare
    if build is _typical:
        assert held["prompts"] == 3 and held["tool_definitions"] == 1
    if build is _huge:
        assert held["prompts"] == 1 and held["tool_definitions"] == 1  # the 2 MB text, the tools
