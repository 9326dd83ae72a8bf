"""PiiExposureDetector: new entity types per service and rate jumps, at exact events.

Expected values are worked out by hand in the comments (window counts, the mean/EWMA baseline,
the threshold ``max(min_count, rate_factor x baseline)``), not by calling the detector's helpers.
"""

from __future__ import annotations

import json
import random

import pytest

from agentwatch.detectors.findings import evidence_of
from agentwatch.detectors.pii import (PiiExposureDetector, PiiExposureEvidence,
                                      fold_empty_windows, fold_window)
from agentwatch.detectors.registry import build_detectors
from agentwatch.events import LlmCall, PiiDetection, Severity

T0 = 300.0 * 5_666_666  # a multiple of every window length used here (60 s, 300 s)


def call(ts: float, service: str = "shop") -> LlmCall:
    return LlmCall(ts=T0 + ts, trace_id=f"t{ts}", span_id="s", service=service)


def pii(ts: float, entity: str = "EMAIL", count: int = 1, service: str = "shop",
        field: str = "llm_calls.prompt") -> PiiDetection:
    return PiiDetection(ts=T0 + ts, trace_id=f"t{ts}", span_id="s", service=service,
                        project="p", entity_type=entity, field=field, count=count)


def run(det: PiiExposureDetector, events) -> list:
    return [(i, f) for i, e in enumerate(events) for f in det.update(e)]


def test_steady_rate_is_silent() -> None:
    # Two hours, one call every 10 s, 1-2 detections of 1-2 emails a 300 s window: a window
    # holds at most 4, under min_count 5 whatever the baseline, so nothing may fire.
    rng = random.Random(3)
    events: list = [call(10.0 * k) for k in range(720)]
    for w in range(24):
        for _ in range(rng.randint(1, 2)):
            events.append(pii(300.0 * w + rng.uniform(0, 299), count=rng.randint(1, 2)))
    events.sort(key=lambda e: e.ts)
    assert run(PiiExposureDetector(), events) == []


def test_steady_rate_over_min_count_is_silent_too() -> None:
    # 8 emails in every 300 s window (4 detections of 2): the baseline is 8 and the threshold
    # max(5, 3 x 8) = 24, which 8 never exceeds.
    events = [pii(300.0 * w + 60.0 * j + 1, count=2) for w in range(40) for j in range(4)]
    assert run(PiiExposureDetector(), events) == []


def test_new_entity_after_warmup_fires_once() -> None:
    det = PiiExposureDetector(warmup_s=600.0)
    events = [call(60.0 * k) for k in range(20)]  # service first seen at T0
    events += [pii(60.0 * k + 30) for k in range(20)]  # emails from its first minute: learned
    events += [pii(700.0, "PHONE", 2, field="llm_calls.response"),  # age 700 s >= 600 s
               pii(710.0, "PHONE", 1), pii(760.0, "PHONE", 3),  # known now
               pii(800.0, "SECRET", 1, field="tool_calls.arguments")]
    events.sort(key=lambda e: e.ts)
    found = run(det, events)
    phone = next(i for i, e in enumerate(events) if getattr(e, "entity_type", "") == "PHONE")
    secret = next(i for i, e in enumerate(events) if getattr(e, "entity_type", "") == "SECRET")
    assert [(i, f.kind, f.key, f.severity) for i, f in found] == [
        (phone, "new_pii_entity", "service=shop/entity=PHONE", Severity.WARNING),
        (secret, "new_pii_entity", "service=shop/entity=SECRET", Severity.CRITICAL)]
    first = found[0][1]
    assert (first.value, first.threshold, first.resolved) == (700.0, 600.0, False)
    ev = evidence_of(first)
    assert ev == PiiExposureEvidence(service="shop", entity_type="PHONE",
                                     fields=("llm_calls.response",), window_start=T0 + 600.0,
                                     window_s=300.0, window_count=2, baseline=0.0,
                                     baseline_windows=0, service_age_s=700.0)


def test_warmup_boundary_is_inclusive() -> None:
    det = PiiExposureDetector(warmup_s=600.0)
    events = [call(0.0), pii(599.0, "PHONE"), pii(600.0, "IBAN")]
    assert [(i, f.evidence["entity_type"]) for i, f in run(det, events)] == [(2, "IBAN")]


def test_new_entity_of_a_brand_new_service_is_learned_silently() -> None:
    det = PiiExposureDetector(warmup_s=600.0)
    events = [call(60.0 * k, service="old") for k in range(30)]  # another service is old
    events += [pii(1000.0, "EMAIL", service="fresh"),  # fresh's first event ever
               pii(1100.0, "PHONE", service="fresh"),  # fresh is 100 s old
               pii(1650.0, "EMAIL", service="fresh"), pii(1700.0, "PHONE", service="fresh"),
               pii(1600.0, "IBAN", service="fresh")]  # fresh is exactly 600 s old
    events.sort(key=lambda e: e.ts)
    found = run(det, events)
    assert [(f.kind, f.key, f.value) for _, f in found] == [
        ("new_pii_entity", "service=fresh/entity=IBAN", 600.0)]
    assert events[found[0][0]].entity_type == "IBAN"


