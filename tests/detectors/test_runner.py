"""DetectorRunner: routing by accepted type, findings order, checkpoints of all detectors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from agentwatch.detectors.cost import RetryStormDetector
from agentwatch.detectors.loops import LoopDetector
from agentwatch.detectors.runner import DetectorRunner
from agentwatch.detectors.tools import HallucinatedToolDetector
from agentwatch.events import AgentStep, Finding, GpuSample, LlmCall, Severity, ToolCall
from tests.support.synthetic import agent_traffic


class Recorder:
    """Records what it was given; reports one finding per event."""

    name: ClassVar[str] = "recorder"
    accepts: ClassVar[tuple[type, ...]] = (ToolCall,)

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def update(self, event: Any) -> tuple[Finding, ...]:
        self.seen.append(event)
        return (Finding(detector=self.name, key=event.span_id, kind="seen",
                        severity=Severity.INFO, ts=event.ts, value=0.0, threshold=0.0),)

    def snapshot(self) -> dict[str, Any]:
        return {"n": len(self.seen)}

    def restore(self, snap: dict[str, Any]) -> None:
        self.seen = [None] * snap["n"]


class LlmRecorder(Recorder):
    name: ClassVar[str] = "llm_recorder"
    accepts: ClassVar[tuple[type, ...]] = (LlmCall, ToolCall)


@dataclass(frozen=True, slots=True)
class TaggedLlmCall(LlmCall):
    tag: str = ""


def test_routes_each_event_to_the_detectors_that_accept_its_type() -> None:
    tools, both = Recorder(), LlmRecorder()
    runner = DetectorRunner([tools, both])
    events = [LlmCall(ts=1, trace_id="t", span_id="a"), ToolCall(ts=2, trace_id="t", span_id="b"),
              AgentStep(ts=3, trace_id="t", span_id="c"), GpuSample(ts=4, host="h", gpu=0),
              TaggedLlmCall(ts=5, trace_id="t", span_id="d", tag="x")]
    findings = runner.process(events)
    assert [e.span_id for e in tools.seen] == ["b"]
    assert [e.span_id for e in both.seen] == ["a", "b", "d"]  # a subclass routes like its base
    # event order first, then detector order
    assert [(f.detector, f.key) for f in findings] == [
        ("llm_recorder", "a"), ("recorder", "b"), ("llm_recorder", "b"), ("llm_recorder", "d")]
    assert runner.routes_for(GpuSample) == ()
    assert runner.update(ToolCall(ts=6, trace_id="t", span_id="e"))[0].key == "e"


def test_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError):
        DetectorRunner([Recorder(), Recorder()])


def make_runner() -> DetectorRunner:
    return DetectorRunner([LoopDetector(max_traces=50), HallucinatedToolDetector(max_traces=50),
                           RetryStormDetector()])


def test_snapshot_restore_of_all_detectors_matches_an_uninterrupted_run() -> None:
    events = agent_traffic(9, 300, traces_per_s=5.0)
    # A tool loop and a hallucinated tool inside the stream, so there is something to find.
    mid = events[len(events) // 2].ts
    events += [ToolCall(ts=mid + i, trace_id="loop", span_id=str(i), tool_name="search",
                        arguments='{"query": "x"}') for i in range(4)]
    events += [LlmCall(ts=mid + 5, trace_id="loop", span_id="l",
                       tool_definitions='[{"name": "search"}]',
                       requested_tool_calls='[{"name": "rm_rf", "arguments": "{}"}]')]
    events.sort(key=lambda e: e.ts)
    reference = make_runner().process(events)
    assert {f.kind for f in reference} >= {"repeated_tool_call", "undeclared_tool"}
    for split in (1, len(events) // 3, len(events) // 2 + 3):
        first = make_runner()
        head = first.process(events[:split])
        snap = json.loads(json.dumps(first.snapshot()))
        assert sorted(snap) == ["agent_loop", "hallucinated_tool", "retry_storm"]
        second = make_runner()
        second.restore(snap)
        assert head + second.process(events[split:]) == reference
    sizes = second.state_sizes()
    assert sizes["agent_loop"] <= 50 and sizes["hallucinated_tool"] <= 50


def test_restore_tolerates_added_and_removed_detectors() -> None:
    old = DetectorRunner([Recorder()])
    old.process([ToolCall(ts=1, trace_id="t", span_id="a")])
    snap = {**old.snapshot(), "gone": {"x": 1}}
    new = DetectorRunner([Recorder(), LlmRecorder()])
    new.restore(snap)
    assert len(new.detectors["recorder"].seen) == 1 and new.detectors["llm_recorder"].seen == []


def test_bench_functions_report_bounded_state_and_no_findings() -> None:
    from bench.detector_state import bench_detectors, bench_trace_state

    state = bench_trace_state(3_000, max_traces=500, chunk_traces=500)
    assert state["events"] == 9_000 and state["findings"] == 0
    assert state["traces_at_cap"] == 500
    assert state["state_sizes"]["agent_loop"] == 500
    assert state["state_sizes"]["hallucinated_tool"] == 500
    assert state["events_per_s"] > 0 and state["rss_end_mb"] > 0
    speed = bench_detectors(300, repeat=1)
    assert speed["findings"] == 0 and speed["events"] > 1_500
    assert set(speed["per_detector_events_per_s"]) == {
        "cost_anomaly", "budget", "retry_storm", "agent_loop", "hallucinated_tool", "slo"}
