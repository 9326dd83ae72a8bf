"""PromptVersionRegressionDetector: a new prompt version against its predecessor.

Expected statistics are worked out in the comments and recomputed here from their textbook
formulas (the Mann-Whitney U count and its tie-corrected normal approximation, the
hypergeometric tail of Fisher's test) with the standard library, not with scipy or the
detector's helpers.
"""

from __future__ import annotations

import json
import random
from math import comb, sqrt
from statistics import NormalDist

import pytest

from agentwatch.detectors.findings import evidence_of
from agentwatch.detectors.prompts import PromptVersionEvidence, PromptVersionRegressionDetector
from agentwatch.detectors.registry import DETECTORS, build_detectors
from agentwatch.events import Evaluation, LlmCall, Severity

T0 = 1_700_000_000.0
Z = NormalDist()
# Default alpha 0.001 over 4 metrics x 4 looks: each test at 0.001 / 16.
THRESHOLD = Z.inv_cdf(1 - 0.001 / 16)  # 3.8414


def call(i: int, version: str, cost: float = 0.01, *, prompt: str = "answer",
         service: str = "support", latency: float = 800.0, status: str = "ok",
         priced: bool = True, **kw) -> LlmCall:
    return LlmCall(ts=T0 + i, trace_id=f"t{i}", span_id="s", service=service,
                   prompt_name=prompt, prompt_version=version, cost_usd=cost, priced=priced,
                   latency_ms=latency, status=status, **kw)


def score(i: int, version: str, value: float | None, *, prompt: str = "answer") -> Evaluation:
    return Evaluation(ts=T0 + i + 0.5, trace_id=f"t{i}", span_id="s", service="support",
                      name="helpfulness", score=value, prompt_name=prompt,
                      prompt_version=version)


def run(det: PromptVersionRegressionDetector, events) -> list:
    return [(i, f) for i, e in enumerate(events) for f in det.update(e)]


def levels(start: float, step: float, n: int) -> list[float]:
    """Five levels, start, start + step, ..., each repeated: start + step * (i % 5)."""
    return [round(start + step * (i % 5), 6) for i in range(n)]


def test_cost_regression_fires_at_the_minimum_sample_with_the_rank_test() -> None:
    # v1: 30 calls at 0.010..0.014 (six of each); v2: 30 at 0.013..0.017. Latency equal, no
    # errors. The U count of v2 over v1 (a tie counts one half): each 0.013 beats 18 and ties
    # 6 -> 21; each 0.014 -> 27; the 18 others beat all 30: U = 6 x 21 + 6 x 27 + 18 x 30 = 828.
    # Mean 30 x 30 / 2 = 450. Ties in the pooled 60: six groups of 6 and two of 12 (0.013,
    # 0.014): sum(t^3 - t) = 6 x 210 + 2 x 1716 = 4692; variance
    # 30 x 30 / 12 x (61 - 4692 / (60 x 59)) = 4475.593; z = (828 - 450 - 0.5) / 66.900 = 5.6428.
    u = 6 * 21 + 6 * 27 + 18 * 30
    z = (u - 450 - 0.5) / sqrt(900 / 12 * (61 - (6 * 210 + 2 * 1716) / (60 * 59)))
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 30))]
    events += [call(30 + i, "v2", c) for i, c in enumerate(levels(0.013, 0.001, 30))]
    found = run(PromptVersionRegressionDetector(), events)
    assert [(i, f.kind, f.key, f.resolved) for i, f in found] == [
        (59, "prompt_version_regression", "service=support/prompt=answer", False)]
    f = found[0][1]
    assert f.severity == Severity.WARNING and f.ts == T0 + 59
    assert f.value == pytest.approx(z, rel=1e-6) and f.threshold == pytest.approx(THRESHOLD)
    ev = evidence_of(f)
    assert isinstance(ev, PromptVersionEvidence)
    assert (ev.version, ev.previous_version, ev.metrics, ev.deciding_metric) == (
        "v2", "v1", ("cost",), "cost")
    assert ev.checked == ("cost", "latency", "error_rate")
    assert ev.tests == ("mann_whitney_u", "mann_whitney_u", "fisher_exact")
    assert ev.statistics == (828.0, 450.0, 0.0)  # latency all equal: U at its mean; 0 errors
    assert ev.p_values[1:] == (1.0, 1.0)
    assert ev.p_values[0] == pytest.approx(Z.cdf(-z), rel=1e-6)
    assert ev.previous_means[0] == pytest.approx(0.012) and ev.new_means[0] == pytest.approx(0.015)
    assert ev.relative_changes[0] == pytest.approx(0.25)
    assert ev.relative_changes[1:] == (0.0, None)  # error rate 0 before: no relative change
    assert ev.previous_samples == (30, 30, 30) and ev.new_samples == (30, 30, 30)
    assert (ev.alpha, ev.alpha_per_test, ev.min_effect) == (0.001, 0.001 / 16, 0.2)


