"""PipelineMetrics: exact values per label set, cardinality caps, gauge eviction, exposition."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agentwatch.broker import free_port
from agentwatch.dashboards.metrics import PipelineMetrics, serve_metrics
from agentwatch.detectors.drift import (DriftCheck, DriftDetector, DriftEvidence,
                                        EmbeddedWindow, deciding_statistic)
from agentwatch.detectors.vram import (MIB, VramLeakDetector, VramLeakEvidence,
                                       VramLeakResolvedEvidence)
from agentwatch.events import Finding, GpuSample, LlmCall, Severity, ToolCall
from tests.support.contract_streams import CONTRACT_STREAMS


def _call(i: int, **kw) -> LlmCall:
    return LlmCall(ts=float(i), trace_id=f"t{i}", span_id=f"s{i}", **kw)


def _tool(i: int, **kw) -> ToolCall:
    return ToolCall(ts=float(i), trace_id=f"t{i}", span_id=f"s{i}", **kw)


def _drift_evidence(method: str = "mmd") -> dict:
    return DriftEvidence(
        method=method, decided_by=("mmd",), deciding=("mmd",), alpha=0.01, window_start_ts=0.0,
        window_seen=200, scores={"mmd": {"score": 0.3, "threshold": 0.1, "drifted": True}},
        window_size=200, comparison_size=400, alpha_per_test=0.01, examples=()).to_mapping()


def _vram_evidence(*, host: str, gpu: int, pid: int, process_name: str, floor_mib: float,
                   leak_mib_per_min: float, eta_s: float) -> dict:
    return VramLeakEvidence(
        host=host, gpu=gpu, gpu_uuid="", pid=pid, process_name=process_name, simulated=False,
        leak_mib_per_min=leak_mib_per_min, kendall_tau=0.9, fit_r2=0.95,
        recent_leak_mib_per_min=leak_mib_per_min, floor_mib=floor_mib, peak_mib=floor_mib,
        threshold_mib=8_000.0, total_mib=8_192.0, eta_s=eta_s, above_threshold=False,
        window_s=600.0, points=20, inferences=0, inferences_from="",
        mib_per_inference=None).to_mapping()


@pytest.fixture()
def reg() -> CollectorRegistry:
    return CollectorRegistry()


def test_llm_calls_aggregate_per_label_set(reg):
    m = PipelineMetrics(reg)
    m.observe_llm_calls([
        _call(1, service="shop", model="gpt-4o", project="p1", input_tokens=100, output_tokens=7,
              cost_usd=0.25, priced=True),
        _call(2, service="shop", model="gpt-4o", project="p1", input_tokens=50, output_tokens=3,
              cache_read_tokens=20, cost_usd=0.5, priced=True, status="error"),
        _call(3, service="shop", model="mystery", project="p1", input_tokens=9),
    ])
    gpt = {"service": "shop", "model": "gpt-4o", "project": "p1"}
    mystery = {"service": "shop", "model": "mystery", "project": "p1"}
    v = reg.get_sample_value
    assert v("agentwatch_llm_calls_total", gpt) == 2
    assert v("agentwatch_llm_errors_total", gpt) == 1
    assert v("agentwatch_llm_cost_usd_total", gpt) == pytest.approx(0.75)
    assert v("agentwatch_llm_tokens_total", {**gpt, "direction": "input"}) == 150
    assert v("agentwatch_llm_tokens_total", {**gpt, "direction": "output"}) == 10
    assert v("agentwatch_llm_tokens_total", {**gpt, "direction": "cache_read"}) == 20
    # No reasoning tokens were reported, so no series is created for them.
    assert v("agentwatch_llm_tokens_total", {**gpt, "direction": "reasoning"}) is None
    assert v("agentwatch_llm_unpriced_calls_total", mystery) == 1
    assert v("agentwatch_llm_unpriced_calls_total", gpt) == 0
    m.observe_llm_calls([_call(4, service="shop", model="gpt-4o", project="p1", input_tokens=1)])
    assert v("agentwatch_llm_tokens_total", {**gpt, "direction": "input"}) == 151


def test_empty_and_long_label_values_are_normalised(reg):
    m = PipelineMetrics(reg, max_label_value_length=10)
    m.observe_llm_calls([_call(1, model="x" * 50)])
    assert reg.get_sample_value("agentwatch_llm_calls_total", {
        "service": "unknown", "model": "x" * 10, "project": "unknown"}) == 1


def test_counter_families_fold_beyond_cap_and_keep_totals(reg):
    m = PipelineMetrics(reg, max_label_sets=2)
    m.observe_llm_calls([_call(i, service="s", model=f"m{i}", project="p", input_tokens=10)
                         for i in range(5)])
    v = reg.get_sample_value
    assert v("agentwatch_llm_calls_total", {"service": "s", "model": "m0", "project": "p"}) == 1
    assert v("agentwatch_llm_calls_total", {"service": "s", "model": "m1", "project": "p"}) == 1
    assert v("agentwatch_llm_calls_total", {"service": "s", "model": "m2", "project": "p"}) is None
    other = {"service": "other", "model": "other", "project": "other"}
    assert v("agentwatch_llm_calls_total", other) == 3
    # The direction label is a closed vocabulary and survives folding.
    assert v("agentwatch_llm_tokens_total", {**other, "direction": "input"}) == 30
    assert v("agentwatch_metric_label_sets_folded_total", {"metric": "agentwatch_llm_calls"}) == 3
    series = [s for fam in reg.collect() if fam.name == "agentwatch_llm_calls"
              for s in fam.samples if s.name.endswith("_total")]
    assert len(series) == 3


def test_tool_status_survives_folding(reg):
    m = PipelineMetrics(reg, max_label_sets=1)
    m.observe_tool_calls([_tool(1, service="a", tool_name="t1"),
                          _tool(2, service="b", tool_name="t2", status="error"),
                          _tool(3, service="b", tool_name="t3", status="weird")])
    v = reg.get_sample_value
    assert v("agentwatch_tool_calls_total", {"service": "a", "tool": "t1", "status": "ok"}) == 1
    assert v("agentwatch_tool_calls_total",
             {"service": "other", "tool": "other", "status": "error"}) == 1
    assert v("agentwatch_tool_calls_total",
             {"service": "other", "tool": "other", "status": "other"}) == 1


def test_findings_counts_and_touch_no_drift_gauge(reg):
    m = PipelineMetrics(reg)
    m.observe_findings([
        Finding(detector="loops", key="t1", kind="repeat", severity=Severity.WARNING, ts=1,
                value=4, threshold=3),
        Finding(detector="loops", key="t2", kind="repeat", severity=Severity.WARNING, ts=2,
                value=5, threshold=3),
        Finding(detector="loops", key="t1", kind="repeat", severity=Severity.WARNING, ts=3,
                value=0, threshold=3, resolved=True),
        Finding(detector="drift", key="project=a", kind="drift",
                severity=Severity.CRITICAL, ts=4, value=0.3, threshold=0.1,
                evidence=_drift_evidence()),
    ])
    v = reg.get_sample_value
    assert v("agentwatch_findings_total", {"detector": "loops", "severity": "warning"}) == 2
    assert v("agentwatch_findings_resolved_total", {"detector": "loops"}) == 1
    assert v("agentwatch_findings_total",
             {"detector": "drift", "severity": "critical"}) == 1
    # Drift gauges follow the checks (observe_drift_checks), which every finding came from.
    assert v("agentwatch_drift_score", {"key": "project=a", "check": "drift",
                                        "statistic": "mmd"}) is None


def _check(key: str, kind: str, ts: float, scores: dict, deciding=("mmd",)) -> DriftCheck:
    full = {name: {"score": score, "threshold": threshold, "p_value": 0.5,
                   "drifted": score > threshold}
            for name, (score, threshold) in scores.items()}
    statistic = deciding_statistic(full, deciding)
    evidence = DriftEvidence(
        method="m", decided_by=tuple(s for s in deciding if full[s]["drifted"]),
        deciding=deciding, alpha=0.01, window_start_ts=ts - 60, window_seen=200, scores=full,
        window_size=200, comparison_size=400, alpha_per_test=0.005, examples=(),
        statistic=statistic)
    return DriftCheck(key, kind, ts, statistic, full[statistic]["score"],
                      full[statistic]["threshold"], bool(evidence.decided_by), evidence)


def test_drift_checks_set_skew_and_drift_series_apart_and_count_calm_checks(reg):
    m = PipelineMetrics(reg)
    m.observe_drift_checks([
        # A critical skew decided by the OOD share, and a calm drift check of the same window.
        _check("service=a", "skew", 60, {"mmd": (0.002, 0.008), "ood_share": (0.17, 0.14),
                                         "classifier_auc": (0.7, 0.6)},
               deciding=("mmd", "ood_share")),
        _check("service=a", "drift", 60, {"mmd": (0.0, 0.009)}),
    ])
    m.observe_drift_checks([_check("service=a", "drift", 120, {"mmd": (0.001, 0.01)})])
    v = reg.get_sample_value

    def series(name, kind, statistic):
        return v(name, {"key": "service=a", "check": kind, "statistic": statistic})

    assert series("agentwatch_drift_score", "skew", "ood_share") == 0.17
    assert series("agentwatch_drift_threshold", "skew", "ood_share") == 0.14
    assert series("agentwatch_drift_score", "skew", "mmd") == 0.002
    # Only the deciding statistics get series; the others stay in the evidence.
    assert series("agentwatch_drift_score", "skew", "classifier_auc") is None
    # The calm drift checks did not overwrite the skew series; the latest one wins.
    assert series("agentwatch_drift_score", "drift", "mmd") == 0.001
    assert series("agentwatch_drift_threshold", "drift", "mmd") == 0.01
    assert v("agentwatch_drift_checks_total", {"key": "service=a", "check": "skew"}) == 1
    assert v("agentwatch_drift_checks_total", {"key": "service=a", "check": "drift"}) == 2


def test_drift_checks_of_real_detector_update_the_gauges_every_window(reg):
    rng = np.random.default_rng(0)
    m = PipelineMetrics(reg)
    detector = DriftDetector(history_windows=1, permutations=100)
    detector.set_reference("service=shop", rng.normal(size=(300, 8)))
    v = reg.get_sample_value
    outcomes = set()
    # Five calm windows, then three moved by 2 sd on one axis.
    for i in range(8):
        vectors = rng.normal(size=(60, 8))
        vectors[:, 0] += 2.0 if i >= 5 else 0.0
        window = EmbeddedWindow("service=shop", 60.0 * (i + 1), ("q",) * 60, vectors)
        detector.update(window)
        m.observe_drift_checks(detector.last_checks)
        outcomes.update(c.drifted for c in detector.last_checks)
        for check in detector.last_checks:
            labels = {"key": "service=shop", "check": check.kind, "statistic": check.statistic}
            assert v("agentwatch_drift_score", labels) == check.value
            assert v("agentwatch_drift_threshold", labels) == check.threshold
    assert outcomes == {True, False}, "both calm and raised checks set the gauges"
    assert v("agentwatch_drift_checks_total", {"key": "service=shop", "check": "skew"}) == 8
    assert v("agentwatch_drift_checks_total", {"key": "service=shop", "check": "drift"}) == 7


def test_gauge_family_evicts_least_recently_set(reg):
    m = PipelineMetrics(reg, max_label_sets=2)
    for i, key in enumerate(["a", "b", "a", "c"]):
        m.observe_drift_checks([_check(key, "drift", i, {"mmd": (i, 1)})])
    v = reg.get_sample_value

    def score(key):
        return v("agentwatch_drift_score", {"key": key, "check": "drift", "statistic": "mmd"})

    assert score("b") is None
    assert score("a") == 2
    assert v("agentwatch_drift_threshold", {"key": "b", "check": "drift",
                                            "statistic": "mmd"}) is None
    assert score("c") == 3


def test_vram_gauges_from_samples_and_findings(reg):
    m = PipelineMetrics(reg, gauge_stale_after_s=60)
    m.observe_gpu_samples([
        GpuSample(ts=0, host="h", gpu=0, memory_used_bytes=100, memory_total_bytes=1000),
        GpuSample(ts=0, host="h", gpu=0, pid=7, process_name="python", memory_used_bytes=40),
    ])
    v = reg.get_sample_value
    proc = {"host": "h", "gpu": "0", "pid": "7", "process": "python"}
    assert v("agentwatch_vram_used_bytes", {"host": "h", "gpu": "0", "pid": "0",
                                            "process": "device"}) == 100
    assert v("agentwatch_vram_total_bytes", {"host": "h", "gpu": "0"}) == 1000
    assert v("agentwatch_vram_used_bytes", proc) == 40
    # The labels of a finding's series are those the samples of the same process get.
    m.observe_findings([Finding(
        detector="vram_leak", key="host=h/gpu=0/pid=7", kind="vram_leak",
        severity=Severity.WARNING, ts=10, value=120.0, threshold=3600,
        evidence=_vram_evidence(host="h", gpu=0, pid=7, process_name="python",
                                floor_mib=45 / MIB, leak_mib_per_min=5.0 * 60 / MIB,
                                eta_s=120.0))])
    assert v("agentwatch_vram_slope_bytes_per_second", proc) == pytest.approx(5.0)
    assert v("agentwatch_vram_seconds_to_threshold", proc) == 120.0
    assert v("agentwatch_vram_used_bytes", proc) == 45
    resolution = VramLeakResolvedEvidence(reason="leak_stopped", host="h", gpu=0, pid=7,
                                          process_name="python", simulated=False)
    m.observe_findings([Finding(detector="vram_leak", key="host=h/gpu=0/pid=7",
                                kind="vram_leak", severity=Severity.WARNING, ts=20, value=0,
                                threshold=3600, evidence=resolution.to_mapping(),
                                resolved=True)])
    assert v("agentwatch_vram_slope_bytes_per_second", proc) is None
    assert v("agentwatch_vram_seconds_to_threshold", proc) is None
    # 100 s later only the device reports: the process (last seen at ts 10) is gone.
    m.observe_gpu_samples([GpuSample(ts=100, host="h", gpu=0, memory_used_bytes=60)])
    assert v("agentwatch_vram_used_bytes", proc) is None
    assert v("agentwatch_vram_used_bytes", {"host": "h", "gpu": "0", "pid": "0",
                                            "process": "device"}) == 60


def test_batches_dead_letters_lag_and_deliveries(reg):
    m = PipelineMetrics(reg)
    m.observe_batch(topic="otlp_spans", spans=120, seconds=0.02)
    m.observe_batch(topic="otlp_spans", spans=30, seconds=0.2)
    m.observe_dead_letter(topic="otlp_spans", reason="bad_proto", n=3)
    m.set_consumer_lag("otlp_spans", 2, 17)
    m.set_consumer_lag("otlp_spans", 3, 4)
    m.clear_consumer_lag("otlp_spans", 3)
    m.observe_delivery(destination="slack", ok=True)
    m.observe_delivery(destination="slack", ok=False)
    m.observe_delivery(destination="slack", ok=True)
    v = reg.get_sample_value
    assert v("agentwatch_batches_total", {"topic": "otlp_spans"}) == 2
    assert v("agentwatch_spans_total", {"topic": "otlp_spans"}) == 150
    assert v("agentwatch_processing_seconds_count", {"stage": "otlp_spans"}) == 2
    assert v("agentwatch_processing_seconds_sum", {"stage": "otlp_spans"}) == pytest.approx(0.22)
    assert v("agentwatch_processing_seconds_bucket", {"stage": "otlp_spans", "le": "0.025"}) == 1
    assert v("agentwatch_dead_letter_total", {"topic": "otlp_spans", "reason": "bad_proto"}) == 3
    assert v("agentwatch_consumer_lag", {"topic": "otlp_spans", "partition": "2"}) == 17
    assert v("agentwatch_consumer_lag", {"topic": "otlp_spans", "partition": "3"}) is None
    assert v("agentwatch_notifier_deliveries_total", {"destination": "slack"}) == 2
    assert v("agentwatch_notifier_failures_total", {"destination": "slack"}) == 1


def test_trace_steps_histogram(reg):
    m = PipelineMetrics(reg)
    m.observe_trace_steps(service="a", steps=[1, 4, 40])
    v = reg.get_sample_value
    assert v("agentwatch_trace_steps_count", {"service": "a"}) == 3
    assert v("agentwatch_trace_steps_bucket", {"service": "a", "le": "5.0"}) == 2


@pytest.mark.parametrize("kwargs", [{"max_label_sets": 0}, {"gauge_stale_after_s": 0},
                                    {"max_label_value_length": 2}])
def test_constructor_validates(reg, kwargs):
    with pytest.raises(ValueError):
        PipelineMetrics(reg, **kwargs)


def test_serve_metrics_exposes_registry(reg):
    m = PipelineMetrics(reg)
    m.observe_llm_calls([_call(1, service="svc", model="m", project="p")])
    port = free_port()
    server = serve_metrics(reg, port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    assert 'agentwatch_llm_calls_total{model="m",project="p",service="svc"} 1.0' in body


def test_vram_finding_in_the_vram_detectors_units(reg):
    # detectors.vram reports MiB and MiB/min with process_name; gauges are bytes and bytes/s.
    m = PipelineMetrics(reg)
    m.observe_findings([Finding(
        detector="vram_leak", key="host=gpu-b/gpu=1/pid=99", kind="vram_leak",
        severity=Severity.CRITICAL, ts=5, value=600.0, threshold=900.0,
        evidence=_vram_evidence(host="gpu-b", gpu=1, pid=99, process_name="trainer",
                                floor_mib=2048.0, leak_mib_per_min=60.0, eta_s=600.0))])
    labels = {"host": "gpu-b", "gpu": "1", "pid": "99", "process": "trainer"}
    v = reg.get_sample_value
    assert v("agentwatch_vram_slope_bytes_per_second", labels) == 1024 * 1024  # 60 MiB/min
    assert v("agentwatch_vram_seconds_to_threshold", labels) == 600.0
    assert v("agentwatch_vram_used_bytes", labels) == 2048 * 1024 * 1024


def test_vram_gauges_from_the_vram_detectors_own_findings(reg):
    stream = CONTRACT_STREAMS["vram_leak"](1)
    detector = VramLeakDetector(**stream.params)
    findings = [f for e in [*stream.warmup, *stream.events] for f in detector.update(e)]
    leak = next(f for f in findings if not f.resolved)
    m = PipelineMetrics(reg)
    m.observe_findings([leak])
    labels = {"host": "contract-node", "gpu": "0", "pid": "0", "process": "device"}
    v = reg.get_sample_value
    assert v("agentwatch_vram_seconds_to_threshold", labels) == leak.evidence["eta_s"] == leak.value
    assert v("agentwatch_vram_slope_bytes_per_second", labels) == pytest.approx(
        leak.evidence["leak_mib_per_min"] * MIB / 60)
    assert v("agentwatch_vram_used_bytes", labels) == leak.evidence["floor_mib"] * MIB


def test_findings_without_readable_evidence_are_counted_and_touch_no_gauge(reg):
    m = PipelineMetrics(reg)
    m.observe_findings([
        # Evidence missing the fields of the detector's evidence type (another version wrote it).
        Finding(detector="drift", key="project=a", kind="drift", severity=Severity.WARNING,
                ts=1, value=0.3, threshold=0.1, evidence={"method": "mmd"}),
        Finding(detector="vram_leak", key="host=h/gpu=0", kind="vram_leak",
                severity=Severity.WARNING, ts=1, value=60.0, threshold=3600.0,
                evidence={"eta_s": 60.0}),
        # A detector this version does not know.
        Finding(detector="drift_embedding", key="project=a", kind="mmd",
                severity=Severity.WARNING, ts=1, value=0.3, threshold=0.1,
                evidence=_drift_evidence()),
    ])
    v = reg.get_sample_value
    assert v("agentwatch_findings_total", {"detector": "drift", "severity": "warning"}) == 1
    assert v("agentwatch_findings_total", {"detector": "vram_leak", "severity": "warning"}) == 1
    assert v("agentwatch_findings_total",
             {"detector": "drift_embedding", "severity": "warning"}) == 1
    assert not [s for family in reg.collect() if family.name.startswith(("agentwatch_drift",
                                                                          "agentwatch_vram"))
                for s in family.samples]


def test_prompt_families_count_managed_prompts_per_service_prompt_and_version(reg):
    m = PipelineMetrics(reg)
    m.observe_llm_calls([
        _call(1, service="shop", model="gpt-4o", prompt_name="support", prompt_version="3",
              cost_usd=0.25, priced=True, latency_ms=400.0),
        _call(2, service="shop", model="gpt-4o-mini", prompt_name="support", prompt_version="3",
              cost_usd=0.5, priced=True, latency_ms=3000.0, status="error"),
        _call(3, service="shop", model="gpt-4o", prompt_name="support", prompt_version="4",
              latency_ms=12_000.0),
        # Not a managed prompt: no prompt series at all.
        _call(4, service="shop", model="gpt-4o", cost_usd=9.0, priced=True, latency_ms=50.0),
        # Nulled as implausible: counted, no latency observation.
        _call(5, service="shop", prompt_name="support", prompt_version="4",
              invalid_fields="latency_ms:out_of_bounds"),
        # A name without a version (Langfuse without a label, say).
        _call(6, service="shop", prompt_name="triage", latency_ms=100.0),
    ])
    v3 = {"service": "shop", "prompt": "support", "version": "3"}
    v4 = {**v3, "version": "4"}
    v = reg.get_sample_value
    assert v("agentwatch_prompt_calls_total", v3) == 2
    assert v("agentwatch_prompt_errors_total", v3) == 1
    assert v("agentwatch_prompt_cost_usd_total", v3) == pytest.approx(0.75)
    assert v("agentwatch_prompt_latency_seconds_count", v3) == 2
    assert v("agentwatch_prompt_latency_seconds_sum", v3) == pytest.approx(3.4)
    assert v("agentwatch_prompt_latency_seconds_bucket", {**v3, "le": "0.5"}) == 1
    assert v("agentwatch_prompt_latency_seconds_bucket", {**v3, "le": "5.0"}) == 2
    assert v("agentwatch_prompt_calls_total", v4) == 2
    assert v("agentwatch_prompt_errors_total", v4) == 0  # a zero series, not "no data"
    assert v("agentwatch_prompt_cost_usd_total", v4) == 0
    assert v("agentwatch_prompt_latency_seconds_count", v4) == 1
    assert v("agentwatch_prompt_latency_seconds_bucket", {**v4, "le": "10.0"}) == 0
    assert v("agentwatch_prompt_latency_seconds_bucket", {**v4, "le": "20.0"}) == 1
    assert v("agentwatch_prompt_calls_total", {"service": "shop", "prompt": "triage",
                                               "version": "unknown"}) == 1
    calls = [s for fam in reg.collect() if fam.name == "agentwatch_prompt_calls"
             for s in fam.samples if s.name.endswith("_total")]
    assert len(calls) == 3
    # The model families still count every call.
    assert v("agentwatch_llm_calls_total", {"service": "shop", "model": "gpt-4o",
                                            "project": "unknown"}) == 3


def test_prompt_families_fold_beyond_cap_and_cut_long_labels(reg):
    m = PipelineMetrics(reg, max_label_sets=2, max_label_value_length=10)
    m.observe_llm_calls([_call(i, service="s", prompt_name=f"prompt-{i}-" + "x" * 40,
                               prompt_version=str(i), latency_ms=1000.0, status="error")
                         for i in range(5)])
    v = reg.get_sample_value
    assert v("agentwatch_prompt_calls_total", {"service": "s", "prompt": "prompt-0-x",
                                               "version": "0"}) == 1
    other = {"service": "other", "prompt": "other", "version": "other"}
    assert v("agentwatch_prompt_calls_total", other) == 3
    assert v("agentwatch_prompt_errors_total", other) == 3
    assert v("agentwatch_prompt_latency_seconds_count", other) == 3
    assert v("agentwatch_metric_label_sets_folded_total",
             {"metric": "agentwatch_prompt_calls"}) == 3
    assert v("agentwatch_metric_label_sets_folded_total", {"metric": "agentwatch_llm_calls"}) == 0
