"""Hallucinated tool calls: calls to tools nobody declared, and arguments that break the schema.

The registry a call is judged against is the union of the configured tools (``known_tools``,
``tool_schemas``) and the tools declared to the model in the same trace
(``LlmCall.tool_definitions``, which the normaliser fills from ``gen_ai.tool.definitions`` and
OpenInference tool schemas, and ``ToolDeclaration`` for tools declared only on a log record). Both what the model asked for (``LlmCall.requested_tool_calls``,
the only trace of a call to an undeclared tool when the framework refused to run it) and what
was executed (``ToolCall``) are checked. A trace with no declared tools and an empty configured
registry is not judged: without a registry every call would look hallucinated.

A trace's verdict does not depend on the order its spans and log records arrive in: a call to a
tool not (yet) declared is held until the trace's root span arrives (it ends last: the trace's
spans are in; unless the trace declared nothing on its spans, since log records may still
declare), or ``declaration_grace_s`` of event time has passed since the call, or the trace is
forgotten, and judged then against everything the trace declared by that time; a
declaration arriving meanwhile settles it (and its arguments are checked then).
Arguments the normaliser could not read as the call's (``ToolCall.arguments_format ==
"unknown"``: a positional list, a bare string) are not judged, never called invalid.

Argument validation uses ``jsonschema``. It is pure Python (no I/O, no native code), so it keeps
the detectors' "stdlib/numpy/scipy only" spirit; it is imported where a validator is built.
Validators are built once per distinct schema and cached.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Collection, Mapping, Sequence

from agentwatch.detectors.bounded import EventTimeLru, check_at_least, check_positive, stable_hash
from agentwatch.detectors.evidence import Evidence
from agentwatch.detectors.loops import NOT_JSON, parsed_json, requested_calls
from agentwatch.events import AgentStep, Finding, LlmCall, Severity, ToolCall, ToolDeclaration

_EVIDENCE_TEXT_MAX = 500
_EVIDENCE_TOOLS_MAX = 50
_PARSE_CACHE_MAX = 512
_VERDICT_CACHE_MAX = 4_096
_UNKNOWN = object()  # distinct tool_definitions texts kept parsed (agents resend the same one)

# A validator answers None when the arguments are valid, else a short reason.
Check = Callable[[Any], "str | None"]


# Keywords that only annotate (jsonschema asserts ``format`` only with a format checker, which
# the detector does not pass).
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$id",
                          "$schema", "format", "readOnly", "writeOnly", "deprecated",
                          "contentMediaType", "contentEncoding"})
_JSON_TYPES: dict[str, frozenset[type]] = {
    "string": frozenset({str}),
    "integer": frozenset({int}),  # 1.0 is an integer to JSON Schema too: left to jsonschema
    "number": frozenset({int, float}),
    "boolean": frozenset({bool}),
    "null": frozenset({type(None)}),
    "array": frozenset({list}),
    "object": frozenset({dict}),
}
_SCALARS = (str, int, float, bool, type(None))
_Fast = Callable[[Any], bool]
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_SIZES = ("minLength", "maxLength", "minItems", "maxItems")
_HANDLED = frozenset({"type", "enum", "required", "properties", "additionalProperties", "items",
                      "pattern", *_BOUNDS, *_SIZES})


def compile_fast_check(schema: Any) -> _Fast | None:
    """A plain-Python check for the schema subset tool definitions use in practice.

    Returns None when the schema uses anything outside the subset. The check is *sound for
    acceptance*: True means jsonschema would accept the instance too; False means "not sure",
    and the caller asks jsonschema (which also words the error). Tool arguments are validated on
    the hot path, and jsonschema's general machinery costs ~10x more per call.
    """
    import re

    if not isinstance(schema, dict):
        return None
    if any(k not in _HANDLED and k not in _ANNOTATIONS for k in schema):
        return None
    allowed: frozenset[type] | None = None
    if "type" in schema:
        names = schema["type"]
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or any(n not in _JSON_TYPES for n in names):
            return None
        allowed = frozenset().union(*(_JSON_TYPES[n] for n in names))
    enum = schema.get("enum")
    if enum is not None and (not isinstance(enum, list)
                             or not all(isinstance(v, _SCALARS) for v in enum)):
        return None
    required = schema.get("required", ())
    if not isinstance(required, (list, tuple)) or not all(isinstance(r, str) for r in required):
        return None
    props: dict[str, _Fast] = {}
    raw_props = schema.get("properties", {})
    if not isinstance(raw_props, dict):
        return None
    for prop, sub in raw_props.items():
        check = compile_fast_check(sub)
        if check is None:
            return None
        props[prop] = check
    extra_schema = schema.get("additionalProperties", True)
    extra: _Fast | bool
    if isinstance(extra_schema, bool):
        extra = extra_schema
    else:
        compiled = compile_fast_check(extra_schema)
        if compiled is None:
            return None
        extra = compiled
    items = None
    if "items" in schema:
        items = compile_fast_check(schema["items"])
        if items is None:
            return None
    bounds = []
    for keyword in _BOUNDS:
        if keyword in schema:
            value = schema[keyword]
            if type(value) not in (int, float):
                return None  # draft-04 boolean exclusiveMinimum and the like
            bounds.append((keyword, float(value)))
    sizes = {}
    for keyword in _SIZES:
        if keyword in schema:
            if type(schema[keyword]) is not int:
                return None
            sizes[keyword] = schema[keyword]
    search = None
    if "pattern" in schema:
        try:
            search = re.compile(schema["pattern"]).search
        except (re.error, TypeError):
            return None
    min_len, max_len = sizes.get("minLength", 0), sizes.get("maxLength")
    min_items, max_items = sizes.get("minItems", 0), sizes.get("maxItems")

    def check(x: Any) -> bool:
        tx = type(x)
        if allowed is not None and tx not in allowed:
            return False
        if enum is not None and not any(type(v) is tx and v == x for v in enum):
            return False
        if tx is dict:
            for key in required:
                if key not in x:
                    return False
            for key, value in x.items():
                sub = props.get(key)
                if sub is not None:
                    if not sub(value):
                        return False
                elif extra is False or (extra is not True and not extra(value)):
                    return False
        elif tx is str:
            if len(x) < min_len or (max_len is not None and len(x) > max_len):
                return False
            if search is not None and search(x) is None:
                return False
        elif tx is int or tx is float:
            for keyword, bound in bounds:
                if not ((keyword == "minimum" and x >= bound) or (keyword == "maximum" and x <= bound)
                        or (keyword == "exclusiveMinimum" and x > bound)
                        or (keyword == "exclusiveMaximum" and x < bound)):
                    return False
        elif tx is list:
            if len(x) < min_items or (max_items is not None and len(x) > max_items):
                return False
            if items is not None:
                for value in x:
                    if not items(value):
                        return False
        return True

    return check


def build_check(schema: Mapping[str, Any]) -> Check | None:
    """A checker for ``schema``, or None when the schema itself is not a valid JSON schema."""
    import jsonschema  # pure Python; see the module docstring
    from jsonschema.exceptions import SchemaError, best_match

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError:
        return None
    validator = cls(schema)
    fast = compile_fast_check(schema)

    def check(instance: Any) -> str | None:
        if (fast is not None and fast(instance)) or validator.is_valid(instance):
            return None
        error = best_match(validator.iter_errors(instance))
        path = "/".join(str(p) for p in error.absolute_path)
        return f"{path}: {error.message}" if path else error.message

    return check


def _judge_text(check: Check, arguments: str) -> str | None:
    """None when the arguments text is valid (or was not captured), else the reason."""
    text = arguments.strip()
    if not text:
        return None  # not captured by the instrumentation
    instance = parsed_json(text)  # shared with the loop detector's canonicalisation
    if instance is NOT_JSON:
        return "arguments are not valid JSON"
    return check(instance)


def parse_tool_definitions(text: str) -> list[tuple[str, str, Any]]:
    """``[(name, schema_key, schema)]`` from ``LlmCall.tool_definitions``.

    Accepts ``parameters`` / ``input_schema`` / ``inputSchema`` (OpenAI, Anthropic, MCP) and
    the OpenAI ``{"type": "function", "function": {...}}`` wrapping. A tool without a schema
    gets key ``""`` (declared, arguments not checked).
    """
    try:
        tools = json.loads(text)
    except ValueError:
        return []
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        return []
    out = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if isinstance(tool.get("function"), dict):
            tool = tool["function"]
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            continue
        schema = tool.get("parameters", tool.get("input_schema", tool.get("inputSchema")))
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                schema = None
        if isinstance(schema, dict) and schema:
            canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"))
            out.append((name, stable_hash(canonical), schema))
        else:
            out.append((name, "", None))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolEvidence(Evidence):
    """A call to an undeclared tool, or with arguments its schema rejects.

    ``arguments`` is clipped; ``declared_tools`` lists the first declared names (sorted) and
    ``declared_tool_count`` all of them; ``error`` (the schema's complaint) is set for
    ``invalid_tool_arguments`` only. ``source`` is ``executed`` or ``requested``.
    """

    trace_id: str
    tool: str
    arguments: str
    source: str
    declared_tools: tuple[str, ...]
    declared_tool_count: int
    configured_tool_count: int
    error: str | None = None


class _ToolTrace:
    __slots__ = ("last_ts", "declared", "fired", "defs_hash", "pending")

    def __init__(self, ts: float) -> None:
        self.last_ts = ts
        # hash() of the last tool_definitions text merged: agents resend the same definitions
        # on every call. Process-local, so not checkpointed; re-merging after a restore is a no-op.
        self.defs_hash: int | None = None
        self.declared: dict[str, str] = {}  # tool name -> schema key ("" = no schema)
        self.fired: list[str] = []  # "kind:tool" already reported in this trace
        # Calls to tools not declared yet: [ts, tool, arguments, source, arguments_unknown].
        self.pending: list[list[Any]] = []


class HallucinatedToolDetector:
    """Calls to undeclared tools and arguments failing the declared JSON schema, per trace.

    Each (kind, tool) fires once per trace: a model that keeps calling a tool it made up is one
    incident, and the loop detector already counts repetitions.

    Parameters
    ----------
    known_tools : Collection[str]
        Tools that exist everywhere (configured registry), schema unknown.
    tool_schemas : Mapping[str, Mapping]
        Configured tools with their JSON schema (these are known tools too). A schema declared
        in the trace takes precedence: it is what the model was shown.
    validate_arguments : bool
        Check arguments against schemas (False: only undeclared tools are reported).
    max_traces : int
        Most traces held (least recently active evicted first).
    trace_ttl_s : float
        A trace without events for this long (event time) is forgotten.
    max_tools_per_trace : int
        Most declared tools remembered per trace.
    max_schemas : int
        Most distinct declared schemas kept (shared by all traces).
    declaration_grace_s : float
        How long (event time) a call to a tool not yet declared waits for its trace's
        declarations before it is judged undeclared, when the trace's root span does not come
        first. 0 judges at once (arrival order matters).

    Examples
    --------
    >>> det = HallucinatedToolDetector()
    >>> defs = '[{"name": "search", "parameters": {"type": "object", "required": ["q"]}}]'
    >>> events = [
    ...     LlmCall(ts=1.0, trace_id="t", span_id="a", tool_definitions=defs,
    ...             requested_tool_calls='[{"name": "search", "arguments": "{}", "id": "1"}]'),
    ...     ToolCall(ts=2.0, trace_id="t", span_id="b", tool_name="delete_all", arguments="{}"),
    ...     AgentStep(ts=3.0, trace_id="t", span_id="r")]  # the root span: the trace is complete
    >>> [(f.kind, f.evidence["tool"]) for e in events for f in det.update(e)]
    [('invalid_tool_arguments', 'search'), ('undeclared_tool', 'delete_all')]
    """

    name: ClassVar[str] = "hallucinated_tool"
    partition_by: ClassVar[str] = "trace_id"
    # Constructor arguments that bound the state: split over the partitions of its stage.
    state_caps: ClassVar[tuple[str, ...]] = ("max_traces",)
    accepts: ClassVar[tuple[type, ...]] = (LlmCall, ToolCall, AgentStep, ToolDeclaration)
    _MAX_FIRED_PER_TRACE: ClassVar[int] = 16
    _MAX_PENDING_PER_TRACE: ClassVar[int] = 16  # beyond this, a trace's undeclared calls are judged at once

    def __init__(self, *, known_tools: Collection[str] = (),
                 tool_schemas: Mapping[str, Mapping[str, Any]] | None = None,
                 validate_arguments: bool = True, max_traces: int = 50_000,
                 trace_ttl_s: float = 900.0, max_tools_per_trace: int = 128,
                 max_schemas: int = 4_096, declaration_grace_s: float = 30.0) -> None:
        if isinstance(known_tools, str):
            raise ValueError("known_tools must be a collection of tool names, not one string")
        for arg, value in (("max_traces", max_traces), ("max_tools_per_trace", max_tools_per_trace),
                           ("max_schemas", max_schemas)):
            check_at_least(arg, value, 1)
        check_positive("trace_ttl_s", trace_ttl_s)
        if not 0 <= declaration_grace_s < trace_ttl_s:
            raise ValueError(f"declaration_grace_s must be in [0, trace_ttl_s), got {declaration_grace_s}")
        self.declaration_grace_s = float(declaration_grace_s)
        self.known_tools = frozenset(str(t) for t in known_tools)
        self.tool_schemas = {str(k): dict(v) for k, v in (tool_schemas or {}).items()}
        self._configured_checks: dict[str, Check] = {}
        for tool, schema in self.tool_schemas.items():
            check = build_check(schema)
            if check is None:
                raise ValueError(f"tool_schemas[{tool!r}] is not a valid JSON schema")
            self._configured_checks[tool] = check
        self.validate_arguments = bool(validate_arguments)
        self.max_traces = max_traces
        self.trace_ttl_s = float(trace_ttl_s)
        self.max_tools_per_trace = max_tools_per_trace
        self.max_schemas = max_schemas
        self._has_registry = bool(self.known_tools or self.tool_schemas)
        self._traces: EventTimeLru[str, _ToolTrace] = EventTimeLru(max_traces, trace_ttl_s)
        # schema key -> schema, first-in first-out: the registration order depends only on the
        # events, so a restored detector evicts exactly what an uninterrupted one would.
        self._schemas: OrderedDict[str, Any] = OrderedDict()
        # Derived caches (not checkpointed): rebuilt from the above on demand.
        self._checks: dict[str, Check | None] = {}
        self._parsed: OrderedDict[str, list[tuple[str, str, Any]]] = OrderedDict()
        self._scratch: list[Finding] = []
        self._verdicts: dict[tuple[str, str], str | None] = {}
        # (deadline, trace id) of traces holding pending calls, in the order they were held: at
        # most one entry per trace with pending calls, so bounded by max_traces.
        self._due: deque[tuple[float, str]] = deque()

    def state_size(self) -> int:
        return len(self._traces)

    def update(self, event: LlmCall | ToolCall | AgentStep | ToolDeclaration) -> Sequence[Finding]:
        ts = event.ts
        traces = self._traces
        findings = self._scratch  # reused: a fresh list per event is GC pressure
        findings.clear()
        if traces.next_sweep_ts <= ts:
            for trace_id, gone in traces.expire(ts):
                self._judge_pending(trace_id, gone, ts, float("inf"), findings)
        if self._due and self._due[0][0] <= ts:
            self._judge_due(ts, findings)
        trace_id = event.trace_id
        if isinstance(event, AgentStep):
            if not event.parent_span_id:  # the root ends last: what its spans declare is in
                t = traces.entries.get(trace_id)
                # A trace that declared nothing on its spans may declare on a log record, which can
                # come after the root: its held calls wait for the grace period instead.
                if t is not None and t.pending and (t.declared or self._has_registry):
                    self._judge_pending(trace_id, t, ts, float("inf"), findings)
            return tuple(findings) if findings else ()
        t = traces.get(trace_id)
        hold = self.declaration_grace_s > 0
        if isinstance(event, (LlmCall, ToolDeclaration)):
            if event.tool_definitions:
                if t is None:
                    t = self._new_trace(trace_id, ts, findings)
                if self._declare(t, event.tool_definitions) and t.pending:
                    self._settle_pending(trace_id, t, ts, findings)
            if isinstance(event, LlmCall) and event.requested_tool_calls:
                if t is None:
                    if not (self._has_registry or hold):
                        return tuple(findings) if findings else ()  # no registry to judge by, ever
                    t = self._new_trace(trace_id, ts, findings)
                for name, arguments in requested_calls(event.requested_tool_calls):
                    self._check_call(trace_id, t, ts, name, arguments, "requested", findings)
        else:
            if t is None:
                if not (self._has_registry or hold):
                    return ()
                t = self._new_trace(trace_id, ts, findings)
            self._check_call(trace_id, t, ts, event.tool_name, event.arguments, "executed", findings,
                             arguments_unknown=event.arguments_format == "unknown")
        if t is not None and ts > t.last_ts:
            t.last_ts = ts
        return tuple(findings) if findings else ()

    def _new_trace(self, trace_id: str, ts: float, findings: list[Finding]) -> _ToolTrace:
        t = _ToolTrace(ts)
        for gone_id, gone in self._traces.insert(trace_id, t):
            self._judge_pending(gone_id, gone, ts, float("inf"), findings)
        return t

    def _settle_pending(self, trace_id: str, t: _ToolTrace, ts: float, findings: list[Finding]) -> None:
        """New declarations: the held calls they declare are judged now (their arguments)."""
        still = []
        for held in t.pending:
            held_ts, name, arguments, source, unknown = held
            if self._check_for(name, t)[0]:
                self._check_call(trace_id, t, ts, name, arguments, source, findings, arguments_unknown=unknown,
                                 hold=False)
            else:
                still.append(held)
        t.pending = still

    def _judge_due(self, ts: float, findings: list[Finding]) -> None:
        due = self._due
        while due and due[0][0] <= ts:
            _, trace_id = due.popleft()
            t = self._traces.entries.get(trace_id)  # not a use of the trace: its LRU place stays
            if t is not None and t.pending:
                self._judge_pending(trace_id, t, ts, ts - self.declaration_grace_s, findings)
                if t.pending:
                    due.append((t.pending[0][0] + self.declaration_grace_s, trace_id))

    def _judge_pending(self, trace_id: str, t: _ToolTrace, ts: float, held_before: float,
                       findings: list[Finding]) -> None:
        """Judge the calls held since ``held_before`` or earlier: undeclared if still unknown."""
        if not t.pending:
            return
        still = []
        for held in t.pending:
            held_ts, name, arguments, source, unknown = held
            if held_ts > held_before:
                still.append(held)
            else:
                self._check_call(trace_id, t, ts, name, arguments, source, findings, arguments_unknown=unknown,
                                 hold=False)
        t.pending = still

    def _declare(self, t: _ToolTrace, text: str) -> bool:
        """Merge a tool_definitions text into the trace; True when it may have declared something."""
        text_hash = hash(text)
        if text_hash == t.defs_hash:
            return False
        t.defs_hash = text_hash
        parsed = self._parsed.get(text)
        if parsed is None:
            parsed = parse_tool_definitions(text)
            self._parsed[text] = parsed
            if len(self._parsed) > _PARSE_CACHE_MAX:
                self._parsed.popitem(last=False)
        declared = t.declared
        schemas = self._schemas
        for name, key, schema in parsed:
            if key and key not in schemas:
                schemas[key] = schema
                if len(schemas) > self.max_schemas:
                    old, _ = schemas.popitem(last=False)
                    self._checks.pop(old, None)
            if declared.get(name) != key and (name in declared
                                              or len(declared) < self.max_tools_per_trace):
                declared[name] = key
        return True

    def _check_for(self, name: str, t: _ToolTrace) -> tuple[bool, Check | None, str]:
        """(is the tool known, its argument check if a schema is known, the schema's identity)."""
        key = t.declared.get(name)
        if key is not None:
            if not key:
                return True, self._configured_checks.get(name), f"config:{name}"
            if key not in self._checks:
                schema = self._schemas.get(key)
                if schema is None:
                    return True, None, ""  # schema evicted: declared, arguments not checkable
                self._checks[key] = build_check(schema)
            return True, self._checks[key], key
        if name in self.tool_schemas:
            return True, self._configured_checks[name], f"config:{name}"
        return name in self.known_tools, None, ""

    def _check_call(self, trace_id: str, t: _ToolTrace, ts: float, name: str, arguments: Any,
                    source: str, findings: list[Finding], *, arguments_unknown: bool = False,
                    hold: bool = True) -> None:
        known, check, schema_id = self._check_for(name, t)
        if not known:
            if hold and self.declaration_grace_s > 0 and len(t.pending) < self._MAX_PENDING_PER_TRACE:
                if not t.pending:
                    self._due.append((ts + self.declaration_grace_s, trace_id))
                t.pending.append([ts, name, arguments, source, arguments_unknown])
                return
            if t.declared or self._has_registry:
                self._fire(trace_id, t, ts, "undeclared_tool", name, arguments, source, None,
                           findings)
            return
        if check is None or not self.validate_arguments or arguments_unknown:
            return
        if isinstance(arguments, str):
            # The executed call usually repeats the text the model requested a moment before:
            # remember verdicts per (check, text) so it is parsed and validated once.
            verdict_key = (schema_id, arguments)  # a pure function of both: never stale
            reason = self._verdicts.get(verdict_key, _UNKNOWN)
            if reason is _UNKNOWN:
                reason = _judge_text(check, arguments)
                if len(self._verdicts) >= _VERDICT_CACHE_MAX:
                    self._verdicts.clear()
                self._verdicts[verdict_key] = reason
        else:
            reason = check(arguments)
        if reason is not None:
            self._fire(trace_id, t, ts, "invalid_tool_arguments", name, arguments, source,
                       reason, findings)

    def _fire(self, trace_id: str, t: _ToolTrace, ts: float, kind: str, tool: str,
              arguments: Any, source: str, reason: str | None, findings: list[Finding]) -> None:
        tag = f"{kind}:{tool}"
        if tag in t.fired or len(t.fired) >= self._MAX_FIRED_PER_TRACE:
            return
        t.fired.append(tag)
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, sort_keys=True)
        declared = sorted(t.declared)
        evidence = ToolEvidence(
            trace_id=trace_id, tool=tool, arguments=arguments[:_EVIDENCE_TEXT_MAX], source=source,
            declared_tools=tuple(declared[:_EVIDENCE_TOOLS_MAX]),
            declared_tool_count=len(declared),
            configured_tool_count=len(self.known_tools | self.tool_schemas.keys()),
            error=None if reason is None else reason[:_EVIDENCE_TEXT_MAX])
        findings.append(Finding(detector=self.name, key=trace_id, kind=kind,
                                severity=Severity.WARNING, ts=ts, value=1.0, threshold=0.0,
                                evidence=evidence.to_mapping()))

    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "lru": self._traces.snapshot_meta(),
                "schemas": [[k, s] for k, s in self._schemas.items()],
                "traces": [[trace_id, t.last_ts, t.declared, t.fired, t.pending]
                           for trace_id, t in self._traces.items()],
                "due": [list(d) for d in self._due]}

    def restore(self, snap: dict[str, Any]) -> None:
        self._traces.clear()
        self._traces.restore_meta(snap.get("lru", {}))
        self._schemas = OrderedDict((k, s) for k, s in snap.get("schemas", []))
        self._checks.clear()
        self._parsed.clear()
        self._verdicts.clear()
        for trace_id, last_ts, declared, fired, *pending in snap.get("traces", []):
            t = _ToolTrace(float(last_ts))
            t.declared = {str(k): str(v) for k, v in declared.items()}
            t.fired = list(fired)
            t.pending = [[float(p[0]), str(p[1]), p[2], str(p[3]), bool(p[4])] for p in (pending[0] if pending else [])]
            self._traces.insert(trace_id, t)
        self._due = deque((float(d), str(trace_id)) for d, trace_id in snap.get("due", []))
