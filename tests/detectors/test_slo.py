"""SloDetector: error-rate and latency windows with exact firing and resolving calls."""

from __future__ import annotations

import pytest

from agentwatch.detectors.slo import SloDetector, nearest_rank_quantile
from agentwatch.events import LlmCall

T0 = 60.0 * 28_333_333  # a multiple of the 6 s sub-bucket


def call(k: int, *, error: bool = False, latency_ms: float = 500.0, service: str = "api",
         model: str = "gpt-4o", dt: float = 1.0) -> LlmCall:
    return LlmCall(ts=T0 + k * dt, trace_id=f"t{k}", span_id="s", service=service, model=model,
                   status="error" if error else "ok", latency_ms=latency_ms)


def run(det, events):
    return [(i, f) for i, e in enumerate(events) for f in det.update(e)]


def slo(**kw) -> SloDetector:
    return SloDetector(**{"window_s": 60.0, "n_buckets": 10, "min_calls": 20, **kw})


def test_error_rate_fires_and_resolves_when_errors_leave_the_window() -> None:
    # One call a second; errors at calls 20-24.
    events = [call(k, error=20 <= k <= 24) for k in range(100)]
    found = run(slo(), events)
    assert [(i, f.kind, f.resolved) for i, f in found] == [(21, "error_rate", False),
                                                           (78, "error_rate", True)]
    fired, resolved = found[0][1], found[1][1]
    # Call 20 makes 1/21 = 4.8% (not over 5%); call 21 makes 2/22.
    assert fired.value == pytest.approx(2 / 22) and fired.threshold == 0.05
    assert fired.key == "service=api/model=gpt-4o" and fired.evidence["errors"] == 2
    # Calls 18-23 share the sub-bucket [18 s, 24 s); it leaves the 60 s window when call 78
    # opens sub-bucket 13, leaving calls 24-78 (55 calls) with one error: 1/55 <= 0.8 * 5%.
    assert resolved.value == pytest.approx(1 / 55)
    assert resolved.evidence["calls"] == 55


def test_latency_quantile() -> None:
    events = [call(k, latency_ms=500.0 if k < 30 else 2000.0) for k in range(40)]
    found = run(slo(latency_threshold_ms=1000.0), events)
    # Slow fraction (k - 29) / (k + 1) first exceeds 5% at k = 31 (2 of 32). The p95 of those
    # 32 latencies by nearest rank is the 31st smallest: 2000 ms.
    assert [(i, f.kind, f.value) for i, f in found] == [(31, "latency", 2000.0)]
    assert found[0][1].threshold == 1000.0 and found[0][1].evidence["slow_calls"] == 2


def test_calls_whose_latency_was_rejected_do_not_dilute_the_latency_slo() -> None:
    # 30 fast calls, then 2 slow ones among 60 calls whose latency was implausible (nulled
    # upstream, read as 0). Counted as fast they would make 2/92 = 2.2% slow: no alarm. Left
    # out, the second slow call makes 2 of 32 timed calls slow (6.25% > 5%).
    untimed = [LlmCall(ts=T0 + 30 + i / 100, trace_id=f"u{i}", span_id="s", service="api", model="gpt-4o",
                       latency_ms=0.0, invalid_fields="latency_ms:above_max") for i in range(60)]
    events = [call(k) for k in range(30)] + untimed + [call(31, latency_ms=2000.0), call(32, latency_ms=2000.0)]
    found = run(slo(latency_threshold_ms=1000.0), events)
    assert [(i, f.kind) for i, f in found] == [(91, "latency")]
    evidence = found[0][1].evidence
    assert evidence["calls"] == 92 and evidence["calls_without_latency"] == 60
    assert evidence["slow_fraction"] == pytest.approx(2 / 32)
    assert found[0][1].value == 2000.0  # the quantile is over the timed calls only

    restored = slo(latency_threshold_ms=1000.0)
    restored.restore(slo_snapshot := _detector_after(events[:-1]).snapshot())
    assert slo_snapshot["windows"][0][10] == restored.snapshot()["windows"][0][10]
    assert [f.kind for f in restored.update(events[-1])] == ["latency"]


def _detector_after(events) -> SloDetector:
    det = slo(latency_threshold_ms=1000.0)
    for event in events:
        det.update(event)
    return det


def test_no_judgement_below_min_calls() -> None:
    events = [call(k, error=True, latency_ms=60_000) for k in range(19)]
    assert run(slo(), events) == []


def test_overrides_more_specific_wins() -> None:
    events = [call(k, error=20 <= k <= 24, service=svc, model=m)
              for svc, m in (("api", "gpt-4o"), ("api", "mini"), ("web", "gpt-4o"))
              for k in range(40)]
    det = slo(overrides={"api": {"error_rate_threshold": 0.5},
                         "api/mini": {"error_rate_threshold": 0.01}})
    found = run(det, events)
    # api/gpt-4o: 50% never reached. api/mini: 1/21 > 1% at its call 20. web: default 5%.
    assert [(i, f.key) for i, f in found] == [(40 + 20, "service=api/model=mini"),
                                              (80 + 21, "service=web/model=gpt-4o")]
    with pytest.raises(ValueError):
        slo(overrides={"api": {"p99_ms": 3}})


def test_idle_key_resolves_on_expiry() -> None:
    det = slo(key_ttl_s=600.0)
    events = [call(k, error=k >= 20) for k in range(25)] + [call(2000, service="other")]
    found = run(det, events)
    assert [(i, f.resolved, f.key) for i, f in found] == [
        (21, False, "service=api/model=gpt-4o"), (25, True, "service=api/model=gpt-4o")]
    assert found[1][1].evidence["reason"] == "no calls within key_ttl_s"


def test_nearest_rank_quantile() -> None:
    assert nearest_rank_quantile([5, 1, 4, 2, 3], 0.5) == 3
    assert nearest_rank_quantile(list(range(1, 101)), 0.95) == 95


@pytest.mark.parametrize("kwargs", [{"window_s": 0}, {"min_calls": 0}, {"n_buckets": 0},
                                    {"error_rate_threshold": 1.5}, {"latency_quantile": 1.0},
                                    {"resolve_ratio": 0}])
def test_rejects_bad_config(kwargs) -> None:
    with pytest.raises(ValueError):
        SloDetector(**kwargs)
