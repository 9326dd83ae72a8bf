"""Cost detectors on synthetic streams whose expected findings are worked out by hand or by a
plain reference computation in the test."""

from __future__ import annotations

import math
import random
from datetime import datetime, timezone

import pytest

from agentwatch.detectors.cost import (BudgetDetector, CostAnomalyDetector, RetryStormDetector,
                                       period_bounds)
from agentwatch.events import LlmCall

T0 = 60.0 * 28_333_333  # 1_699_999_980: a multiple of 60, so interval m starts at T0 + 60 m
DAY0 = 86_400.0 * 19_675  # 2023-11-14T00:00:00Z


def call(ts: float, cost: float, *, project: str = "shop", user: str = "ann", tokens: int = 1000,
         priced: bool = True, prompt: str = "", trace_id: str = "t", **kw) -> LlmCall:
    return LlmCall(ts=ts, trace_id=trace_id, span_id="s", project=project, user=user,
                   model="gpt-4o", cost_usd=cost, input_tokens=tokens, output_tokens=0,
                   priced=priced, prompt=prompt, **kw)


def findings_at(det, events):
    return [(i, f) for i, e in enumerate(events) for f in det.update(e)]


# -- cost anomalies ---------------------------------------------------------------------------

def steady_then_spike(gap_intervals: int = 0) -> list[LlmCall]:
    """Intervals 0-4: four $0.25 calls (interval total $1). Interval 5: ten $0.25 calls.
    Then interval 6 (+gap) normal and interval 7 (+gap) normal."""
    events = [call(T0 + 60 * m + 10 * i, 0.25) for m in range(5) for i in range(4)]
    events += [call(T0 + 300 + 2 * i, 0.25) for i in range(10)]
    for m in (6 + gap_intervals, 7 + gap_intervals):
        events += [call(T0 + 60 * m + 10 * i, 0.25) for i in range(4)]
    return events


def test_cost_spike_fires_at_the_crossing_call_and_resolves_after_a_normal_interval() -> None:
    det = CostAnomalyDetector(group_by=[("project",)], min_history=5, min_excess_usd=0.5)
    found = findings_at(det, steady_then_spike())
    # Baseline $1 with zero deviation: scale = 5% of $1, 6 sigmas = $0.30 < the $0.50 floor, so
    # threshold = $1.50. The spike interval crosses it at its 7th call ($1.75): index 20 + 6.
    assert [(i, f.kind, f.resolved) for i, f in found] == [(26, "cost_spike", False),
                                                           (34, "cost_spike", True)]
    spike = found[0][1]
    assert spike.key == "project=shop"
    assert spike.value == pytest.approx(1.75) and spike.threshold == pytest.approx(1.5)
    assert spike.evidence["baseline_cost_usd"] == pytest.approx(1.0)
    assert spike.evidence["excess_cost_usd"] == pytest.approx(0.75)
    assert spike.evidence["calls"] == 7 and spike.evidence["trigger"] == "cost"
    # Interval 6 was normal: resolved on interval 7's first call (index 20 + 10 + 4).
    # The spike ($2.50) entered the baseline clipped to the $1.50 threshold, as the 6th interval
    # (weight 1/6 while fewer than 1/alpha intervals are seen): 1 + 0.5 / 6, not 1 + 1.5 / 6.
    resolved = found[1][1]
    assert resolved.evidence["baseline_cost_usd"] == pytest.approx(1 + 0.5 / 6)
    assert resolved.evidence["observed_cost_usd"] == pytest.approx(1.0)


def test_a_quiet_interval_after_the_spike_resolves_it() -> None:
    det = CostAnomalyDetector(group_by=[("project",)], min_history=5, min_excess_usd=0.5)
    found = findings_at(det, steady_then_spike(gap_intervals=2))
    # Intervals 6 and 7 had no calls: the first call after them (index 30) resolves.
    assert [(i, f.resolved) for i, f in found] == [(26, False), (30, True)]