def test_quiet_below_the_minimum_sample_size() -> None:
    shifted = levels(0.020, 0.001, 200)  # every v2 call dearer than every v1 call
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 30))]
    events += [call(30 + i, "v2", c) for i, c in enumerate(shifted[:29])]
    assert run(PromptVersionRegressionDetector(), events) == []
    # The predecessor short of min_samples: never compared, however many new calls come.
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 29))]
    events += [call(29 + i, "v2", c) for i, c in enumerate(shifted)]
    assert run(PromptVersionRegressionDetector(), events) == []
    # min_samples is the parameter: 20 each is enough at min_samples=20 (index 39).
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 20))]
    events += [call(20 + i, "v2", c) for i, c in enumerate(shifted[:20])]
    assert [i for i, _ in run(PromptVersionRegressionDetector(min_samples=20), events)] == [39]


def test_significant_but_small_effect_is_quiet_until_min_effect_allows_it() -> None:
    # Every v2 call is dearer than every v1 call (p tiny), but only by 10 % on average:
    # 0.0110 vs 0.0100.
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.0098, 0.0001, 60))]
    events += [call(60 + i, "v2", c) for i, c in enumerate(levels(0.0108, 0.0001, 60))]
    assert run(PromptVersionRegressionDetector(), events) == []
    found = run(PromptVersionRegressionDetector(min_effect=0.05), events)
    assert [i for i, _ in found] == [89]
    assert found[0][1].evidence["relative_changes"][0] == pytest.approx(0.1)


def _equal_versions(seed: int) -> list:
    """Two versions drawn from one heavy-tailed distribution: log-normal cost, gamma latency,
    5 % errors, 1-5 grades; enough calls for all four looks (30, 60, 120, 240)."""
    rng = random.Random(seed)
    events: list = []
    for i in range(440):
        version = "v1" if i < 200 else "v2"
        events.append(call(i, version, rng.lognormvariate(-4.6, 0.8),
                           latency=rng.gammavariate(2.0, 400.0),
                           status="error" if rng.random() < 0.05 else "ok"))
        events.append(score(i, version, float(rng.randint(1, 5))))
    return events


def test_equal_versions_are_quiet_across_seeds_and_the_tests_keep_their_level() -> None:
    fired_loose = 0
    for seed in range(150):
        events = _equal_versions(seed)
        assert run(PromptVersionRegressionDetector(), events) == [], seed
        # With no effect floor and a loose alpha, the procedure's false-finding rate is what
        # alpha says or less (Bonferroni over 4 metrics x 4 looks is conservative).
        loose = PromptVersionRegressionDetector(alpha=0.05, min_effect=0.0)
        fired_loose += bool(run(loose, events))
    assert fired_loose / 150 <= 0.05 + 2 * sqrt(0.05 * 0.95 / 150)


def test_error_rate_regression_uses_fishers_exact_test() -> None:
    # v1: 100 unpriced calls (no cost sample), 3 errors. v2: an error every other call. At
    # v2's 30th call (index 129): 15 errors of 30. Fisher one-sided p: the hypergeometric
    # chance of >= 15 of the 18 errors landing in v2's 30 of the 130 calls.
    events = [call(i, "v1", 0.0, priced=False, status="error" if i in (10, 50, 90) else "ok")
              for i in range(100)]
    events += [call(100 + i, "v2", 0.0, priced=False, status="error" if i % 2 == 0 else "ok")
               for i in range(40)]
    p = sum(comb(18, k) * comb(112, 30 - k) for k in range(15, 19)) / comb(130, 30)
    found = run(PromptVersionRegressionDetector(), events)
    assert [i for i, _ in found] == [129]
    f = found[0][1]
    assert f.value == pytest.approx(-Z.inv_cdf(p), rel=1e-6)
    assert f.evidence["metrics"] == ["error_rate"]
    assert f.evidence["checked"] == ["latency", "error_rate"]  # no priced call: no cost test
    i = f.evidence["checked"].index("error_rate")
    assert f.evidence["p_values"][i] == pytest.approx(p, rel=1e-9)
    assert f.evidence["statistics"][i] == 15.0
    assert (f.evidence["previous_means"][i], f.evidence["new_means"][i]) == (0.03, 0.5)


