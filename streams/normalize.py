"""OTLP export requests -> LlmCall / ToolCall / AgentStep / LlmMessage events.

A Kafka record of ``otlp_spans`` is a batch; it is decoded once and walked in plain Python.
Per span the attributes are read in a single pass into a dict; everything else is dict look-ups,
so the normaliser stays close to the decode + attribute-walk limit.

Real instrumentations nest spans: an agent-level span and its child LLM span may both carry
the model and even the same token counts. Only the innermost LLM span of a call becomes an
:class:`LlmCall`; an LLM-looking ancestor becomes an :class:`AgentStep`, and the fields the
child lacks (request model, provider, tokens) are taken from it. Ancestors arriving in a later
batch are recognised through a bounded memory of recent LLM spans' parents.

Everything kept across batches (that memory, the memos of parsed prompts and tool definitions,
the attribute-layout plans) is capped in approximate bytes as well as entries, and a value too
large to be worth keeping (a multi-megabyte prompt) is not memoised at all.

Free text (prompts, responses, messages, tool arguments and results, errors) goes through the
PII :class:`~agentwatch.streams.pii.Redactor` when one is given, before it is cut to
``max_text_chars``: what leaves the normaliser holds placeholders, never a detected value, and
each detection is counted in :attr:`NormalizedBatch.pii_rows` (type and field, not the value).

Tool-call arguments are unwrapped from the envelopes frameworks record them in (OpenLLMetry's
``{"args": [...], "kwargs": {...}}`` and LangChain ``{"input_str": ...}``, OpenInference's bare
input string, OpenLIT's Python repr); what cannot be read as the call's arguments is kept as
sent and marked ``arguments_format="unknown"``, which the tool detector does not judge.

``gen_ai.evaluation.result`` events (span events or log records) become :class:`Evaluation`
rows (:attr:`NormalizedBatch.evaluation_rows`); a ``gen_ai.client.inference.operation.details``
span event lends its messages and tool definitions to its span.

Numbers (tokens, latency, cost) are checked against :class:`~agentwatch.bounds.ValueBounds`
as rows are built: an implausible one is nulled in the row, named in its ``invalid_fields`` and
reported in :attr:`NormalizedBatch.rejections`; the span still becomes its row.
"""

from __future__ import annotations

import ast
import collections
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import orjson

from agentwatch.bounds import (DEFAULT_BOUNDS, FROM_INVALID_TOKENS, NOT_A_NUMBER, PRICED_TOKEN_FIELDS, FieldLimit,
                               ValueBounds, ValueRejection, check_number, format_flags, keepable, typed_row)
from agentwatch.detectors.bounded import BoundedMemo, approx_size
from agentwatch.events import AgentStep, LlmCall, LlmMessage, ToolCall
from agentwatch.streams.pii import Redactor
from agentwatch.streams.pii.redactor import MARGIN_CHARS
from agentwatch.streams import semconv as sc
from agentwatch.streams.mapping import MappingRules
from agentwatch.streams.otlp import any_value, attributes
from agentwatch.streams.pricing import PricingTable

_STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR

_MIB = 1 << 20
# Entry caps of the memos; their byte budgets are Normalizer arguments. Typical traffic fills the
# entry caps long before the byte budgets (the bench's prompts are ~100 characters, its tool
# definitions ~340); large or hostile payloads meet the byte budgets instead.
_PROMPT_MEMO_ENTRIES = 4096
_TOOL_DEFINITIONS_MEMO_ENTRIES = 1024
_LAYOUT_MEMO_ENTRIES = 4096  # per span role
_REDACTION_MEMO_ENTRIES = 4096
# Below this a text is scanned again rather than memoised: the scan costs about what hashing it
# for the memo does.
_REDACTION_MEMO_MIN_CHARS = 256
# OTLP ids are 16 and 8 bytes, a 48-character key; a parent key far longer than that comes from a
# malformed id and is not remembered.
_MAX_PARENT_KEY_BYTES = 4096
# Unpriced models are counted by name; a "name" longer than this is not one, and is cut.
_UNPRICED_NAME_CHARS = 256
# Identifiers read from attributes (finish reason, prompt name and version, evaluation name and
# label) are cut to this: a real one is far shorter.
_NAME_CHARS = 256
# A Python repr of tool arguments (OpenLIT) is parsed with ast.literal_eval only below this size:
# parsing builds a syntax tree several times the text's size.
_LITERAL_MAX_CHARS = 65_536


@dataclass
class NormalizedBatch:
    """What one export request mapped to.

    Events are kept as rows (plain dicts with exactly the event's fields), the form they are
    encoded in: building a frozen dataclass costs several times a dict literal, and the worker
    only encodes them. ``llm_calls`` / ``tool_calls`` / ``agent_steps`` build the events.
    """

    spans: int = 0
    llm_call_rows: list[dict[str, Any]] = field(default_factory=list)
    tool_call_rows: list[dict[str, Any]] = field(default_factory=list)
    agent_step_rows: list[dict[str, Any]] = field(default_factory=list)
    # Spans that could not be mapped: (span id, reason). The rest of the batch still counts.
    failures: list[tuple[str, str]] = field(default_factory=list)
    # Values nulled in the rows above because they were implausible (the rows still count).
    rejections: list[ValueRejection] = field(default_factory=list)
    # What the PII redactor found in the rows above: PiiDetection rows (type and field, no value).
    pii_rows: list[dict[str, Any]] = field(default_factory=list)
    # SpanCoverage rows: per service with spans the normaliser did not recognise, how many of its
    # spans it did, and an example of one it did not.
    coverage_rows: list[dict[str, Any]] = field(default_factory=list)
    # Evaluation rows: gen_ai.evaluation.result span events.
    evaluation_rows: list[dict[str, Any]] = field(default_factory=list)

    # The events hold 0 where the rows hold a nulled value, as decoded events do.
    @property
    def llm_calls(self) -> list[LlmCall]:
        limits = DEFAULT_BOUNDS.limits(LlmCall.table)
        return [LlmCall(**typed_row(limits, row)) for row in self.llm_call_rows]

    @property
    def tool_calls(self) -> list[ToolCall]:
        limits = DEFAULT_BOUNDS.limits(ToolCall.table)
        return [ToolCall(**typed_row(limits, row)) for row in self.tool_call_rows]

    @property
    def agent_steps(self) -> list[AgentStep]:
        limits = DEFAULT_BOUNDS.limits(AgentStep.table)
        return [AgentStep(**typed_row(limits, row)) for row in self.agent_step_rows]

    @property
    def events(self) -> int:
        return len(self.llm_call_rows) + len(self.tool_call_rows) + len(self.agent_step_rows)


