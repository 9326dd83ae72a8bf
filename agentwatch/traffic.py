"""Simulated agent traffic on the real OpenTelemetry SDK (OTLP exporter to the collector).

Several services (one TracerProvider each, as separate apps would have), projects, users and
models; tool-calling agents whose prompts come from CLINC150. Incidents are knobs on the same
generator, so they travel the same path as normal traffic: SDK -> OTLP -> collector -> Kafka.
Spans carry explicit start/end times, so latency is simulated without sleeping.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Status, StatusCode

CLINC_RELATIVE = Path("shared/data/clinc150/data_full.json")


@dataclass(frozen=True)
class DemoService:
    name: str
    project: str
    agent: str
    domains: tuple[str, ...]  # CLINC150 domains its users ask about
    tools: tuple[str, ...]
    # Its managed system prompt (gen_ai.prompt.name / gen_ai.prompt.version on every chat span);
    # fixed per service, so the seeded sequence does not change.
    prompt_name: str = ""
    prompt_version: str = ""


SERVICES = (
    DemoService("bank-assistant", "fintech", "banker", ("banking", "credit_cards"), ("get_balance", "list_transactions"),
                "banker-system", "3"),
    DemoService("travel-agent", "travel", "planner", ("travel", "auto_and_commute"), ("search_flights", "get_weather"),
                "planner-system", "7"),
    DemoService("home-helper", "consumer", "concierge", ("home", "kitchen_and_dining", "utility"), ("set_timer", "add_to_list"),
                "concierge-system", "2"),
)
MODELS = (("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18"), ("openai", "gpt-4o", "gpt-4o-2024-08-06"),
          ("anthropic", "claude-3-5-haiku", "claude-3-5-haiku-20241022"), ("gcp.gemini", "gemini-2.0-flash", "gemini-2.0-flash"))
TOOL_SCHEMAS = {
    "get_balance": {"type": "object", "properties": {"account": {"type": "string"}}, "required": ["account"]},
    "list_transactions": {"type": "object", "properties": {"account": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["account"]},
    "search_flights": {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"}},
                       "required": ["origin", "destination"]},
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "set_timer": {"type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]},
    "add_to_list": {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]},
}
INCIDENTS = ("cost_spike", "retry_storm", "loop", "unknown_tool", "errors", "drift", "vram_leak")


def find_clinc(start: Path | None = None) -> Path | None:
    """``shared/data/clinc150/data_full.json`` beside the checkout (or in a parent)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        for candidate in (folder / CLINC_RELATIVE, folder.parent / CLINC_RELATIVE):
            if candidate.is_file():
                return candidate
    return None


def load_prompts(path: Path | None = None) -> dict[str, list[str]]:
    """Prompts by CLINC150 domain, plus ``oos`` (out of scope). A tiny built-in set without data."""
    path = path or find_clinc()
    if path is None:
        return {"banking": ["what is my checking balance", "freeze my account please"],
                "travel": ["book a flight to paris", "do i need a visa for japan"],
                "home": ["set a timer for ten minutes", "add milk to my shopping list"],
                "oos": ["who won the game last night", "write me a poem about rust"]}
    data = json.loads(path.read_text())
    domains = json.loads((path.parent / "domains.json").read_text())
    domain_of = {intent: domain for domain, intents in domains.items() for intent in intents}
    prompts: dict[str, list[str]] = {}
    for text, intent in data["train"] + data["val"]:
        prompts.setdefault(domain_of.get(intent, "other"), []).append(text)
    prompts["oos"] = [text for text, _ in data["oos_train"] + data["oos_val"] + data["oos_test"]]
    return prompts


@dataclass
class TrafficStats:
    traces: int = 0
    spans: int = 0
    llm_calls: int = 0
    tool_calls: int = 0
    incidents: dict[str, int] = field(default_factory=dict)
    # Incident -> start time (unix ns) of the first run it was injected into.
    first_injected_ns: dict[str, int] = field(default_factory=dict)


