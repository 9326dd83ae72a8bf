"""Events that flow through agentwatch, and the findings detectors make of them.

Every event is a frozen, slotted dataclass carrying its own timestamp (unix seconds), so
detectors never read a clock. Events travel between workers as JSON objects whose keys are
the field names (``orjson`` serialises these dataclasses natively); :func:`event_from_dict`
turns such an object back into its event, ignoring keys a newer producer may have added.

A number outside its plausibility bounds (:mod:`agentwatch.bounds`) never reaches an event as
it came: the row carries ``null`` there and names the field in ``invalid_fields``
(``"input_tokens:above_max,cost_usd:from_invalid_tokens"``); the event built from such a row
holds 0, so sums and detectors stay numeric and the flagged value adds nothing.

Structured payloads that vary per call (tool definitions, the tool calls a model asked for,
finding evidence) are kept as JSON text or plain mappings so that each event maps onto one
flat Parquet row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Mapping, TypeVar


@dataclass(frozen=True, slots=True)
class LlmCall:
    """One model invocation (the innermost LLM span of a call), with usage and cost."""

    table: ClassVar[str] = "llm_calls"

    ts: float  # span end, unix seconds
    trace_id: str
    span_id: str
    parent_span_id: str = ""
    service: str = ""
    project: str = ""
    user: str = ""
    session: str = ""
    agent: str = ""
    host: str = ""
    provider: str = ""
    model: str = ""  # response model when known, else the request model
    request_model: str = ""
    operation: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    reasoning_tokens: int = 0
    # Tokens written to the provider's prompt cache (Anthropic cache creation); part of
    # input_tokens like cache reads, priced at the model's cache-write rate.
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = False  # False when the model is missing from the pricing table (cost 0)
    latency_ms: float = 0.0
    status: str = "ok"  # "ok" | "error"
    error: str = ""
    prompt: str = ""  # truncated to the configured maximum
    response: str = ""
    # JSON text: [{"name": str, "parameters": {...JSON schema...}}, ...] declared to the model.
    tool_definitions: str = ""
    # JSON text: [{"name": str, "arguments": str, "id": str}, ...] the model asked to call.
    requested_tool_calls: str = ""
    # Time to the first streamed chunk in ms (gen_ai.response.time_to_first_chunk is in seconds);
    # None when the call was not streamed or the instrumentation does not record it.
    time_to_first_token_ms: float | None = None
    finish_reason: str = ""  # the first of gen_ai.response.finish_reasons, as the provider wrote it
    prompt_name: str = ""  # managed prompt (gen_ai.prompt.name, Langfuse, OpenLLMetry)
    prompt_version: str = ""
    # JSON text: {"text_input": n, "image_input": n, "audio_output": n, ...} from
    # gen_ai.usage.<modality>.<input|output>_tokens; "" when none was reported. Their sum fills
    # input_tokens / output_tokens only when the totals are absent.
    modality_tokens: str = ""
    invalid_fields: str = ""  # "field:reason,..." for values nulled as implausible (see above)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool execution span (``execute_tool``, OpenInference TOOL, traceloop tool)."""

    table: ClassVar[str] = "tool_calls"

    ts: float
    trace_id: str
    span_id: str
    parent_span_id: str = ""
    service: str = ""
    project: str = ""
    user: str = ""
    session: str = ""
    agent: str = ""
    host: str = ""
    tool_name: str = ""
    call_id: str = ""
    arguments: str = ""  # the call's arguments as JSON text, unwrapped from framework envelopes
    # "" (JSON text as sent, or none), "json" (unwrapped or converted to a JSON object), or
    # "unknown": what the instrumentation recorded is not readable as the call's arguments (a
    # positional list, a bare string); kept as sent in ``arguments``, never judged against a schema.
    arguments_format: str = ""
    result: str = ""
    latency_ms: float = 0.0
    status: str = "ok"
    error: str = ""
    invalid_fields: str = ""


@dataclass(frozen=True, slots=True)
class AgentStep:
    """An agent/chain/workflow span: the skeleton of a trace between model and tool calls."""

    table: ClassVar[str] = "agent_steps"

    ts: float
    trace_id: str
    span_id: str
    parent_span_id: str = ""
    service: str = ""
    project: str = ""
    user: str = ""
    session: str = ""
    agent: str = ""
    host: str = ""
    operation: str = ""  # invoke_agent, create_agent, chain, workflow, task, ...
    name: str = ""  # span name
    start_ts: float = 0.0
    latency_ms: float = 0.0
    status: str = "ok"
    error: str = ""
    invalid_fields: str = ""


@dataclass(frozen=True, slots=True)
class LlmMessage:
    """A prompt or completion message that arrived as an OTLP log record (openai-v2 style).

    Joined to its :class:`LlmCall` by ``(trace_id, span_id)`` in the snapshot views.
    """

    table: ClassVar[str] = "llm_messages"

    ts: float
    trace_id: str
    span_id: str
    service: str = ""
    event_name: str = ""  # gen_ai.user.message, gen_ai.choice, ...
    role: str = ""
    content: str = ""