class Normalizer:
    """Maps decoded OTLP requests onto events. Holds only bounded memory across batches.

    Parameters
    ----------
    pricing
        Model prices; unknown models cost 0 and are counted in ``unpriced_models``.
    max_text_chars
        Prompt, response, argument and result texts are cut to this many characters.
    parent_memory
        How many recent LLM spans' parents to remember to demote ancestors seen later.
    value_bounds
        Plausibility bounds of tokens, latency and cost (``Settings.value_bounds``); the
        defaults when None.
    parent_memory_bytes
        Byte budget of that memory. 100 000 well-formed parent keys take ~30 MB (measured), so
        the default 32 MiB lets the entry count bind for real ids and the bytes for malformed
        long ones.
    prompt_memo_bytes
        Byte budget of the memo of parsed input messages (keyed by their JSON text). 32 MiB
        holds all 4096 entries while one (the text and the prompt kept from it) averages under
        8 KiB; with the tool definitions' 16 MiB the text memos stay below what the worker
        process takes by itself (~80 MB RSS). A text over 1/8 of the budget (4 MiB) is parsed every time:
        it would evict an eighth of the memo, and parsing it again costs about what decoding
        it did.
    tool_definitions_memo_bytes
        Byte budget of the memo of normalised tool definitions. An app declares one tool set
        on every call, so few distinct texts recur: 16 MiB (over 2 MiB, not memoised).
    layout_memo_bytes
        Byte budget of the attribute-layout plans, split evenly over LLM, tool and agent spans.
        An instrumentation emits a handful of layouts of a few hundred bytes of names each;
        8 MiB holds thousands, and a span with hostile random attribute names cannot grow it.
    redactor
        Replaces personal data and secrets in every free-text field (None: texts kept as sent).
    redaction_memo_bytes
        Byte budget of the memo of redacted texts. An agent re-sends its user's prompt with
        every model call of a run and its tool definitions with every call, so most long texts
        were redacted a moment ago; 32 MiB holds the 4096 entries at ~4 KB each (texts and
        their redacted copies).
    mapping
        A user-declared mapping (``Settings.mapping_path``): spans in a team's own shape are
        rewritten into the GenAI names before they are read (None: spans read as sent).
    """

    def __init__(self, pricing: PricingTable, *, max_text_chars: int = 8192,
                 parent_memory: int = 100_000, value_bounds: ValueBounds | None = None,
                 parent_memory_bytes: int = 32 * _MIB, prompt_memo_bytes: int = 32 * _MIB,
                 tool_definitions_memo_bytes: int = 16 * _MIB, layout_memo_bytes: int = 8 * _MIB,
                 redactor: Redactor | None = None, redaction_memo_bytes: int = 32 * _MIB,
                 mapping: MappingRules | None = None) -> None:
        for name, value in (("max_text_chars", max_text_chars), ("parent_memory", parent_memory),
                            ("parent_memory_bytes", parent_memory_bytes), ("prompt_memo_bytes", prompt_memo_bytes),
                            ("tool_definitions_memo_bytes", tool_definitions_memo_bytes),
                            ("layout_memo_bytes", layout_memo_bytes),
                            ("redaction_memo_bytes", redaction_memo_bytes)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0")
        self.pricing = pricing
        self.mapping = mapping
        self.max_text_chars = max_text_chars
        self.redactor = redactor if redactor is not None and redactor.policy.enabled else None
        # Detections in the row being built: (field, entity types), turned into pii rows with it.
        self._found: list[tuple[str, tuple[str, ...]]] = []
        self.redaction_memo_bytes = redaction_memo_bytes
        self._redaction_memo: BoundedMemo[tuple[str, bool, str], tuple[str, tuple[str, ...]]] = BoundedMemo(
            _REDACTION_MEMO_ENTRIES, redaction_memo_bytes)
        self.value_bounds = value_bounds if value_bounds is not None else DEFAULT_BOUNDS
        llm = {f.name: f for f in self.value_bounds.limits(LlmCall.table).nullable}
        self._token_limits = tuple(llm[name] for name in (
            "input_tokens", "output_tokens", "cache_read_tokens", "reasoning_tokens", "cache_write_tokens"))
        self._cost_limit = llm["cost_usd"]
        self._latency_limit = llm["latency_ms"]
        self._ttft_limit = llm["time_to_first_token_ms"]
        tokens = llm["input_tokens"]  # each modality's count is a token count
        self._modality_limit = FieldLimit("modality_tokens", tokens.low, tokens.high, True)
        self._start_ts_limit = next(f for f in self.value_bounds.limits(AgentStep.table).nullable
                                    if f.name == "start_ts")
        self._ts_low, self._ts_high = self.value_bounds.timestamp_s
        self.parent_memory = parent_memory
        self.parent_memory_bytes = parent_memory_bytes
        self.prompt_memo_bytes = prompt_memo_bytes
        self.tool_definitions_memo_bytes = tool_definitions_memo_bytes
        self.layout_memo_bytes = layout_memo_bytes
        # The value is always None, a shared singleton: an entry holds its key only.
        self._llm_parents: BoundedMemo[tuple[str, str], None] = BoundedMemo(
            parent_memory, parent_memory_bytes, max_entry_bytes=min(_MAX_PARENT_KEY_BYTES, parent_memory_bytes),
            size=_parent_key_size)
        self.unpriced_models: collections.Counter[str] = collections.Counter()
        self._tool_definitions_memo: BoundedMemo[str, str] = BoundedMemo(
            _TOOL_DEFINITIONS_MEMO_ENTRIES, tool_definitions_memo_bytes)
        self._prompt_memo: BoundedMemo[str, str] = BoundedMemo(_PROMPT_MEMO_ENTRIES, prompt_memo_bytes)
        layout_bytes = layout_memo_bytes // 3
        self._llm_fields = _FieldPlans(*_LLM_FIELDS, memo=BoundedMemo(_LAYOUT_MEMO_ENTRIES, layout_bytes))
        self._tool_fields = _FieldPlans(*_TOOL_FIELDS, memo=BoundedMemo(_LAYOUT_MEMO_ENTRIES, layout_bytes))
        self._step_fields = _FieldPlans(*_STEP_FIELDS, memo=BoundedMemo(_LAYOUT_MEMO_ENTRIES, layout_bytes))

    def memos(self) -> dict[str, BoundedMemo[Any, Any]]:
        """Everything this normaliser keeps across batches, by name (for tests and diagnostics)."""
        return {"llm_parents": self._llm_parents, "prompts": self._prompt_memo,
                "tool_definitions": self._tool_definitions_memo, "llm_layouts": self._llm_fields.memo,
                "tool_layouts": self._tool_fields.memo, "step_layouts": self._step_fields.memo,
                "redactions": self._redaction_memo}

    # -- traces -------------------------------------------------------------------------------

    def normalize_traces(self, request: Any) -> NormalizedBatch:
        batch = NormalizedBatch()
        # One pass: classify every span and keep only the GenAI ones; note the LLM spans' parents
        # and the few spans that carry trace context (project, user, session, agent).
        staged: list[tuple[str, Any, dict[str, Any], dict[str, Any], str, str, str]] = []
        llm_parent_ids: set[tuple[str, str]] = set()
        llm_by_id: dict[tuple[str, str], tuple[dict[str, Any], tuple[str, str]]] = {}
        genai_context: list[tuple[dict[str, Any], str]] = []
        # Non-GenAI spans that carry trace context (a web server root span with enduser.id).
        other_context: list[tuple[dict[str, Any], str]] = []
        # gen_ai.evaluation.result span events: (event attributes, its span's attributes, resource,
        # trace id, span id, event time in ns).
        evaluations: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any], str, str, int]] = []
        # service -> [spans, recognised, (span, attrs, resource) of the first one not recognised]
        coverage: dict[str, list[Any]] = {}
        for resource_spans in request.resource_spans:
            resource = _resource_context(attributes(resource_spans.resource.attributes))
            seen = coverage.get(resource["service"])
            if seen is None:
                seen = coverage[resource["service"]] = [0, 0, None]
            for scope_spans in resource_spans.scope_spans:
                seen[0] += len(scope_spans.spans)
                for span in scope_spans.spans:
                    batch.spans += 1
                    try:
                        attrs = attributes(span.attributes)
                        if self.mapping is not None:
                            span, attrs = self.mapping.map_span(span, scope_spans.scope.name, attrs)
                        if span.events:
                            _read_span_events(span, attrs, resource, evaluations)
                        role = _span_role(attrs)
                        if role is not None:
                            seen[1] += 1
                            trace_id, span_id = span.trace_id.hex(), span.span_id.hex()
                            parent_id = span.parent_span_id.hex()
                            staged.append((role, span, attrs, resource, trace_id, span_id, parent_id))
                            if role == "llm":
                                parent_key = (trace_id, parent_id)
                                llm_parent_ids.add(parent_key)
                                llm_by_id[(trace_id, span_id)] = (attrs, parent_key)
                            if not _CONTEXT_KEYS.isdisjoint(attrs):
                                genai_context.append((attrs, trace_id))
                        else:
                            if seen[2] is None:
                                seen[2] = (span, attrs, resource)
                            if not _CONTEXT_KEYS.isdisjoint(attrs):
                                other_context.append((attrs, span.trace_id.hex()))
                    except Exception as exc:  # hostile attribute content must not sink the batch
                        batch.failures.append((span.span_id.hex(), f"{type(exc).__name__}: {exc}"))
        for service, (spans, recognised, example) in coverage.items():
            if example is not None:
                self._coverage_row(batch, service, spans, recognised, *example)
        if not staged and not evaluations:
            return batch

        trace_context = _trace_context(genai_context + other_context)
        # The fields every row of one trace and resource shares, built once per batch for each.
        headers: dict[tuple[str, int], dict[str, Any]] = {}
        remembered = self._llm_parents
        # The calls the batch's models asked for, by (trace id, call id), and the tool rows whose
        # own arguments could not be read: these take the requested call's (see _arguments_from_requests).
        requested: dict[tuple[str, str], dict[str, str]] = {}
        unresolved: list[dict[str, Any]] = []

        for role, span, attrs, resource, trace_id, span_id, parent_id in staged:
            rejected: list[ValueRejection] = []  # the span's own: kept only if its row is
            try:
                if role == "llm" and ((trace_id, span_id) in llm_parent_ids or (trace_id, span_id) in remembered):
                    role = "agent"  # an outer wrapper of a model call: counted once, in the child
                header = headers.get((trace_id, id(resource)))
                if header is None:
                    header = headers[(trace_id, id(resource))] = _row_header(
                        trace_id, resource, trace_context.get(trace_id, _NO_CONTEXT))
                if role == "llm":
                    parent_key = (trace_id, parent_id)
                    merged = _merge_ancestors(attrs, parent_key, llm_by_id)
                    row = self._llm_call(span, merged, header, span_id, parent_id, rejected, requested)
                    batch.llm_call_rows.append(row)
                    if self.parent_memory and parent_key not in remembered:  # first come, first forgotten
                        remembered.put(parent_key, None)
                elif role == "tool":
                    row = self._tool_call(span, attrs, header, span_id, parent_id, rejected)
                    batch.tool_call_rows.append(row)
                    if row["call_id"] and (row["arguments_format"] == "unknown" or not row["arguments"]):
                        unresolved.append(row)
                else:
                    row = self._agent_step(span, attrs, header, span_id, parent_id, rejected)
                    batch.agent_step_rows.append(row)
            except Exception as exc:
                self._found.clear()
                batch.failures.append((span_id, f"{type(exc).__name__}: {exc}"))
                continue
            if self._found:
                self._pii_rows(batch.pii_rows, row)
            if rejected:
                batch.rejections += rejected
        if unresolved and requested:
            self._arguments_from_requests(unresolved, requested, batch)
        for event_attrs, span_attrs, resource, trace_id, span_id, time_ns in evaluations:
            header = headers.get((trace_id, id(resource)))
            if header is None:
                header = headers[(trace_id, id(resource))] = _row_header(
                    trace_id, resource, trace_context.get(trace_id, _NO_CONTEXT))
            try:
                row = self._evaluation(event_attrs, span_attrs, time_ns, header, span_id)
            except Exception as exc:
                self._found.clear()
                batch.failures.append((span_id, f"evaluation event: {type(exc).__name__}: {exc}"))
                continue
            if row is not None:
                batch.evaluation_rows.append(row)
                if self._found:
                    self._pii_rows(batch.pii_rows, row)
        return batch

    def _evaluation(self, attrs: Mapping[str, Any], context: Mapping[str, Any], time_ns: int,
                    header: Mapping[str, Any], span_id: str) -> dict[str, Any] | None:
        """An :class:`Evaluation` row from a ``gen_ai.evaluation.result`` event's attributes.

        ``context`` holds the evaluated span's attributes (its prompt name and version); the
        event's own win. None when the event names no evaluation and carries no score or label.
        """
        name = _str(attrs.get(sc.EVALUATION_NAME))[:_NAME_CHARS]
        score = _score(attrs.get(sc.EVALUATION_SCORE))
        label = _str(attrs.get(sc.EVALUATION_LABEL))[:_NAME_CHARS]
        if not name and score is None and not label:
            return None
        prompt_name = _first(attrs, sc.PROMPT_NAME) or _first(context, sc.PROMPT_NAME)
        prompt_version = _first(attrs, sc.PROMPT_VERSION) or _first(context, sc.PROMPT_VERSION)
        return {"ts": self._ts(time_ns), "trace_id": header["trace_id"], "span_id": span_id,
                "service": header["service"], "project": header["project"], "name": name, "score": score,
                "label": label,
                "explanation": self._text(_str(attrs.get(sc.EVALUATION_EXPLANATION)), "evaluations.explanation",
                                          header),
                "prompt_name": _str(prompt_name)[:_NAME_CHARS], "prompt_version": _str(prompt_version)[:_NAME_CHARS]}

    def _llm_call(self, span: Any, attrs: dict[str, Any], header: dict[str, Any], span_id: str,
                  parent_id: str, rejections: list[ValueRejection],
                  requested_by_id: dict[tuple[str, str], dict[str, str]]) -> dict[str, Any]:
        """An :class:`LlmCall` row; the calls it requested are noted in ``requested_by_id`` by id."""
        (request_model, model, input_tokens, output_tokens, cache_read, reasoning, cache_write, provider,
         operation, host, ttft_s, ttft_ms, finish, prompt_name, prompt_version,
         text_in, text_out, image_in, image_out, audio_in, audio_out,
         oi_model, invocation, mlflow_model, mlflow_usage) = self._llm_fields.values(attrs)
        request_model = _str(request_model)
        model = _str(model) or request_model
        if oi_model is not None or invocation is not None:  # OpenInference
            model = model or _str(oi_model)
            request_model = request_model or _invocation_model(invocation) or _str(oi_model)
            model = model or request_model
        provider = _str(provider)
        if mlflow_model is not None or mlflow_usage is not None:  # MLflow: JSON-encoded values
            model = model or _json_str(mlflow_model)
            request_model = request_model or _json_str(attrs.get("model")) or _mlflow_request_model(attrs)
            model = model or request_model
            provider = provider or _json_str(attrs.get(sc.MLFLOW_PROVIDER))
            if input_tokens is None and output_tokens is None:
                input_tokens, output_tokens = _mlflow_usage(mlflow_usage)
            if finish is None:
                finish = _mlflow_finish_reason(attrs.get(sc.MLFLOW_OUTPUTS))
        if "." in provider and attrs.get(sc.VERCEL_MODEL_PROVIDER) == provider:
            provider = provider.partition(".")[0]  # the Vercel AI SDK's "openai.chat": provider, then API
        if "/" in request_model and provider:  # LiteLLM's routing name, "openai/gpt-4o-mini" (Google ADK)
            request_model = _without_provider(request_model, provider)
            model = _without_provider(model, provider)
        flags: dict[str, str] = {}
        trace_id = header["trace_id"]
        modality = ""
        if not (text_in is None and text_out is None and image_in is None and image_out is None
                and audio_in is None and audio_out is None):  # usage by modality reported
            modality, input_tokens, output_tokens = self._modality_tokens(
                [text_in, text_out, image_in, image_out, audio_in, audio_out], input_tokens, output_tokens,
                flags, trace_id, span_id, rejections)
        tokens = [input_tokens, output_tokens, cache_read, reasoning, cache_write]
        for i, limit in enumerate(self._token_limits):
            raw = tokens[i]
            if raw is None:
                tokens[i] = 0  # absent reads 0
            elif type(raw) is int and limit.low <= raw <= limit.high:
                continue  # the common case, checked inline
            else:
                tokens[i] = _attr_count(raw, limit, flags, LlmCall.table, trace_id, span_id, rejections)
        input_tokens, output_tokens, cache_read, reasoning, cache_write = tokens
        if flags.keys().isdisjoint(PRICED_TOKEN_FIELDS):
            cost, priced = self.pricing.cost_usd(model, input_tokens, output_tokens, cache_read, cache_write)
            limit = self._cost_limit
            if not limit.low <= cost <= limit.high:
                cost = _rejected(cost, limit, flags, LlmCall.table, trace_id, span_id, rejections)
        else:  # a price times an implausible count is not a cost
            cost, priced = None, self.pricing.cost_usd(model, 0, 0)[1]
            flags["cost_usd"] = FROM_INVALID_TOKENS
        reported = _first(attrs, sc.REPORTED_COST)
        if "cost_usd" not in flags and type(reported) in (int, float) and reported > 0:
            # The instrumentation priced the call itself (OpenLIT, LiteLLM, pydantic-ai): its price
            # list knows contract prices and models ours lacks. 0 means it had no price: ours stands.
            cost, priced = float(reported), True
            limit = self._cost_limit
            if not limit.low <= cost <= limit.high:
                cost = _rejected(cost, limit, flags, LlmCall.table, trace_id, span_id, rejections)
        if not priced and model and len(self.unpriced_models) < 1000:
            self.unpriced_models[model[:_UNPRICED_NAME_CHARS]] += 1
        ttft = None
        if ttft_s is not None or ttft_ms is not None:
            ttft = self._ttft(ttft_s, ttft_ms, flags, trace_id, span_id, rejections)
        prompt = self._prompt(attrs, span)
        response, requested = _response(attrs, span)
        for call in requested:
            if call["id"]:
                requested_by_id[(trace_id, call["id"])] = call
        status, error = _status(span, attrs)
        start, end = span.start_time_unix_nano, span.end_time_unix_nano
        latency = self._latency(start, end, flags, LlmCall.table, trace_id, span_id, rejections)
        return {
            **header, "ts": self._ts(end), "span_id": span_id, "parent_span_id": parent_id,
            "host": _str(host) or header["host"],
            "provider": provider, "model": model,
            "request_model": request_model,
            "operation": _str(operation) or "chat",
            "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_read_tokens": cache_read,
            "reasoning_tokens": reasoning,
            "cache_write_tokens": cache_write,
            "cost_usd": cost, "priced": priced,
            "latency_ms": latency, "status": status, "error": self._text(error, "llm_calls.error", header),
            "prompt": self._text(prompt, "llm_calls.prompt", header),
            "response": self._text(response, "llm_calls.response", header),
            "tool_definitions": self._text(self._tool_definitions_json(attrs), "llm_calls.tool_definitions", header,
                                           clip=False),
            "requested_tool_calls": self._text(_dump(requested), "llm_calls.requested_tool_calls", header,
                                               clip=False),
            "time_to_first_token_ms": ttft,
            "finish_reason": _finish_reason(finish) if finish is not None else "",
            "prompt_name": _str(prompt_name)[:_NAME_CHARS] if prompt_name is not None else "",
            "prompt_version": _str(prompt_version)[:_NAME_CHARS] if prompt_version is not None else "",
            "modality_tokens": modality,
            "invalid_fields": format_flags(flags) if flags else "",
        }

    def _modality_tokens(self, counts: list[Any], input_tokens: Any, output_tokens: Any, flags: dict[str, str],
                         trace_id: str, span_id: str, rejections: list[ValueRejection]) -> tuple[str, Any, Any]:
        """(modality_tokens JSON, input tokens, output tokens).

        Each count is checked like a token field (an implausible one is left out of the JSON and
        reported under ``modality_tokens``). The plausible ones' sums stand in for the input or
        output total only where that total is absent: a total, when sent, already counts them.
        """
        limit = self._modality_limit
        checked: dict[str, int] = {}
        sums = [0, 0]  # input, output
        rejected: dict[str, str] = {}
        for (_, name), raw in zip(sc.MODALITY_TOKENS, counts):
            if raw is None or raw == "":
                continue
            count = _attr_count(raw, limit, rejected, LlmCall.table, trace_id, span_id, rejections)
            if count is None:
                continue
            checked[name] = count
            sums[name.endswith("_output")] += count
        if rejected:
            flags.update(rejected)
        if not checked:
            return "", input_tokens, output_tokens
        if input_tokens is None or input_tokens == "":
            input_tokens = sums[0]
        if output_tokens is None or output_tokens == "":
            output_tokens = sums[1]
        return _dump(checked), input_tokens, output_tokens

    def _ttft(self, seconds: Any, millis: Any, flags: dict[str, str], trace_id: str, span_id: str,
              rejections: list[ValueRejection]) -> float | None:
        """Time to first token in ms, from seconds (semconv) or milliseconds (Vercel AI SDK)."""
        raw, scale = (seconds, 1000.0) if seconds is not None and seconds != "" else (millis, 1.0)
        if raw is None or raw == "":
            return None
        limit = self._ttft_limit
        number = raw
        if isinstance(raw, (str, bytes)):
            try:
                number = float(raw)
            except ValueError:
                pass
        if type(number) in (int, float) and math.isfinite(number):
            number = float(number) * scale
        checked, reason = check_number(number, limit.low, limit.high, False)
        if reason is None:
            return checked
        flags[limit.name] = reason
        rejections.append(ValueRejection(LlmCall.table, limit.name, reason, keepable(raw), trace_id, span_id))
        return None

    def _coverage_row(self, batch: NormalizedBatch, service: str, spans: int, recognised: int, span: Any,
                      attrs: Mapping[str, Any], resource: Mapping[str, Any]) -> None:
        end = span.end_time_unix_nano / 1e9
        if not self._ts_low <= end <= self._ts_high:
            return  # a row needs a time to be filed under; the counts come again with the next record
        row = {"ts": end, "service": service, "spans": spans, "mapped": recognised,
               "example_trace_id": span.trace_id.hex(), "example_span_id": span.span_id.hex(),
               "example_name": self._text(span.name, "span_coverage.example_name", resource),
               "example_attributes": ",".join(sorted(attrs)[:20])[:2000]}
        batch.coverage_rows.append(row)
        if self._found:
            self._pii_rows(batch.pii_rows, {**row, "trace_id": row["example_trace_id"],
                                            "span_id": row["example_span_id"], "project": resource["project"]})

    def _text(self, text: str, where: str, header: Mapping[str, Any], *, clip: bool = True) -> str:
        """A free-text field as stored: redacted (detections noted for the row), cut to max_text_chars.

        JSON fields (``clip=False``) are not cut: a cut would leave invalid JSON. Placeholders
        contain no quote or backslash, so redacting inside a JSON string keeps it valid.
        """
        limit = self.max_text_chars if clip else None
        if self.redactor is None or not text:
            return text if limit is None else text[:limit]
        if len(text) < _REDACTION_MEMO_MIN_CHARS:
            out, detected = self.redactor.redact(text, project=header["project"], limit=limit)
        else:
            key = (header["project"], clip, text)
            done = self._redaction_memo.get(key)
            if done is None:
                done = self.redactor.redact(text, project=header["project"], limit=limit)
                self._redaction_memo.put(key, done)
            out, detected = done
        if detected:
            self._found.append((where, detected))
        return out

    def _pii_rows(self, rows: list[dict[str, Any]], row: Mapping[str, Any]) -> None:
        """The detections noted while ``row`` was built, one PiiDetection row per field and type."""
        for where, detected in self._found:
            for entity, count in collections.Counter(detected).items():
                rows.append({"ts": row["ts"], "trace_id": row["trace_id"], "span_id": row["span_id"],
                             "service": row.get("service", ""), "project": row.get("project", ""),
                             "entity_type": entity, "field": where, "count": count})
        self._found.clear()

    def _ts(self, end: int) -> float:
        # ts identifies the row (its hour partition, every detector's clock): nothing to null it
        # to, so a span whose end lies outside the bounds is unmappable (the default bounds hold
        # every uint64 nanosecond time; narrower ones can refuse clock-skewed spans).
        ts = end / 1e9
        if not self._ts_low <= ts <= self._ts_high:
            raise ValueError(f"span end {ts} s outside the timestamp bounds {self.value_bounds.timestamp_s}")
        return ts

    def _latency(self, start: int, end: int, flags: dict[str, str], table: str, trace_id: str,
                 span_id: str, rejections: list[ValueRejection]) -> float | None:
        latency = (end - start) / 1e6
        limit = self._latency_limit
        if limit.low <= latency <= limit.high:
            return latency
        # end before start (a skewed clock) or an unset start time: not a duration to average.
        return _rejected(latency, limit, flags, table, trace_id, span_id, rejections)

    def _prompt(self, attrs: dict[str, Any], span: Any) -> str:
        # Agents re-send the conversation at every step, so most input-message texts of a trace
        # were seen a moment ago: parse each distinct one once. The row keeps only max_text_chars
        # of the prompt, so that is all the memo keeps.
        for key in _MESSAGE_LIST_KEYS:
            raw = attrs.get(key)
            if isinstance(raw, str) and raw:
                break
        else:
            return _prompt_text(attrs, span)
        prompt = self._prompt_memo.get(raw)
        if prompt is None:
            messages = _json_value(raw)
            if isinstance(messages, dict):  # MLflow's request
                messages = messages.get("messages")
            if not isinstance(messages, list) or not messages:
                return _prompt_text(attrs, span)  # unusable here: the other conventions decide
            # The margin lets the redactor see an entity the cut would halve.
            prompt = _last_message_text(messages, "user")[: self.max_text_chars + MARGIN_CHARS]
            self._prompt_memo.put(raw, prompt)
        return prompt

    def _tool_definitions_json(self, attrs: dict[str, Any]) -> str:
        # An app declares the same tools on every call: normalise each distinct JSON text once.
        raw = attrs.get(sc.TOOL_DEFINITIONS)
        if not isinstance(raw, str):
            return _dump(_tool_definitions(attrs))
        normalized = self._tool_definitions_memo.get(raw)
        if normalized is None:
            normalized = _dump(_tool_definitions(attrs))
            self._tool_definitions_memo.put(raw, normalized)
        return normalized

    def _tool_call(self, span: Any, attrs: dict[str, Any], header: dict[str, Any], span_id: str,
                   parent_id: str, rejections: list[ValueRejection]) -> dict[str, Any]:
        """A :class:`ToolCall` row."""
        name, host, call_id, arguments, wrapped, result = self._tool_fields.values(attrs)
        arguments, arguments_format, envelope_call_id = _tool_arguments(arguments, wrapped)
        result, result_call_id = _tool_result(result)
        call_id = _str(call_id) or envelope_call_id or result_call_id
        if len(arguments) > self.max_text_chars:
            arguments_format = "unknown"  # the stored text is cut: no longer the whole call
        name = _str(name) or _str(attrs.get(sc.TRACELOOP_ENTITY))
        if not name:
            # "execute_tool get_weather" is the span-name convention when the attribute is absent.
            name = span.name.removeprefix("execute_tool").strip() or span.name
        status, error = _status(span, attrs)
        start, end = span.start_time_unix_nano, span.end_time_unix_nano
        flags: dict[str, str] = {}
        latency = self._latency(start, end, flags, ToolCall.table, header["trace_id"], span_id, rejections)
        return {
            **header, "ts": self._ts(end), "span_id": span_id, "parent_span_id": parent_id,
            "host": _str(host) or header["host"], "tool_name": name,
            "call_id": call_id, "arguments": self._text(arguments, "tool_calls.arguments", header),
            "arguments_format": arguments_format,
            "result": self._text(result, "tool_calls.result", header),
            "latency_ms": latency, "status": status, "error": self._text(error, "tool_calls.error", header),
            "invalid_fields": format_flags(flags) if flags else "",
        }

    def _arguments_from_requests(self, rows: list[dict[str, Any]], requested: Mapping[tuple[str, str], dict[str, str]],
                                 batch: NormalizedBatch) -> None:
        """Tool rows whose arguments could not be read take those of the call the model requested.

        OpenInference's LangChain instrumentation records a tool's input as LangChain passed it
        (the bare value ``A-1042``), while an LLM span of the same trace holds the call the model
        asked for under the same call id. Only a request in this batch is used; a row left
        without one keeps its ``arguments_format`` ("unknown": not judged).
        """
        for row in rows:
            call = requested.get((row["trace_id"], row["call_id"]))
            if call is None or (call["name"] and call["name"] != row["tool_name"]):
                continue
            found = _object_from_text(call["arguments"]) if len(call["arguments"]) <= self.max_text_chars else None
            if found is None:
                continue
            if self.redactor is not None:  # the detections of the text it replaces no longer count
                span_id, trace_id = row["span_id"], row["trace_id"]
                batch.pii_rows[:] = [r for r in batch.pii_rows if not (
                    r["span_id"] == span_id and r["trace_id"] == trace_id and r["field"] == "tool_calls.arguments")]
            row["arguments"] = self._text(_dump(found) or "{}", "tool_calls.arguments", row)
            row["arguments_format"] = "json"
            if self._found:
                self._pii_rows(batch.pii_rows, row)

    def _agent_step(self, span: Any, attrs: dict[str, Any], header: dict[str, Any], span_id: str,
                    parent_id: str, rejections: list[ValueRejection]) -> dict[str, Any]:
        """An :class:`AgentStep` row."""
        agent, host = self._step_fields.values(attrs)
        status, error = _status(span, attrs)
        start, end = span.start_time_unix_nano, span.end_time_unix_nano
        flags: dict[str, str] = {}
        trace_id = header["trace_id"]
        latency = self._latency(start, end, flags, AgentStep.table, trace_id, span_id, rejections)
        start_ts = start / 1e9
        limit = self._start_ts_limit
        if not limit.low <= start_ts <= limit.high:
            start_ts = _rejected(start_ts, limit, flags, AgentStep.table, trace_id, span_id, rejections)
        oi_kind = _str(attrs.get(sc.OPENINFERENCE_KIND))
        operation = (_str(attrs.get("gen_ai.operation.name")) or oi_kind.lower()
                     or _str(attrs.get(sc.TRACELOOP_KIND)) or "step")
        agent = _str(agent) or header["agent"] or _str(attrs.get(sc.TRACELOOP_ENTITY))
        if not agent and oi_kind.upper() == "AGENT":  # OpenInference names its agents only by span name
            agent = span.name
        return {
            **header, "ts": self._ts(end), "span_id": span_id, "parent_span_id": parent_id,
            "agent": agent,
            "host": _str(host) or header["host"], "operation": operation,
            "name": span.name, "start_ts": start_ts,
            "latency_ms": latency, "status": status,
            "error": self._text(error, "agent_steps.error", header),
            "invalid_fields": format_flags(flags) if flags else "",
        }

    # -- logs ---------------------------------------------------------------------------------

    def normalize_logs(self, request: Any, pii_rows: list[dict[str, Any]] | None = None,
                       evaluation_rows: list[dict[str, Any]] | None = None) -> tuple[int, list[LlmMessage]]:
        """(log records seen, messages): the GenAI message events among the log records.

        What the redactor found in message contents is added to ``pii_rows`` when given;
        ``gen_ai.evaluation.result`` records become Evaluation rows in ``evaluation_rows`` when
        given. A ``gen_ai.client.inference.operation.details`` record gives one message each for
        the last user input, the output and the declared tools (role ``tool_definitions``,
        content the normalised definitions' JSON, as in ``LlmCall.tool_definitions``).
        """
        seen = 0
        messages: list[LlmMessage] = []
        for resource_logs in request.resource_logs:
            resource = _resource_context(attributes(resource_logs.resource.attributes))
            service = resource["service"]
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    seen += 1
                    attrs = attributes(record.attributes)
                    event_name = getattr(record, "event_name", "") or _str(attrs.get("event.name"))
                    if not event_name.startswith("gen_ai."):
                        continue
                    ts_ns = record.time_unix_nano or record.observed_time_unix_nano
                    trace_id, span_id = record.trace_id.hex(), record.span_id.hex()
                    if event_name == sc.EVALUATION_EVENT:
                        if evaluation_rows is not None:
                            self._log_evaluation(record, attrs, ts_ns, trace_id, span_id, resource,
                                                 evaluation_rows, pii_rows)
                        continue
                    if not record.trace_id:
                        continue
                    body = any_value(record.body) if record.HasField("body") else None
                    if event_name == sc.OPERATION_DETAILS_EVENT:
                        if isinstance(body, dict):  # the attributes may travel in the body
                            attrs = {**body, **attrs}
                        found = _operation_details_messages(attrs)
                        found.append(("tool_definitions", _dump(_tool_definitions(attrs))))
                    else:
                        found = [_message_role_content(event_name, body, attrs)]
                    ts = ts_ns / 1e9
                    for role, content in found:
                        if not content and event_name == sc.OPERATION_DETAILS_EVENT:
                            continue
                        message = LlmMessage(
                            ts=ts, trace_id=trace_id, span_id=span_id,
                            service=service, event_name=event_name, role=role,
                            content=self._text(content, "llm_messages.content", resource,
                                               clip=role != "tool_definitions"))  # JSON: not cut
                        messages.append(message)
                    if self._found:
                        if pii_rows is not None:
                            self._pii_rows(pii_rows, {"ts": ts, "trace_id": trace_id,
                                                      "span_id": span_id, "service": service,
                                                      "project": resource["project"]})
                        self._found.clear()
        return seen, messages

    def _log_evaluation(self, record: Any, attrs: dict[str, Any], ts_ns: int, trace_id: str, span_id: str,
                        resource: dict[str, Any], rows: list[dict[str, Any]],
                        pii_rows: list[dict[str, Any]] | None) -> None:
        if record.HasField("body"):
            body = any_value(record.body)
            if isinstance(body, dict):
                attrs = {**body, **attrs}
        header = {"trace_id": trace_id, "service": resource["service"], "project": resource["project"]}
        try:
            row = self._evaluation(attrs, {}, ts_ns, header, span_id)
        except ValueError:  # a time outside the bounds: not a row
            row = None
        if row is not None:
            rows.append(row)
            if self._found and pii_rows is not None:
                self._pii_rows(pii_rows, row)
        self._found.clear()


