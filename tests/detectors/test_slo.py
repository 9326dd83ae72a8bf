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


def ttft_call(k: int, ttft_ms: float | None, **kw) -> LlmCall:
    return LlmCall(ts=T0 + k, trace_id=f"t{k}", span_id="s", service="api", model="gpt-4o",
                   latency_ms=500.0, time_to_first_token_ms=ttft_ms, **kw)


def test_ttft_quantile_over_the_calls_that_report_one() -> None:
    # 20 unstreamed calls (no TTFT), then streamed ones: 300 ms for k = 20..49, 4000 ms after.
    events = [ttft_call(k, None if k < 20 else 300.0 if k < 50 else 4000.0) for k in range(60)]
    found = run(slo(ttft_threshold_ms=2000.0), events)
    # Judged once 20 calls report a TTFT (k = 39). Slow share (k - 49) / (k - 19) first exceeds
    # 5% at k = 51 (2 of 32); the p95 of those 32 by nearest rank is the 31st smallest: 4000 ms.
    assert [(i, f.kind, f.value) for i, f in found] == [(51, "ttft", 4000.0)]
    evidence = found[0][1].evidence
    assert (evidence["calls_with_ttft"], evidence["slow_ttft_calls"], evidence["calls"]) == (32, 2, 52)
    assert found[0][1].threshold == 2000.0 and found[0][1].key == "service=api/model=gpt-4o"


def test_ttft_resolves_and_survives_a_restore() -> None:
    # Slow from k = 20 to 24, then fast; 1 call/s in a 60 s window of 6 s sub-buckets.
    events = [ttft_call(k, 4000.0 if 20 <= k <= 24 else 300.0) for k in range(100)]
    found = run(slo(ttft_threshold_ms=2000.0), events)
    # 2 slow of 22 at k = 21 fires; the sub-bucket [18, 24) leaves when k = 78 opens bucket 13:
    # calls 24-78 hold one slow of 55 (1.8% <= 0.8 * 5%).
    assert [(i, f.kind, f.resolved) for i, f in found] == [(21, "ttft", False), (78, "ttft", True)]
    det = slo(ttft_threshold_ms=2000.0)
    for e in events[:50]:
        det.update(e)
    restored = slo(ttft_threshold_ms=2000.0)
    restored.restore(det.snapshot())
    assert restored.snapshot() == det.snapshot()
    assert [(i + 50, f.kind, f.resolved) for i, f in run(restored, events[50:])] == [(78, "ttft", True)]


def blocked_call(k: int, reason: str, provider: str = "gcp.gemini", model: str = "gemini-2.5-pro") -> LlmCall:
    return LlmCall(ts=T0 + k, trace_id=f"t{k}", span_id="s", service="api", provider=provider, model=model,
                   latency_ms=500.0, finish_reason=reason)


def test_provider_blocked_fires_per_provider_and_model_and_resolves() -> None:
    # Gemini blocks calls 30 and 31 (PROHIBITED_CONTENT, SAFETY); calls to another provider and
    # model interleave and never are blocked.
    events = []
    for k in range(100):
        events.append(blocked_call(k, "PROHIBITED_CONTENT" if k == 30 else "SAFETY" if k == 31 else "STOP"))
        events.append(blocked_call(k, "stop", provider="openai", model="gpt-4o"))
    found = run(slo(blocked_threshold=0.05), events)
    # Gemini: 1/31 at k = 30 (3.2%), 2/32 = 6.25% > 5% at k = 31 (event 62). It resolves at
    # <= 0.8 * 5% = 4%: 2 of 50 at k = 49 (event 98), all 50 calls still in the 60 s window.
    assert [(i, f.kind, f.resolved, f.key) for i, f in found] == [
        (62, "provider_blocked", False, "service=api/provider=gcp.gemini/model=gemini-2.5-pro"),
        (98, "provider_blocked", True, "service=api/provider=gcp.gemini/model=gemini-2.5-pro")]
    fired = found[0][1]
    assert fired.value == pytest.approx(2 / 32) and fired.threshold == 0.05
    assert fired.evidence["finish_reasons"] == ["PROHIBITED_CONTENT", "SAFETY"]
    assert fired.evidence["blocked_calls"] == 2 and fired.evidence["calls"] == 32
    assert found[1][1].evidence["calls"] == 50 and found[1][1].value == pytest.approx(0.04)


def test_provider_blocked_is_quiet_below_the_threshold_and_for_ordinary_stops() -> None:
    events = [blocked_call(k, "content_filter" if k == 50 else "length" if k % 3 else "stop") for k in range(200)]
    assert run(slo(blocked_threshold=0.05), events) == []
    # Below min_calls nothing is judged, whatever the share.
    assert run(slo(blocked_threshold=0.05), [blocked_call(k, "refusal") for k in range(19)]) == []


@pytest.mark.parametrize("kwargs", [{"ttft_threshold_ms": 0}, {"ttft_quantile": 1.0}, {"blocked_threshold": 0},
                                    {"blocked_finish_reasons": "safety"},
                                    {"overrides": {"api": {"ttft_ms": 1}}}])
def test_rejects_bad_new_config(kwargs) -> None:
    with pytest.raises(ValueError):
        SloDetector(**kwargs)