def test_no_spike_during_warmup() -> None:
    det = CostAnomalyDetector(group_by=[("project",)], min_history=5, min_excess_usd=0.5)
    events = [call(T0 + 60 * m + i, 0.25 * (1 + 9 * (m == 3))) for m in range(5) for i in range(4)]
    assert findings_at(det, events) == []


def test_token_spike_counts_only_when_cost_is_unknown() -> None:
    def stream(priced: bool) -> list[LlmCall]:
        cost = 0.0001 if priced else 0.0
        ev = [call(T0 + 60 * m + 10 * i, cost, tokens=10_000, priced=priced)
              for m in range(5) for i in range(4)]
        return ev + [call(T0 + 300 + i, cost, tokens=10_000, priced=priced) for i in range(12)]

    # 40k tokens per interval, deviation 0: threshold = 40k + max(6 * 2k, 50k) = 90k tokens,
    # crossed by the 10th call of the spike interval (100k): index 20 + 9.
    det = CostAnomalyDetector(group_by=[("project",)], min_history=5)
    found = findings_at(det, stream(priced=False))
    assert [(i, f.evidence["trigger"], f.evidence["observed_tokens"]) for i, f in found] == [
        (29, "tokens", 100_000)]
    # Priced calls: the same tokens cost $0.0012, far under min_excess_usd: nobody is paged.
    assert findings_at(CostAnomalyDetector(group_by=[("project",)], min_history=5),
                       stream(priced=True)) == []


def reference_spike_index(interval_costs: list[list[float]], *, alpha: float, sigmas: float,
                          min_history: int, min_rel: float, min_excess: float) -> int | None:
    """The documented algorithm written out plainly over whole intervals (no streaming)."""
    base = dev = 0.0
    index = 0
    for n, costs in enumerate(interval_costs):
        if n >= min_history:
            scale = max(dev * math.sqrt(math.pi / 2), min_rel * base)
            threshold = base + max(sigmas * scale, min_excess)
            running = 0.0
            for c in costs:
                running += c
                if running > threshold:
                    return index
                index += 1
            total = min(sum(costs), threshold)
        else:
            index += len(costs)
            total = sum(costs)
        if n == 0:
            base, dev = total, 0.0
        else:
            a = max(alpha, 1 / (n + 1))
            dev = dev + a * (abs(total - base) - dev)
            base = base + a * (total - base)
    return None


@pytest.mark.parametrize("seed", [3, 11, 42])
def test_seeded_spike_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    intervals = [[rng.uniform(0.05, 0.3) for _ in range(rng.randint(3, 9))] for _ in range(30)]
    spike_at = rng.randint(15, 25)
    intervals[spike_at] = [rng.uniform(0.5, 1.0) for _ in range(12)]
    events = [call(T0 + 60 * m + 55 * i / len(costs), c)
              for m, costs in enumerate(intervals) for i, c in enumerate(costs)]
    det = CostAnomalyDetector(group_by=[("project",)])
    fired = [i for i, f in findings_at(det, events) if not f.resolved]
    expected = reference_spike_index(intervals, alpha=0.1, sigmas=6.0, min_history=10,
                                     min_rel=0.05, min_excess=0.5)
    assert expected is not None and expected >= sum(len(c) for c in intervals[:spike_at])
    assert fired == [expected]


def test_keys_are_separate_and_empty_values_are_skipped() -> None:
    det = CostAnomalyDetector()
    det.update(call(T0, 0.1, user=""))
    # project and project/model; the call has no service and an empty user: not counted there
    assert det.state_size() == 2
    assert sorted(s["series"][i][1] for i in range(2) for s in [det.snapshot()]) == [
        ["shop"], ["shop", "gpt-4o"]]