# -- classification ---------------------------------------------------------------------------

def _roles(llm: Iterable[str], tool: Iterable[str], agent: Iterable[str]) -> dict[str, str]:
    """One lookup from a convention's span kind to its role (the three sets are disjoint)."""
    return {**dict.fromkeys(agent, "agent"), **dict.fromkeys(tool, "tool"), **dict.fromkeys(llm, "llm")}


_OPERATION_ROLES = _roles(sc.LLM_OPERATIONS, sc.TOOL_OPERATIONS, sc.AGENT_OPERATIONS)
_MLFLOW_ROLES = _roles(sc.MLFLOW_LLM_TYPES, sc.MLFLOW_TOOL_TYPES, sc.MLFLOW_STEP_TYPES)
# Where a span keeps its input message list: the GenAI attribute, the Vercel AI SDK's (parts as
# {"type", "text"}), MLflow's request keyword arguments ("messages" among them).
_MESSAGE_LIST_KEYS = (sc.INPUT_MESSAGES, sc.VERCEL_PROMPT_MESSAGES, sc.MLFLOW_INPUTS)


def _span_role(attrs: dict[str, Any]) -> str | None:
    op = attrs.get("gen_ai.operation.name")
    if op:
        role = _OPERATION_ROLES.get(op)
        if role:
            return role
    kind = attrs.get(sc.OPENINFERENCE_KIND)
    if kind:
        kind = str(kind).upper()
        if kind in sc.OI_LLM_KINDS:
            return "llm"
        return "tool" if kind == "TOOL" else "agent"
    kind = attrs.get(sc.TRACELOOP_KIND)
    if kind:
        return "tool" if kind == "tool" else "agent"
    kind = attrs.get(sc.MLFLOW_SPAN_TYPE)
    if kind:
        role = _MLFLOW_ROLES.get(kind)
        if role:
            return role
    if attrs.get("llm.request.type"):
        return "llm"
    for key in _MODEL_KEYS:
        if attrs.get(key):
            return "llm"
    for key in sc.TOOL_NAME:
        if attrs.get(key):
            return "tool"
    if attrs.get("gen_ai.agent.name"):
        return "agent"
    return None


