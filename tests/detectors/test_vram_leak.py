"""VramLeakDetector on the simulated incident profiles, with exact detection points.

Every stream starts at T0 (a multiple of the 60 s bucket) with a sample round every 5 s. With the
default parameters a floor point exists for bucket i once buckets i-4..i are held (5-minute
trailing minimum), the first claim needs 6 floors (buckets 4..9), and bucket m is judged when the
first sample of bucket m+1 arrives, at T0 + 60(m+1). Positions below are derived by hand in the
comments or, for staircases, by a pure-Python oracle (closed-form floors, brute-force medians;
no numpy/scipy) whose arithmetic is itself checked against a hand derivation.
"""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from agentwatch.collectors.gpu_sim import SimProfile, SimulatedGpuSource, simulated_stream
from agentwatch.detectors.vram import VramLeakDetector, sen_trend
from agentwatch.events import Finding, GpuSample, LlmCall, Severity

MIB = 1 << 20
GIB = 1 << 30
T0 = 1_700_000_040.0  # = 28_333_334 * 60
THRESHOLD_MIB = 0.9 * 8192  # 7372.8
CONTEXT_MIB = 300  # simulated CUDA context: device = process + 300 MiB


def run(profile: SimProfile, duration_s: float, *, detector=None, with_calls=True, seed=1,
        rows=lambda s: True):
    det = detector or VramLeakDetector()
    src = SimulatedGpuSource(profile, start_ts=T0, seed=seed)
    found: list[Finding] = []
    for _ts, samples, calls in simulated_stream(src, start_ts=T0, duration_s=duration_s,
                                                with_llm_calls=with_calls):
        for call in calls:
            assert det.update(call) == ()
        for sample in samples:
            if rows(sample):
                found.extend(det.update(sample))
    return det, found


def brief(found):
    return [(f.ts - T0, f.key.rsplit("/", 1)[-1], str(f.severity), f.resolved,
             round(f.value, 2), f.evidence.get("reason")) for f in found]


# --------------------------------------------------------------------------- exact profiles

def test_linear_leak_180_mib_per_inference_warning_critical_crash_and_new_process():
    """Process = 1024 + 180*n MiB, n = floor(e/60 + 1/2) inferences (one a minute, at 30+60k s).

    * floor(i) = process at the start of bucket i-4 = 1024 + 180(i-4): a 3 MiB/s line, so the
      first judgement (bucket 9, at 600 s) sees slope 3 MiB/s, tau 1, R^2 1.
      Device peak over buckets 5..9 = device at 595 s: n = 10 -> 300 + 1024 + 1800 = 3124 MiB;
      ETA = (7372.8 - 3124) / 3 = 1416.27 s < 3600 -> warning.
    * judged at 60m: peak = 1324 + 180m, ETA = (6048.8 - 180m)/3 < 600 first for m = 24:
      critical at 1440 s with ETA (6048.8 - 4320)/3 = 576.27 s.
    * OOM when the device would pass 97% (7946.24 MiB): 1024 + 180n >= 7646.24 -> n = 37, at
      e = 36.5 min = 2190 s; pid 4242 is last seen at 2185 and is stale (> 30 s) at 2220.
    * pid 4243 starts at 2190 in bucket 36: floors from bucket 40, 6 floors at bucket 45 ->
      judged at 2760 s; peak = device at 2755 (e = 565, n = 9) = 2944 MiB ->
      ETA = (7372.8 - 2944)/3 = 1476.27 s -> warning.
    """
    det, found = run(SimProfile(name="leak"), 2800)
    assert brief(found) == [
        (600.0, "pid=4242", "warning", False, 1416.27, None),
        (1440.0, "pid=4242", "critical", False, 576.27, None),
        (2220.0, "pid=4242", "critical", True, 0.0, "process_exited"),
        (2760.0, "pid=4243", "warning", False, 1476.27, None),
    ]
    first = found[0]
    assert first.key == "host=sim-gpu-node/gpu=0/pid=4242"
    assert first.threshold == 3600.0 and found[1].threshold == 600.0
    ev = first.evidence
    assert ev["leak_mib_per_min"] == pytest.approx(180.0)
    assert ev["kendall_tau"] == 1.0 and ev["fit_r2"] == pytest.approx(1.0)
    # 10 calls (at 30, 90, ..., 570 s) in the 600 s behind the floors: 3 MiB/s / (1/60 /s)
    assert ev["inferences"] == 10 and ev["mib_per_inference"] == pytest.approx(180.0)
    assert ev["peak_mib"] == 3124.0 and ev["threshold_mib"] == pytest.approx(THRESHOLD_MIB)
    assert ev["simulated"] is True and ev["process_name"] == "sim-inference-server"
    assert found[1].evidence["mib_per_inference"] == pytest.approx(180.0)
    assert json.loads(json.dumps(found[1].evidence)) == found[1].evidence  # JSON-able


