"""LoopDetector on hand-built traces with the firing index worked out per signal."""

from __future__ import annotations

import json
import random

import pytest

from agentwatch.detectors.loops import LoopDetector, canonical_arguments, periodic_tail
from agentwatch.events import AgentStep, LlmCall, ToolCall

T0 = 1_700_000_000.0


def tool(ts: float, name: str, args: str, trace: str = "t1") -> ToolCall:
    return ToolCall(ts=T0 + ts, trace_id=trace, span_id=f"t{ts}", tool_name=name, arguments=args)


def llm(ts: float, *, trace: str = "t1", tokens: int = 1000, prompt: str = "", cost: float = 0.01,
        requested: list[tuple[str, str]] = (), latency_ms: float = 0.0) -> LlmCall:
    req = json.dumps([{"name": n, "arguments": a, "id": f"c{i}"}
                      for i, (n, a) in enumerate(requested)]) if requested else ""
    return LlmCall(ts=T0 + ts, trace_id=trace, span_id=f"l{ts}", service="helpdesk",
                   input_tokens=tokens, output_tokens=0, prompt=prompt, cost_usd=cost,
                   requested_tool_calls=req, latency_ms=latency_ms)


def agent(ts: float, name: str, operation: str = "invoke_agent", trace: str = "t1") -> AgentStep:
    return AgentStep(ts=T0 + ts, trace_id=trace, span_id=f"a{ts}", agent=name,
                     operation=operation, name=f"{operation} {name}")


def fired(det: LoopDetector, events) -> list[tuple[int, str, bool]]:
    return [(i, f.kind, f.resolved) for i, e in enumerate(events) for f in det.update(e)]


def test_same_tool_same_canonical_arguments_three_times() -> None:
    events = [tool(0, "search", '{"q": "refund", "n": 3}'),
              tool(1, "search", '{"q": "other", "n": 3}'),
              tool(2, "search", '{"n":3,"q":"refund"}'),
              tool(3, "fetch", '{"q": "refund", "n": 3}'),
              tool(4, "search", ' {"q":"refund", "n":3} ')]
    det = LoopDetector()
    found = [(i, f) for i, e in enumerate(events) for f in det.update(e)]
    assert [(i, f.kind) for i, f in found] == [(4, "repeated_tool_call")]
    f = found[0][1]
    assert f.key == "t1" and f.value == 3.0 and f.threshold == 3.0
    assert f.evidence["tool"] == "search" and f.evidence["arguments"] == '{"n":3,"q":"refund"}'
    assert f.evidence["tool_calls"] == 5 and f.evidence["source"] == "executed"


def test_requested_and_executed_calls_are_not_summed() -> None:
    args = '{"city": "Oslo"}'
    events = []
    for k in range(3):
        events.append(llm(10 * k, requested=[("get_weather", args)], cost=0.5))
        events.append(tool(10 * k + 1, "get_weather", args))
    det = LoopDetector()
    found = [(i, f) for i, e in enumerate(events) for f in det.update(e)]
    # Summed, request + execution would reach 3 at index 2. Separately, the third request
    # (index 4) is the first to reach 3.
    assert [(i, f.kind, f.evidence["source"]) for i, f in found] == [
        (4, "repeated_tool_call", "requested")]
    assert found[0][1].evidence["cost_usd"] == pytest.approx(1.5)


def test_agent_handoff_cycle() -> None:
    events = [agent(i, "ab"[i % 2]) for i in range(8)]
    det = LoopDetector()
    found = [(i, f) for i, e in enumerate(events) for f in det.update(e)]
    assert [(i, f.kind) for i, f in found] == [(5, "step_cycle")]
    assert found[0][1].evidence["cycle"] == ["agent:a", "agent:b"]
    assert found[0][1].evidence["period"] == 2


def test_react_graph_nodes_and_progressing_tools_are_not_cycles() -> None:
    rng = random.Random(5)
    events = []
    for i in range(12):  # LangGraph ReAct: agent -> tools -> agent -> ... as chain spans
        events.append(agent(2 * i, "agent" if i % 2 == 0 else "tools", operation="chain"))
        # alternating tools, new arguments every time: progress, not a loop
        events.append(tool(2 * i + 1, "search" if i % 2 == 0 else "fetch",
                           json.dumps({"q": rng.random()})))
    assert fired(LoopDetector(), events) == []