_MODEL_KEYS = sc.REQUEST_MODEL + sc.RESPONSE_MODEL + sc.OI_MODEL_NAME

_CONTEXT_FIELDS = (("project", sc.PROJECT[:-1]), ("user", sc.USER), ("session", sc.SESSION), ("agent", sc.AGENT))
_CONTEXT_KEYS = frozenset(k for _, keys in _CONTEXT_FIELDS for k in keys)


def _resource_context(resource: dict[str, Any]) -> dict[str, str]:
    """What every span of one resource shares, computed once per resource, not per span."""
    return {"service": _str(resource.get("service.name")), "host": _str(_first(resource, sc.HOST)),
            "project": _str(_first(resource, sc.PROJECT))}


_NO_CONTEXT = {"project": "", "user": "", "session": "", "agent": ""}  # shared: read only


def _row_header(trace_id: str, resource: dict[str, Any], context: dict[str, str]) -> dict[str, Any]:
    """The row fields one trace's spans of one resource share (a span's own host wins later)."""
    return {"trace_id": trace_id, "service": resource["service"],
            "project": context["project"] or resource["project"], "user": context["user"],
            "session": context["session"], "agent": context["agent"], "host": resource["host"]}


def _trace_context(carriers: Iterable[tuple[dict[str, Any], str]]) -> dict[str, dict[str, str]]:
    """Project/user/session/agent per trace: set on one span (often the root), shared by all.

    ``carriers`` are the spans holding any context attribute, GenAI spans first: non-GenAI
    spans of the same trace only fill what those left empty.
    """
    out: dict[str, dict[str, str]] = {}
    for attrs, trace_id in carriers:
        ctx = out.get(trace_id)
        if ctx is None:
            ctx = out[trace_id] = dict(_NO_CONTEXT)
        for name, keys in _CONTEXT_FIELDS:
            if not ctx[name]:
                ctx[name] = _str(_first(attrs, keys))
    return out