def test_restart_resets_state_and_resolves():
    """Restart every 1500 s (bucket 25, aligned): each process repeats the leak's timeline.

    pid 4242: warning 600, critical 1440, gone after 1495 -> resolved at 1530 (first device
    row more than 30 s later). pid 4243 from 1500: +600 -> 2100, +1440 -> 2940, resolved
    3030; pid 4244 from 3000: warning 3600.
    """
    _, found = run(SimProfile(name="restart"), 3600)
    assert brief(found) == [
        (600.0, "pid=4242", "warning", False, 1416.27, None),
        (1440.0, "pid=4242", "critical", False, 576.27, None),
        (1530.0, "pid=4242", "critical", True, 0.0, "process_exited"),
        (2100.0, "pid=4243", "warning", False, 1416.27, None),
        (2940.0, "pid=4243", "critical", False, 576.27, None),
        (3030.0, "pid=4243", "critical", True, 0.0, "process_exited"),
        (3600.0, "pid=4244", "warning", False, 1416.27, None),
    ]


def test_device_only_source_reports_on_the_device_and_resets_on_the_drop():
    """DCGM-like: device rows only. Same line as the process (+300 MiB), so the same ETAs;
    the OOM at 2190 s drops the device from 7946 to 1324 MiB, far below its floor: reset and
    resolve at once (reason restart); the new history needs 6 floors again (2760 s)."""
    _, found = run(SimProfile(name="leak"), 2800, rows=lambda s: s.pid == 0)
    assert brief(found) == [
        (600.0, "gpu=0", "warning", False, 1416.27, None),
        (1440.0, "gpu=0", "critical", False, 576.27, None),
        (2190.0, "gpu=0", "critical", True, 0.0, "restart"),
        (2760.0, "gpu=0", "warning", False, 1476.27, None),
    ]
    assert found[0].key == "host=sim-gpu-node/gpu=0"


# --------------------------------------------------------------------------- oracle

def _median_slope(xs, ys):
    return statistics.median((ys[j] - ys[i]) / (xs[j] - xs[i])
                             for i in range(len(xs)) for j in range(i + 1, len(xs)))


