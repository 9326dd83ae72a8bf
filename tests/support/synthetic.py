"""Seeded synthetic agent traffic: healthy traces of model calls, tool calls and agent steps.

Used by the detector contract streams, the clean-traffic tests and the benches. The shape follows
what the normaliser emits for ReAct-style agents: per trace 1-5 model turns, a tool call between
turns (declared in ``tool_definitions``, requested in ``requested_tool_calls``, then executed),
and one ``invoke_agent`` step closing the trace. Healthy means: ~0.5% errors, latencies of
seconds, context growing by a few hundred tokens per turn, distinct prompts and tool arguments.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

from agentwatch.events import AgentStep, LlmCall, ToolCall

START_TS = 1_700_000_000.0  # 2023-11-14T22:13:20Z

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "search": {
        "type": "object",
        "properties": {"query": {"type": "string"},
                       "top_k": {"type": "integer", "minimum": 1, "maximum": 20}},
        "required": ["query"],
        "additionalProperties": False,
    },
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
    },
    "calculator": {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
    "fetch_url": {
        "type": "object",
        "properties": {"url": {"type": "string", "minLength": 8}},
        "required": ["url"],
    },
    "lookup_order": {
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "include_items": {"type": "boolean"}},
        "required": ["order_id"],
    },
}

# service -> (project, tools it declares)
SERVICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "checkout-agent": ("shop", ("lookup_order", "calculator")),
    "helpdesk": ("support", ("search", "lookup_order", "fetch_url")),
    "research": ("research", ("search", "fetch_url", "calculator")),
    "concierge": ("support", ("get_weather", "search")),
}

# model -> (usd per 1M input tokens, usd per 1M output tokens)
MODELS: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "claude-sonnet-4": (3.0, 15.0),
}

_WORDS = (
    "account address balance billing booking cancel card change charge city confirm delivery "
    "discount email error flight forecast help hotel invoice item late login lost missing "
    "order package password payment plan price receipt refund reset return schedule shipping "
    "status subscription support ticket tracking transfer travel update upgrade warranty weather "
    "week weekend why when where which how much many can could would please thanks today"
).split()

_SYSTEM_PROMPTS = {svc: f"You are the {svc} assistant. Answer briefly, call tools when needed."
                   for svc in SERVICES}


def tool_definitions_json(tools: tuple[str, ...]) -> str:
    return json.dumps([{"name": t, "parameters": TOOL_SCHEMAS[t]} for t in tools])


_TOOL_DEFS = {svc: tool_definitions_json(tools) for svc, (_, tools) in SERVICES.items()}


def cost_of(model: str, input_tokens: int, output_tokens: int) -> float:
    price_in, price_out = MODELS[model]
    return (input_tokens * price_in + output_tokens * price_out) / 1e6


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _tool_arguments(rng: random.Random, tool: str) -> dict[str, Any]:
    if tool == "search":
        return {"query": _phrase(rng, 4), "top_k": rng.randint(1, 10)}
    if tool == "get_weather":
        return {"city": rng.choice(["Paris", "Oslo", "Lima", "Pune", "Austin", "Kyoto"]) + _phrase(rng, 1),
                "unit": rng.choice(["c", "f"])}
    if tool == "calculator":
        return {"expression": f"{rng.randint(1, 9999)} * {rng.randint(1, 999)} + {rng.random():.4f}"}
    if tool == "fetch_url":
        return {"url": f"https://docs.example.com/{_phrase(rng, 2).replace(' ', '/')}/{rng.randrange(10**6)}"}
    return {"order_id": f"ord-{rng.randrange(10**9):09d}", "include_items": rng.random() < 0.5}


def agent_traffic(seed: int, n_traces: int, *, start_ts: float = START_TS,
                  traces_per_s: float = 10.0, n_users: int = 200, error_rate: float = 0.005,
                  trace_prefix: str = "", max_turns: int = 5,
                  services: tuple[str, ...] | None = None) -> list[Any]:
    """Healthy agent traffic: ``n_traces`` traces, Poisson arrivals, events sorted by ``ts``.

    Parameters
    ----------
    seed : int
        Seed of the ``random.Random`` that draws everything; same seed, same events.
    n_traces : int
        Traces to generate (about 3.3 model calls and 2.3 tool calls each on average).
    traces_per_s : float
        Mean trace arrival rate, in event time.
    n_users : int
        Users drawn uniformly per trace.
    error_rate : float
        Probability that a model call fails (the trace then ends).
    """
    rng = random.Random(seed)
    services = services or tuple(SERVICES)
    models = tuple(MODELS)
    events: list[Any] = []
    t = start_ts
    for n in range(n_traces):
        t += rng.expovariate(traces_per_s)
        trace_id = f"{trace_prefix}{seed:x}{n:08x}"
        service = rng.choice(services)
        project, tools = SERVICES[service]
        model = rng.choice(models)
        user = f"u{rng.randrange(n_users)}"
        session = f"s{rng.randrange(n_users * 4)}"
        turns = rng.randint(1, max_turns)
        prompt = f"{_SYSTEM_PROMPTS[service]}\nuser: {_phrase(rng, rng.randint(4, 14))}"
        input_tokens = rng.randint(400, 3000)
        now = t
        for turn in range(turns):
            last = turn == turns - 1
            output_tokens = rng.randint(30, 400)
            latency_ms = rng.lognormvariate(math.log(1200.0), 0.5)
            now += latency_ms / 1000.0
            failed = rng.random() < error_rate
            requested = ""
            tool = args = call_id = None
            if not last and not failed:
                tool = rng.choice(tools)
                args = json.dumps(_tool_arguments(rng, tool))
                call_id = f"call_{n:x}_{turn}"
                requested = json.dumps([{"name": tool, "arguments": args, "id": call_id}])
            events.append(LlmCall(
                ts=now, trace_id=trace_id, span_id=f"{n:x}l{turn}", service=service,
                project=project, user=user, session=session, agent=service, provider="openai",
                model=model, request_model=model, operation="chat", input_tokens=input_tokens,
                output_tokens=output_tokens, cost_usd=cost_of(model, input_tokens, output_tokens),
                priced=True, latency_ms=latency_ms, status="error" if failed else "ok",
                error="upstream 503" if failed else "", prompt=prompt,
                tool_definitions=_TOOL_DEFS[service], requested_tool_calls=requested))
            if failed or tool is None:
                break
            tool_latency_ms = rng.lognormvariate(math.log(300.0), 0.7)
            now += tool_latency_ms / 1000.0
            events.append(ToolCall(
                ts=now, trace_id=trace_id, span_id=f"{n:x}t{turn}", service=service,
                project=project, user=user, session=session, agent=service, tool_name=tool,
                # Many instrumentations leave the call id off the tool span.
                call_id=call_id if rng.random() < 0.5 else "", arguments=args,
                result=_phrase(rng, 6), latency_ms=tool_latency_ms))
            tool_result_tokens = rng.randint(80, 1200)
            input_tokens += output_tokens + tool_result_tokens
            prompt += f"\nassistant: calling {tool}\ntool: {_phrase(rng, 8)}"
        events.append(AgentStep(
            ts=now + 0.01, trace_id=trace_id, span_id=f"{n:x}a", service=service, project=project,
            user=user, session=session, agent=service, operation="invoke_agent",
            name=f"invoke_agent {service}", start_ts=t, latency_ms=(now + 0.01 - t) * 1000.0))
    events.sort(key=lambda e: e.ts)
    return events
