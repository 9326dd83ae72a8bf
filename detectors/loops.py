"""Agent loops, per trace: repeated tool calls, step cycles, runaway steps/tokens/duration.

A trace's state lives in an :class:`EventTimeLru` keyed by trace id (capped, idle traces expire by
event time). Each kind fires once per trace; when the trace goes idle (or is evicted) what fired
resolves, with the final counts and the cost the trace burned.

Signals, all per trace:

- ``repeated_tool_call``: one tool with the same canonicalised arguments ``>= max_same_tool_calls``
  times. Executed tool spans and model-requested calls are counted separately (a tool span
  often has no call id to join it to the request, so summing them would count each turn twice;
  a call to an undeclared tool may have no span at all, only the request).
- ``step_cycle``: the last steps are a pattern of 2..``max_cycle_period`` steps repeated
  ``min_cycle_repeats`` times (A->B->A->B->A->B). Steps are tool executions labelled with their
  arguments (a search with a new query is progress, not a loop) and ``invoke_agent`` steps
  (agent hand-offs bouncing). Chain/task/node spans are left out: a LangGraph ReAct agent is
  ``agent -> tools -> agent -> tools`` by construction.
- ``too_many_steps``: more than ``max_steps`` model calls (turns) in the trace.
- ``runaway_tokens``: tokens per model call grew by ``runaway_growth`` x for ``runaway_steps``
  consecutive calls and reached ``runaway_min_tokens`` (context accumulating grows linearly,
  a runaway multiplies).
- ``near_identical_prompts``: ``near_identical_repeats`` consecutive model calls whose prompts are
  equal once digits are removed (timestamps, counters, ids) and whose input tokens are within
  ``near_identical_token_tolerance``. The token check matters because prompts are stored
  truncated: a long shared system prompt truncates every call of a trace to the same text.
- ``trace_too_long``: the trace is still active ``max_duration_s`` after it started.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from agentwatch.detectors.bounded import EventTimeLru, check_positive, stable_hash
from agentwatch.detectors.evidence import Evidence
from agentwatch.events import AgentStep, Finding, LlmCall, Severity, ToolCall

KINDS = ("repeated_tool_call", "step_cycle", "too_many_steps", "runaway_tokens",
         "near_identical_prompts", "trace_too_long")
_BIT = {kind: 1 << i for i, kind in enumerate(KINDS)}
# The same bits as plain constants for the per-event path (no dict lookup per test).
_REPEATED, _CYCLE, _STEPS, _RUNAWAY, _NEAR_IDENTICAL, _TOO_LONG = (1 << i for i in range(6))
_DIGITS = b"0123456789"
_EVIDENCE_TEXT_MAX = 500
_SIGNATURE_CACHE_MAX = 4_096
# One encoder for all calls: json.dumps builds a new encoder per call when options are given.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_arguments(arguments: Any) -> str:
    """Arguments as canonical JSON (sorted keys, no spaces), so ``{"a":1,"b":2}`` equals
    ``{ "b": 2, "a": 1 }``. Text that is not JSON is compared with outer whitespace stripped."""
    if isinstance(arguments, str):
        text = arguments.strip()
        if not text:
            return ""
        arguments = parsed_json(text)
        if arguments is NOT_JSON:
            return text
    return _CANONICAL_JSON.encode(arguments)


NOT_JSON = object()


@functools.lru_cache(maxsize=2_048)
def parsed_json(text: str) -> Any:
    """``json.loads(text)``, or :data:`NOT_JSON`; cached because the loop and the tool detectors
    both parse each tool call's arguments. Callers must not mutate the result."""
    try:
        return json.loads(text)
    except ValueError:
        return NOT_JSON


def tool_signature(name: str, arguments: Any) -> tuple[str, str]:
    """``(signature, canonical arguments)``; the signature is ``name:hash(arguments)``."""
    canonical = canonical_arguments(arguments)
    return f"{name}:{stable_hash(canonical)}", canonical