class AgentTraffic:
    """Generates agent runs as OTel spans; ``exporter_factory(service)`` gives each app its exporter."""

    def __init__(self, exporter_factory, *, seed: int = 7, incidents: Iterable[str] = (),
                 prompts: dict[str, list[str]] | None = None, services: Sequence[DemoService] = SERVICES,
                 schedule_delay_ms: int = 200) -> None:
        unknown = set(incidents) - set(INCIDENTS)
        if unknown:
            raise ValueError(f"unknown incidents: {sorted(unknown)}")
        self.rng = random.Random(seed)
        # Its own generator: the main sequence (and every seeded demo and test) stays as it was.
        self._pii_rng = random.Random(seed + 1)
        self.incidents = set(incidents)
        self.prompts = prompts or load_prompts()
        self.services = list(services)
        self.stats = TrafficStats()
        self.providers: dict[str, TracerProvider] = {}
        self.tracers: dict[str, trace.Tracer] = {}
        for svc in self.services:
            provider = TracerProvider(resource=Resource.create({
                "service.name": svc.name, "agentwatch.project": svc.project, "host.name": f"{svc.name}-node-1"}))
            provider.add_span_processor(BatchSpanProcessor(exporter_factory(svc.name), max_queue_size=100_000,
                                                           max_export_batch_size=512,
                                                           schedule_delay_millis=schedule_delay_ms))
            self.providers[svc.name] = provider
            self.tracers[svc.name] = provider.get_tracer("agentwatch.demo")

    def shutdown(self) -> None:
        for provider in self.providers.values():
            provider.force_flush()
            provider.shutdown()

    # -- one agent run ------------------------------------------------------------------------

    def run(self, now_ns: int, progress: float = 0.0) -> None:
        """One agent run (a trace) at ``now_ns``; ``progress`` in [0, 1] of the demo, for incidents."""
        svc = self.rng.choice(self.services)
        incident_phase = progress >= 0.5  # incidents start half-way, after a clean baseline
        user = f"user-{self.rng.randrange(40)}"
        provider_name, model, response_model = MODELS[self.rng.randrange(len(MODELS))]
        domain = self.rng.choice(svc.domains)
        if "drift" in self.incidents and incident_phase and svc.name == self.services[0].name:
            domain = "oos"  # users start asking things the bank assistant was never built for
            self._count("drift", now_ns)
        prompt = self.rng.choice(self.prompts.get(domain) or self.prompts["oos"])
        if self._pii_rng.random() < PII_SHARE:
            prompt += " " + _personal_detail(user, self._pii_rng)
        tools = list(svc.tools)
        token_scale = 1
        if "cost_spike" in self.incidents and incident_phase and svc.name == self.services[-1].name:
            token_scale = 25  # a prompt-template change stuffs the whole history into context
            self._count("cost_spike", now_ns)
        tracer = self.tracers[svc.name]
        t = now_ns
        root = tracer.start_span(f"invoke_agent {svc.agent}", start_time=t, attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": svc.agent,
            "user.id": user, "gen_ai.conversation.id": f"conv-{user}-{self.rng.randrange(1000)}"})
        ctx = trace.set_span_in_context(root)
        t += self._ms(5, 20)

        wanted_tool = self.rng.choice(tools)
        if "unknown_tool" in self.incidents and incident_phase and self.rng.random() < 0.05:
            wanted_tool = "delete_customer_records"  # the model invents a tool nobody declared
            self._count("unknown_tool", now_ns)
        repeats = 1
        if "loop" in self.incidents and incident_phase and self.rng.random() < 0.03:
            repeats = 6  # the agent keeps calling the same tool with the same arguments
            self._count("loop", now_ns)
        arguments = json.dumps(_arguments_for(wanted_tool, self.rng))
        failing = "errors" in self.incidents and incident_phase and svc.name == self.services[1].name \
            and self.rng.random() < 0.4
        for _ in range(repeats):
            t = self._chat(tracer, ctx, t, provider_name, model, response_model, prompt, tools, token_scale, svc,
                           tool_call=(wanted_tool, arguments))
            if wanted_tool in TOOL_SCHEMAS:
                t = self._tool(tracer, ctx, t, wanted_tool, arguments, error=failing)
        if failing:
            self._count("errors", now_ns)
        t = self._chat(tracer, ctx, t, provider_name, model, response_model, prompt, tools, token_scale, svc,
                       tool_call=None, error=failing)
        if "retry_storm" in self.incidents and incident_phase and self.rng.random() < 0.02:
            # A client timed out and its SDK retried the identical request four more times.
            self._count("retry_storm", now_ns)
            input_tokens = self.rng.randint(300, 900) * token_scale
            for _ in range(4):
                t = self._chat(tracer, ctx, t, provider_name, model, response_model, prompt, tools, token_scale, svc,
                               tool_call=None, input_tokens=input_tokens)
        root.end(end_time=t)
        self.stats.traces += 1
        self.stats.spans += 1

    def _chat(self, tracer, ctx, t: int, provider: str, model: str, response_model: str, prompt: str,
              tools: list[str], token_scale: int, svc: DemoService, tool_call: tuple[str, str] | None,
              error: bool = False, input_tokens: int | None = None) -> int:
        latency = self._ms(300, 1500)
        if input_tokens is None:
            input_tokens = self.rng.randint(300, 900) * token_scale
        output_tokens = self.rng.randint(20, 200)
        output: list[dict[str, Any]]
        if tool_call:
            output = [{"role": "assistant", "parts": [{"type": "tool_call", "name": tool_call[0],
                                                       "arguments": tool_call[1], "id": f"call_{self.rng.randrange(10**9)}"}],
                       "finish_reason": "tool_call"}]
        else:
            output = [{"role": "assistant", "parts": [{"type": "text", "content": "Here is what I found."}],
                       "finish_reason": "stop"}]
        span = tracer.start_span(f"chat {model}", context=ctx, start_time=t, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
            "gen_ai.request.model": model, "gen_ai.response.model": response_model,
            "gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
            "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": prompt}]}]),
            "gen_ai.output.messages": json.dumps(output),
            "gen_ai.tool.definitions": json.dumps([{"type": "function", "name": name, "parameters": TOOL_SCHEMAS[name]}
                                                   for name in tools]),
        })
        if svc.prompt_name:
            span.set_attribute("gen_ai.prompt.name", svc.prompt_name)
            if svc.prompt_version:
                span.set_attribute("gen_ai.prompt.version", svc.prompt_version)
        if error:
            span.set_attribute("error.type", "RateLimitError")
            span.set_status(Status(StatusCode.ERROR, "429 rate limited"))
        span.end(end_time=t + latency)
        self.stats.spans += 1
        self.stats.llm_calls += 1
        return t + latency

    def _tool(self, tracer, ctx, t: int, name: str, arguments: str, error: bool = False) -> int:
        latency = self._ms(20, 300)
        span = tracer.start_span(f"execute_tool {name}", context=ctx, start_time=t, attributes={
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
            "gen_ai.tool.call.arguments": arguments,
            "gen_ai.tool.call.id": hashlib.sha1(f"{t}{name}".encode()).hexdigest()[:12]})
        if error:  # the same outage that rate-limits the model times out its backend
            span.set_attribute("error.type", "TimeoutError")
            span.set_status(Status(StatusCode.ERROR, "upstream timed out"))
        span.end(end_time=t + latency)
        self.stats.spans += 1
        self.stats.tool_calls += 1
        return t + latency

    def _ms(self, low: int, high: int) -> int:
        return self.rng.randint(low, high) * 1_000_000

    def _count(self, incident: str, now_ns: int) -> None:
        self.stats.incidents[incident] = self.stats.incidents.get(incident, 0) + 1
        self.stats.first_injected_ns.setdefault(incident, now_ns)


