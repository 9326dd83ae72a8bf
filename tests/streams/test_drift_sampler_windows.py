"""DriftSampler: per-key event-time / count windows, reservoir sampling, bounds, embedding."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from agentwatch.events import LlmCall
from agentwatch.streams.drift_sampler import DriftSampler, SampledWindow, embed_windows, key_of


def _call(ts, service="shop", prompt=None, agent=""):
    return LlmCall(ts=float(ts), trace_id=f"t{ts}", span_id=f"s{ts}", service=service,
                   agent=agent, prompt=f"p{ts}" if prompt is None else prompt)


class FakeEmbedder:
    """Records what it was asked to embed; vector = [len(text), index]."""

    def __init__(self):
        self.calls = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)


def test_key_of_joins_fields():
    call = _call(1, service="shop", agent="planner")
    assert key_of(call) == "service=shop"
    assert key_of(call, ("service", "agent")) == "service=shop/agent=planner"


def test_time_windows_align_to_period_and_close_on_next_event():
    sampler = DriftSampler(window_s=60.0, sample_size=100, min_window_size=1, grace_s=5.0)
    sampler.offer([_call(t) for t in (61, 70, 119)])
    assert sampler.due_windows(119.0) == []
    sampler.offer([_call(121)])  # next period: the [60, 120) window closes
    windows = sampler.due_windows(121.0)
    assert windows == [SampledWindow("service=shop", 60.0, 120.0, ("p61", "p70", "p119"), 3)]
    # Quiet afterwards: [120, 180) closes once now >= 180 + grace.
    assert sampler.due_windows(184.9) == []
    assert [w.texts for w in sampler.due_windows(185.0)] == [("p121",)]


def test_keys_are_windowed_independently_and_empty_prompts_skipped():
    sampler = DriftSampler(window_s=10.0, sample_size=10, min_window_size=1, grace_s=0.0)
    sampler.offer([_call(1, "a"), _call(2, "b"), _call(3, "a", prompt=""),
                   _call(4, "a", prompt="   "), _call(5, "b")])
    windows = sampler.due_windows(10.0)
    assert {w.key: w.texts for w in windows} == {"service=a": ("p1",),
                                                  "service=b": ("p2", "p5")}
    assert sampler.counters.empty_prompts == 2 and sampler.counters.offered == 5


def test_count_windows_close_after_window_count_offers():
    sampler = DriftSampler(window_s=None, window_count=4, sample_size=2, min_window_size=2)
    sampler.offer([_call(t) for t in range(1, 11)])
    windows = sampler.due_windows(0.0)
    assert [(w.start_ts, w.end_ts, w.seen, len(w.texts)) for w in windows] == \
        [(1.0, 4.0, 4, 2), (5.0, 8.0, 4, 2)]
    assert [len(w.texts) for w in sampler.flush()] == [2]  # 9, 10


def test_small_time_window_stays_open_then_drops_after_max_span():
    sampler = DriftSampler(window_s=10.0, sample_size=5, min_window_size=3, grace_s=0.0,
                           max_window_span_s=30.0)
    sampler.offer([_call(1), _call(12)])
    assert sampler.due_windows(15.0) == []  # 2 < 3 prompts: extended to [0, 20)
    sampler.offer([_call(18)])
    windows = sampler.due_windows(20.0)
    assert [(w.start_ts, w.end_ts, w.texts) for w in windows] == \
        [(0.0, 20.0, ("p1", "p12", "p18"))]
    sampler.offer([_call(41)])
    assert sampler.due_windows(75.0) == []  # [40, ...) never reaches 3 within 30 s
    assert sampler.counters.small_windows_dropped == 1 and sampler.open_keys == ()


def test_reservoir_is_uniform_and_seeded():
    counts = Counter()
    for seed in range(400):
        sampler = DriftSampler(window_s=None, window_count=20, sample_size=5, min_window_size=5,
                               seed=seed)
        sampler.offer([_call(t) for t in range(20)])
        (window,) = sampler.due_windows(0.0)
        assert len(window.texts) == 5 and len(set(window.texts)) == 5
        counts.update(window.texts)
    # Each of 20 prompts is kept with chance 5/20: 100 of 400 windows, binomial sd ~8.7.
    assert all(60 <= counts[f"p{t}"] <= 140 for t in range(20)), counts
    first = DriftSampler(window_s=None, window_count=20, sample_size=5, min_window_size=5)
    again = DriftSampler(window_s=None, window_count=20, sample_size=5, min_window_size=5)
    for s in (first, again):
        s.offer([_call(t) for t in range(20)])
    assert first.due_windows(0.0) == again.due_windows(0.0)


def test_late_events_fold_into_current_window_and_prompts_are_cut():
    sampler = DriftSampler(window_s=10.0, sample_size=5, min_window_size=1, grace_s=0.0,
                           max_prompt_chars=3)
    sampler.offer([_call(25, prompt="abcdef"), _call(3, prompt="late")])
    (window,) = sampler.due_windows(30.0)
    assert window.texts == ("abc", "lat") and sampler.counters.late == 1


def test_bounds_on_keys_and_pending_windows():
    sampler = DriftSampler(window_s=10.0, sample_size=2, min_window_size=1, max_keys=2,
                           max_pending_windows=2, grace_s=0.0)
    sampler.offer([_call(1, "a"), _call(2, "b"), _call(3, "c")])  # "a" evicted -> closed
    assert sampler.open_keys == ("service=b", "service=c")
    assert sampler.counters.keys_evicted == 1
    sampler.offer([_call(4, "d"), _call(5, "e")])  # b, c evicted; pending holds 2 at most
    windows = sampler.due_windows(5.0)
    assert [w.key for w in windows] == ["service=b", "service=c"]
    assert sampler.counters.pending_dropped == 1


def test_snapshot_restore_continues_identically():
    calls = [_call(t, service="ab"[t % 2]) for t in range(40)]
    first = DriftSampler(window_s=25.0, sample_size=4, min_window_size=2, grace_s=0.0)
    first.offer(calls[:13])
    second = DriftSampler(window_s=25.0, sample_size=4, min_window_size=2, grace_s=0.0)
    second.restore(json.loads(json.dumps(first.snapshot())))
    for sampler in (first, second):
        sampler.offer(calls[13:])
    assert first.due_windows(100.0) == second.due_windows(100.0)


def test_embed_windows_batches_once_and_splits_back():
    windows = [SampledWindow("service=a", 0.0, 60.0, ("x", "yy"), 9),
               SampledWindow("service=b", 0.0, 60.0, ("zzz",), 1)]
    embedder = FakeEmbedder()
    out = embed_windows(windows, embedder)
    assert embedder.calls == [["x", "yy", "zzz"]]
    assert [(w.key, w.ts, w.start_ts, w.seen, w.texts) for w in out] == \
        [("service=a", 60.0, 0.0, 9, ("x", "yy")), ("service=b", 60.0, 0.0, 1, ("zzz",))]
    assert out[0].vectors.tolist() == [[1, 0], [2, 1]] and out[1].vectors.tolist() == [[3, 2]]
    assert embed_windows([], embedder) == []


@pytest.mark.parametrize("kwargs", [
    {"key_fields": ("nope",)}, {"key_fields": ()}, {"window_s": None}, {"window_s": 0},
    {"window_count": 0}, {"sample_size": 0}, {"min_window_size": 500}, {"grace_s": -1},
    {"max_keys": 0}, {"max_window_span_s": 0},
])
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        DriftSampler(**kwargs)


class _PromptShiftEmbedder:
    """Seeded normal vectors; prompts starting with "moved" are shifted by 4 sd on one axis."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def encode(self, texts):
        vectors = self.rng.normal(size=(len(texts), 16))
        vectors[:, 0] += [4.0 if t.startswith("moved") else 0.0 for t in texts]
        return vectors


