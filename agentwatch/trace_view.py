"""One trace as a tree of its spans, for ``agentwatch trace``.

:func:`build_trace` is pure: the trace's agent steps, model calls and tool calls (events, as the
snapshot rows decode) and the findings keyed by its id go in, a :class:`TraceTree` comes out.
Each span hangs under the span named by its ``parent_span_id``; a span whose parent is not in the
trace (not instrumented, not yet flushed) is a root. Siblings are in start-time order. The
findings are attached at the root: the per-trace detectors (``agent_loop``,
``hallucinated_tool``) key their findings by trace id.

:func:`render_text` and :func:`tree_to_json` render the tree; :func:`load_trace` reads it from
the snapshot views.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import orjson

from agentwatch.events import AgentStep, Finding, LlmCall, Severity, ToolCall, event_from_dict

Span = AgentStep | LlmCall | ToolCall

SPAN_TYPES: dict[type, str] = {AgentStep: "agent_step", LlmCall: "llm_call", ToolCall: "tool_call"}
# Evidence fields worth a line, most telling first; the totals every loop finding carries are not.
SUMMARY_FIELDS = ("tool", "arguments", "cycle", "period", "tokens_per_call", "growth_factor",
                  "prompt_head", "error", "reason", "model", "metric")
CLIP = 80


@dataclass(frozen=True, slots=True)
class TraceNode:
    """A span and the spans under it, siblings in start-time order."""

    span: Span
    start_ts: float
    end_ts: float
    children: tuple[TraceNode, ...] = ()

    @property
    def type(self) -> str:
        return SPAN_TYPES[type(self.span)]


@dataclass(frozen=True, slots=True)
class TraceTree:
    trace_id: str
    roots: tuple[TraceNode, ...]
    findings: tuple[Finding, ...]  # in time order

    @property
    def span_count(self) -> int:
        return sum(1 for _ in walk(self.roots))

    @property
    def start_ts(self) -> float | None:
        return min((n.start_ts for n in walk(self.roots)), default=None)

    @property
    def end_ts(self) -> float | None:
        return max((n.end_ts for n in walk(self.roots)), default=None)


def walk(nodes: Iterable[TraceNode]) -> Iterable[TraceNode]:
    for node in nodes:
        yield node
        yield from walk(node.children)


def span_start(span: Span) -> float:
    if isinstance(span, AgentStep) and span.start_ts:
        return span.start_ts
    return span.ts - (span.latency_ms or 0.0) / 1000.0  # ts is the span's end


def build_trace(trace_id: str, spans: Iterable[Span], findings: Iterable[Finding] = ()) -> TraceTree:
    """The tree of ``spans`` by parent span id, with ``findings`` at the root.

    A span delivered twice (at-least-once) is kept once; spans whose parents form a cycle are
    shown from the earliest of them rather than lost.
    """
    by_id: dict[str, Span] = {}
    ordered: list[Span] = []
    for span in spans:
        if span.span_id in by_id:
            continue
        by_id[span.span_id] = span
        ordered.append(span)
    children: dict[str, list[Span]] = {}
    roots: list[Span] = []
    for span in ordered:
        parent = span.parent_span_id
        if parent and parent != span.span_id and parent in by_id:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)

    def order(group: Iterable[Span]) -> list[Span]:
        return sorted(group, key=lambda s: (span_start(s), s.ts, s.span_id))

    placed: set[str] = set()

    def node(span: Span) -> TraceNode:
        placed.add(span.span_id)
        kids = tuple(node(c) for c in order(children.get(span.span_id, ())) if c.span_id not in placed)
        return TraceNode(span=span, start_ts=span_start(span), end_ts=span.ts, children=kids)

    tree = [node(s) for s in order(roots)]
    while len(placed) < len(ordered):  # only a parent cycle leaves spans unplaced
        tree.append(node(order(s for s in ordered if s.span_id not in placed)[0]))
    unique: dict[tuple[Any, ...], Finding] = {}
    for f in findings:
        unique.setdefault((f.detector, f.kind, f.ts, f.resolved), f)
    kept = sorted(unique.values(), key=lambda f: (f.ts, f.detector, f.kind, f.resolved))
    return TraceTree(trace_id=trace_id, roots=tuple(sorted(tree, key=lambda n: (n.start_ts, n.span.span_id))),
                     findings=tuple(kept))


# -- rendering ----------------------------------------------------------------------------------

def clip(text: Any, limit: int = CLIP) -> str:
    text = str(text).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _num(value: float) -> str:
    return f"{value:g}"


def evidence_summary(finding: Finding) -> str:
    """A few ``name=value`` pairs of the evidence that say what the detector saw."""
    evidence = finding.evidence or {}
    parts = [f"{name}={clip(_flat(evidence[name]), 60)}" for name in SUMMARY_FIELDS
             if evidence.get(name) not in (None, "", [], ())]
    if not parts:  # an unfamiliar detector: its first few scalars
        parts = [f"{name}={clip(value, 40)}" for name, value in evidence.items()
                 if name != "trace_id" and isinstance(value, (str, int, float)) and value != ""][:3]
    return ", ".join(parts)


def _flat(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def span_line(span: Span) -> str:
    status = "ok" if span.status == "ok" else f"{span.status}: {clip(span.error, 60)}" if span.error else span.status
    latency = f"{span.latency_ms:.0f} ms"
    if isinstance(span, AgentStep):
        label = span.name or span.operation or span.agent or "step"
        op = f" ({span.operation})" if span.operation and span.operation != label else ""
        return f"step {label}{op}  {latency}  {status}"
    if isinstance(span, LlmCall):
        cost = f"${span.cost_usd:.6f}" if span.priced else "$? (unpriced)"
        return (f"llm {span.model or span.request_model or '?'}  in={span.input_tokens} "
                f"out={span.output_tokens}  {cost}  {latency}  {status}")
    return (f"tool {span.tool_name or '?'}  args={clip(span.arguments)}  result={clip(span.result)}  "
            f"{latency}  {status}")


def finding_line(finding: Finding) -> str:
    head = (f"finding {finding.detector}/{finding.kind} {finding.severity}"
            f"{' resolved' if finding.resolved else ''} at {utc(finding.ts)}")
    if not finding.resolved:
        head += f"  value={_num(finding.value)} threshold={_num(finding.threshold)}"
    summary = evidence_summary(finding)
    return f"{head}: {summary}" if summary else head


def render_text(tree: TraceTree, indent: str = "  ") -> str:
    """The tree as indented lines: the trace, its findings, then its spans by depth."""
    start, end = tree.start_ts, tree.end_ts
    header = f"trace {tree.trace_id}"
    if start is not None and end is not None:
        header += f"  {utc(start)}  {(end - start) * 1000:.0f} ms  {tree.span_count} spans"
    else:
        header += "  (no spans in the snapshots)"
    lines = [header]
    lines += [indent + finding_line(f) for f in tree.findings]

    def add(nodes: Sequence[TraceNode], depth: int) -> None:
        for n in nodes:
            lines.append(indent * depth + span_line(n.span))
            add(n.children, depth + 1)

    add(tree.roots, 1)
    return "\n".join(lines) + "\n"


def finding_to_json(finding: Finding) -> dict[str, Any]:
    return {"detector": finding.detector, "kind": finding.kind, "key": finding.key,
            "severity": str(finding.severity), "ts": finding.ts, "value": finding.value,
            "threshold": finding.threshold, "resolved": finding.resolved,
            "summary": evidence_summary(finding), "evidence": dict(finding.evidence or {})}


def node_to_json(node: TraceNode) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(node.span).items() if k != "trace_id"}
    return {"type": node.type, **fields, "start_ts": node.start_ts, "end_ts": node.end_ts,
            "children": [node_to_json(c) for c in node.children]}


def tree_to_json(tree: TraceTree) -> dict[str, Any]:
    return {"trace_id": tree.trace_id, "start_ts": tree.start_ts, "end_ts": tree.end_ts,
            "span_count": tree.span_count, "findings": [finding_to_json(f) for f in tree.findings],
            "spans": [node_to_json(n) for n in tree.roots]}


# -- reading the snapshots ----------------------------------------------------------------------

def event_from_row(cls: type, row: Mapping[str, Any]) -> Any:
    """An event from a snapshot row: nulls (fields nulled as implausible) take the default."""
    data = {k: v for k, v in row.items() if v is not None}
    if cls is Finding:
        evidence = data.get("evidence")
        if isinstance(evidence, str):
            try:
                data["evidence"] = orjson.loads(evidence) if evidence else {}
            except orjson.JSONDecodeError:
                data["evidence"] = {"text": evidence}
        data.setdefault("severity", Severity.INFO)
    return event_from_dict(cls, data)


def load_trace(con: Any, trace_id: str) -> TraceTree | None:
    """The trace from the snapshot views of DuckDB connection ``con``; None when it has no
    span and no finding there."""
    def rows(sql: str) -> list[dict[str, Any]]:
        cursor = con.execute(sql, [trace_id])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, values)) for values in cursor.fetchall()]

    spans: list[Span] = []
    for cls in (AgentStep, LlmCall, ToolCall):
        spans += [event_from_row(cls, row) for row in rows(f"SELECT * FROM {cls.table} WHERE trace_id = ?")]
    findings = [event_from_row(Finding, row) for row in rows("SELECT * FROM findings WHERE key = ?")]
    if not spans and not findings:
        return None
    return build_trace(trace_id, spans, findings)
