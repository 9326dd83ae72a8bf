"""Healthy traffic pages nobody: 100k+ model calls across services, projects, models and users
through every detector of issue 3 with its default settings."""

from __future__ import annotations

from collections import Counter

from agentwatch.detectors.cost import BudgetDetector, CostAnomalyDetector, RetryStormDetector
from agentwatch.detectors.loops import LoopDetector
from agentwatch.detectors.runner import DetectorRunner
from agentwatch.detectors.slo import SloDetector
from agentwatch.detectors.tools import HallucinatedToolDetector
from agentwatch.events import LlmCall, ToolCall
from tests.support.synthetic import SERVICES, agent_traffic


def test_clean_traffic_gives_zero_findings() -> None:
    # ~3 h of event time at 3 traces/s: long enough for every baseline to warm up and for the
    # budget burn rate to be judged (after 10% of the day).
    events = agent_traffic(2024, 34_000, traces_per_s=3.0)
    calls = [e for e in events if isinstance(e, LlmCall)]
    assert len(calls) >= 100_000
    assert len({(c.service, c.model) for c in calls}) == 12 and len({c.user for c in calls}) == 200
    assert sum(isinstance(e, ToolCall) for e in events) > 60_000
    hours = (events[-1].ts - events[0].ts) / 3600
    assert hours > 2.4
    spend = Counter()
    for c in calls:
        spend[c.project] += c.cost_usd
    # Budgets with headroom over the projected day: (spend per hour) * 24 * 1.5.
    budgets = {p: {"daily_usd": s / hours * 24 * 1.5, "monthly_usd": s / hours * 24 * 31 * 1.5}
               for p, s in spend.items()}
    assert set(budgets) == {project for project, _ in SERVICES.values()}
    runner = DetectorRunner([CostAnomalyDetector(), BudgetDetector(budgets=budgets),
                             RetryStormDetector(), LoopDetector(), HallucinatedToolDetector(),
                             SloDetector()])
    assert runner.process(events) == []
    # The detectors did look: keys and traces are held (within their caps).
    sizes = runner.state_sizes()
    assert sizes["cost_anomaly"] > 200 and sizes["slo"] == 12 and sizes["agent_loop"] > 1000


def test_the_same_traffic_with_one_injected_fault_per_detector_is_caught() -> None:
    """Guards the test above against detectors that would see nothing in any traffic."""
    events = agent_traffic(2025, 3_000, traces_per_s=3.0)
    t = events[len(events) // 2].ts
    events += [ToolCall(ts=t + i, trace_id="bad", span_id=str(i), tool_name="lookup_order",
                        arguments='{"order_id": "1"}') for i in range(3)]
    events += [LlmCall(ts=t + 5 + i, trace_id=f"r{i}", span_id="s", user="u1", session="s1",
                       prompt="same", input_tokens=10, cost_usd=0.01) for i in range(3)]
    events.sort(key=lambda e: e.ts)
    runner = DetectorRunner([RetryStormDetector(), LoopDetector(),
                             HallucinatedToolDetector(known_tools=["search"])])
    kinds = Counter(f.kind for f in runner.process(events) if not f.resolved)
    assert kinds == {"repeated_tool_call": 1, "retry_storm": 1, "undeclared_tool": 1}