def test_rate_jump_fires_at_the_crossing_event_once_per_window_and_resolves() -> None:
    det = PiiExposureDetector()  # window 300 s, 12 baseline windows, factor 3, min_count 5
    events = [pii(300.0 * w + 10, count=2) for w in range(12)]  # baseline 2 after 12 windows
    # Window 12: ten single emails. Threshold max(5, 3 x 2) = 6; the 7th (count 7) crosses.
    events += [pii(3600.0 + 10.0 * j) for j in range(10)]
    # Window 13: ten again, still over (no second finding while the jump is open). Its
    # threshold: window 12 enters the baseline clipped at 6: 2 + 0.1 x (6 - 2) = 2.4 -> 7.2.
    events += [pii(3900.0 + 10.0 * j) for j in range(10)]
    # Window 14: 2 emails. Window 13 closed at 10 > 7.2 (still firing); baseline
    # 2.4 + 0.1 x (7.2 - 2.4) = 2.88, threshold 8.64.
    events += [pii(4200.0 + 10, count=2)]
    # Window 15's first event closes window 14 at 2 <= 8.64: resolved there.
    events += [pii(4500.0 + 10, count=2)]
    # Window 16: baseline 2.88 + 0.1 x (2 - 2.88) = 2.792 after 14, then 2.7128 after 15;
    # threshold 3 x 2.7128 = 8.1384; one detection of 20 fires again, at once.
    events += [pii(4800.0 + 10, count=20)]
    found = run(det, events)
    assert [(i, f.kind, f.resolved) for i, f in found] == [
        (12 + 6, "pii_rate_jump", False), (12 + 20 + 1, "pii_rate_jump", True),
        (12 + 20 + 2, "pii_rate_jump", False)]
    fired, resolved, again = (f for _, f in found)
    assert (fired.value, fired.threshold, fired.severity) == (7.0, 6.0, Severity.WARNING)
    assert fired.key == "service=shop/entity=EMAIL"
    assert fired.evidence["baseline"] == pytest.approx(2.0)
    assert fired.evidence["baseline_windows"] == 12
    assert fired.evidence["window_start"] == T0 + 3600.0
    assert resolved.value == 2.0 and resolved.threshold == pytest.approx(8.64)
    assert resolved.severity == Severity.INFO
    assert resolved.evidence["window_start"] == T0 + 4200.0
    assert resolved.evidence["reason"] == "window closed under the threshold"
    assert again.value == 20.0 and again.threshold == pytest.approx(8.1384)


def test_resolution_is_noticed_at_any_later_event_of_the_service() -> None:
    det = PiiExposureDetector()
    events: list = [pii(300.0 * w + 10, count=2) for w in range(12)]
    events += [pii(3600.0 + 10, count=7)]  # 7 > 6: fires
    # No more emails, only calls. The first call of window 14 closes window 13, empty: under.
    events += [call(3600.0 + 60.0 * k) for k in range(1, 12)]
    found = run(det, events)
    first_call_of_14 = next(i for i, e in enumerate(events) if e.ts >= T0 + 4200.0)
    assert [(i, f.resolved) for i, f in found] == [(12, False), (first_call_of_14, True)]
    assert found[1][1].value == 0.0 and found[1][1].evidence["window_start"] == T0 + 3900.0


def test_long_gaps_are_counted_as_zero_windows() -> None:
    det = PiiExposureDetector()
    events = [pii(300.0 * w + 10, count=6) for w in range(12)]  # baseline 6, threshold 18
    events += [pii(300.0 * 112 + 10, count=6)]  # 100 silent windows later
    found = run(det, events)
    # Window 11 closes (baseline still 6), then 100 empty windows, all past the 10-window mean
    # phase: 6 x 0.9^100 = 1.6e-4, threshold max(5, 4.8e-4) = 5, and 6 > 5 fires.
    assert [(i, f.value, f.threshold) for i, f in found] == [(12, 6.0, 5.0)]
    assert found[0][1].evidence["baseline"] == pytest.approx(6 * 0.9 ** 100)
    assert found[0][1].evidence["baseline_windows"] == 112


def test_a_gap_during_the_mean_phase_averages_the_zeros_in() -> None:
    det = PiiExposureDetector(baseline_windows=5)
    # Windows 0-1 hold 9 emails each, windows 2-5 none, window 6 holds 9.
    events = [pii(10.0, count=9), pii(310.0, count=9), pii(1810.0, count=9)]
    # At window 6: mean of (9, 9, 0, 0, 0, 0) = 3, threshold max(5, 9) = 9: 9 is not over it.
    assert run(det, events) == []
    events2 = [pii(10.0, count=9), pii(310.0, count=9), pii(1810.0, count=10)]
    found = run(PiiExposureDetector(baseline_windows=5), events2)
    assert [(i, f.value, f.threshold) for i, f in found] == [(2, 10.0, 9.0)]
    assert found[0][1].evidence["baseline"] == pytest.approx(3.0)