def _merge_ancestors(attrs: dict[str, Any], parent_key: tuple[str, str],
                     llm_by_id: Mapping[tuple[str, str], tuple[dict[str, Any], tuple[str, str]]]
                     ) -> dict[str, Any]:
    """The child's attributes, with what it lacks filled from its LLM ancestors in this batch."""
    found = llm_by_id.get(parent_key)
    if found is None:
        return attrs
    merged = dict(attrs)
    for _ in range(8):  # nesting depth guard against cyclic parent ids in hostile input
        parent_attrs, grand_key = found
        for key, value in parent_attrs.items():
            if merged.get(key) in (None, ""):
                merged[key] = value
        found = llm_by_id.get(grand_key)
        if found is None:
            break
    return merged


def _status(span: Any, attrs: dict[str, Any]) -> tuple[str, str]:
    error_type = attrs.get("error.type")
    if span.status.code == _STATUS_ERROR or error_type:
        message = span.status.message or _str(error_type)
        if not message:
            for event in span.events:
                if event.name == "exception":
                    message = _str(attributes(event.attributes).get("exception.message"))
                    break
        return "error", message or "error"
    return "ok", ""


# -- text -------------------------------------------------------------------------------------

def _prompt_text(attrs: dict[str, Any], span: Any) -> str:
    messages = _json_value(attrs.get(sc.INPUT_MESSAGES))
    if isinstance(messages, list) and messages:
        return _last_message_text(messages, "user")
    indexed = _indexed_messages(attrs, sc.TRACELOOP_PROMPT_PREFIX, ".role", ".content")
    if indexed:
        return _last_message_text(indexed, "user")
    indexed = _indexed_messages(attrs, sc.OI_INPUT_MESSAGES_PREFIX, ".message.role", ".message.content")
    if indexed:
        return _last_message_text(indexed, "user")
    legacy = attrs.get(sc.LEGACY_PROMPT)
    if legacy:
        return _str(legacy)
    if attrs.get(sc.OI_INPUT):
        return _str(attrs[sc.OI_INPUT])
    for event in span.events:
        if event.name in ("gen_ai.user.message", "gen_ai.content.prompt"):
            ev = attributes(event.attributes)
            return _str(ev.get("content") or ev.get("gen_ai.prompt") or "")
    return ""