def test_drift_keyed_by_service_and_prompt_name_from_the_setting(monkeypatch):
    from agentwatch.detectors.drift import DriftDetector
    from agentwatch.settings import Settings
    from agentwatch.streams.dataflow import Topology

    monkeypatch.setenv("AGENTWATCH_DRIFT_KEY_FIELDS", '["service","prompt_name"]')
    fields = Settings().drift_key_fields
    assert fields == ["service", "prompt_name"]
    detector = DriftDetector(permutations=100, min_window_size=20)
    # The stream partitions drift by the first field: every prompt of a service meets in one
    # partition, and its windows there are kept apart by prompt name.
    assert Topology.of([detector], fields).drift_field == "service"

    sampler = DriftSampler(key_fields=tuple(fields), window_s=60.0, sample_size=40,
                           min_window_size=20, grace_s=0.0)

    def calls(period, name, prefix):
        return [LlmCall(ts=60.0 * period + i, trace_id=f"t{period}{name}{i}",
                        span_id=f"s{period}{name}{i}", service="shop", prompt_name=name,
                        prompt_version="3", prompt=f"{prefix} {name} question {period}-{i}")
                for i in range(40)]

    sampler.offer([*calls(0, "support", "asked"), *calls(0, "triage", "asked"),
                   *calls(0, "", "asked")])
    first = sampler.due_windows(60.0)
    assert sorted((w.key, w.start_ts, w.end_ts, len(w.texts)) for w in first) == [
        ("service=shop/prompt_name=", 0.0, 60.0, 40),  # calls without a managed prompt
        ("service=shop/prompt_name=support", 0.0, 60.0, 40),
        ("service=shop/prompt_name=triage", 0.0, 60.0, 40)]
    assert all(" support " in t for w in first if w.key.endswith("support") for t in w.texts)

    embedder = _PromptShiftEmbedder()
    assert [f for w in embed_windows(first, embedder) for f in detector.update(w)] == []
    # Only the triage prompt's traffic moves; the service's other prompts stay as they were.
    sampler.offer([*calls(1, "support", "asked"), *calls(1, "triage", "moved"),
                   *calls(1, "", "asked")])
    findings = [f for w in embed_windows(sampler.due_windows(120.0), embedder)
                for f in detector.update(w)]
    assert [(f.kind, f.key) for f in findings] == [("drift", "service=shop/prompt_name=triage")]