def oracle_trend(xs, ys):
    """Sen slope, intercept (median(y) - slope*median(x)), tau, R^2, recent-half slope."""
    n = len(xs)
    x = [v - xs[0] for v in xs]
    slope = _median_slope(x, ys)
    intercept = statistics.median(ys) - slope * statistics.median(x)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    tau = sum((ys[j] > ys[i]) - (ys[j] < ys[i]) for i, j in pairs) / len(pairs)
    mean = sum(ys) / n
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * xv) ** 2 for xv, y in zip(x, ys))
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 0.0
    half = max(3, (n + 1) // 2)
    recent = _median_slope(x[-half:], ys[-half:])
    return slope, tau, r2, recent


def oracle_first_detection(process_mib, end_s, *, first_bucket=0):
    """(ts offset, severity) of the first finding for a process starting at T0 (MiB units)."""
    lows, highs = {}, {}
    for k in range(int(end_s // 5) + 1):
        e = 5 * k
        m = e // 60
        v = process_mib(e)
        lows[m] = min(lows.get(m, math.inf), v)
        highs[m] = max(highs.get(m, -math.inf), v)
    for m in range(first_bucket + 9, int(end_s // 60)):
        idxs = [i for i in range(max(first_bucket + 4, m - 29), m + 1)]
        xs = [60.0 * (i + 1) for i in idxs]
        ys = [min(lows[j] for j in range(i - 4, i + 1)) for i in idxs]
        for size in sorted({len(xs), max(6, len(xs) // 2), 6}, reverse=True):
            cx, cy = xs[-size:], ys[-size:]
            slope, tau, r2, recent = oracle_trend(cx, cy)
            if (slope * MIB >= 16384 and slope * (cx[-1] - cx[0]) >= 128 and tau >= 0.6
                    and r2 >= 0.8 and recent >= 0.5 * slope):
                peak = CONTEXT_MIB + max(highs[j] for j in range(m - 4, m + 1))
                eta = max(0.0, (THRESHOLD_MIB - peak) / slope)
                if eta < 600 or peak >= THRESHOLD_MIB:
                    return 60.0 * (m + 1), "critical", eta
                if eta < 3600:
                    return 60.0 * (m + 1), "warning", eta
                break
    return None


def test_oracle_reproduces_hand_worked_staircase_fit():
    """Step leak floors judged at 840 s: buckets 4..13 = [0,0,0,0,1,1,1,1,2,2] steps of 512 MiB.

    By hand: 13 tied pairs, 32 rising of 45 -> tau 32/45; Sen slope = 10th smallest positive
    pairwise slope = 1/4 step per bucket; intercept 1 - 0.25*4.5 = -0.125 steps;
    SS_res = 1.15625, SS_tot = 5.6 -> R^2 = 0.79353 < 0.8, so no finding yet at 840 s.
    """
    xs = [60.0 * (i + 1) for i in range(4, 14)]
    ys = [512.0 * s for s in (0, 0, 0, 0, 1, 1, 1, 1, 2, 2)]
    slope, tau, r2, _ = oracle_trend(xs, ys)
    assert slope == pytest.approx(512 / 4 / 60)
    assert tau == pytest.approx(32 / 45)
    assert r2 == pytest.approx(1 - 1.15625 / 5.6)
    trend = sen_trend(np.asarray(xs), np.asarray(ys))  # the detector's helper agrees
    assert (trend.slope, trend.kendall_tau, trend.fit_r2) == pytest.approx((slope, tau, r2))


def test_step_leak_detected_where_the_oracle_says():
    profile = SimProfile(name="step_leak")  # +512 MiB every 240 s

    def process_mib(e):
        return 1024 + 512 * math.floor(e / 240)

    expected = oracle_first_detection(process_mib, 1800)
    assert expected[:2] == (900.0, "warning")  # 840 fails on R^2 (test above)
    _, found = run(profile, 1800)
    assert found, "step leak missed"
    assert (found[0].ts - T0, str(found[0].severity)) == expected[:2]
    assert found[0].value == pytest.approx(expected[2])


def test_sawtooth_with_a_rising_floor_is_a_leak():
    """GC every 4 inferences (4-min cycle) but 400 MiB survive each collection: the floor
    (troughs) rises 100 MiB/min although every cycle falls back."""
    p = SimProfile(name="sawtooth_leak")

    def process_mib(e):
        n = math.floor(e / 60 + 0.5)
        cycles, within = divmod(n, 4)
        return 1024 + 400 * cycles + 300 * within

    expected = oracle_first_detection(process_mib, 1800)
    _, found = run(p, 1800)
    assert expected is not None and found
    assert (found[0].ts - T0, str(found[0].severity)) == expected[:2]
    assert found[0].value == pytest.approx(expected[2])
    assert found[0].evidence["mib_per_inference"] == pytest.approx(100.0, rel=0.05)


# --------------------------------------------------------------------------- no-leak profiles

@pytest.mark.parametrize("name", ["sawtooth", "plateau", "vllm_prealloc"])
@pytest.mark.parametrize("noise_mib", [0, 25])
def test_no_finding_for_patterns_that_are_not_leaks(name, noise_mib):
    det, found = run(SimProfile(name=name, noise_bytes=noise_mib * MIB), 7200, seed=7)
    assert found == []
    assert det.state_size() == 4  # device + process series, call counters by host and service


def test_vllm_pool_sits_above_the_threshold_without_alerting():
    src = SimulatedGpuSource("vllm_prealloc", start_ts=T0)
    device = src.sample(T0 + 600)[0]
    assert device.memory_used_bytes >= 0.9 * device.memory_total_bytes
    # "above the threshold now" is critical only for a leak, and a flat pool is none
    assert run(SimProfile(name="vllm_prealloc"), 3600)[1] == []


def test_long_sawtooth_period_still_quiet():
    # a 6-minute GC cycle, longer than the 5-minute floor span: the ETA gate still holds
    p = SimProfile(name="sawtooth", gc_every=6, sawtooth_bytes_per_inference=150 * MIB)
    assert run(p, 7200, seed=3)[1] == []


def test_noisy_linear_leak_is_detected_near_the_clean_position():
    _, found = run(SimProfile(name="leak", noise_bytes=20 * MIB), 1500, seed=11)
    assert found and found[0].severity is Severity.WARNING
    assert 600.0 <= found[0].ts - T0 <= 720.0


# --------------------------------------------------------------------------- resolution, joins

def _device_rows(values_mib, *, host="n1", start=T0, pid=0, name=""):
    return [GpuSample(ts=start + 5 * k, host=host, gpu=0, pid=pid, process_name=name,
                      memory_used_bytes=int(v * MIB), memory_total_bytes=8 * GIB)
            for k, v in enumerate(values_mib)]


def test_leak_that_stops_is_resolved_after_three_calm_judgements():
    """3 MiB/s for 15 min, then flat. Warning at 600 s (as the linear leak). The last rise is at
    895 s; floors keep rising until bucket 19 (the 5-min trailing min still sees the ramp).
    The judgements from then on fail, and the third calm one resolves: the oracle says which."""
    def mib(e):
        return 1024 + 3 * min(e, 895)

    values = [mib(5 * k) for k in range(int(2400 / 5) + 1)]
    det = VramLeakDetector()
    found = [f for s in _device_rows(values) for f in det.update(s)]
    assert [(f.ts - T0, str(f.severity), f.resolved) for f in found][0] == (600.0, "warning", False)
    resolved = [f for f in found if f.resolved]
    assert len(resolved) == 1 and resolved[0].evidence["reason"] == "leak_stopped"

    # oracle: first judgement time from which 3 consecutive judgements are not leaks
    lows = {}
    for k, v in enumerate(values):
        m = (5 * k) // 60
        lows[m] = min(lows.get(m, math.inf), v)
    calm = 0
    expected = None
    for m in range(10, 39):
        idxs = list(range(max(4, m - 29), m + 1))
        xs = [60.0 * (i + 1) for i in idxs]
        ys = [min(lows[j] for j in range(i - 4, i + 1)) for i in idxs]
        leak = False
        for size in sorted({len(xs), max(6, len(xs) // 2), 6}, reverse=True):
            slope, tau, r2, recent = oracle_trend(xs[-size:], ys[-size:])
            if (slope * MIB >= 16384 and slope * (xs[-1] - xs[-size]) >= 128 and tau >= 0.6
                    and r2 >= 0.8 and recent >= 0.5 * slope):
                leak = True
                break
        calm = 0 if leak else calm + 1
        if calm == 3:
            expected = 60.0 * (m + 1)
            break
    assert resolved[0].ts - T0 == expected
    assert found[-1] is resolved[0]


def test_mib_per_inference_joins_calls_by_host_then_by_service():
    values = [1024 + 3 * 5 * k for k in range(121)]  # 3 MiB/s
    rows = _device_rows(values, host="gpu-a", pid=77, name="vllm-server")
    device = _device_rows([v + 300 for v in values], host="gpu-a")

    def feed(calls):
        det = VramLeakDetector()
        for c in calls:
            det.update(c)
        out = []
        for d, r in zip(device, rows):
            out += det.update(d)
            out += det.update(r)
        return out

    by_host = [LlmCall(ts=T0 + 20 * k + 1, trace_id=str(k), span_id="s", host="gpu-a")
               for k in range(31)]  # one call per 20 s over the first 600 s
    by_service = [LlmCall(ts=c.ts, trace_id=c.trace_id, span_id="s", service="vllm-server",
                          host="") for c in by_host]
    elsewhere = [LlmCall(ts=c.ts, trace_id=c.trace_id, span_id="s", host="gpu-b")
                 for c in by_host]
    for calls, source, per_inf in ((by_host, "host gpu-a", 60.0),
                                   (by_service, "vllm-server", 60.0),
                                   (elsewhere, "", None)):
        [f] = feed(calls)
        assert f.ts - T0 == 600.0
        assert f.evidence["inferences_from"] == source
        if per_inf is None:
            assert f.evidence["mib_per_inference"] is None and f.evidence["inferences"] == 0
        else:
            # 30 calls in [T0, T0+600) -> 0.05/s; 3 MiB/s / 0.05 = 60 MiB per inference
            assert f.evidence["inferences"] == 30
            assert f.evidence["mib_per_inference"] == pytest.approx(per_inf)


def test_pid_reused_by_another_program_starts_a_fresh_history():
    values = [1024 + 3 * 5 * k for k in range(200)]
    det = VramLeakDetector()
    first = [f for s in _device_rows(values[:130], pid=9, name="a") for f in det.update(s)]
    assert [f.ts - T0 for f in first] == [600.0]
    later = _device_rows(values[130:], pid=9, name="b", start=T0 + 650)
    found = [f for s in later for f in det.update(s)]
    assert (found[0].ts - T0, found[0].resolved, found[0].evidence["reason"]) == (
        650.0, True, "restart")


def test_samples_older_than_the_open_bucket_are_ignored():
    values = [1024 + 3 * 5 * k for k in range(130)]
    rows = _device_rows(values)
    det_a, det_b = VramLeakDetector(), VramLeakDetector()
    out_a = [f for s in rows for f in det_a.update(s)]
    out_b = []
    for k, s in enumerate(rows):
        out_b += det_b.update(s)
        if k % 13 == 12:  # a straggler from 2 minutes ago with a wild value
            out_b += det_b.update(GpuSample(ts=s.ts - 120, host="n1", gpu=0,
                                            memory_used_bytes=7 * GIB,
                                            memory_total_bytes=8 * GIB))
    assert out_a == out_b and len(out_a) == 1


# --------------------------------------------------------------------------- contract-ish

def test_snapshot_restore_mid_stream_matches_an_uninterrupted_run():
    src = SimulatedGpuSource(SimProfile(name="restart", noise_bytes=10 * MIB), start_ts=T0,
                             seed=5)
    stream = []
    for _ts, samples, calls in simulated_stream(src, start_ts=T0, duration_s=3600):
        stream += calls + samples
    whole = VramLeakDetector()
    expected = [f for e in stream for f in whole.update(e)]
    cut = len(stream) // 2 + 7
    first = VramLeakDetector()
    got = [f for e in stream[:cut] for f in first.update(e)]
    snap = json.loads(json.dumps(first.snapshot()))
    second = VramLeakDetector()
    second.restore(snap)
    got += [f for e in stream[cut:] for f in second.update(e)]
    assert got == expected and len(expected) >= 5
    assert second.snapshot() == whole.snapshot()


def test_state_is_bounded_and_evicted_alerts_are_resolved():
    det = VramLeakDetector(max_keys=8)
    values = [1024 + 3 * 5 * k for k in range(121)]
    alerts = [f for s in _device_rows(values, host="leaky") for f in det.update(s)]
    assert len(alerts) == 1
    resolved = []
    for k in range(100):
        resolved += det.update(GpuSample(ts=T0 + 601 + k, host=f"h{k}", gpu=0,
                                         memory_used_bytes=GIB, memory_total_bytes=8 * GIB))
        det.update(LlmCall(ts=T0 + 601 + k, trace_id=str(k), span_id="s", host=f"h{k}",
                           service=f"svc{k}"))
        assert det.state_size() <= 16
        assert all(len(s.buckets) <= 34 for _, s in det._series.items())
    assert [(f.key, f.resolved, f.evidence["reason"]) for f in resolved] == [
        ("host=leaky/gpu=0", True, "evicted")]


def test_deterministic_across_instances():
    a, fa = run(SimProfile(name="sawtooth_leak", noise_bytes=30 * MIB), 2400, seed=9)
    b, fb = run(SimProfile(name="sawtooth_leak", noise_bytes=30 * MIB), 2400, seed=9)
    assert fa == fb and a.snapshot() == b.snapshot()


@pytest.mark.parametrize("kwargs", [
    {"bucket_s": 0}, {"floor_span_s": 90}, {"window_s": 1810}, {"min_points": 2},
    {"min_points": 40}, {"threshold_fraction": 1.5}, {"warning_eta_s": 60},
    {"min_trend_tau": 2}, {"restart_drop_fraction": 0}, {"clear_after_evaluations": 0},
    {"max_keys": 0}, {"min_rise_bytes": -1},
])
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        VramLeakDetector(**kwargs)


def test_parameters_are_stored_under_their_names():
    det = VramLeakDetector(window_s=1200, threshold_fraction=0.8, max_keys=10)
    assert (det.window_s, det.threshold_fraction, det.max_keys) == (1200.0, 0.8, 10)
    assert VramLeakDetector.accepts == (GpuSample, LlmCall)