def prompt_shape(prompt: str) -> str:
    """A digest of the prompt with digits removed: equal for prompts that differ only in numbers."""
    data = prompt.encode("utf-8", "surrogatepass").translate(None, _DIGITS)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def periodic_tail(labels: Sequence[str], max_period: int, repeats: int) -> int:
    """The smallest period ``p`` (2..max_period) such that the last ``p * repeats`` labels repeat
    with period ``p`` and the pattern has two or more distinct labels; 0 when none.

    >>> periodic_tail(list("xABABAB"), 4, 3), periodic_tail(list("ABABAA"), 4, 3)
    (2, 0)
    """
    n = len(labels)
    for p in range(2, max_period + 1):
        need = p * repeats
        if n < need:
            break
        if all(labels[i] == labels[i - p] for i in range(n - 1, n - need + p - 1, -1)):
            if len({labels[i] for i in range(n - p, n)}) >= 2:
                return p
    return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopEvidence(Evidence):
    """A trace's totals when a loop signal fired (or resolved), and what the signal saw.

    Signal fields, set for their kind only: ``repeated_tool_call``: ``tool``, ``arguments``
    (canonical, clipped), ``signature``, ``source`` (``executed`` or ``requested``);
    ``step_cycle``: ``cycle`` (the repeating steps), ``period``; ``runaway_tokens``:
    ``tokens_per_call``, ``growth_factor``; ``near_identical_prompts``: ``prompt_shape``,
    ``input_tokens``, ``prompt_head``. A resolution carries the totals and ``reason`` only.
    """

    trace_id: str
    service: str
    project: str
    agent: str
    llm_calls: int
    tool_calls: int
    cost_usd: float
    tokens: int
    duration_s: float
    tool: str | None = None
    arguments: str | None = None
    signature: str | None = None
    source: str | None = None
    cycle: tuple[str, ...] | None = None
    period: int | None = None
    tokens_per_call: tuple[int, ...] | None = None
    growth_factor: float | None = None
    prompt_shape: str | None = None
    input_tokens: int | None = None
    prompt_head: str | None = None
    reason: str | None = None


class _Trace:
    __slots__ = ("first_ts", "last_ts", "service", "project", "agent", "llm_calls", "tool_calls",
                 "cost_usd", "tokens", "tool_counts", "requested_counts", "labels", "prev_tokens",
                 "growth_streak", "token_tail", "prev_shape", "prev_input_tokens", "similar_run",
                 "fired")

    def __init__(self, first_ts: float, last_ts: float) -> None:
        self.first_ts = first_ts
        self.last_ts = last_ts
        self.service = self.project = self.agent = ""
        self.llm_calls = 0
        self.tool_calls = 0
        self.cost_usd = 0.0
        self.tokens = 0
        self.tool_counts: dict[str, int] | None = None  # executed tool signature -> count
        self.requested_counts: dict[str, int] | None = None  # requested signature -> count
        self.labels: deque[str] | None = None  # recent steps for cycle detection
        self.prev_tokens = 0
        self.growth_streak = 0
        self.token_tail: list[int] = []  # tokens of the last few model calls, for evidence
        self.prev_shape = ""
        self.prev_input_tokens = -1
        self.similar_run = 1
        self.fired = 0  # bit set of KINDS fired in this trace

    def to_json(self) -> list[Any]:
        return [self.first_ts, self.last_ts, self.service, self.project, self.agent,
                self.llm_calls, self.tool_calls, self.cost_usd, self.tokens, self.tool_counts,
                self.requested_counts, None if self.labels is None else list(self.labels),
                self.prev_tokens, self.growth_streak, self.token_tail, self.prev_shape,
                self.prev_input_tokens, self.similar_run, self.fired]

    @classmethod
    def from_json(cls, row: list[Any], labels_maxlen: int) -> "_Trace":
        t = cls(float(row[0]), float(row[1]))
        (t.service, t.project, t.agent, t.llm_calls, t.tool_calls, t.cost_usd, t.tokens,
         t.tool_counts, t.requested_counts, labels, t.prev_tokens, t.growth_streak, t.token_tail,
         t.prev_shape, t.prev_input_tokens, t.similar_run, t.fired) = row[2:]
        t.labels = None if labels is None else deque(labels, maxlen=labels_maxlen)
        return t