@dataclass(frozen=True, slots=True)
class SpanCoverage:
    """Spans one service sent in one input record and how many the normaliser recognised, with
    an example of one it did not (no GenAI attributes it knows). Written only when some spans
    were not recognised: ``agentwatch doctor`` tells a service whose spans all map to nothing,
    which otherwise leaves no row anywhere.
    """

    table: ClassVar[str] = "span_coverage"

    ts: float
    service: str = ""
    spans: int = 0
    mapped: int = 0  # recognised as a model call, tool call or agent step
    example_trace_id: str = ""
    example_span_id: str = ""
    example_name: str = ""  # redacted like every text
    example_attributes: str = ""  # the example's attribute names, comma-separated (the first 20)


@dataclass(frozen=True, slots=True)
class ToolDeclaration:
    """Tools declared to a model on a log record rather than its span (the
    ``gen_ai.client.inference.operation.details`` event): carried to the trace stage so the
    trace's calls are judged against them. Not a table of its own: the declaration is stored
    as its ``llm_messages`` row (role ``tool_definitions``).
    """

    table: ClassVar[str] = "tool_declarations"

    ts: float
    trace_id: str
    span_id: str
    service: str = ""
    tool_definitions: str = ""  # normalised JSON, as LlmCall.tool_definitions


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One ``gen_ai.evaluation.result`` event: a score an evaluator gave a model call's output.

    ``score`` is None when the evaluator gave only a label.
    """

    table: ClassVar[str] = "evaluations"

    ts: float
    trace_id: str
    span_id: str  # the evaluated span
    service: str = ""
    project: str = ""
    name: str = ""  # gen_ai.evaluation.name, e.g. "relevance"
    score: float | None = None  # gen_ai.evaluation.score.value
    label: str = ""  # gen_ai.evaluation.score.label
    explanation: str = ""  # gen_ai.evaluation.explanation (redacted like every text)
    prompt_name: str = ""
    prompt_version: str = ""


@dataclass(frozen=True, slots=True)
class PiiDetection:
    """Personal data or a secret found (and handled per the PII policy) in one field of a span
    or log record: how many of one entity type. Never the value itself.
    """

    table: ClassVar[str] = "pii_detections"

    ts: float
    trace_id: str
    span_id: str
    service: str = ""
    project: str = ""
    entity_type: str = ""  # EMAIL, PHONE, CREDIT_CARD, ..., SECRET, or a custom type
    field: str = ""  # <table>.<column> it was found in, e.g. llm_calls.prompt
    count: int = 1


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One NVML (or DCGM) reading.

    ``pid == 0`` is the whole device; otherwise the row is one compute process on it and
    ``memory_used_bytes`` is that process's usage. Utilisation, temperature and power are the
    device's: None on process rows and wherever the device did not report them (NotSupported
    on consumer cards, a field the exporter lacks), so an average over a column is not pulled
    towards a 0 nobody read.
    """

    table: ClassVar[str] = "gpu_samples"

    ts: float
    host: str
    gpu: int  # device index
    gpu_uuid: str = ""
    gpu_name: str = ""
    pid: int = 0
    process_name: str = ""
    memory_used_bytes: int = 0
    memory_free_bytes: int = 0
    memory_total_bytes: int = 0
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    simulated: bool = False  # True when the sample came from the demo's simulated source
    invalid_fields: str = ""


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Finding:
    """What a detector concluded, at the timestamp of the event that made it conclude so.

    ``key`` identifies the monitored thing (``project=shop/model=gpt-4o``, a trace id, a GPU);
    ``detector`` + ``kind`` + ``key`` is the dedup identity used by alerting. A finding with
    ``resolved=True`` says that condition has cleared.
    """

    table: ClassVar[str] = "findings"

    detector: str
    key: str
    kind: str
    severity: Severity
    ts: float
    value: float
    threshold: float
    evidence: Mapping[str, Any] = field(default_factory=dict)  # JSON-able
    resolved: bool = False

    @property
    def dedup_key(self) -> str:
        return f"{self.detector}:{self.kind}:{self.key}"


EVENT_TYPES: tuple[type, ...] = (LlmCall, ToolCall, AgentStep, LlmMessage, GpuSample, PiiDetection, Evaluation,
                                 SpanCoverage, Finding)
EVENT_BY_TABLE: dict[str, type] = {t.table: t for t in EVENT_TYPES}

E = TypeVar("E")


def event_from_dict(cls: type[E], data: Mapping[str, Any]) -> E:
    """Build ``cls`` from a decoded JSON object, ignoring unknown keys (forward compatible)."""
    if cls is not Finding:
        try:
            return cls(**data)  # the common case: exactly our own fields
        except TypeError:
            pass
    names = _field_names(cls)
    kwargs = {k: v for k, v in data.items() if k in names}
    if cls is Finding and "severity" in kwargs:
        kwargs["severity"] = Severity(kwargs["severity"])
    return cls(**kwargs)


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = frozenset(f.name for f in dataclasses.fields(cls))
        _FIELD_NAMES[cls] = names
    return names