def test_score_regression_from_evaluations() -> None:
    # v1 scores 0.8..1.0, v2 0.5..0.7: a lower score is worse. Label-only evaluations ignored.
    events: list = []
    for i in range(40):
        events += [call(i, "v1"), score(i, "v1", round(0.8 + 0.05 * (i % 5), 2)),
                   score(i, "v1", None)]
    for i in range(40, 80):
        events += [call(i, "v2"), score(i, "v2", round(0.5 + 0.05 * (i % 5), 2)),
                   score(i, "v2", None)]
    found = run(PromptVersionRegressionDetector(), events)
    # v2's 30th score is event 40 x 3 + 29 x 3 + 1.
    assert [i for i, _ in found] == [120 + 87 + 1]
    f = found[0][1]
    assert f.evidence["metrics"] == ["score"] and f.evidence["checked"] == ["score"]
    assert f.evidence["relative_changes"] == [pytest.approx((0.9 - 0.6) / 0.9)]  # means 0.9, 0.6
    # Complete separation, five tie groups of 8 (v1's 40) and five of 6 (v2's 30): U = 0.
    ties = 5 * (8 ** 3 - 8) + 5 * (6 ** 3 - 6)
    z = (1200 / 2 - 0 - 0.5) / sqrt(30 * 40 / 12 * (71 - ties / (70 * 69)))
    assert f.value == pytest.approx(z, rel=1e-6)


def test_the_predecessor_is_the_version_last_used_and_a_newer_one_resolves() -> None:
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 40))]
    events += [call(40 + i, "v2", c) for i, c in enumerate(levels(0.010, 0.001, 40))]
    events += [call(80 + i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 10))]  # rollback
    events += [call(90 + i, "v3", c) for i, c in enumerate(levels(0.020, 0.001, 40))]
    events += [call(130, "v4")]
    found = run(PromptVersionRegressionDetector(), events)
    assert [(i, f.resolved) for i, f in found] == [(90 + 29, False), (130, True)]
    fired, resolved = (f for _, f in found)
    assert (fired.evidence["version"], fired.evidence["previous_version"]) == ("v3", "v1")
    assert fired.evidence["previous_samples"][0] == 50  # v1 before and after the rollback
    assert resolved.severity == Severity.INFO
    assert (resolved.value, resolved.threshold) == (fired.value, fired.threshold)
    ev = evidence_of(resolved)
    assert (ev.reason, ev.version, ev.metrics, ev.checked) == (
        "superseded by version v4", "v3", ("cost",), ())


def test_fires_once_per_version_and_stops_after_the_last_look() -> None:
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 40))]
    events += [call(40 + i, "v2", c) for i, c in enumerate(levels(0.020, 0.001, 300))]
    assert len(run(PromptVersionRegressionDetector(), events)) == 1
    # With one look, a version equal at its 30th call is accepted: a later shift is not tested.
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 40))]
    events += [call(40 + i, "v2", c) for i, c in enumerate(levels(0.010, 0.001, 30))]
    events += [call(70 + i, "v2", c) for i, c in enumerate(levels(0.030, 0.001, 100))]
    assert run(PromptVersionRegressionDetector(looks=1), events) == []
    assert len(run(PromptVersionRegressionDetector(looks=2), events)) == 1  # tested at 60


def test_unknown_cost_and_nulled_latency_are_not_samples() -> None:
    # v1's latency was nulled on half its calls (placeholder 0): counted, v2 (all 800 ms)
    # would look far slower.
    def stream(flag: str) -> list:
        events = [call(i, "v1", latency=800.0) for i in range(30)]
        events += [call(30 + i, "v1", latency=0.0, invalid_fields=flag) for i in range(30)]
        events += [call(60 + i, "v2", latency=800.0) for i in range(30)]
        return events
    assert run(PromptVersionRegressionDetector(), stream("latency_ms:out_of_bounds")) == []
    found = run(PromptVersionRegressionDetector(), stream(""))
    assert [f.evidence["metrics"] for _, f in found] == [["latency"]]
    # Unpriced calls (cost 0) are no cost sample: v1 unpriced, v2 priced is not "dearer".
    events = [call(i, "v1", 0.0, priced=False) for i in range(40)]
    events += [call(40 + i, "v2", 0.05) for i in range(40)]
    assert run(PromptVersionRegressionDetector(), events) == []


def test_calls_without_prompt_name_or_version_are_ignored() -> None:
    det = PromptVersionRegressionDetector()
    events = [LlmCall(ts=T0 + i, trace_id="t", span_id="s", service="support", cost_usd=1.0)
              for i in range(100)]
    events += [call(100 + i, "") for i in range(100)]
    events += [call(200 + i, "v1", prompt="") for i in range(100)]
    assert run(det, events) == [] and det.state_size() == 0


