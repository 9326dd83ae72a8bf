"""Seeded sample streams for the one detector contract suite (``tests/detectors/test_contract.py``).

Every registered detector (:data:`agentwatch.detectors.registry.DETECTORS`) has a stream here,
under its name in :data:`CONTRACT_STREAMS`. The contract suite fails for a registered detector
without one, on purpose: nobody forgets to give a new detector the contract checks. Detectors
also provide ``state_size()`` (entries currently held: keys, traces, ...), which the
bounded-state check reads.

These streams are test data: they live here, not in the shipped detectors.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from agentwatch.detectors.drift import EmbeddedWindow
from agentwatch.events import Evaluation, GpuSample, LlmCall, PiiDetection, ToolCall
from tests.support.synthetic import START_TS, agent_traffic, tool_definitions_json

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class ContractStream:
    """Seeded sample streams for the detector contract.

    Attributes
    ----------
    params : Mapping[str, Any]
        Constructor keyword arguments (small caps, so the bounded-state check is cheap).
    warmup : Sequence
        Events during which the detector must report nothing (history still being learned, or
        plain normal traffic for detectors without a warm-up).
    events : Sequence
        Events after the warm-up that make the detector report at least one finding; the
        snapshot/restore and determinism checks compare the findings they cause.
    flood : Sequence
        Events over many distinct keys/traces (far more than ``state_cap``), for the
        bounded-state check.
    state_cap : int
        ``state_size()`` must never exceed this while ``flood`` is fed.
    """

    params: Mapping[str, Any]
    warmup: Sequence[Any]
    events: Sequence[Any]
    flood: Sequence[Any]
    state_cap: int
    notes: Mapping[str, Any] = field(default_factory=dict)


def cost_anomaly(seed: int) -> ContractStream:
    """Six quiet minutes of calls per (project, user), then a one-minute cost spike."""
    rng = random.Random(seed)
    params = {"group_by": [["project"], ["project", "user"]], "min_history": 5, "max_keys": 40}

    def call(ts: float, cost: float, project: str = "shop", user: str = "u1") -> LlmCall:
        return LlmCall(ts=ts, trace_id=f"t{ts:.3f}", span_id="s", project=project, user=user,
                       model="gpt-4o", cost_usd=cost, input_tokens=int(cost * 4e5),
                       output_tokens=100)

    warmup = [call(START_TS + 60 * m + 6 * i, rng.uniform(0.05, 0.15))
              for m in range(6) for i in range(10)]
    events = [call(START_TS + 360 + 6 * i, rng.uniform(0.05, 0.15)) for i in range(10)]
    events += [call(START_TS + 420 + 2 * i, rng.uniform(0.4, 0.6)) for i in range(30)]  # spike
    events += [call(START_TS + 480 + 6 * i, rng.uniform(0.05, 0.15)) for i in range(20)]
    flood = [call(START_TS + i, 0.01, project=f"p{i}", user=f"u{i}") for i in range(1_000)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_keys"])


def budget(seed: int) -> ContractStream:
    """2 h of quiet spend (~$0.4/h), a burst that crosses every level, then the next day."""
    rng = random.Random(seed)
    day0 = math.floor(START_TS / 86_400.0) * 86_400.0
    params = {"budgets": {"shop": {"daily_usd": 100.0, "monthly_usd": 2_000.0}}}

    def call(ts: float, cost: float, project: str = "shop") -> LlmCall:
        return LlmCall(ts=ts, trace_id=f"t{ts}", span_id="s", project=project, cost_usd=cost)

    warmup = [call(day0 + 60.0 * i, rng.uniform(0.0, 0.013)) for i in range(120)]
    events = [call(day0 + 7_200 + 60.0 * i, rng.uniform(0.5, 1.5)) for i in range(150)]
    events += [call(day0 + 86_400 + 60.0 * i, rng.uniform(0.0, 0.01)) for i in range(20)]
    flood = [call(START_TS + i, 1.0, project=f"p{i}") for i in range(500)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=2)


def retry_storm(seed: int) -> ContractStream:
    """Normal traffic, then a client retrying one prompt every ~3 s, then normal traffic."""
    rng = random.Random(seed)
    params = {"max_entries": 200, "min_repeats": 3}
    warmup = [e for e in agent_traffic(seed, 40, traces_per_s=2.0) if isinstance(e, LlmCall)]
    t0 = warmup[-1].ts + 1.0
    storm = LlmCall(ts=t0, trace_id="x", span_id="s", project="shop", service="checkout-agent",
                    user="u7", session="s7", prompt="where is my order 1234?",
                    input_tokens=900, cost_usd=0.02)
    events = []
    for i in range(8):
        events.append(LlmCall(**{**{f: getattr(storm, f) for f in storm.__slots__},
                                 "ts": t0 + 3.0 * i + rng.uniform(0, 0.5),
                                 "trace_id": f"x{i}"}))
    events += [LlmCall(ts=t0 + 60 + i, trace_id=f"n{i}", span_id="s", user="u7",
                       prompt=f"question {i} {rng.random()}") for i in range(10)]
    flood = [LlmCall(ts=START_TS + i * 0.01, trace_id=f"f{i}", span_id="s", user=f"u{i}",
                     prompt=f"p{i}") for i in range(2_000)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_entries"])


def agent_loop(seed: int) -> ContractStream:
    """Healthy traces, then one trace running the same search over and over."""
    rng = random.Random(seed)
    params = {"max_traces": 100, "trace_ttl_s": 120.0}
    warmup = agent_traffic(seed, 30, traces_per_s=1.0)
    t0 = warmup[-1].ts + 1.0
    events: list[Any] = []
    query = json.dumps({"query": f"refund status {rng.randrange(1000)}"})
    for i in range(5):  # the same search over and over, each after a model turn
        events.append(LlmCall(ts=t0 + 4 * i, trace_id="loop", span_id=f"l{i}",
                              service="helpdesk", model="gpt-4o", input_tokens=1000 + 300 * i,
                              output_tokens=50, cost_usd=0.01, prompt=f"turn {i} {query}",
                              requested_tool_calls=json.dumps(
                                  [{"name": "search", "arguments": query, "id": f"c{i}"}])))
        events.append(ToolCall(ts=t0 + 4 * i + 1, trace_id="loop", span_id=f"t{i}",
                               service="helpdesk", tool_name="search", arguments=query))
    events += agent_traffic(seed + 1, 10, start_ts=t0 + 30, traces_per_s=1.0)
    flood = [LlmCall(ts=START_TS + i * 0.1, trace_id=f"flood{i}", span_id="s",
                     prompt=f"hello {i}") for i in range(3_000)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_traces"])


def hallucinated_tool(seed: int) -> ContractStream:
    """Healthy traces, then a trace requesting an undeclared tool and out-of-schema arguments."""
    rng = random.Random(seed)
    params = {"max_traces": 100, "trace_ttl_s": 120.0}
    warmup = agent_traffic(seed, 30, traces_per_s=1.0)
    t0 = warmup[-1].ts + 1.0
    defs = tool_definitions_json(("search", "lookup_order"))
    bad_args = json.dumps({"query": "x", "top_k": rng.randint(50, 99)})  # maximum is 20
    events: list[Any] = [
        LlmCall(ts=t0, trace_id="h1", span_id="a", tool_definitions=defs,
                requested_tool_calls=json.dumps([{"name": "issue_refund", "id": "1",
                                                  "arguments": '{"amount": 500}'}])),
        LlmCall(ts=t0 + 2, trace_id="h1", span_id="b", tool_definitions=defs,
                requested_tool_calls=json.dumps([{"name": "search", "id": "2",
                                                  "arguments": bad_args}])),
        ToolCall(ts=t0 + 3, trace_id="h1", span_id="c", tool_name="search",
                 arguments=bad_args),
    ]
    events += agent_traffic(seed + 1, 10, start_ts=t0 + 5, traces_per_s=1.0)
    flood = [LlmCall(ts=START_TS + i * 0.1, trace_id=f"flood{i}", span_id="s",
                     tool_definitions=defs) for i in range(3_000)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_traces"])


def slo(seed: int) -> ContractStream:
    """Error-free traffic, then an outage (errors), a slow spell, and recovery."""
    rng = random.Random(seed)
    params = {"min_calls": 20, "window_s": 60.0, "max_keys": 50}
    warmup = [e for e in agent_traffic(seed, 60, traces_per_s=2.0, error_rate=0.0)
              if isinstance(e, LlmCall)]
    t0 = warmup[-1].ts + 1.0
    events = []
    for i in range(120):
        phase = i // 40
        events.append(LlmCall(
            ts=t0 + i * 0.5, trace_id=f"c{seed}-{i}", span_id="s", service="helpdesk",
            model="gpt-4o", status="error" if phase == 0 and rng.random() < 0.6 else "ok",
            latency_ms=rng.uniform(25_000, 40_000) if phase == 1 else rng.uniform(500, 900)))
    flood = [LlmCall(ts=START_TS + i, trace_id=f"f{i}", span_id="s", service=f"svc{i % 400}",
                     model=f"m{i % 7}") for i in range(2_000)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_keys"])


def vram_leak(seed: int) -> ContractStream:
    """A flat device for warm-up, then a 3 MiB/s leak; a flood of distinct hosts."""
    rng = np.random.default_rng(seed)
    t0 = 1_700_000_040.0
    total = 8 * GIB

    def row(ts: float, used: float, host: str = "contract-node") -> GpuSample:
        return GpuSample(ts=ts, host=host, gpu=0, memory_used_bytes=int(used),
                         memory_total_bytes=total)

    noise = rng.normal(0.0, 4 * MIB, size=400)
    warmup = [row(t0 + 5 * k, 2 * GIB + noise[k]) for k in range(120)]  # 10 flat minutes
    start = t0 + 600
    events = [row(start + 5 * k, 2 * GIB + 3 * MIB * 5 * k + noise[120 + k])
              for k in range(240)]
    flood = [row(t0 + k, GIB, host=f"flood-{k}") for k in range(200)]
    return ContractStream(params={"max_keys": 16}, warmup=warmup, events=events,
                          flood=flood, state_cap=32)


def drift(seed: int) -> ContractStream:
    """Calm windows of one key (no reference, so only drift over time is exercised), then
    moved windows."""
    rng = np.random.default_rng(seed)
    params = {"permutations": 50, "min_window_size": 20, "history_windows": 2,
              "max_keys": 4, "seed": seed}

    def window(ts: float, key: str = "service=shop", shift: float = 0.0,
               rows: int = 40) -> EmbeddedWindow:
        vectors = rng.normal(size=(rows, 8))
        vectors[:, 0] += shift
        word = "moved" if shift else "calm"
        return EmbeddedWindow(key, ts, tuple(f"{word} prompt {i}" for i in range(rows)),
                              vectors, start_ts=ts - 60.0, seen=rows)

    warmup = [window(60.0 * (i + 1)) for i in range(3)]
    events = [window(60.0 * (i + 4), shift=4.0) for i in range(3)]
    flood = [window(60.0 * (i + 1), key=f"service=s{i}", rows=20) for i in range(24)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_keys"])


def pii_exposure(seed: int) -> ContractStream:
    """A service with a steady trickle of emails (and phone numbers from its first minutes),
    then its first secret after the warm-up, an email burst, and the trickle again."""
    rng = random.Random(seed)
    params = {"warmup_s": 600.0, "window_s": 60.0, "baseline_windows": 5, "max_services": 20,
              "max_keys": 40}
    t0 = 60.0 * math.floor(START_TS / 60.0)

    def pii(ts: float, entity: str, count: int = 1, service: str = "shop",
            field: str = "llm_calls.prompt") -> PiiDetection:
        return PiiDetection(ts=ts, trace_id=f"t{ts:.3f}", span_id="s", service=service,
                            project="p", entity_type=entity, field=field, count=count)

    def calls(start: float, minutes: int) -> list[Any]:
        out: list[Any] = []
        for m in range(minutes):
            base = start + 60.0 * m
            out += [LlmCall(ts=base + 10.0 * i, trace_id=f"c{base + 10.0 * i:.0f}", span_id="s",
                            service="shop") for i in range(6)]
            out += [pii(base + rng.uniform(1.0, 59.0), "EMAIL", rng.randint(1, 2))]
        return sorted(out, key=lambda e: e.ts)

    # 15 quiet minutes: <= 2 emails a minute, under min_count 5; PHONE is learned in warm-up.
    warmup = calls(t0, 15)
    warmup += [pii(t0 + 125.0, "PHONE", 1, field="llm_calls.response")]
    warmup.sort(key=lambda e: e.ts)
    t1 = t0 + 900.0
    events: list[Any] = [pii(t1 + 5.0, "SECRET", 1, field="tool_calls.arguments")]
    events += [pii(t1 + 10.0 + 2.0 * i, "EMAIL", rng.randint(1, 3)) for i in range(8)]  # burst
    events += calls(t1 + 60.0, 4)
    flood: list[Any] = []
    for i in range(600):
        flood.append(LlmCall(ts=t0 + i, trace_id=f"f{i}", span_id="s", service=f"svc{i}"))
        flood.append(pii(t0 + i + 0.5, "EMAIL" if i % 2 else "PHONE", service=f"svc{i // 2}"))
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_services"] + params["max_keys"])


def evaluation_drop(seed: int) -> ContractStream:
    """Steady relevance scores (and label-only evaluations) for four minutes, a minute of low
    scores, then recovery."""
    rng = random.Random(seed)
    params = {"window_s": 60.0, "min_samples": 10, "baseline_windows": 3, "max_keys": 20}
    t0 = 60.0 * math.floor(START_TS / 60.0)

    def score(ts: float, mean: float, name: str = "relevance",
              service: str = "rag") -> Evaluation:
        return Evaluation(ts=ts, trace_id=f"t{ts:.3f}", span_id="s", service=service,
                          name=name, score=min(1.0, max(0.0, rng.gauss(mean, 0.05))))

    def minute(m: int, mean: float) -> list[Any]:
        out: list[Any] = [score(t0 + 60.0 * m + 5.0 * i + 1.0, mean) for i in range(12)]
        out += [Evaluation(ts=t0 + 60.0 * m + 30.5, trace_id="l", span_id="s", service="rag",
                           name="tone", label="polite")]  # a label only: never judged
        return sorted(out, key=lambda e: e.ts)

    warmup = [e for m in range(4) for e in minute(m, 0.8)]
    events = [e for m, mean in ((4, 0.5), (5, 0.8), (6, 0.8)) for e in minute(m, mean)]
    flood = [score(t0 + i, 0.8, name=f"eval{i % 7}", service=f"svc{i}") for i in range(400)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_keys"])


def prompt_version_regression(seed: int) -> ContractStream:
    """Version v1 of a prompt with scored calls, then v2 at twice the cost per call, then v3
    (which resolves v2's finding); a flood of prompts and of one prompt's versions."""
    rng = random.Random(seed)
    params = {"min_samples": 20, "reservoir_size": 50, "max_versions": 3, "max_prompts": 10}
    t0 = START_TS

    def calls(start: float, version: str, cost: float, n: int) -> list[Any]:
        out: list[Any] = []
        for i in range(n):
            ts = start + 2.0 * i
            out.append(LlmCall(ts=ts, trace_id=f"{version}-{i}", span_id="s", service="support",
                               prompt_name="answer", prompt_version=version, priced=True,
                               cost_usd=cost * rng.uniform(0.8, 1.2),
                               latency_ms=rng.uniform(500.0, 900.0)))
            out.append(Evaluation(ts=ts + 1.0, trace_id=f"{version}-{i}", span_id="s",
                                  service="support", name="helpfulness",
                                  score=rng.uniform(0.6, 1.0), prompt_name="answer",
                                  prompt_version=version))
        return out

    warmup = calls(t0, "v1", 0.01, 40)
    events = calls(t0 + 100.0, "v2", 0.02, 30) + calls(t0 + 200.0, "v3", 0.01, 5)
    flood: list[Any] = [LlmCall(ts=t0 + i, trace_id=f"f{i}", span_id="s", service="support",
                                prompt_name=f"p{i}", prompt_version="1") for i in range(300)]
    flood += [LlmCall(ts=t0 + 300 + i, trace_id=f"g{i}", span_id="s", service="support",
                      prompt_name="hot", prompt_version=f"v{i}") for i in range(100)]
    return ContractStream(params=params, warmup=warmup, events=events, flood=flood,
                          state_cap=params["max_prompts"] * (1 + params["max_versions"]))


# Detector name -> its contract stream. Keyed by the names in DETECTORS (the suite checks both
# lists agree), written out so a new detector needs a line here.
CONTRACT_STREAMS: dict[str, Callable[[int], ContractStream]] = {
    "cost_anomaly": cost_anomaly,
    "budget": budget,
    "retry_storm": retry_storm,
    "agent_loop": agent_loop,
    "hallucinated_tool": hallucinated_tool,
    "slo": slo,
    "vram_leak": vram_leak,
    "drift": drift,
    "pii_exposure": pii_exposure,
    "evaluation_drop": evaluation_drop,
    "prompt_version_regression": prompt_version_regression,
}