def test_a_gap_resolves_an_open_jump() -> None:
    det = PiiExposureDetector()
    events = [pii(300.0 * w + 10, count=2) for w in range(12)]
    events += [pii(3600.0 + 10, count=7), pii(300.0 * 40 + 10, count=1)]
    found = run(det, events)
    assert [(i, f.resolved, f.value) for i, f in found] == [(12, False, 7.0), (13, True, 0.0)]
    assert found[1][1].evidence["window_start"] == T0 + 3900.0  # the first empty window


def test_a_gap_of_a_billion_windows_is_bounded_work() -> None:
    det = PiiExposureDetector(key_ttl_s=1e12)  # the key must outlive the gap
    for w in range(12):
        det.update(pii(300.0 * w + 10, count=2))
    # Folded in O(1): a window at a time, this would not finish within the test timeout.
    found = det.update(pii(300.0 * 1e9, count=6))
    assert [(f.value, f.threshold) for f in found] == [(6.0, 5.0)]
    assert found[0].evidence["baseline"] == 0.0


@pytest.mark.parametrize("alpha", [0.1, 0.3, 1.0, 0.07])
def test_fold_empty_windows_equals_folding_zeros_one_by_one(alpha: float) -> None:
    for closed in range(0, 25):
        for n in range(0, 40):
            base = 7.5 if closed else 0.0
            expected = base
            for c in range(closed, closed + n):
                expected = fold_window(expected, c, 0.0, alpha)
            assert fold_empty_windows(base, closed, n, alpha) == pytest.approx(expected), (closed, n)


def test_state_caps_hold_under_many_services() -> None:
    det = PiiExposureDetector(max_services=10, max_keys=15)
    for i in range(1000):
        det.update(call(float(i), service=f"s{i}"))
        det.update(pii(i + 0.1, "EMAIL", service=f"s{i}"))
        det.update(pii(i + 0.2, "PHONE", service=f"s{i}"))
        assert len(det._services) <= 10 and len(det._entities) <= 15
    assert det.state_size() == 25
    assert (det.evicted_services, det.evicted_keys) == (990, 2000 - 15)
    snap = json.loads(json.dumps(det.snapshot()))
    assert len(snap["services"]) == 10 and len(snap["entities"]) == 15
    restored = PiiExposureDetector(max_services=10, max_keys=15)
    restored.restore(snap)
    assert (restored.evicted_services, restored.evicted_keys) == (990, 1985)


def test_an_evicted_firing_key_resolves() -> None:
    det = PiiExposureDetector(max_keys=2, warmup_s=1e9)  # PHONE, IBAN: not reported as new
    events = [pii(300.0 * w + 10, count=2) for w in range(12)]
    events += [pii(3600.0 + 10, count=7), pii(3600.0 + 20, "PHONE"), pii(3600.0 + 30, "IBAN")]
    found = run(det, events)
    assert [(i, f.resolved, f.key) for i, f in found] == [
        (12, False, "service=shop/entity=EMAIL"), (14, True, "service=shop/entity=EMAIL")]
    assert found[1][1].evidence["reason"] == "evicted: max_keys reached"


def test_build_detectors_splits_both_caps_over_partitions() -> None:
    [det] = build_detectors({"pii_exposure": {"max_services": 100, "max_keys": 1000}},
                            {"pii_exposure"}, partitions=4)
    assert (det.max_services, det.max_keys) == (50, 500)


def test_restore_keeps_the_open_jump_resolvable_by_calls() -> None:
    det = PiiExposureDetector()
    for w in range(12):
        det.update(pii(300.0 * w + 10, count=2))
    assert [f.resolved for f in det.update(pii(3600.0 + 10, count=7))] == [False]
    restored = PiiExposureDetector()
    restored.restore(json.loads(json.dumps(det.snapshot())))
    assert restored.update(call(3900.0)) == ()  # window 12 (over) closes: still open
    assert [f.resolved for f in restored.update(call(4200.0))] == [True]


@pytest.mark.parametrize("kwargs", [
    {"warmup_s": -1.0}, {"window_s": 0.0}, {"baseline_windows": 0}, {"rate_factor": 0.5},
    {"min_count": 0}, {"alpha": 0.0}, {"alpha": 1.5}, {"critical_entities": "SECRET"},
    {"max_services": 0}, {"max_keys": 0}, {"key_ttl_s": 0.0}])
def test_invalid_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PiiExposureDetector(**kwargs)


def test_detections_without_entity_type_or_count_are_ignored() -> None:
    det = PiiExposureDetector(warmup_s=0.0)
    assert det.update(pii(0.0, "", 3)) == () and det.update(pii(1.0, "EMAIL", 0)) == ()
    assert len(det._entities) == 0