def _regression_stream(seed: int) -> list:
    rng = random.Random(seed)
    events: list = []
    for i in range(400):
        version = "v1" if i < 150 else "v2" if i < 330 else "v3"
        slow = 1.5 if version == "v2" else 1.0
        prompt = rng.choice(["answer", "answer", "summarise"])
        events.append(call(i, version, rng.lognormvariate(-4.6, 0.3), prompt=prompt,
                           latency=slow * rng.gammavariate(20.0, 40.0),
                           status="error" if rng.random() < 0.05 else "ok"))
        events.append(score(i, version, rng.uniform(0.5, 1.0), prompt=prompt))
    return events


@pytest.mark.parametrize("seed", [1, 2])
def test_snapshot_restore_mid_stream_gives_identical_findings(seed: int) -> None:
    params = {"reservoir_size": 40}  # overflowing reservoirs: the slot choice must survive
    events = _regression_stream(seed)
    reference = PromptVersionRegressionDetector(**params)
    per_event = [list(reference.update(e)) for e in events]
    kinds = [f.resolved for found in per_event for f in found]
    assert False in kinds and True in kinds
    for split in range(0, len(events), 61):
        first = PromptVersionRegressionDetector(**params)
        for e in events[:split]:
            first.update(e)
        restored = PromptVersionRegressionDetector(**params)
        restored.restore(json.loads(json.dumps(first.snapshot(), allow_nan=False)))
        assert [f for e in events[split:] for f in restored.update(e)] == [
            f for found in per_event[split:] for f in found], split
        assert restored.snapshot() == reference.snapshot()


def test_caps_on_prompts_versions_and_reservoirs() -> None:
    det = PromptVersionRegressionDetector(max_prompts=3, max_versions=2, reservoir_size=30)
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 40))]
    events += [call(40 + i, "v2", c) for i, c in enumerate(levels(0.020, 0.001, 30))]
    assert len(run(det, events)) == 1  # answer's v2 fires
    # More versions than max_versions: the newest and its predecessor are kept.
    events = [call(100 + k, f"w{k}", prompt="hot") for k in range(6)]
    assert run(det, events) == [] and det.evicted_versions == 4
    assert det.state_size() == 2 * (1 + 2)
    # Reservoirs stop growing: the checkpoint after 1000 more calls is no larger.
    size_before = len(json.dumps(det.snapshot()))
    # (costs are multiples of 1/64, whose JSON text is short and equally long either way)
    run(det, [call(200 + i, "w5", (1 + i % 7) / 64, prompt="hot") for i in range(1000)])
    assert len(json.dumps(det.snapshot())) <= size_before + 2 * 30 * 25
    size_mid = len(json.dumps(det.snapshot()))
    run(det, [call(1200 + i, "w5", (1 + i % 7) / 64, prompt="hot") for i in range(1000)])
    assert len(json.dumps(det.snapshot())) <= size_mid + 50
    # More prompts than max_prompts: the firing one goes first, resolved.
    found = run(det, [call(3000 + k, "v1", prompt=f"p{k}") for k in range(3)])
    assert det.evicted_prompts == 2 and det.state_size() <= 3 * (1 + 2)
    assert [(i, f.resolved, f.evidence["reason"]) for i, f in found] == [
        (1, True, "evicted: max_prompts reached")]


def test_ttl_forgets_a_prompt_and_resolves_its_finding() -> None:
    det = PromptVersionRegressionDetector(key_ttl_s=3600.0)
    events = [call(i, "v1", c) for i, c in enumerate(levels(0.010, 0.001, 40))]
    events += [call(40 + i, "v2", c) for i, c in enumerate(levels(0.020, 0.001, 30))]
    assert len(run(det, events)) == 1
    found = run(det, [call(10_000, "v1", prompt="other")])
    assert [(f.resolved, f.evidence["reason"]) for _, f in found] == [
        (True, "no calls or scores within key_ttl_s")]


@pytest.mark.parametrize("kwargs", [
    {"min_samples": 1}, {"alpha": 0.0}, {"alpha": 1.0}, {"min_effect": -0.1}, {"looks": 0},
    {"reservoir_size": 10}, {"max_versions": 1}, {"max_prompts": 0}, {"key_ttl_s": 0.0}])
def test_invalid_parameters_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PromptVersionRegressionDetector(**kwargs)


def test_registered_and_split_over_partitions() -> None:
    assert DETECTORS["prompt_version_regression"] is PromptVersionRegressionDetector
    (det,) = build_detectors({"prompt_version_regression": {"max_prompts": 100}},
                             {"prompt_version_regression"}, partitions=4)
    assert det.max_prompts == 50 and det.partition_by == "service"
