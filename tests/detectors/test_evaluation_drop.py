"""EvaluationDropDetector: mean scores per (service, evaluation name) against their baseline.

Expected values are worked out by hand in the comments (window means and variances, the allowed
drop ``max(min_drop, sigmas x sd x sqrt(1/n + 1/n_baseline))``), not with the detector's helpers.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from agentwatch.detectors.evaluations import EvaluationDropDetector, EvaluationDropEvidence
from agentwatch.detectors.findings import evidence_of
from agentwatch.detectors.registry import DETECTORS, build_detectors
from agentwatch.events import Evaluation, Severity

T0 = 3600.0 * 472_222  # a multiple of every window length used here (60 s, 3600 s)
PARAMS = {"window_s": 60.0, "min_samples": 20, "baseline_windows": 3}


def ev(ts: float, score: float | None, name: str = "relevance", service: str = "rag",
       **kw) -> Evaluation:
    return Evaluation(ts=T0 + ts, trace_id=f"t{ts}", span_id="s", service=service, name=name,
                      score=score, **kw)


def window(w: int, scores: list[float], **kw) -> list[Evaluation]:
    """Scores spread evenly over 60 s window ``w`` from its start (3 s apart for 20)."""
    step = 60.0 / len(scores)
    return [ev(60.0 * w + step * i, s, **kw) for i, s in enumerate(scores)]


STEADY = [0.9, 0.7] * 10  # mean 0.8, squared deviations 20 x 0.01 = 0.2, variance 0.2/19


def run(det: EvaluationDropDetector, events) -> list:
    return [(i, f) for i, e in enumerate(events) for f in det.update(e)]


def test_drop_fires_at_the_look_resolves_on_recovery_and_fires_again() -> None:
    events = window(0, STEADY) + window(1, STEADY) + window(2, STEADY)
    # Baseline after 3 windows: mean 0.8, variance 0.2/19 = 0.0105263, 20 scores a window,
    # n_baseline 60. Window 3: twenty 0.6s; at its 20th score (index 79) mean 0.6, drop 0.2 >
    # 5 x sqrt(0.0105263 x (1/20 + 1/60)) = 5 x 0.0264906 = 0.1324532.
    events += window(3, [0.6] * 20)
    events += window(4, [0.6] * 20)  # still low: no second finding; the baseline is frozen
    events += window(5, STEADY)  # recovered: closes (at index 120) with drop 0 <= 0.1324532
    events += window(6, STEADY)  # folded at index 140: weight 1/4, baseline unchanged
    # Window 7: twenty 0.75s then twenty 0.6s. At n=20: drop 0.05, allowed (n_baseline 4 x 20)
    # 5 x sqrt(0.0105263 x (1/20 + 1/80)) = 0.128246: no. Between looks the mean keeps falling
    # (at n=33: 0.6909, over an allowed 0.10613) but is not judged; at n=40 (index 179): mean
    # 0.675, drop 0.125 > 5 x sqrt(0.0105263 x (1/40 + 1/80)) = 0.0993399.
    events += window(7, [0.75] * 20 + [0.6] * 20)
    found = run(EvaluationDropDetector(**PARAMS), events)
    assert [(i, f.kind, f.resolved) for i, f in found] == [
        (79, "evaluation_score_drop", False), (120, "evaluation_score_drop", True),
        (179, "evaluation_score_drop", False)]
    fired, resolved, again = (f for _, f in found)
    assert fired.key == "service=rag/evaluation=relevance"
    assert fired.severity == Severity.WARNING and resolved.severity == Severity.INFO
    assert (fired.value, fired.threshold) == (pytest.approx(0.2), pytest.approx(0.1324532))
    assert fired.ts == T0 + 180.0 + 57.0
    assert evidence_of(fired) == EvaluationDropEvidence(
        service="rag", evaluation="relevance", window_start=T0 + 180.0, window_s=60.0,
        window_scores=20, window_mean=pytest.approx(0.6), baseline_mean=pytest.approx(0.8),
        baseline_sd=pytest.approx(math.sqrt(0.2 / 19)), baseline_windows=3,
        baseline_scores=60.0, drop=pytest.approx(0.2), allowed_drop=pytest.approx(0.1324532))
    assert resolved.value == pytest.approx(0.0, abs=1e-12)
    assert resolved.threshold == pytest.approx(0.1324532)
    res_ev = evidence_of(resolved)
    assert (res_ev.window_start, res_ev.window_scores, res_ev.reason) == (
        T0 + 300.0, 20, "window closed at or above the threshold")
    assert res_ev.window_mean == pytest.approx(0.8)
    assert (again.value, again.threshold) == (pytest.approx(0.125), pytest.approx(0.0993399))
    assert again.evidence["baseline_windows"] == 4


@pytest.mark.parametrize("kind", ["pass_fail", "gaussian", "likert"])
def test_steady_scores_are_silent_across_seeds(kind: str) -> None:
    # Two days of hourly windows with 20-60 scores each, from one distribution that never
    # changes: a pass/fail judge (80 % pass, the skewed case), a continuous 0-1 score, a 1-5
    # Likert grade. 100 seeds each; default parameters.
    for seed in range(100):
        rng = random.Random(seed)
        events = []
        for w in range(48):
            for t in sorted(rng.uniform(0, 3600) for _ in range(rng.randint(20, 60))):
                score = {"pass_fail": lambda: float(rng.random() < 0.8),
                         "gaussian": lambda: rng.gauss(0.8, 0.1),
                         "likert": lambda: float(rng.choice([3, 4, 4, 5, 5]))}[kind]()
                events.append(ev(3600.0 * w + t, score))
        assert run(EvaluationDropDetector(), events) == [], seed


def test_label_only_and_non_finite_scores_are_ignored() -> None:
    det = EvaluationDropDetector(**PARAMS)
    events = [ev(float(i), None, label="polite", explanation="fine") for i in range(500)]
    events += [ev(600.0 + i, float("nan")) for i in range(50)]
    events += [ev(700.0 + i, float("-inf")) for i in range(50)]
    assert run(det, events) == [] and det.state_size() == 0


def test_too_few_scores_are_neither_judged_nor_learned() -> None:
    det = EvaluationDropDetector(**PARAMS)
    # Ten windows of 19 scores: none enters the baseline, so the twentieth-score window of
    # 0.1s after them is judged against nothing.
    events = [e for w in range(10) for e in window(w, STEADY[:19])]
    events += window(10, [0.1] * 19) + window(11, [0.1] * 20)
    assert run(det, events) == []
    # With a baseline, a window of 19 very low scores is still not judged...
    det = EvaluationDropDetector(**PARAMS)
    events = [e for w in range(3) for e in window(w, STEADY)] + window(3, [0.1] * 19)
    assert run(det, events) == []
    # ...and neither resolves nor learns: a firing key stays firing through a 19-score window.
    events += window(4, [0.1] * 20) + window(5, STEADY[:19]) + window(6, STEADY)
    assert [(i, f.resolved) for i, f in run(EvaluationDropDetector(**PARAMS), events)] == [
        (60 + 19 + 19, False)]


def test_no_judgement_before_baseline_windows() -> None:
    events = window(0, STEADY) + window(1, STEADY) + window(2, [0.1] * 20)
    assert run(EvaluationDropDetector(**PARAMS), events) == []


def test_min_drop_floors_the_threshold_of_constant_scores() -> None:
    base = [e for w in range(3) for e in window(w, [0.8] * 20)]  # variance 0: allowed 0.05
    quiet = run(EvaluationDropDetector(**PARAMS), base + window(3, [0.76] * 20))
    assert quiet == []  # drop 0.04
    found = run(EvaluationDropDetector(**PARAMS), base + window(3, [0.74] * 20))
    assert [(i, f.value, f.threshold) for i, f in found] == [
        (79, pytest.approx(0.06), pytest.approx(0.05))]


def test_rising_scores_do_not_fire() -> None:
    events = [e for w in range(3) for e in window(w, STEADY)] + window(3, [1.0] * 80)
    assert run(EvaluationDropDetector(**PARAMS), events) == []


def test_keys_are_per_service_and_evaluation_name_and_evidence_has_no_text() -> None:
    events = []
    for w in range(4):
        low = w == 3
        events += window(w, [0.5] * 20 if low else STEADY, name="relevance",
                         explanation="SECRET-EXPLANATION the user said X")
        events += window(w, STEADY, name="faithfulness")  # steady: silent
        events += window(w, STEADY, name="relevance", service="other")
    events.sort(key=lambda e: e.ts)
    found = run(EvaluationDropDetector(**PARAMS), events)
    assert [f.key for _, f in found] == ["service=rag/evaluation=relevance"]
    assert "SECRET" not in json.dumps(dict(found[0][1].evidence))


def _drop_stream(seed: int) -> list[Evaluation]:
    rng = random.Random(seed)
    means = [0.8] * 5 + [0.55, 0.55, 0.8, 0.8, 0.5, 0.8]
    events = []
    for w, mean in enumerate(means):
        events += [ev(60.0 * w + t, min(1.0, max(0.0, rng.gauss(mean, 0.1))),
                      name=rng.choice(["relevance", "tone"]))
                   for t in sorted(rng.uniform(0, 59) for _ in range(rng.randint(45, 90)))]
        events += [ev(60.0 * w + 30.5, None, label="ok")]
    return sorted(events, key=lambda e: e.ts)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_snapshot_restore_mid_stream_gives_identical_findings(seed: int) -> None:
    params = {**PARAMS, "min_samples": 10}
    events = _drop_stream(seed)
    reference = EvaluationDropDetector(**params)
    per_event = [list(reference.update(e)) for e in events]
    assert any(f.resolved for found in per_event for f in found)
    assert any(not f.resolved for found in per_event for f in found)
    for split in range(0, len(events), 37):
        first = EvaluationDropDetector(**params)
        for e in events[:split]:
            first.update(e)
        restored = EvaluationDropDetector(**params)
        restored.restore(json.loads(json.dumps(first.snapshot(), allow_nan=False)))
        assert [f for e in events[split:] for f in restored.update(e)] == [
            f for found in per_event[split:] for f in found], split
        assert restored.snapshot() == reference.snapshot()


def test_max_keys_evicts_counts_and_resolves_a_firing_key() -> None:
    det = EvaluationDropDetector(**PARAMS, max_keys=3)
    events = [e for w in range(4) for e in window(w, STEADY if w < 3 else [0.3] * 20)]
    found = run(det, events)
    assert [f.resolved for _, f in found] == [False]
    # Ten other evaluation names, one score each: the firing key is the least recently scored.
    late = [ev(240.0 + i, 0.8, name=f"e{i}") for i in range(10)]
    found = run(det, late)
    assert det.state_size() == 3 and det.evicted_keys == 8
    assert [(i, f.resolved, f.evidence["reason"]) for i, f in found] == [
        (2, True, "evicted: max_keys reached")]


def test_ttl_forgets_a_key_and_resolves_what_it_had_firing() -> None:
    det = EvaluationDropDetector(**PARAMS, key_ttl_s=600.0)
    events = [e for w in range(4) for e in window(w, STEADY if w < 3 else [0.3] * 20)]
    assert len(run(det, events)) == 1
    found = run(det, [ev(5000.0, 0.8, name="other")])
    assert [(f.resolved, f.evidence["reason"]) for _, f in found] == [
        (True, "no scores within key_ttl_s")]
    assert det.state_size() == 1


@pytest.mark.parametrize("kwargs", [
    {"window_s": 0.0}, {"min_samples": 1}, {"baseline_windows": 0}, {"sigmas": 0.0},
    {"min_drop": -0.1}, {"alpha": 0.0}, {"alpha": 1.5}, {"max_keys": 0}, {"key_ttl_s": 0.0}])
def test_invalid_parameters_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        EvaluationDropDetector(**kwargs)


def test_registered_and_split_over_partitions() -> None:
    assert DETECTORS["evaluation_drop"] is EvaluationDropDetector
    (det,) = build_detectors({"evaluation_drop": {"max_keys": 100}}, {"evaluation_drop"},
                             partitions=4)
    assert det.max_keys == 50 and det.partition_by == "service"
