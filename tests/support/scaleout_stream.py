"""A recorded OTLP stream whose results must not depend on how many workers process it.

:func:`recorded_stream` returns the export requests an app would send (serialized
``ExportTraceServiceRequest`` protobufs, in send order) and what the pipeline must make of them,
worked out here from the stream's own construction and ``streams/pricing.json`` alone (no
agentwatch code is consulted). Everything that makes ``--workers N`` wrong when state is keyed by
one thing and the stream split by another is in it:

- nested model calls: an LLM child span in one export and its LLM-looking parent (an agent span
  repeating the child's model and token counts, no operation name) in a later export, as the
  OTel SDK's BatchSpanProcessor sends them (children end first). Each call is one ``llm_calls``
  row; the parent is an ``agent_steps`` row.
- a project over its daily budget ($1.20 of $1.00) across many traces: 50 %, 80 % and 100 %
  findings, once each.
- ten clients each retrying one prompt four times in four new traces within seconds: one
  ``retry_storm`` finding per client.
- agent loops: the same tool with the same arguments three times in a trace, the spans spread
  over two exports: one ``agent_loop`` ``repeated_tool_call`` finding per trace.

Every export mixes spans of many traces and projects. The stream is cut into rounds; before a
round the sender waits until every span of the earlier rounds is stored (``barriers``), which
is what an exporter's few-second schedule delay gives a pipeline that keeps up: a parent is
processed after its child whatever partition either export lands on.

Everything else stays quiet by construction: event times span under 30 s (no cost baseline,
no burn-rate projection, no drift history), no span has an error or a latency near the SLO,
no tools are declared (no hallucination registry), nested calls carry no prompts.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from tests.support.dataflow_testing import Ids, SpanSpec, otlp_traces

BUDGET_PROJECT = "budget-proj"
BUDGET_DAILY_USD = 1.00
RETRY_PROJECT, RETRY_SERVICE = "chat-proj", "chat-app"
NESTED_PROJECT, NESTED_SERVICE = "nested-proj", "nested-agent"
LOOP_PROJECT, LOOP_SERVICE = "loop-proj", "loop-agent"

NESTED_TRACES = 100
CALLS_PER_NESTED_TRACE = 3
NESTED_TRACES_PER_ROUND = 20
BUDGET_TRACES = 40
RETRY_USERS = 10
RETRY_REPEATS = 4
RETRY_MIN_REPEATS = 3  # RetryStormDetector's default: a storm from the third identical call
LOOP_TRACES = 5
LOOP_REPEATS = 3  # LoopDetector's default max_same_tool_calls
EXPORTS_PER_ROUND = 8
ROUND_S = 4.0  # event time each round spans

NESTED_MODELS = ("gpt-4o-mini", "gpt-4.1-mini", "claude-3-5-sonnet")
# $0.03 per call either way: 8000 x $2.50/M + 1000 x $10/M, 10000 x $2.00/M + 1250 x $8/M.
BUDGET_CALLS = (("gpt-4o", 8000, 1000), ("gpt-4.1", 10000, 1250))
RETRY_MODEL = "gpt-4o-mini"


@dataclass(frozen=True)
class RecordedStream:
    """Exports in send order, and what the pipeline must store and find."""

    exports: tuple[bytes, ...]
    # The span ids of each export that become rows (every span of this stream does).
    export_span_ids: tuple[tuple[str, ...], ...]
    # Before sending export i, for i in barriers, wait until every span of exports[:i] is stored.
    barriers: tuple[int, ...]
    llm_calls: int
    tool_calls: int
    agent_steps: int
    total_cost_usd: float
    # (detector, kind, key) of every finding the stream must raise, each exactly once.
    findings: frozenset[tuple[str, str, str]]
    # Settings.detectors the expectations assume (the budget).
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_ts: float = 0.0
    last_ts: float = 0.0

    @property
    def spans(self) -> int:
        return sum(len(ids) for ids in self.export_span_ids)


def model_prices() -> dict[str, tuple[float, float]]:
    """USD per 1M (input, output) tokens by exact model name, read from streams/pricing.json."""
    doc = json.loads(resources.files("agentwatch.streams").joinpath("pricing.json").read_text())
    return {name: (float(p["input"]), float(p["output"])) for name, p in doc["models"].items()
            if not name.startswith("_")}


def call_cost(prices: dict[str, tuple[float, float]], model: str, input_tokens: int, output_tokens: int) -> float:
    price_in, price_out = prices[model]
    return (input_tokens * price_in + output_tokens * price_out) / 1_000_000


@dataclass
class _Span:
    resource: tuple[str, str]  # (service, project)
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    name: str
    start_s: float
    end_s: float
    attributes: dict[str, Any]


def _export(spans: list[_Span]) -> bytes:
    return otlp_traces(SpanSpec(s.trace_id, s.span_id, s.name, s.start_s, s.end_s, s.attributes, s.parent_id,
                                (("service.name", s.resource[0]), ("agentwatch.project", s.resource[1])))
                       for s in spans)


def _first_ts(now: float, length_s: float) -> float:
    """Event times start a minute before ``now``, all within one UTC day (daily budgets)."""
    first = now - 60.0
    day_end = math.floor(first / 86_400.0) * 86_400.0 + 86_400.0
    if first + length_s + 1.0 >= day_end:
        first = day_end - length_s - 2.0  # end before midnight UTC instead
    return first


def recorded_stream(now: float, seed: int = 20260) -> RecordedStream:
    """The stream, with event times just before ``now`` (deterministic for a given ``now``)."""
    rng = random.Random(seed)
    ids = Ids(rng)
    prices = model_prices()
    rounds = NESTED_TRACES // NESTED_TRACES_PER_ROUND + 1
    t0 = _first_ts(now, rounds * ROUND_S)
    # Each round: a list of exports, each a list of spans.
    plan: list[list[list[_Span]]] = [[[] for _ in range(EXPORTS_PER_ROUND)] for _ in range(rounds)]
    loose: list[list[_Span]] = [[] for _ in range(rounds)]  # spread over a round's exports at random
    llm_calls = tool_calls = agent_steps = 0
    cost = 0.0
    findings: set[tuple[str, str, str]] = set()

    # (a) nested model calls: children in round r, their LLM-looking parents and the trace's
    # root in round r + 1.
    for t in range(NESTED_TRACES):
        r = t // NESTED_TRACES_PER_ROUND
        base = t0 + r * ROUND_S + rng.uniform(0.0, 1.0)
        trace_id, root_id = ids.new(16), ids.new(8)
        resource = (NESTED_SERVICE, NESTED_PROJECT)
        for c in range(CALLS_PER_NESTED_TRACE):
            model = NESTED_MODELS[(t + c) % len(NESTED_MODELS)]
            tokens_in, tokens_out = 400 + rng.randrange(1600), 20 + rng.randrange(400)
            start = base + 0.6 * c
            parent_id, child_id = ids.new(8), ids.new(8)
            provider = "openai" if model.startswith("gpt") else "anthropic"
            loose[r].append(_Span(resource, trace_id, child_id, parent_id, f"chat {model}", start + 0.01, start + 0.5, {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                "gen_ai.request.model": model, "gen_ai.response.model": model,
                "gen_ai.usage.input_tokens": tokens_in, "gen_ai.usage.output_tokens": tokens_out}))
            # The agent-level span around the call: same model and tokens, no operation name.
            loose[r + 1].append(_Span(resource, trace_id, parent_id, root_id, "planner step", start, start + 0.55, {
                "gen_ai.request.model": model, "gen_ai.usage.input_tokens": tokens_in,
                "gen_ai.usage.output_tokens": tokens_out, "gen_ai.agent.name": "planner"}))
            llm_calls += 1
            agent_steps += 1
            cost += call_cost(prices, model, tokens_in, tokens_out)
        loose[r + 1].append(_Span(resource, trace_id, root_id, b"", "invoke_agent planner", base - 0.1,
                                  base + 0.6 * CALLS_PER_NESTED_TRACE + 0.1,
                                  {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner"}))
        agent_steps += 1

    # (b) a project over its daily budget, one call per trace, spread over the first rounds.
    budget_spent = 0.0
    partial_sums = []
    for i in range(BUDGET_TRACES):
        r = i % (rounds - 1)
        model, tokens_in, tokens_out = BUDGET_CALLS[i % len(BUDGET_CALLS)]
        end = t0 + r * ROUND_S + rng.uniform(0.5, ROUND_S - 0.5)
        loose[r].append(_Span(("budget-app", BUDGET_PROJECT), ids.new(16), ids.new(8), b"", f"chat {model}",
                              end - 0.7, end, {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                               "gen_ai.request.model": model,
                                               "gen_ai.usage.input_tokens": tokens_in,
                                               "gen_ai.usage.output_tokens": tokens_out}))
        call = call_cost(prices, model, tokens_in, tokens_out)
        budget_spent += call
        cost += call
        llm_calls += 1
        partial_sums.append(budget_spent)
    # Every call costs the same, so the running total passes each level at the same call in any
    # processing order, and never within rounding of a level.
    assert abs(budget_spent - 1.20) < 1e-9
    assert all(abs(s - level * BUDGET_DAILY_USD) > 1e-6 for s in partial_sums for level in (0.5, 0.8, 1.0))
    for level in (50, 80, 100):
        findings.add(("budget", f"budget_daily_{level}pct", f"project={BUDGET_PROJECT}"))

    # (c) retry storms: each user's four identical calls are four traces in four exports of one
    # round, 0.5 s apart (the detector's window is 10 s).
    for u in range(RETRY_USERS):
        r = 1 if u < RETRY_USERS // 2 else 3
        user, session = f"user-{u}", f"sess-{u}"
        prompt = f"Where is my order {7000 + u}? It was due yesterday and the tracking page is empty."
        tokens_in, tokens_out = 900 + 7 * u, 60
        for k in range(RETRY_REPEATS):
            end = t0 + r * ROUND_S + 0.5 * k + 0.03 * u + 0.6
            export = (u + 2 * k) % EXPORTS_PER_ROUND  # four distinct exports
            plan[r][export].append(_Span((RETRY_SERVICE, RETRY_PROJECT), ids.new(16), ids.new(8), b"",
                                         f"chat {RETRY_MODEL}", end - 0.4, end, {
                                             "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                             "gen_ai.request.model": RETRY_MODEL,
                                             "gen_ai.usage.input_tokens": tokens_in,
                                             "gen_ai.usage.output_tokens": tokens_out,
                                             "user.id": user, "session.id": session,
                                             "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": prompt}))
            cost += call_cost(prices, RETRY_MODEL, tokens_in, tokens_out)
            llm_calls += 1
        findings.add(("retry_storm", "retry_storm",
                      f"project={RETRY_PROJECT}/service={RETRY_SERVICE}/user={user}/session={session}"))
    assert RETRY_REPEATS >= RETRY_MIN_REPEATS

    # (d) agent loops: the same search three times; two tool spans in round 2, the third and the
    # agent's root span in round 3.
    for i in range(LOOP_TRACES):
        trace_id, root_id = ids.new(16), ids.new(8)
        base = t0 + 2 * ROUND_S + 0.2 * i
        question = f"refund policy for order {500 + i}"
        for k in range(LOOP_REPEATS):
            r = 2 if k < LOOP_REPEATS - 1 else 3
            start = base + 0.3 * k if r == 2 else t0 + 3 * ROUND_S + 0.2 * i
            loose[r].append(_Span((LOOP_SERVICE, LOOP_PROJECT), trace_id, ids.new(8), root_id, "execute_tool search",
                                  start, start + 0.2, {"gen_ai.operation.name": "execute_tool",
                                                       "gen_ai.tool.name": "search",
                                                       "gen_ai.tool.call.arguments": json.dumps({"q": question})}))
            tool_calls += 1
        loose[3].append(_Span((LOOP_SERVICE, LOOP_PROJECT), trace_id, root_id, b"", "invoke_agent looper",
                              base - 0.1, t0 + 3 * ROUND_S + 1.5,
                              {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "looper"}))
        agent_steps += 1
        findings.add(("agent_loop", "repeated_tool_call", trace_id.hex()))

    exports: list[bytes] = []
    export_span_ids: list[tuple[str, ...]] = []
    barriers: list[int] = []
    first_ts, last_ts = math.inf, -math.inf
    for r in range(rounds):
        rng.shuffle(loose[r])
        for j, span in enumerate(loose[r]):
            plan[r][j % EXPORTS_PER_ROUND].append(span)
        if r:
            barriers.append(len(exports))
        for spans in plan[r]:
            if not spans:
                continue
            rng.shuffle(spans)
            exports.append(_export(spans))
            export_span_ids.append(tuple(s.span_id.hex() for s in spans))
            first_ts = min(first_ts, *(s.end_s for s in spans))
            last_ts = max(last_ts, *(s.end_s for s in spans))
    assert sum(map(len, export_span_ids)) == llm_calls + tool_calls + agent_steps
    return RecordedStream(
        exports=tuple(exports), export_span_ids=tuple(export_span_ids), barriers=tuple(barriers),
        llm_calls=llm_calls, tool_calls=tool_calls, agent_steps=agent_steps, total_cost_usd=cost,
        findings=frozenset(findings),
        detectors={"budget": {"budgets": {BUDGET_PROJECT: {"daily_usd": BUDGET_DAILY_USD}}}},
        first_ts=first_ts, last_ts=last_ts)