class LoopDetector:
    """Agent loops and runaways per trace (see the module docstring for each signal).

    Parameters
    ----------
    max_same_tool_calls : int
        Same tool + same canonical arguments this many times in a trace is a loop.
    max_cycle_period, min_cycle_repeats : int
        Longest repeating step pattern looked for, and how many times it must repeat.
    max_steps : int
        Model calls (turns) a trace may make.
    runaway_growth : float
        Per-call growth factor of tokens that counts as runaway.
    runaway_steps : int
        Consecutive calls growing by ``runaway_growth`` needed.
    runaway_min_tokens : int
        Tokens the latest call must have reached for runaway growth to matter.
    near_identical_repeats : int
        Consecutive model calls with near-identical prompts that make a loop.
    near_identical_token_tolerance : float
        Relative difference of input tokens under which two prompts can be near-identical.
    max_duration_s : float
        Event time a trace may stay active.
    max_traces : int
        Most traces held (least recently active evicted first).
    trace_ttl_s : float
        A trace without events for this long (event time) is over.
    max_signatures_per_trace : int
        Most distinct tool signatures counted per trace (a trace calling thousands of distinct
        tools/arguments is not looping on any of them).

    Examples
    --------
    >>> det = LoopDetector()
    >>> calls = [ToolCall(ts=float(i), trace_id="t1", span_id=str(i), tool_name="search",
    ...                   arguments='{"q": "refund", "n": 3}') for i in range(4)]
    >>> [(f.kind, f.value) for c in calls for f in det.update(c)]
    [('repeated_tool_call', 3.0)]
    """

    name: ClassVar[str] = "agent_loop"
    partition_by: ClassVar[str] = "trace_id"
    # Constructor arguments that bound the state: split over the partitions of its stage.
    state_caps: ClassVar[tuple[str, ...]] = ("max_traces",)
    accepts: ClassVar[tuple[type, ...]] = (LlmCall, ToolCall, AgentStep)

    def __init__(self, *, max_same_tool_calls: int = 3, max_cycle_period: int = 4,
                 min_cycle_repeats: int = 3, max_steps: int = 25, runaway_growth: float = 1.5,
                 runaway_steps: int = 3, runaway_min_tokens: int = 32_000,
                 near_identical_repeats: int = 3, near_identical_token_tolerance: float = 0.01,
                 max_duration_s: float = 1_800.0, max_traces: int = 50_000,
                 trace_ttl_s: float = 900.0, max_signatures_per_trace: int = 256) -> None:
        for arg, value, low in (("max_same_tool_calls", max_same_tool_calls, 2),
                                ("max_cycle_period", max_cycle_period, 2),
                                ("min_cycle_repeats", min_cycle_repeats, 2),
                                ("max_steps", max_steps, 1), ("runaway_steps", runaway_steps, 1),
                                ("near_identical_repeats", near_identical_repeats, 2),
                                ("max_traces", max_traces, 1),
                                ("max_signatures_per_trace", max_signatures_per_trace, 1)):
            if value < low:
                raise ValueError(f"{arg} must be >= {low}, got {value}")
        if not runaway_growth > 1:
            raise ValueError(f"runaway_growth must be > 1, got {runaway_growth}")
        check_positive("runaway_min_tokens", runaway_min_tokens, allow_zero=True)
        check_positive("near_identical_token_tolerance", near_identical_token_tolerance,
                       allow_zero=True)
        check_positive("max_duration_s", max_duration_s)
        check_positive("trace_ttl_s", trace_ttl_s)
        self.max_same_tool_calls = max_same_tool_calls
        self.max_cycle_period = max_cycle_period
        self.min_cycle_repeats = min_cycle_repeats
        self.max_steps = max_steps
        self.runaway_growth = float(runaway_growth)
        self.runaway_steps = runaway_steps
        self.runaway_min_tokens = runaway_min_tokens
        self.near_identical_repeats = near_identical_repeats
        self.near_identical_token_tolerance = float(near_identical_token_tolerance)
        self.max_duration_s = float(max_duration_s)
        self.max_traces = max_traces
        self.trace_ttl_s = float(trace_ttl_s)
        self.max_signatures_per_trace = max_signatures_per_trace
        self._labels_maxlen = max_cycle_period * min_cycle_repeats
        self._traces: EventTimeLru[str, _Trace] = EventTimeLru(max_traces, trace_ttl_s)
        # (tool, arguments text) -> (signature, canonical): an executed call usually repeats the
        # arguments text the model just requested, so canonicalising once serves both. A pure
        # function of its key, so it is not checkpointed; cleared when full (bounded).
        self._scratch: list[Finding] = []
        self._signatures: dict[tuple[str, Any], tuple[str, str]] = {}

    def _signature(self, name: str, arguments: Any) -> tuple[str, str]:
        if not isinstance(arguments, str):
            return tool_signature(name, arguments)
        key = (name, arguments)
        found = self._signatures.get(key)
        if found is None:
            if len(self._signatures) >= _SIGNATURE_CACHE_MAX:
                self._signatures.clear()
            found = self._signatures[key] = tool_signature(name, arguments)
        return found

    def state_size(self) -> int:
        return len(self._traces)

    # -- routing --------------------------------------------------------------------------

    def update(self, event: LlmCall | ToolCall | AgentStep) -> Sequence[Finding]:
        ts = event.ts
        traces = self._traces
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        if traces.next_sweep_ts <= ts:
            for trace_id, gone in traces.expire(ts):
                self._resolve(trace_id, gone, ts, "trace idle for trace_ttl_s", findings)
        trace_id = event.trace_id
        is_step = isinstance(event, AgentStep)
        start = event.start_ts if is_step and event.start_ts > 0 else (
            ts - event.latency_ms / 1000.0)
        entries = traces.entries
        t = entries.get(trace_id)
        if t is None:
            t = _Trace(min(start, ts), ts)
            t.service, t.project, t.agent = event.service, event.project, event.agent
            for old_id, gone in traces.insert(trace_id, t):
                self._resolve(old_id, gone, ts, "evicted: max_traces reached", findings)
        else:
            entries.move_to_end(trace_id)
            if start < t.first_ts:
                t.first_ts = start
            if ts > t.last_ts:
                t.last_ts = ts
        if isinstance(event, LlmCall):
            self._on_llm_call(trace_id, t, event, findings)
        elif isinstance(event, ToolCall):
            self._on_tool_call(trace_id, t, event, findings)
        elif is_step and event.operation == "invoke_agent":
            self._on_step(trace_id, t, f"agent:{event.agent or event.name}", ts, findings)
        if not t.fired & _TOO_LONG and ts - t.first_ts > self.max_duration_s:
            self._fire(trace_id, t, "trace_too_long", ts, ts - t.first_ts, self.max_duration_s,
                       findings)
        return tuple(findings) if findings else ()

    # -- per event kind ---------------------------------------------------------------------

    def _on_llm_call(self, trace_id: str, t: _Trace, call: LlmCall,
                     findings: list[Finding]) -> None:
        ts = call.ts
        t.llm_calls += 1
        t.cost_usd += call.cost_usd
        tokens = call.input_tokens + call.output_tokens
        t.tokens += tokens
        fired = t.fired
        if t.llm_calls > self.max_steps and not fired & _STEPS:
            self._fire(trace_id, t, "too_many_steps", ts, float(t.llm_calls),
                       float(self.max_steps), findings)
        # Runaway growth: consecutive multiplications of tokens per call.
        if t.prev_tokens > 0 and tokens >= self.runaway_growth * t.prev_tokens:
            t.growth_streak += 1
        else:
            t.growth_streak = 0
        t.prev_tokens = tokens
        tail = t.token_tail
        tail.append(tokens)
        if len(tail) > self.runaway_steps + 1:
            del tail[0]
        if (t.growth_streak >= self.runaway_steps and tokens >= self.runaway_min_tokens
                and not fired & _RUNAWAY):
            self._fire(trace_id, t, "runaway_tokens", ts, float(tokens),
                       float(self.runaway_min_tokens), findings,
                       tokens_per_call=tuple(tail), growth_factor=self.runaway_growth)
        if call.prompt:
            self._on_prompt(trace_id, t, call, findings)
        if call.requested_tool_calls:
            for name, arguments in requested_calls(call.requested_tool_calls):
                signature, canonical = self._signature(name, arguments)
                t.requested_counts = self._count(t.requested_counts, signature,
                                                 trace_id, t, ts, name, canonical, "requested",
                                                 findings)

    def _on_prompt(self, trace_id: str, t: _Trace, call: LlmCall,
                   findings: list[Finding]) -> None:
        shape = prompt_shape(call.prompt)
        tokens = call.input_tokens
        prev = t.prev_input_tokens
        close = prev >= 0 and abs(tokens - prev) <= self.near_identical_token_tolerance * max(
            tokens, prev)
        if close and shape == t.prev_shape:
            t.similar_run += 1
            if (t.similar_run >= self.near_identical_repeats
                    and not t.fired & _NEAR_IDENTICAL):
                self._fire(trace_id, t, "near_identical_prompts", call.ts, float(t.similar_run),
                           float(self.near_identical_repeats), findings,
                           prompt_shape=shape, input_tokens=tokens,
                           prompt_head=call.prompt[:_EVIDENCE_TEXT_MAX])
        else:
            t.similar_run = 1
        t.prev_shape = shape
        t.prev_input_tokens = tokens

    def _on_tool_call(self, trace_id: str, t: _Trace, call: ToolCall,
                      findings: list[Finding]) -> None:
        t.tool_calls += 1
        signature, canonical = self._signature(call.tool_name, call.arguments)
        t.tool_counts = self._count(t.tool_counts, signature, trace_id, t, call.ts,
                                    call.tool_name, canonical, "executed", findings)
        self._on_step(trace_id, t, f"tool:{signature}", call.ts, findings)

    def _count(self, counts: dict[str, int] | None, signature: str, trace_id: str, t: _Trace,
               ts: float, tool: str, canonical: str, source: str,
               findings: list[Finding]) -> dict[str, int]:
        if counts is None:
            counts = {}
        n = counts.get(signature)
        if n is None:
            if len(counts) >= self.max_signatures_per_trace:
                return counts
            n = 0
        n += 1
        counts[signature] = n
        if n >= self.max_same_tool_calls and not t.fired & _REPEATED:
            self._fire(trace_id, t, "repeated_tool_call", ts, float(n),
                       float(self.max_same_tool_calls), findings,
                       tool=tool, arguments=canonical[:_EVIDENCE_TEXT_MAX],
                       signature=signature, source=source)
        return counts

    def _on_step(self, trace_id: str, t: _Trace, label: str, ts: float,
                 findings: list[Finding]) -> None:
        labels = t.labels
        if labels is None:
            labels = t.labels = deque(maxlen=self._labels_maxlen)
        labels.append(label)
        if t.fired & _CYCLE or len(labels) < 2 * self.min_cycle_repeats:
            return
        period = periodic_tail(labels, self.max_cycle_period, self.min_cycle_repeats)
        if period:
            cycle = tuple(labels)[-period:]
            self._fire(trace_id, t, "step_cycle", ts, float(self.min_cycle_repeats),
                       float(self.min_cycle_repeats), findings,
                       cycle=cycle, period=period)

    # -- findings -------------------------------------------------------------------------

    @staticmethod
    def _evidence(trace_id: str, t: _Trace, ts: float, **signal: Any) -> dict[str, Any]:
        return LoopEvidence(trace_id=trace_id, service=t.service, project=t.project,
                            agent=t.agent, llm_calls=t.llm_calls, tool_calls=t.tool_calls,
                            cost_usd=t.cost_usd, tokens=t.tokens, duration_s=ts - t.first_ts,
                            **signal).to_mapping()

    def _fire(self, trace_id: str, t: _Trace, kind: str, ts: float, value: float,
              threshold: float, findings: list[Finding], **signal: Any) -> None:
        t.fired |= _BIT[kind]
        findings.append(Finding(detector=self.name, key=trace_id, kind=kind,
                                severity=Severity.WARNING, ts=ts, value=value,
                                threshold=threshold,
                                evidence=self._evidence(trace_id, t, ts, **signal)))

    def _resolve(self, trace_id: str, t: _Trace, ts: float, reason: str,
                 findings: list[Finding]) -> None:
        if not t.fired:
            return
        evidence = self._evidence(trace_id, t, t.last_ts, reason=reason)
        for kind in KINDS:
            if t.fired & _BIT[kind]:
                findings.append(Finding(detector=self.name, key=trace_id, kind=kind,
                                        severity=Severity.INFO, ts=ts, value=0.0, threshold=0.0,
                                        evidence=evidence, resolved=True))

    # -- state ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "lru": self._traces.snapshot_meta(),
                "traces": [[trace_id, t.to_json()] for trace_id, t in self._traces.items()]}

    def restore(self, snap: dict[str, Any]) -> None:
        self._traces.clear()
        self._traces.restore_meta(snap.get("lru", {}))
        for trace_id, row in snap.get("traces", []):
            self._traces.insert(trace_id, _Trace.from_json(row, self._labels_maxlen))


@functools.lru_cache(maxsize=2_048)
def requested_calls(text: str) -> tuple[tuple[str, Any], ...]:
    """``((name, arguments), ...)`` from ``LlmCall.requested_tool_calls``; () when unreadable.

    Cached (a pure function of the text): the loop and the tool detectors both read every
    requested-calls text, and the second read becomes a lookup. Callers must not mutate the
    arguments it returns.
    """
    try:
        calls = json.loads(text)
    except ValueError:
        return ()
    if not isinstance(calls, list):
        return ()
    out = []
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"]:
            out.append((call["name"], call.get("arguments", "")))
    return tuple(out)