def _response(attrs: dict[str, Any], span: Any) -> tuple[str, list[dict[str, str]]]:
    """The model's text output and the tool calls it asked for."""
    messages = _json_value(attrs.get(sc.OUTPUT_MESSAGES))
    if isinstance(messages, list) and messages:
        text, calls = _last_message_text(messages, None), _requested_calls(messages)
        if text or calls:
            return text, calls
        # Empty parts: the calls may be recorded in another convention on the same span.
    indexed = _indexed_messages(attrs, sc.TRACELOOP_COMPLETION_PREFIX, ".role", ".content",
                                tool_calls=(".tool_calls.", ".name", ".arguments", ".id"))
    if indexed:
        return _last_message_text(indexed, None), _requested_calls(indexed)
    indexed = _indexed_messages(attrs, sc.OI_OUTPUT_MESSAGES_PREFIX, ".message.role", ".message.content",
                                tool_calls=(".message.tool_calls.", ".tool_call.function.name",
                                            ".tool_call.function.arguments", ".tool_call.id"))
    if indexed:
        return _last_message_text(indexed, None), _requested_calls(indexed)
    mlflow = attrs.get(sc.MLFLOW_OUTPUTS)
    if mlflow:  # MLflow: the provider's response object, OpenAI's {"choices": [{"message": ...}]}
        output = _json_value(mlflow)
        choices = output.get("choices") if isinstance(output, dict) else None
        if isinstance(choices, list) and choices:
            messages = [c["message"] for c in choices if isinstance(c, dict) and isinstance(c.get("message"), dict)]
            if messages:
                return _last_message_text(messages, None), _requested_calls(messages)
    vercel_calls = attrs.get(sc.VERCEL_RESPONSE_TOOL_CALLS)
    if vercel_calls is not None or sc.VERCEL_RESPONSE_TEXT in attrs:
        return _str(attrs.get(sc.VERCEL_RESPONSE_TEXT)), _vercel_calls(vercel_calls)
    legacy = attrs.get(sc.LEGACY_COMPLETION) or attrs.get(sc.OI_OUTPUT)
    if legacy:
        return _str(legacy), []
    for event in span.events:
        if event.name in ("gen_ai.choice", "gen_ai.content.completion"):
            ev = attributes(event.attributes)
            return _str(ev.get("content") or ev.get("gen_ai.completion") or ev.get("message") or ""), []
    return "", []


def _indexed_messages(attrs: dict[str, Any], prefix: str, role_suffix: str, content_suffix: str,
                      tool_calls: tuple[str, str, str, str] | None = None) -> list[dict[str, Any]]:
    """Rebuild ``prefix.N.<suffix>`` attribute families into messages, ordered by N.

    Indexes need not start at 0 or be contiguous (OpenInference), so they are sorted, not counted.
    """
    by_index: dict[int, dict[str, Any]] = {}
    for key, value in attrs.items():
        if not key.startswith(prefix):
            continue
        index_text, _, rest = key[len(prefix):].partition(".")
        if not index_text.isdecimal():  # isdigit() admits "²", which int() rejects
            continue
        message = by_index.setdefault(int(index_text), {})
        suffix = "." + rest
        if suffix == role_suffix:
            message["role"] = _str(value)
        elif suffix == content_suffix:
            message["content"] = value
        elif tool_calls is not None and suffix.startswith(".function_call."):
            # Legacy OpenAI function calling (OpenLLMetry: gen_ai.completion.N.function_call.*).
            call = message.setdefault("_function_call", {})
            if suffix == ".function_call.name":
                call["name"] = _str(value)
            elif suffix == ".function_call.arguments":
                call["arguments"] = _str(value)
        elif tool_calls is not None and suffix.startswith(tool_calls[0]):
            call_index, _, call_rest = suffix[len(tool_calls[0]):].partition(".")
            if call_index.isdecimal():
                call = message.setdefault("_calls", {}).setdefault(int(call_index), {})
                call_suffix = "." + call_rest
                if call_suffix == tool_calls[1]:
                    call["name"] = _str(value)
                elif call_suffix == tool_calls[2]:
                    call["arguments"] = _str(value)
                elif call_suffix == tool_calls[3]:
                    call["id"] = _str(value)
    out = []
    for index in sorted(by_index):
        message = by_index[index]
        calls = message.pop("_calls", None)
        function_call = message.pop("_function_call", None)
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        elif function_call:
            message["tool_calls"] = [function_call]
        out.append(message)
    return out


def _last_message_text(messages: list[Any], role: str | None) -> str:
    """Text of the last message with ``role`` that has text (with None: of the last message).

    With a role, a message of it without text is passed over: after a tool round the last
    ``user`` message may hold only a ``tool_call_response`` part (pydantic-ai, Anthropic's
    ``tool_result``), while the prompt is the user's text before it. When no message has the
    role, the last message is read.
    """
    matched = False
    for message in reversed(messages):
        if isinstance(message, dict) and (role is None or message.get("role") == role):
            text = _content_text(message.get("content") if "content" in message else message.get("parts"))
            if text or role is None:
                return text
            matched = True
    if matched:
        return ""
    chosen = messages[-1] if isinstance(messages[-1], dict) else {"content": messages[-1]}
    return _content_text(chosen.get("content") if "content" in chosen else chosen.get("parts"))


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: [{"type": "text", "content"|"text": ...}, ...]
        texts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type", "text") == "text":
                    texts.append(_str(part.get("content", part.get("text", ""))))
            elif isinstance(part, str):
                texts.append(part)
        return "\n".join(t for t in texts if t)
    return _str(content)


def _requested_calls(messages: list[Any]) -> list[dict[str, str]]:
    """Tool calls a model asked for, from current-semconv parts or OpenAI-style tool_calls."""
    calls = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        parts, tool_calls = message.get("parts"), message.get("tool_calls")
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict) and part.get("type") == "tool_call":
                calls.append({"name": _str(part.get("name")), "arguments": _str(part.get("arguments", "")),
                              "id": _str(part.get("id"))})
        for call in tool_calls if isinstance(tool_calls, list) else ():
            if not isinstance(call, dict):
                continue
            function = call.get("function") if isinstance(call.get("function"), dict) else call
            calls.append({"name": _str(function.get("name")), "arguments": _str(function.get("arguments", "")),
                          "id": _str(call.get("id"))})
    return [c for c in calls if c["name"]]