def test_three_step_cycle_with_same_arguments() -> None:
    steps = [("search", '{"q": 1}'), ("fetch", '{"u": "x"}'), ("summarise", "{}")]
    events = [tool(i, *steps[i % 3]) for i in range(12)]
    det = LoopDetector(max_same_tool_calls=10)
    # Period 3 repeated 3 times needs 9 steps: index 8.
    assert fired(det, events) == [(8, "step_cycle", False)]


def test_too_many_steps_fires_on_the_26th_model_call() -> None:
    events = [llm(i, tokens=1000 + 10 * i) for i in range(30)]
    det = LoopDetector()
    found = [(i, f) for i, e in enumerate(events) for f in det.update(e)]
    assert [(i, f.kind, f.value) for i, f in found] == [(25, "too_many_steps", 26.0)]


def test_runaway_tokens() -> None:
    doubling = [llm(i, tokens=2000 * 2 ** i) for i in range(6)]
    det = LoopDetector()
    found = [(i, f) for i, e in enumerate(doubling) for f in det.update(e)]
    # Streak of 2x growth is i at call i; the streak is >= 3 from i=3 but 16k < 32k tokens,
    # so the first call over both bars is i=4 (32k).
    assert [(i, f.kind) for i, f in found] == [(4, "runaway_tokens")]
    assert found[0][1].evidence["tokens_per_call"] == [4000, 8000, 16000, 32000]
    linear = [llm(i, tokens=1000 * (i + 1)) for i in range(24)]  # context accumulating
    assert fired(LoopDetector(), linear) == []


def test_near_identical_prompts() -> None:
    same = [llm(i, tokens=500, prompt=f"check status at 10:00:0{i} attempt {i}") for i in range(4)]
    assert fired(LoopDetector(), same) == [(2, "near_identical_prompts", False)]
    growing = [llm(i, tokens=500 + 400 * i, prompt=f"check status attempt {i}") for i in range(4)]
    assert fired(LoopDetector(), growing) == []
    different = [llm(i, tokens=500, prompt=f"question about {w}")
                 for i, w in enumerate(["refunds", "orders", "weather", "hotels"])]
    assert fired(LoopDetector(), different) == []


def test_trace_too_long_counts_from_the_first_span_start() -> None:
    # The first call started 5 s before it ended; 1800 s after its end the trace is 1805 s old.
    events = [llm(0, latency_ms=5000), llm(600), llm(1200), llm(1800), llm(2400)]
    det = LoopDetector()
    found = [(i, f) for i, e in enumerate(events) for f in det.update(e)]
    assert [(i, f.kind, f.value) for i, f in found] == [(3, "trace_too_long", 1805.0)]


def test_idle_trace_resolves_what_fired_and_eviction_does_too() -> None:
    loop = [tool(i, "search", '{"q": 1}') for i in range(3)]
    later = [llm(1000, trace="t2")]
    det = LoopDetector(trace_ttl_s=900)
    found = [(i, f) for i, e in enumerate(loop + later) for f in det.update(e)]
    assert [(i, f.kind, f.resolved, f.key) for i, f in found] == [
        (2, "repeated_tool_call", False, "t1"), (3, "repeated_tool_call", True, "t1")]
    assert found[1][1].evidence["reason"] == "trace idle for trace_ttl_s"
    assert det.state_size() == 1

    det = LoopDetector(max_traces=2)
    events = loop + [llm(4, trace="t2"), llm(5, trace="t3")]
    assert fired(det, events) == [(2, "repeated_tool_call", False),
                                  (4, "repeated_tool_call", True)]
    assert det.state_size() == 2


def test_each_kind_fires_once_per_trace() -> None:
    events = [tool(i, "search", '{"q": 1}') for i in range(10)]
    assert fired(LoopDetector(), events) == [(2, "repeated_tool_call", False)]


def test_helpers() -> None:
    assert canonical_arguments('{"b": [1, {"d": 1, "c": 2}], "a": null}') == \
        '{"a":null,"b":[1,{"c":2,"d":1}]}'
    assert canonical_arguments(" not json ") == "not json"
    assert periodic_tail(list("ABCABCABC"), 4, 3) == 3
    assert periodic_tail(list("AAAAAAAA"), 4, 3) == 0  # one label: repeated calls, not a cycle
    assert periodic_tail(list("ABABAC"), 4, 3) == 0


@pytest.mark.parametrize("kwargs", [{"max_same_tool_calls": 1}, {"max_steps": 0},
                                    {"runaway_growth": 1.0}, {"max_traces": 0},
                                    {"trace_ttl_s": 0}, {"min_cycle_repeats": 1}])
def test_rejects_bad_config(kwargs) -> None:
    with pytest.raises(ValueError):
        LoopDetector(**kwargs)
