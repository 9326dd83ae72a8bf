"""Agents re-send the user's prompt at every step: a window samples each prompt once."""

from __future__ import annotations

from agentwatch.events import LlmCall
from agentwatch.streams.drift_sampler import DriftSampler


def _call(ts: float, prompt: str, service: str = "bank") -> LlmCall:
    return LlmCall(ts=ts, trace_id=f"t{ts}", span_id="s", service=service, prompt=prompt)


def test_repeated_prompts_are_sampled_once_per_window():
    sampler = DriftSampler(window_s=10.0, sample_size=50, min_window_size=2, grace_s=0.0)
    # Each agent run sends its prompt three times (plan, tool call, answer).
    calls = [_call(i * 0.1 + step * 0.01, f"question {i}") for i in range(20) for step in range(3)]
    sampler.offer(calls)
    (window,) = sampler.due_windows(now_ts=100.0)
    assert sorted(window.texts) == sorted(f"question {i}" for i in range(20))
    assert window.seen == 20
    assert sampler.counters.duplicates == 40


def test_a_prompt_evicted_from_the_reservoir_can_be_sampled_again():
    sampler = DriftSampler(window_s=1000.0, sample_size=3, min_window_size=1, grace_s=0.0, seed=1)
    sampler.offer([_call(float(i), f"p{i}") for i in range(200)])
    sampler.offer([_call(300.0, "p0")])
    (window,) = sampler.due_windows(now_ts=5000.0)
    assert len(window.texts) == 3 and len(set(window.texts)) == 3
    assert window.seen in (201,)  # p0 was no longer in the 3-slot reservoir, so it counted again