@pytest.mark.parametrize("kwargs", [{"interval_s": 0}, {"alpha": 0}, {"alpha": 1.5},
                                    {"min_history": 0}, {"group_by": []},
                                    {"group_by": [("tenant",)]}, {"min_excess_usd": -1}])
def test_cost_anomaly_rejects_bad_config(kwargs) -> None:
    with pytest.raises(ValueError):
        CostAnomalyDetector(**kwargs)


# -- budgets --------------------------------------------------------------------------------

def test_budget_levels_burn_rate_and_rollover() -> None:
    det = BudgetDetector(budgets={"shop": {"daily_usd": 10.0}}, burn_min_elapsed_fraction=0.25)
    events = [call(DAY0 + 3600 * h, 0.5) for h in range(24)]
    events.append(call(DAY0 + 86_400 + 60, 0.5))  # next day
    events.append(call(DAY0 + 3600, 100.0, project="other"))  # no budget: ignored
    found = findings_at(det, events)
    # Spend after the call at hour h is 0.5 (h + 1): 50% ($5) at h=9, 80% at h=15, 100% at h=19.
    # Projection 0.5 (h+1) * 24 / h = 12 (h+1)/h > 10 as soon as 6 h (25% of the day) are seen.
    assert [(i, f.kind, f.resolved) for i, f in found] == [
        (6, "budget_daily_burn_rate", False),
        (9, "budget_daily_50pct", False),
        (15, "budget_daily_80pct", False),
        (19, "budget_daily_100pct", False),
        (24, "budget_daily_50pct", True),
        (24, "budget_daily_80pct", True),
        (24, "budget_daily_100pct", True),
        (24, "budget_daily_burn_rate", True),
    ]
    burn = found[0][1]
    assert burn.value == pytest.approx(14.0) and burn.threshold == 10.0
    assert burn.evidence["burn_rate_usd_per_h"] == pytest.approx(3.5 / 6)
    assert found[3][1].value == pytest.approx(10.0)
    assert found[3][1].severity == "critical"
    assert found[4][1].evidence["period_start"] == DAY0


def test_burn_rate_resolves_when_spend_slows() -> None:
    det = BudgetDetector(budgets={"shop": {"daily_usd": 10.0}}, burn_min_elapsed_fraction=0.25)
    events = [call(DAY0 + 3600 * h, 1.0 if h <= 6 else 0.0) for h in range(24)]
    found = [(i, f.kind, f.resolved) for i, f in findings_at(det, events)]
    # h=6: spend 7, projection 7 * 24 / 6 = 28. Afterwards 7 * 24 / h < 9 first at h = 19.
    assert found == [(4, "budget_daily_50pct", False), (6, "budget_daily_burn_rate", False),
                     (19, "budget_daily_burn_rate", True)]


def test_monthly_period_bounds() -> None:
    ts = datetime(2023, 12, 15, 13, 0, tzinfo=timezone.utc).timestamp()
    start, end = period_bounds("monthly", ts)
    assert start == datetime(2023, 12, 1, tzinfo=timezone.utc).timestamp()
    assert end == datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()
    assert period_bounds("daily", ts) == (math.floor(ts / 86400) * 86400,
                                          math.floor(ts / 86400) * 86400 + 86400)


def test_monthly_budget_crossing() -> None:
    det = BudgetDetector(budgets={"shop": {"monthly_usd": 100.0, "daily_usd": 1_000.0}},
                         burn_min_elapsed_fraction=0.5)
    events = [call(DAY0 + 3600 * h, 6.0) for h in range(20)]
    found = [(i, f.kind) for i, f in findings_at(det, events)]
    # $6 a call: $54 after index 8 (>= 50), $84 after 13, $102 after 16.
    assert found == [(8, "budget_monthly_50pct"), (13, "budget_monthly_80pct"),
                     (16, "budget_monthly_100pct")]