def _tool_definitions(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    raw = _json_value(attrs.get(sc.TOOL_DEFINITIONS))
    defs: list[Any] = raw if isinstance(raw, list) else []
    if not defs:
        functions: dict[int, dict[str, Any]] = {}
        for key, value in attrs.items():
            if key.startswith(sc.TRACELOOP_FUNCTIONS_PREFIX):
                index, _, field_name = key[len(sc.TRACELOOP_FUNCTIONS_PREFIX):].partition(".")
                if index.isdecimal():
                    functions.setdefault(int(index), {})[field_name] = (
                        _json_value(value) if field_name == "parameters" else value)
            elif key.startswith(sc.OI_TOOLS_PREFIX) and key.endswith(".tool.json_schema"):
                schema = _json_value(value)
                if schema is not None:
                    defs.append(schema)
        defs.extend(functions[i] for i in sorted(functions))
        mlflow = _json_value(attrs.get(sc.MLFLOW_TOOLS))
        if isinstance(mlflow, list):  # MLflow: the request's tools, OpenAI's shape
            defs.extend(mlflow)
        vercel = attrs.get(sc.VERCEL_PROMPT_TOOLS)
        if vercel:  # a list of JSON texts, one per tool ({"type": "function", "name": ..., "parameters": ...})
            for item in vercel if isinstance(vercel, list) else [vercel]:
                parsed = _json_value(item)
                if isinstance(parsed, list):
                    defs.extend(parsed)
                elif parsed is not None:
                    defs.append(parsed)
    out = []
    for item in defs:
        if not isinstance(item, dict):
            continue
        function = item.get("function") if isinstance(item.get("function"), dict) else item
        name = _str(function.get("name"))
        if name:
            parameters = function.get("parameters")
            if parameters is None:  # Anthropic's name; the Vercel AI SDK's (5 and later) in ai.prompt.tools
                parameters = function.get("input_schema", function.get("inputSchema"))
            out.append({"name": name, "parameters": parameters if isinstance(parameters, dict) else {}})
    return out


def _operation_details_messages(attrs: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of the last user input and of the output of an operation-details record."""
    out = []
    inputs = _json_value(attrs.get(sc.INPUT_MESSAGES))
    if isinstance(inputs, list) and inputs:
        out.append(("user", _last_message_text(inputs, "user")))
    outputs = _json_value(attrs.get(sc.OUTPUT_MESSAGES))
    if isinstance(outputs, list) and outputs:
        text = _last_message_text(outputs, None)
        out.append(("assistant", text or _dump(_requested_calls(outputs))))
    return out


def _message_role_content(event_name: str, body: Any, attrs: dict[str, Any]) -> tuple[str, str]:
    role = sc.MESSAGE_EVENT_ROLES.get(event_name, "")
    if isinstance(body, dict):
        message = body.get("message") if isinstance(body.get("message"), dict) else body
        role = _str(message.get("role")) or role
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            content = _dump(message["tool_calls"])
        return role, _content_text(content)
    if body is None:
        for key in (sc.INPUT_MESSAGES, sc.OUTPUT_MESSAGES):
            messages = _json_value(attrs.get(key))
            if isinstance(messages, list) and messages:
                return ("user" if key == sc.INPUT_MESSAGES else "assistant"), _last_message_text(messages, None)
        return role, ""
    return role, _str(body)


def _vercel_calls(value: Any) -> list[dict[str, str]]:
    """Vercel AI SDK ``ai.response.toolCalls``: [{"toolCallId", "toolName", "args" | "input"}]."""
    calls = _json_value(value)
    out = []
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict) and call.get("toolName"):
            arguments = call.get("args", call.get("input", ""))
            out.append({"name": _str(call["toolName"]),
                        "arguments": arguments if isinstance(arguments, str) else _dump(arguments),
                        "id": _str(call.get("toolCallId"))})
    return out


def _read_span_events(span: Any, attrs: dict[str, Any], resource: dict[str, Any],
                      evaluations: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any], str, str, int]]
                      ) -> None:
    """Fold a span's operation-details event into its attributes (what the span itself lacks)
    and collect its evaluation events."""
    for event in span.events:
        name = event.name
        if name == sc.OPERATION_DETAILS_EVENT:
            for key, value in attributes(event.attributes).items():
                if attrs.get(key) in (None, ""):
                    attrs[key] = value
        elif name == sc.EVALUATION_EVENT:
            evaluations.append((attributes(event.attributes), attrs, resource, span.trace_id.hex(),
                                span.span_id.hex(), event.time_unix_nano or span.end_time_unix_nano))


def _score(value: Any) -> float | None:
    """An evaluation score: a finite number (or numeric text), else None."""
    if isinstance(value, (str, bytes)):
        try:
            value = float(value)
        except ValueError:
            return None
    if type(value) in (int, float) and math.isfinite(value):
        return float(value)
    return None


def _finish_reason(value: Any) -> str:
    """The first finish reason: from a list, a JSON array text, or a single text."""
    if isinstance(value, str) and value.startswith("["):
        value = _json_value(value)
    if isinstance(value, list):
        value = next((v for v in value if v not in (None, "")), "")
    return _str(value)[:_NAME_CHARS]


# -- tool arguments ---------------------------------------------------------------------------

def _tool_arguments(direct: Any, wrapped: Any) -> tuple[str, str, str]:
    """(arguments as stored, ``arguments_format``, call id found in an envelope) from a tool span.

    ``direct`` is meant to be the call's JSON object: JSON object text is kept as sent (format
    ``""``: the detector parses it, and broken JSON there is the caller's), unless it is
    OpenLLMetry's LangChain envelope, which instrumentations also write there. ``wrapped`` comes
    in a framework envelope and is unwrapped. Either may be a Python repr (OpenLIT). What is not
    readable as a JSON object of arguments is kept as sent with format ``"unknown"``.
    """
    if direct is not None and direct != "":
        value, framework = direct, False
    elif wrapped is not None and wrapped != "":
        value, framework = wrapped, True
    else:
        return "", "", ""
    if isinstance(value, dict):  # an OTLP kvlist attribute
        found, call_id = _unwrap_arguments(value, framework)
        return ((_dump(found) or "{}", "json", call_id) if isinstance(found, dict)
                else (_dump(value), "unknown", call_id))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return _str(value), "unknown", ""  # a list (positional arguments), a number
    text = value.lstrip()
    if not text.startswith("{"):
        if framework and text.startswith('"'):  # a JSON string holding the input (OpenInference)
            inner = _json_value(text)
            if isinstance(inner, str):
                found = _object_from_text(inner)
                if found is not None:
                    return _dump(found) or "{}", "json", ""
        return value, "unknown", ""  # a bare string: no names to check against a schema
    second = text[1:2]
    if second in (" ", "\n", "\r", "\t"):
        second = text[1:64].lstrip()[:1]
    if not framework and second in ('"', "}"):  # JSON object text: the common case, not parsed here ...
        if '"input_str"' not in text:
            return value, "", ""
        parsed = _json_value(text)  # ... unless it may be the LangChain envelope
        if not (isinstance(parsed, dict) and _is_langchain_input(parsed)):
            return value, "", ""
    else:
        parsed = _object_from_text(text)
        if parsed is None:
            return value, "unknown", ""
    found, call_id = _unwrap_arguments(parsed, framework)
    if not isinstance(found, dict):
        return value, "unknown", call_id
    if found is parsed and text.startswith('{"'):
        return value, "json", call_id  # JSON text that is the arguments object itself: kept as sent
    return _dump(found) or "{}", "json", call_id


def _object_from_text(text: str) -> dict[str, Any] | None:
    """A dict from JSON object text or a Python dict repr (``{'order_id': 'A-1042'}``), else None."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        found = orjson.loads(text)
    except orjson.JSONDecodeError:
        if len(text) > _LITERAL_MAX_CHARS:
            return None
        try:
            found = ast.literal_eval(text)  # literals only: no names, calls or operators run
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return found if isinstance(found, dict) else None


# OpenLLMetry's LangChain on_tool_start record: {"input_str", "tags", "metadata", "inputs", "kwargs"}.
_LANGCHAIN_INPUT_KEYS = frozenset({"input_str", "tags", "metadata", "inputs", "kwargs"})
_LANGCHAIN_INPUT_MARKERS = frozenset({"inputs", "kwargs", "tags"})


def _is_langchain_input(envelope: dict[str, Any]) -> bool:
    """Whether a dict is exactly the LangChain envelope: ``input_str`` (text or dict), one of
    ``inputs``/``kwargs``/``tags`` besides, and no key outside the envelope's. A tool's own
    arguments could be named so, but not all of these and nothing else."""
    return ("input_str" in envelope and isinstance(envelope["input_str"], (str, dict))
            and envelope.keys() <= _LANGCHAIN_INPUT_KEYS and not _LANGCHAIN_INPUT_MARKERS.isdisjoint(envelope))


def _unwrap_arguments(envelope: dict[str, Any], framework: bool) -> tuple[Any, str]:
    """(the call's arguments inside a framework envelope or None when they have no names, call id).

    OpenLLMetry LangChain: ``{"input_str": "...", "inputs": {...}, "tags": ..., "metadata": ...,
    "kwargs": {"tool_call_id": ...}}``; where ``framework`` (an attribute that holds an envelope),
    OpenLLMetry ``@tool``: ``{"args": [...], "kwargs": {...}}`` (keyword arguments have names;
    positional ones do not, unless the one argument is itself a dict); anything else is the
    arguments object itself.
    """
    if _is_langchain_input(envelope):
        kwargs = envelope.get("kwargs")
        call_id = _str(kwargs.get("tool_call_id")) if isinstance(kwargs, dict) else ""
        inputs = envelope.get("inputs")
        if isinstance(inputs, dict) and inputs:
            return inputs, call_id
        inner = envelope["input_str"]
        if isinstance(inner, dict):
            return inner, call_id
        return _object_from_text(inner), call_id
    if framework and envelope and envelope.keys() <= {"args", "kwargs"}:
        args, kwargs = envelope.get("args") or [], envelope.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return None, ""
        if not args:
            return kwargs, ""
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            return args[0], ""
        return None, ""
    return envelope, ""


def _tool_result(value: Any) -> tuple[str, str]:
    """(the result as stored, call id found in its envelope) from a tool span's result attribute.

    A JSON string (OpenLLMetry ``@tool`` records ``json.dumps`` of the returned value:
    ``'"shipped"'``) is decoded; a LangChain ToolMessage serialised by OpenLLMetry or
    OpenInference gives its content and ``tool_call_id``. Anything else is kept as sent.
    """
    if isinstance(value, str):
        if value[:1] == '"':
            decoded = _json_value(value)
            return (decoded, "") if isinstance(decoded, str) else (value, "")
        if value.startswith(('{"output"', '{"type"', '{"result"')):  # only these envelopes are parsed
            parsed = _json_value(value)
            found = _tool_message(parsed) if isinstance(parsed, dict) else None
            return found if found is not None else (value, "")
        return value, ""
    if isinstance(value, dict):  # an OTLP kvlist attribute
        found = _tool_message(value)
        if found is not None:
            return found
    return _str(value), ""


def _tool_message(envelope: dict[str, Any]) -> tuple[str, str] | None:
    """(content, tool call id) of a serialised LangChain tool result, or None when it is not one.

    OpenInference: ``{"type": "tool", "data": {"content": ..., "tool_call_id": ..., "type": "tool", ...}}``
    (``message_to_dict``). OpenLLMetry: ``{"output": <returned value>, "kwargs": {...}}``, the
    value a ToolMessage's constructor form ``{"lc": 1, "type": "constructor", "id": [...,
    "ToolMessage"], "kwargs": {"content": ..., "tool_call_id": ...}}`` or the tool's own value.
    Google ADK: ``{"result": <returned value>}``, how it wraps a function tool's non-dict return.
    """
    keys = envelope.keys()
    if keys == _ADK_RESULT_KEYS:
        result = envelope["result"]
        return (result if isinstance(result, str) else _dump(result) or _str(result)), ""
    if keys == _OI_TOOL_MESSAGE_KEYS:
        data = envelope["data"]
        if envelope["type"] == "tool" and isinstance(data, dict) and data.get("type") == "tool" and "content" in data:
            return _message_content(data["content"]), _str(data.get("tool_call_id"))
        return None
    if keys == _TRACELOOP_TOOL_OUTPUT_KEYS and isinstance(envelope["kwargs"], dict):
        output = envelope["output"]
        if isinstance(output, str):
            return output, ""
        if not isinstance(output, dict) or "lc" not in output:  # the tool's own value, as JSON
            try:
                return orjson.dumps(output, default=str).decode(), ""
            except TypeError:  # nested beyond orjson's depth limit
                return None
        ids, kwargs = output.get("id"), output.get("kwargs")
        if (isinstance(ids, list) and ids[-1:] == ["ToolMessage"] and isinstance(kwargs, dict)
                and "content" in kwargs):
            return _message_content(kwargs["content"]), _str(kwargs.get("tool_call_id"))
    return None


_ADK_RESULT_KEYS = frozenset({"result"})
_OI_TOOL_MESSAGE_KEYS = frozenset({"type", "data"})
_TRACELOOP_TOOL_OUTPUT_KEYS = frozenset({"output", "kwargs"})


def _message_content(content: Any) -> str:
    """A LangChain message's content: its text, or (content blocks without text) their JSON."""
    if isinstance(content, str):
        return content
    return _content_text(content) or _dump(content)


def _json_str(value: Any) -> str:
    """A text attribute MLflow JSON-encoded (``'"gpt-4o-mini"'``), decoded; other text as sent."""
    if isinstance(value, str) and value[:1] == '"':
        decoded = _json_value(value)
        return decoded if isinstance(decoded, str) else value
    return _str(value)


def _mlflow_request_model(attrs: Mapping[str, Any]) -> str:
    """The model in an MLflow model span's inputs (the request's keyword arguments), else ""."""
    inputs = attrs.get(sc.MLFLOW_INPUTS)
    if not isinstance(inputs, str) or '"model"' not in inputs:
        return ""
    parsed = _json_value(inputs)
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else ""


def _mlflow_finish_reason(value: Any) -> str | None:
    """The first choice's finish reason in MLflow's outputs (an OpenAI response object), else None."""
    if not isinstance(value, str) or '"finish_reason"' not in value:
        return None
    output = _json_value(value)
    choices = output.get("choices") if isinstance(output, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) and reason else None
    return None


def _mlflow_usage(value: Any) -> tuple[Any, Any]:
    """(input tokens, output tokens) from MLflow's ``mlflow.chat.tokenUsage`` JSON, None when absent."""
    usage = _json_value(value)
    if not isinstance(usage, dict):
        return None, None
    return usage.get("input_tokens"), usage.get("output_tokens")


def _without_provider(model: str, provider: str) -> str:
    """``model`` without a leading ``<provider>/`` naming the span's own provider: LiteLLM routes
    by "openai/gpt-4o-mini" and Google ADK records that name, while the provider is asked for
    "gpt-4o-mini". A prefix naming another party (a router's "openai/gpt-4o" on OpenRouter) stays."""
    prefix, slash, bare = model.partition("/")
    return bare if slash and bare and prefix == provider else model


def _invocation_model(value: Any) -> str:
    """The model requested, from OpenInference's ``llm.invocation_parameters`` (JSON object text)."""
    parameters = _json_value(value)
    if not isinstance(parameters, dict):
        return ""
    model = parameters.get("model") or parameters.get("model_name")
    return model if isinstance(model, str) else ""


# -- field look-up ----------------------------------------------------------------------------

class _FieldPlans:
    """The first present, non-empty value of each field among its convention aliases.

    Spans of one instrumentation share their attribute layout, so which aliases of each field
    a layout holds is worked out once per layout (a :class:`BoundedMemo`). A span then reads one key per
    field in a single C-level pass; only a field with several aliases present in the layout
    needs the empty-value fall-through. (For a field with one alias present, an empty value and
    an absent one read the same to every caller: ``_str`` and ``_attr_count`` map both alike.)
    """

    _ABSENT = "\x00absent"  # a key no attribute has: reads as None

    def __init__(self, *fields: tuple[str, ...], memo: BoundedMemo[Any, Any]) -> None:
        self.fields = fields
        # layout -> plan. A plan's names are the layout's own str objects, counted twice by the
        # memo's sizing: a conservative figure for a few hundred bytes.
        self.memo = memo

    def values(self, attrs: dict[str, Any]) -> list[Any]:
        layout = tuple(attrs)
        plan = self.memo.get(layout)
        if plan is None:
            plan = self._plan(attrs)
            self.memo.put(layout, plan)
        keys, several = plan
        out = list(map(attrs.get, keys))
        for index, present in several:
            for key in present:
                value = attrs[key]
                if value is not None and value != "":
                    out[index] = value
                    break
        return out

    def _plan(self, attrs: dict[str, Any]) -> tuple[tuple[str, ...], tuple[tuple[int, tuple[str, ...]], ...]]:
        present = [tuple(key for key in aliases if key in attrs) for aliases in self.fields]
        keys = tuple(found[0] if found else self._ABSENT for found in present)
        several = tuple((i, found) for i, found in enumerate(present) if len(found) > 1)
        return keys, several


# The fields each span role reads through its _FieldPlans, in the order values() returns them.
_LLM_FIELDS = (sc.REQUEST_MODEL, sc.RESPONSE_MODEL, sc.INPUT_TOKENS, sc.OUTPUT_TOKENS, sc.CACHE_READ_TOKENS,
               sc.REASONING_TOKENS, sc.CACHE_WRITE_TOKENS, sc.PROVIDER, sc.OPERATION, sc.HOST,
               sc.TIME_TO_FIRST_CHUNK_S, sc.TIME_TO_FIRST_CHUNK_MS, sc.FINISH_REASONS, sc.PROMPT_NAME,
               sc.PROMPT_VERSION, *((key,) for key, _ in sc.MODALITY_TOKENS), sc.OI_MODEL_NAME,
               sc.OI_INVOCATION_PARAMETERS, sc.MLFLOW_MODEL, sc.MLFLOW_TOKEN_USAGE)
_TOOL_FIELDS = (sc.TOOL_NAME, sc.HOST, sc.TOOL_CALL_ID, sc.TOOL_ARGUMENTS, sc.TOOL_ARGUMENTS_WRAPPED,
                sc.TOOL_RESULT)
_STEP_FIELDS = (sc.AGENT, sc.HOST)


def _parent_key_size(key: tuple[str, str], _value: None) -> int:
    # approx_size(key) unrolled for the hot path: a pair of hex (ASCII) strings; the value is the
    # None singleton, which an entry does not hold.
    trace_id, span_id = key
    return _PAIR_OF_ASCII_BYTES + len(trace_id) + len(span_id)


_PAIR_OF_ASCII_BYTES = approx_size(("", ""))


# -- scalar coercion (attributes can be empty, odd-typed or hostile) --------------------------

def _first(attrs: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        value = attrs.get(key)
        if value is not None and value != "":
            return value
    return None


def _str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, dict)):
        return _dump(value)
    return str(value)


def _attr_count(value: Any, limit: FieldLimit, flags: dict[str, str], table: str, trace_id: str,
                span_id: str, rejections: list[ValueRejection]) -> int | None:
    """A count from an attribute: absent or empty reads 0, numeric text counts, the rest is checked.

    Attributes arrive as ints, floats or text depending on the SDK ("120", 120.0); anything
    else, or a number outside the bounds, is rejected: nulled, flagged and reported.
    """
    if value is None or value == "" or value == b"":
        return 0
    number = value
    if isinstance(value, (str, bytes)):
        try:
            number = float(value)
        except ValueError:
            number = value  # not numeric text: check_number names it
    checked, reason = check_number(number, limit.low, limit.high, limit.integral)
    if reason is None:
        return checked
    flags[limit.name] = reason
    rejections.append(ValueRejection(table, limit.name, reason, keepable(value), trace_id, span_id))
    return None


def _rejected(value: Any, limit: FieldLimit, flags: dict[str, str], table: str, trace_id: str,
              span_id: str, rejections: list[ValueRejection]) -> None:
    """Report a computed number outside its bounds; its row gets None."""
    reason = check_number(value, limit.low, limit.high, limit.integral)[1] or NOT_A_NUMBER
    flags[limit.name] = reason
    rejections.append(ValueRejection(table, limit.name, reason, keepable(value), trace_id, span_id))
    return None


def _json_value(value: Any) -> Any:
    if isinstance(value, (str, bytes)) and value:
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return value


def _dump(value: Any) -> str:
    if not value:
        return ""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        try:
            return orjson.dumps(value, default=str).decode()
        except TypeError:  # nested beyond orjson's depth limit: hostile input, no text worth keeping
            return ""