# Users paste their contact details into chats now and then: the pipeline redacts them
# (pii_detections, agentwatch_pii_detections_total), so the demo shows that too.
PII_SHARE = 0.02


def _personal_detail(user: str, rng: random.Random) -> str:
    """A sentence with a (synthetic) e-mail address or phone number, as a user would add it."""
    if rng.random() < 0.5:
        return f"you can email me at {user}@example.com"
    return f"call me back on 010-{rng.randrange(2000, 9999)}-{rng.randrange(1000, 9999)}"


def _arguments_for(tool: str, rng: random.Random) -> dict[str, Any]:
    return {
        "get_balance": lambda: {"account": rng.choice(["checking", "savings"])},
        "list_transactions": lambda: {"account": "checking", "days": rng.choice([7, 30])},
        "search_flights": lambda: {"origin": rng.choice(["SFO", "JFK"]), "destination": rng.choice(["CDG", "NRT"])},
        "get_weather": lambda: {"city": rng.choice(["Paris", "Tokyo", "Lima"])},
        "set_timer": lambda: {"minutes": rng.choice([5, 10, 25])},
        "add_to_list": lambda: {"item": rng.choice(["milk", "eggs", "coffee"])},
    }.get(tool, lambda: {"ids": "*"})()


def otlp_grpc_exporter_factory(port: int):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    def make(_service: str) -> SpanExporter:
        return OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)

    return make