@pytest.mark.parametrize("kwargs", [{"budgets": {"shop": {"weekly_usd": 1.0}}},
                                    {"budgets": {"shop": {"daily_usd": 0.0}}},
                                    {"levels": []}, {"levels": [0.5, 0.5]},
                                    {"burn_min_elapsed_fraction": 1.0}])
def test_budget_rejects_bad_config(kwargs) -> None:
    with pytest.raises(ValueError):
        BudgetDetector(**kwargs)


# -- retry storms ---------------------------------------------------------------------------

def test_retry_storm_fires_on_third_identical_call_and_resolves_after_the_gap() -> None:
    det = RetryStormDetector(window_s=10.0, min_repeats=3)
    same = dict(prompt="where is order 42?", tokens=900, service="shop-api", session="s1")
    events = [call(T0 + t, 0.1, trace_id=f"r{t}", **same) for t in (0, 3, 6, 9)]
    events.append(call(T0 + 30, 0.1, user="bob", prompt="hello"))
    found = findings_at(det, events)
    assert [(i, f.resolved, f.value) for i, f in found] == [(2, False, 3.0), (4, True, 4.0)]
    fired, resolved = found[0][1], found[1][1]
    assert fired.evidence["wasted_cost_usd"] == pytest.approx(0.2)
    assert resolved.evidence["wasted_cost_usd"] == pytest.approx(0.3)
    assert resolved.evidence["trace_ids"] == ["r0", "r3", "r6", "r9"]
    assert fired.key == "project=shop/service=shop-api/user=ann/session=s1"


def test_retry_storm_needs_same_client_tokens_and_short_gaps() -> None:
    det = RetryStormDetector(window_s=10.0, min_repeats=3)
    events = [call(T0 + 11 * i, 0.1, prompt="p") for i in range(5)]  # gaps > window
    events += [call(T0 + 100 + i, 0.1, prompt="q", tokens=1000 + i) for i in range(5)]
    events += [call(T0 + 200 + i, 0.1, prompt="r", user=f"u{i}") for i in range(5)]
    events += [call(T0 + 300 + i, 0.1, prompt="") for i in range(5)]
    assert findings_at(det, events) == []


def test_retry_storm_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        RetryStormDetector(min_repeats=1)
    with pytest.raises(ValueError):
        RetryStormDetector(window_s=0)


def test_cost_spike_per_managed_prompt() -> None:
    # AGENTWATCH_DETECTORS='{"cost_anomaly": {"group_by": [["project"], ["project", "prompt_name"]]}}'
    det = CostAnomalyDetector(group_by=[("project",), ("project", "prompt_name")], min_history=5,
                              min_excess_usd=0.5)
    assert det.partition_by == "project"
    # Per interval: four $0.25 "support" calls and two $0.25 calls without a managed prompt.
    events = [call(T0 + 60 * m + 10 * i, 0.25, prompt_name="support" if i < 4 else "",
                   prompt_version="3" if i < 4 else "")
              for m in range(5) for i in range(6)]
    # Interval 5: version 4 of the prompt costs twice as much per call.
    events += [call(T0 + 300 + 2 * i, 0.5, prompt_name="support", prompt_version="4")
               for i in range(4)]
    found = findings_at(det, events)
    # support: baseline $1, threshold $1.50, crossed by the 4th $0.50 call ($2.00), index 30 + 3.
    # project: baseline $1.50, threshold $2.00, not crossed ($2.00 is not over it).
    assert [(i, f.key, f.resolved) for i, f in found] == [
        (33, "project=shop/prompt_name=support", False)]
    spike = found[0][1]
    assert spike.evidence["prompt_name"] == "support" and "prompt_version" not in spike.evidence
    assert spike.evidence["baseline_cost_usd"] == pytest.approx(1.0)
    assert spike.value == pytest.approx(2.0) and spike.threshold == pytest.approx(1.5)
    # Calls without a prompt name are counted under the project only.
    assert sorted(tuple(s[1]) for s in det.snapshot()["series"]) == [("shop",), ("shop", "support")]
